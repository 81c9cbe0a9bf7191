"""Composition with the placement users already have: a base device map (``device_map="auto"`` across
GPUs, or a dict) keeps its placement and only the chosen layers move to the tier, each computing on the
device the base map gives it. The maps are checked here without a GPU; running on two GPUs is in
test_gpu_paths.py."""

from __future__ import annotations

import pytest
import torch

import lp_plugin
from lp_plugin.config import OffloadConfig
from lp_plugin.plan import OffloadPlan
from shapes import save_tiny, tiny_config

TWO_GPUS = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
            "model.layers.2": 0, "model.layers.3": 0, "model.layers.4": 1, "model.layers.5": 1, "model.layers.6": 1,
            "model.layers.7": 1, "model.norm": 1, "lm_head": 1}

CASES = [  # (base map, offload, expected map values of layers 0..7, expected offloaded layers)
    (TWO_GPUS, "even", [0, 0, "cpu", 0, "cpu", 1, 1, 1], (2, 4)),
    (TWO_GPUS, "2-5", [0, 0, "cpu", "cpu", "cpu", "cpu", 1, 1], (2, 3, 4, 5)),
    ({"model": 0, "lm_head": 0}, "even", [0, 0, "cpu", 0, "cpu", 0, 0, 0], (2, 4)),  # ancestors cover layers
    (dict(TWO_GPUS, **{"model.layers.6": "cpu"}), "even", [0, 0, "cpu", 0, "cpu", 1, "cpu", 1], (2, 4, 6)),  # Accelerate's own offload kept
]


@pytest.mark.parametrize("base,offload,values,offloaded", CASES, ids=["two-gpus", "range", "ancestor-keys", "base-offloads-6"])
def test_base_map_keeps_its_placement(base, offload, values, offloaded):
    config = tiny_config("llama")
    dmap = lp_plugin.residual_offload_device_map(config, offload=offload, base_map=base)
    assert [dmap[f"model.layers.{i}"] for i in range(8)] == values
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == base.get("lm_head", 0)
    plan = OffloadPlan.for_config(config, OffloadConfig(offload=offload), base_map=base)
    assert plan.offloaded == offloaded
    # each offloaded layer computes where the base map runs it (layer 6, offloaded by the base map, too)
    expected = {i: torch.device("cuda", 1 if (base is not CASES[2][0] and i >= 4) else 0) for i in offloaded}
    assert {i: plan.device_of(i) for i in offloaded} == expected
    assert plan.main_device == torch.device("cuda", 0)


def test_bad_base_maps_are_refused():
    config = tiny_config("llama")
    with pytest.raises(lp_plugin.OffloadSpecError, match="places no module at 'lm_head'"):
        lp_plugin.residual_offload_device_map(config, base_map={"model": 0})
    with pytest.raises(lp_plugin.OffloadSpecError, match="non-empty dict"):
        lp_plugin.residual_offload_device_map(config, base_map={})


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_from_pretrained_keeps_a_cpu_base_map(tmp_path, mode):
    """On a machine without a GPU, a base map of "cpu" is the compute device, not a host tier: the
    model loads as the map says and the spec's layers are offloaded, exactly."""
    from transformers import AutoModelForCausalLM

    path = save_tiny("qwen2", tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = plain(ids).logits
    model = lp_plugin.from_pretrained(path, device_map={"": "cpu"}, offload="even", mode=mode, main_device="cpu")
    assert lp_plugin.get_handle(model).info()["offloaded_layers"] == [2, 4]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(lp_plugin.OffloadSpecError, match="device_map='balanced'"):
        lp_plugin.from_pretrained(path, device_map="balanced")
