"""Layer skipping: importance metrics on models whose answer is known, closed-form stand-ins on data
they can fit exactly, the calibration/held-out split, caching, policies through attach, plugins and
the stock lm_eval CLI, and bad specs. Tiny models, token-id calibration: every case runs in seconds."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from shapes import build_tiny

import lp_plugin
from lp_plugin.errors import AttachError, OffloadSpecError
from lp_plugin.hookspecs import hookimpl
from lp_plugin.planning import plugins
from lp_plugin.planning.arch import find_decoder_layers
from lp_plugin.planning.skipping import cache, calib, metrics, standins
from lp_plugin.planning.skipping.runner import low_precision_copy
from lp_plugin.planning.skipping.spec import StandInSpec

IDENTITY = (3, 4)  # layers of the hand-built model whose output is exactly their input


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


def _ids(n=512, seed=0, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _identity_layers(model, layers=IDENTITY):
    """Zero the attention output and MLP down projections: the layer adds nothing to its input."""
    _, layer_list = find_decoder_layers(model)
    with torch.no_grad():
        for i in layers:
            layer_list[i].self_attn.o_proj.weight.zero_()
            layer_list[i].mlp.down_proj.weight.zero_()
    return model


@pytest.fixture
def known():
    """A tiny Llama (weights large enough that every real layer matters) with layers 3 and 4 identities."""
    return _identity_layers(build_tiny("llama", initializer_range=0.2))


@pytest.fixture(scope="module")
def sampled():
    """Calibration tokens for :func:`known` (sampled from it)."""
    return _sampled(_identity_layers(build_tiny("llama", initializer_range=0.2)))


@torch.no_grad()
def _sampled(model, windows=2, seed=0):
    """Token ids sampled from ``model`` itself, one window per context, each after the document-start
    token: on them the model's own distribution is the truth, so taking a real layer away raises the
    perplexity and taking an identity layer away leaves it as it is."""
    torch.manual_seed(seed)
    length = model.config.max_position_embeddings
    start = torch.full((windows, 1), calib.doc_start_token(model))
    out = model.generate(start, do_sample=True, top_k=0, max_new_tokens=length, min_new_tokens=length,
                         pad_token_id=start[0, 0].item())
    return out[:, 1:].flatten().tolist()


class LinearLayer(nn.Module):
    """A decoder layer that really is linear: ``x + x A^T + b``."""

    def __init__(self, hidden, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(0.3 * torch.randn(hidden, hidden, generator=g) / hidden ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(hidden, generator=g))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + nn.functional.linear(hidden_states, self.a, self.b)


# ------------------------------------------------------------------------------------- metrics
def test_metrics_find_the_identity_layers(known, sampled, monkeypatch):
    monkeypatch.setattr(metrics, "GREEDY_DTYPE", None)  # greedy in float32: an identity layer moves nothing at all
    ids = sampled
    bi = lp_plugin.importance(known, ids, "bi")
    assert set(bi.order[:2]) == set(IDENTITY) and max(bi.scores[i] for i in IDENTITY) < 1e-6
    assert min(s for i, s in enumerate(bi.scores) if i not in IDENTITY) > 1e-3
    angular = lp_plugin.importance(known, ids, "angular", n=2)
    assert angular.order[0] == IDENTITY[0] and angular.scores[IDENTITY[0]] < 1e-3
    assert len(angular.scores) == 7  # block starts 0..6 of an 8-layer model
    base = math.exp(metrics.SkipContext(known, ids).runner.nll())
    ppl = lp_plugin.importance(known, ids, "ppl")
    assert set(ppl.order[:2]) == set(IDENTITY)
    assert all(ppl.scores[i] == pytest.approx(base, rel=1e-6) for i in IDENTITY)
    greedy = lp_plugin.importance(known, ids, "greedy", steps=3)
    assert set(greedy.order[:2]) == set(IDENTITY) and len(greedy.order) == 3
    assert greedy.scores[greedy.order[1]] == pytest.approx(0, abs=1e-5)  # KL from the plain model: none
    assert sum(s is None for s in greedy.scores) == 5


@pytest.mark.parametrize("skip,layers", [("bi:2", IDENTITY), ("ppl:2", IDENTITY), ("greedy:2", IDENTITY),
                                         ("angular:2", IDENTITY), ("greedy:25%", IDENTITY), ("3-4", IDENTITY),
                                         ("bi:0", ())])
def test_policies_through_attach_skip_the_identity_layers_exactly(known, sampled, skip, layers):
    x = torch.tensor([_ids(48, seed=1)])
    ref = known(x).logits
    handle = lp_plugin.attach(known, offload="even", skip=skip, calib=sampled)
    assert handle.info()["skipped_layers"] == list(layers)
    assert torch.equal(known(x).logits, ref)  # identity layers: skipping them changes nothing
    first = str(handle).splitlines()[0]
    # print(handle) calls a model exact only when no layer is skipped (here the skipped ones happen to be identities)
    assert first.endswith("(exact)") == (not layers) and (f"{len(layers)} layers skipped" in first) == bool(layers)
    handle.detach()


# ------------------------------------------------------------------------------------- fitting
def _linear_data(hidden=16, windows=6, tokens=40, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    if rank is not None:
        a = torch.randn(hidden, rank, generator=g) @ torch.randn(rank, hidden, generator=g) / hidden ** 0.5
    b = torch.randn(hidden, generator=g)
    xs = [torch.randn(tokens, hidden, generator=g) * (1 + torch.rand(tokens, 1, generator=g)) for _ in range(windows)]
    return a, b, xs, [x + x @ a.T + b for x in xs]


@pytest.mark.parametrize("spec,rank", [(StandInSpec("linear"), None), (StandInSpec("linear", 3), 3)])
def test_linear_fit_recovers_a_linear_map(spec, rank):
    a, b, xs, ts = _linear_data(rank=rank)
    tensors, details = standins.fit(spec, xs, ts)
    module = standins.build(spec, {k: v.float() for k, v in tensors.items()})
    weight = tensors["weight"] if rank is None else tensors["up"] @ tensors["down"]
    assert torch.allclose(weight.float(), a, atol=1e-3) and torch.allclose(tensors["bias"].float(), b, atol=1e-3)
    assert details["explained"] > 0.999999 and details["ridge_median"] == standins.RIDGE_GRID[0]
    x = torch.randn(5, 16)
    assert torch.allclose(module(x), x + x @ a.T + b, atol=1e-3)


@pytest.mark.parametrize("spec", [StandInSpec("linear"), StandInSpec("linear", 3), StandInSpec("mean")])
def test_float32_sums_fit_as_float64_with_a_fixed_ridge(spec):
    """Greedy's candidates: a fixed ridge strength of 0.1 keeps the system well conditioned, so
    float32 sums per window give the float64 fit (a map with a few huge-norm inputs, as hidden states have)."""
    a, b, xs, ts = _linear_data(windows=4, tokens=256)
    xs = [torch.cat([x[:2] * 300, x[2:]]) for x in xs]
    ts = [x + x @ a.T + b for x in xs]
    exact, _ = standins.fit(spec, xs, ts, alpha=0.1)
    fast, _ = standins.fit(spec, xs, ts, alpha=0.1, dtype=torch.float32)
    assert exact.keys() == fast.keys() and all(v.dtype == torch.float64 for v in fast.values())
    assert all(torch.allclose(fast[k], exact[k], rtol=1e-4, atol=1e-5 * exact[k].abs().max()) for k in exact)


def test_held_out_errors_fit_on_the_other_folds_and_score_each_fold():
    """Each fold's windows are scored by a fit on the other folds' windows (here: 3 folds of 2 windows)."""
    a, b, xs, ts = _linear_data(windows=6)
    ts = [t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(ts)]
    stats = [standins.Stats.of(x, t) for x, t in zip(xs, ts)]
    fold_of = [0, 1, 2, 0, 1, 2]
    grid = (1e-3, 10.0)
    got = standins.held_out_errors(stats, fold_of, grid)
    want = torch.zeros(len(grid), 16, dtype=torch.float64)
    for k in range(3):
        train, test = [s for i, s in enumerate(stats) if i % 3 != k], [s for i, s in enumerate(stats) if i % 3 == k]
        train, test = sum(train[1:], train[0]), sum(test[1:], test[0])
        for j, alpha in enumerate(grid):
            want[j] += test.errors(train.solve(alpha))
    assert got.shape == (2, 16) and torch.allclose(got, want)
    assert bool((got[0] < got[1]).all())  # a weak ridge predicts held-out windows of a truly linear map better


def test_mean_fit_is_the_mean_update():
    xs = [torch.randn(30, 8) for _ in range(3)]
    shift = torch.arange(8.0)
    tensors, _ = standins.fit(StandInSpec("mean"), xs, [x + shift for x in xs])
    assert torch.allclose(tensors["bias"].float(), shift, atol=1e-6)


@pytest.mark.parametrize("layers", [(5,), (2, 5)])
def test_a_really_linear_layer_is_recovered_through_attach(layers):
    model = build_tiny("llama", initializer_range=0.2)
    _, layer_list = find_decoder_layers(model)
    layer_list[5] = LinearLayer(model.config.hidden_size)
    if 2 in layers:
        _identity_layers(model, (2,))
    x = torch.tensor([_ids(48, seed=1)])
    ref = model(x).logits
    handle = lp_plugin.attach(model, offload="even", mode="stream", skip=",".join(map(str, layers)), stand_in="linear",
                              calib=_ids())
    assert handle.info()["stand_ins"] == {str(i): "LinearStandIn" for i in layers}
    assert handle.info()["offloaded_layers"] == [i for i in (2, 4) if i not in layers]  # skipped: never offloaded
    out = model(x).logits
    handle.detach()
    assert torch.allclose(out, ref, atol=2e-4), (out - ref).abs().max()


# --------------------------------------------------------------------------- calibration split
@pytest.fixture(scope="module")
def tokenizer():
    from lm_eval_fixtures import tokenizer_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_calibration_and_heldout_text_never_overlap(tokenizer):
    text = calib.pydoc_text()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = enc["input_ids"], enc["offset_mapping"]
    start, end = calib.HELDOUT
    pool_end = calib.HELD_OUT_POOL[1]  # pydoc-b, [8192, 12288), is held out too
    assert calib.pydoc_calibration_ids(tokenizer) == ids[:start]
    assert calib.pydoc_calibration_ids(tokenizer, 6000) == ids[:start] + ids[pool_end:pool_end + 6000 - start]
    docs = calib.heldout_documents(tokenizer)
    assert len(docs) == (end - start) // calib.WINDOW
    held_chars = (spans[start][0], spans[pool_end - 1][1])
    calib_chars = [(spans[0][0], spans[start - 1][1]), (spans[pool_end][0], spans[pool_end + 2000][1])]
    assert all(b <= held_chars[0] or a >= held_chars[1] for a, b in calib_chars)  # disjoint character ranges
    assert "".join(docs) == tokenizer.decode(ids[start:end])  # the documents are exactly that text
    with pytest.raises(OffloadSpecError, match=r"must lie inside \[4096, 12288\), the range calibration never reads"):
        calib.heldout_documents(tokenizer, 0, 4096)
    with pytest.raises(OffloadSpecError, match="more tokens than the pydoc text has outside the held-out range"):
        calib.pydoc_calibration_ids(tokenizer, 10**8)


def test_mixed_calibration_deals_domains_and_reads_no_held_out_slice(tokenizer):
    from lp_plugin.planning.skipping import domains

    pydoc = domains.ids(tokenizer, "pydoc")
    lo, hi = domains.RESERVED["pydoc"]
    assert (lo, hi) == (domains.SLICES["pydoc-a"].start, domains.SLICES["pydoc-b"].end)
    assert domains.calibration_pool(tokenizer, "pydoc") == pydoc[:lo] + pydoc[hi:]
    mix = domains.mix_ids(tokenizer, 5 * 512)
    pieces = [mix[i:i + 512] for i in range(0, len(mix), 512)]
    news, code = domains.ids(tokenizer, "news"), domains.ids(tokenizer, "code")
    assert pieces == [pydoc[:512], news[:512], code[:512], pydoc[512:1024], news[512:1024]]
    assert {s.domain for s in domains.EVAL_SLICES if s.kind == "other"}.isdisjoint(domains.MIX_DOMAINS)
    with pytest.raises(OffloadSpecError, match="more tokens than its domains hold"):
        domains.mix_ids(tokenizer, 10**9)


def test_a_domain_this_python_lacks_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from lp_plugin.planning.skipping import domains
    from lp_plugin.tools.prune import cli

    monkeypatch.setattr(domains, "_stdlib", lambda: str(tmp_path / "no-stdlib"))
    domains.text.cache_clear()
    try:
        for name in ("code", "docstrings"):
            with pytest.raises(domains.MissingDomain) as err:
                domains.text(name)
            assert isinstance(err.value, OffloadSpecError)
        # the texts distributions leave out of their Python ship with lp_plugin: the default calibration's
        # domains but code, and the license slice, read the same text without the standard library
        assert "IDLE" in domains.text("news") and "PSF" in domains.text("license")
        domains.text.cache_clear()
        monkeypatch.setattr(domains, "_TEXTS", str(tmp_path / "no-texts"))  # a broken install: a clear error too
        with pytest.raises(domains.MissingDomain):
            domains.text("news")
        with pytest.raises(OffloadSpecError):
            domains.text("nosuch")
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text("{}")
        assert cli.main(["--model", str(model), "--out", str(tmp_path / "out"), "--domains", "pydoc-a,docstrings",
                         "--no-plot"]) == 2
        assert "docstrings" in capsys.readouterr().err and not (tmp_path / "out.json").exists()
    finally:
        domains.text.cache_clear()


@pytest.mark.parametrize("spec", ["pydoc:0", "pydoc:1"])
def test_too_little_pydoc_calibration_is_refused(tmp_path, spec):
    from lm_eval_fixtures import build_tiny_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "tiny"))
    with pytest.raises(OffloadSpecError, match="ask for at least 2"):
        lp_plugin.attach(model, offload="none", skip="bi:1", calib=spec)


def test_fitted_quantities_read_only_calibration_tokens(tmp_path, tokenizer):
    from lm_eval_fixtures import build_tiny_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "tiny"))
    ctx = metrics.SkipContext(model, "pydoc:1024")
    read = [t[0].tolist() for t in ctx.runner.inputs]
    ids = calib.encode(tokenizer, calib.pydoc_text())
    assert [t for w in ctx.calib.windows for t in w] == ids[:1024]
    assert all(set(w[1:]) <= set(ids[:1024]) for w in read)  # the runner reads calibration windows only
    assert ctx.calib.windows[0] == tuple(ids[:model.config.max_position_embeddings])  # windows fit the context


# ----------------------------------------------------------------------------------- caching
def _counting(monkeypatch):
    calls = []
    for name, fn in list(metrics._COMPUTE.items()):
        monkeypatch.setitem(metrics._COMPUTE, name, lambda ctx, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(ctx, **kw))
    return calls


def test_importance_is_cached_and_recomputed_when_weights_change(known, monkeypatch):
    calls = _counting(monkeypatch)
    ids = _ids()
    first = lp_plugin.importance(known, ids, "greedy", steps=2)
    assert lp_plugin.importance(known, ids, "greedy", steps=2) == first and calls == ["greedy"]
    assert lp_plugin.importance(known, ids, "greedy", steps=1).order == first.order[:1] and calls == ["greedy"]
    lp_plugin.importance(known, ids[:256], "greedy", steps=2)  # other calibration tokens: measured again
    lp_plugin.importance(known, ids, "greedy", steps=3)  # more steps than cached: measured again
    bi = lp_plugin.importance(known, ids, "bi")
    assert calls == ["greedy", "greedy", "greedy", "bi"]
    _, layer_list = find_decoder_layers(known)
    with torch.no_grad():
        layer_list[6].mlp.down_proj.weight.zero_()  # in place: the same tensors, new values
    changed = lp_plugin.importance(known, ids, "bi")
    assert calls[-1] == "bi" and len(calls) == 5 and changed.scores[6] < bi.scores[6]
    lp_plugin.importance(known, ids, "greedy", steps=2)
    assert calls[-1] == "greedy" and len(calls) == 6


def _standin_file():
    files = sorted(cache.folder().glob("standins-*.safetensors"))
    assert len(files) == 1
    return files[0]


def _attach_linear(model):
    handle = lp_plugin.attach(model, offload="none", skip="bi:2", stand_in="linear:4", calib=_ids())
    weights = {i: {k: v.clone() for k, v in handle.plan.skips.stand_ins[i].state_dict().items()} for i in handle.plan.skips.layers}
    info = handle.plan.skips.info["stand_in_fit"]
    handle.detach()
    return weights, info


def test_stand_ins_are_cached_verified_and_refitted(known, recwarn):
    weights, info = _attach_linear(known)
    assert info["cached"] is False
    again, info = _attach_linear(known)
    assert info["cached"] is True and all(torch.equal(weights[i][k], again[i][k]) for i in weights for k in weights[i])
    path = _standin_file()
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"cached linear:4 stand-ins of layers \[3, 4\] .* not usable .*SHA-256"):
        refit, info = _attach_linear(known)
    assert info["cached"] is False and all(torch.equal(weights[i][k], refit[i][k]) for i in weights for k in weights[i])
    assert _attach_linear(known)[1]["cached"] is True  # the rewritten file verifies again


def test_cache_key_holds_the_config_and_the_fit_settings(known, monkeypatch):
    """Same weights, another rms_norm_eps: another forward, so another key; changed fit settings miss too."""
    calls = _counting(monkeypatch)
    ids = _ids()
    lp_plugin.importance(known, ids, "ppl")
    known.config.rms_norm_eps = 0.5
    for module in known.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5  # the norms follow the config
    lp_plugin.importance(known, ids, "ppl")
    assert calls == ["ppl", "ppl"]
    monkeypatch.setitem(metrics.SETTINGS, "scored_windows", metrics.SCORED_WINDOWS + 1)
    lp_plugin.importance(known, ids, "ppl")
    assert calls == ["ppl", "ppl", "ppl"]


def test_scores_do_not_depend_on_train_mode(known):
    """Dropout in train mode would make scores random (and they are cached): measured in eval mode,
    and the model's mode is left as it was."""
    for module in known.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    ids = _ids()
    known.eval()
    ref = metrics.SkipContext(known, ids).runner.nll()
    known.train()
    assert metrics.SkipContext(known, ids).runner.nll() == ref and known.training


