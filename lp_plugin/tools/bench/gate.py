"""The regression gate of lp-bench: a new run against a reference run (``--compare OLD.json``).

What one run measures reliably is compared, not absolute speeds (those move by 2x between rounds on
a shared machine; ``--absolute`` adds them):

* speed: every offloaded config's *ratio to the plain model in the same run*, as the median of
  per-round ratios (each round measures every config back to back, so drift cancels);
* exactness: logit difference (in one forward over the prompt, and through the decode steps fed
  the plain model's greedy tokens), argmax and token agreement with the plain model, and perplexity
  relative to the plain model's own;
* memory: standby and peak VRAM relative to the plain model's (CUDA only).

How "significantly slower" is decided follows pyperf and asv. ``pyperf compare_to`` calls a change
significant only if a two-sample Student t-test says so (``pyperf._utils.is_significant``, critical
values from a t table by degrees of freedom) and, with ``--min-speed``, only if it is also larger
than that percentage. ``asv continuous`` / ``asv compare`` flag a benchmark only if it changed by
more than ``--factor`` (default 1.1) *and* ``asv.statistics.is_different`` finds the samples
different: a Mann-Whitney U test at p < 0.002 when there are enough samples for that p to be
possible, else whether the confidence intervals of the two medians overlap. lp-bench does both,
with the spread measured in the same runs. A speed ratio regressed when

    median(new ratios) / median(old ratios) < exp(-max(log(speed), t * se))

and, when the rounds are enough for it (6 and 7 or more), the Mann-Whitney U test of the new
rounds against the old ones gives p < 0.002. ``speed`` is the factor (default 1.10, asv's default);
``se`` the standard error of the difference of the two medians, ``sqrt(se_new**2 + se_old**2)``,
each ``sqrt(pi/2) * sigma / sqrt(n)``; ``t`` Student's one-sided 0.1% critical value for
``n_new + n_old - 2`` degrees of freedom (few rounds estimate ``sigma`` loosely, and t widens the
band for that). ``sigma`` is the larger of the run's own noise, the plain model against itself
(``baseline`` and ``baseline:twin``, a round apart: root mean square of the log ratios), and the
config's own spread over rounds (standard deviation of the log ratios).

Exactness tolerances come from the plain model too: its logits (one forward over the prompt; the
decode steps fed its own greedy tokens) and perplexity are computed three times per run (reference,
``baseline``, ``baseline:twin``). A deterministic model repeats exactly, and the gate then allows
nothing: one ulp fails, in one forward or in a decode step (a config that was bit-exact through the
decode steps in the reference and is not now fails). For a nondeterministic one (some GPU kernels)
the max abs logit difference (a maximum over many logits, which varies little from draw to draw) may
reach ``NOISE_MARGIN`` times the plain model's largest drift on the same path; perplexity (one
number) may move as far as a t-test on the plain model's own spread allows (``_ppl_allowance``);
argmax and token agreement may drop by ``NOISE_MARGIN`` times the plain model's own drop. The ``--tolerance`` values
add fixed slack. A reference without the decode-step figure (a run from before the check) is not
compared on it.
"""

from __future__ import annotations

import math
import re
import statistics

from .derive import NOISE_MARGIN, SPEEDS, exact_allowance, plain, speed_runs, usable
from .report import rounds_text
from .stats import log_sd, mann_whitney_can_reject, mann_whitney_p, median_se, runs_of, t_critical

DECODE_LOGITS = "max abs decode-step logit diff vs the plain model"
MW_ALPHA = 0.002  # asv's threshold for its Mann-Whitney U test
DEFAULT_TOLERANCE = {"speed": 1.10, "vram": 1.02, "ppl": 0.0, "logit": 0.0, "argmax": 0.0, "tokens": 0.0}
TOLERANCE_HELP = {
    "speed": "a speed ratio must fall by more than this factor, and more than the noise allows, to fail",
    "vram": "standby/peak VRAM vs the plain model may grow by this factor",
    "ppl": "relative perplexity change allowed beyond the plain model's own drift",
    "logit": "max abs logit difference (one forward; decode steps) allowed beyond the reference's and the plain drift",
    "argmax": "argmax agreement drop allowed beyond the plain drift",
    "tokens": "greedy-token agreement drop allowed beyond the plain drift",
}


