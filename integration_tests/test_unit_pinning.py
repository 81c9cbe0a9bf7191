"""``pinning.Lent``: a mapping lent to CUDA is given back when released or when its owner is collected, always
before the mapping can be unmapped. CUDA's registration calls are stood in for (recorded) so that the order is
checked on any machine; the real registration is checked on a GPU in test_disk_pinning.py."""

from __future__ import annotations

import gc
import mmap

import pytest

from lp_plugin.core import pinning


@pytest.fixture
def cuda_calls(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pinning, "register", lambda ptr, n: calls.append(("register", ptr, n)) or True)
    monkeypatch.setattr(pinning, "unregister", lambda ptr: calls.append(("unregister", ptr)))
    monkeypatch.setattr(pinning, "synchronize_devices", lambda: calls.append(("synchronize",)))
    return calls


@pytest.fixture
def mapping(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 32)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def test_collecting_the_owner_unregisters_after_the_devices_are_done_and_a_view_keeps_the_pages(cuda_calls, mapping):
    class Owner:  # (a tier entry dropped with its model, never closed)
        def __init__(self):
            self.lent = pinning.Lent(mapping)

    owner = Owner()
    ptr = owner.lent.tensor.data_ptr()
    view = owner.lent.tensor[256:512]
    del owner
    gc.collect()
    assert cuda_calls == [("register", ptr, 8192), ("synchronize",), ("unregister", ptr)]
    assert view[:3].tolist() == [0, 1, 2]  # still mapped while a view lives, no longer lent
    assert not mapping.closed


def test_release_gives_back_once_without_waiting_for_the_devices(cuda_calls, mapping):
    lent = pinning.Lent(mapping)
    ptr = lent.tensor.data_ptr()
    lent.release()
    lent.release()
    del lent
    gc.collect()
    assert cuda_calls == [("register", ptr, 8192), ("unregister", ptr)]
    assert mapping.closed  # its pages may leave the page cache


def test_a_refusal_holds_nothing_and_leaves_the_mapping_to_its_caller(monkeypatch, mapping):
    calls: list = []
    monkeypatch.setattr(pinning, "register", lambda ptr, n: False)
    monkeypatch.setattr(pinning, "unregister", lambda ptr: calls.append(ptr))
    lent = pinning.Lent(mapping)
    assert not lent.ok and lent.tensor is None
    del lent
    gc.collect()
    assert calls == [] and not mapping.closed and mapping[:2] == b"\x00\x01"
