"""``pinning.Lent``: a mapping lent to CUDA is given back when released, or, collected unreleased, queued still
mapped and given back at the next safe point; never unmapped while registered, and a collection itself never
calls CUDA (it may come inside a graph capture or in a reader thread). CUDA's calls are stood in for (recorded)
so that the order is checked on any machine; the real registration is checked on a GPU in test_disk_pinning.py."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from lp_plugin.core import pinning


@pytest.fixture
def cuda_calls(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pinning, "_collected", [])
    monkeypatch.setattr(pinning, "_stuck", [])
    monkeypatch.setattr(pinning, "register", lambda ptr, n: calls.append(("register", ptr, n)) or True)
    monkeypatch.setattr(pinning, "unregister", lambda ptr: calls.append(("unregister", ptr)) or True)
    monkeypatch.setattr(pinning, "synchronize_devices", lambda: calls.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return calls


@pytest.fixture
def mapping(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 32)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class Owner:  # (a tier entry dropped with its model, never closed)
    def __init__(self, mapping):
        self.lent = pinning.Lent(mapping)
        self.cycle = self  # freed by the cyclic collector, whenever it runs


def test_a_collected_lent_is_queued_mapped_and_given_back_at_the_next_safe_point(cuda_calls, mapping):
    owner = Owner(mapping)
    ptr = owner.lent.tensor.data_ptr()
    view = owner.lent.tensor[256:512]
    del owner
    gc.collect()
    assert cuda_calls == [("register", ptr, 8192)]  # the collection called nothing
    assert view[:3].tolist() == [0, 1, 2] and not mapping.closed
    assert pinning.give_back_collected() == 1
    assert cuda_calls[1:] == [("synchronize",), ("unregister", ptr)]
    assert pinning._collected == [] and pinning.give_back_collected() == 0
    assert view[:3].tolist() == [0, 1, 2]  # still mapped while a view lives, no longer lent


def test_nothing_is_given_back_while_the_stream_captures_a_graph(cuda_calls, mapping, monkeypatch):
    Owner(mapping)
    gc.collect()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pinning.give_back_collected() == 0 and len(pinning._collected) == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert pinning.give_back_collected() == 1


def test_a_registration_cuda_will_not_give_back_keeps_its_mapping_for_good(cuda_calls, mapping, monkeypatch):
    monkeypatch.setattr(pinning, "unregister", lambda ptr: False)
    lent = pinning.Lent(mapping)
    lent.release()
    assert not mapping.closed and pinning._stuck == [mapping]  # never unmapped while still registered
    Owner(mapping)
    gc.collect()
    pinning.give_back_collected()
    assert pinning._stuck == [mapping, mapping]


def test_release_gives_back_once_without_waiting_for_the_devices(cuda_calls, mapping):
    lent = pinning.Lent(mapping)
    ptr = lent.tensor.data_ptr()
    lent.release()
    lent.release()
    del lent
    gc.collect()
    assert pinning.give_back_collected() == 0
    assert cuda_calls == [("register", ptr, 8192), ("unregister", ptr)]
    assert mapping.closed  # its pages may leave the page cache


def test_a_refusal_holds_nothing_and_leaves_the_mapping_to_its_caller(cuda_calls, monkeypatch, mapping):
    monkeypatch.setattr(pinning, "register", lambda ptr, n: False)
    lent = pinning.Lent(mapping)
    assert not lent.ok and lent.tensor is None
    del lent
    gc.collect()
    assert pinning._collected == [] and cuda_calls == [] and mapping[:2] == b"\x00\x01"
