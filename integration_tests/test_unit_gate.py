"""The session gate (lp_plugin/core/gate.py), the mover contract (core/mover.py) and the install record
(core/record.py) on CPU tensors, without a model: real layers (and a stand-in, core/group.py) packed into
the cpu tier, moved by a Residency (session mode) and a Ring (stream mode)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from unit_parts import Block

from lp_plugin import AttachError
from lp_plugin.core import hooks
from lp_plugin.core.gate import SessionGate
from lp_plugin.core.group import OffloadedLayer, StandIn, execution_order
from lp_plugin.core.mover import Mover
from lp_plugin.core.record import InstallRecord
from lp_plugin.core.resident import Residency
from lp_plugin.core.stream import Ring
from lp_plugin.core.tiers import CpuTier
from lp_plugin.errors import OffloadResourceError

CPU = torch.device("cpu")


def room(nbytes, device, what, fix):
    """The engine's device-room check where the device has room."""


def no_room(nbytes, device, what, fix):
    raise OffloadResourceError(f"{what} needs {nbytes} bytes; {fix}")


def build(n: int, seed: int = 0):
    blocks = [Block(seed=seed + i) for i in range(n)]
    tier = CpuTier(pin=False)
    layers = [OffloadedLayer.pack(i, b, tier, CPU, pin=False) for i, b in enumerate(blocks)]
    for layer in layers:
        layer.install()
    return blocks, layers


def stats() -> dict:
    return {"sessions": 0, "session_load_s": 0.0, "forwards": 0}


def residency(n=2, seed=0, room_check=room, counts=None):
    blocks, layers = build(n, seed)
    return blocks, Residency(layers, CPU, room_check, counts if counts is not None else stats())


def test_both_modes_implement_the_mover_contract():
    _, res = residency()
    _, layers = build(2, seed=5)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=room)
    gate = SessionGate([res, ring], stats())
    assert isinstance(res, Mover) and isinstance(ring, Mover)
    assert (res.reuses_buffers, ring.reuses_buffers) == (False, True)
    [(module, hook)] = res.layer_hooks(1, gate)
    assert module is res.units[1].module and isinstance(hook, hooks.SessionHook) and hook.gate is gate
    pairs = ring.layer_hooks(1, gate)
    assert [m for m, _ in pairs] == layers[1].stream_modules and len(pairs) == 2  # the Block's two Linear modules
    assert all(isinstance(h, hooks.StreamHook) and h.position == 1 and h.ring is ring for _, h in pairs)
    ring.close()
    res.close()


def test_the_outermost_session_opens_and_releases_the_movers():
    counts = stats()
    blocks, res = residency(counts=counts)
    states = [b.state() for b in blocks]
    gate = SessionGate([res], counts)
    assert (gate.in_session, gate.depth, res.is_open) == (False, 0, False)
    with gate.session():
        assert gate.in_session is True and res.is_open and gate.depth == 1
        with gate.session():
            assert gate.in_session is True and gate.depth == 2  # the flag a compiled forward reads is the same
        assert res.is_open and gate.depth == 1
        assert all(b.matches(s) for b, s in zip(blocks, states))
    assert (gate.in_session, gate.depth, res.is_open, counts["sessions"]) == (False, 0, False, 1)
    assert all(l.bound_flat is None for l in res.units)
    res.close()


def test_a_mover_that_cannot_open_leaves_the_others_released():
    _, first = residency()
    _, second = residency(seed=7, room_check=no_room)
    gate = SessionGate([first, second], stats())
    with pytest.raises(OffloadResourceError):
        gate.open()
    assert (gate.in_session, gate.depth, first.is_open, second.is_open) == (False, 0, False, False)
    with pytest.raises(OffloadResourceError):  # and the next session tries again
        gate.open()
    first.close()
    second.close()


def test_an_edit_is_refused_after_every_mover_is_released():
    blocks, layers = build(2)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=room)
    _, res = residency(seed=3)
    gate = SessionGate([ring, res], stats())
    gate.open()
    with torch.no_grad():
        blocks[1].up.weight.add_(1)  # in place, in a ring slot: stream mode cannot keep it
    with pytest.raises(AttachError):
        gate.close()
    assert (gate.in_session, gate.depth, ring.is_open, res.is_open) == (False, 0, False, False)
    ring.close()
    res.close()


