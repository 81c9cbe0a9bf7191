"""Offload files damaged before attach (stale, foreign, truncated, bit-flipped, malformed) are detected,
rebuilt (``handle.tier.report[layer]`` names the reason) and the logits stay exact; files changed
under a running model; a layer file read back through its mapping, byte for byte."""

from __future__ import annotations

import os
import pathlib
import random
import shutil

import pytest
import torch
from conftest import build_tiny
from fault_parts import Tiny, assert_unchanged, flip_bit, layer_file, logits, temp_files, verify_layer_file

import lp_plugin
from lp_plugin.errors import OffloadFileError


@pytest.fixture
def tiny():
    return Tiny()


def _stale(model, folder):
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] += 1.0


def _foreign_model(model, folder):
    other = build_tiny("llama", seed=1)  # no q/k/v biases: a different layout
    h = lp_plugin.attach(other, offload="even", tier="disk", offload_folder=folder / "llama")
    h.detach()
    shutil.copy(layer_file(folder / "llama", 2), layer_file(folder, 2))


def _foreign_same_arch(model, folder):
    # a same-architecture model with other weights: same layout, other fingerprint -> stale
    other = build_tiny("qwen2", seed=7)
    h = lp_plugin.attach(other, offload="even", tier="disk", offload_folder=folder / "other")
    h.detach()
    shutil.copy(layer_file(folder / "other", 2), layer_file(folder, 2))


def _other_layer(model, folder):
    shutil.copy(layer_file(folder, 4), layer_file(folder, 2))


def _truncate_to(n):
    def damage(model, folder):
        path = layer_file(folder, 2)
        size = path.stat().st_size
        os.truncate(path, n if n >= 0 else size + n)

    return damage


def _append(model, folder):
    with open(layer_file(folder, 2), "ab") as fh:
        fh.write(b"\0" * 64)


def _flip_payload(model, folder):
    path = layer_file(folder, 2)
    flip_bit(path, path.stat().st_size - 1000, bit=3)


def _flip_header_json(model, folder):
    flip_bit(layer_file(folder, 2), 8, bit=0)  # the header's opening '{'


def _flip_header_sha(model, folder):
    path = layer_file(folder, 2)
    raw = path.read_bytes()
    at = raw.index(b'"source_sha256":"') + len(b'"source_sha256":"')
    with open(path, "r+b") as fh:  # another hex digit in the recorded fingerprint
        fh.seek(at)
        fh.write(b"0" if raw[at] != ord("0") else b"1")


def _flip_header_size(model, folder):
    flip_bit(layer_file(folder, 2), 6, bit=0)  # the 8-byte header length: now ~2**48


def _flip_header_offsets(model, folder):
    path = layer_file(folder, 2)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"data_offsets":[0,') + len(b'"data_offsets":[0,')
    raw[at] = ord("1") if raw[at] != ord("1") else ord("2")  # the recorded payload length
    path.write_bytes(bytes(raw))


def _garbage(model, folder):
    layer_file(folder, 2).write_bytes(random.Random(0).randbytes(4096))


def _garbage_small_header(model, folder):
    layer_file(folder, 2).write_bytes((16).to_bytes(8, "little") + b"not json at all!" + b"\0" * 100)


def _plain_safetensors_in_place(model, folder):
    from safetensors.torch import save

    # written over lp_plugin's file in place (same inode): lp_plugin's file, damaged
    layer_file(folder, 2).write_bytes(save({"flat": torch.zeros(16, dtype=torch.uint8)}))


def _missing(model, folder):
    layer_file(folder, 2).unlink()


# (case id, damage(model, folder) applied after a first attach/detach, expected report of layer 2)
DAMAGED = [
    ("stale-weights-changed", _stale, "rebuilt: stale (the source weights changed since it was written)"),
    ("foreign-other-model", _foreign_model, "rebuilt: foreign (made from a different model or layer)"),
    ("foreign-same-arch-other-weights", _foreign_same_arch, "rebuilt: stale (the source weights changed since it was written)"),
    ("foreign-other-layer", _other_layer, "rebuilt: foreign (made from a different model or layer)"),
    ("truncated-payload", _truncate_to(-1000), "rebuilt: truncated or extended (its size does not match its header)"),
    ("truncated-in-header", _truncate_to(20), "rebuilt: unreadable (its header runs past the end of the file: truncated)"),
    ("empty-file", _truncate_to(0), "rebuilt: unreadable (shorter than a safetensors header: truncated or empty)"),
    ("bytes-appended", _append, "rebuilt: truncated or extended (its size does not match its header)"),
    ("bitflip-payload", _flip_payload, "rebuilt: corrupt (its bytes do not match its fingerprint)"),
    ("bitflip-header-json", _flip_header_json, "rebuilt: unreadable (its header is not a safetensors header"),
    ("bitflip-header-fingerprint", _flip_header_sha, "rebuilt: stale (the source weights changed since it was written)"),
    ("bitflip-header-length", _flip_header_size, "rebuilt: unreadable (its header length is implausible"),
    ("header-payload-length-edited", _flip_header_offsets, "rebuilt: unreadable (its tensor entry's shape, type and offsets disagree)"),
    ("garbage-file", _garbage, "rebuilt: unreadable ("),
    ("garbage-json-header", _garbage_small_header, "rebuilt: unreadable (its header is not a safetensors header"),
    ("plain-safetensors-written-in-place", _plain_safetensors_in_place, "rebuilt: unreadable (not an lp_plugin layer file"),
    ("missing-after-previous-run", _missing, "written"),
]


@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("damage,expected", [pytest.param(*row[1:], id=row[0]) for row in DAMAGED])
def test_damaged_file_is_detected_and_rebuilt(tiny, tmp_path, damage, expected, mode):
    model, folder = tiny.model, tmp_path / "off"
    h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder)
    assert h.tier.report == {"layer_00002": "written", "layer_00004": "written"}
    h.detach()
    damage(model, folder)
    ref = logits(model)  # the stale case changed the weights: its baseline is the changed model
    h = lp_plugin.attach(model, offload="even", tier="disk", mode=mode, offload_folder=folder)
    assert h.tier.report["layer_00002"].startswith(expected), h.tier.report
    assert h.tier.report["layer_00004"] == "reused"
    assert torch.equal(logits(model), ref)
    assert not layer_file(folder, 2).is_symlink()
    assert verify_layer_file(layer_file(folder, 2))["layer"] == "layer_00002"
    assert temp_files(folder) == []
    h.detach()
    assert torch.equal(logits(model), ref)
    # the rebuilt file is now reused as is
    h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder)
    assert h.tier.report == {"layer_00002": "reused", "layer_00004": "reused"}
    h.detach()


