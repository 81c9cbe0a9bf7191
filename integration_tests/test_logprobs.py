"""lm-eval scoring without full-vocabulary logits (``lp_plugin.core.logprobs`` and the ``hf-residual-offload``
request path): the head chunk by chunk against one full product, and the model type against lm-eval's own
``HFLM`` on the same requests (shared contexts, one-token continuation cache, truncation, rolling windows,
batches, ``batch_size=auto``, prefill chunks)."""

from __future__ import annotations

import math

import lm_eval_fixtures as fx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lp_plugin.core import logprobs
from lp_plugin.errors import OffloadSpecError


# ---------------------------------------------------------------------------------------- the head alone
@pytest.mark.parametrize("positions", [1, 63, 64, 65, 300, 1000])
def test_score_in_chunks_equals_one_full_product(positions):
    g = torch.Generator().manual_seed(positions)
    head = logprobs.Head(nn.Linear(32, 5000, bias=False))
    hidden = torch.randn(1000, 32, generator=g)
    index = torch.randperm(1000, generator=g)[:positions]
    targets = torch.randint(0, 5000, (positions, 3), generator=g)
    full = F.log_softmax(head(hidden), dim=-1)[index]
    cap = 64 * 5000 * 8  # 64 rows a chunk: several chunks, the last one filled up
    values, greedy = logprobs.score(head, hidden, index, targets, cap=cap)
    assert torch.equal(values, full.gather(1, targets)) and torch.equal(greedy, full.argmax(dim=-1))


def test_head_applies_the_architectures_transforms():
    lin = nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    capped = logprobs.Head(lin, softcap=30.0)
    assert torch.equal(capped(x), torch.tanh(lin(x) / 30.0) * 30.0)
    assert torch.equal(logprobs.Head(lin, divide=4.0)(x), lin(x) / 4.0)


def test_a_model_without_a_head_is_refused():
    with pytest.raises(OffloadSpecError):
        logprobs.head_of(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- against HFLM
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fx.build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")


def _requests():
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, (ctx, cont), i)
            for i, (ctx, cont) in enumerate((c, k) for c in ("The quick brown fox", "Hello world, this is", "A" * 400 + " end")
                                            for k in (" jumps", " over the lazy dog", " x", " y", " z"))]
    rolling = [Instance("loglikelihood_rolling", {}, ("word " * n,), i) for i, n in enumerate((5, 150, 400))]
    return reqs, rolling


def _run(cls, path, **kwargs):
    model = cls(pretrained=path, device="cpu", batch_size=kwargs.pop("batch_size", 1), **kwargs)
    reqs, rolling = _requests()
    return model.loglikelihood(reqs), model.loglikelihood_rolling(rolling)


@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
@pytest.mark.parametrize("options", [dict(offload="even"), dict(offload="all", mode="stream", protect_first=0, protect_last=0),
                                     dict(offload="even", logits_cache=False), dict(offload="even", full_logits=True)])
def test_scores_equal_hflm_bit_for_bit(tiny, batch_size, options):
    from lm_eval.models.huggingface import HFLM

    from lp_plugin.integrations.lm_eval_model import ResidualOffloadLM

    hf_options = {"logits_cache": options["logits_cache"]} if "logits_cache" in options else {}
    assert _run(ResidualOffloadLM, tiny, batch_size=batch_size, **options) == _run(HFLM, tiny, batch_size=batch_size,
                                                                                   **hf_options)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefill_chunks_stay_within_1e_6(tiny, batch_size):
    from lm_eval.models.huggingface import HFLM

    from lp_plugin.integrations.lm_eval_model import ResidualOffloadLM

    (ll, rolling) = _run(ResidualOffloadLM, tiny, offload="even", prefill_chunk=16, batch_size=batch_size)
    ref_ll, ref_rolling = _run(HFLM, tiny, batch_size=batch_size)
    for (a, greedy_a), (b, greedy_b) in zip(ll, ref_ll):
        assert math.isclose(a, b, rel_tol=1e-6) and greedy_a == greedy_b
    for a, b in zip(rolling, ref_rolling):
        assert math.isclose(a, b, rel_tol=1e-6)


@pytest.mark.parametrize("args", [dict(prefill_chunk=0), dict(prefill_chunk="abc"), dict(prefill_chunk=16, full_logits=True),
                                  dict(full_logits="maybe")])
def test_bad_scoring_args_are_refused_before_loading(tiny, args):
    from lp_plugin.integrations.lm_eval_model import ResidualOffloadLM

    with pytest.raises(OffloadSpecError):
        ResidualOffloadLM(pretrained="/nonexistent/never-read", device="cpu", offload="even", **args)


