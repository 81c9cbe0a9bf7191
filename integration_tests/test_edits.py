"""No edit of an offloaded weight is lost without a word.

An in-place edit (``mul_``, ``add_``, ``load_state_dict``) of an offloaded layer's tensor either
reaches everything the model hands out afterwards (logits, ``state_dict``, ``save_pretrained``,
``detach``), exactly as the same edit of the plain model does, or is refused with an
``AttachError``, after which the model is still the unedited one. Session mode writes edits made
inside a session back when it ends; stream mode refuses them (its ring slots are refilled from the
tier and shared between layers); in standby an edit lands in the tier's copy in both modes.

Tiny hand-built Qwen2 models on the CPU; a hypothesis property test draws modes, tiers, places,
tensors and kinds of edit.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lp_plugin
from lp_plugin.errors import AttachError

IDS = torch.tensor([[3, 17, 42, 5, 99, 64, 8, 21]])
OFFLOADED = (2, 4)  # offload="even" on the 8-layer tiny model
TENSORS = ("mlp.down_proj.weight", "self_attn.q_proj.bias", "self_attn.q_proj.weight", "input_layernorm.weight")


def _edit(model, key, how):
    with torch.no_grad():
        p = model.get_parameter(key)
        if how == "mul":
            p.mul_(2)
        elif how == "add":
            p.add_(0.25)
        else:  # load_state_dict of that one tensor
            model.load_state_dict({key: p.detach().clone() * -1.0}, strict=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _attach(model, mode, tier, folder, prefetch=1):
    ahead = {"prefetch": prefetch} if mode == "stream" else {}  # (session mode copies nothing ahead)
    return lp_plugin.attach(model, offload="even", mode=mode, tier=tier, **ahead,
                            offload_folder=folder if tier == "disk" else None)


def _run(mode, tier, place, key, how, prefetch, folder):
    """Edit ``key`` of an attached model at ``place``; return (refused, model, handle, plain edited copy,
    plain unedited copy)."""
    model = build_tiny("qwen2")
    plain = copy.deepcopy(model)
    edited = copy.deepcopy(model)
    _edit(edited, key, how)
    handle = _attach(model, mode, tier, folder, prefetch)
    refused = False
    try:
        if place == "standby":
            _edit(model, key, how)
        elif place == "standby-after-forward":
            _logits(model)
            _edit(model, key, how)
        else:
            with lp_plugin.session(model):
                if place == "session-after-forward":
                    _logits(model)
                _edit(model, key, how)
                if place == "session-then-forward":
                    assert torch.equal(_logits(model), _logits(edited))  # used inside the session
    except AttachError:
        refused = True
    return refused, model, handle, edited, plain


def _check_everywhere(model, handle, expected, key, tmp):
    """Logits, state_dict, save_pretrained and detach all hold ``expected``'s weights."""
    assert torch.equal(_logits(model), _logits(expected))
    assert torch.equal(model.state_dict()[key], expected.state_dict()[key])
    model.save_pretrained(tmp, safe_serialization=True)
    from safetensors.torch import load_file

    saved = load_file(f"{tmp}/model.safetensors")
    assert torch.equal(saved[key], expected.state_dict()[key])
    handle.detach()
    assert torch.equal(_logits(model), _logits(expected))
    assert torch.equal(model.get_parameter(key), expected.get_parameter(key))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["session", "stream"]), tier=st.sampled_from(["cpu", "disk"]),
       place=st.sampled_from(["standby", "standby-after-forward", "session", "session-after-forward",
                              "session-then-forward"]),
       layer=st.sampled_from(OFFLOADED), tensor=st.sampled_from(TENSORS), how=st.sampled_from(["mul", "add", "load"]),
       prefetch=st.sampled_from([0, 1]))