@torch.no_grad()
def _reference_greedy(ctx, spec, steps, score):
    """Greedy removal computed the straightforward way: every candidate, fold and window runs the
    whole model from its embeddings, one window at a time, with every replacement in place, and
    every stand-in is fitted anew on hidden states computed from scratch (calibration of at most
    :data:`metrics.SCORED_WINDOWS` windows: every window is scored). Each step keeps the
    :data:`metrics.GREEDY_SHORTLIST` candidates of least loss on the first :data:`metrics.GREEDY_SCREEN`
    pieces (the positions before :data:`metrics.GREEDY_SCREEN_TOKENS`, read from the whole window's
    logits), and of those the one of least total loss (ties: the lower layer)."""
    runner, folds, every = ctx.runner, metrics._folds(ctx, spec), range(len(ctx.calib.windows))
    screened = [w for _, windows in metrics._chunks(folds, score)[:metrics.GREEDY_SCREEN] for w in windows]

    stride = metrics.SCORED_STRIDE if score == "kl" else 1
    cut = metrics.GREEDY_SCREEN_TOKENS or 10**9

    def logits(w, replace):  # the head on every position, then the scored ones picked
        return runner._run([w], replace)[0][0].float()[stride - 1::stride]

    plain = {w: torch.log_softmax(logits(w, {}), -1) for fold in folds for w in fold}

    def loss(w, out, upto=10**9):  # summed over the positions before token ``upto``
        n = len(range(stride - 1, min(upto, runner.targets[w].numel()), stride))
        if score == "nll":
            return float(torch.nn.functional.cross_entropy(out[:n], runner.targets[w][:n], reduction="sum"))
        return float((plain[w].exp() * (plain[w] - torch.log_softmax(out, -1)))[:n].sum())

    def out_positions(w):
        return range(stride - 1, runner.targets[w].numel(), stride)

    pipes, order, scores = [{} for _ in folds], [], {}
    for _ in range(steps):
        measured = {}  # candidate -> (screen loss, total loss, tokens, its stand-ins per fold)
        for j in range(ctx.num_layers):
            if j in order:
                continue
            first, total, tokens, fns = 0.0, 0.0, 0, []
            for f, fold in enumerate(folds):
                train = [w for w in every if w not in fold] or list(every)
                inputs = [runner._forward(w, pipes[f], stop=j, record={j})[1][j] for w in every]
                fns.append(metrics.replacement(ctx, spec, j, inputs, train, alpha=metrics.GREEDY_RIDGE,
                                               dtype=getattr(torch, metrics.GREEDY_FIT_DTYPE)))
                for w in fold:
                    out = logits(w, {**pipes[f], j: fns[-1]})
                    total += loss(w, out)
                    first += loss(w, out, cut) if w in screened else 0.0
                    tokens += len(out_positions(w))
            measured[j] = (first, total, tokens, fns)
        short = sorted(measured, key=lambda j: (measured[j][0], j))[:metrics.GREEDY_SHORTLIST]
        j = min(short, key=lambda j: (measured[j][1] / measured[j][2], j))
        _, total, tokens, fns = measured[j]
        order.append(j)
        scores[j] = math.exp(total / tokens) if score == "nll" else total / tokens
        for f, fn in enumerate(fns):
            pipes[f][j] = fn
    return order, scores