@pytest.mark.parametrize("args,length,source", [(dict(max_context=64), 64, "given"),
                                                (dict(max_length=100), 100, "given"),
                                                (dict(), 128, "the model's")])
def test_the_plan_sets_lm_evals_max_length(tiny, args, length, source):
    """offload=auto plans for lm-eval's max_length, or sets it: to max_context, or to the model's own (which
    fits this card) when neither is given."""
    from lp_plugin.integrations.lm_eval_model import ResidualOffloadLM

    model = ResidualOffloadLM(pretrained=tiny, device="cpu", offload="auto", **args)
    assert model.max_length == length and model._lp_length_source == source
    info = model.residual_offload_info()
    assert info["max_length"] == length and info["max_length_source"] == source


# ---------------------------------------------------------------------------------------- prefill chunks
def _tiny_sdpa(arch):
    from shapes import build_tiny

    model = build_tiny(arch)
    model.config._attn_implementation = "sdpa"  # as from_pretrained loads it
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,kv_len", [(5, 37), (37, 37), (64, 200), (1, 20)])
def test_lower_right_attention_equals_sdpa_with_a_mask(dtype, q_len, kv_len):
    """The chunk attention (keys and values as cached, no mask built) against transformers' SDPA path with
    the lower-right causal mask it builds for a chunk after cached tokens (keys and values expanded): bit
    for bit on the CPU for chunks; one query (transformers packs its heads) within rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lp_plugin.core import chunk_attention

    module = _tiny_sdpa("qwen2").model.layers[0].self_attn  # 4 query heads, 2 KV heads
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 4, q_len, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, kv_len, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).expand(2, 1, q_len, kv_len)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    out, weights = chunk_attention.attention_forward(module, q, k, v, None, scaling=module.scaling)
    assert out.shape == (2, q_len, 4, 16) and weights is None
    if q_len > 1:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError):
        chunk_attention.attention_forward(module, q, k, v, mask, scaling=module.scaling)


def test_chunks_run_through_the_chunk_attention_and_restore_the_config():
    """Each chunk's forward (and only it) runs with the chunk attention, its mask interface building nothing;
    the config is the model's own again after the chunks, and after a chunk that raised."""
    from lp_plugin.core import chunk_attention

    model = _tiny_sdpa("qwen2")
    decoder = logprobs.decoder_of(model)
    seen = []
    decoder.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((m.config._attn_implementation, kwargs["attention_mask"])), with_kwargs=True)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        starts = [start for start, _ in logprobs.hidden_chunks(decoder, ids, 16, lower_right=True)]
    assert starts == [0, 16, 32] and seen == [(chunk_attention.NAME, None)] * 3
    assert model.config._attn_implementation == "sdpa"
    bad = ids.clone()
    bad[0, 20] = 256  # outside the vocabulary: the second chunk's embedding raises
    with pytest.raises(IndexError), torch.no_grad():
        list(logprobs.hidden_chunks(decoder, bad, 16, lower_right=True))
    assert model.config._attn_implementation == "sdpa"
    assert not chunk_attention.applies(decoder, ids.device)  # the CPU keeps the model's own attention


def test_which_configs_chunks_attend_lower_right():
    from shapes import tiny_config

    from lp_plugin.core.chunk_attention import config_supports

    assert config_supports(tiny_config("qwen2")) and config_supports(tiny_config("llama"))
    assert not config_supports(tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0))
    assert not config_supports(tiny_config("llama", attn_logit_softcapping=50.0))
    eager = tiny_config("llama")
    eager._attn_implementation = "eager"
    assert not config_supports(eager)


@pytest.mark.parametrize("lower_right", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_score_window_in_prefill_chunks_equals_the_whole_window(arch, lower_right):
    """score_window over chunks of 16 tokens through the KV cache (the model's own attention, or the chunk
    attention) against the whole window: the same greedy tokens, values within 1e-6 (bit for bit with this
    CPU build; the head's products over fewer rows may round differently elsewhere)."""
    model = _tiny_sdpa(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 50), generator=g)
    rows = torch.randperm(150, generator=g)[:70]
    targets = torch.randint(0, 256, (70, 2), generator=g)
    with torch.no_grad():
        whole = logprobs.score_window(model, ids, rows, targets)
        chunked = logprobs.score_window(model, ids, rows, targets, prefill_chunk=16, lower_right=lower_right)
    assert torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
