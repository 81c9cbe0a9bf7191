"""The frontier of an ``lp-prune`` sweep as a table, target checks and a PNG (no torch import)."""

from __future__ import annotations

from ...core.report import GIB

DEFAULT_TARGETS = {10: 10.0, 20: 30.0, 30: 60.0}  # share of layers skipped -> largest perplexity rise, in %


def parse_targets(text: str) -> dict:
    """``"10:10,20:30"`` -> ``{10: 10.0, 20: 30.0}`` (share skipped in % -> largest rise in %)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        share, sep, rise = part.partition(":")
        try:
            out[int(share)] = float(rise)
        except ValueError:
            raise ValueError(f"cannot read target {part!r}; write SHARE:RISE in percent, e.g. 10:10,20:30") from None
        if not sep:
            raise ValueError(f"cannot read target {part!r}; write SHARE:RISE in percent, e.g. 10:10,20:30")
    return out


def _pct(x) -> str:
    return f"{100 * x:+.1f}%"


def _slice_names(out: dict) -> list:
    return list(out["rows"][0].get("slices") or {})


def table(out: dict) -> str:
    """Perplexity per share skipped, selection and stand-in on every slice (its rise over the plain
    model in brackets), the worst rise (the verdict's), and the speed and memory of every row (with
    the forward speed-up and the standby VRAM saved against the plain row)."""
    rows = out["rows"]
    names = _slice_names(out)
    base = rows[0]
    info = out.get("slices", {})
    lines = [
        "perplexity per slice (documents of "
        f"{out['heldout']['window']} tokens; rise over the plain model): "
        + "; ".join(
            f"{n} ({info.get(n, {}).get('kind', '?')}, {info.get(n, {}).get('tokens', '?')} tokens) "
            f"plain {base['slices'][n]['ppl']:.3f}"
            for n in names
        ),
        "",
        "| skipped | selection | stand_in | " + " | ".join(names) + " | worst | layers |",
        "|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in rows[1:]:
        cells = [f"{r['slices'][n]['ppl']:.2f} ({_pct(r['slices'][n]['change'])})" for n in names]
        lines.append(
            f"| {r['skipped']} ({100 * r['skipped'] / out['num_layers']:.0f}%) | {r['selection']} | "
            f"{r['stand_in']} | "
            + " | ".join(cells)
            + f" | {_pct(r['worst_change'])} ({r['worst_slice']}) | "
            + ",".join(map(str, r["layers"]))
            + " |"
        )
    lines += [
        "",
        "| skipped | selection | stand_in | tok/s | vs plain | standby VRAM | saved | peak VRAM | bytes moved/token "
        "| stand-in bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup, saved = r.get("speedup_vs_plain"), r.get("standby_saved_bytes")
        lines.append(
            f"| {r['skipped']} | {r['selection']} | {r['stand_in']} | {_num(r['tokens_per_second'])} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | {_gib(r['standby_vram_bytes'])} | {_gib(saved)} | "
            f"{_gib(r['peak_vram_bytes'])} | {r['bytes_moved_per_token']:,.0f} | {r['stand_in_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _gib(v) -> str:
    return "- (cpu)" if v is None else f"{v / GIB:.3f} GiB"


def check_targets(out: dict, targets: dict) -> list:
    """One entry per target share: the row whose worst slice rises least at that share, against the
    largest allowed rise."""
    results = []
    for share, rise in sorted(targets.items()):
        k = int(share * out["num_layers"] / 100 + 0.5)
        candidates = [r for r in out["rows"] if r["skipped"] == k and k]
        if not candidates:
            results.append({"share": share, "layers": k, "target": rise, "met": None, "best": None})
            continue
        best = min(candidates, key=lambda r: r["worst_change"])
        results.append(
            {
                "share": share,
                "layers": k,
                "target": rise,
                "met": 100 * best["worst_change"] <= rise,
                "best": {
                    "selection": best["selection"],
                    "stand_in": best["stand_in"],
                    "ppl": best["ppl"],
                    "change": best["worst_change"],
                    "worst_slice": best["worst_slice"],
                    "layers": best["layers"],
                },
            }
        )
    return results


def targets_text(results: list) -> str:
    lines = []
    for t in results:
        if t["best"] is None:
            lines.append(f"{t['share']}% ({t['layers']} layers) <= +{t['target']:g}%: not measured")
            continue
        b = t["best"]
        lines.append(
            f"{t['share']}% ({t['layers']} layers) <= +{t['target']:g}% on every slice: "
            f"{'MET' if t['met'] else 'MISSED'} (best {b['selection']} + stand_in={b['stand_in']}: worst "
            f"{_pct(b['change'])} on {b['worst_slice']}, layers {b['layers']})"
        )
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    """The worst slice's perplexity (over the plain model's) against layers skipped, and against standby
    VRAM (on the CPU: the weight bytes a forward reads, the standby VRAM a GPU would need with the skipped
    layers released)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    vram = all(r["standby_vram_bytes"] is not None for r in rows)
    key = "standby_vram_bytes" if vram else "forward_weight_bytes"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, str], list[dict]] = {}  # (selection, stand-in) -> its rows
    for r in rows[1:]:
        series.setdefault((r["selection"], r["stand_in"]), []).append(r)
    styles = {"none": ":", "mean": "--", "linear": "-"}
    for (selection, stand_in), rs in series.items():
        pts = [rows[0]] + sorted(rs, key=lambda r: r["skipped"])
        label = f"{selection} / {stand_in}"
        ls = styles.get(stand_in.split(":")[0], "-.")
        axes[0].plot([r["skipped"] for r in pts], [1 + r["worst_change"] for r in pts], ls, marker="o", label=label)
        axes[1].plot([r[key] / GIB for r in pts], [1 + r["worst_change"] for r in pts], ls, marker="o", label=label)
    for ax in axes:
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("worst slice: perplexity / plain model's")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("layers skipped")
    axes[1].set_xlabel(
        "standby VRAM (GiB)" if vram else "weights a forward reads (GiB; standby VRAM once skipped layers are released)"
    )
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{out['model']}: layer skipping frontier (calib {out['calib']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
