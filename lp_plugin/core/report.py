"""What lp_plugin prints and writes: JSON-ready values, byte units, and the offload summary table
printed at the end of an lm-eval run (a Markdown table, like lm-eval's own results table)."""

from __future__ import annotations

import math

GIB = 1024**3


def jsonable(value):
    """``value`` with every dict key a str and every leaf a JSON scalar (anything else as its str)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return str(value)


def gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f} GiB"


def size_text(nbytes: int, up: bool = False) -> str:
    """``nbytes`` in GiB, MiB or KiB (the largest unit it reaches), two decimals. ``up`` rounds up, so
    that the text read back as a size (``"6.29GiB"``) is at least ``nbytes``."""
    if not nbytes:
        return "0 B"
    unit, factor = next((u, f) for u, f in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)) if nbytes >= f or u == "KiB")
    if up and isinstance(nbytes, int):
        hundredths = -(-nbytes * 100 // factor)  # in integers: exact for any size, and never below nbytes
        return f"{hundredths // 100}.{hundredths % 100:02d} {unit}"
    value = nbytes / factor
    if up:
        value = math.ceil(value * 100) / 100
    return f"{value:.2f} {unit}"


def layers_text(indices) -> str:
    """Layer indices in the offload spec's own grammar: ``2-26:2`` (a stride), ``0-1,3-5``, or ``none``."""
    xs = sorted(indices)
    if not xs:
        return "none"
    step = xs[1] - xs[0] if len(xs) > 2 else 0
    if step > 1 and all(b - a == step for a, b in zip(xs, xs[1:])):
        return f"{xs[0]}-{xs[-1]}:{step}"
    runs, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            runs.append(str(a) if a == start else f"{start}-{a}")
            start = b
    return ",".join(runs)


def _rate(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


_TERMS = (
    ("cuda_runtime", "CUDA"),
    ("allocator_slack", "slack"),
    ("weights", "weights"),
    ("ring", "ring"),
    ("session_buffer", "session buffer"),
    ("kv", "KV"),
    ("activations", "activations"),
    ("logits", "logits"),
    ("workspace", "workspaces"),
)


def _card_rows(info: dict) -> list:
    """The card view of an ``offload=auto`` run: the budget, the predicted peak term by term, what is
    left, and the peak as the card saw it (CUDA runtime + the allocator's reserved peak + mapped buffers)."""
    budget = (info.get("engine") or {}).get("budget")
    if not budget:
        return []
    b = budget["breakdown"]
    rows = [
        (
            "card",
            f"{gib(budget['budget_bytes'])} ({budget.get('budget_source', 'max_memory')}); predicted peak "
            f"{gib(budget['peak_bytes'])} at {budget['phase']}, left "
            f"{gib(budget['budget_bytes'] - budget['peak_bytes'])}",
        ),
        ("card terms", " + ".join(f"{name} {b[key] / GIB:.2f}" for key, name in _TERMS if key in b) + " GiB"),
    ]
    if info.get("peak_device_bytes") is not None:
        rows.append(("peak (card view)", gib(info["peak_device_bytes"])))
    return rows


def offload_table(info: dict) -> str:
    """The offload summary of one run (``config.residual_offload`` of lm-eval's results JSON)."""
    layers = info.get("offloaded_layers")
    layers = (info.get("layers") or []) if layers is None else layers
    skipped = info.get("skipped_layers") or []
    dropped = sorted(set(info.get("dropped_layers") or []) - set(skipped))  # alpha=0 drops them
    kinds = sorted(set((info.get("stand_ins") or {}).values()))
    rows = [
        ("layers", f"{layers_text(layers)} ({len(layers)}; offload={info.get('offload')})"),
        *(
            [
                (
                    "skipped",
                    f"{layers_text(skipped)} ({len(skipped)}; stand-ins: {', '.join(kinds) or 'none'}): not exact",
                )
            ]
            if skipped
            else []
        ),
        *([("dropped", f"{layers_text(dropped)} ({len(dropped)}; alpha=0): not exact")] if dropped else []),
        (
            "tier / mode",
            f"{info.get('tier')} / {info.get('mode')} (alpha={info.get('alpha')}, prefetch={info.get('prefetch')})",
        ),
        ("offloaded", size_text(info["offloaded_bytes"]) if info.get("offloaded_bytes") is not None else "-"),
        *(
            [
                (
                    "embeddings",
                    f"input embeddings and lm_head in host memory "
                    f"({size_text(info.get('embeddings_host_bytes') or 0)}), lm_head copied per call",
                )
            ]
            if info.get("embeddings") == "host"
            else []
        ),
        *(
            [
                (
                    "context",
                    f"{info['max_length']:,} tokens ({info.get('max_length_source')})"
                    + (f", prefill in chunks of {info['prefill_chunk']:,}" if info.get("prefill_chunk") else ""),
                )
            ]
            if info.get("max_length")
            else []
        ),
        (
            "standby VRAM",
            gib(info.get("standby_vram_bytes")) if info.get("standby_vram_bytes") is not None else "- (cpu)",
        ),
        (
            "peak VRAM",
            gib(info.get("peak_inference_vram_bytes"))
            if info.get("peak_inference_vram_bytes") is not None
            else "- (cpu)",
        ),
        *_card_rows(info),
        ("tokens", f"{info.get('tokens_processed', 0):,} in {info.get('forward_calls', 0):,} forwards"),
        ("tok/s (forwards)", _rate(info.get("tokens_per_second"))),
        ("tok/s (evaluation)", _rate(info.get("tokens_per_second_eval"))),
    ]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [
        "",
        "hf-residual-offload:",
        f"|{'offload'.ljust(width)}|{'value'.ljust(vwidth)}|",
        f"|{'-' * width}|{'-' * vwidth}|",
    ]
    lines += [f"|{k.ljust(width)}|{v.ljust(vwidth)}|" for k, v in rows]
    return "\n".join(lines) + "\n"