def parse_tolerance(text) -> dict:
    """``speed=1.1,vram=1.02,ppl=0,logit=0,argmax=0,tokens=0`` (any subset) -> dict with defaults filled in."""
    tol = dict(DEFAULT_TOLERANCE)
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"cannot read tolerance {part!r}; write e.g. speed=1.1,logit=0")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in tol:
            raise ValueError(f"unknown tolerance {key!r}; known: {', '.join(tol)}")
        try:
            tol[key] = float(value)
        except ValueError:
            raise ValueError(f"tolerance {key}={value!r} is not a number") from None
        if tol[key] < 0 or not math.isfinite(tol[key]):
            raise ValueError(f"tolerance {key} must be a finite number >= 0")
    for key in ("speed", "vram"):
        if tol[key] < 1:
            raise ValueError(f"tolerance {key} is a factor >= 1 (e.g. {key}={DEFAULT_TOLERANCE[key]})")
    return tol


def tolerance_text(tol: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in tol.items())


def slower(new_runs, old_runs, sigma_new, sigma_old, speed_factor) -> dict:
    """Whether ``new_runs`` are materially and significantly below ``old_runs`` (see the module doc)."""
    n, m = len(new_runs), len(old_runs)
    change = statistics.median(new_runs) / statistics.median(old_runs)
    se = math.hypot(median_se(sigma_new, n), median_se(sigma_old, m))
    floor = math.exp(-max(math.log(speed_factor), t_critical(n + m - 2) * se))
    p = mann_whitney_p(new_runs, old_runs) if mann_whitney_can_reject(n, m, MW_ALPHA) else None
    regressed = change < floor and (p is None or p < MW_ALPHA)
    return {"change": change, "floor": floor, "se": se, "p": p, "regressed": regressed}


def _sigma(run_noise, short, runs) -> float:
    twin = ((run_noise or {}).get("speed") or {}).get(short, {}).get("sigma") or 0.0
    return max(twin, log_sd(runs))


def _how(v, tol) -> str:
    test = "" if v["p"] is None else f", Mann-Whitney p={v['p']:.2g}"
    return (
        f"{v['change']:.3f} of the reference; the gate allows down to {v['floor']:.3f}: factor {tol['speed']:g} "
        f"or t x standard error {v['se']:.3f}{test}"
    )


def _speed(name, nc, oc, new, old, tol, out) -> None:
    if nc.get("static_error") and not oc.get("static_error") and runs_of(oc.get("static_tok_s")):
        out.regress(name, "static-cache generate", f"failed: {nc['static_error']} (the reference ran it)")
    for short in SPEEDS:
        a, b = speed_runs(nc, short), speed_runs(oc, short)
        if not a or not b:
            if b and not a:
                out.regress(name, f"{short} vs baseline", "measured in the reference run only")
            continue
        if min(len(a), len(b)) < 2:  # one round says nothing of its spread: t for 0 degrees of freedom is 318
            out.cannot(
                name,
                f"{short} vs baseline",
                f"{len(b)} timed round(s) in the reference, {len(a)} now: too few to judge a speed "
                "(run both with --repeats 3 or more)",
            )
            continue
        v = slower(a, b, _sigma(new.get("noise"), short, a), _sigma(old.get("noise"), short, b), tol["speed"])
        if v["regressed"]:
            out.regress(
                name,
                f"{short} vs baseline",
                f"{statistics.median(b):.3f}x -> {statistics.median(a):.3f}x of the plain model ({_how(v, tol)})",
            )


def _absolute(name, nc, oc, tol, out) -> None:
    for key in SPEEDS.values():
        a, b = runs_of(nc.get(key)), runs_of(oc.get(key))
        if not a or not b:
            continue
        v = slower(a, b, log_sd(a), log_sd(b), tol["speed"])
        if v["regressed"]:
            out.regress(
                name,
                f"{key} (absolute)",
                f"{statistics.median(b):.4g} -> {statistics.median(a):.4g} tok/s ({_how(v, tol)})",
            )


def _drift(new, old, key) -> float:
    vals = [(r.get("noise") or {}).get(key) for r in (new, old)]
    return max([v for v in vals if v is not None], default=0.0)


