"""Derived ratios and goals, the terminal table, the PNG plot and ``--compare`` of lp-bench.
No torch import here: a results file can be compared and plotted on any machine."""

from __future__ import annotations

import json
import math

GIB = 1024 ** 3
PEAK_SLACK_BYTES = int(0.2 * GIB)  # the issue's "+ 0.2 GiB" of activations over standby + ring


def _med(res, key):
    v = res.get(key)
    if isinstance(v, dict):
        return v.get("median")
    return v


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _paired(res, other, key):
    """median/min/max over rounds of ``res[key] / other[key]`` taken round by round. Each round runs
    every config back to back, so a drift between rounds (clocks, host load: batch-1 decode on a GPU
    moves by 30% from one round to the next) cancels; None unless both have every round."""
    if not res or not other:
        return None
    a, b = res.get(key), other.get(key)
    runs_a = a.get("runs") if isinstance(a, dict) else None
    runs_b = b.get("runs") if isinstance(b, dict) else None
    if not runs_a or not runs_b or len(runs_a) != len(runs_b) or not all(runs_b):
        return None
    from .runner import stat  # stdlib only at import time

    return stat([x / y for x, y in zip(runs_a, runs_b)])


def derive(out: dict) -> dict:
    """Add ``ratios`` to every config and the issue's ``goals`` list to ``out`` (in place)."""
    configs = out["configs"]
    by_name = {c["name"]: c for c in configs}
    base = by_name.get("baseline") if by_name.get("baseline", {}).get("error") is None else None
    acc = next((c for c in configs if c["config"]["kind"] == "accelerate_cpu" and c["error"] is None), None)
    base_decode = _med(base, "decode_tok_s") if base else None
    base_prefill = _med(base, "prefill_tok_s") if base else None
    base_standby = _med(base, "standby_vram_bytes") if base else None
    base_peak = _med(base, "peak_vram_bytes") if base else None
    for c in configs:
        cfg = c["config"]
        decode = _med(c, "decode_tok_s")
        prefill = _med(c, "prefill_tok_s")
        standby = _med(c, "standby_vram_bytes")
        peak = _med(c, "peak_vram_bytes")
        ratios = {
            "decode_vs_baseline": _ratio(decode, base_decode),
            "generate_vs_baseline": _ratio(_med(c, "generate_tok_s"), _med(base, "generate_tok_s") if base else None),
            "prefill_vs_baseline": _ratio(prefill, base_prefill),
            "decode_vs_transfer_bound": _ratio(decode, c.get("transfer_bound_tok_s")),
            "decode_vs_accelerate_cpu": _ratio(decode, _med(acc, "decode_tok_s")) if acc and acc is not c else None,
            "standby_vs_baseline": _ratio(standby, base_standby),
            "peak_vs_baseline": _ratio(peak, base_peak),
            "decode_vs_bound_or_baseline": None,
            "prefill_vs_bound": None,
            "peak_budget_bytes": None,
            "peak_vs_budget": None,
            "decode_vs_cpu_tier": None,
            # the same ratios taken round by round (median [min-max] of per-round ratios)
            "decode_vs_baseline_paired": _paired(c, base, "decode_tok_s") if base else None,
            "decode_vs_cpu_tier_paired": None,
        }
        bounds = [b for b in (base_decode, c.get("transfer_bound_tok_s")) if b]
        if bounds and decode is not None and cfg["kind"] != "baseline":
            ratios["decode_vs_bound_or_baseline"] = decode / min(bounds)
        pbounds = [b for b in (base_prefill, c.get("prefill_transfer_bound_tok_s")) if b]
        if pbounds and prefill is not None and cfg["kind"] != "baseline":
            ratios["prefill_vs_bound"] = prefill / min(pbounds)
        if cfg["kind"] == "lp" and cfg["mode"] == "stream" and standby is not None and c.get("layer_bytes"):
            budget = standby + (cfg["prefetch"] + 1) * c["layer_bytes"] + PEAK_SLACK_BYTES
            ratios["peak_budget_bytes"] = budget
            ratios["peak_vs_budget"] = _ratio(peak, budget)
        if cfg["kind"] == "lp" and cfg["tier"] != "cpu":
            twin = next((o for o in configs if o["config"]["kind"] == "lp" and o["config"]["tier"] == "cpu"
                         and all(o["config"][k] == cfg[k] for k in ("mode", "spec", "alpha", "prefetch"))
                         and not o["config"]["cold"]), None)
            if twin is not None:
                ratios["decode_vs_cpu_tier"] = _ratio(decode, _med(twin, "decode_tok_s"))
                ratios["decode_vs_cpu_tier_paired"] = _paired(c, twin, "decode_tok_s")
        c["ratios"] = ratios
    out["goals"] = goals(out)
    return out