def test_a_backward_is_checked_against_the_session_of_its_forward():
    _, res = residency()
    gate = SessionGate([res], stats())
    assert gate.grad_token() is None  # no session: nothing to check against
    with gate.session():
        token = gate.grad_token()
        assert token is not None and gate.grad_token_valid(token)
    assert not gate.grad_token_valid(token)
    with gate.session():
        assert not gate.grad_token_valid(token)  # another session: the weights were reloaded
    _, layers = build(2)
    ring = Ring(layers, prefetch=1, device=CPU, room_check=room)
    streaming = SessionGate([ring], stats())
    with streaming.session():
        assert streaming.grad_token() is None  # the ring's buffers are reused at once
    ring.close()
    res.close()


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_bare_forwards_through_reused_buffers_run_one_at_a_time(mode):
    counts = stats()
    _, layers = build(2)
    mover = Ring(layers, 1, CPU, room) if mode == "stream" else Residency(layers, CPU, room, counts)
    gate = SessionGate([mover], counts)
    gate.exit_forward()  # after an enter_forward that failed: nothing to close
    gate.enter_forward()
    free = []

    def try_lock():
        got = gate.lock.acquire(blocking=False)
        free.append(got)
        if got:
            gate.lock.release()

    other = threading.Thread(target=try_lock)
    other.start()
    other.join()
    assert free == [mode == "session"]  # another thread's forward waits only in stream mode
    gate.exit_forward()
    assert (gate.in_session, gate.depth, counts["forwards"], mover.is_open) == (False, 0, 1, False)
    mover.close()


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_stand_in_is_moved_like_an_offloaded_layer(mode):
    """A StandIn (a module run in a skipped layer's place, not part of the model) goes through the mover
    contract like the layers around it: under its own tier key, at its place in execution order."""
    blocks = [Block(seed=i) for i in range(3)]
    states = [b.state() for b in blocks]
    tier = CpuTier(pin=False)
    layers = [OffloadedLayer.pack(i, blocks[i], tier, CPU, pin=False) for i in (0, 2)]
    stand_ins = {1: StandIn.pack(1, blocks[1], tier, CPU, pin=False)}
    units = execution_order(layers, stand_ins)
    assert units == [layers[0], stand_ins[1], layers[1]]
    assert [u.key for u in units] == ["layer_00000", "standin_00001", "layer_00002"]
    for unit in units:
        unit.install()
    stream = mode == "stream"
    mover = Ring(units, 1, CPU, room) if stream else Residency(units, CPU, room, stats())
    gate = SessionGate([mover], stats())
    assert [m for m, _ in mover.layer_hooks(1, gate)] == (stand_ins[1].stream_modules if stream else [blocks[1]])
    with gate.session():
        for pos, (block, state) in enumerate(zip(blocks, states)):
            if stream:
                mover.wait(pos)
            assert units[pos].bound_flat is not None and block.matches(state)
            if stream:
                mover.done(pos)
        if stream:
            mover.join()
    assert all(u.bound_flat is None for u in units) and all(b.matches(s) for b, s in zip(blocks, states))
    view = tier.host_view(stand_ins[1].key)  # back on standby: the stand-in's tensors are its tier copy's views
    assert view.data_ptr() <= blocks[1].up.weight.data_ptr() < view.data_ptr() + view.numel()
    mover.close()


def test_a_detached_gate_refuses_a_session_and_a_deep_copy():
    _, res = residency()
    gate = SessionGate([res], stats())
    with pytest.raises(AttachError):
        copy.deepcopy(gate)
    gate.attached = False
    with pytest.raises(AttachError):
        gate.open()
    assert gate.depth == 0 and not res.is_open
    res.close()


def test_the_record_undoes_in_reverse_and_resumes_after_a_failure():
    record, done = InstallRecord(), []
    fail = {"c": True}

    def undo_c():
        if fail["c"]:
            raise OSError("c cannot be undone yet")
        done.append("c")

    record.did("a", lambda: done.append("a"))
    record.did("b", lambda: done.append("b"))
    record.did("c", undo_c)
    record.did("d", lambda: done.append("d"))
    assert record.steps == ["a", "b", "c", "d"]
    with pytest.raises(OSError):
        record.undo()
    assert done == ["d"] and record.steps == ["a", "b", "c"]
    fail["c"] = False
    record.undo()
    assert done == ["d", "c", "b", "a"] and record.steps == []
    record.undo()  # nothing left: a no-op
    assert done == ["d", "c", "b", "a"]
