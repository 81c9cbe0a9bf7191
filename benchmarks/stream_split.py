"""Where stream mode's time goes in a launch-bound decode (NF4 by default): host work or waiting for copies.

    python benchmarks/stream_split.py --dtype nf4 --layers 0-5,7-16,18-28,30-35 --out split.json

One process, one random-init model, configs interleaved round by round (round 0 discarded), each the bare greedy
loop inside a session: ``plain``; ``stream`` (the layers streamed, prefetch 1); ``stream_p2`` (prefetch 2);
``stream_dry`` (prefetch 1, every layer copy left out: the ring's host work and waits with nothing to wait for;
its outputs are garbage, its time is what the host costs); ``stream_two_hooks`` (prefetch 1, the stream hook kept
on each layer's first and last Linear module only: the host cost of the hooks in between; needs Linear modules
that run in the order they are registered, as in Qwen2 and Llama). Per config: tok/s and the main thread's CPU time
per token (``time.thread_time``, the loop without its final synchronize), medians of per-round ratios to ``plain``
[min, max]. The embeddings stay on the device (a card's plan with ``embeddings="host"`` adds the lm_head's copy:
``benchmarks/head_copy.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lp_plugin  # noqa: E402
from decode_exactness import _card  # noqa: E402  (benchmarks/card.py as a module: its round_stats)
from lp_plugin.core import hooks  # noqa: E402
from lp_plugin.tools.bench.measure import cache_kwargs, no_gc  # noqa: E402
from lp_plugin.tools.shapes import build_shape_model, build_shape_model_nf4  # noqa: E402

CONFIGS = ("plain", "stream", "stream_p2", "stream_dry", "stream_two_hooks")


def decode(model, ids, new: int) -> tuple:
    """tok/s and the main thread's CPU seconds per token of ``new`` greedy steps after 4 untimed ones."""
    with torch.no_grad():
        kw = cache_kwargs(model)
        tok = model(input_ids=ids, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
        for _ in range(4):
            tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
        with no_gc():
            torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(new):
                tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
            cpu = time.thread_time() - c0
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    return new / wall, cpu / new


def dry(ring) -> None:
    """The ring's copies left out: each load's event is recorded where its copy would have been."""

    def copy(pos, src, fork, capturing):
        slot = pos % ring.nslots
        ring.side.wait_event(fork)
        with torch.cuda.stream(ring.side):
            ring.loaded[slot].record()
        ring.event_ok[slot] = not capturing

    ring._copy = copy


def two_hooks(ring) -> None:
    """The stream hook kept on each unit's first and last Linear module (registration order) only."""
    for pos, unit in enumerate(ring.units):
        modules = unit.stream_modules
        if len(modules) > 2:
            for module in modules[1:-1]:
                hooks.remove(module)
            ring.nlinear[pos] = 2


def setup(model, name: str, layers: str):
    if name == "plain":
        return None
    handle = lp_plugin.attach(model, offload=layers, mode="stream", prefetch=2 if name == "stream_p2" else 1,
                              protect_first=0, protect_last=0)
    ring = handle.ring
    if name == "stream_dry":
        dry(ring)
    elif name == "stream_two_hooks":
        two_hooks(ring)
    return handle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-3b-shape")
    ap.add_argument("--dtype", default="nf4", choices=("nf4", "bf16"))
    ap.add_argument("--layers", default="0-5,7-16,18-28,30-35",
                    help="the layers streamed (default: the NF4 2 GiB card's plan at 8192 tokens)")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up round")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        print(f"error: unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    from lp_plugin.errors import OffloadSpecError
    from lp_plugin.tools.shapes import is_shape, shape_config, shape_names

    if not is_shape(args.shape):
        print(f"error: --shape {args.shape!r} is not a shape; choose from {', '.join(shape_names())}", file=sys.stderr)
        return 2
    try:
        lp_plugin.resolve_layers(args.layers, shape_config(args.shape).num_hidden_layers)
    except OffloadSpecError as exc:
        print(f"error: --layers: {exc}", file=sys.stderr)
        return 2
    if args.new < 1 or args.rounds < 1:
        print("error: --new and --rounds must be >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: stream_split.py times CUDA decode; run it on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = (build_shape_model_nf4(args.shape, "cuda") if args.dtype == "nf4"
             else build_shape_model(args.shape, args.dtype, "cuda"))
    ids = torch.randint(0, 1000, (1, args.prompt), device=device, generator=torch.Generator(device).manual_seed(0))
    rows: dict = {c: {"tok_s": [], "host_ms_per_token": []} for c in configs}
    for r in range(args.rounds + 1):
        for name in configs:
            handle = setup(model, name, args.layers)
            try:
                with lp_plugin.session(model) if handle is not None else torch.no_grad():
                    tok_s, cpu = decode(model, ids, args.new)
            finally:
                if handle is not None:
                    handle.detach()
            if r:
                rows[name]["tok_s"].append(tok_s)
                rows[name]["host_ms_per_token"].append(cpu * 1e3)
        print(f"round {r}: " + ", ".join(f"{c} {rows[c]['tok_s'][-1]:.1f}" for c in configs if rows[c]["tok_s"]),
              flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "dtype": args.dtype, "layers": args.layers, "new": args.new, "rounds": args.rounds, "configs": {}}
    stats = _card().round_stats
    base = rows.get("plain")
    for name, row in rows.items():
        entry = {"tok_s": stats(row["tok_s"]), "host_ms_per_token": stats(row["host_ms_per_token"])}
        if base is not None:
            entry["vs_plain"] = stats([a / b for a, b in zip(row["tok_s"], base["tok_s"])])
        report["configs"][name] = entry
        print(f"{name:18s} {entry['tok_s']['median']:6.2f} tok/s  vs plain {entry.get('vs_plain', {}).get('median', 0):.3f} "
              f"[{entry.get('vs_plain', {}).get('min', 0):.3f}-{entry.get('vs_plain', {}).get('max', 0):.3f}]  "
              f"host {entry['host_ms_per_token']['median']:.1f} ms/token, wall {1e3 / entry['tok_s']['median']:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