def goals(out: dict) -> list:
    """The issue's goals, evaluated where this run has the figures (batch 1, same run)."""
    rows = []
    dtype = out.get("settings", {}).get("dtype")

    def add(config, goal, value, target, met):
        rows.append({"config": config, "goal": goal, "value": value, "target": target, "met": met})

    for c in out["configs"]:
        if c.get("error"):
            add(c["name"], "runs without error", None, None, False)
            continue
        cfg, r = c["config"], c.get("ratios", {})
        if cfg["kind"] == "lp" and cfg["alpha"] == 1.0 and c.get("max_abs_logit_diff") is not None:
            add(c["name"], "alpha=1: max abs logit diff", c["max_abs_logit_diff"], "== 0", c["max_abs_logit_diff"] == 0.0)
        if cfg["kind"] != "lp" or cfg["alpha"] != 1.0:
            continue  # the speed/memory goals are set for exact (alpha=1) offloading
        if cfg["mode"] == "session" and r.get("decode_vs_baseline") is not None:
            v, how = _paired_or(r, "decode_vs_baseline")
            add(c["name"], f"session decode vs baseline{how}", v, ">= 0.98", v >= 0.98)
        if cfg["mode"] == "stream":
            v = r.get("decode_vs_bound_or_baseline")
            if v is not None and c.get("transfer_bound_tok_s"):
                add(c["name"], "stream decode vs min(baseline, transfer bound)", v, ">= 0.95", v >= 0.95)
            v = r.get("peak_vs_budget")
            if v is not None:
                add(c["name"], "stream peak vs standby+(prefetch+1) layers+0.2GiB", v, "<= 1", v <= 1.0)
            v = r.get("prefill_vs_bound")
            if v is not None and c.get("prefill_transfer_bound_tok_s"):
                add(c["name"], "stream prefill vs min(compute, transfer bound)", v, ">= 0.80", v >= 0.80)
            v = r.get("decode_vs_accelerate_cpu")
            if v is not None and c.get("transfer_bound_tok_s") and cfg["tier"] == "cpu" and dtype in ("bf16", "fp16", "fp32"):
                add(c["name"], "stream decode vs accelerate_cpu", v, ">= 8", v >= 8.0)
        if r.get("decode_vs_cpu_tier") is not None and cfg["mode"] == "stream" and not cfg["cold"]:
            v, how = _paired_or(r, "decode_vs_cpu_tier")
            add(c["name"], f"disk tier (warm) decode vs cpu tier{how}", v, ">= 0.8", v >= 0.8)
    return rows


def _paired_or(ratios, key):
    """The round-by-round ratio where the run has one, else the ratio of medians (None without
    one); and which it is."""
    p = ratios.get(f"{key}_paired")
    if p is not None:
        return p["median"], " (median of per-round ratios)"
    return ratios.get(key), ""


# ----------------------------------------------------------------------------- terminal table
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


