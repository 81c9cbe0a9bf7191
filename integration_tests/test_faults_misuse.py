"""Wrong models and wrong call order: a model without a decoder layer list, unloaded meta weights,
attach twice, detach twice or inside a session, a layer called directly, an attach failing half way
through install; each an ``AttachError`` and the model plain again."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_tiny
from fault_parts import Tiny, assert_unchanged, logits

import lp_plugin
from lp_plugin.errors import AttachError


@pytest.fixture
def tiny():
    return Tiny()


def test_model_without_decoder_layer_list():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                vocab_size=100)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = bert(ids).last_hidden_state
    with pytest.raises(AttachError, match="BertModel"):  # the class it cannot find decoder layers in
        lp_plugin.attach(bert)
    assert lp_plugin.get_handle(bert) is None
    with torch.no_grad():
        assert torch.equal(bert(ids).last_hidden_state, ref)


def test_plain_module_without_layers():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(AttachError, match="Sequential"):
        lp_plugin.attach(net, offload="0")
    assert lp_plugin.get_handle(net) is None


@pytest.mark.parametrize("offload,quoted", [
    ([1], "resident layer 0"),  # a resident layer: the error names it
    ([0, 1], "'self_attn.q_proj.weight'"),  # an offloaded layer: the error names its meta parameters
])
def test_model_with_unloaded_meta_weights(offload, quoted):
    from accelerate import init_empty_weights
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("qwen2", num_layers=2))
    with pytest.raises(AttachError, match=re.escape(quoted)):
        lp_plugin.attach(model, offload=offload, main_device="cpu", protect_first=0, protect_last=0)
    assert lp_plugin.get_handle(model) is None and not hasattr(model.model.layers[0], "_hf_hook")


def test_attach_twice(tiny):
    h = lp_plugin.attach(tiny.model, offload="even")
    with pytest.raises(AttachError):
        lp_plugin.attach(tiny.model, offload="odd")
    assert lp_plugin.get_handle(tiny.model) is h and h.layer_indices == [2, 4]
    assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


class _InjectedFailure(Exception):
    pass


@pytest.mark.parametrize("where", ["layer hooks", "model entry"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_attach_failing_half_way_through_install_is_undone(tiny, monkeypatch, mode, where):
    """attach fails after it started changing the model (the second layer's hooks, or once the model
    entry is on): everything installed so far is undone, the model is plain again."""
    from lp_plugin.core.entry import ModelEntry
    from lp_plugin.core.resident import Residency
    from lp_plugin.core.stream import Ring

    if where == "model entry":
        install = ModelEntry.install

        def failing_install(self):
            install(self)
            raise _InjectedFailure

        monkeypatch.setattr(ModelEntry, "install", failing_install)
    else:
        mover = Ring if mode == "stream" else Residency
        layer_hooks = mover.layer_hooks

        def failing_hooks(self, pos, gate):
            if pos == 1:
                raise _InjectedFailure
            return layer_hooks(self, pos, gate)

        monkeypatch.setattr(mover, "layer_hooks", failing_hooks)
    with pytest.raises(_InjectedFailure):
        lp_plugin.attach(tiny.model, offload="even", mode=mode, alpha=0.5)
    monkeypatch.undo()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


def test_detach_twice(tiny):
    h = lp_plugin.attach(tiny.model, offload="even")
    h.detach()
    with pytest.raises(AttachError):
        h.detach()
    with pytest.raises(AttachError):
        with h.session():
            pass
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_detach_inside_a_session(tiny, mode):
    h = lp_plugin.attach(tiny.model, offload="even", mode=mode)
    with lp_plugin.session(tiny.model):
        with pytest.raises(AttachError):
            h.detach()
        assert torch.equal(logits(tiny.model), tiny.ref)
    assert lp_plugin.get_handle(tiny.model) is h
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_offloaded_layer_called_directly(tiny, mode):
    h = lp_plugin.attach(tiny.model, offload="even", mode=mode)
    with pytest.raises(AttachError, match=re.escape("lp_plugin.session(model)")):  # the fix it names
        tiny.model.model.layers[2](torch.zeros(1, 3, 64))
    assert torch.equal(logits(tiny.model), tiny.ref)
    h.detach()
    assert_unchanged(tiny.model, tiny.ref, tiny.state)


def test_accelerate_map_with_other_layers_is_taken_over(tmp_path):
    """Accelerate offloads layer 3, the spec names 2 and 4: attach takes all three, exactly; with alpha=0
    the spec's layers are dropped and Accelerate keeps its own offload of layer 3."""
    from accelerate import dispatch_model

    model = build_tiny("qwen2")
    ref = logits(model)
    dmap = lp_plugin.residual_offload_device_map(model, offload="odd", tier="disk", main_device="cpu")
    dispatch_model(model, dmap, offload_dir=str(tmp_path / "accel"))
    assert torch.equal(logits(model), ref)
    h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=tmp_path / "off")
    assert h.layer_indices == [2, 3, 4]
    assert torch.equal(logits(model), ref)
    h.detach()
    assert torch.equal(logits(model), ref)  # Accelerate's offload back in place and exact
    h = lp_plugin.attach(model, offload="even", alpha=0)
    assert h.layer_indices == [] and h.info()["dropped_layers"] == [2, 4]
    h.detach()
    assert torch.equal(logits(model), ref)
