"""lp-bench's terminal table and results files (no torch: a results file can be read, compared and
plotted on any machine)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap

from lp_plugin.core.report import GIB

from .derive import DECODE_LOGIT_GOAL, EXACTNESS_GOALS, derive, usable
from .stats import median_of

HEAD = [
    "config",
    "standby GiB",
    "peak GiB",
    "prefill tok/s",
    "decode tok/s",
    "generate tok/s",
    "static tok/s",
    "logit diff",
    "dec logit",
    "argmax",
    "ppl",
    "MiB/fwd",
    "bound tok/s",
    "dec/base",
    "gen/base",
    "static/base",
    "dec/bound",
    "dec/accel",
    "dec/acc-disk",
    "dec/air",
    "pre/air",
    "peak/budget",
    "disk/cpu",
    "dec/noskip",
    "saved GiB",
]


def _fmt(v, kind="f", digits=1):
    if v is None:
        return "-"
    if kind == "gib":
        return f"{v / GIB:.2f}"
    if kind == "mib":
        return f"{v / 1024**2:.0f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "e":
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _span(res, key, kind="f", digits=1):
    s = res.get(key)
    if not isinstance(s, dict):
        return _fmt(s, kind, digits)
    return f"{_fmt(s['median'], kind, digits)} [{_fmt(s['min'], kind, digits)}-{_fmt(s['max'], kind, digits)}]"


def decode_logit_text(c) -> str:
    """The max abs difference of a config's decode-step logits from the plain model's: ``inf`` where they
    were not finite at the same places (the JSON records no number then, and ``decode_logits_equal`` False)."""
    if c.get("max_abs_decode_logit_diff") is None and c.get("decode_logits_equal") is False:
        return "inf"
    return _fmt(c.get("max_abs_decode_logit_diff"), "e")


def _row(c) -> list:
    if c.get("error"):
        return [c["name"], "ERROR: " + c["error"].splitlines()[0][:160]] + [""] * (len(HEAD) - 2)
    if c.get("not_applicable"):
        return [c["name"], "n/a: " + c["not_applicable"]] + [""] * (len(HEAD) - 2)
    r = c.get("ratios") or {}
    return [
        c["name"] + (" (noise)" if c["config"].get("twin") else ""),
        _span(c, "standby_vram_bytes", "gib"),
        _span(c, "peak_vram_bytes", "gib"),
        _span(c, "prefill_tok_s", "f", 0),
        _span(c, "decode_tok_s"),
        _span(c, "generate_tok_s"),
        "failed" if c.get("static_error") else _span(c, "static_tok_s"),
        _fmt(c.get("max_abs_logit_diff"), "e"),
        decode_logit_text(c),
        _fmt(c.get("argmax_agreement"), "f", 3),
        _fmt(c.get("perplexity"), "e"),
        _fmt(c.get("bytes_per_forward"), "mib"),
        _fmt(c.get("transfer_bound_tok_s")),
        _fmt(median_of(r.get("decode_vs_baseline")), "x"),
        _fmt(median_of(r.get("generate_vs_baseline")), "x"),
        _fmt(median_of(r.get("static_vs_baseline")), "x"),
        _fmt(r.get("decode_vs_transfer_bound"), "x"),
        _fmt(median_of(r.get("decode_vs_accelerate_cpu")), "x"),
        _fmt(median_of(r.get("decode_vs_accelerate_disk")), "x"),
        _fmt(median_of(r.get("decode_vs_airllm")), "x"),
        _fmt(median_of(r.get("prefill_vs_airllm")), "x"),
        _fmt(r.get("peak_vs_budget"), "x"),
        _fmt(median_of(r.get("decode_vs_cpu_tier")), "x"),
        _fmt(median_of(r.get("decode_vs_unskipped")), "x"),
        _fmt(r.get("standby_saved_bytes"), "gib"),
    ]


WIDTH = 120  # the default table fits a terminal of this many columns; --wide shows every figure

# the default view's columns in the order shown; columns every row leaves empty are dropped, then
# those of DROP_FIRST in turn until the table fits WIDTH (--wide and the JSON keep them all)
COMPACT = [
    "config",
    "memory",
    "standby GiB",
    "peak GiB",
    "saved GiB",
    "decode tok/s",
    "dec/base",
    "dec/noskip",
    "step/base",
    "gen/base",
    "static/base",
    "logit diff",
    "dec logit",
    "ppl",
    "MiB/fwd",
    "disk/cpu",
    "dec/air",
]
DROP_FIRST = [
    "dec logit",
    "step/base",
    "static/base",
    "MiB/fwd",
    "gen/base",
    "disk/cpu",
    "ppl",
    "saved GiB",
    "dec/noskip",
]


def _wrap(text: str, indent: str = "  ") -> list:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False, break_long_words=True) or [""]


def _header_lines(out) -> list:
    env, bw, model, s = out["env"], out["bandwidth"], out["model"], out["settings"]
    static = s.get("static") or {}
    static_text = "static cache: not measured (--static on measures it)"
    if static.get("measured"):
        static_text = (
            "static cache: compiled by transformers"
            if static.get("compiled_by_transformers")
            else (f"static cache: {static.get('note') or 'uncompiled'}")
        )
    lines = [
        f"lp-bench {model['name']} ({s['dtype']}, {model['architecture']}, {model['num_layers']} layers) "
        f"on {env.get('gpu_name') or env.get('cpu') or env['device']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, accelerate {env['accelerate']}",
        f"H2D bandwidth: pinned {_fmt(bw.get('pinned_h2d_gbps'))} GB/s, "
        f"pageable {_fmt(bw.get('pageable_h2d_gbps'))} GB/s"
        + (f" ({bw['note']})" if bw.get("note") else "")
        + f"; {static_text}",
        *_storage_line(bw.get("storage_read")),
        f"median [min-max] of {rounds_text(out)} (interleaved) after a warm-up; x/base, dec/accel, disk/cpu and "
        "dec/noskip (a skipping config against the same config without skipping) are medians of per-round "
        "ratios; saved GiB: the standby VRAM skipping saves against that config",
    ]
    return [w for line in lines for w in _wrap(line)]


def _storage_line(storage) -> list:
    """The storage's read speed under the offload folder (measured for cold-cache configs: their bound)."""
    if not storage:
        return []
    how = f"{'O_DIRECT' if storage.get('direct') else 'buffered, after an eviction'}, {storage.get('threads')} threads"
    speed = "-"
    if storage.get("gbps"):
        speed = f"{_fmt(storage['gbps'])} GB/s [{_fmt(storage['min'])}-{_fmt(storage['max'])}]"
    note = f" ({storage['note']})" if storage.get("note") else ""
    where = f"storage read under the offload folder ({storage.get('fs')})"
    return [f"{where}: {speed} ({how}){note}: the bound of the cold configs"]


