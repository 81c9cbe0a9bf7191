"""lp-bench's terminal table and results files (no torch: a results file can be read, compared and
plotted on any machine)."""

from __future__ import annotations

import json
import os

from lp_plugin.report import GIB

from .derive import derive
from .stats import median_of

HEAD = ["config", "standby GiB", "peak GiB", "prefill tok/s", "decode tok/s", "generate tok/s", "static tok/s",
        "logit diff", "argmax", "ppl", "MiB/fwd", "bound tok/s", "dec/base", "gen/base", "static/base", "dec/bound",
        "dec/accel", "peak/budget", "disk/cpu"]


def _fmt(v, kind="f", digits=1):
    if v is None:
        return "-"
    if kind == "gib":
        return f"{v / GIB:.2f}"
    if kind == "mib":
        return f"{v / 1024 ** 2:.0f}"
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


def _row(c) -> list:
    if c.get("error"):
        return [c["name"], "ERROR: " + c["error"].splitlines()[0][:160]] + [""] * (len(HEAD) - 2)
    if c.get("not_applicable"):
        return [c["name"], "n/a: " + c["not_applicable"]] + [""] * (len(HEAD) - 2)
    r = c.get("ratios") or {}
    return [
        c["name"] + (" (noise)" if c["config"].get("twin") else ""),
        _span(c, "standby_vram_bytes", "gib"), _span(c, "peak_vram_bytes", "gib"), _span(c, "prefill_tok_s", "f", 0),
        _span(c, "decode_tok_s"), _span(c, "generate_tok_s"), "failed" if c.get("static_error") else _span(c, "static_tok_s"),
        _fmt(c.get("max_abs_logit_diff"), "e"), _fmt(c.get("argmax_agreement"), "f", 3), _fmt(c.get("perplexity"), "e"),
        _fmt(c.get("bytes_per_forward"), "mib"), _fmt(c.get("transfer_bound_tok_s")),
        _fmt(median_of(r.get("decode_vs_baseline")), "x"), _fmt(median_of(r.get("generate_vs_baseline")), "x"),
        _fmt(median_of(r.get("static_vs_baseline")), "x"), _fmt(r.get("decode_vs_transfer_bound"), "x"),
        _fmt(median_of(r.get("decode_vs_accelerate_cpu")), "x"), _fmt(r.get("peak_vs_budget"), "x"),
        _fmt(median_of(r.get("decode_vs_cpu_tier")), "x"),
    ]


def _header_lines(out) -> list:
    env, bw, model, s = out["env"], out["bandwidth"], out["model"], out["settings"]
    static = s.get("static") or {}
    static_text = "static cache: not measured (--static on measures it)"
    if static.get("measured"):
        static_text = "static cache: compiled by transformers" if static.get("compiled_by_transformers") else (
            f"static cache: {static.get('note') or 'uncompiled'}")
    return [
        f"lp-bench {model['name']} ({s['dtype']}, {model['architecture']}, {model['num_layers']} layers) "
        f"on {env.get('gpu_name') or env.get('cpu') or env['device']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, accelerate {env['accelerate']}",
        f"H2D bandwidth: pinned {_fmt(bw.get('pinned_h2d_gbps'))} GB/s, pageable {_fmt(bw.get('pageable_h2d_gbps'))} GB/s"
        + (f" ({bw['note']})" if bw.get("note") else "") + f"; {static_text}",
        f"median [min-max] of {s['repeats']} interleaved rounds after a warm-up; x/base, dec/accel and disk/cpu are "
        "medians of per-round ratios",
    ]


def _noise_line(out) -> str:
    nz = out.get("noise") or {}
    parts = []
    for short, v in (nz.get("speed") or {}).items():
        if v.get("sigma") is not None:
            parts.append(f"{short} ±{100 * v['sigma']:.1f}%")
    logit = nz.get("logit")
    parts.append("logits repeat exactly" if logit == 0 else f"logits drift {logit:.3g}" if logit is not None else "logits: -")
    return "noise (the plain model against itself, same run): " + ", ".join(parts)


def format_table(out: dict) -> str:
    rows = [_row(c) for c in out["configs"]]
    full = [row for row in rows if not row[1].startswith(("ERROR", "n/a"))]
    widths = [max(len(str(x)) for x in col) for col in zip(HEAD, *full)]
    widths[0] = max(len(row[0]) for row in rows + [HEAD])
    lines = _header_lines(out) + [_noise_line(out)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(HEAD, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if row[1].startswith(("ERROR", "n/a")):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    for c in out["configs"]:
        if c.get("static_error"):
            lines.append(f"{c['name']}: static-cache generate failed: {c['static_error']}")
    if out.get("goals"):
        lines += ["", "goals:"]
        for g in out["goals"]:
            val = g["value"]
            val = "-" if val is None else (f"{val:.3g}" if isinstance(val, float) else str(val))
            lines.append(f"  [{'ok' if g['met'] else 'MISS'}] {g['config']}: {g['goal']} = {val} (target {g['target'] or '-'})")
    return "\n".join(lines)


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
    for key in ("model", "settings", "env", "inputs", "reference"):
        if not isinstance(data.get(key, {}), dict):
            raise ResultsError(f"{path}: {key!r} is a {type(data[key]).__name__}, not a table")


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
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, ZeroDivisionError,
            RecursionError) as exc:
        raise ResultsError(f"{path}: a figure has the wrong form ({type(exc).__name__}: {str(exc)[:200]})") from None
    return data


def write_json(out: dict, path: str) -> None:
    """Write ``out`` atomically (strict JSON: no NaN or Infinity)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1, allow_nan=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)