@pytest.mark.parametrize("shortlist,cut", [(2, None), (2, 100), (100, 100)])
@pytest.mark.parametrize("score", ["nll", "kl"])
@pytest.mark.parametrize("stand_in", ["none", "mean", "linear"])
def test_fast_greedy_chooses_as_the_straightforward_computation(stand_in, score, shortlist, cut, monkeypatch):
    """Stored prefixes, batched windows, kept fits, a screen of the windows' first tokens and
    candidates dropped once their partial sum shows they cannot win change no choice: the same
    removal order and scores as running everything from scratch (windows of two lengths, so batches
    are grouped; the screen cut shorter than one of them), with a shortlist shorter than the
    candidates and one that holds them all. Both in float32 (bfloat16 scoring: the tests below)."""
    monkeypatch.setattr(metrics, "GREEDY_SHORTLIST", shortlist)
    monkeypatch.setattr(metrics, "GREEDY_SCREEN_TOKENS", cut)
    monkeypatch.setattr(metrics, "GREEDY_DTYPE", None)
    model = build_tiny("llama", initializer_range=0.2)
    ctx = metrics.SkipContext(model, _ids(5 * 256 + 70, seed=3), stand_in)
    assert {len(w) for w in ctx.calib.windows} == {256, 70}
    fast = metrics._greedy(ctx, n=1, spec=ctx.stand_in, steps=4, score=score)
    order, scores = _reference_greedy(ctx, ctx.stand_in, 4, score)
    assert list(fast.order) == order
    assert all(fast.scores[j] == pytest.approx(scores[j], rel=1e-4, abs=1e-6) for j in order)