def test_fingerprint_ignores_allocator_garbage(tiny, tmp_path, monkeypatch):
    """Regression: the alignment padding between a layer's tensors in its flat buffer came from
    torch.empty and was hashed into the fingerprint, so with a dirty allocator every file looked
    stale. Here every host buffer attach allocates comes pre-filled with a different garbage byte."""
    import lp_plugin.core.group as group

    folder = tmp_path / "off"
    real = group.allocate_host
    for fill in (0x00, 0xAB, 0x5C):
        monkeypatch.setattr(group, "allocate_host", lambda *a, fill=fill: real(*a).fill_(fill))
        h = lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
        assert h.tier.report == ({"layer_00002": "written", "layer_00004": "written"} if fill == 0 else {"layer_00002": "reused", "layer_00004": "reused"})
        assert torch.equal(logits(tiny.model), tiny.ref)
        h.detach()


def test_layer_path_is_a_directory(tiny, tmp_path):
    folder = tmp_path / "off"
    layer_file(folder, 2).mkdir(parents=True)
    with pytest.raises(OffloadFileError, match=r"layer_00002\.safetensors"):
        lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
    assert temp_files(folder) == []
    assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)



@pytest.mark.parametrize("mode", ["session", "stream"])
def test_file_removed_after_attach_keeps_working(tiny, tmp_path, mode):
    """The tier keeps each file open: deleting or replacing the path cannot change what we read."""
    folder = tmp_path / "off"
    h = lp_plugin.attach(tiny.model, offload="even", tier="disk", mode=mode, offload_folder=folder)
    layer_file(folder, 2).unlink()
    shutil.copy(layer_file(folder, 4), folder / "elsewhere")
    os.replace(folder / "elsewhere", layer_file(folder, 4))  # replaced by other bytes (a new inode)
    for _ in range(2):
        assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_file_truncated_after_attach_fails_clearly(tiny, tmp_path, mode):
    """Truncating the open file in place destroys the only copy of the layer: every later forward
    fails with an OffloadFileError naming the layer and the fix (reload), never wrong logits or a hang."""
    folder = tmp_path / "off"
    lp_plugin.attach(tiny.model, offload="even", tier="disk", mode=mode, offload_folder=folder)
    assert torch.equal(logits(tiny.model), tiny.ref)
    os.truncate(layer_file(folder, 4), layer_file(folder, 4).stat().st_size - 1000)
    for _ in range(2):
        with pytest.raises(OffloadFileError, match=r"layer_00004\.safetensors"):
            logits(tiny.model)
    h = lp_plugin.get_handle(tiny.model)
    assert not h.in_session  # the failed forward left standby
    # a fresh model rebuilds the file
    fresh = Tiny()
    h2 = lp_plugin.attach(fresh.model, offload="even", tier="disk", offload_folder=folder)
    assert h2.tier.report == {"layer_00002": "reused", "layer_00004": "rebuilt: truncated or extended (its size does not match its header)"}
    assert torch.equal(logits(fresh.model), fresh.ref)



