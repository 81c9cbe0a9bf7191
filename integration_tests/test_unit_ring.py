"""Stream mode's ring (lp_plugin/core/stream.py) on CPU tensors, without a model: the cpu tier (a direct host
copy) and an in-memory tier read through staging buffers, as the disk tier is. The ring is driven the way
the hooks drive it in a forward: ``wait(pos)`` before layer ``pos`` reads its weights, ``done(pos)`` after,
``join()`` at the end."""

from __future__ import annotations

import contextlib

import pytest
import torch
from unit_parts import Block, LendingTier, MemoryTier

from lp_plugin import AttachError
from lp_plugin.core import ops
from lp_plugin.core.group import OffloadedLayer
from lp_plugin.core.stream import Ring
from lp_plugin.core.tiers import CpuTier

CPU = torch.device("cpu")
TIERS = {"cpu": lambda: CpuTier(pin=False), "staged": MemoryTier, "lending": LendingTier}


class Room:
    """The room check the engine passes in: records what the ring asks for."""

    def __init__(self):
        self.asked = []

    def __call__(self, nbytes, device, what, fix):
        self.asked.append((nbytes, device))


def build(tier_name: str, n: int = 5, buffers: bool = False):
    blocks = [Block(seed=i, inner=16 + 8 * i, buffers=buffers) for i in range(n)]  # layers of different sizes
    states = [b.state() for b in blocks]
    tier = TIERS[tier_name]()
    layers = [OffloadedLayer.pack(i, b, tier, CPU, pin=False) for i, b in enumerate(blocks)]
    for layer in layers:
        layer.install()
    return blocks, states, layers, tier


def forward(ring, blocks, states, check=True):
    for pos, block in enumerate(blocks):
        ring.wait(pos)
        if check:
            assert block.matches(states[pos]), f"layer {pos} does not hold its own weights in its slot"
        ring.done(pos)
    ring.join()


@pytest.fixture(params=sorted(TIERS))
def tier_name(request):
    return request.param


def test_each_layer_holds_its_own_weights_when_it_runs(tier_name):
    blocks, states, layers, tier = build(tier_name)
    room = Room()
    ring = Ring(layers, prefetch=1, device=CPU, room_check=room)
    assert (ring.nslots, ring.slot_bytes, ring.is_open) == (2, max(l.nbytes for l in layers), False)
    ring.open()
    try:
        assert ring.needs_staging is (tier_name == "staged")
        assert room.asked == [(2 * ring.slot_bytes, CPU)]
        for _ in range(3):
            forward(ring, blocks, states)
    finally:
        ring.release()
    assert not ring.is_open
    for block, state, layer in zip(blocks, states, layers):
        assert block.matches(state)  # back on standby: the tier's copy
        assert block.up.weight.data_ptr() >= tier.host_view(layer.key).data_ptr()
    ring.close()
    assert ring.id not in ops._rings


def test_a_unit_whose_tier_stops_lending_is_read_through_staging_from_then_on():
    blocks, states, layers, tier = build("lending")
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    ring.open()
    try:
        forward(ring, blocks, states)
        assert not ring.needs_staging and ring.executor is None
        tier.stop_lending(layers[3].key)
        with torch.no_grad():  # the tier's own copy changes: only a read through staging carries it
            tier.units[layers[3].key].zero_()
        ring.wait(0)
        ring.done(0)
        ring.wait(1)
        ring.done(1)
        ring.wait(2)
        ring.done(2)  # issues unit 3's load: the tier no longer lends it
        ring.wait(3)
        linears = [blocks[3].up.weight, blocks[3].up.bias, blocks[3].down.weight]  # (the norm stays from open)
        assert all(not torch.any(t != 0) for t in linears)
        ring.done(3)
        ring.wait(4)
        assert blocks[4].matches(states[4])
        ring.done(4)
        ring.join()
        assert ring.needs_staging and ring.host[3] is None and ring.host[4] is not None
    finally:
        ring.release()
        ring.close()


def test_an_open_that_fails_after_staging_started_puts_the_gil_switch_interval_back():
    import sys

    from lp_plugin.core.stream import gil_switch

    _, _, layers, _ = build("staged")
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    before = sys.getswitchinterval()

    def fail(pos):
        raise RuntimeError("a copy could not be issued")

    ring._issue = fail
    with pytest.raises(RuntimeError):
        ring.open()
    assert sys.getswitchinterval() == before and gil_switch._users == 0 and not ring.is_open
    ring.close()
    assert sys.getswitchinterval() == before and gil_switch._users == 0


