"""Prefill MLPs in chunks of positions (lp_plugin/core/mlp_chunks.py): which MLPs qualify, the wrapper's
outputs against the whole MLP's, where the planner chooses it (from a config: a CUDA card, generate only), and
the engine putting it in and taking it out."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from shapes import ARCHS, build_tiny

import lp_plugin
from lp_plugin.core.mlp_chunks import MIN_MLP_CHUNK, MlpChunks, dense_mlp
from lp_plugin.planning.config import OffloadConfig
from lp_plugin.planning.plan import OffloadPlan, fit_budget
from lp_plugin.tools.shapes import shape_config

GIB = 2**30


# ------------------------------------------------------------------------------------------------ which MLPs
@pytest.mark.parametrize("arch", ARCHS)
def test_a_decoder_layers_dense_mlp_qualifies(arch):
    layer = build_tiny(arch).model.layers[0]
    assert dense_mlp(layer) is layer.mlp


def test_mlps_with_experts_a_router_or_loose_weights_do_not():
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(4, 2)
            self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))

    for mlp in (Routed(), Scaled(), nn.GELU()):
        layer = nn.Module()
        layer.mlp = mlp
        assert dense_mlp(layer) is None
    assert dense_mlp(nn.Linear(4, 4)) is None  # no .mlp at all


# ------------------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_mlp_returns_the_whole_mlps_rows(arch):
    torch.manual_seed(0)
    mlp = build_tiny(arch).model.layers[0].mlp.float()
    x = torch.randn(2, 41, mlp.gate_proj.in_features)  # 41: the last chunk is short
    with torch.no_grad():
        whole = mlp(x)
        chunks = MlpChunks([mlp], 16)
        chunks.install()
        got = mlp(x)
    assert chunks.calls == 1
    assert got.shape == whole.shape and got.dtype == whole.dtype
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
    chunks.remove()
    assert "forward" not in mlp.__dict__


def test_short_calls_and_other_signatures_pass_through():
    mlp = build_tiny("llama").model.layers[0].mlp
    chunks = MlpChunks([mlp], 8)
    chunks.install()
    hidden = mlp.gate_proj.in_features
    with torch.no_grad():
        mlp(torch.randn(1, 8, hidden))  # not more than a chunk
        mlp(torch.randn(8, hidden))  # not [batch, positions, hidden]
        mlp(x=torch.randn(1, 20, hidden))  # a keyword call is the MLP's own business
    assert chunks.calls == 0
    chunks.remove()


def test_gradients_flow_through_the_chunks():
    torch.manual_seed(0)
    mlp = build_tiny("qwen2").model.layers[0].mlp.float()
    x = torch.randn(1, 20, mlp.gate_proj.in_features, requires_grad=True)
    mlp(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    chunks = MlpChunks([mlp], 6)
    chunks.install()
    mlp(x).sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
    chunks.remove()


def test_remove_gives_back_a_forward_the_module_had_of_its_own():
    mlp = build_tiny("llama").model.layers[0].mlp
    own = mlp.forward
    mlp.forward = own  # an instance attribute, as Accelerate's hooks leave one
    chunks = MlpChunks([mlp], 4)
    chunks.install()
    assert mlp.forward is not own
    chunks.remove()
    assert mlp.__dict__["forward"] is own


def test_a_chunk_must_be_a_positive_number_of_positions():
    with pytest.raises(ValueError):
        MlpChunks([], 0)


# ------------------------------------------------------------------------------------------------ the planner
def _plan(card: str, context: int, **options):
    """The budget plan of the Qwen2.5-3B shape in NF4 for a CUDA card, from its config (no GPU needed)."""
    config = OffloadConfig(offload="auto", max_memory={0: card}, max_context=context, main_device="cuda:0", **options)
    return fit_budget(shape_config("qwen2.5-3b-shape"), config, weights="nf4", bandwidth=54.0)


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_a_card_that_fits_only_with_chunked_mlps_gets_them(decode):
    """The Qwen2.5-3B shape in NF4 on a 2.5 GiB card at 12288 tokens: the whole prefill's MLPs do not fit, chunks of
    them do; at 8192 tokens the whole prefill fits and gets none."""
    plan = _plan("2.5GiB", 12288, decode=decode)
    assert plan.mlp_chunk is not None and plan.mlp_chunk >= MIN_MLP_CHUNK
    assert plan.prefill_chunk is None and plan.peak_bytes <= 2.5 * GIB
    assert any("MLPs run" in note for note in plan.notes)
    assert "prefill MLPs in chunks of" in str(plan)
    assert plan.summary()["mlp_chunk"] == plan.mlp_chunk
    assert _plan("2.5GiB", 8192, decode=decode).mlp_chunk is None


def test_chunked_mlps_need_less_than_the_whole_prefill():
    from lp_plugin.planning.footprint import Work, from_config, work_peak

    fp = from_config(shape_config("qwen2.5-3b-shape"), "nf4")
    work = Work("generate", 8192, 1)
    whole = sum(work_peak(fp, work, cuda=True)[1].values())
    halves = [sum(work_peak(fp, work, cuda=True, mlp_chunk=c)[1].values()) for c in (4096, 2048, 1024)]
    assert whole > halves[0] > halves[1] > halves[2]
    assert fp.mlp_chunks


def test_no_chunked_mlps_off_cuda_without_dense_mlps_or_for_scoring():
    from lp_plugin.planning.budget import _chunks
    from lp_plugin.planning.footprint import Work, from_config

    fp = from_config(shape_config("qwen2.5-3b-shape"), "nf4")
    work = Work("generate", 8192, 1)
    # (prefill chunk, MLP chunk) pairs: generate work chunks its prefill's MLPs only
    assert _chunks(work, fp, cuda=True) == [(None, None), (None, 4096), (None, 2048), (None, 1024)]
    assert _chunks(work, fp, cuda=False) == [(None, None)]  # measured bit for bit on CUDA only
    assert _chunks(work, dataclasses.replace(fp, mlp_chunks=False), cuda=True) == [(None, None)]
    assert _chunks(Work("generate", MIN_MLP_CHUNK, 1), fp, cuda=True) == [(None, None)]
    scoring = _plan("3GiB", 32768, work="loglikelihood")
    assert scoring.mlp_chunk is None and scoring.prefill_chunk is not None


# ------------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("arch", ARCHS)
def test_the_engine_puts_the_plans_chunks_in_and_takes_them_out(arch):
    model, plain = build_tiny(arch), build_tiny(arch)
    plan = OffloadPlan.for_model(model, OffloadConfig(offload="auto", max_memory="1GiB", max_context=64))
    plan = dataclasses.replace(plan, budget=dataclasses.replace(plan.budget, mlp_chunk=8))
    handle = lp_plugin.attach(model, plan=plan)
    assert handle.mlp_chunks is not None and len(handle.mlp_chunks.mlps) == len(model.model.layers)
    assert "MLPs in chunks of 8 positions" in handle.summary()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert handle.mlp_chunks.calls == len(model.model.layers)
    handle.detach()
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_mlps_equal_the_whole_on_cuda(dtype):
    """Bit for bit on the GPU at the shapes the planner offers (chunks of 1024 positions and more)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    cfg = shape_config("qwen2.5-3b-shape")

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            h, i = cfg.hidden_size, cfg.intermediate_size
            self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
            self.down_proj = nn.Linear(i, h, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    mlp = Mlp().to("cuda", dtype)
    x = torch.randn(1, 4096, cfg.hidden_size, device="cuda", dtype=dtype)
    with torch.no_grad():
        whole = mlp(x)
        chunks = MlpChunks([mlp], MIN_MLP_CHUNK)
        chunks.install()
        assert torch.equal(mlp(x), whole)
        chunks.remove()
