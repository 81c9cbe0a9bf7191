"""Where stream mode's host time goes in a launch-bound decode (NF4 by default): the bare greedy
loop timed for the plain model and for ``stream:even:cpu`` (interleaved, after a warm-up), then one
stream loop under cProfile, printing the functions with the most own time.

    python benchmarks/stream_overhead.py --dtype nf4 --tokens 64 --out prof.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch

import lp_plugin
from lp_plugin.tools.bench.measure import bare_decode
from lp_plugin.tools.shapes import build_shape_model, build_shape_model_nf4


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-3b-shape")
    ap.add_argument("--dtype", default="nf4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = (build_shape_model_nf4(args.shape, "cuda") if args.dtype == "nf4"
             else build_shape_model(args.shape, args.dtype, "cuda"))
    ids = torch.randint(0, 1000, (1, 100), device=device, generator=torch.Generator(device).manual_seed(0))
    speeds = {"baseline": [], "stream": []}
    for r in range(args.rounds + 1):
        for name in speeds:
            h = lp_plugin.attach(model, offload="even", mode="stream") if name == "stream" else None
            with lp_plugin.session(model):
                tok_s = bare_decode(model, ids, args.tokens, device)["tok_s"]
            if h:
                h.detach()
            if r:
                speeds[name].append(tok_s)
    lines = [f"{torch.cuda.get_device_name()} {args.shape} {args.dtype}: bare decode tok/s, median [min-max] of {args.rounds}"]
    for name, xs in speeds.items():
        lines.append(f"  {name:9s} {statistics.median(xs):6.2f} [{min(xs):.2f}-{max(xs):.2f}]")
    ratios = sorted(s / b for s, b in zip(speeds["stream"], speeds["baseline"]))
    lines.append(f"  stream/baseline per round: median {statistics.median(ratios):.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}]")
    h = lp_plugin.attach(model, offload="even", mode="stream")
    with lp_plugin.session(model):
        bare_decode(model, ids, 8, device)
        prof = cProfile.Profile()
        prof.enable()
        bare_decode(model, ids, args.tokens, device)
        prof.disable()
    h.detach()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    lines.append(buf.getvalue())
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
