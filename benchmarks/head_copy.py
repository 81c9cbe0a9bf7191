"""Decode speed of a plan with the input embeddings and lm_head in host memory (``embeddings="host"``), by how the
lm_head's copy for each decode step moves, in one process with rounds interleaved:

* ``plain``: the model loaded whole on the GPU (the speed the plan is judged against where it is lower than
  the transfer bound);
* ``carried``: the plan as ``lp_plugin.from_pretrained(offload="auto", max_memory=CARD)`` makes it: the copy starts
  at the step's input embeddings, in pieces behind the ring's layer copies (the default);
* ``side_stream``: the same copy on a CUDA stream of its own (what runs without a ring);
* ``at_call``: the copy made at the lm_head's call (no copy ahead);
* ``device_embeddings``: the same streamed layers with the embeddings and lm_head on the device (no head copy;
  does not fit the card, shown for the cost of the copy).

    python benchmarks/head_copy.py --model qwen2.5-3b-shape --dtype nf4 --card 2GiB --context 8192 --out r.json

The card's budget is passed as ``max_memory`` (the plan the emulated card gets; no ballast here). Bare greedy
decode in a session (``lp_plugin.tools.bench.measure.bare_decode``), round 0 dropped; medians [min, max] of the
per-round ratios against ``plain`` and against the transfer bound (the layers' and the lm_head's bytes per step at
the pinned copy rate measured each round).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

sys.path.insert(0, str(HERE))

import lp_plugin  # noqa: E402
from decode_exactness import _card  # noqa: E402  (benchmarks/card.py as a module)
from lp_plugin.core.devices import h2d_bandwidth  # noqa: E402
from lp_plugin.tools.bench.measure import bare_decode  # noqa: E402

CONFIGS = ("plain", "carried", "side_stream", "at_call", "device_embeddings")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-3b-shape", help="a shape name (random-init, saved once)")
    ap.add_argument("--dtype", default="nf4", choices=["bf16", "fp16", "nf4"])
    ap.add_argument("--card", default="2GiB", help="max_memory for the main GPU (the card)")
    ap.add_argument("--context", type=int, default=8192, help="max_context the plan holds")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (plus one warm-up round, dropped)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ckpt-dir", default="/dev/shm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("head_copy.py: needs a CUDA GPU (it times copies to the device)", file=sys.stderr)
        return 2
    card = _card()
    folder = card.shape_folder(args.model, args.seed, args.ckpt_dir)
    kw = card._load_kwargs(args.dtype)
    dev = torch.device("cuda", torch.cuda.current_device())
    model = lp_plugin.from_pretrained(
        folder, offload="auto", max_memory={dev.index: args.card}, max_context=args.context, **kw
    )
    handle = lp_plugin.get_handle(model)
    info = handle.info()
    host = handle.host_embeddings
    if host is None:
        print(f"head_copy.py: the plan for {args.card} keeps the embeddings on the device; pick a smaller card",
              file=sys.stderr)
        return 2
    carrier = host.carrier
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder, device_map={"": dev}, **kw).eval()
    same = AutoModelForCausalLM.from_pretrained(folder, device_map={"": dev}, **kw).eval()
    lp_plugin.attach(same, offload=info["offloaded_layers"], mode="stream", prefetch=info["prefetch"],
                     protect_first=0, protect_last=0)

    def setup(name):
        host.copy_ahead = name != "at_call"
        host.carrier = carrier if name == "carried" else None
        return {"plain": plain, "device_embeddings": same}.get(name, model)

    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(args.seed)).to(dev)
    moved = card.moved_per_token(info)
    rounds = []
    for r in range(args.rounds + 1):
        row = {}
        for name in CONFIGS:
            m = setup(name)
            with lp_plugin.session(m):
                row[name] = bare_decode(m, ids, args.new_tokens, dev)["tok_s"]
        gbps = h2d_bandwidth(dev, 64 << 20, pinned=True)["gbps"]
        row["h2d_gbps"] = gbps
        row["bound_tok_s"] = card.transfer_bound(gbps, moved)
        print(f"round {r}{' (warm-up, dropped)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        if r:
            rounds.append(row)
    setup("carried")
    summary = {}
    for name in CONFIGS:
        summary[name] = {
            "tok_s": card.round_stats([r[name] for r in rounds]),
            "vs_plain": card.round_stats([r[name] / r["plain"] for r in rounds]),
            "vs_bound": card.round_stats([r[name] / r["bound_tok_s"] for r in rounds]),
            "vs_ceiling": card.round_stats([r[name] / min(r["plain"], r["bound_tok_s"]) for r in rounds]),
        }
        s = summary[name]
        print(f"{name:18s} {s['tok_s']['median']:6.2f} tok/s  vs plain {s['vs_plain']['median']:.2f} "
              f"[{s['vs_plain']['min']:.2f}-{s['vs_plain']['max']:.2f}]  vs min(plain, bound) "
              f"{s['vs_ceiling']['median']:.2f} [{s['vs_ceiling']['min']:.2f}-{s['vs_ceiling']['max']:.2f}]",
              flush=True)
    env = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__}
    plan = {k: info.get(k) for k in ("mode", "prefetch", "ring_slots", "offloaded_layers", "bytes_per_forward",
                                     "embeddings", "lm_head_bytes_per_call", "embeddings_tied")}
    report = {"model": args.model, "dtype": args.dtype, "card": args.card, "context": args.context,
              "new_tokens": args.new_tokens, "env": env, "plan": plan, "moved_per_step": moved,
              "copies_ahead": handle.info()["lm_head_copies_ahead"], "rounds": rounds, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
