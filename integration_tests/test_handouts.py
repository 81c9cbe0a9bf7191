"""What an attached model hands out, gradients through it, and changes made to it after attach: each
case ends in the plain model's values or a specific lp_plugin error, never a silent difference.

Hand-outs are checked in every place the weights can be: standby, inside a session (session mode),
inside an open ring (stream mode). Inside an open stream ring the Parameter objects of offloaded layers
point at ring buffers (a compiled decode needs them there); ``state_dict()`` (and so
``save_pretrained``) still gives the real weights, which is what is checked there."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from shapes import build_tiny, on_tier

import lp_plugin
from lp_plugin.errors import AttachError

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 7]])
PLACES = ["standby", "session"]
MODES = ["session", "stream"]
TIERS = ["cpu", "disk"]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def plain():
    model = build_tiny("qwen2")
    return model, _logits(model), {k: v.clone() for k, v in model.state_dict().items()}


def _attach(model, tmp_path, mode, tier):
    return lp_plugin.attach(model, offload="even", mode=mode, **on_tier(tier, tmp_path / "off"))


def _place(model, place):
    return lp_plugin.session(model) if place == "session" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ hand-outs
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_is_the_real_weights(plain, tmp_path, mode, tier, place):
    model, _, state = plain
    handle = _attach(model, tmp_path, mode, tier)
    with _place(model, place):
        if place == "session":
            _logits(model)  # a forward inside: the ring's slots now hold other layers' bytes
        now = model.state_dict()
        assert now.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(now[k].cpu(), v), k
        if not (mode == "stream" and place == "session"):
            for name, p in model.named_parameters():
                assert torch.equal(p.detach().cpu(), state[name]), name
    handle.detach()


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("mode", MODES)
def test_save_pretrained_saves_the_real_weights(plain, tmp_path, mode, tier, place):
    from transformers import AutoModelForCausalLM

    model, ref, _ = plain
    handle = _attach(model, tmp_path, mode, tier)
    with _place(model, place):
        _logits(model)
        model.save_pretrained(tmp_path / "saved")
    handle.detach()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(_logits(again), ref)


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_and_pickle_are_refused_clearly(plain, tmp_path, mode):
    model, ref, _ = plain
    handle = _attach(model, tmp_path, mode, "cpu")
    for copy_it in (copy.deepcopy, pickle.dumps, lambda m: torch.save(m, tmp_path / "model.pt")):
        with pytest.raises(AttachError, match="detach"):
            copy_it(model)
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # the weights themselves save
    assert torch.equal(_logits(model), ref)
    handle.detach()
    assert torch.equal(_logits(copy.deepcopy(model)), ref)
    assert torch.equal(_logits(pickle.loads(pickle.dumps(model))), ref)


def test_detach_inside_a_session_is_refused(plain, tmp_path):
    model, ref, _ = plain
    handle = _attach(model, tmp_path, "session", "disk")
    with lp_plugin.session(model):
        with pytest.raises(AttachError, match="leave the `with lp_plugin.session"):
            handle.detach()
    handle.detach()
    assert torch.equal(_logits(model), ref)


# ------------------------------------------------------------------------------------ gradients
def _grads(model):
    model.zero_grad(set_to_none=True)
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tier", TIERS)
def test_gradients_in_one_session_equal_the_plain_models(plain, tmp_path, tier):
    model, _, _ = plain
    ref = _grads(model)
    handle = _attach(model, tmp_path, "session", tier)
    with lp_plugin.session(model):
        got = _grads(model)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    handle.detach()


@pytest.mark.parametrize("mode", MODES)
def test_backward_after_the_weights_left_is_refused(plain, tmp_path, mode):
    """A bare forward opens and closes its own session (stream mode reuses its ring at once): a backward
    through it would use released weights, so it raises; so does one through frozen offloaded weights
    (the gradient of what came before them needs them too)."""
    model, ref, _ = plain
    handle = _attach(model, tmp_path, mode, "cpu")
    with pytest.raises(AttachError, match="backward reached offloaded layer 4 after its weights left the device"):
        model(IDS, labels=IDS).loss.backward()
    for p in model.model.layers[2].parameters():
        p.requires_grad_(False)
    with pytest.raises(AttachError, match="backward reached offloaded layer"):
        model(IDS, labels=IDS).loss.backward()
    assert torch.equal(_logits(model), ref)
    handle.detach()


# ------------------------------------------------------------------------------------ changes after attach
CASTS = {
    "half": lambda m: m.half(),
    "to-bf16": lambda m: m.to(torch.bfloat16),
    "float64": lambda m: m.double(),
    "layer-half": lambda m: m.model.layers[2].half(),
    "base-to-bf16": lambda m: m.model.to(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cast", CASTS, ids=list(CASTS))
def test_casts_are_refused_before_anything_changes(plain, tmp_path, mode, cast):
    model, ref, state = plain
    handle = _attach(model, tmp_path, mode, "cpu")
    with pytest.raises(AttachError):
        CASTS[cast](model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(_logits(model), ref)
    model.to("cpu")  # a move to the device it already computes on is followed (a no-op for offloaded layers)
    assert torch.equal(_logits(model), ref)
    handle.detach()
    assert {k: torch.equal(v, state[k]) for k, v in model.state_dict().items()} == {k: True for k in state}


def _edit(model, layer=2):
    with torch.no_grad():
        model.model.layers[layer].mlp.up_proj.weight.mul_(1.5)


EDITS = {
    "standby-mul": lambda m: _edit(m),
    "standby-load-state-dict": lambda m: m.model.layers[4].load_state_dict(
        {k: v * 0.5 for k, v in m.model.layers[4].state_dict().items()}),
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_in_place_edits_in_standby_are_followed(tmp_path, mode, tier, edit):
    expected_model = build_tiny("qwen2")
    EDITS[edit](expected_model)
    expected = _logits(expected_model)
    model = build_tiny("qwen2")
    handle = _attach(model, tmp_path, mode, tier)
    EDITS[edit](model)
    assert torch.equal(_logits(model), expected)
    handle.detach()
    assert torch.equal(_logits(model), expected)


@pytest.mark.parametrize("tier", TIERS)
def test_in_place_edits_inside_a_session_are_written_back(tmp_path, tier):
    expected_model = build_tiny("qwen2")
    _edit(expected_model)
    expected = _logits(expected_model)
    model = build_tiny("qwen2")
    handle = _attach(model, tmp_path, "session", tier)
    with lp_plugin.session(model):
        _edit(model)
        assert torch.equal(_logits(model), expected)
    assert torch.equal(_logits(model), expected)  # the next session brings the edit back
    handle.detach()
    assert torch.equal(_logits(model), expected)


REPLACEMENTS = {
    "new-parameter": lambda m: setattr(m.model.layers[2].mlp.up_proj, "weight",
                                       torch.nn.Parameter(m.model.layers[2].mlp.up_proj.weight.detach() * 2)),
    "data-rebound": lambda m: setattr(m.model.layers[4].self_attn.q_proj.weight, "data",
                                      m.model.layers[4].self_attn.q_proj.weight.detach().clone()),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", REPLACEMENTS, ids=list(REPLACEMENTS))
def test_replaced_tensors_are_refused_at_the_next_use(plain, tmp_path, mode, change):
    model, _, _ = plain
    handle = _attach(model, tmp_path, mode, "cpu")
    REPLACEMENTS[change](model)
    with pytest.raises(AttachError, match="was replaced after attach.*detach"):
        _logits(model)
    assert not handle.in_session


def test_layers_sharing_a_parameter_are_refused_at_attach(plain):
    model, ref, _ = plain
    model.model.layers[5].mlp.up_proj.weight = model.model.layers[2].mlp.up_proj.weight
    ref = _logits(model)
    with pytest.raises(AttachError, match="offloaded layer 2 shares its parameter mlp.up_proj.weight with "
                                          "model.layers.5.mlp.up_proj.weight"):
        lp_plugin.attach(model, offload="even")
    assert lp_plugin.get_handle(model) is None and torch.equal(_logits(model), ref)


def test_a_layer_listed_twice_is_refused_at_attach(plain):
    model, _, _ = plain
    model.model.layers[6] = model.model.layers[2]
    ref = _logits(model)
    with pytest.raises(AttachError, match="layer 2 appears more than once in the model"):
        lp_plugin.attach(model, offload="even")
    assert lp_plugin.get_handle(model) is None and torch.equal(_logits(model), ref)
