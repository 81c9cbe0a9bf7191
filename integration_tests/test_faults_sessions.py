"""Sessions under exceptions and threads: an exception inside a session or in the middle of a forward
returns to standby, and two threads generating at once get exact results."""

from __future__ import annotations

import threading

import pytest
import torch
from fault_parts import PROMPT, Tiny, assert_unchanged, logits
from shapes import on_tier

import lp_plugin


@pytest.fixture
def tiny():
    return Tiny()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_exception_inside_session_returns_to_standby(tiny, tmp_path, tier, mode):
    h = lp_plugin.attach(tiny.model, offload="even", mode=mode, **on_tier(tier, tmp_path / "off"))
    w = tiny.model.model.layers[2].mlp.up_proj.weight
    standby_ptr = w.data_ptr()
    with pytest.raises(KeyError, match="boom"):
        with lp_plugin.session(tiny.model):
            logits(tiny.model)
            raise KeyError("boom")
    assert not h.in_session and h.gate.depth == 0
    assert w.data_ptr() == standby_ptr
    assert all(l.bound_flat is None for l in h.layers)
    if mode == "stream":
        assert not h.ring.is_open
    assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_exception_in_the_middle_of_a_forward(tiny, tmp_path, mode):
    """A forward that dies between two offloaded layers (stream mode: the ring is half-cycled)
    leaves standby, and the next forward is exact."""
    h = lp_plugin.attach(tiny.model, offload="even", tier="disk", mode=mode, offload_folder=tmp_path / "off")
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure in layer 3")

    hook = tiny.model.model.layers[3].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="injected failure in layer 3"):
        logits(tiny.model)
    assert not h.in_session
    hook.remove()
    for _ in range(2):
        assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_two_threads_generate_concurrently(tiny, tmp_path, tier, mode):
    prompts = [PROMPT, torch.tensor([[9, 8, 7, 6, 5, 4, 3]])]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = [tiny.model.generate(p, **gen) for p in prompts]
    h = lp_plugin.attach(tiny.model, offload="even", mode=mode, **on_tier(tier, tmp_path / "off"))
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def worker(j):
        try:
            barrier.wait()
            with torch.no_grad():
                results[j] = [tiny.model.generate(prompts[j], **gen) for _ in range(3)]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for j in range(2):
        for seq in results[j]:
            assert torch.equal(seq, expected[j])
    assert not h.in_session
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


def _interrupt_once(layer):
    """A Ctrl-C landing inside the next forward (PyTorch runs an always-called forward hook on an Exception
    only, so the hook that closes a bare forward's session never sees it)."""
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    return layer.register_forward_pre_hook(interrupt)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_ctrl_c_inside_generate_returns_to_standby(tiny, tmp_path, mode):
    h = lp_plugin.attach(tiny.model, offload="even", tier="disk", mode=mode, offload_folder=tmp_path / "off")
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    hook = _interrupt_once(tiny.model.model.layers[3])
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        tiny.model.generate(PROMPT, **gen)
    hook.remove()
    assert not h.in_session and h.gate.depth == 0
    done = []  # another thread is not kept waiting by the interrupted one
    t = threading.Thread(target=lambda: done.append(logits(tiny.model)))
    t.start()
    t.join(60)
    assert done and torch.equal(done[0], tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_ctrl_c_inside_a_bare_forward_is_closed_by_what_the_thread_does_next(tiny, tmp_path, mode):
    h = lp_plugin.attach(tiny.model, offload="even", tier="cpu", mode=mode)
    for then in ("forward", "session", "detach"):
        hook = _interrupt_once(tiny.model.model.layers[3])
        with pytest.raises(KeyboardInterrupt):
            logits(tiny.model)
        hook.remove()
        if then == "forward":
            assert torch.equal(logits(tiny.model), tiny.ref) and h.gate.depth == 0
        elif then == "session":
            with lp_plugin.session(tiny.model):
                assert h.gate.depth == 1
            assert not h.in_session
        else:
            h.detach()  # not refused as "inside an open session"
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_session_opened_inside_a_running_forward_leaves_that_forward_open(tiny, mode):
    """Only forwards an interrupt left are closed: one still running (a session opened from a layer's hook) stays,
    and detach from inside it is still refused."""
    from lp_plugin.errors import AttachError

    h = lp_plugin.attach(tiny.model, offload="even", tier="cpu", mode=mode)
    seen = []

    def nested(module, args):
        with lp_plugin.session(tiny.model):
            seen.append(h.gate.depth)
        with pytest.raises(AttachError):
            h.detach()

    hook = tiny.model.model.layers[0].register_forward_pre_hook(nested)
    assert torch.equal(logits(tiny.model), tiny.ref)
    hook.remove()
    assert seen == [2] and h.gate.depth == 0
    h.detach()
