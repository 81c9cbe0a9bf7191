"""Where layer skipping's loss on another text domain comes from: the layers chosen, or the stand-ins' fit.

For each layer set (default: the frontier's greedy choices at 10% and 20% with the default calibration, and greedy's
choices calibrated on the ``license`` slice itself), linear stand-ins are fitted on the default calibration
(``mix``) and on the evaluation slice ``--domain`` itself, and every evaluation slice is scored (documents of 512
tokens after the document-start token, as lp-prune scores them). ``--oracle`` first runs greedy calibrated on the
slice itself: the best selection + fitting can do on that text. The bundled SmolLM2-135M on the CPU, float32.

    python benchmarks/skip_fit_domain.py --out benchmarks/results/cpu-skipping-fit-vs-selection.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from skip_ridge_domains import bundled_slices, out_error, rises

SETS = ([14, 15, 25], [14, 15, 28], [4, 5, 14, 15, 25, 28], [5, 7, 14, 15, 21, 28])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="license", help="the evaluation slice the stand-ins are also fitted on")
    ap.add_argument("--sets", default=";".join(",".join(map(str, s)) for s in SETS), help="layer sets, ';'-separated")
    ap.add_argument("--oracle", default="10,20", help="greedy shares (%%) calibrated on --domain itself ('' for none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import lp_plugin
    from lp_plugin.planning.skipping import domains

    if args.domain not in domains.SLICES:
        print(f"error: --domain {args.domain!r}; choose from {', '.join(domains.SLICES)}", file=sys.stderr)
        return 2
    try:
        sets = [[int(i) for i in part.split(",")] for part in args.sets.split(";") if part.strip()]
        shares = [int(x) for x in args.oracle.split(",") if x.strip()]
    except ValueError:
        print("error: --sets is 'L,L,...;L,...' and --oracle 'P,P' (integers)", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    from lp_plugin.tools.bundled import bundled_model_path

    n_layers = AutoConfig.from_pretrained(bundled_model_path()).num_hidden_layers
    if bad := [s for s in sets if not s or any(not 0 <= i < n_layers for i in s)]:
        print(f"error: --sets {bad}: layers are 0..{n_layers - 1}", file=sys.stderr)
        return 2
    if why := out_error(args.out):
        print(why, file=sys.stderr)
        return 2
    model, prefix, docs, plain = bundled_slices("skip_fit_domain")
    own = [i for d in docs[args.domain] for i in d]
    rows = []

    def score(kind, layers, calib_name, seconds):
        rise = rises(model, prefix, docs, plain)
        rows.append({"kind": kind, "layers": layers, "calib": calib_name, "rise": rise, "seconds": seconds})
        print(f"{kind:8s} {str(layers):26s} fit on {calib_name:8s} "
              + "  ".join(f"{n} {r:+.1%}" for n, r in rise.items()), flush=True)

    for share in shares:
        t0 = time.perf_counter()
        handle = lp_plugin.attach(model, offload="none", skip=f"greedy:{share}%", stand_in="linear", calib=own)
        layers = handle.info()["skipped_layers"]
        score(f"oracle {share}%", layers, args.domain, time.perf_counter() - t0)
        handle.detach()
    for layers in sets:
        for calib_name, calib in (("mix", "mix"), (args.domain, own)):
            t0 = time.perf_counter()
            handle = lp_plugin.attach(model, offload="none", skip=layers, stand_in="linear", calib=calib)
            score("set", layers, calib_name, time.perf_counter() - t0)
            handle.detach()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "bundled SmolLM2-135M-Instruct, float32, CPU", "domain": args.domain,
                       "plain_ppl": plain, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
