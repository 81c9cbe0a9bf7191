"""Out of room: a full disk (a small tmpfs; skipped with the reason where mounting is not permitted),
a read-only folder, host memory that cannot be allocated, too little device memory. Each refused with
an ``OffloadResourceError``/``OffloadFileError``, no file left half written, the model as it was."""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
from fault_parts import PROMPT, Tiny, assert_unchanged, layer_file, logits, temp_files, tmpfs, verify_layer_file
from shapes import on_tier

import lp_plugin
from lp_plugin.errors import OffloadFileError, OffloadResourceError


@pytest.fixture
def tiny():
    return Tiny()


def test_disk_full_on_first_layer(tiny, tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as folder:
        with pytest.raises(OffloadResourceError, match="small"):  # the folder that is full
            lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
        assert temp_files(folder) == [] and not list(folder.glob("layer_*"))
        assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)


def test_disk_full_on_second_layer_keeps_first_file_valid(tiny, tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as folder:  # room for one layer file (~150 KiB), not two
        with pytest.raises(OffloadResourceError, match="small"):
            lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
        assert temp_files(folder) == []
        assert [p.name for p in folder.glob("layer_*")] == ["layer_00002.safetensors"]
        verify_layer_file(layer_file(folder, 2))
        assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)
        # with layer 2's file gone, layer 2 fits again and the next one fails
        layer_file(folder, 2).unlink()
        with pytest.raises(OffloadResourceError):
            lp_plugin.attach(tiny.model, offload="2,3", tier="disk", offload_folder=folder)
        assert_unchanged(tiny.model, tiny.ref, tiny.state)


def test_read_only_folder(tiny, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        ctx = contextlib.nullcontext(folder)
    else:  # root ignores 0o500: use a real read-only mount instead
        ctx = tmpfs(folder, "ro")
    with ctx:
        with pytest.raises(OffloadFileError, match=re.escape(str(folder))):
            lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
        assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)
    folder.chmod(0o700)


class _FailingAlloc:
    """Stands in for torch inside lp_plugin.core.tiers.base: the n-th host buffer allocation fails like a
    refused cudaHostAlloc / an exhausted host."""

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, **kwargs):
        if "pin_memory" in kwargs:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("CUDA error: out of memory (injected)")
        return torch.empty(*args, **kwargs)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_host_memory_allocation_fails(tiny, tmp_path, monkeypatch, tier):
    import lp_plugin.core.tiers.base as tiers_base

    monkeypatch.setattr(tiers_base, "torch", _FailingAlloc(fail_at=2))  # the second layer's buffer
    with pytest.raises(OffloadResourceError, match=r"\(injected\)"):
        lp_plugin.attach(tiny.model, offload="even", **on_tier(tier, tmp_path / "off"))
    monkeypatch.undo()
    if tier == "disk":
        assert temp_files(tmp_path / "off") == []
    assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)


@pytest.mark.parametrize("mode,fix", [("session", "mode='stream'"), ("stream", "prefetch")])  # the option it names
def test_too_little_gpu_memory(tiny, monkeypatch, mode, fix):
    """Simulated on this CPU machine: the main device reports 1 MiB free. The session / ring is
    refused before anything is allocated, the model stays in standby and runs once memory is back."""
    import lp_plugin.integrations.engine as engine

    h = lp_plugin.attach(tiny.model, offload="even", mode=mode)
    monkeypatch.setattr(engine, "_free_bytes", lambda device: 1 << 20)
    with pytest.raises(OffloadResourceError, match=re.escape(fix)):
        logits(tiny.model)
    with pytest.raises(OffloadResourceError):
        tiny.model.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
    monkeypatch.undo()
    assert not h.in_session
    assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)