def _noise_line(out) -> str:
    nz = out.get("noise") or {}
    parts = []
    for short, v in (nz.get("speed") or {}).items():
        if v.get("sigma") is not None:
            parts.append(f"{short} ±{100 * v['sigma']:.1f}%")
    parts.append(_logit_noise(nz.get("logit"), nz.get("decode_logit")))
    return "noise (the plain model against itself, same run): " + ", ".join(parts)


def _logit_noise(logit, decode) -> str:
    """The plain model's logit drift against itself: one forward, then the decode steps (when measured)."""

    def drift(v):
        return "repeat exactly" if v == 0 else f"drift {v:.3g}" if v is not None else "-"

    if logit == 0 and decode in (0, None):
        return "logits repeat exactly"
    return f"logits {drift(logit)}" + ("" if decode is None else f", decode-step logits {drift(decode)}")


def _measured_memory(out) -> bool:
    return any(median_of(c.get("standby_vram_bytes")) is not None for c in out["configs"] if usable(c))


def computed_memory(out, c):
    """Without a GPU to measure on: the bytes left on the main device, computed as the model's bytes
    minus the offloaded bytes and the skipped layers it does not hold (what the plot shows too)."""
    total = (out.get("model") or {}).get("param_bytes")
    return None if total is None else total - (c.get("offloaded_bytes") or 0) - (c.get("skipped_bytes") or 0)


