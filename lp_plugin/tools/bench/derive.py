"""What lp-bench derives from the raw figures of a run (pure Python, no torch): every config's ratios
against the plain model, the run's own noise, and the goals.

Ratios of speeds are medians of per-round ratios (:func:`lp_plugin.tools.bench.stats.paired`). The noise
comes from the plain model measured twice in every round (``baseline`` first, ``baseline:twin``
last) and from its logits computed three times (the reference before any config, then once per
plain config), in one forward and through the decode steps: a deterministic model gives logit noise
0, a nondeterministic one (some GPU kernels) its real spread.
"""

from __future__ import annotations

import math
from typing import Any

from lp_plugin.core.report import GIB

from .configs import is_exact
from .stats import log_rms, median_of, median_se, paired, runs_of

PEAK_SLACK_BYTES = int(0.2 * GIB)  # activations allowed over standby + ring in stream mode
SPEEDS = {
    "prefill": "prefill_tok_s",
    "decode": "decode_tok_s",
    "decode_step": "decode_step_tok_s",
    "generate": "generate_tok_s",
    "static": "static_tok_s",
}
NOISE_MARGIN = 2.0  # an exact config may differ from the plain model by this many times the plain model's own drift
LOGIT_GOAL = "logits vs the plain model: max abs diff"  # one forward over the prompt
DECODE_LOGIT_GOAL = "decode-step logits: max abs diff"  # the decode steps fed the plain model's greedy tokens
EXACTNESS_GOALS = (LOGIT_GOAL, DECODE_LOGIT_GOAL)


def usable(c) -> bool:
    return bool(c) and not c.get("error") and not c.get("not_applicable")


def find(out: dict, predicate):
    return next((c for c in out["configs"] if usable(c) and predicate(c)), None)


def plain(out: dict):
    return find(out, lambda c: c["config"]["kind"] == "baseline" and not c["config"].get("twin"))


def twin(out: dict):
    return find(out, lambda c: c["config"].get("twin"))


def _ratio(a, b):
    return None if a is None or not b else a / b


def noise(out: dict) -> dict:
    """The run's noise: per speed, the spread of twin/baseline per-round ratios (log scale); the
    plain model's logit (one forward; decode steps), perplexity, argmax and token drift against its own
    reference."""
    base, tw = plain(out), twin(out)
    plains = [c for c in (base, tw) if c]
    speed = {}
    for short, key in SPEEDS.items():
        p = paired(tw.get(key), base.get(key)) if base and tw else None
        speed[short] = {"sigma": log_rms(p["runs"]) if p else None, "runs": p["runs"] if p else []}
    ref_ppl = out.get("reference", {}).get("perplexity")

    def worst(key, fn):
        vals = [fn(c[key]) for c in plains if c.get(key) is not None]
        return max(vals) if vals else None

    return {
        "speed": speed,
        "logit": worst("max_abs_logit_diff", float),
        "decode_logit": worst("max_abs_decode_logit_diff", float),
        # the plain model's perplexity relative to its own reference, once per plain config
        "perplexity_runs": [
            c["perplexity"] / ref_ppl - 1.0 for c in plains if c.get("perplexity") is not None and ref_ppl
        ],
        "argmax": worst("argmax_agreement", lambda a: 1.0 - a),
        "tokens": worst("generate_tokens_agree", lambda a: 1.0 - a),
        "static_tokens": worst("static_tokens_agree", lambda a: 1.0 - a),
        "vram": _vram_noise(base, tw),
        "margin": NOISE_MARGIN,
    }


def _vram_noise(base, tw):
    a, b = (
        (median_of(base.get("standby_vram_bytes")) if base else None),
        (median_of(tw.get("standby_vram_bytes")) if tw else None),
    )
    return abs(a - b) / a if a and b is not None else None


