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