def _compact_row(out, c, unit) -> dict:
    r = c.get("ratios") or {}
    mem = computed_memory(out, c)
    return {
        "config": c["name"] + (" (noise)" if c["config"].get("twin") else ""),
        "memory": "-" if mem is None else f"{mem / unit[1]:.2f}" if unit[1] == GIB else f"{mem / unit[1]:.1f}",
        "standby GiB": _fmt(median_of(c.get("standby_vram_bytes")), "gib"),
        "peak GiB": _fmt(median_of(c.get("peak_vram_bytes")), "gib"),
        "decode tok/s": _fmt(median_of(c.get("decode_tok_s"))),
        "dec/base": _fmt(median_of(r.get("decode_vs_baseline")), "x"),
        "dec/noskip": _fmt(median_of(r.get("decode_vs_unskipped")), "x"),
        "saved GiB": _fmt(r.get("standby_saved_bytes"), "gib"),
        "step/base": _fmt(median_of(r.get("decode_step_vs_baseline")), "x"),
        "gen/base": _fmt(median_of(r.get("generate_vs_baseline")), "x"),
        "static/base": "failed" if c.get("static_error") else _fmt(median_of(r.get("static_vs_baseline")), "x"),
        "logit diff": _fmt(c.get("max_abs_logit_diff"), "e"),
        "dec logit": decode_logit_text(c),
        "ppl": _fmt(c.get("perplexity"), "e"),
        "MiB/fwd": _fmt(c.get("bytes_per_forward"), "mib"),
        "disk/cpu": _fmt(median_of(r.get("decode_vs_cpu_tier")), "x"),
        "dec/air": _fmt(median_of(r.get("decode_vs_airllm")), "x"),
    }


