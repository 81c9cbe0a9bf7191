"""Composition with the placement users already have: a base device map (``device_map="auto"`` across
GPUs, or a dict) keeps its placement and only the chosen layers move to the tier, each computing on the
device the base map gives it. The maps are checked here without a GPU; running on two GPUs is in
test_gpu_paths.py."""

from __future__ import annotations

import os

import pytest
import torch
from shapes import save_tiny, tiny_config

import lp_plugin
from lp_plugin.planning.config import OffloadConfig
from lp_plugin.planning.plan import OffloadPlan

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


def test_tied_modules_stay_together():
    """A tied lm_head goes where the input embeddings go, whatever the base map says: one tensor
    cannot compute on two devices."""
    config = tiny_config("qwen2")  # tie_word_embeddings
    base = dict(TWO_GPUS, lm_head=1)
    assert lp_plugin.residual_offload_device_map(config, base_map=base)["lm_head"] == 0
    assert lp_plugin.residual_offload_device_map(tiny_config("llama"), base_map=base)["lm_head"] == 1  # untied


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


_RANK = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
import lp_plugin
from shapes import build_tiny
model = build_tiny("llama")
ids = torch.tensor([[5, 17, 42, 99, 3]])
with torch.no_grad():
    ref = model(ids).logits
handle = lp_plugin.attach(model, offload="even", tier="cpu", mode={mode!r})
maps = sorted({{line.split()[-2] if line.endswith("(deleted)") else line.split()[-1]
               for line in open("/proc/self/maps") if "lp_plugin-" in line}})
inodes = sorted({{line.split()[4] for line in open("/proc/self/maps") if "lp_plugin-" in line}})
with torch.no_grad():
    exact = bool(torch.equal(model(ids).logits, ref))
print(json.dumps(dict(maps=maps, inodes=inodes, host_bytes=handle.tier.host_bytes(),
                      shared=handle.tier.shared_host_bytes(), offloaded=handle.info()["offloaded_bytes"], exact=exact)))
sys.stdout.flush()
input()  # hold the mapping until the parent has read both ranks
handle.detach()
"""


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_local_ranks_share_one_host_copy(tmp_path, mode):
    """Two processes of one host (LOCAL_WORLD_SIZE=2, as accelerate launch sets it) attach the same model:
    both map the same /dev/shm pages for each offloaded layer (one copy per host), hold no host memory
    of their own for the tier, stay exact, and leave nothing in /dev/shm."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, LOCAL_WORLD_SIZE="2")
    code = _RANK.format(tests=str(Path(__file__).parent), mode=mode)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.communicate("\n", timeout=120)
        assert p.returncode == 0
    assert all(o["exact"] and o["host_bytes"] == 0 and o["shared"] == o["offloaded"] > 0 for o in outs)
    assert len(outs[0]["inodes"]) == 2 and outs[0]["inodes"] == outs[1]["inodes"]  # layers 2 and 4, the same pages
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("lp_plugin-")]


def test_data_parallel_totals_count_a_host_copy_once():
    """The results JSON's per-host figure: private host memory of every rank, plus a shared copy once."""
    from lp_plugin.integrations.lm_eval_model import _per_host

    ranks = [dict(host="a", host_tier_bytes=0, shared_host_tier_bytes=100), dict(host="a", host_tier_bytes=0, shared_host_tier_bytes=100),
             dict(host="b", host_tier_bytes=100, shared_host_tier_bytes=0), dict(host="b", host_tier_bytes=100, shared_host_tier_bytes=0)]
    assert _per_host(ranks) == {"a": 100, "b": 200}


@pytest.mark.parametrize("value,shared", [("1", True), ("0", False), ("off", False)])
def test_sharing_the_host_copy_can_be_turned_off(monkeypatch, value, shared):
    from lp_plugin.core import shm

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LP_PLUGIN_SHARE_HOST_COPY", value)
    assert shm.sharing() is (shared and os.path.isdir(shm.SHM) and os.access(shm.SHM, os.W_OK))