@pytest.mark.parametrize("stand_in", ["none", "linear"])
def test_bfloat16_scoring_chooses_as_float32(known, sampled, stand_in, monkeypatch):
    """Greedy's candidates run on a bfloat16 copy of a float32 model (on a CPU without native
    bfloat16 too, here): the same removals as in float32, every score within 2e-3 of the float32
    one, and the scores do differ (the copy really ran)."""
    monkeypatch.setattr(metrics, "_native_bf16", lambda device: True)
    ctx = metrics.SkipContext(known, sampled, stand_in)
    assert metrics.scoring_dtype(known) is torch.bfloat16
    low = metrics._greedy(ctx, n=1, spec=ctx.stand_in, steps=4)
    monkeypatch.setattr(metrics, "GREEDY_DTYPE", None)
    assert metrics.scoring_dtype(known) is None
    exact = metrics._greedy(ctx, n=1, spec=ctx.stand_in, steps=4)
    assert low.order == exact.order and set(low.order[:2]) == set(IDENTITY)
    assert all(low.scores[j] == pytest.approx(exact.scores[j], abs=2e-3) for j in exact.order)
    assert low.scores != exact.scores and exact.scores[IDENTITY[0]] == 0.0
    assert all(p.dtype == torch.float32 for p in known.parameters())  # the model itself is left as it was


