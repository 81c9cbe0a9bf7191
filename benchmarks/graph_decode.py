"""Decode speed with ``decode="graph"`` (each decode step a replayed CUDA graph) against eager decode, in one process
with configs interleaved round by round:

* ``plain_eager``: the plain model loaded whole on the GPU by transformers, eager (what the goal is judged against);
* ``plain_graph``: the same model through ``lp_plugin.from_pretrained(offload="none", decode="graph")``;
* ``session_graph``: ``offload="even"``, session mode;
* ``stream_eager`` / ``stream_graph``: every layer streamed from pinned host memory (``offload="all"``,
  ``protect_first=0``, ``protect_last=0``, stream mode);
* ``card_eager`` / ``card_graph``: the plan ``offload="auto", max_memory={0: CARD}, max_context=CONTEXT`` makes
  (no ballast here: the card's plan, its speed); ``card_graph`` at ``--graph-context`` where given. A config whose
  plan the planner refuses is recorded under ``refused`` with the planner's message, and not run.

    python benchmarks/graph_decode.py --model qwen2.5-3b-shape --dtype nf4 --out r.json

Each round: a greedy decode inside a session with a static cache (the prompt's prefill and ``WARM`` steps untimed:
the first eager, the second captured), then ``--new-tokens`` timed steps. Round 0 is dropped; medians [min, max] of
per-round ratios against ``plain_eager`` and against the transfer bound (the bytes a step moves at the pinned copy
rate measured each round). Exactness: every config's ``generate()`` (greedy, its per-step logits) against
``plain_eager``'s ``generate()`` with a static cache, bit for bit.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lp_plugin  # noqa: E402
from decode_exactness import _card  # noqa: E402  (benchmarks/card.py as a module)
from lp_plugin.core.devices import h2d_bandwidth  # noqa: E402

CONFIGS = ("plain_eager", "plain_graph", "session_graph", "stream_eager", "stream_graph", "card_eager", "card_graph")
WARM = 4  # untimed decode steps after the prefill


def _options(name: str, args, dev) -> dict | None:
    """lp_plugin's options for ``name`` (None: the plain transformers model)."""
    decode = "graph" if name.endswith("_graph") else "eager"
    if name == "plain_eager":
        return None
    if name == "plain_graph":
        return {"offload": "none", "decode": decode}
    if name == "session_graph":
        return {"offload": "even", "mode": "session", "decode": decode}
    if name.startswith("stream_"):
        return {"offload": "all", "protect_first": 0, "protect_last": 0, "mode": "stream", "decode": decode}
    context = args.graph_context if decode == "graph" and args.graph_context else args.context
    return {"offload": "auto", "max_memory": {dev.index: args.card}, "max_context": context, "decode": decode}