def _ratios(c, out, base, acc) -> dict:
    cfg = c["config"]
    decode, prefill, standby = (
        median_of(c.get("decode_tok_s")),
        median_of(c.get("prefill_tok_s")),
        median_of(c.get("standby_vram_bytes")),
    )
    r: dict[str, Any] = {
        f"{short}_vs_baseline": paired(c.get(key), base.get(key)) if base else None for short, key in SPEEDS.items()
    }
    r.update(
        {
            "decode_vs_transfer_bound": _ratio(decode, c.get("transfer_bound_tok_s")),
            "decode_vs_storage_bound": _ratio(decode, c.get("storage_bound_tok_s")),
            "prefill_vs_storage_bound": _ratio(prefill, c.get("prefill_storage_bound_tok_s")),
            "decode_vs_accelerate_cpu": paired(c.get("decode_tok_s"), acc.get("decode_tok_s"))
            if acc and acc is not c
            else None,
            "standby_vs_baseline": _ratio(standby, median_of(base.get("standby_vram_bytes"))) if base else None,
            "peak_vs_baseline": _ratio(median_of(c.get("peak_vram_bytes")), median_of(base.get("peak_vram_bytes")))
            if base
            else None,
            "decode_vs_bound_or_baseline": None,
            "prefill_vs_bound": None,
            "decode_vs_storage_bound_or_baseline": None,
            "prefill_vs_storage_bound_or_baseline": None,
            "peak_budget_bytes": None,
            "peak_vs_budget": None,
            "decode_vs_cpu_tier": None,
            "decode_vs_unskipped": None,
            "standby_saved_bytes": None,
            "peak_saved_bytes": None,
        }
    )
    if cfg["kind"] == "lp":
        r.update(_vs_peers(c, out))
        if cfg.get("skip"):
            r.update(_vs_unskipped(c, out))
    if cfg["kind"] == "baseline":
        return r
    dec_base, pre_base = median_of(r["decode_vs_baseline"]), median_of(r["prefill_vs_baseline"])
    candidates = [x for x in (dec_base, r["decode_vs_transfer_bound"]) if x is not None]
    r["decode_vs_bound_or_baseline"] = max(candidates) if candidates else None  # decode / min(baseline, bound)
    candidates = [x for x in (pre_base, _ratio(prefill, c.get("prefill_transfer_bound_tok_s"))) if x is not None]
    r["prefill_vs_bound"] = max(candidates) if candidates else None
    for short, base_ratio in (("decode", dec_base), ("prefill", pre_base)):  # cold: storage in place of PCIe
        bound = r[f"{short}_vs_storage_bound"]
        r[f"{short}_vs_storage_bound_or_baseline"] = None if bound is None else max(bound, base_ratio or 0.0)
    if cfg["kind"] == "lp" and cfg["mode"] == "stream" and standby is not None and c.get("layer_bytes"):
        r["peak_budget_bytes"] = standby + (cfg["prefetch"] + 1) * c["layer_bytes"] + PEAK_SLACK_BYTES
        r["peak_vs_budget"] = _ratio(median_of(c.get("peak_vram_bytes")), r["peak_budget_bytes"])
    if cfg["kind"] == "lp" and cfg["tier"] != "cpu":
        same = ("mode", "spec", "alpha", "prefetch", "load")
        tier_twin = find(
            out,
            lambda o: (
                o["config"]["kind"] == "lp"
                and o["config"]["tier"] == "cpu"
                and not o["config"]["cold"]
                and all(o["config"].get(k) == cfg.get(k) for k in same)
            ),
        )
        if tier_twin is not None:
            r["decode_vs_cpu_tier"] = paired(c.get("decode_tok_s"), tier_twin.get("decode_tok_s"))
    return r


_SAME_BUT_SKIP = ("mode", "spec", "tier", "alpha", "prefetch", "load", "cold", "protect_first", "protect_last")


def unskipped(out: dict, c):
    """The run's config that is ``c`` without its skip (same mode, layers, tier, options and load), or None."""
    cfg = c["config"]
    return find(
        out,
        lambda o: (
            o["config"]["kind"] == "lp"
            and not o["config"].get("skip")
            and all(o["config"].get(k) == cfg.get(k) for k in _SAME_BUT_SKIP)
        ),
    )


def _vs_unskipped(c, out) -> dict:
    """What skipping gains over the same config without it: decode speed (median of per-round ratios) and
    the standby and peak VRAM it saves (differences of medians, bytes; None on the CPU)."""
    twin = unskipped(out, c)
    if twin is None:
        return {}

    def saved(key):
        a, b = median_of(twin.get(key)), median_of(c.get(key))
        return None if a is None or b is None else a - b

    return {
        "decode_vs_unskipped": paired(c.get("decode_tok_s"), twin.get("decode_tok_s")),
        "standby_saved_bytes": saved("standby_vram_bytes"),
        "peak_saved_bytes": saved("peak_vram_bytes"),
    }


