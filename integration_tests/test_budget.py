"""The budget planner (``offload="auto"``, ``lp_plugin.planning.budget``) on its own, on the CPU (its entry
points are in ``test_budget_auto.py``).

* Sizes: the planner's weight bytes (from a config, no weights) equal the real tensors of tiny models
  loaded in fp32, bf16 and NF4 (bitsandbytes' CPU backend), and the engine's packed layer sizes; its
  KV cache equals what a transformers ``StaticCache`` allocates (sliding-window layers too).
* Properties: a larger budget never offloads more layers nor picks a slower mode; "nothing fits" names
  the smallest budget, which then fits (and one byte less does not).
* ``max_memory`` forms (Accelerate's, lm-eval's strings), good and bad; per-device budgets; options
  that only apply with ``offload="auto"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapes import ARCHS, build_tiny, tiny_config

import lp_plugin
from lp_plugin.core.flat import LayerLayout, quant_state_tensors
from lp_plugin.core.logprobs import head_rows
from lp_plugin.errors import BudgetError, OffloadSpecError
from lp_plugin.integrations.quant import nf4_config
from lp_plugin.planning import footprint
from lp_plugin.planning.budget import compact, device_budgets, plan_offload, spread
from lp_plugin.planning.config import OffloadConfig, parse_max_memory, parse_size
from lp_plugin.tools.shapes import shape_config

GIB, MIB = 2**30, 2**20
CPU, GPU0 = torch.device("cpu"), torch.device("cuda", 0)
SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def _auto(**options) -> OffloadConfig:
    return OffloadConfig(offload="auto", **options)


def _real_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds (4-bit weights' quant states included)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        qs = getattr(t, "quant_state", None)
        for x in [t, *(v for _, v in (quant_state_tensors(qs) if qs is not None else ()))]:
            if (x.data_ptr(), x.nbytes) not in seen:
                seen.add((x.data_ptr(), x.nbytes))
                total += x.nbytes
    return total


# ---------------------------------------------------------------------------------------- sizes
FORMATS = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
           "nf4": dict(quantization_config=nf4_config(), dtype=torch.bfloat16, device_map={"": "cpu"})}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("arch", ARCHS)
def test_weight_bytes_equal_the_loaded_tensors(tiny_checkpoints, arch, fmt):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(tiny_checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], **FORMATS[fmt])
    planned = footprint.from_config(hf_config, footprint.load_format(hf_config, FORMATS[fmt]))
    assert planned.total_bytes == _real_bytes(model)
    assert planned == dataclasses.replace(footprint.from_model(model), source="config")
    for i, layer in enumerate(model.model.layers):
        layout = LayerLayout(layer)
        assert (planned.packed_bytes[i], planned.other_bytes[i]) == (layout.nbytes, layout.other_nbytes)
    if fmt != "nf4":  # what the engine packs and moves per forward
        # (computing on the CPU, a layer keeps its tensors' alignment in its buffer: lp_plugin.core.flat)
        cpu = next(model.parameters()).device.type == "cpu"
        kept = [LayerLayout(model.model.layers[i], keep_alignment=cpu).nbytes for i in (2, 4)]
        assert cpu or kept == [planned.packed_bytes[2], planned.packed_bytes[4]]
        handle = lp_plugin.attach(model, offload="even", mode="stream")
        assert handle.info()["offloaded_bytes"] == sum(kept)
        handle.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context,batch", [(7, 1), (33, 3)])
@pytest.mark.parametrize("extra", [{}, dict(use_sliding_window=True, sliding_window=16, max_window_layers=4)],
                         ids=["full", "sliding"])
def test_kv_cache_equals_a_static_cache(dtype, context, batch, extra):
    from transformers import StaticCache

    model = build_tiny("qwen2", **extra).to(dtype)
    cache = StaticCache(config=model.config, max_cache_len=context)
    with torch.no_grad():
        model(torch.randint(0, 256, (batch, 3)), cache=cache, use_cache=True)
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert footprint.kv_bytes(footprint.from_config(model.config, dtype), context, batch) == allocated


def test_qwen_shape_sizes_match_the_measured_standby():
    """Qwen2.5-3B in bf16 / NF4: the whole model is what the engine's GPU runs measured as the plain
    model's standby (5.75 and 1.92 GiB, README)."""
    cfg = shape_config("qwen2.5-3b-shape")
    assert round(footprint.from_config(cfg, "bf16").total_bytes / GIB, 2) == 5.75
    assert round(footprint.from_config(cfg, "nf4").total_bytes / GIB, 2) == 1.91


