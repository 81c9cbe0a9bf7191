"""Which fit makes linear stand-ins hold on text of another kind (the bundled model, CPU).

Each output's ridge strength chosen by window cross-validation (the default), by leave-one-domain-out
cross-validation over the default calibration's three domains (per output, or one strength for all), or fixed; a
rank-limited map; the mean update; or more calibration text of the same domains (``--calib mix:TOKENS``). The same
layer sets (greedy's choices with the default calibration), scored on every evaluation slice. The bundled
SmolLM2-135M on the CPU, float32, one torch thread.

    python benchmarks/skip_ridge_domains.py --sets 10%,20% --fits window,domain,10,100,mean,rank64 --out r.json
    python benchmarks/skip_ridge_domains.py --sets 10%,20% --fits window --calib mix:36864 --out r2.json

``benchmarks/results/cpu-skipping-fit-choices.json`` merges such runs; docs/skipping.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

SETS = {"10%": [14, 15, 25], "20%": [4, 5, 14, 15, 25, 28], "30%": [3, 4, 5, 6, 7, 14, 15, 25, 28]}


def domain_ridge_fit(stats: list, grid, per_output: bool):
    """Ridge with the strength chosen by leave-one-domain-out error: window ``i`` of the mix is domain
    ``i % 3`` (dealt in turn); each domain is predicted by a fit on the other two."""
    from lp_plugin.planning.skipping.domains import MIX_DOMAINS
    from lp_plugin.planning.skipping.standins import best_per_output, held_out_errors

    total = sum(stats[1:], stats[0])
    errors = held_out_errors(stats, [i % len(MIX_DOMAINS) for i in range(len(stats))], grid)
    if not per_output:
        best = int(errors.sum(1).argmin())
        return total.solve(grid[best]), torch.full((total.cross.shape[1],), grid[best], dtype=torch.float64)
    return best_per_output(total, errors, grid)


def _number(text: str) -> bool:
    """Whether ``text`` is a positive number."""
    try:
        return float(text) > 0
    except ValueError:
        return False


def out_error(out: str | None) -> str | None:
    """Why ``--out`` cannot be written (checked before any work), else None."""
    folder = os.path.dirname(os.path.abspath(out)) if out else None
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        return f"error: --out {out!r}: {folder} is not a folder you can write to"
    return None


def bundled_slices(why: str) -> tuple:
    """``(model, prefix, docs, plain)``: the bundled model in float32 on one torch thread, the document-start token,
    every evaluation slice's documents and the plain model's perplexity on each."""
    from transformers import AutoModelForCausalLM

    from lp_plugin.planning.skipping import domains
    from lp_plugin.planning.skipping.calib import doc_start_token, document_ids, tokenizer_for
    from lp_plugin.tools.bundled import bundled_model_path
    from lp_plugin.tools.prune.sweep import evaluate

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()
    tok = tokenizer_for(model, why)
    prefix = doc_start_token(model, tok)
    docs = {
        p.name: [document_ids(tok, t) for t in domains.slice_documents(tok, p, domains.WINDOW)]
        for p in domains.EVAL_SLICES
    }
    return model, prefix, docs, {name: evaluate(model, prefix, d)["ppl"] for name, d in docs.items()}


def rises(model, prefix: int, docs: dict, plain: dict) -> dict:
    """Each evaluation slice's perplexity under ``model`` over the plain model's, minus 1."""
    from lp_plugin.tools.prune.sweep import evaluate

    return {name: evaluate(model, prefix, d)["ppl"] / plain[name] - 1 for name, d in docs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--fits",
        default="window,domain,domain-global,1,10,100,mean",
        help="window | domain | domain-global | a fixed strength | mean | rankR (linear:R, window CV); comma-separated",
    )
    ap.add_argument("--sets", default="10%,20%", help="shares of " + ", ".join(SETS).replace("%", "%%"))
    ap.add_argument("--grid", default="1e-4,1e-3,1e-2,0.1,1,10,100,1000", help="strengths the domain CV tries")
    ap.add_argument("--calib", default="mix", help="the calibration (mix, mix:TOKENS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    fits = [f for f in args.fits.split(",") if f]
    named = ("window", "domain", "domain-global", "mean")
    bad = [f for f in fits if f not in named and not _number(f) and not (f.startswith("rank") and f[4:].isdigit())]
    if bad or not fits:
        print(
            f"error: --fits {bad or args.fits!r}: each is window, domain, domain-global, mean, rankR (R a number) "
            "or a positive ridge strength",
            file=sys.stderr,
        )
        return 2
    if not all(_number(x) for x in args.grid.split(",")) or not all(k in SETS for k in args.sets.split(",")):
        print(f"error: --grid is numbers and --sets a list of {', '.join(SETS)} (comma-separated)", file=sys.stderr)
        return 2
    grid = tuple(float(x) for x in args.grid.split(","))
    sets = {k: SETS[k] for k in args.sets.split(",")}
    if args.calib != "mix" and not (args.calib.startswith("mix:") and args.calib[4:].isdigit()):
        print(f"error: --calib {args.calib!r}: use mix or mix:TOKENS", file=sys.stderr)
        return 2
    if why := out_error(args.out):
        print(why, file=sys.stderr)
        return 2
    os.environ["LP_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="lp-ridge-")  # every fit computed here
    import lp_plugin
    from lp_plugin.planning.skipping import metrics, standins

    model, prefix, docs, plain = bundled_slices("skip_ridge_domains")
    print("plain", {k: round(v, 3) for k, v in plain.items()}, flush=True)
    original = standins.ridge_fit
    rows = []
    for share, layers in sets.items():
        for how in fits:
            kind = "mean" if how == "mean" else f"linear:{how[4:]}" if how.startswith("rank") else "linear"
            if how == "window" or how.startswith("rank"):
                standins.ridge_fit = original
            elif how in ("domain", "domain-global"):
                standins.ridge_fit = lambda stats, per=(how == "domain"): domain_ridge_fit(stats, grid, per)
            elif how != "mean":
                standins.ridge_fit = lambda stats, a=float(how): (
                    sum(stats[1:], stats[0]).solve(a), torch.full((stats[0].cross.shape[1],), a, dtype=torch.float64))
            metrics.SETTINGS["experiment"] = how  # a cache key of its own
            t0 = time.perf_counter()
            handle = lp_plugin.attach(model, offload="none", skip=layers, stand_in=kind, calib=args.calib)
            rise = rises(model, prefix, docs, plain)
            handle.detach()
            worst = max(rise, key=rise.get)
            rows.append(
                {"calib": args.calib, "share": share, "layers": layers, "fit": how, "rise": rise, "worst": worst,
                 "seconds": time.perf_counter() - t0}
            )
            print(f"{share:4s} {how:14s} worst {rise[worst]:+.1%} ({worst})  "
                  + "  ".join(f"{n} {r:+.1%}" for n, r in rise.items()), flush=True)
    standins.ridge_fit = original
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "bundled SmolLM2-135M-Instruct, float32, CPU, 1 torch thread", "calib": args.calib,
                       "grid": grid, "plain_ppl": plain, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
