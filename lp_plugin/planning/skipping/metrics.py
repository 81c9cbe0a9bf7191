"""Layer importance on calibration tokens, and the context skip policies work in.

Metrics (lower score = the layer is less needed = skipped first):

* ``bi``: Block Influence (ShortGPT): ``1 - cos(x_in, x_out)`` of each layer, averaged over every
  calibration token.
* ``angular``: angular distance of ``n``-layer blocks (Gromov et al., "The Unreasonable
  Ineffectiveness of the Deeper Layers"): ``arccos(cos(x_l, x_{l+n})) / pi``, averaged over every
  calibration token (the paper reads the last token of each sequence; every token is steadier on a
  few windows); one score per block start ``l``.
* ``ppl``: calibration perplexity with that one layer skipped (or replaced by its stand-in).
* ``greedy``: SLEB: remove, step by step, the layer whose removal (with its stand-in, when the
  context has one) moves the model's next-token distribution least, re-measuring every remaining
  layer after each removal; ``order`` is the removal order and a layer's score the mean KL
  divergence (nats per scored position) from the plain model after it went (``None`` for layers
  never removed within ``steps``). Measured at every :data:`SCORED_STRIDE`-th position of the first
  :data:`SCORED_WINDOWS` calibration windows; with stand-ins it is cross-fitted: those windows are
  dealt into two folds and each fold is scored with stand-ins fitted on the other. Each step
  compares in full only the :data:`GREEDY_SHORTLIST` candidates of least KL on the first
  :data:`GREEDY_SCREEN` scored windows (their first :data:`GREEDY_SCREEN_TOKENS` tokens; see
  :func:`_greedy`). A float32 model on a device that computes bfloat16 natively runs the
  candidates in bfloat16 (:data:`GREEDY_DTYPE`, :func:`scoring_dtype`): the plain model's
  distribution, its hidden states and the final stand-ins stay float32.

:func:`importance` caches results by the model's fingerprint (weights and config), the calibration
tokens and the scoring settings.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from ...core.progress import bar
from ...errors import OffloadSpecError
from ..arch import find_decoder_layers
from . import cache, standins
from .calib import CalibData, calibration
from .runner import Replacement, Runner, low_precision_copy
from .spec import StandInSpec, parse_stand_in

log = logging.getLogger("lp_plugin")

METRICS = ("bi", "angular", "ppl", "greedy")
SCORED_WINDOWS = 8  # greedy measures perplexity on this many calibration windows
GREEDY_FOLDS = 2  # folds of the scored windows when stand-ins are cross-fitted
GREEDY_RIDGE = 0.1  # ridge strength of greedy's candidate stand-ins (fitted on a few windows; see the docs)
GREEDY_FIT_DTYPE = "float32"  # precision of their per-window sums (that ridge keeps them well conditioned)
SCORED_STRIDE = 4  # the kl score reads every 4th position of the scored windows (the head runs there only)
GREEDY_SCREEN = 2  # pieces (windows; nll: folds) every candidate of a greedy step is measured on
GREEDY_SCREEN_TOKENS: int | None = 128  # the screen reads the first 128 tokens of each of its windows (None: all)
GREEDY_SHORTLIST = 6  # candidates of least sum on those pieces that a step compares in full
GREEDY_SCORE = "kl"  # what greedy minimizes: "kl" (divergence from the plain model) or "nll" (calibration loss)
# greedy's candidate runs on a float32 model: "bfloat16" on a device that computes it natively (see
# scoring_dtype), or None (the model's own dtype)
GREEDY_DTYPE: str | None = "bfloat16"
# what the cached results also depend on: a change here (or in the fit) makes earlier cache files miss
SETTINGS = {
    "scored_windows": SCORED_WINDOWS,
    "greedy_folds": GREEDY_FOLDS,
    "greedy_score": GREEDY_SCORE,
    "scored_stride": SCORED_STRIDE,
    "greedy_ridge": GREEDY_RIDGE,
    "greedy_fit_dtype": GREEDY_FIT_DTYPE,
    "greedy_screen": GREEDY_SCREEN,
    "greedy_screen_tokens": GREEDY_SCREEN_TOKENS,
    "greedy_shortlist": GREEDY_SHORTLIST,
    "greedy_dtype": GREEDY_DTYPE,
    **standins.SETTINGS,
}


@dataclass(frozen=True)
class Importance:
    metric: str
    scores: tuple  # per layer (angular: per block start); lower = less needed; None = not measured
    order: tuple  # layers (angular: block starts), least needed first
    params: dict = field(default_factory=dict)  # n, stand_in, steps
    calib: str = ""  # where the calibration tokens came from

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "scores": list(self.scores),
            "order": list(self.order),
            "params": self.params,
            "calib": self.calib,
        }


class SkipContext:
    """One model with its calibration data. A skip policy reads ``model``, ``calib`` (token windows:
    ``calib.windows``), ``stand_in`` (what its layers will get) and ``num_layers``, and may call
    :meth:`importance` (cached scores) or use :attr:`runner` to measure on its own. The weight
    fingerprint and the plain model's hidden states are computed on first use and kept."""

    def __init__(self, model, calib=None, stand_in="none"):
        self.model = model
        self.calib = calib if isinstance(calib, CalibData) else calibration(model, calib)
        self.stand_in = stand_in if isinstance(stand_in, StandInSpec) else parse_stand_in(stand_in)
        self.num_layers = len(find_decoder_layers(model)[1])

    @cached_property
    def fingerprint(self) -> str:
        return cache.model_fingerprint(self.model)

    @cached_property
    def runner(self) -> Runner:
        return Runner(self.model, self.calib)

    @cached_property
    def teacher(self) -> dict:
        """The plain model's hidden states: ``{i: per-window input of layer i}``; index
        ``num_layers`` holds the last layer's output."""
        return self.runner.layer_inputs(desc="calibration (the plain model's hidden states)")

    def plain_states(self, scored, stride: int = 1, head: bool = True) -> tuple[dict, dict]:
        """``(per-layer hidden states, {window: log-probabilities})`` of the plain model: the hidden
        states of :attr:`teacher` (of ``scored`` windows only when nothing will fit stand-ins and
        :attr:`teacher` is not kept), with ``head``, the log-probabilities of ``scored`` windows at
        every ``stride``-th position, computed in the same pass when the states are computed."""
        scored = sorted(scored)
        if "teacher" in self.__dict__:
            return self.teacher, self.runner.log_probs(scored, stride=stride) if head else {}
        desc = "calibration (the plain model's hidden states)"
        if self.stand_in.kind == "none":
            return self.runner.plain_pass(scored, scored if head else (), stride, desc=desc)
        self.__dict__["teacher"], log_probs = self.runner.plain_pass(
            range(len(self.calib.windows)), scored if head else (), stride, desc=desc
        )
        return self.teacher, log_probs

    def teacher_layers(self, layers) -> dict:
        """:attr:`teacher` for ``layers`` only (run up to the last of them unless it is already kept)."""
        if "teacher" in self.__dict__:
            return {i: self.teacher[i] for i in layers}
        return self.runner.layer_inputs(
            layers=sorted(set(layers)), desc="calibration (the plain model's hidden states)"
        )

    def key(self, **parts) -> dict:
        """A cache key: the model (weights and config), the calibration tokens, the settings of the
        scoring and fitting code, and ``parts``."""
        return {"model": self.fingerprint, "calib": self.calib.fingerprint, "settings": SETTINGS, **parts}

    def importance(self, metric: str, *, n: int = 1, stand_in=None, steps: int | None = None) -> Importance:
        """Cached scores of ``metric`` (see the module docstring); ``stand_in`` defaults to the
        context's, ``steps`` (greedy) to half the layers."""
        if metric not in METRICS:
            raise OffloadSpecError(f"unknown importance metric {metric!r}; choose one of {list(METRICS)}")
        spec = self.stand_in if stand_in is None else parse_stand_in(str(stand_in))
        if metric in ("bi", "angular"):
            spec = StandInSpec()  # they read the plain model only
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_layers:
            raise OffloadSpecError(
                f"block length n={n!r} must be an int between 1 and the model's {self.num_layers} layers"
            )
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise OffloadSpecError(f"steps={steps!r} must be an int >= 1 (greedy removals; default half the layers)")
        steps = min(self.num_layers, self.num_layers // 2 if steps is None else steps)
        key = self.key(metric=metric, n=n if metric == "angular" else 1, stand_in=str(spec))
        if metric == "greedy":
            key["scoring_dtype"] = str(scoring_dtype(self.model) or "model")  # it depends on the device too
        what = f"{metric} importance"
        payload = cache.load_json("importance", key, what, _payload_check(metric, self.num_layers, n))
        if payload is not None and (metric != "greedy" or payload["params"]["steps"] >= steps):
            return _from_payload(payload, steps if metric == "greedy" else None)
        result = _COMPUTE[metric](self, n=n, spec=spec, steps=steps)
        cache.save_json("importance", key, result.to_dict())
        return result


def _payload_check(metric: str, num_layers: int, n: int):
    """A check for a cached importance payload: ValueError unless it is ``metric``'s, with one score
    per layer (angular: per block start), finite, and an order of distinct layers in range."""
    count = num_layers - n + 1 if metric == "angular" else num_layers

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def check(payload) -> None:
        if not isinstance(payload, dict) or payload.get("metric") != metric:
            raise ValueError(f"it is not {metric} importance")
        scores, order, params = payload.get("scores"), payload.get("order"), payload.get("params")
        if not isinstance(scores, list) or len(scores) != count:
            raise ValueError(f"it holds no list of {count} scores")
        if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in order):
            raise ValueError("its order is not a list of layer indices")
        if len(set(order)) != len(order) or not all(0 <= i < count for i in order):
            raise ValueError(f"its order {order[:8]} repeats layers or leaves 0..{count - 1}")
        if (
            not isinstance(params, dict)
            or not isinstance(params.get("n"), int)
            or not isinstance(params.get("stand_in"), str)
        ):
            raise ValueError("its params are not a table with n and stand_in")
        if not isinstance(payload.get("calib"), str):
            raise ValueError("it does not say which calibration text it measured")
        if metric == "greedy":
            steps = params.get("steps")
            if not isinstance(steps, int) or isinstance(steps, bool) or len(order) != steps:
                raise ValueError("its greedy steps do not match its order")
            removed = set(order)
            if not all(number(scores[i]) for i in order) or any(
                s is not None for i, s in enumerate(scores) if i not in removed
            ):
                raise ValueError("its scores are not finite numbers for exactly the removed layers")
        elif len(order) != count or not all(number(v) for v in scores):
            raise ValueError("its scores are not finite numbers for every layer, in an order of every layer")
        if metric != "greedy" and sorted(order, key=lambda i: scores[i]) != order:
            raise ValueError("its order is not the order of its scores")

    return check