def test_low_precision_copy_leaves_the_model_alone(known):
    """The copy: bfloat16 parameters (tied ones still tied), buffers as they were, the output of the
    model with its parameters rounded to bfloat16 (and near the model's); the model keeps its own
    float32 tensors."""
    tied = build_tiny("qwen2", initializer_range=0.2)  # tied embeddings
    for model in (known, tied):
        before = {n: p for n, p in model.named_parameters()}
        low = low_precision_copy(model, torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in low.parameters())
        assert {b.dtype for b in low.buffers()} == {b.dtype for b in model.buffers()}
        assert dict(model.named_parameters()) == before and all(p.dtype == torch.float32 for p in before.values())
        tie = low.get_input_embeddings().weight is low.get_output_embeddings().weight
        assert tie == model.config.tie_word_embeddings
        x = torch.tensor([_ids(48, seed=1)])
        rounded = copy.deepcopy(model)
        for p in rounded.parameters():
            p.data = p.data.to(torch.bfloat16)
        with torch.no_grad():
            ref, out, want = model(x).logits, low(x).logits, rounded(x).logits
        assert out.dtype == torch.bfloat16 and torch.equal(out, want)
        assert float((out - ref).norm() / ref.norm()) < 0.1


def test_scoring_dtype_only_for_float32_on_native_bfloat16(known, monkeypatch):
    monkeypatch.setattr(metrics, "_native_bf16", lambda device: True)
    assert metrics.scoring_dtype(known) is torch.bfloat16
    assert metrics.scoring_dtype(build_tiny("llama").to(torch.bfloat16)) is None  # already low precision
    monkeypatch.setattr(metrics, "_native_bf16", lambda device: False)
    assert metrics.scoring_dtype(known) is None