def _peer(out: dict, kind: str, cold: bool):
    """The run's config of peer ``kind`` in the same page-cache state (both cold or both warm)."""
    return find(out, lambda o: o["config"]["kind"] == kind and bool(o["config"].get("cold")) == cold)


def _vs_peers(c, out) -> dict:
    """An lp config against AirLLM and Accelerate's disk offload, each measured cold against cold and
    warm against warm (medians of per-round ratios; peak VRAM as the ratio of medians)."""
    cold = bool(c["config"].get("cold"))
    air, disk = _peer(out, "airllm", cold), _peer(out, "accelerate_disk", cold)
    r: dict[str, Any] = {
        "decode_vs_airllm": None,
        "prefill_vs_airllm": None,
        "peak_vs_airllm": None,
        "decode_vs_airllm_ceiling": None,
        "prefill_vs_airllm_ceiling": None,
        "decode_vs_accelerate_disk": None,
    }
    if air is not None:
        r["decode_vs_airllm"] = paired(c.get("decode_tok_s"), air.get("decode_tok_s"))
        r["prefill_vs_airllm"] = paired(c.get("prefill_tok_s"), air.get("prefill_tok_s"))
        # cold: the most the storage allows (lp_plugin at its read speed, or at the plain model's speed where
        # that is lower, against AirLLM as measured)
        base = plain(out)
        for speed, bound in (("decode", "storage_bound_tok_s"), ("prefill", "prefill_storage_bound_tok_s")):
            fastest = [x for x in (c.get(bound), median_of(base.get(SPEEDS[speed])) if base else None) if x]
            if c.get(bound):
                r[f"{speed}_vs_airllm_ceiling"] = _ratio(min(fastest), median_of(air.get(SPEEDS[speed])))
        r["peak_vs_airllm"] = _ratio(median_of(c.get("peak_vram_bytes")), median_of(air.get("peak_vram_bytes")))
    if disk is not None and c["config"].get("tier") == "disk":
        r["decode_vs_accelerate_disk"] = paired(c.get("decode_tok_s"), disk.get("decode_tok_s"))
    return r


def derive(out: dict) -> dict:
    """Add ``ratios`` to every config, and ``noise`` and ``goals`` to ``out`` (in place)."""
    base = plain(out)
    acc = find(out, lambda c: c["config"]["kind"] == "accelerate_cpu")
    for c in out["configs"]:
        c["ratios"] = _ratios(c, out, base, acc) if usable(c) else {}
    out["noise"] = noise(out)
    out["goals"] = goals(out)
    return out


def exact_allowance(noise_logit) -> float:
    """How far an exact (alpha=1) config's logits may be from the plain model's: 0 for a
    deterministic model, else :data:`NOISE_MARGIN` times the plain model's own drift."""
    return NOISE_MARGIN * (noise_logit or 0.0)


