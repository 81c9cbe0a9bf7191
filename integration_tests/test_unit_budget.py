"""The budget planner's arithmetic (lp_plugin/planning/budget.py, footprint.py) on a hand-written footprint:
no model, no config, no device (the main device is the CPU, where nothing is added for a CUDA runtime)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lp_plugin import BudgetError, OffloadConfig, OffloadSpecError
from lp_plugin.planning.budget import compact, device_budgets, plan_offload, spread
from lp_plugin.planning.footprint import Footprint, Work, kv_bytes, work_peak, work_phases

MIB = 2**20
CPU = torch.device("cpu")
LAYERS = 12  # protect_first=2, protect_last=3 by default: layers 2..8 may be offloaded


def footprint(**changes) -> Footprint:
    """100 MiB outside the layers, 12 layers of 50 MiB (1 MiB of it outside their Linear modules)."""
    fp = Footprint(
        source="config",
        format="bf16",
        base_bytes=100 * MIB,
        layer_bytes=(50 * MIB,) * LAYERS,
        packed_bytes=(50 * MIB,) * LAYERS,
        other_bytes=(1 * MIB,) * LAYERS,
        hidden=64,
        intermediate=128,
        vocab=1000,
        heads=4,
        kv_heads=2,
        head_dim=16,
        kv_windows=(None,) * LAYERS,
        act_size=2,
        dequant_bytes=0,
        max_positions=None,
    )
    return dataclasses.replace(fp, **changes)


def auto(budget: str, **options) -> OffloadConfig:
    return OffloadConfig(offload="auto", max_memory=budget, max_context=16, **options)


def work_bytes(fp: Footprint) -> int:
    return sum(work_peak(fp, Work("generate", 16, 1))[1].values())


def test_kv_cache_bytes():
    # keys and values x batch 1 x 2 kv heads x 16 dims x 2 bytes x 16 tokens, per layer
    assert kv_bytes(footprint(), 16, 1) == LAYERS * 2 * 2 * 16 * 2 * 16
    windowed = footprint(kv_windows=(4,) + (None,) * (LAYERS - 1))  # a sliding-window layer keeps 4 tokens
    assert kv_bytes(windowed, 16, 1) == (LAYERS - 1) * 2048 + 512
    assert kv_bytes(footprint(), 16, 3) == 3 * kv_bytes(footprint(), 16, 1)


def test_prefill_chunks_on_cuda_count_no_mask_or_expanded_keys():
    """A 16-token chunk of a 64-token window attends through a mask (16 x 64, bool and bf16) and keys and
    values expanded to the 4 query heads; on CUDA, for a config that allows it in fp16/bf16, through neither
    (chunk_attention): there the attention's peak is one layer's 48 earlier tokens of keys and values
    alive next to their concatenation with the chunk's."""
    work = Work("loglikelihood", 64, 1)

    def activations(fp, cuda):
        return work_phases(fp, work, 16, cuda)["prefill"]["activations"]

    fp = footprint(chunk_attention=True)
    mask, expanded, append = 16 * 64 * 3, 2 * 64 * 4 * 16 * 2, 2 * 48 * 2 * 16 * 2
    assert activations(fp, False) - activations(fp, True) == mask + expanded - append
    for counted in (footprint(), footprint(chunk_attention=True, act_size=4)):  # not allowed, float32
        assert activations(counted, True) == activations(counted, False)
    assert work_phases(fp, work, None, True) == work_phases(fp, work, None, False)  # a whole window: no cache


def test_a_static_cache_prefill_counts_its_mask_and_expanded_keys():
    """decode="graph" generates with a static cache, whose prefill attends to the cache's whole length through a
    mask (64 x 64, bool and bf16) with keys and values expanded to the 4 query heads; the decode steps and the
    lm_head phase are as with a dynamic cache."""
    eager, static = Work("generate", 64, 1), Work("generate", 64, 1, static_cache=True)
    fp = footprint()
    mask, expanded = 64 * 64 * 3, 2 * 64 * 4 * 16 * 2
    a, b = work_phases(fp, eager), work_phases(fp, static)
    assert b["prefill"]["activations"] - a["prefill"]["activations"] == mask + expanded
    assert b["lm_head"] == a["lm_head"] and b["prefill"]["kv"] == a["prefill"]["kv"]


def test_graph_decode_plans_for_its_static_cache():
    """At the budget an eager plan just fits, decode="graph" (the static cache's prefill mask) streams more."""
    fp = footprint()

    def plan(budget, **options):
        return plan_offload(OffloadConfig(offload="auto", max_memory=budget, max_context=1024, **options), fp, CPU)

    eager = plan("3GiB")
    assert not eager.offloaded and not eager.work.static_cache
    whole = plan(str(eager.peak_bytes))
    graph = plan(str(eager.peak_bytes), decode="graph")
    assert not whole.offloaded and graph.work.static_cache
    assert len(graph.offloaded) > 0 and graph.peak_bytes <= eager.peak_bytes