def test_greedy_scoring_dtype_is_in_the_cache_key(known, monkeypatch):
    """A greedy result measured in bfloat16 is not reused where greedy measures in float32, and back."""
    calls = _counting(monkeypatch)
    monkeypatch.setattr(metrics, "_native_bf16", lambda device: True)
    ids = _ids()
    lp_plugin.importance(known, ids, "greedy", steps=2)
    lp_plugin.importance(known, ids, "bi")
    monkeypatch.setattr(metrics, "_native_bf16", lambda device: False)  # this device: float32
    lp_plugin.importance(known, ids, "greedy", steps=2)
    lp_plugin.importance(known, ids, "bi")  # bi reads the plain model only: its key is the same
    assert calls == ["greedy", "bi", "greedy"]
    monkeypatch.setitem(metrics.SETTINGS, "greedy_dtype", None)  # the rule changed: nothing cached is reused
    lp_plugin.importance(known, ids, "bi")
    assert calls == ["greedy", "bi", "greedy", "bi"]


def test_greedy_with_a_stand_in_on_one_calibration_window(known):
    handle = lp_plugin.attach(known, offload="none", skip="greedy:2", stand_in="mean", calib=_ids(40))
    assert len(handle.info()["skipped_layers"]) == 2
    handle.detach()


def test_unwritable_cache_warns_and_still_skips(known, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="cannot write the skipping cache .* point LP_PLUGIN_CACHE at a writable folder"):
        handle = lp_plugin.attach(known, offload="none", skip="bi:2", stand_in="mean", calib=_ids())
    assert handle.info()["skipped_layers"] == list(IDENTITY)
    handle.detach()


def test_cache_files_are_readable_by_others(known):
    lp_plugin.importance(known, _ids(), "bi")
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in cache.folder().iterdir())


def test_tampered_importance_file_is_recomputed_with_a_warning(known, monkeypatch):
    calls = _counting(monkeypatch)
    first = lp_plugin.importance(known, _ids(), "bi")
    path = next(cache.folder().glob("importance-*.json"))
    doc = json.loads(path.read_text())
    doc["payload"]["order"] = list(reversed(doc["payload"]["order"]))
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="does not match its SHA-256"):
        assert lp_plugin.importance(known, _ids(), "bi") == first
    assert calls == ["bi", "bi"]


# ----------------------------------------------------------------------------------- plugins
class _LastLayers:
    """A third-party skip policy: the ``count`` layers before the last one, checked against the
    calibration data it is handed."""

    class Policy(lp_plugin.SkipPolicy):
        name = "before-last"
        seen = []

        def select(self, ctx, count):
            self.seen.append((ctx.num_layers, ctx.calib.num_tokens, str(ctx.stand_in), ctx.importance("bi").metric))
            return range(ctx.num_layers - 1 - count, ctx.num_layers - 1)

    @hookimpl
    def register_skip_policies(self, register):
        register("before-last", self.Policy)


def test_a_plugin_contributes_a_skip_policy(known):
    plugins.reset_for_tests()
    try:
        plugins.load()
        plugins.pm.register(_LastLayers(), name="before-last-plugin")
        assert {"bi", "angular", "ppl", "greedy", "before-last"} <= set(plugins.skip_policy_names())
        handle = lp_plugin.attach(known, offload="none", skip="before-last:2", stand_in="mean", calib=_ids())
        assert handle.info()["skipped_layers"] == [5, 6]
        assert handle.info()["stand_ins"] == {"5": "MeanStandIn", "6": "MeanStandIn"}
        assert _LastLayers.Policy.seen[-1] == (8, 512, "mean", "bi")
        handle.detach()
    finally:
        plugins.reset_for_tests()
    with pytest.raises(OffloadSpecError, match="unknown skip policy 'before-last'"):
        lp_plugin.attach(known, offload="none", skip="before-last:2", calib=_ids())