def noise_band(nz: dict, short: str, repeats: int) -> float | None:
    """How far (log scale) a speed ratio can sit from its true value by the run's own noise: the
    plain model's median ratio against itself, or twice the standard error of a median of
    ``repeats`` rounds, whichever is larger (None without a twin)."""
    speed = (nz.get("speed") or {}).get(short) or {}
    runs = [r for r in speed.get("runs") or [] if r and r > 0]
    if speed.get("sigma") is None or not runs:
        return None
    self_ratio = abs(math.log(sorted(runs)[len(runs) // 2]))
    return max(self_ratio, 2 * median_se(speed["sigma"], repeats))


def within_noise(value, target: str, band) -> bool:
    """True when a speed ratio ``value`` and its threshold (``">= 0.98"``) are closer than ``band``."""
    try:
        threshold = float(str(target).split()[-1])
    except (ValueError, IndexError):
        return False
    return (
        band is not None
        and isinstance(value, (int, float))
        and value > 0
        and threshold > 0
        and abs(math.log(value / threshold)) <= band
    )


def goals(out: dict) -> list:
    """The goals, evaluated where this run has the figures (batch 1, same run). A speed goal also
    says whether its value is within the run's own noise of the target (``within_noise``): such a
    result can come out either way in two runs of the same code."""
    rows, dtype, nz = [], out.get("settings", {}).get("dtype"), out.get("noise") or {}
    repeats = out.get("settings", {}).get("repeats") or 1

    def add(config, goal, value, target, met, speed=None):
        band = noise_band(nz, speed, repeats) if speed else None
        rows.append(
            {
                "config": config,
                "goal": goal,
                "value": value,
                "target": target,
                "met": met,
                "noise_band": band,
                "within_noise": within_noise(value, target, band),
            }
        )

    for c in out["configs"]:
        if c.get("error"):
            add(c["name"], "runs without error", None, None, False)
            continue
        cfg, r = c["config"], c.get("ratios") or {}
        if cfg["kind"] == "lp" and cfg.get("skip"):
            _skip_goals(c, out, r, add)
        if cfg["kind"] != "lp" or not is_exact(cfg):
            continue  # the other goals are set for exact offloading (alpha 1, nothing skipped)
        _exactness_goals(c, nz, add)
        _speed_goals(c, cfg, r, dtype, add)
    return rows


def _exactness_goals(c, nz, add) -> None:
    """An exact config's logits against the plain model's, in one forward and through the decode steps:
    equal, or within :data:`NOISE_MARGIN` times the plain model's own drift on the same path. Decode
    logits not finite where the plain model's are (no difference recorded, ``decode_logits_equal``
    False) miss with the value None."""
    for goal, key, drift, unequal in (
        (LOGIT_GOAL, "max_abs_logit_diff", "logit", False),
        (DECODE_LOGIT_GOAL, "max_abs_decode_logit_diff", "decode_logit", c.get("decode_logits_equal") is False),
    ):
        value = c.get(key)
        if value is None and not unequal:
            continue  # not measured (a results file from before the check)
        allowed = exact_allowance(nz.get(drift))
        target = (
            "== 0 (the plain model repeats exactly)"
            if allowed == 0
            else f"<= {allowed:.3g} ({NOISE_MARGIN:g}x the plain model's drift)"
        )
        add(c["name"], goal, value, target, value is not None and value <= allowed)


def _speed_goals(c, cfg, r, dtype, add) -> None:
    name = c["name"]
    v = median_of(r.get("decode_vs_baseline"))
    if cfg["mode"] == "session" and v is not None:
        add(name, "session decode vs baseline (median of per-round ratios)", v, ">= 0.98", v >= 0.98, "decode")
    if c.get("static_error"):
        add(name, "static-cache generate runs", c["static_error"], "no error", False)
    v = median_of(r.get("static_vs_baseline"))
    if cfg["mode"] == "session" and v is not None:
        add(
            name,
            "session static-cache generate vs baseline (median of per-round ratios)",
            v,
            ">= 0.95",
            v >= 0.95,
            "static",
        )
    if c.get("static_tokens_agree") is not None:
        add(
            name,
            "static-cache tokens vs the plain static run",
            c["static_tokens_agree"],
            "== 1",
            c["static_tokens_agree"] == 1.0,
        )
    if cfg["mode"] == "stream" and cfg.get("cold"):
        _cold_goals(c, r, add)
    if cfg["mode"] == "stream":
        v = r.get("decode_vs_bound_or_baseline")
        if v is not None and c.get("transfer_bound_tok_s") and not cfg.get("cold"):
            add(name, "stream decode vs min(baseline, transfer bound)", v, ">= 0.95", v >= 0.95, "decode")
        v = r.get("peak_vs_budget")
        if v is not None:
            add(name, "stream peak vs standby+(prefetch+1) layers+0.2GiB", v, "<= 1", v <= 1.0)
        v = r.get("prefill_vs_bound")
        if v is not None and c.get("prefill_transfer_bound_tok_s") and not cfg.get("cold"):
            add(name, "stream prefill vs min(compute, transfer bound)", v, ">= 0.80", v >= 0.80, "prefill")
        v = median_of(r.get("decode_vs_accelerate_cpu"))
        if (
            v is not None
            and c.get("transfer_bound_tok_s")
            and cfg["tier"] == "cpu"
            and dtype in ("bf16", "fp16", "fp32")
        ):
            add(name, "stream decode vs accelerate_cpu", v, ">= 8", v >= 8.0, "decode")
        if cfg["tier"] == "disk":
            _airllm_goals(c, cfg, r, add)
        v = median_of(r.get("decode_vs_cpu_tier"))
        if v is not None and not cfg["cold"]:
            add(
                name,
                "disk tier (warm) decode vs cpu tier (median of per-round ratios)",
                v,
                ">= 0.8",
                v >= 0.8,
                "decode",
            )


SKIP_VRAM_SHARE = 0.9  # of the bytes of the skipped layers the config without skipping keeps on the device


def _skip_goals(c, out, r, add) -> None:
    """A skipping config against the same config without skipping: decode at least ``1 + s`` times as
    fast for a share ``s`` of the layers skipped (a fifth: 1.2x); loaded by ``from_pretrained``, standby
    VRAM lower by at least :data:`SKIP_VRAM_SHARE` of the skipped layers that config keeps on the device
    (skipped layers are never loaded; decoder layers are taken to be of one size, the model's largest)."""
    twin = unskipped(out, c)
    skipped = (c.get("info") or {}).get("skipped_layers") or []
    num_layers = (out.get("model") or {}).get("num_layers")
    if twin is None or not skipped or not num_layers:
        return
    name = c["name"]
    v = median_of(r.get("decode_vs_unskipped"))
    if v is not None:
        target = 1 + len(skipped) / num_layers
        goal = f"decode vs {twin['name']} (skipping {len(skipped)} of {num_layers} layers; median of per-round ratios)"
        add(name, goal, v, f">= {target:.2f}", v >= target, "decode")
    saved = r.get("standby_saved_bytes")
    kept = [i for i in skipped if i not in set((twin.get("info") or {}).get("offloaded_layers") or [])]
    layer = (out.get("model") or {}).get("layer_bytes") or twin.get("layer_bytes")
    if saved is not None and c["config"].get("load") == "pretrained" and kept and layer:
        want = SKIP_VRAM_SHARE * len(kept) * layer
        goal = f"standby VRAM saved vs {twin['name']} (GiB; skipped layers it keeps on the device: {kept})"
        add(name, goal, saved / GIB, f">= {want / GIB:.3f}", saved >= want)


def speed_runs(c, short) -> list:
    """The per-round ratios of one speed of config ``c`` against the plain model."""
    return runs_of((c.get("ratios") or {}).get(f"{short}_vs_baseline"))


COLD_GOAL = 0.85  # of the storage's own read speed, for the bytes a cold-cache config streams


def _cold_goals(c, r, add) -> None:
    """A cold-cache stream config (every step's layers read from the storage) against what bounds it: the
    storage's read speed measured in the same run (the bytes a forward streams at that speed) or the plain
    model's own speed, whichever is lower; decode and prefill at >= :data:`COLD_GOAL` of it. Without the
    measurement (no storage under the folder) the goals cannot be judged and miss."""
    for speed, key in (("decode", "storage_bound_tok_s"), ("prefill", "prefill_storage_bound_tok_s")):
        v = r.get(f"{speed}_vs_storage_bound_or_baseline")
        target = f">= {COLD_GOAL:g}" + ("" if c.get(key) else " (the storage's read speed was not measured)")
        goal = f"cold {speed} vs min(baseline, the storage's read speed for the bytes a forward streams)"
        add(c["name"], goal, v, target, v is not None and v >= COLD_GOAL, speed if v is not None else None)


def _airllm_goals(c, cfg, r, add) -> None:
    """Stream mode from the disk tier against AirLLM (which reads every module from its shards), in
    the same cache state: >= 50x its decode and >= 5x its prefill, at no more peak VRAM. A cold pair's goal
    also says how far ahead the storage lets lp_plugin get (its bytes at the storage's read speed)."""
    state = "cold" if cfg["cold"] else "warm"
    for speed, target in (("decode", 50.0), ("prefill", 5.0)):
        v = median_of(r.get(f"{speed}_vs_airllm"))
        if v is not None:
            ceiling = r.get(f"{speed}_vs_airllm_ceiling")
            at_most = f"; at this storage's read speed at most {ceiling:.3g}x" if ceiling else ""
            goal = f"stream {speed} vs airllm ({state} vs {state}, median of per-round ratios{at_most})"
            add(c["name"], goal, v, f">= {target:g}", v >= target, speed)
    v = r.get("peak_vs_airllm")
    if v is not None:
        add(c["name"], "peak VRAM vs airllm", v, "<= 1", v <= 1.0)
