"""``offload="auto"`` where users reach it, on the CPU: ``attach`` (a loaded model's real tensors),
``from_pretrained`` (planned from the config before loading, checked against the loaded model),
``fit_budget``, lm-eval's model_args and constructor, the ``python -m lp_plugin plan`` CLI (real
subprocesses), and the CPU-safe parts of ``benchmarks/budget_check.py``.

Without a GPU the main device is the CPU and the budget is its memory (see ``lp_plugin.planning.budget``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_helpers import benchmark_module
from shapes import ARCHS, build_tiny

import lp_plugin
from lp_plugin.core import flat
from lp_plugin.errors import BudgetError, OffloadSpecError
from lp_plugin.integrations.quant import nf4_config
from lp_plugin.planning import footprint
from lp_plugin.planning.config import OffloadConfig, parse_size

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20


# ---------------------------------------------------------------------------------------- offload="auto"
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget,mode,expected", [
    ("1GiB", "session", "whole"),      # everything fits: the plain model, session mode
    ("1GiB", "stream", "whole"),       # fits with nothing to stream
    ("1.7MiB", "session", "streamed"),  # the whole tiny model with its work needs ~1.8 MiB
])
def test_attach_auto(arch, budget, mode, expected):
    model, plain = build_tiny(arch), build_tiny(arch)
    ids = torch.randint(0, 256, (2, 24))
    handle = lp_plugin.attach(model, offload="auto", max_memory=budget, max_context=64, batch_size=2, mode=mode)
    plan = handle.plan.budget
    assert handle.layer_indices == list(plan.offloaded) and handle.config.mode == plan.mode
    assert handle.info()["budget"]["peak_bytes"] == plan.peak_bytes <= parse_size(budget)
    assert plan.source == "model" and plan.work.batch == 2 and plan.work.context == 64
    if expected == "whole":
        assert plan.offloaded == () and plan.mode == mode
    else:
        assert plan.mode == "stream" and plan.offloaded and set(plan.offloaded) <= set(range(2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    handle.detach()


def test_max_memory_without_a_reader_is_refused(tiny_checkpoints):
    """An explicit spec reads max_memory only through a device_map='auto' base placement."""
    with pytest.raises(OffloadSpecError, match="nothing would read it"):
        lp_plugin.attach(build_tiny("qwen2"), offload="even", max_memory="6GiB")
    with pytest.raises(OffloadSpecError, match="nothing would read it"):
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", max_memory="6GiB")
    with pytest.raises(OffloadSpecError, match="offload='auto' fits the main device alone"):
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="auto", max_memory={"cpu": "1GiB"}, device_map="auto")


def test_attach_auto_refuses_what_cannot_fit():
    model = build_tiny("llama")
    with pytest.raises(BudgetError, match="nothing fits max_memory 100.00 KiB on cpu") as info:
        lp_plugin.attach(model, offload="auto", max_memory={"cpu": "100KiB"}, max_context=64)
    assert lp_plugin.get_handle(model) is None  # nothing changed
    handle = lp_plugin.attach(model, offload="auto", max_memory=info.value.min_bytes, max_context=64)
    assert handle.layer_indices == list(info.value.smallest.offloaded)
    handle.detach()


@pytest.mark.parametrize("fmt", ["bf16", "nf4"])
def test_from_pretrained_auto_predicts_the_loaded_model(tiny_checkpoints, fmt):
    """The plan made from the config before loading equals what the loaded model holds."""
    from transformers import AutoConfig

    kwargs = {"nf4": dict(quantization_config=nf4_config())}.get(fmt, {})
    weights = footprint.load_format(AutoConfig.from_pretrained(tiny_checkpoints["qwen2"]), kwargs)
    whole = lp_plugin.fit_budget(AutoConfig.from_pretrained(tiny_checkpoints["qwen2"]), weights=weights, max_memory="1GiB",
                                 max_context=32, main_device="cpu")
    assert whole.mode == "session"
    model = lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="auto", max_memory=whole.peak_bytes - 1, max_context=32,
                                      **kwargs)
    handle = lp_plugin.get_handle(model)
    plan = handle.plan.budget
    assert plan.source == "config" and plan.format == footprint.from_model(model).format
    assert plan.mode == "stream" and handle.layer_indices == list(plan.offloaded)
    # resident now: everything but the offloaded layers, whose tensors point at the tier's host copy
    real = footprint.from_model(model)
    assert plan.standby_bytes == real.base_bytes + sum(b for i, b in enumerate(real.layer_bytes) if i not in plan.offloaded)
    # on a CPU main device each tensor keeps its checkpoint alignment in the layer's buffer (lp_plugin.core.flat),
    # which a plan made from the config cannot see: up to one alignment block more per tensor
    extra = handle.info()["offloaded_bytes"] - plan.offloaded_bytes
    blocks = sum(len(layer.layout.entries) for layer in handle.layers)
    assert 0 <= extra <= flat.ALIGN * blocks, (extra, blocks)
    handle.detach()


def test_fit_budget_on_a_loaded_model_and_a_config():
    model = build_tiny("qwen2")
    from_model = lp_plugin.fit_budget(model, max_memory="1.4MiB", max_context=64)
    from_config = lp_plugin.fit_budget(model.config, weights="fp32", max_memory="1.4MiB", max_context=64, main_device="cpu")
    assert dataclasses.replace(from_model, source="config") == from_config
    assert lp_plugin.get_handle(model) is None


def test_lm_eval_model_args():
    from lp_plugin.integrations.lm_eval_model import budget_options

    config = OffloadConfig.from_strings({"offload": "auto", "max_memory": "0:6GiB;cpu:30GiB", "max_context": "2048",
                                         "batch_size": "2", "work": "loglikelihood", "mode": "stream"})
    assert config.max_memory == ((0, 6 * GIB), ("cpu", 30 * GIB)) and (config.max_context, config.batch_size) == (2048, 2)
    assert OffloadConfig.from_strings({"offload": "auto", "max_memory": "6GiB"}).max_memory == (("main", 6 * GIB),)
    hflm = {"batch_size": 4, "max_length": 1024}
    assert budget_options({"offload": "auto", "max_memory": "6GiB"}, hflm) == {
        "offload": "auto", "max_memory": "6GiB", "batch_size": 4, "max_context": 1024, "work": "loglikelihood"}
    assert hflm["batch_size"] == 4  # still HFLM's
    plain = {"batch_size": "8"}
    assert budget_options({"offload": "even", "batch_size": "8"}, plain) == {"offload": "even"} and plain == {"batch_size": "8"}
    with pytest.raises(OffloadSpecError, match="pass an int batch_size"):
        budget_options({"offload": "auto", "max_memory": "6GiB"}, {"batch_size": "auto:4"})


def test_lm_eval_model_type_plans_on_construction(tmp_path):
    """The constructor lm-eval calls (create_from_arg_string) with offload=auto in model_args."""
    import lm_eval_fixtures as fx
    from lm_eval.api.registry import get_model

    path = fx.build_tiny_model("qwen2", tmp_path / "tiny")
    cls = get_model("hf-residual-offload")
    lm = cls.create_from_arg_string(f"pretrained={path},offload=auto,max_memory=cpu:80MiB,max_length=64",
                                    {"device": "cpu", "batch_size": 2})
    plan = lp_plugin.get_handle(lm.model).plan.budget
    assert plan.work == footprint.Work("loglikelihood", 64, 2) and plan.budget_bytes == 80 * MIB
    assert lm._lp_config.mode == plan.mode and lm.batch_size == 2
    with pytest.raises(BudgetError, match="nothing fits max_memory 1.00 MiB"):
        cls.create_from_arg_string(f"pretrained={path},offload=auto,max_memory=1MiB", {"device": "cpu", "batch_size": 1})


# ---------------------------------------------------------------------------------------- the CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lp_plugin", "plan", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_cli_prints_the_plan():
    proc = _cli("--model", "qwen2.5-3b-shape", "--max-memory", "0=6GiB", "--context", "8192")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("model qwen2.5-3b-shape: 36 decoder layers, bfloat16", "plan: stream mode, tier cpu", "cuda:0 (resident)",
                 "cpu (pinned host memory): layers", "card: cuda:0 6.00 GiB (max_memory)", "CUDA context + kernels",
                 "allocator slack", "KV cache", "engine ring buffers", "activations", "workspaces", "= peak", "left",
                 "predicted standby", "speed at most", "bandwidth:"):
        assert text in out, (text, out)


@pytest.mark.parametrize("device,note", [("cuda:0", True), ("cpu", False)])
def test_cli_says_a_disk_tier_on_a_gpu_may_pin_its_cached_files(device, note):
    proc = _cli("--model", "qwen2.5-3b-shape", "--max-memory", "4GiB", "--tier", "disk", "--device", device)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("host memory:"))
    assert "of files" in line and ("cached pages are pinned" in line) is note, line


def test_cli_json_and_the_smallest_budget(tmp_path):
    proc = _cli("--model", "qwen2.5-3b-shape", "--max-memory", "0=1GiB", "--max-memory", "cpu=30GiB", "--context", "8192",
                "--dtype", "nf4", "--json")
    assert proc.returncode == 2 and "raise max_memory to at least" in proc.stderr
    refused = json.loads(proc.stdout)
    smallest = parse_size(proc.stderr.split("raise max_memory to at least ")[1].split(";")[0])
    assert refused["min_bytes"] <= smallest and refused["smallest"]["mode"] == "stream"
    proc = _cli("--model", "qwen2.5-3b-shape", "--max-memory", f"0={smallest}", "--context", "8192", "--dtype", "nf4",
                "--json", "--bandwidth", "50")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["peak_bytes"] <= smallest and plan["offloaded"] == refused["smallest"]["offloaded"]
    assert plan["bandwidth_source"] == "given" and plan["format"] == "nf4 (bfloat16)"


@pytest.mark.parametrize("args,message", [
    (["--model", "qwen2.5-3b-shape", "--max-memory", "0=6GiB", "--max-memory", "1=6GiB"], "besides the main device"),
    (["--model", "qwen2.5-3b-shape", "--max-memory", "6 gigs"], "cannot read '6 gigs'"),
    (["--model", "/nonexistent/model", "--max-memory", "6GiB"], "neither a shape"),
    (["--model", "qwen2.5-3b-shape", "--max-memory", "6GiB", "--context", "８"], "--context"),
    (["--model", "qwen2.5-3b", "--max-memory", "6GiB"], "did you mean 'qwen2.5-3b-shape'"),
])
def test_cli_bad_arguments_exit_2(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_cli_without_max_memory_plans_for_the_free_memory():
    proc = _cli("--model", "qwen2.5-3b-shape", "--context", "512")
    if torch.cuda.is_available():
        assert proc.returncode in (0, 2) and "free on cuda:0 at load" in (proc.stdout + proc.stderr)
    else:  # nothing to ask: one error line, exit 2
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "max_memory" in proc.stderr


def test_cli_on_a_model_folder(tiny_checkpoints):
    proc = _cli("--model", tiny_checkpoints["llama"], "--max-memory", "cpu=700KiB", "--context", "32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "bfloat16, sizes from the config" in proc.stdout and "plan: stream mode" in proc.stdout


# ---------------------------------------------------------------------------------------- budget_check.py
def _budget_check():
    return benchmark_module("budget_check.py", "budget_check")


def test_budget_check_parts():
    bc = _budget_check()
    cases = bc.parse_cases(bc.GOAL_CASES)
    assert len(cases) == 14 and cases[0] == bc.Case("bf16", "8GiB", 8 * GIB, 512)
    for bad in ("bf16:6GiB", "int8:6GiB:512", "bf16:6GiB:0", "bf16:lots:512", ""):
        with pytest.raises(ValueError):
            bc.parse_cases(bad)
    specs = bc.hand_specs(8, 2, 32)
    assert specs[0] == ("session", "none") and ("stream", "2-9") in specs and len(specs) > 5
    for mode, spec in specs[1:]:
        layers = lp_plugin.resolve_layers(spec, 36)
        assert mode == "stream" and all(2 <= i <= 32 for i in layers)
    check = bc.verdict(cases[0], {"peak_bytes": 105, "standby_bytes": 50}, {"peak_bytes": 100, "standby_bytes": 50})
    assert check == {"peak_within_budget": True, "peak_error": 0.05, "peak_within_5pct": True, "standby_error": 0.0}
    # the plan's CUDA-runtime and allocator-slack terms are no allocation: measured allocations leave them out
    card_plan = {"peak_bytes": 135, "standby_bytes": 50, "breakdown": {"cuda_runtime": 20, "allocator_slack": 10,
                                                                        "weights": 50}}
    assert bc.allocated_peak(card_plan) == 105
    assert bc.verdict(cases[0], card_plan, {"peak_bytes": 100, "standby_bytes": 50}) == check


def test_budget_check_plan_only(tmp_path):
    out = tmp_path / "plans.json"
    proc = subprocess.run([sys.executable, "benchmarks/budget_check.py", "--plan-only", "--cases",
                           "bf16:6GiB:8192,nf4:1GiB:8192", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    fits, refused = (case["plan"] for case in report["cases"])
    assert fits["fits"] and fits["peak_bytes"] <= 6 * GIB and not refused["fits"] and refused["min_bytes"] > GIB