def format_table(out: dict) -> str:
    env, bw, model = out["env"], out["bandwidth"], out["model"]
    lines = [
        f"lp-bench {model['name']} ({out['settings']['dtype']}, {model['architecture']}, {model['num_layers']} layers) "
        f"on {env.get('gpu_name') or env.get('cpu') or env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}",
        f"H2D bandwidth: pinned {_fmt(bw.get('pinned_h2d_gbps'), 'f', 1)} GB/s, pageable {_fmt(bw.get('pageable_h2d_gbps'), 'f', 1)} GB/s"
        + (f" ({bw['note']})" if bw.get("note") else "")
        + f"; median [min-max] of {out['settings']['repeats']} interleaved runs after a warm-up; dec/base and "
        "disk/cpu are medians of per-round ratios",
    ]
    head = ["config", "standby GiB", "peak GiB", "prefill tok/s", "decode tok/s", "generate tok/s",
            "logit diff", "argmax", "ppl", "MiB/fwd", "bound tok/s",
            "dec/base", "dec/bound", "dec/accel", "peak/budget", "disk/cpu"]
    rows = []
    for c in out["configs"]:
        if c.get("error"):
            rows.append([c["name"], "ERROR: " + c["error"][:100]] + [""] * (len(head) - 2))
            continue
        r = c.get("ratios", {})
        rows.append([
            c["name"],
            _span(c, "standby_vram_bytes", "gib"),
            _span(c, "peak_vram_bytes", "gib"),
            _span(c, "prefill_tok_s", "f", 0),
            _span(c, "decode_tok_s", "f", 1),
            _span(c, "generate_tok_s", "f", 1),
            _fmt(c.get("max_abs_logit_diff"), "e"),
            _fmt(c.get("argmax_agreement"), "f", 3),
            _fmt(c.get("perplexity"), "e"),
            _fmt(c.get("bytes_per_forward"), "mib"),
            _fmt(c.get("transfer_bound_tok_s"), "f", 1),
            _fmt(_paired_or(r, "decode_vs_baseline")[0], "x"),
            _fmt(r.get("decode_vs_transfer_bound"), "x"),
            _fmt(r.get("decode_vs_accelerate_cpu"), "x"),
            _fmt(r.get("peak_vs_budget"), "x"),
            _fmt(_paired_or(r, "decode_vs_cpu_tier")[0], "x"),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    sep = "  "
    lines.append(sep.join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append(sep.join("-" * w for w in widths))
    for row in rows:
        lines.append(sep.join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    if out.get("goals"):
        lines.append("")
        lines.append("goals (issue 5):")
        for g in out["goals"]:
            val = g["value"]
            val = "-" if val is None else (f"{val:.3g}" if isinstance(val, float) else str(val))
            lines.append(f"  [{'ok' if g['met'] else 'MISS'}] {g['config']}: {g['goal']} = {val} (target {g['target'] or '-'})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot
def plot(out: dict, path: str) -> None:
    """Standby and peak VRAM against decode tokens/s, one pair of points per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    have_vram = False
    for i, c in enumerate(out["configs"]):
        if c.get("error"):
            continue
        d = c.get("decode_tok_s")
        if not d:
            continue
        x, xlo, xhi = d["median"], d["min"], d["max"]
        color = f"C{i % 10}"
        sb, pk = _med(c, "standby_vram_bytes"), _med(c, "peak_vram_bytes")
        if sb is not None and pk is not None:
            have_vram = True
            ax.plot([x, x], [sb / GIB, pk / GIB], color=color, lw=1.5, alpha=0.6)
            ax.errorbar([x], [sb / GIB], xerr=[[x - xlo], [xhi - x]], fmt="o", color=color, capsize=3)
            ax.errorbar([x], [pk / GIB], xerr=[[x - xlo], [xhi - x]], fmt="^", color=color, capsize=3)
            ax.annotate(c["name"], (x, pk / GIB), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
        else:
            ax.errorbar([x], [i], xerr=[[x - xlo], [xhi - x]], fmt="s", color=color, capsize=3)
            ax.annotate(c["name"], (x, i), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    env = out["env"]
    where = env.get("gpu_name") or f"CPU ({env.get('cpu') or 'unknown'})"
    ax.set_xlabel("decode tokens/s (bare greedy loop, batch 1; median, bars min-max)")
    if have_vram:
        ax.set_ylabel("GPU memory allocated, GiB (o standby, ^ peak during inference)")
        for c in out["configs"]:
            tb = c.get("transfer_bound_tok_s")
            if tb and not c.get("error") and c["config"]["kind"] == "lp" and c["config"]["mode"] == "stream":
                ax.axvline(tb, color="grey", ls=":", lw=1)
                ax.annotate(f"transfer bound {c['name']}", (tb, ax.get_ylim()[0]), rotation=90, fontsize=7,
                            color="grey", xytext=(2, 4), textcoords="offset points")
    else:
        ax.set_ylabel("config (no CUDA device: no VRAM figures)")
        ax.set_yticks([])
    ax.set_xscale("log") if _spread(out) > 20 else None
    ax.grid(True, alpha=0.3)
    ax.set_title(f"lp-bench: {out['model']['name']} {out['settings']['dtype']} on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _spread(out) -> float:
    xs = [_med(c, "decode_tok_s") for c in out["configs"] if not c.get("error")]
    xs = [x for x in xs if x]
    return max(xs) / min(xs) if xs else 1.0


# ----------------------------------------------------------------------------- compare
DEFAULT_TOLERANCE = {"speed": 0.8, "ppl": 1e-6, "logit": 0.0, "argmax": 0.0, "vram": 1.02}
SPEED_KEYS = ("prefill_tok_s", "decode_tok_s", "generate_tok_s")
VRAM_KEYS = ("standby_vram_bytes", "peak_vram_bytes")


def parse_tolerance(text) -> dict:
    """``speed=0.8,ppl=1e-6,logit=0,argmax=0,vram=1.02`` (any subset) -> dict with defaults filled in.

    speed: new median must be >= speed * old median (prefill, decode, generate tokens/s);
    ppl: |new - old| <= ppl * |old|; logit: new max abs logit diff <= old + logit;
    argmax: new argmax agreement >= old - argmax; vram: new median <= vram * old median (standby, peak).
    """
    tol = dict(DEFAULT_TOLERANCE)
    if not text:
        return tol
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"cannot read tolerance {part!r}; write e.g. speed=0.8,ppl=1e-6,logit=0")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in tol:
            raise ValueError(f"unknown tolerance {key!r}; known: {', '.join(tol)}")
        try:
            tol[key] = float(value)
        except ValueError:
            raise ValueError(f"tolerance {key}={value!r} is not a number") from None
        if tol[key] < 0 or not math.isfinite(tol[key]):
            raise ValueError(f"tolerance {key} must be a finite number >= 0")
    return tol


def compare(new: dict, old: dict, tol: dict) -> tuple:
    """Return ``(regressions, notes)``: lists of human-readable lines. Any regression fails the gate."""
    regressions, notes = [], []
    for key in ("model", "dtype"):
        a = old.get("settings", {}).get(key) if key == "dtype" else old.get("model", {}).get("name")
        b = new.get("settings", {}).get(key) if key == "dtype" else new.get("model", {}).get("name")
        if a != b:
            notes.append(f"note: {key} differs: old {a!r}, new {b!r}")
    if old.get("inputs", {}).get("ppl_ids_sha256") != new.get("inputs", {}).get("ppl_ids_sha256"):
        notes.append("note: the perplexity text tokenizes differently (other tokenizer or Python): perplexity is not comparable")
    if old.get("env", {}).get("gpu_name") != new.get("env", {}).get("gpu_name"):
        notes.append(f"note: device differs: old {old.get('env', {}).get('gpu_name')!r}, new {new.get('env', {}).get('gpu_name')!r}")
    new_by = {c["name"]: c for c in new.get("configs", [])}
    for oc in old.get("configs", []):
        name = oc["name"]
        nc = new_by.get(name)
        if nc is None:
            regressions.append(f"{name}: missing from the new results")
            continue
        if nc.get("error"):
            regressions.append(f"{name}: failed: {nc['error']}")
            continue
        if oc.get("error"):
            notes.append(f"note: {name} failed in the old results; nothing to compare")
            continue
        for key in SPEED_KEYS:
            a, b = _med(oc, key), _med(nc, key)
            if a is None or b is None:
                continue
            if b < tol["speed"] * a:
                regressions.append(f"{name}: {key} regressed: {b:.4g} < {tol['speed']} x {a:.4g} (ratio {b / a:.3f})")
        a, b = oc.get("perplexity"), nc.get("perplexity")
        if a is not None and b is not None and abs(b - a) > tol["ppl"] * abs(a):
            regressions.append(f"{name}: perplexity changed: {b!r} vs {a!r} (relative {abs(b - a) / abs(a):.3g} > {tol['ppl']})")
        elif a is not None and b is None:
            regressions.append(f"{name}: perplexity missing (was {a!r})")
        a, b = oc.get("max_abs_logit_diff"), nc.get("max_abs_logit_diff")
        if a is not None and b is not None and b > a + tol["logit"]:
            regressions.append(f"{name}: max_abs_logit_diff regressed: {b!r} > {a!r} + {tol['logit']}")
        a, b = oc.get("argmax_agreement"), nc.get("argmax_agreement")
        if a is not None and b is not None and b < a - tol["argmax"]:
            regressions.append(f"{name}: argmax_agreement regressed: {b!r} < {a!r} - {tol['argmax']}")
        for key in VRAM_KEYS:
            a, b = _med(oc, key), _med(nc, key)
            if a is None or b is None:
                continue
            if b > tol["vram"] * a:
                regressions.append(f"{name}: {key} regressed: {b / GIB:.3f} GiB > {tol['vram']} x {a / GIB:.3f} GiB")
    return regressions, notes


def load_results(path: str) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("lp-bench/"):
        raise ValueError(f"{path} is not an lp-bench results file (no 'schema': 'lp-bench/...')")
    return data