def _compact(out) -> list:
    measured = _measured_memory(out)
    sizes = [computed_memory(out, c) for c in out["configs"] if usable(c)]
    unit = ("GiB", GIB) if any(s and s >= GIB for s in sizes) else ("MiB", 2**20)
    heads = [h for h in COMPACT if h != ("memory" if measured else "")]
    if not measured:
        heads = [h for h in heads if h not in ("standby GiB", "peak GiB")]
    labels = {"memory": f"on device {unit[0]}*"}
    rows, notes = [], []
    for c in out["configs"]:
        if c.get("error"):
            notes.append((c["name"], "ERROR: " + c["error"].splitlines()[0]))
        elif c.get("not_applicable"):
            notes.append((c["name"], "n/a: " + c["not_applicable"]))
        else:
            rows.append(_compact_row(out, c, unit))
    heads = [h for h in heads if h == "config" or any(row[h] != "-" for row in rows)]
    drop = [h for h in DROP_FIRST if h in heads]
    while drop and sum(max(len(labels.get(h, h)), *(len(r[h]) for r in rows)) + 2 for h in heads) - 2 > WIDTH:
        heads.remove(drop.pop(0))
    widths = [max([len(labels.get(h, h))] + [len(r[h]) for r in rows]) for h in heads]
    widths[0] = max([widths[0]] + [len(n) for n, _ in notes])
    lines = [
        "  ".join(labels.get(h, h).ljust(w) for h, w in zip(heads, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(heads, widths)).rstrip() for r in rows]
    for name, text in notes:
        lines += _wrap(f"{name.ljust(widths[0])}  {text}", " " * (widths[0] + 2))
    if not measured:
        lines.append(
            f"* computed, not measured (no GPU): the model's {unit[0]} left on the main device, its bytes "
            "minus those offloaded or skipped"
        )
    return lines


def _wide(out) -> list:
    rows = [_row(c) for c in out["configs"]]
    full = [row for row in rows if not row[1].startswith(("ERROR", "n/a"))]
    widths = [max(len(str(x)) for x in col) for col in zip(HEAD, *full)]
    widths[0] = max(len(row[0]) for row in rows + [HEAD])
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEAD, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        if row[1].startswith(("ERROR", "n/a")):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return lines


def _goal_lines(out) -> list:
    lines = []
    for g in out.get("goals") or []:
        val = g["value"]
        val = "-" if val is None else (f"{val:.3g}" if isinstance(val, float) else str(val))
        tag = "ok" if g["met"] else "MISS"
        note = ""
        if g.get("within_noise"):
            tag = "~"
            side = "on the target's side" if g["met"] else "short of it"
            note = (
                f"; {side}, but within this run's noise (±{100 * (math.exp(g['noise_band']) - 1):.0f}%): "
                "could go either way"
            )
        lines += _wrap(f"  [{tag}] {g['config']}: {g['goal']} = {val} (target {g['target'] or '-'}{note})", "       ")
    return lines


def format_table(out: dict, wide: bool = False) -> str:
    """The terminal view of a run: the default fits :data:`WIDTH` columns; ``wide`` shows every figure
    with its [min-max] (the JSON holds everything)."""
    lines = _header_lines(out) + _wrap(_noise_line(out))
    lines += _wide(out) if wide else _compact(out)
    for c in out["configs"]:
        if c.get("static_error"):
            lines += _wrap(f"{c['name']}: static-cache generate failed: {c['static_error']}")
    if out.get("goals"):
        lines += ["", "goals ([~]: the difference from the target is inside the run's own noise):"]
        lines += _goal_lines(out)
    return "\n".join(lines)


# what deriving from or comparing a results file with a figure of the wrong form raises
FORM_ERRORS = (
    TypeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    ZeroDivisionError,
    RecursionError,
)


class ResultsError(ValueError):
    """A results file lp-bench cannot read or compare (exit status 2)."""


def _check_shape(data, path) -> None:
    """The structure every reader relies on: a dict with ``schema`` and a list of configs, each a dict
    with a string ``name`` and a ``config`` dict whose ``kind`` is a string."""
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("lp-bench/") or "configs" not in data:
        raise ResultsError(f"{path} is not an lp-bench results file (no 'schema': 'lp-bench/...' with configs)")
    if not isinstance(data["configs"], list):
        raise ResultsError(f"{path}: 'configs' is a {type(data['configs']).__name__}, not a list")
    for i, c in enumerate(data["configs"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ResultsError(f"{path}: configs[{i}] is not a config with a string 'name'")
        if not isinstance(c.get("config"), dict) or not isinstance(c["config"].get("kind"), str):
            raise ResultsError(f"{path}: config {c['name']!r} has no 'config' table with a string 'kind'")
        for key, figure in c.items():  # a measured figure: {"runs": [numbers], "median": number, ...}
            if (
                isinstance(figure, dict)
                and "runs" in figure
                and not (
                    figure["runs"] is None
                    or (
                        isinstance(figure["runs"], list)
                        and all(
                            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))
                            for x in figure["runs"]
                        )
                    )
                )
            ):
                raise ResultsError(f"{path}: config {c['name']!r}: {key}.runs is not a list of numbers")
    for key in ("model", "settings", "env", "inputs", "reference"):
        if not isinstance(data.get(key, {}), dict):
            raise ResultsError(f"{path}: {key!r} is a {type(data[key]).__name__}, not a table")
    _check_rounds(data, path)


def _check_rounds(data, path) -> None:
    """``complete`` and ``rounds_done`` (files from before them have neither: complete) agree with each other and
    with the rounds the run was set to."""
    if "complete" not in data and "rounds_done" not in data:
        return
    repeats, done, complete = (data.get("settings") or {}).get("repeats"), data.get("rounds_done"), data.get("complete")
    if not isinstance(complete, bool):
        raise ResultsError(f"{path}: 'complete' is {complete!r}, not true or false")
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (repeats, done))
    if not ints or not 0 <= done <= repeats or complete != (done == repeats):
        raise ResultsError(
            f"{path}: 'rounds_done' {done!r} does not fit 'complete' {complete!r} of settings.repeats {repeats!r}"
        )