def _ppl_allowance(new, old) -> float:
    """How far a config's perplexity (relative to its run's plain reference) may move between runs.

    A run computes the plain model's perplexity ``k + 1`` times (its reference, then ``baseline`` and
    ``baseline:twin``) and records the ``k`` later ones relative to the first: with that first one
    taken as 0, the ``k + 1`` values are the plain model's draws, and their sample variance (``k``
    degrees of freedom, pooled over both runs) estimates the variance ``sigma**2`` of one draw. A
    config's relative perplexity is its draw minus its run's reference draw, so the move between two
    runs is a difference of four draws with standard deviation ``2 * sigma``; its size may reach
    Student's one-sided 0.1% critical value for the pooled degrees of freedom times that (0 when the
    plain model repeats exactly). The test is two-sided and the reference draws enter both the move
    and the variance, so it is approximate: simulated false alarms are 0.10-0.15% per config."""
    squares, dof = 0.0, 0
    for run in (new, old):
        devs = [float(d) for d in (run.get("noise") or {}).get("perplexity_runs") or []]
        if devs:
            values = [0.0, *devs]
            mean = sum(values) / len(values)
            squares += sum((v - mean) ** 2 for v in values)
            dof += len(devs)
    if not dof or not squares:
        return 0.0
    return t_critical(dof) * 2.0 * math.sqrt(squares / dof)


def _relative_ppl(run, c):
    ref = (run.get("reference") or {}).get("perplexity")
    return None if c.get("perplexity") is None or not ref else c["perplexity"] / ref - 1.0


def _figures(name, label, a, b, out):
    """``(a, b)`` as floats when both are finite numbers; else None, after recording why: nothing when
    the reference lacks the figure, a regression when the new run lacks it or it is not a finite
    number there, a cannot-compare line when the reference's is not a finite number."""
    if b is None:
        return None
    if not _finite(b):
        out.cannot(name, label, f"the reference's value {b!r} is not a finite number")
        return None
    if a is None:
        out.regress(name, label, f"missing from the new run (the reference has {b!r})")
        return None
    if not _finite(a):
        out.regress(name, label, f"{b!r} -> {a!r}: not a finite number")
        return None
    return float(a), float(b)