def _from_payload(payload: dict, steps) -> Importance:
    order, scores = tuple(payload["order"]), list(payload["scores"])
    if steps is not None and steps < len(order):
        dropped = order[steps:]
        order = order[:steps]
        for i in dropped:
            scores[i] = None
    params = dict(payload["params"])
    if steps is not None and "steps" in params:
        params["steps"] = min(steps, params["steps"])
    return Importance(payload["metric"], tuple(scores), order, params, payload["calib"])


def importance(
    model, calib=None, metric: str = "bi", *, n: int = 1, stand_in: str = "none", steps: int | None = None
) -> Importance:
    """Per-layer importance of ``model``'s decoder layers on calibration tokens (``calib``: as the
    ``calib`` option: ``"pydoc"`` (default), ``"pydoc:TOKENS"``, a text file, or token ids).

    ``metric``: ``bi``, ``angular`` (``n``: block length), ``ppl`` or ``greedy`` (``steps``
    removals, default half the layers); ``stand_in`` makes ``ppl``/``greedy`` measure each layer
    replaced by its fitted stand-in instead of skipped. Cached by the model's weights and the
    calibration tokens (under ``lp_plugin.bundled.cache_root()/skipping``)."""
    return SkipContext(model, calib, stand_in).importance(metric, n=n, steps=steps)


