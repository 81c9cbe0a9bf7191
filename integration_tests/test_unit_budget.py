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


def test_a_static_cache_prefill_counts_a_mask_and_expanded_keys_only_for_several_sequences():
    """decode="graph" generates with a static cache. One sequence's prefill attends causally to the keys cut to the
    prompt (no mask, nothing expanded), as a dynamic cache's; two sequences' attends to the cache's whole length
    through a mask (64 x 64 per sequence, bool and bf16) with keys and values expanded to the 4 query heads."""
    fp = footprint()
    one = work_phases(fp, Work("generate", 64, 1)), work_phases(fp, Work("generate", 64, 1, static_cache=True))
    assert one[0]["prefill"] == one[1]["prefill"] and one[0]["lm_head"] == one[1]["lm_head"]
    two = work_phases(fp, Work("generate", 64, 2)), work_phases(fp, Work("generate", 64, 2, static_cache=True))
    mask, expanded = 2 * 64 * 64 * 3, 2 * 2 * 64 * 4 * 16 * 2
    assert two[1]["prefill"]["activations"] - two[0]["prefill"]["activations"] == mask + expanded
    assert two[1]["lm_head"] == two[0]["lm_head"] and two[1]["prefill"]["kv"] == two[0]["prefill"]["kv"]


@pytest.mark.parametrize("expands", [True, False])
def test_a_decode_step_counts_its_attention_over_the_full_cache(monkeypatch, expands):
    """A dynamic cache's decode step holds a layer's keys and values twice as they grow (2 x 2 kv heads x 16 dims
    x 64 tokens x 2 bytes); a static cache's, or a padded batch's, reads them through a 64-token mask (bool and
    bf16), and where the installed transformers expands masked keys and values, both at the 4 query heads. A static
    cache's step (a captured graph's) also counts one of the prefill's largest blocks, kept apart from the graph's
    pool."""
    from lp_plugin.planning import footprint as fp_module

    monkeypatch.setattr(fp_module, "sdpa_expands_masked_decode", lambda: expands)
    fp = footprint()
    dynamic = work_phases(fp, Work("generate", 64, 1))["decode"]
    static = work_phases(fp, Work("generate", 64, 1, static_cache=True))["decode"]
    assert dynamic == {"kv": kv_bytes(fp, 64, 1), "activations": 2 * 2 * 16 * 64 * 2, "logits": 1000 * 6}
    pool_apart = 64 * 128 * 2  # beside the graph's pool: one of the prefill's MLP intermediates (64 x 128 x 2 bytes)
    attention = 2 * 4 * 16 * 64 * 2 + 64 * 3 if expands else dynamic["activations"]
    assert static == {**dynamic, "activations": attention + pool_apart}
    padded = work_phases(fp, Work("generate", 64, 3))["decode"]  # three sequences: a padding mask
    assert padded["activations"] == 3 * attention
    windowed = footprint(kv_windows=(8,) * LAYERS)  # every layer keeps 8 tokens: the step reads 8
    assert work_phases(windowed, Work("generate", 64, 1))["decode"]["activations"] == 2 * 2 * 16 * 8 * 2


def test_sdpa_expands_masked_decode_says_what_the_installed_transformers_does(monkeypatch):
    """A masked one-token query through transformers' own SDPA attention: repeat_kv is called exactly where
    sdpa_expands_masked_decode says so, and the output is the same either way."""
    from transformers.integrations import sdpa_attention

    from lp_plugin.planning.footprint import sdpa_expands_masked_decode

    calls = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: calls.append(n) or original(x, n))

    class Attention(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 8, generator=g) for heads, length in ((4, 1), (2, 6), (2, 6)))
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    mask[..., 4:] = False
    out, _ = sdpa_attention.sdpa_attention_forward(Attention(), q, k, v, mask)
    assert bool(calls) == sdpa_expands_masked_decode()
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, original(k, 2), original(v, 2), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)


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