def test_an_edit_is_never_silently_lost(mode, tier, place, layer, tensor, how, prefetch):
    key = f"model.layers.{layer}.{tensor}"
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        refused, model, handle, edited, plain = _run(mode, tier, place, key, how, prefetch, folder)
        _check_everywhere(model, handle, plain if refused else edited, key, out)
    # which edits are refused is part of the contract: only stream mode's, made inside a session
    assert refused == (mode == "stream" and place.startswith("session"))


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_stream_session_edit_refused_then_model_unedited(tier, tmp_path):
    """The issue's case: ``with session(m): w.mul_(2)`` on an offloaded layer in stream mode."""
    refused, model, handle, _, plain = _run("stream", tier, "session", "model.layers.2.mlp.down_proj.weight", "mul", 1,
                                            str(tmp_path / "off"))
    assert refused
    _check_everywhere(model, handle, plain, "model.layers.2.mlp.down_proj.weight", str(tmp_path / "saved"))


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_stream_session_edit_refused_at_the_next_forward(tier, tmp_path):
    """The next forward inside the session refuses before any layer computes with the edit."""
    model = build_tiny("qwen2")
    _attach(model, "stream", tier, str(tmp_path))
    with pytest.raises(AttachError):
        with lp_plugin.session(model):
            _edit(model, "model.layers.4.mlp.down_proj.weight", "mul")
            with pytest.raises(AttachError):
                _logits(model)
            with pytest.raises(AttachError):
                model.state_dict()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("mode,when,key,op,layer", [
    ("session", "session-then-forward", "model.layers.4.self_attn.q_proj.weight", "add", 1),  # written back
    ("stream", "standby-after-forward", "model.layers.2.input_layernorm.weight", "mul", 0),  # lands in the tier
])
def test_edit_kept(tier, mode, when, key, op, layer, tmp_path):
    refused, model, handle, edited, _ = _run(mode, tier, when, key, op, layer, str(tmp_path / "o"))
    assert not refused
    _check_everywhere(model, handle, edited, key, str(tmp_path / "saved"))


def test_stream_refusal_leaves_the_model_usable(tmp_path):
    """After a refused edit the model runs, edits in standby work, and it attaches again."""
    model = build_tiny("qwen2")
    plain = copy.deepcopy(model)
    handle = _attach(model, "stream", "cpu", None)
    with pytest.raises(AttachError):
        with lp_plugin.session(model):
            _edit(model, "model.layers.2.mlp.down_proj.weight", "mul")
    assert torch.equal(_logits(model), _logits(plain))
    _edit(model, "model.layers.2.mlp.down_proj.weight", "mul")
    _edit(plain, "model.layers.2.mlp.down_proj.weight", "mul")
    assert torch.equal(_logits(model), _logits(plain))
    handle.detach()
    _attach(model, "stream", "cpu", None).detach()
    assert torch.equal(_logits(model), _logits(plain))


@pytest.mark.parametrize("mode,place", [("stream", "standby"), ("session", "session-then-forward")])
def test_an_edit_survives_detach_behind_accelerates_disk_offload(tiny_checkpoints, tmp_path, mode, place):
    """``from_pretrained(tier="disk")`` loads the offloaded layers as Accelerate's "disk" (read from the checkpoint's
    files); detach gives them back behind its hooks. An edited layer must come back edited, not as the file holds
    it; an unedited one is still read from the file (nothing of it stays in host memory)."""
    from transformers import AutoModelForCausalLM

    path, key = tiny_checkpoints["qwen2"], "model.layers.4.mlp.down_proj.weight"
    edited = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    _edit(edited, key, "mul")
    model = lp_plugin.from_pretrained(path, dtype=torch.bfloat16, offload="even", mode=mode, tier="disk",
                                      offload_folder=str(tmp_path / "off"), main_device="cpu")
    handle = lp_plugin.get_handle(model)
    assert 4 in handle.layer_indices and any(layer.from_files for layer in handle.layers)
    if place == "standby":
        _edit(model, key, "mul")
    else:
        with lp_plugin.session(model):
            _edit(model, key, "mul")
    assert torch.equal(_logits(model), _logits(edited))
    handle.detach()
    assert torch.equal(_logits(model), _logits(edited))
    for layer in handle.layers:  # the edited layer's values are in the loader's state dict; the others are not
        assert all((full in store) == (layer.index == 4) for store, full, _ in layer.from_files), layer.index


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_an_edit_survives_detach_over_accelerates_own_disk_offload(tmp_path, tier):
    """attach over a model that Accelerate offloaded to "disk" itself (``device_map`` with an ``offload_folder``): an
    edited layer goes back behind Accelerate's hooks edited."""
    from shapes import save_tiny
    from transformers import AutoModelForCausalLM

    path, key = save_tiny("qwen2", tmp_path / "ckpt"), "model.layers.4.mlp.down_proj.weight"
    edited = AutoModelForCausalLM.from_pretrained(path).eval()
    _edit(edited, key, "mul")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in (3, 4) else "cpu" for i in range(8)}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "acc"))
    folder = {"offload_folder": str(tmp_path / "off")} if tier == "disk" else {}
    handle = lp_plugin.attach(model.eval(), offload="3,4", tier=tier, **folder)
    _edit(model, key, "mul")
    assert torch.equal(_logits(model), _logits(edited))
    handle.detach()
    assert torch.equal(_logits(model), _logits(edited))