# ---------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize("options,error,match", [
    (dict(skip="greedy"), OffloadSpecError, r"needs a count: 'greedy:3'"),
    (dict(skip="nosuch:3"), OffloadSpecError, r"unknown skip policy 'nosuch'.*'angular', 'bi', 'greedy', 'ppl'"),
    (dict(skip="bi:150%"), OffloadSpecError, "between 0% and 100%"),
    (dict(skip="bi:2.5"), OffloadSpecError, "whole number"),
    (dict(skip="bi:-1"), OffloadSpecError, r"after 'bi:' give a number of layers \(>= 0\)"),
    (dict(skip=1.5), OffloadSpecError, "skip spec must be a str or a list of ints, got float"),
    (dict(skip=[]), OffloadSpecError, "skip layer list is empty"),
    (dict(skip="bi:8"), OffloadSpecError, "leave at least one layer"),
    (dict(skip="0-7"), OffloadSpecError, "names all 8 of the model's layers; leave at least one"),
    (dict(skip="all"), OffloadSpecError, "names all 8 of the model's layers; leave at least one"),
    (dict(skip="3,9"), OffloadSpecError, "out of range"),
    (dict(skip="bi:2", stand_in="cubic"), OffloadSpecError, "unknown stand_in 'cubic'"),
    (dict(skip="bi:2", stand_in="linear:0"), OffloadSpecError, "RANK an int >= 1"),
    (dict(skip="bi:2", stand_in="mean:4"), OffloadSpecError, "is not valid"),
    (dict(stand_in="linear"), OffloadSpecError, "without skip="),
    (dict(skip="bi:2", calib=3.5), OffloadSpecError, "calib must be"),
    (dict(skip="bi:2", calib="/no/such/file.txt"), OffloadSpecError, "neither 'mix'"),
    (dict(skip="bi:2", calib=[5]), OffloadSpecError, "at least 2 ids"),
    (dict(skip="bi:2", calib=[1, 999]), OffloadSpecError, r"out of range: \[999\]"),
    (dict(skip="bi:2", calib="pydoc"), OffloadSpecError, "model.config.name_or_path"),
    (dict(skip="bi:2", calib="pydoc:99999999"), OffloadSpecError, "model.config.name_or_path"),
])
def test_bad_specs_fail_clearly_and_leave_the_model_alone(known, options, error, match):
    x = torch.tensor([[1, 2, 3]])
    ref = known(x).logits
    with pytest.raises(error, match=match):
        lp_plugin.attach(known, offload="even", **options)
    assert lp_plugin.get_handle(known) is None and torch.equal(known(x).logits, ref)


@pytest.mark.parametrize("kwargs,match", [(dict(metric="nope"), "unknown importance metric 'nope'"),
                                          (dict(metric="angular", n=9), "block length n=9")])
def test_bad_importance_arguments(known, kwargs, match):
    with pytest.raises(OffloadSpecError, match=match):
        lp_plugin.importance(known, _ids(), **kwargs)


def test_importance_refuses_an_attached_model(known):
    handle = lp_plugin.attach(known, offload="even")
    with pytest.raises(AttachError, match="detach lp_plugin first"):
        lp_plugin.importance(known, _ids())
    handle.detach()


# ------------------------------------------------------------------- the sweep, attach and lm_eval
def test_sweep_attach_and_lm_eval_give_the_same_heldout_perplexity(tmp_path):
    """One policy with a fitted stand-in, measured three ways on the held-out documents: the lp-prune
    sweep, a model attached in this process, and the stock lm_eval CLI (task lp_pydoc_heldout)."""
    import lm_eval_fixtures as fx
    from transformers import AutoModelForCausalLM

    from lp_plugin.tools.prune import sweep

    path = fx.build_tiny_model("llama", tmp_path / "tiny")
    heldout = (4096, 4096 + 256, 64)  # four 64-token documents: each fits the tiny model's 128 positions
    options = {"skip": "greedy:25%", "stand_in": "linear", "calib": "pydoc:1024"}
    out = sweep.run_sweep(path, fractions=[0, 25], selections=["greedy"], stand_ins=["linear"], calib=options["calib"],
                          engine={"offload": "even", "mode": "stream"}, hf_kwargs={"dtype": torch.float32},
                          heldout=heldout, log=lambda msg: None)
    plain, row = out["rows"]
    assert row["skipped"] == 2 and row["skip_info"]["stand_in"] == "linear" and row["ppl"] != plain["ppl"]
    assert list(row["slices"]) == ["calib", "pydoc-a", "pydoc-b", "license", "docstrings"]
    assert row["slices"]["pydoc-a"]["ppl"] == row["ppl"]
    assert row["worst_change"] == max(r["change"] for r in row["slices"].values()) == \
        row["slices"][row["worst_slice"]]["change"]
    assert row["bytes_per_forward"] > 0 and row["stand_in_bytes"] > 0

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    handle = lp_plugin.attach(model, offload="none", **options)
    assert list(handle.plan.skips.layers) == row["layers"]
    attached = sweep.evaluate(model, *sweep.heldout_ids(model, *heldout))
    assert attached["ppl"] == pytest.approx(row["ppl"], rel=1e-5)
    handle.detach()

    args = {**options, "skip": "greedy:25%", "offload": "even", "mode": "stream"}
    metadata = json.dumps({"heldout_start": heldout[0], "heldout_end": heldout[1], "heldout_window": heldout[2]})
    _, results = fx.run_lm_eval("hf-residual-offload", {"pretrained": path, **args}, tmp_path / "lm_eval",
                                task="lp_pydoc_heldout", limit=None, extra=["--metadata", metadata])
    token_ppl = fx.metric(results, "token_perplexity", task="lp_pydoc_heldout")
    assert token_ppl == pytest.approx(row["ppl"], rel=1e-5)
    assert results["config"]["residual_offload"]["engine"]["skipped_layers"] == row["layers"]
    _, results = fx.run_lm_eval("hf-residual-offload", {"pretrained": path, **args}, tmp_path / "lm_eval_license",
                                task="lp_heldout_license", limit=None, extra=["--metadata", metadata])
    license_ppl = fx.metric(results, "token_perplexity", task="lp_heldout_license")
    assert license_ppl == pytest.approx(row["slices"]["license"]["ppl"], rel=1e-5)


