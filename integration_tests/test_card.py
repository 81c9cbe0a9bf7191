"""The budget is the card: what ``offload="auto"`` counts on a GPU besides tensors (CUDA runtime, the
allocator's slack, workspaces), the protected ends as a preference, lm-eval's scoring without
full-vocabulary logits, prefill chunks and the longest context that fits. Planner arithmetic from
configs, on the CPU (no GPU needed: the documented runtime figure stands in for the measured one)."""

from __future__ import annotations

import re

import pytest
import torch
from shapes import tiny_config

from lp_plugin.core.devices import CONTEXT_BYTES, KERNELS_BYTES
from lp_plugin.errors import BudgetError, OffloadSpecError
from lp_plugin.planning import footprint
from lp_plugin.planning.budget import MIN_PREFILL_CHUNK, WORKSPACE, card_of, longest_context, plan_offload
from lp_plugin.planning.config import OffloadConfig
from lp_plugin.tools.shapes import shape_config

GIB, MIB = 2**30, 2**20
GPU0 = torch.device("cuda", 0)
QWEN = {fmt: footprint.from_config(shape_config("qwen2.5-3b-shape"), fmt) for fmt in ("bf16", "nf4")}
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the documented runtime figure")


def _plan(fp, budget, kind="generate", context=512, **options):
    config = OffloadConfig(offload="auto", max_memory=budget, max_context=context, work=kind, **options)
    return plan_offload(config, fp, GPU0, bandwidth=50.0)


@needs_no_gpu
def test_every_term_of_the_card_is_counted():
    plan = _plan(QWEN["bf16"], 6 * GIB, context=8192)
    b = plan.breakdown
    assert sum(b.values()) == plan.peak_bytes <= plan.budget_bytes == 6 * GIB
    assert b["cuda_runtime"] == CONTEXT_BYTES + KERNELS_BYTES and b["workspace"] == WORKSPACE
    assert b["allocator_slack"] > 0 and plan.left_bytes == 6 * GIB - plan.peak_bytes >= 0
    text = str(plan)  # the card view
    for row in ("CUDA context + kernels", "allocator slack", "weights (resident)", "engine ring buffers", "KV cache",
                "activations", "logits", "workspaces", "= peak", "left"):
        assert row in text


def test_protected_ends_are_given_up_only_when_nothing_else_fits():
    roomy = _plan(QWEN["bf16"], 6 * GIB, context=8192)
    assert all(2 <= i <= 32 for i in roomy.offloaded) and not any("given up" in n for n in roomy.notes)
    tight = _plan(QWEN["bf16"], 2 * GIB, context=2048)  # the 36 layers must all stream
    assert tight.offloaded == tuple(range(36)) and any("given up" in n for n in tight.notes)


def test_loglikelihood_never_counts_full_vocabulary_logits():
    plan = _plan(QWEN["bf16"], 6 * GIB, "loglikelihood", 32768)  # the 3B shape's own context in 6 GiB
    assert plan.peak_bytes <= 6 * GIB and plan.work.context == 32768
    assert plan.breakdown["logits"] < 256 * MIB  # lm-eval's own path: 2 x 32768 x 151936 x 2 bytes = 18.5 GiB


def test_prefill_chunks_only_when_a_whole_window_does_not_fit():
    whole = _plan(QWEN["nf4"], 6 * GIB, "loglikelihood", 32768)
    assert whole.prefill_chunk is None and whole.breakdown["kv"] == 0
    chunked = _plan(QWEN["nf4"], "3.5GiB", "loglikelihood", 32768)
    assert chunked.prefill_chunk is not None and MIN_PREFILL_CHUNK <= chunked.prefill_chunk < 32768
    assert chunked.breakdown["kv"] == footprint.kv_bytes(QWEN["nf4"], 32768, 1)
    assert any("prefill in chunks" in n for n in chunked.notes)
    # generate's prefill is the caller's: its window is never chunked; on CUDA its MLPs may be (the same values)
    generate = _plan(QWEN["nf4"], "3.5GiB", "generate", 32768, protect_first=0, protect_last=0)
    assert generate.prefill_chunk is None and generate.mlp_chunk is not None
    assert not any("prefill in chunks" in n for n in generate.notes)