def _finite(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _logit_diff(name, label, a, b, drift_key, new, old, tol, out) -> None:
    """A max abs logit difference from the plain model may grow to the reference's, or to
    :data:`NOISE_MARGIN` times the plain model's own drift on the same path, plus ``logit``."""
    pair = _figures(name, label, a, b, out)
    if pair:
        a, b = pair
        drift = _drift(new, old, drift_key)
        allowed = max(b, exact_allowance(drift)) + tol["logit"]
        if a > allowed:
            out.regress(
                name,
                label,
                f"{b!r} -> {a!r} (allowed {allowed!r}: the "
                f"plain model's own drift {drift!r} x {NOISE_MARGIN:g} + logit={tol['logit']:g})",
            )


def _exactness(name, nc, oc, new, old, tol, out) -> None:
    label = "max abs logit diff vs the plain model"
    _logit_diff(name, label, nc.get("max_abs_logit_diff"), oc.get("max_abs_logit_diff"), "logit", new, old, tol, out)
    label, a, b = DECODE_LOGITS, nc.get("max_abs_decode_logit_diff"), oc.get("max_abs_decode_logit_diff")
    if a is None and b is not None and nc.get("decode_logits_equal") is False:
        out.regress(name, label, f"{b!r} -> not finite where the plain model's are (decode_logits_equal false)")
    else:
        _logit_diff(name, label, a, b, "decode_logit", new, old, tol, out)
    pair = _figures(name, "perplexity", nc.get("perplexity"), oc.get("perplexity"), out)
    a, b = _relative_ppl(new, nc), _relative_ppl(old, oc)
    if pair and a is not None and b is not None:
        allowed = _ppl_allowance(new, old) + tol["ppl"]
        if not abs(a - b) <= allowed:
            out.regress(
                name,
                "perplexity vs the plain model",
                f"{b:+.3g} -> {a:+.3g} relative (moved {abs(a - b):.3g}, allowed {allowed:.3g})",
            )
    checks = (
        ("argmax_agreement", "argmax", "argmax"),
        ("decode_tokens_agree", "tokens", "tokens"),
        ("generate_tokens_agree", "tokens", "tokens"),
        ("static_tokens_agree", "static_tokens", "tokens"),
    )
    for key, drift_key, tol_key in checks:
        pair = _figures(name, key, nc.get(key), oc.get(key), out)
        if not pair:
            continue
        a, b = pair
        allowed = NOISE_MARGIN * _drift(new, old, drift_key) + tol[tol_key]
        if a < b - allowed:
            out.regress(name, key, f"{b:.4f} -> {a:.4f} (allowed drop {allowed:.3g})")


def _memory(name, nc, oc, new, old, tol, out) -> None:
    factor = max(tol["vram"], 1.0 + NOISE_MARGIN * _drift(new, old, "vram"))
    for key in ("standby_vs_baseline", "peak_vs_baseline"):
        a, b = (nc.get("ratios") or {}).get(key), (oc.get("ratios") or {}).get(key)
        if a is not None and b is not None and a > factor * b:
            out.regress(
                name,
                key.replace("_vs_", " VRAM vs "),
                f"{b:.3f}x -> {a:.3f}x of the plain model (allowed {factor:.3f} x {b:.3f})",
            )


class Verdict:
    """What the gate found: ``regressions`` (each names the config, the figure and by how much),
    ``incomparable`` (what the gate could not compare: each fails the gate too) and ``notes``."""

    def __init__(self):
        self.regressions, self.incomparable, self.notes = [], [], []

    def regress(self, config, figure, how):
        self.regressions.append(f"{config}: {figure}: {how}")

    def cannot(self, config, figure, how):
        self.incomparable.append(f"{config}: {figure}: {how}")


def _walk_numbers(value, where):
    """``(where, number)`` for every number (not bool) inside ``value``, however nested."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_numbers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


_AGREEMENTS = ("argmax_agreement", "decode_tokens_agree", "generate_tokens_agree", "static_tokens_agree")


def _measurable(figure: str, v: float) -> bool:
    """Whether ``v`` can be a measurement of ``figure``: speeds and perplexity above 0, a logit
    difference not below 0, agreements in [0, 1]; other figures are not bounded here."""
    if figure in SPEEDS.values() or figure == "perplexity":
        return v > 0
    if figure == "max_abs_logit_diff":
        return v >= 0
    if figure in _AGREEMENTS:
        return 0 <= v <= 1
    return True


def _not_measurements(c: dict) -> list:
    """``(where, value, why)`` for each measured figure of config ``c`` that is no measurement: not a
    finite number (NaN, Inf, too large for a float) or outside what the figure can be; its spec
    (``config``) and derived ``ratios`` are left out."""
    measured = {k: v for k, v in c.items() if k not in ("config", "ratios")}
    bad = []
    for where, v in _walk_numbers(measured, ""):
        if not _finite(v):
            bad.append((where, v, "not a finite number"))
        elif not _measurable(re.split(r"[.\[]", where, maxsplit=1)[0], float(v)):
            bad.append((where, v, "outside what this figure can be"))
    return bad


def _device_kind(run) -> str | None:
    device = (run.get("settings") or {}).get("device")
    return str(device).split(":", 1)[0] if device else None


def _context(new, old, out) -> None:
    """Notes on what differs between the runs; a different model (name, architecture, layer count, hidden
    or vocabulary size), dtype or kind of device (cpu, cuda) cannot be compared."""
    om, nm = old.get("model") or {}, new.get("model") or {}
    for what, a, b in (
        ("model", om.get("name"), nm.get("name")),
        ("architecture", om.get("architecture"), nm.get("architecture")),
        ("layer count", om.get("num_layers"), nm.get("num_layers")),
        ("hidden size", om.get("hidden_size"), nm.get("hidden_size")),
        ("vocabulary size", om.get("vocab_size"), nm.get("vocab_size")),
        ("dtype", old.get("settings", {}).get("dtype"), new.get("settings", {}).get("dtype")),
        ("device kind", _device_kind(old), _device_kind(new)),
    ):
        if a != b:
            out.cannot("run", what, f"reference {a!r}, new {b!r}: gate runs of one model, dtype and kind of device")
    a = old.get("env", {}).get("gpu_name") or old.get("env", {}).get("cpu")
    b = new.get("env", {}).get("gpu_name") or new.get("env", {}).get("cpu")
    if a != b:
        out.notes.append(f"note: device differs: reference {a!r}, new {b!r}")
    if old.get("inputs", {}).get("ppl_ids_sha256") != new.get("inputs", {}).get("ppl_ids_sha256"):
        out.notes.append("note: the perplexity text tokenizes differently (other tokenizer or Python)")
    if plain(new) is None:
        out.notes.append("note: the new run has no usable plain model: no ratio can be compared")
    if _cold_meaning(old) != _cold_meaning(new):
        both = {c["name"] for c in old.get("configs", [])} & {c["name"] for c in new.get("configs", [])}
        for c in old.get("configs", []):
            if c["name"] in both and c["config"].get("cold"):
                out.cannot(
                    c["name"],
                    "cold figures",
                    "lp-bench/2 timed a cold config's decode steps from the page cache, later versions read every "
                    "step from the storage: measure both runs with one version",
                )
    for label, run in (("reference", old), ("new run", new)):
        if run.get("complete") is False:
            out.cannot("run", label, f"stopped after {rounds_text(run)}: gate against a run that finished")
    for label, run, record in (("reference", old, out.cannot), ("new run", new, out.regress)):
        ref_ppl = (run.get("reference") or {}).get("perplexity")
        if ref_ppl is not None and not (_finite(ref_ppl) and ref_ppl > 0):
            record(
                "run",
                "the plain model's reference perplexity",
                f"{ref_ppl!r} in the {label} is not a finite number > 0",
            )


def _cold_meaning(run: dict) -> bool:
    """Whether a run's cold configs read every decode step from the storage (lp-bench/3 on) or, before, only the
    prompt (the steps then read the page cache the prompt filled)."""
    return str(run.get("schema")) not in ("lp-bench/1", "lp-bench/2")


def compare(new: dict, old: dict, tol: dict, absolute: bool = False) -> Verdict:
    """Compare run ``new`` against reference run ``old`` (see the module doc). A figure of the
    reference that is missing from the new run, or not a finite number there, is a regression; a
    reference without configs, or with a figure that is not a finite number, cannot be compared."""
    out = Verdict()
    _context(new, old, out)
    if not old.get("configs"):
        out.cannot("run", "reference", "has no config to compare against")
    for label, run, record in (("the reference's", old, out.cannot), ("", new, out.regress)):
        base = plain(run)
        for where, v, why in _not_measurements(base) if base else []:
            record(base["name"], where, f"{label} value {v!r} is {why}".strip())
    if out.incomparable or out.regressions:
        return out  # every figure of the run depends on it (ratios are taken against the plain model)
    new_by = {c["name"]: c for c in new.get("configs", [])}
    gated = 0  # configs besides the plain model measured in both runs
    for oc in old.get("configs", []):
        name, nc = oc["name"], new_by.get(oc["name"])
        if nc is None:
            out.regress(name, "config", "missing from the new results")
        elif nc.get("error"):
            out.regress(name, "config", f"failed: {nc['error']}")
        elif not usable(oc):
            why = oc.get("error") or oc.get("not_applicable")
            out.notes.append(f"note: {name}: not measured in the reference ({why})")
        elif not usable(nc):
            out.regress(name, "config", f"ran in the reference, not applicable now ({nc.get('not_applicable')})")
        else:
            bad_old, bad_new = _not_measurements(oc), _not_measurements(nc)
            for where, v, why in bad_old:
                out.cannot(name, where, f"the reference's value {v!r} is {why}")
            for where, v, why in bad_new:
                out.regress(name, where, f"{v!r}: {why}")
            if bad_old or bad_new:
                continue  # ratios and medians of such figures mean nothing
            if oc["config"]["kind"] != "baseline":
                gated += 1
                _speed(name, nc, oc, new, old, tol, out)
                _exactness(name, nc, oc, new, old, tol, out)
                _memory(name, nc, oc, new, old, tol, out)
            if absolute:
                _absolute(name, nc, oc, tol, out)
    if not gated and not out.regressions:
        out.cannot("run", "configs", "no config besides the plain model was measured in both runs: nothing was gated")
    return out


def missed_goals(out: dict) -> list:
    """The goals this run missed, one line each (``--fail-on-miss`` makes them fail the run)."""
    lines = []
    for g in out.get("goals") or []:
        if not g["met"]:
            value = (
                "-"
                if g["value"] is None
                else (f"{g['value']:.4g}" if isinstance(g["value"], float) else str(g["value"]))
            )
            lines.append(f"{g['config']}: missed goal: {g['goal']} = {value} (target {g['target'] or '-'})")
    return lines