# ------------------------------------------------------------------------------------ metrics
def _cos(a, b):
    return F.cosine_similarity(torch.cat(a).float(), torch.cat(b).float(), dim=-1)


def _bi(ctx, n, spec, steps) -> Importance:
    h = ctx.teacher
    scores = [float((1 - _cos(h[i], h[i + 1])).mean()) for i in range(ctx.num_layers)]
    return _ranked("bi", scores, {"n": 1, "stand_in": "none"}, ctx)


def _angular(ctx, n, spec, steps) -> Importance:
    h = ctx.teacher
    scores = [
        float(torch.arccos(_cos(h[l], h[l + n]).clamp(-1, 1)).mean() / math.pi) for l in range(ctx.num_layers - n + 1)
    ]
    return _ranked("angular", scores, {"n": n, "stand_in": "none"}, ctx)


def _ranked(metric, scores, params, ctx) -> Importance:
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    return Importance(metric, tuple(scores), tuple(order), params, ctx.calib.source)


def replacement(
    ctx: SkipContext,
    spec: StandInSpec,
    layer: int,
    inputs: list[torch.Tensor],
    windows: Sequence[int] | None = None,
    teacher: dict[int, list[torch.Tensor]] | None = None,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Replacement:
    """What runs in place of ``layer`` when it reads ``inputs`` (per-window hidden states): the
    identity (``spec`` none) or a stand-in fitted on ``windows`` of them (default all) against the
    plain model's output (``teacher``: per-layer hidden states, default the context's), with ridge
    strength ``alpha`` (default: chosen by cross-validation), the fit's sums in ``dtype``."""
    if spec.kind == "none":
        return _identity
    windows = range(len(inputs)) if windows is None else windows
    teacher = ctx.teacher if teacher is None else teacher
    tensors, _ = standins.fit(
        spec, [inputs[w] for w in windows], [teacher[layer + 1][w] for w in windows], alpha, dtype
    )
    return standins.build(spec, {k: v.to(inputs[0].device, inputs[0].dtype) for k, v in tensors.items()})


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (CPU: AMX or AVX512-BF16)."""
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def scoring_dtype(model) -> torch.dtype | None:
    """The dtype greedy runs its candidates in when it is not the model's own, or None: bfloat16
    (:data:`GREEDY_DTYPE`) for a model whose parameters are all float32 on one device that computes
    bfloat16 natively (:func:`_native_bf16`), not offloaded by Accelerate. There a candidate's
    forward takes about a third of the time (AMX on the CPU); on the bundled model the scores moved by
    at most 0.0015 (mean KL per position), far less than the leading candidates differ, and greedy
    chose the same layers in the same order."""
    if GREEDY_DTYPE is None:
        return None
    params = list(model.parameters())
    devices = {p.device for p in params}
    if not params or len(devices) != 1 or any(p.dtype != torch.float32 for p in params):
        return None
    device = devices.pop()
    device_map = getattr(model, "hf_device_map", None) or {}
    if device.type == "meta" or len(set(device_map.values())) > 1 or not _native_bf16(device):
        return None
    return getattr(torch, GREEDY_DTYPE)


def _ppl(ctx, n, spec, steps) -> Importance:
    h = ctx.teacher
    scores = []
    for j in bar(range(ctx.num_layers), desc=f"ppl importance ({spec})", unit="layer"):
        fn = replacement(ctx, spec, j, h[j])
        scores.append(math.exp(ctx.runner.nll({j: fn}, start=j, states=h[j])))
    return _ranked("ppl", scores, {"n": 1, "stand_in": str(spec)}, ctx)


def _folds(ctx, spec) -> list:
    """The windows greedy scores, in folds: the first :data:`SCORED_WINDOWS` windows. A fitted
    stand-in is scored only on windows it was not fitted on: the scored windows are dealt into
    folds, and each fold is scored with stand-ins fitted on the other folds' windows."""
    scored = list(range(min(SCORED_WINDOWS, len(ctx.calib.windows))))
    k = min(GREEDY_FOLDS, len(scored))
    if spec.kind == "none" or k < 2:
        return [scored]
    return [scored[f::k] for f in range(k)]


class _Score:
    """What greedy sums over a fold's windows for one candidate: ``nll`` (the calibration tokens'
    negative log-likelihood) or ``kl`` (the KL divergence from the plain model's next-token
    distribution to the candidate's, summed over tokens; ``log_probs``: the plain model's, per window)."""

    def __init__(self, ctx, kind: str, log_probs: dict):
        self.kind, self.runner = kind, ctx.runner
        self.log_probs = log_probs
        self.probs = {w: lp.exp().flatten() for w, lp in log_probs.items()}

    def __call__(self, w: int, logits, keep=None) -> float:
        if self.kind == "nll":
            return float(self.runner.nll_loss(w, logits, keep))
        diff = F.log_softmax(logits.float(), dim=-1)
        # logits of the window's first positions only (a screen of its first tokens): those of the plain model
        torch.sub(self.log_probs[w][: diff.shape[0]], diff, out=diff)
        return float(torch.dot(self.probs[w][: diff.numel()], diff.flatten()))

    def value(self, mean: float) -> float:
        """The score reported for a removal: perplexity (``nll``) or mean KL per token (``kl``)."""
        return math.exp(mean) if self.kind == "nll" else mean


def _chunks(folds, score: str) -> list:
    """``[(fold, windows)]``, the pieces a candidate is scored in. ``nll``: each fold's windows as one
    batch. ``kl``: one window at a time, the folds interleaved, so that a candidate can be dropped
    as soon as its partial sum shows it cannot win (every window's KL is >= 0)."""
    if score != "kl":
        return [(f, list(fold)) for f, fold in enumerate(folds)]
    out = []
    for i in range(max(len(fold) for fold in folds)):
        out += [(f, [fold[i]]) for f, fold in enumerate(folds) if i < len(fold)]
    return out


def _greedy(ctx: SkipContext, n: int, spec: StandInSpec, steps: int, score: str | None = None) -> Importance:
    """Greedy removal, measured as described in the module docstring. Work that does not change
    between candidates is done once: every candidate starts from stored hidden states at its own
    layer (the plain model's, or those with the layers removed so far in place), the plain model's
    states and log-probabilities come from one pass (kept for the stand-in fit that follows), and a
    candidate's stand-in fit is kept until its inputs change (a removal below it).

    A step scores a candidate in pieces (:func:`_chunks`). It first measures every candidate on the
    first :data:`GREEDY_SCREEN` pieces, of their windows' first :data:`GREEDY_SCREEN_TOKENS` tokens
    only (attention is causal: the same terms as the whole window's first positions), and keeps the
    :data:`GREEDY_SHORTLIST` of least sum there (ties: the lower layer). Among those, the choice is
    exact with less work: both scores sum non-negative terms, so a partial sum is a lower bound on
    the total, and a screen piece read in part is one too. The leader is measured in full (the
    screen pieces again, whole), the other pieces are ordered by what they add to its sum (the
    largest first: partial sums grow fastest), then the next piece of the shortlisted candidate of
    least partial sum is measured until that candidate is measured in full: every other one's partial
    sum, so its total, is already at least as large (ties: the lower layer).

    With :func:`scoring_dtype`, the candidates run (and the hidden states after each removal are
    recomputed) on a copy of the model in that dtype, dropped when greedy ends; the plain model's pass
    (its distribution and hidden states) stays in the model's dtype."""
    score = score or GREEDY_SCORE
    folds = _folds(ctx, spec)
    scored = sorted(w for fold in folds for w in fold)
    stride = SCORED_STRIDE if score == "kl" else 1
    base, plain = ctx.plain_states(scored, stride, head=score == "kl")
    low = scoring_dtype(ctx.model)
    runner = ctx.runner if low is None else Runner(low_precision_copy(ctx.model, low), ctx.calib)
    loss = _Score(ctx, score, plain)
    fit_dtype = getattr(torch, GREEDY_FIT_DTYPE)
    all_tokens = sum(len(range(stride - 1, ctx.runner.targets[w].numel(), stride)) for w in scored)
    chunks = _chunks(folds, score)
    screen = min(GREEDY_SCREEN, len(chunks))
    cut = GREEDY_SCREEN_TOKENS
    # screen pieces read in part (windows longer than the cut): a shortlisted candidate reads them again in full
    longest = [max(len(ctx.calib.windows[w]) for w in windows) for _, windows in chunks[:screen]]
    partial = [k for k in range(screen) if cut is not None and longest[k] > cut]
    todo = partial + list(range(screen, len(chunks)))  # pieces (indices) the shortlist is measured on
    first: dict[int, list[float]] = {}  # per candidate: its sum on each screen piece (of the cut windows)
    # per fold: layer -> what replaces it, fitted without that fold
    pipes: list[dict[int, Replacement]] = [{} for _ in folds]
    states = [base for _ in folds]  # per fold: hidden states with that fold's replacements
    # per fold: candidate layer -> its stand-in, while its inputs are unchanged
    fits: list[dict[int, Replacement]] = [{} for _ in folds]
    order: list[int] = []
    scores: list[float | None] = [None] * ctx.num_layers
    progress = bar(desc=f"greedy importance ({spec}, {score}, {steps} steps)", unit="window")
    t_start = time.perf_counter()

    def measure(j: int, piece: tuple, tokens: int | None = None) -> float:
        f, windows = piece
        if j not in fits[f]:
            # with one calibration window there is nothing to cross-fit on: fitted and scored on it
            train = [w for w in scored if w not in folds[f]] or scored
            fits[f][j] = replacement(ctx, spec, j, states[f][j], train, base, GREEDY_RIDGE, fit_dtype)
        later = {i: g for i, g in pipes[f].items() if i > j}
        progress.update(len(windows))
        value, _ = runner.score_sum(
            loss, {**later, j: fits[f][j]}, start=j, states=states[f][j], windows=windows, stride=stride, tokens=tokens
        )
        return value

    def more(j: int, k: int) -> float:
        """What measuring piece ``k`` in full adds to candidate ``j``'s partial sum."""
        return measure(j, chunks[k]) - (first[j][k] if k in partial else 0.0)

    for step in range(steps):
        t0 = time.perf_counter()
        progress.set_postfix_str(f"step {step + 1}/{steps}")
        candidates = [j for j in range(ctx.num_layers) if j not in order]
        first = {j: [measure(j, chunks[k], cut if k in partial else None) for k in range(screen)] for j in candidates}
        total = {j: sum(first[j]) for j in candidates}
        short = sorted(candidates, key=lambda j: (total[j], j))[:GREEDY_SHORTLIST]
        log.debug("lp_plugin: greedy step %d screen: %s", step + 1, [(j, round(total[j], 3)) for j in short])
        runs = screen * len(candidates)
        leader = short[0]
        rest = [more(leader, k) for k in todo]
        total[leader] += sum(rest)
        runs += len(rest)
        # the others read the pieces that cost the leader most first
        ranked = [todo[i] for i in sorted(range(len(rest)), key=lambda i: -rest[i])]
        measured = {j: len(ranked) if j == leader else 0 for j in short}  # pieces of ``ranked`` measured
        heap = [(total[j], j) for j in short]
        heapq.heapify(heap)
        while True:
            _, j = heapq.heappop(heap)
            if measured[j] == len(ranked):
                break  # least partial sum, measured in full: no shortlisted candidate can do better
            total[j] += more(j, ranked[measured[j]])
            measured[j] += 1
            runs += 1
            heapq.heappush(heap, (total[j], j))
        order.append(j)
        scores[j] = loss.value(total[j] / all_tokens)
        elapsed = time.perf_counter() - t_start
        log.info(
            "lp_plugin: greedy (%s, %s) step %d/%d: layer %d, score %.4f (%.0f s, %d of %d pieces measured; "
            "about %.0f s left)",
            spec,
            score,
            step + 1,
            steps,
            j,
            scores[j],
            time.perf_counter() - t0,
            runs,
            len(candidates) * len(chunks),
            elapsed / (step + 1) * (steps - step - 1),
        )
        for f in range(len(folds)):
            pipes[f][j] = fits[f][j]
            if step + 1 == steps:
                continue  # nothing reads the states after the last removal
            after = runner.layer_inputs(pipes[f], start=j, states=states[f][j], windows=scored)
            states[f] = {**states[f], **{i: [_like(h, base[i][0]) for h in hs] for i, hs in after.items()}}
            fits[f] = {i: fn for i, fn in fits[f].items() if i < j}  # a fit above j read states that changed
    progress.close()
    return Importance(
        "greedy", tuple(scores), tuple(order), {"n": 1, "stand_in": str(spec), "steps": steps}, ctx.calib.source
    )


def _like(h: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """``h`` in ``ref``'s dtype (stored hidden states keep the model's dtype)."""
    return None if h is None else h.to(ref.dtype)


_COMPUTE = {"bi": _bi, "angular": _angular, "ppl": _ppl, "greedy": _greedy}