@pytest.mark.parametrize("threads", [1, 2])
def test_disk_tier_reads_return_every_byte(tmp_path, threads):
    """A layer of several MiB (a tiny model's layers are a few KiB) comes back byte-exact from its
    mapped file, also on several intra-op threads and read after read; a file truncated afterwards
    gives a clear error (not a SIGBUS); close() releases the mapping and the file."""
    from lp_plugin.core.tiers import DiskTier, sha256_of

    g = torch.Generator().manual_seed(threads)
    flat = torch.randint(0, 256, ((5 << 20) + 4099,), dtype=torch.uint8, generator=g)
    tier = DiskTier(pin=False, offload_folder=tmp_path, model_tag="t")
    layout = [{"key": "w", "dtype": "uint8", "shape": [flat.numel()], "offset": 0, "nbytes": flat.numel()}]
    tier.put("layer_00003", flat, layout, sha256_of(flat))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            dst = torch.zeros_like(flat)
            tier.read_into("layer_00003", dst)
            assert torch.equal(dst, flat)
        tier.drop_page_cache()  # cold-cache benchmarks: unmapped and evicted, then read again
        dst = torch.zeros_like(flat)
        tier.read_into("layer_00003", dst)
        assert torch.equal(dst, flat)
        with pytest.raises(OffloadFileError):  # a destination of the wrong size
            tier.read_into("layer_00003", torch.zeros(7, dtype=torch.uint8))
        path = tmp_path / "layer_00003.safetensors"
        os.truncate(path, path.stat().st_size - 4096)
        with pytest.raises(OffloadFileError, match=r"layer_00003\.safetensors"):
            tier.read_into("layer_00003", torch.zeros_like(flat))
    finally:
        torch.set_num_threads(before)
        tier.close()
    fds = os.listdir("/proc/self/fd")
    assert not any(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in fds)
    assert str(path) not in pathlib.Path("/proc/self/maps").read_text()


def _open_files() -> list:
    return sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if fd.isdigit()
                  and os.path.exists(f"/proc/self/fd/{fd}"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("folder", ["named", "temporary"])
def test_a_model_dropped_without_detach_closes_its_files(tmp_path, monkeypatch, folder):
    """``del model`` as in a notebook, no detach: once collected, its layer files and folder are closed (an open
    descriptor of a removed temporary folder's file would hold its disk space for the process's life)."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    where = {"offload_folder": tmp_path / "off"} if folder == "named" else {}
    gc.collect()
    before = _open_files()
    for _ in range(2):
        model = build_tiny("qwen2")
        lp_plugin.attach(model, offload="even", tier="disk", mode="stream", **where)
        logits(model)
        del model
        gc.collect()
    assert _open_files() == before
    if folder == "temporary":
        assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # the temporary folders went too


def test_from_pretrained_frees_a_model_dropped_without_detach_before_loading(tmp_path):
    """The model and its handle refer to each other: only a collection frees one dropped without detach.
    ``from_pretrained`` collects before it plans and loads, so a reload loop keeps one model alive, not many."""
    import gc
    import weakref

    from shapes import save_tiny

    path = save_tiny("qwen2", tmp_path / "tiny")
    gc.disable()  # (no automatic collection to hide what from_pretrained does)
    try:
        old = lp_plugin.from_pretrained(path, offload="even", tier="cpu", main_device="cpu")
        gone = weakref.ref(old)
        del old
        assert gone() is not None  # the cycle keeps it
        new = lp_plugin.from_pretrained(path, offload="even", tier="cpu", main_device="cpu")
        assert gone() is None and lp_plugin.get_handle(new) is not None
    finally:
        gc.enable()


def test_the_same_weights_elsewhere_in_memory_are_rebuilt_and_said_plainly(tiny, tmp_path, caplog):
    """A CPU layer file keeps each tensor's address modulo 64 (for results equal to the plain model's): the same
    weights held at other alignments (a copy, a state dict from elsewhere) rebuild it, said as such at INFO, not
    as a file from another model."""
    import logging

    folder = tmp_path / "off"
    lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder).detach()
    with torch.no_grad():
        for p in tiny.model.model.layers[2].parameters():  # the same values, 4 bytes further into a buffer
            buf = torch.empty(p.numel() + 16, dtype=p.dtype)
            moved = buf[1 : 1 + p.numel()].view(p.shape).copy_(p)
            p.data = moved
    with caplog.at_level(logging.INFO, logger="lp_plugin"):
        h = lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder=folder)
    rebuilt = {k: v for k, v in h.tier.report.items() if v != "reused"}
    assert rebuilt and all("other memory alignments" in v for v in rebuilt.values()), h.tier.report
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "rebuilding" in r.getMessage()]
    assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