def test_llama_3_8b_shape_size_from_its_config():
    """Llama-3-8B has 8,030,261,248 parameters (untied lm_head): 2 bytes each in bf16, plus the rotary
    embedding's two fp32 buffers of head_dim / 2 frequencies, from the config alone."""
    fp = footprint.from_config(shape_config("llama-3-8b-shape"), "bf16")
    assert fp.total_bytes == 8_030_261_248 * 2 + 2 * 64 * 4 and fp.num_layers == 32


# ---------------------------------------------------------------------------------------- planning
QWEN = {fmt: footprint.from_config(shape_config("qwen2.5-3b-shape"), fmt) for fmt in ("bf16", "nf4")}
WORKS = [("generate", 512), ("generate", 8192), ("loglikelihood", 512), ("loglikelihood", 2048)]


def _plan(fp, budget, kind="generate", context=512, device=GPU0, **options):
    return plan_offload(_auto(max_memory=budget, max_context=context, work=kind, **options), fp, device, bandwidth=50.0)


def test_spread_evenly_between_the_protected_ends():
    assert spread(16, 2, 32) == tuple(range(2, 33, 2))  # half the candidates: the "even" policy
    assert spread(1, 2, 32) == (17,) and spread(0, 2, 32) == () and spread(31, 2, 32) == tuple(range(2, 33))
    for k in range(32):
        layers = spread(k, 2, 32)
        assert len(set(layers)) == k and list(layers) == sorted(layers) and all(2 <= i <= 32 for i in layers)
    assert compact((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8" and compact(()) == "none"


@SETTINGS
@given(fmt=st.sampled_from(list(QWEN)), work=st.sampled_from(WORKS), a=st.integers(1 * GIB, 9 * GIB),
       b=st.integers(1 * GIB, 9 * GIB), prefetch=st.integers(0, 3))
def test_a_larger_budget_never_offloads_more_or_runs_slower(fmt, work, a, b, prefetch):
    small, large = sorted((a, b))
    plans = []
    for budget in (small, large):
        try:
            plans.append(_plan(QWEN[fmt], budget, *work, prefetch=prefetch))
        except BudgetError as exc:
            assert exc.min_bytes > budget
            plans.append(None)
    low, high = plans
    if low is None:
        return
    assert high is not None and high.peak_bytes <= large and low.peak_bytes <= small
    # a whole window is preferred to prefill chunks (exact, and faster): more budget never chunks more
    chunk = lambda p: p.prefill_chunk or p.work.context  # noqa: E731
    assert chunk(high) >= chunk(low)
    if chunk(high) != chunk(low):
        return
    assert len(high.offloaded) <= len(low.offloaded)
    assert (high.decode_tok_s or float("inf")) >= (low.decode_tok_s or float("inf"))
    assert not (low.mode == "session" and high.mode == "stream")


@pytest.mark.parametrize("fmt,work", [(f, w) for f in QWEN for w in WORKS])
def test_nothing_fits_names_the_smallest_budget_which_then_fits(fmt, work):
    with pytest.raises(BudgetError) as info:
        _plan(QWEN[fmt], 256 * MIB, *work)
    smallest = info.value.min_bytes
    assert "the least this needs is" in str(info.value) and "raise max_memory to at least" in str(info.value)
    plan = _plan(QWEN[fmt], smallest, *work)
    assert plan.peak_bytes <= smallest and plan.offloaded == info.value.smallest.offloaded
    with pytest.raises(BudgetError):
        _plan(QWEN[fmt], smallest - 1, *work)
    printed = parse_size(str(info.value).split("raise max_memory to at least ")[1].split(";")[0])
    assert _plan(QWEN[fmt], printed, *work).peak_bytes <= printed  # the budget as printed fits too


def test_plan_breakdown_and_modes():
    whole = _plan(QWEN["bf16"], 8 * GIB)
    assert whole.mode == "session" and whole.offloaded == () and whole.standby_bytes == QWEN["bf16"].total_bytes
    streamed = _plan(QWEN["bf16"], 6 * GIB, context=8192)
    assert streamed.mode == "stream" and 0 < len(streamed.offloaded) < 31
    assert sum(streamed.breakdown.values()) == streamed.peak_bytes <= 6 * GIB
    assert streamed.breakdown["ring"] >= 2 * QWEN["bf16"].packed_bytes[2]  # prefetch 1: two slots
    assert streamed.decode_tok_s == pytest.approx(50e9 / sum(QWEN["bf16"].packed_bytes[i] for i in streamed.offloaded))
    forced = _plan(QWEN["bf16"], 8 * GIB, mode="stream")
    assert forced.mode == "stream" and forced.offloaded == ()
    # lp_plugin's lm-eval scoring: one head chunk of logits and log_softmax, never the full vocabulary's
    ll = _plan(QWEN["bf16"], 8 * GIB, "loglikelihood", 2048)
    assert ll.breakdown["logits"] <= 2 * head_rows(151936, 2, 2) * 151936 * 2 <= 130 * MIB
    assert ll.breakdown["kv"] == 0 and ll.prefill_chunk is None  # a whole window runs without a cache
    # host memory: one pinned buffer per layer, rounded up to a power of two by PyTorch's allocator
    assert streamed.host_bytes == len(streamed.offloaded) * 256 * MIB
    with pytest.raises(BudgetError) as info:
        _plan(QWEN["bf16"], {0: 6 * GIB, "cpu": GIB}, context=8192)
    assert info.value.host_bytes == streamed.host_bytes > GIB
    disk = _plan(QWEN["bf16"], {0: 6 * GIB, "cpu": GIB}, context=8192, tier="disk", offload_folder="/tmp/x")
    assert disk.host_bytes == 2 * 256 * MIB and disk.disk_bytes == streamed.offloaded_bytes


def test_cpu_main_device_plans_its_memory():
    fp = footprint.from_config(tiny_config("qwen2"), "fp32")
    plan = _plan(fp, {"cpu": "1.5MiB"}, context=64, device=CPU)
    assert plan.breakdown["workspace"] == plan.breakdown["cuda_runtime"] == plan.breakdown["allocator_slack"] == 0
    assert plan.bandwidth_gbps is None and plan.decode_tok_s is None
    assert plan.host_budget_bytes is None and plan.peak_bytes <= 1.5 * MIB


# ---------------------------------------------------------------------------------------- max_memory
GOOD = [
    ("6GiB", (("main", 6 * GIB),)),
    (6 * GIB, (("main", 6 * GIB),)),
    ("6442450944", (("main", 6 * GIB),)),
    ({0: "6GiB", "cpu": "30GiB"}, ((0, 6 * GIB), ("cpu", 30 * GIB))),
    ({"cuda:1": 5, "0": "1KB"}, ((0, 1000), (1, 5))),
    ("0:6GiB;cpu:30GiB", ((0, 6 * GIB), ("cpu", 30 * GIB))),
    ("0=6GiB,cpu=1.5GB", ((0, 6 * GIB), ("cpu", 1_500_000_000))),
    ("cuda:0=512MiB", ((0, 512 * MIB),)),
    ("5Gb", (("main", 625_000_000),)),  # bits, as Accelerate reads a lower-case b
]
BAD = [
    ("6 GiBs", "cannot read '6 GiBs' as a memory size"),
    ("-1GiB", "cannot read '-1GiB'"),
    ("nanGiB", "cannot read 'nanGiB'"),
    (1.5, "cannot read 1.5"),
    (True, "cannot read True"),
    ({}, "max_memory is empty"),
    ({"disk": "1GiB"}, "no 'disk' entry"),
    ({"gpu": 1}, "key 'gpu' is not a device"),
    ("0:6GiB;0:7GiB", "names '0' twice"),
    ({0: "1GiB", "cuda:0": "2GiB"}, "twice"),
]


@pytest.mark.parametrize("value,expected", GOOD)
def test_max_memory_good_forms(value, expected):
    bits = isinstance(value, str) and value.endswith("b") and not value.lower().endswith("ib")  # bits: a warning
    with pytest.warns(UserWarning, match="bits") if bits else warnings.catch_warnings():
        if not bits:
            warnings.simplefilter("error")
        assert parse_max_memory(value) == expected
        assert OffloadConfig(offload="auto", max_memory=value).max_memory == expected


@pytest.mark.parametrize("value,message", BAD)
def test_max_memory_bad_forms(value, message):
    with pytest.raises(OffloadSpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_max_memory(value)


@pytest.mark.parametrize("text", ["6GiB", "6gib", "6.5GB", "5Gb", "100MiB", "7KB", "3 GiB", "0.5MB", "12KiB"])
def test_sizes_read_like_accelerate(text):
    from accelerate.utils import convert_file_size_to_int

    bits = text.endswith("b") and not text.lower().endswith("ib")  # "5Gb": bits, said in a warning
    with pytest.warns(UserWarning, match="bits") if bits else contextlib.nullcontext():
        assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize("max_memory,device,expected", [
    ("6GiB", GPU0, (6 * GIB, None)),
    ({0: "6GiB", "cpu": "30GiB"}, GPU0, (6 * GIB, 30 * GIB)),
    ({"cpu": "2GiB"}, CPU, (2 * GIB, None)),
    ("2GiB", CPU, (2 * GIB, None)),
    ({"cpu": "30GiB"}, GPU0, "no entry for the main device cuda:0"),
    ({0: "6GiB"}, CPU, "without a GPU the main device is the CPU"),
    ({0: "6GiB", 1: "6GiB"}, GPU0, r"names \['1'\] besides the main device"),
    ("main:6GiB;0:6GiB", GPU0, "twice"),
])
def test_device_budgets(max_memory, device, expected):
    parsed = parse_max_memory(max_memory)
    if isinstance(expected, str):
        with pytest.raises(OffloadSpecError, match=expected):
            device_budgets(parsed, device)
    else:
        assert device_budgets(parsed, device) == expected


@pytest.mark.parametrize("options,message", [
    (dict(offload="even", max_context=512, work="generate"), r"\['max_context', 'work'\] only apply with offload='auto'"),
    (dict(offload="auto", max_memory="6GiB", alpha=0), "alpha=0 would drop them"),
    (dict(offload="auto", max_memory="6GiB", skip="3"), "does not know which layers skip="),
    (dict(offload="auto", max_memory="6GiB", max_context=0), "max_context must be an int >= 1"),
    (dict(offload="auto", max_memory="6GiB", work="train"), "work must be 'generate'"),
])
def test_bad_budget_options(options, message):
    with pytest.raises(OffloadSpecError, match=message):
        OffloadConfig(**options)


def test_max_memory_keys_may_be_torch_devices():
    assert parse_max_memory({torch.device("cuda", 1): "1GiB", torch.device("cpu"): 2}) == ((1, 2**30), ("cpu", 2))