def static_decode(model, ids, new: int, dev) -> float:
    """tok/s of ``new`` greedy steps with a static cache inside a session, after the prefill and ``WARM`` steps."""
    from transformers import StaticCache

    with torch.no_grad(), lp_plugin.session(model):
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + WARM + new + 1)
        tok = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(WARM):
            tok = model(input_ids=tok, past_key_values=cache).logits[:, -1:].argmax(-1)
        gc.disable()
        try:
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(new):
                tok = model(input_ids=tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize(dev)
            return new / (time.perf_counter() - t0)
        finally:
            gc.enable()


def generated(model, ids, new: int, graph: bool):
    kw = {} if graph else {"cache_implementation": "static", "disable_compile": True}
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-3b-shape", help="a shape name (random-init, saved once)")
    ap.add_argument("--dtype", default="nf4", choices=["bf16", "fp16", "nf4"])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--card", default="2GiB", help="max_memory of the card_* configs' plan")
    ap.add_argument("--context", type=int, default=8192, help="max_context of the card_* configs' plan")
    ap.add_argument("--graph-context", type=int, default=None,
                    help="max_context of card_graph's plan (default: --context; a static cache's prefill needs more "
                         "memory, so a card may hold a shorter context with decode='graph')")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (plus one warm-up round, dropped)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--ckpt-dir", default="/dev/shm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or "plain_eager" not in names:
        print(f"graph_decode.py: --configs must include plain_eager and name only {list(CONFIGS)}; got {unknown}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("graph_decode.py: needs a CUDA GPU (it replays CUDA graphs)", file=sys.stderr)
        return 2
    card = _card()
    folder = card.shape_folder(args.model, args.seed, args.ckpt_dir)
    kw = card._load_kwargs(args.dtype)
    dev = torch.device("cuda", torch.cuda.current_device())
    from transformers import AutoModelForCausalLM

    models, plans, refused = {}, {}, {}
    for name in names:
        options = _options(name, args, dev)
        if options is None:
            models[name] = AutoModelForCausalLM.from_pretrained(folder, device_map={"": dev}, **kw).eval()
            continue
        try:
            models[name] = lp_plugin.from_pretrained(folder, main_device=dev, **options, **kw)
        except lp_plugin.BudgetError as exc:  # the card's plan refuses this config: recorded, not run
            refused[name] = {"max_context": options.get("max_context"), "error": str(exc)}
            print(f"{name}: refused by the planner: {str(exc)[:300]}", flush=True)
            continue
        info = lp_plugin.get_handle(models[name]).info()
        plans[name] = {k: info.get(k) for k in ("mode", "prefetch", "offloaded_layers", "bytes_per_forward",
                                                "embeddings", "lm_head_bytes_per_call")}
        plans[name]["max_context"] = options.get("max_context")
    names = [n for n in names if n in models]
    vocab = models["plain_eager"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed)).to(dev)

    exact = {}
    want = generated(models["plain_eager"], ids, 16, graph=False)
    for name in names:
        got = generated(models[name], ids, 16, graph=name.endswith("_graph"))
        exact[name] = {"tokens_equal": bool(torch.equal(got[0], want[0])),
                       "logits_equal": bool(torch.equal(got[1], want[1])),
                       "logits_max_abs_diff": float((got[1].float() - want[1].float()).abs().max())}
    print("exact:", json.dumps(exact), flush=True)

    rounds = []
    for r in range(args.rounds + 1):
        row = {name: static_decode(models[name], ids, args.new_tokens, dev) for name in names}
        row["h2d_gbps"] = h2d_bandwidth(dev, 64 << 20, pinned=True)["gbps"]
        print(f"round {r}{' (warm-up, dropped)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        if r:
            rounds.append(row)
    summary = {}
    for name in names:
        moved = card.moved_per_token(plans.get(name, {}))
        bounds = [card.transfer_bound(r["h2d_gbps"], moved) for r in rounds] if moved else None
        summary[name] = {
            "tok_s": card.round_stats([r[name] for r in rounds]),
            "vs_plain_eager": card.round_stats([r[name] / r["plain_eager"] for r in rounds]),
            "moved_per_step": moved,
            "vs_bound": card.round_stats([r[name] / b for r, b in zip(rounds, bounds)]) if bounds else None,
            "decode": lp_plugin.get_handle(models[name]).info()["decode"] if name in plans else None,
            **exact[name],
        }
        s = summary[name]
        line = (f"{name:14s} {s['tok_s']['median']:7.2f} tok/s  vs plain_eager {s['vs_plain_eager']['median']:.2f} "
                f"[{s['vs_plain_eager']['min']:.2f}-{s['vs_plain_eager']['max']:.2f}]")
        if s["vs_bound"]:
            line += f"  vs bound {s['vs_bound']['median']:.2f} [{s['vs_bound']['min']:.2f}-{s['vs_bound']['max']:.2f}]"
        print(line + f"  exact {s['tokens_equal'] and s['logits_equal']}", flush=True)
    env = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__}
    try:
        env["bitsandbytes"] = __import__("bitsandbytes").__version__
    except ImportError:
        pass
    report = {"model": args.model, "dtype": args.dtype, "card": args.card, "context": args.context,
              "graph_context": args.graph_context or args.context, "new_tokens": args.new_tokens,
              "prompt": args.prompt, "env": env, "plans": plans, "refused": refused, "rounds": rounds,
              "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