def test_lp_prune_cli_writes_json_table_and_plot(tmp_path):
    import subprocess
    import sys

    import lm_eval_fixtures as fx

    path = fx.build_tiny_model("qwen2", tmp_path / "tiny")
    out = tmp_path / "results" / "tiny-prune"
    cmd = [str(Path(sys.executable).parent / "lp-prune"), "--model", path, "--out", str(out), "--fractions", "0,25",
           "--selections", "bi,angular", "--stand-ins", "none,mean", "--calib", "pydoc:512", "--heldout-window", "64",
           "--targets", "25:1000000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=fx.offline_env(OMP_NUM_THREADS=1), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["skipped"], r["selection"], r["stand_in"]) for r in result["rows"]] == [
        (0, "plain", "none"), (2, "bi", "none"), (2, "bi", "mean"), (2, "angular", "none"), (2, "angular", "mean")]
    assert all(r["standby_vram_bytes"] is None and r["tokens_per_second"] > 0 for r in result["rows"])
    # each row against the plain one: forward speed-up (the plain row's is 1) and standby VRAM saved (None on the CPU)
    assert result["rows"][0]["speedup_vs_plain"] == 1.0 and all(r["speedup_vs_plain"] > 0 for r in result["rows"])
    assert all(r["standby_saved_bytes"] is None for r in result["rows"])
    assert "| vs plain | standby VRAM | saved |" in out.with_suffix(".txt").read_text()
    assert result["targets"][0]["met"] is True and "25% (2 layers) <= +1e+06% on every slice: MET" in out.with_suffix(".txt").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
    bad = subprocess.run(cmd[:-2] + ["--targets", "25"], capture_output=True, text=True, env=fx.offline_env())
    assert bad.returncode == 2 and "write SHARE:RISE" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["--fractions", "10,abc"], "--fractions: 'abc' is not a number"),
    (["--fractions", "150"], "--fractions: '150' is not a share in [0, 100)"),
    (["--selections", "nosuch"], "--selections: unknown skip policy 'nosuch'"),
    (["--stand-ins", "cubic"], "unknown stand_in 'cubic'"),
    (["--greedy-stand-ins", "linear:0"], "RANK an int >= 1"),
    (["--targets", "10"], "cannot read target '10'"),
    (["--fractions", "0,10", "--targets", "50:10"], "--fractions does not sweep"),  # a target nothing would judge
    (["--selections", "bi,bi"], "--selections"),
    (["--stand-ins", "linear,none,linear"], "--stand-ins"),
    (["--greedy-stand-ins", "none,none"], "--greedy-stand-ins"),
    (["--domains", "license,license"], "--domains"),
    ([], "is neither a model folder nor a Hub id"),
])
def test_lp_prune_bad_arguments_exit_2(tmp_path, capsys, args, message):
    from lp_plugin.tools.prune import cli

    assert cli.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_lp_prune_refuses_a_window_beyond_the_models_positions(tmp_path, capsys):
    from shapes import save_tiny

    from lp_plugin.tools.prune import cli

    model = save_tiny("llama", tmp_path / "tiny")
    assert cli.main(["--model", model, "--out", str(tmp_path / "out" / "o.json"), "--heldout-window", "10000000"]) == 2
    assert "--heldout-window" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lp_prune_refuses_a_folder_without_a_model(tmp_path, capsys):
    from lp_plugin.tools.prune import cli

    assert cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a folder without config.json" in capsys.readouterr().err


def test_every_slice_is_an_lm_eval_task():
    """lm-eval finds one held-out task per evaluation slice, and the group of them all."""
    import lm_eval_fixtures as fx
    from lm_eval.tasks import TaskManager

    from lp_plugin.planning.skipping import domains

    names = set(TaskManager(include_path=fx.tasks_path(), include_defaults=False).all_tasks)
    tasks = {"lp_pydoc_heldout", "lp_heldout_pydoc_b", "lp_heldout_license", "lp_heldout_docstrings"}
    assert tasks | {"lp_heldout_slices"} <= names and len(tasks) == len(domains.EVAL_SLICES)