def test_the_3b_shapes_own_context_fits_3_gib_in_nf4():
    """On CUDA the prefill chunks attend without a mask or expanded keys and values (chunk_attention): the
    3B shape scores 32768-token windows in a 3 GiB card. On the CPU they still count."""
    fp = QWEN["nf4"]
    plan = _plan(fp, 3 * GIB, "loglikelihood", 32768)
    assert plan.peak_bytes <= 3 * GIB and plan.prefill_chunk is not None and plan.prefill_chunk % 128 == 0
    chunk = plan.prefill_chunk
    expanded = 2 * 32768 * fp.heads * fp.head_dim * 2 + chunk * 32768 * 3  # keys/values for 16 heads, the mask
    append = 2 * (32768 - chunk) * fp.kv_heads * fp.head_dim * 2  # one layer's cache before the append
    work = footprint.Work("loglikelihood", 32768, 1)
    on_cpu, on_gpu = (footprint.work_phases(fp, work, chunk, cuda)["prefill"] for cuda in (False, True))
    assert on_cpu["activations"] - on_gpu["activations"] == expanded - append
    assert plan.breakdown["activations"] == on_gpu["activations"] < 256 * MIB < expanded


def test_the_longest_context_that_fits():
    fp = QWEN["nf4"]
    budget = "2.75GiB"
    config = OffloadConfig(offload="auto", max_memory=budget, max_context="auto", work="loglikelihood")
    plan = plan_offload(config, fp, GPU0, bandwidth=50.0)
    longest = plan.work.context
    assert 0 < longest < 32768 and "longest that fits" in plan.context_source
    _plan(fp, budget, "loglikelihood", longest)
    with pytest.raises(BudgetError) as info:
        _plan(fp, budget, "loglikelihood", longest + 1)
    assert f"a context of at most {longest} tokens fits" in str(info.value)
    card, _ = card_of(config.max_memory, GPU0)
    assert longest_context(fp, config, card, 32768) == longest
    # a context past the model's own, in a card too small: what fits is offered up to the model's context only
    with pytest.raises(BudgetError) as info:
        _plan(fp, "1GiB", "loglikelihood", 10**8)
    offered = re.search(r"a context of at most (\d+) tokens fits", str(info.value))
    assert offered is None or int(offered[1]) <= fp.max_positions
    with pytest.raises(BudgetError) as info:
        _plan(fp, "40GiB", "loglikelihood", 10**8)
    assert f"a context of at most {fp.max_positions} tokens fits (the model's own context)" in str(info.value)
    roomy = plan_offload(OffloadConfig(offload="auto", max_memory=8 * GIB, max_context="auto", work="loglikelihood"),
                         fp, GPU0, bandwidth=50.0)
    assert roomy.work.context == 32768 and roomy.context_source == "the model's"


def test_max_context_auto_from_strings():
    assert OffloadConfig.from_strings({"offload": "auto", "max_context": "auto"}).max_context == "auto"
    with pytest.raises(OffloadSpecError):
        OffloadConfig.from_strings({"offload": "auto", "max_context": "longest"})


def test_without_max_memory_the_budget_is_what_the_device_has_free():
    fp = footprint.from_config(tiny_config("qwen2"), "fp32")
    plan = plan_offload(OffloadConfig(offload="auto", max_context=64), fp, torch.device("cpu"))
    assert plan.budget_source.startswith("available host memory") and plan.budget_bytes > 0
    if not torch.cuda.is_available():
        with pytest.raises(OffloadSpecError):  # nothing to ask: give max_memory
            plan_offload(OffloadConfig(offload="auto", max_context=64), fp, GPU0)


@pytest.mark.parametrize("bandwidth", [float("nan"), float("inf"), 0, -1.0, True])
def test_a_bad_bandwidth_is_refused_even_when_nothing_streams(bandwidth):
    with pytest.raises(OffloadSpecError):
        plan_offload(OffloadConfig(offload="auto", max_memory="80GiB", max_context=512), QWEN["bf16"], GPU0,
                     bandwidth=bandwidth)


@needs_no_gpu
def test_plan_cli_for_a_gpu_on_a_machine_without_one():
    """``plan --device cuda`` plans for GPU 0 from the config alone where torch has no CUDA."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lp_plugin", "plan", "--model", "qwen2.5-3b-shape", "--max-memory", "6GiB",
         "--context", "8192", "--device", "cuda", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"main_device": "cuda:0"' in out.stdout


@pytest.mark.parametrize("conf,on", [("expandable_segments:True", True), ("expandable_segments: true,x:1", True),
                                     ("max_split_size_mb:64", False), (None, False)])
def test_allocator_setting_respects_the_users_choice(monkeypatch, conf, on):
    """A planned load turns expandable segments on only where the user set nothing (and there is CUDA); a user's
    PYTORCH_CUDA_ALLOC_CONF is left as it is and read back."""
    from lp_plugin.core import devices

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    if conf is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    sets_it = conf is None and torch.cuda.is_available()  # nothing set by the user, and a GPU to set it for
    assert devices.bound_allocator_slack() is (on or sets_it)
    assert calls == (["expandable_segments:True"] if sets_it else [])