def test_the_fewest_layers_that_fit_are_streamed():
    """Stream mode with k of the layers 2..8 offloaded (prefetch 1: a ring of 2 slots) holds
    (700 - 50k) MiB of weights and a (2 x 50 + k x 1) MiB ring: k=3 needs 653 MiB, k=4 604 MiB."""
    fp = footprint()
    w = work_bytes(fp)
    assert w < 6 * MIB  # what the sums below leave for the work
    plan = plan_offload(auto("610MiB"), fp, CPU)
    assert (plan.mode, plan.offloaded) == ("stream", (2, 4, 6, 8))  # spread over 2..8
    assert plan.breakdown["weights"] == plan.standby_bytes == 500 * MIB
    assert plan.breakdown["ring"] == 104 * MIB
    assert plan.breakdown["cuda_runtime"] == plan.breakdown["allocator_slack"] == plan.breakdown["workspace"] == 0
    assert plan.peak_bytes == sum(plan.breakdown.values()) == 604 * MIB + w
    assert (plan.budget_bytes, plan.left_bytes) == (610 * MIB, 6 * MIB - w)
    assert (plan.offloaded_bytes, plan.host_bytes, plan.disk_bytes) == (200 * MIB, 200 * MIB, 0)
    assert (plan.bandwidth_gbps, plan.decode_tok_s) == (None, None)  # no link to the CPU: no speed predicted


def test_a_model_that_fits_stays_whole_in_session_mode():
    fp = footprint()
    plan = plan_offload(auto("1GiB"), fp, CPU)
    assert (plan.mode, plan.offloaded, plan.peak_bytes) == ("session", (), 700 * MIB + work_bytes(fp))


def test_the_disk_tier_needs_host_memory_for_staging_only():
    plan = plan_offload(auto("610MiB", tier="disk"), footprint(), CPU)
    assert (plan.host_bytes, plan.disk_bytes) == (2 * 50 * MIB, 200 * MIB)  # two staging slots, four layer files


def test_more_prefetch_costs_a_slot_each():
    # prefetch 2: a ring of 3 slots; k=5 needs 450 + 155 = 605 MiB, k=4 654 MiB
    plan = plan_offload(auto("610MiB", prefetch=2), footprint(), CPU)
    assert (len(plan.offloaded), plan.breakdown["ring"]) == (5, 155 * MIB)


def test_the_protected_ends_are_given_up_before_nothing_fits():
    """Streaming all of 2..8 needs 350 + 107 MiB; over every layer, k=11 needs 150 + 111 MiB, k=10 310 MiB."""
    plan = plan_offload(auto("300MiB"), footprint(), CPU)
    assert plan.offloaded == spread(11, 0, LAYERS - 1) and 0 in plan.offloaded
    assert any("protect_first" in note for note in plan.notes)


def test_nothing_fits_names_the_least_it_needs():
    fp = footprint()
    with pytest.raises(BudgetError) as info:
        plan_offload(auto("200MiB"), fp, CPU)
    # the least: every layer streamed, 100 MiB of weights and a 2 x 50 + 12 MiB ring
    assert info.value.min_bytes == 212 * MIB + work_bytes(fp)
    assert info.value.smallest.offloaded == tuple(range(LAYERS))
    assert isinstance(info.value, OffloadSpecError)


@pytest.mark.parametrize(
    "k,lo,hi,expected",
    [(16, 2, 32, tuple(range(2, 33, 2))), (1, 2, 8, (5,)), (0, 2, 8, ()), (2, 0, 9, (0, 9)), (3, 0, 0, None)],
)
def test_spread(k, lo, hi, expected):
    if expected is None:
        with pytest.raises(OffloadSpecError):
            spread(k, lo, hi)
    else:
        assert spread(k, lo, hi) == expected


@pytest.mark.parametrize("layers,text", [((0, 1, 2, 5, 7, 8), "0-2,5,7-8"), ((), "none"), ((9, 3), "3,9")])
def test_compact(layers, text):
    assert compact(layers) == text


def test_device_budgets():
    assert device_budgets((("main", 5),), CPU) == (5, None)
    assert device_budgets(((0, 5), ("cpu", 9)), torch.device("cuda", 0)) == (5, 9)
    for bad in ((("main", 5), (0, 6)), ((1, 5),), ((0, 5), (1, 5))):
        with pytest.raises(OffloadSpecError):
            device_budgets(bad, torch.device("cuda", 0))


def test_checkpoint_dtype_reads_dtype_not_the_deprecated_torch_dtype():
    """A config without a dtype (a shape, a config made in code) gives None without touching
    ``torch_dtype``, which transformers 5 answers with a deprecation warning."""
    from transformers import LlamaConfig

    from lp_plugin.planning.footprint import checkpoint_dtype

    class Config:
        dtype = None

        @property
        def torch_dtype(self):
            raise AssertionError("torch_dtype read although the config has dtype")

    assert checkpoint_dtype(Config(), {}) is None
    assert checkpoint_dtype(LlamaConfig(dtype="bfloat16"), {}) is torch.bfloat16
    assert checkpoint_dtype(LlamaConfig(dtype="bfloat16"), {"dtype": torch.float16}) is torch.float16
