"""The flat layout of one layer (lp_plugin/core/flat.py) on CPU tensors: offsets, packing, bindings."""

from __future__ import annotations

import pytest
import torch
from unit_parts import Block

from lp_plugin.core.flat import ALIGN, LayerLayout, aligned, view


@pytest.fixture
def block():
    return Block(seed=0)


def _inside(t: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.data_ptr()
    return t.numel() == 0 or start <= t.data_ptr() < start + flat.numel()


@pytest.mark.parametrize("n,expected", [(0, 0), (1, ALIGN), (ALIGN, ALIGN), (ALIGN + 1, 2 * ALIGN)])
def test_aligned(n, expected):
    assert aligned(n) == expected


def test_layout_gives_every_tensor_an_aligned_slot_in_order(block):
    layout = LayerLayout(block)
    keys = [e.key for e in layout.entries]
    assert keys == ["scale", "empty", "norm.weight", "norm.bias", "up.weight", "up.bias", "down.weight"]
    offset = 0
    for e in layout.entries:
        t = block.get_parameter(e.key) if "." in e.key else block.get_buffer(e.key)
        assert (e.offset, e.nbytes, e.dtype, e.shape) == (offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
        assert e.offset % ALIGN == 0
        offset += aligned(e.nbytes)
    assert layout.nbytes == offset
    assert [d["key"] for d in layout.layout_json()] == keys
    # scale 8 bytes -> 256, empty 0 -> 0, norm.weight and norm.bias 32 bytes -> 256 each: up.weight at 768
    assert layout.layout_json()[4] == {"key": "up.weight", "dtype": "bfloat16", "shape": [24, 8], "offset": 768,
                                      "nbytes": 384}


def test_pack_copies_the_values_and_zeroes_the_padding(block):
    layout = LayerLayout(block)
    flat = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8)
    layout.pack_into(flat)
    used = torch.zeros(layout.nbytes, dtype=torch.bool)
    for e in layout.entries:
        assert torch.equal(view(flat, e), block.state_dict()[e.key])
        used[e.offset : e.offset + e.nbytes] = True
    assert int(flat[~used].count_nonzero()) == 0


def test_a_binding_points_the_same_tensors_at_the_buffer(block):
    before = block.state()
    params = dict(block.named_parameters())
    layout = LayerLayout(block)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack_into(flat)
    layout.binding(flat).apply()
    assert dict(block.named_parameters()) == params  # the same Parameter objects
    assert block.matches(before)
    assert all(_inside(t, flat) for t in block.state_dict().values())
    e = next(e for e in layout.entries if e.key == "norm.bias")
    view(flat, e).fill_(7.0)  # a write to the buffer is what the module reads
    assert torch.equal(block.norm.bias, torch.full((8,), 7.0))


def test_a_copy_binding_owns_its_memory(block):
    before = block.state()
    layout = LayerLayout(block)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack_into(flat)
    layout.binding(flat, device="cpu", copy=True).apply()
    flat.zero_()
    assert block.matches(before)
    assert not any(_inside(t, flat) for t in block.state_dict().values() if t.numel())


def test_placeholders_own_no_memory(block):
    layout = LayerLayout(block)
    binding = layout.binding(None, device="cpu")
    for e in layout.entries:
        t = binding.views[e.key]
        assert (t.shape, t.dtype) == (torch.Size(e.shape), e.dtype)
        assert all(s == 0 for s in t.stride())
    assert set(layout.placeholders()) == {e.key for e in layout.entries}


def test_split_binding_keeps_the_non_linear_part_compact(block):
    before = block.state()
    layout = LayerLayout(block)
    assert layout.linears == [block.up, block.down]
    other_keys = [e.key for e, _ in layout.other]
    assert other_keys == ["scale", "empty", "norm.weight", "norm.bias"]
    assert layout.other_nbytes == sum(aligned(e.nbytes) for e, _ in layout.other) < layout.nbytes
    packed = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack_into(packed)
    linear_flat = packed.clone()
    other_flat = torch.zeros(layout.other_nbytes, dtype=torch.uint8)
    layout.copy_other(other_flat, packed)
    layout.split_binding(linear_flat, other_flat).apply()
    assert block.matches(before)
    assert _inside(block.norm.weight, other_flat) and _inside(block.scale, other_flat)
    assert _inside(block.up.weight, linear_flat) and _inside(block.down.weight, linear_flat)


def test_source_values_stand_in_for_placeholders():
    """An Accelerate-offloaded layer keeps meta placeholders; ``source`` holds the real values."""
    real = Block(seed=1)
    meta = Block(seed=1).to("meta")
    layout = LayerLayout(meta, source=real.state())
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack_into(flat)
    for e in layout.entries:
        assert torch.equal(view(flat, e), real.state_dict()[e.key])


def _misaligned(block, shift: int):
    """``block`` with every parameter moved to an address ``shift`` bytes past a 64-byte boundary (as tensors mapped
    from a checkpoint's file sit)."""
    for p in list(block.parameters()):
        nbytes = p.numel() * p.element_size()
        raw = torch.empty(nbytes + 128, dtype=torch.uint8)
        start = (shift - raw.data_ptr()) % 64
        t = raw[start : start + nbytes].view(p.dtype).view(p.shape)
        t.copy_(p.detach())
        p.data = t
    return block


def test_a_cpu_layout_keeps_its_tensors_alignment(block):
    """MKL's matrix-vector kernels on AVX-512 round by the weight's alignment: a layer computing on the CPU keeps its
    tensors' addresses modulo RESIDUE in the flat buffer, in a copy binding, and its padding zeroed."""
    from lp_plugin.core.flat import RESIDUE, aligned_like, residue

    _misaligned(block, 8)
    kept, plain = LayerLayout(block, keep_alignment=True), LayerLayout(block)
    assert all(e.offset % ALIGN == 0 for e in plain.entries)
    flat = torch.full((kept.nbytes + ALIGN,), 0xAB, dtype=torch.uint8)
    flat = flat[-flat.data_ptr() % ALIGN :][: kept.nbytes]  # a buffer on a boundary, as every tier's
    kept.pack_into(flat)
    used = torch.zeros(kept.nbytes, dtype=torch.bool)
    for e in kept.entries:
        t = block.get_parameter(e.key) if "." in e.key else block.get_buffer(e.key)
        assert view(flat, e).data_ptr() % RESIDUE == residue(t) and torch.equal(view(flat, e), t)
        used[e.offset : e.offset + e.nbytes] = True
    assert int(flat[~used].count_nonzero()) == 0
    copies = kept.binding(flat, torch.device("cpu"), copy=True).views
    assert all(copies[e.key].data_ptr() % RESIDUE == view(flat, e).data_ptr() % RESIDUE for e in kept.entries)
    w = block.get_parameter("up.weight")
    assert residue(w) == 8 and aligned_like(w).data_ptr() % RESIDUE == 8 and residue(aligned_like(w, "meta")) == 0