def test_layers_take_turns_in_the_slots(tier_name):
    blocks, states, layers, _ = build(tier_name)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    ring.open()
    try:
        slots = [layer.bound_flat.data_ptr() for layer in layers]
        assert slots[0] == slots[2] == slots[4] != slots[1] == slots[3]
        assert all(layer.streamed for layer in layers)
        assert ring.mapped_bytes == 0  # the CPU's buffer is a plain allocation (counted by torch, not the ring)
    finally:
        ring.release()
        ring.close()
    assert not any(layer.streamed or layer.bound_flat is not None for layer in layers)


def test_prefetch_is_capped_by_the_layer_count():
    _, _, layers, _ = build("cpu", n=3)
    ring = Ring(layers, prefetch=8, device=CPU, room_check=Room())
    assert (ring.prefetch, ring.nslots) == (2, 3)
    ring.close()


def test_a_forward_cut_short_is_recovered_by_the_next(tier_name):
    blocks, states, layers, _ = build(tier_name)
    ring = Ring(layers, prefetch=2, device=CPU, room_check=Room())
    ring.open()
    try:
        ring.wait(0)
        ring.done(0)
        ring.wait(1)  # an exception ends this forward here: no done, no join
        ring.join()
        forward(ring, blocks, states)
        forward(ring, blocks, states)
    finally:
        ring.release()
        ring.close()


def test_ready_for_replay_only_where_a_complete_forward_left_the_slots():
    """A captured forward (decode="graph") starts with the first prefetch layers in their slots, as every complete
    forward leaves them; a forward cut short, or the loads of a failed capture forgotten, are not that."""
    blocks, states, layers, _ = build("cpu")
    ring = Ring(layers, prefetch=2, device=CPU, room_check=Room())
    assert not ring.ready_for_replay()  # closed
    ring.open()
    try:
        assert ring.ready_for_replay()
        ring.wait(0)
        ring.done(0)
        ring.wait(1)  # cut short
        ring.join()
        assert not ring.ready_for_replay()
        forward(ring, blocks, states)
        assert ring.ready_for_replay()
        ring.forget_loads()
        assert not ring.ready_for_replay()
        forward(ring, blocks, states)  # every layer loaded again
        assert ring.ready_for_replay()
    finally:
        ring.release()
        ring.close()


def test_a_layer_called_outside_a_forward_is_refused():
    _, _, layers, _ = build("cpu", n=2)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    with pytest.raises(AttachError):
        ring.wait(0)
    ring.close()


def test_an_edit_made_while_streaming_is_refused_and_not_kept(tier_name):
    blocks, states, layers, tier = build(tier_name)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    ring.open()
    forward(ring, blocks, states)
    with torch.no_grad():
        blocks[3].down.weight.add_(1)
    assert ring.edited_units() == [layers[3]]
    with pytest.raises(AttachError):
        ring.wait(0)  # the next forward
    with pytest.raises(AttachError):
        ring.release()
    ring.close()
    assert all(block.matches(state) for block, state in zip(blocks, states))  # the tier's copy is unchanged


def test_enter_and_leave_count_the_linear_modules_of_a_layer():
    _, _, layers, _ = build("cpu", n=2)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    assert ring.nlinear == [2, 2]
    assert [ring.enter(0), ring.leave(0), ring.enter(0), ring.leave(0)] == [True, False, False, True]
    assert ring.enter(0) is True  # counting starts again with the next forward
    ring.join()
    assert ring.calls == [0, 0]
    ring.close()


def test_a_layer_with_buffers_streams_twice():
    """A layer's buffers are bound like its parameters, keeping their own version counters: the ring's
    copies into a slot are not an edit of the layer, a second forward runs, and an edit still is."""
    blocks, states, layers, _ = build("cpu", buffers=True)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=Room())
    ring.open()
    try:
        forward(ring, blocks, states)
        forward(ring, blocks, states)
        ring.check_unedited()
        with torch.no_grad():
            blocks[2].scale.mul_(2)
        with pytest.raises(AttachError):
            ring.check_unedited()
    finally:
        with contextlib.suppress(AttachError):  # the edit is refused again when the ring closes
            ring.close()
