"""Where decode time goes: a bare greedy loop (KV cache) on a random-init shape, plain model vs
each offload config, timed and then profiled with torch.profiler (top ops by self CPU time).

    python benchmarks/profile_decode.py --dtype nf4 --configs session:cpu,stream:cpu
"""

from __future__ import annotations

import argparse
import time

import torch

import lp_plugin
from lp_plugin.tools.bench.measure import cache_kwargs
from lp_plugin.tools.shapes import build_shape_model, build_shape_model_nf4


def loop(model, ids, n):
    with torch.no_grad():
        kw = cache_kwargs(model)
        tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-3b-shape")
    ap.add_argument("--dtype", default="nf4")
    ap.add_argument("--configs", default="session:cpu,stream:cpu")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    model = (build_shape_model_nf4(args.shape, "cuda") if args.dtype == "nf4"
             else build_shape_model(args.shape, args.dtype, "cuda"))
    ids = torch.randint(0, 1000, (1, 100), device="cuda")
    runs = [("baseline", None)] + [(c, c.split(":")) for c in args.configs.split(",")]
    for name, cfg in runs:
        where = {"offload_folder": "/tmp/lp_prof"} if cfg and cfg[1] == "disk" else {}  # (a cpu tier keeps no files)
        h = lp_plugin.attach(model, offload="even", mode=cfg[0], tier=cfg[1], **where) if cfg else None
        with lp_plugin.session(model):
            loop(model, ids, 8)
            speeds = [loop(model, ids, args.tokens) for _ in range(3)]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                loop(model, ids, 8)
        print(f"=== {args.dtype} {name}: decode tok/s {sorted(round(s, 2) for s in speeds)}", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        if h:
            h.detach()


if __name__ == "__main__":
    main()