def verdict(out: dict, gate: str | None) -> str:
    """One line saying what matters: exactness, the gate (``gate``: its outcome, or None when not
    run), and the goals, those within the run's noise counted apart."""
    goals = out.get("goals") or []
    logit = [g for g in goals if g["goal"] in EXACTNESS_GOALS]
    failed = [c["name"] for c in out["configs"] if c.get("error")]
    exact = _exactness_text(logit)
    speed = [g for g in goals if g not in logit]
    noisy = sum(bool(g.get("within_noise")) for g in speed)
    met = sum(bool(g["met"]) and not g.get("within_noise") for g in speed)
    missed = len(speed) - met - noisy
    parts = [
        exact,
        gate or "no gate (--compare REF)",
        f"speed goals: {met} met, {missed} missed, {noisy} in noise",
    ]
    if failed:
        parts.insert(0, f"FAILED: {', '.join(failed)}")
    if out.get("complete") is False:
        parts.insert(0, f"STOPPED after {rounds_text(out)}")
    return "verdict: " + "; ".join(parts)


def rounds_text(out: dict) -> str:
    """``"3 of 5 rounds"`` for a run that stopped early (results written after each round), else ``"5 rounds"``."""
    repeats = (out.get("settings") or {}).get("repeats")
    done = out.get("rounds_done", repeats)
    return f"{done} of {repeats} rounds" if done != repeats else f"{repeats} rounds"


def _exactness_text(logit: list) -> str:
    """The verdict on exactness from the exactness goals: a config equals the plain model when its logits
    do in one forward and through the decode steps."""
    names = list(dict.fromkeys(g["config"] for g in logit))
    if not names:
        return "exactness: not measured"
    missed = {name: {g["goal"] for g in logit if g["config"] == name and not g["met"]} for name in names}
    differ = [name for name in names if missed[name]]
    decode_only = sum(missed[name] == {DECODE_LOGIT_GOAL} for name in differ)
    unchecked = len(names) - len({g["config"] for g in logit if g["goal"] == DECODE_LOGIT_GOAL})
    tail = f"; decode steps unchecked: {unchecked}" if unchecked else ""  # a results file from before the check
    if not differ:
        return f"exact ({len(names)} of {len(names)} configs equal the plain model{tail})"
    only = f", {decode_only} in the decode steps only" if decode_only else ""
    return f"NOT EXACT ({len(differ)} of {len(names)} configs differ from the plain model{only}{tail})"


def load_results(path: str) -> dict:
    """Read an lp-bench results file and derive its ratios, noise and goals again from the raw figures
    (so derived fields never disagree with the measurements they come from). Anything that is not a
    well-formed results file raises :class:`ResultsError`."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ResultsError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError, RecursionError) as exc:
        raise ResultsError(f"{path}: cannot read it as JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_shape(data, path)
    try:
        derive(data)
        format_table(data)
    except FORM_ERRORS as exc:
        raise ResultsError(f"{path}: a figure has the wrong form ({type(exc).__name__}: {str(exc)[:200]})") from None
    return data


def write_json(out: dict, path: str) -> None:
    """Write ``out`` atomically (strict JSON: no NaN or Infinity)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:  # the file as it was, and no half-written copy beside it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
