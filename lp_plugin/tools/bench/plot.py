"""lp-bench's frontier plot: main-device memory against decode tokens/s, one point per config, exact
configs filled and inexact ones hollow, the frontier (no other config is both faster and smaller)
drawn as a line. Labels sit in a column right of the axes, in the order of their points' heights,
each joined to its point, so they never overlap however close the points are.

Memory is the measured standby VRAM (with peak inference VRAM above it) on CUDA; on the CPU, where
nothing is measured on a device, it is the model's bytes minus the offloaded bytes and the skipped
layers the model does not hold: what would stay on the GPU.
"""

from __future__ import annotations

from lp_plugin.core.report import GIB

from .derive import exact_allowance, usable
from .report import computed_memory
from .stats import median_of


def _points(out: dict) -> tuple:
    measured = any(median_of(c.get("standby_vram_bytes")) is not None for c in out["configs"] if usable(c))
    nz = out.get("noise") or {}
    allowed, allowed_decode = exact_allowance(nz.get("logit")), exact_allowance(nz.get("decode_logit"))
    points = []
    for c in out["configs"]:
        d = c.get("decode_tok_s")
        if not usable(c) or c["config"].get("twin") or not d:
            continue
        if measured:
            y, peak = median_of(c.get("standby_vram_bytes")), median_of(c.get("peak_vram_bytes"))
        else:
            y, peak = computed_memory(out, c), None
        if y is None:
            continue
        diff, decode = c.get("max_abs_logit_diff"), c.get("max_abs_decode_logit_diff")
        # exact in one forward, and through the decode steps where they were checked
        decode_exact = decode <= allowed_decode if decode is not None else c.get("decode_logits_equal") is not False
        points.append(
            {
                "name": c["name"],
                "x": d["median"],
                "xlo": d["min"],
                "xhi": d["max"],
                "y": y,
                "peak": peak,
                "exact": diff is not None and diff <= allowed and decode_exact,
            }
        )
    return points, measured


def frontier(points: list) -> list:
    """The points no other point beats on both axes (faster and smaller), by speed."""
    best = [
        p
        for p in points
        if not any(q["x"] >= p["x"] and q["y"] <= p["y"] and (q["x"], q["y"]) != (p["x"], p["y"]) for q in points)
    ]
    return sorted(best, key=lambda p: p["x"])


def _draw_points(ax, points) -> None:
    for i, p in enumerate(points):
        color = f"C{i % 10}"
        face = color if p["exact"] else "white"
        ax.errorbar(
            [p["x"]],
            [p["y"]],
            xerr=[[p["x"] - p["xlo"]], [p["xhi"] - p["x"]]],
            fmt="o",
            ms=8,
            color=color,
            mfc=face,
            mec=color,
            mew=1.8,
            capsize=3,
            zorder=3,
        )
        if p["peak"] is not None:
            ax.plot([p["x"], p["x"]], [p["y"], p["peak"]], color=color, lw=1.2, alpha=0.6, zorder=2)
            ax.plot([p["x"]], [p["peak"]], "^", ms=7, color=color, mfc=face, mec=color, zorder=3)
        p["color"] = color


def _spread(targets: list, gap: float) -> list:
    """Label heights (axes fraction) as close to ``targets`` (sorted) as a ``gap`` between labels allows."""
    out: list[float] = []
    for t in targets:
        out.append(max(t, out[-1] + gap) if out else max(t, 0.0))
    top = 1.0
    for k in range(len(out) - 1, -1, -1):
        out[k] = min(out[k], top)
        top = out[k] - gap
    return out


def _draw_labels(ax, points, unit: str) -> None:
    # equal heights: the rightmost point gets the lowest label, so the leader lines do not cross
    order = sorted(points, key=lambda p: (p["y"], -p["x"]))
    lo, hi = ax.get_ylim()
    heights = _spread([(p["y"] - lo) / (hi - lo) for p in order], 0.085)
    for p, ty in zip(order, heights):
        text = f"{p['name']}\n{p['x']:.1f} tok/s, {p['y']:.2f} {unit}" + ("" if p["exact"] else " (not exact)")
        ax.annotate(
            text,
            xy=(p["x"], p["y"]),
            xycoords="data",
            xytext=(1.03, ty),
            textcoords="axes fraction",
            va="center",
            ha="left",
            fontsize=8,
            color=p["color"],
            arrowprops={"arrowstyle": "-", "color": p["color"], "lw": 0.7, "alpha": 0.7, "shrinkB": 5},
        )


def plot(out: dict, path: str) -> None:
    """Write the frontier PNG of results ``out`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points, measured = _points(out)
    unit = ("GiB", GIB) if max((p["peak"] or p["y"] for p in points), default=GIB) >= GIB / 4 else ("MiB", 1024**2)
    for p in points:
        p["y"], p["peak"] = p["y"] / unit[1], None if p["peak"] is None else p["peak"] / unit[1]
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=110)
    fig.subplots_adjust(left=0.08, right=0.7, top=0.92, bottom=0.12)
    _draw_points(ax, points)
    front = frontier(points)
    if len(front) > 1:
        ax.step([p["x"] for p in front], [p["y"] for p in front], where="post", color="grey", ls="--", lw=1, zorder=1)
    xs = [p["x"] for p in points] or [1.0]
    if max(xs) / max(min(xs), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s (bare greedy loop, batch 1; median, bars min-max)")
    ax.set_ylabel(
        f"GPU memory allocated, {unit[0]} (o standby, ^ peak)"
        if measured
        else f"left on the main device, {unit[0]} (computed)"
    )
    if not measured:
        fig.text(
            0.08,
            0.015,
            "no CUDA device: memory is the model's bytes minus the offloaded and skipped bytes (what would "
            "stay on a GPU), not a measurement",
            fontsize=8,
            color="dimgrey",
        )
    _draw_labels(ax, points, unit[0])
    ax.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], marker="o", ls="", color="k", mfc="k", label="exact (logits equal the plain model's)"),
        Line2D([], [], marker="o", ls="", color="k", mfc="white", label="not exact"),
        Line2D([], [], ls="--", color="grey", label="frontier (nothing faster and smaller)"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
    env = out["env"]
    where = env.get("gpu_name") or f"CPU ({env.get('cpu') or 'unknown'})"
    ax.set_title(f"lp-bench: {out['model']['name']} {out['settings']['dtype']} on {where}", fontsize=10)
    fig.savefig(path)
    plt.close(fig)
