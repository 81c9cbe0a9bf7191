"""Where offloaded decode parts from the plain model, in one process: teacher-forced logits of the plain model
(one forward over prompt + its greedy tokens, and the decode steps through a KV cache) and generate's scores at
every step, against the same model with lp_plugin attached, over a matrix of contexts, offload specs, modes and
prefetch depths. The plain model runs several times first: on a GPU its decode kernels can give one of a few
results run to run (measured: two at 8192 tokens on an H200), so a case is exact when every result it gives is
bit for bit one the plain model gives. One JSON line per case on stdout and in --out; exit 1 when any is not.

    python benchmarks/decode_exactness.py --shape qwen2.5-3b-shape --contexts 512,8192 --out exact.json
    python benchmarks/decode_exactness.py --model ~/.cache/lp_plugin/smollm2-135m-instruct --device cpu

The emulated-card check (``benchmarks/card.py``) compares two processes; this one keeps everything in one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lp_plugin  # noqa: E402
from lp_plugin.tools.shapes import build_shape_model, is_shape, load_checkpoint  # noqa: E402


def _card():
    spec = importlib.util.spec_from_file_location("card_bench", HERE / "card.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shape", default=None, help="a shape with seeded random weights (default qwen2.5-3b-shape)")
    src.add_argument("--model", default=None, help="a checkpoint folder instead of a shape")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32", "nf4"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", default="512,8192", help="prompt lengths, comma separated")
    ap.add_argument("--specs", default="even,2-6:8-16:18-26:28-32",
                    help="offload specs, comma separated (':' inside one spec stands for ',')")
    ap.add_argument("--modes", default="stream,session")
    ap.add_argument("--prefetch", default="1,0")
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--new", type=int, default=16, help="plain greedy tokens fed back (default 16)")
    ap.add_argument("--plain-repeats", type=int, default=4,
                    help="plain runs per context: the results the plain model itself gives (default 4)")
    ap.add_argument("--sdpa", default="default", choices=("default", "flash", "math", "cudnn"),
                    help="run everything under one SDPA backend (default: PyTorch's choice)")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    card = _card()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (read when cuBLAS starts: before any CUDA work)
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    if args.model:
        model = load_checkpoint(args.model, args.dtype, device)
    else:
        shape = args.shape or "qwen2.5-3b-shape"
        if not is_shape(shape):
            ap.error(f"--shape {shape!r} is not a shape")
        model = build_shape_model(shape, args.dtype, device)
    model.eval()
    vocab = model.config.vocab_size
    rows, exact = [], True
    backend = contextlib.nullcontext()
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel(
            getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}[args.sdpa])
        )
    with backend:
        for context in (int(c) for c in args.contexts.split(",")):
            ids = card._prompt(vocab, context, 0).to(device)
            plain_steps: list = []
            tokens, _ = card._generate(model, ids, args.new, plain_steps)
            # the plain model's own outcomes: a GPU's decode kernels may give one of a few results run to run
            outcomes = {"forced_logits": [], "forced_decode_logits": [], "generate": [torch.stack(plain_steps)]}
            for _ in range(args.plain_repeats):
                for key, value in card._forced_outputs(model, ids, tokens).items():
                    if not any(torch.equal(value, seen) for seen in outcomes[key]):
                        outcomes[key].append(value)
            for _ in range(args.plain_repeats - 1):
                steps: list = []
                again, _ = card._generate(model, ids, args.new, steps)
                got = torch.stack(steps)
                if again == tokens and not any(torch.equal(got, seen) for seen in outcomes["generate"]):
                    outcomes["generate"].append(got)
            plain = {key: outcomes[key][0] for key in ("forced_logits", "forced_decode_logits")}
            rows.append({"context": context, "case": "plain", "runs": args.plain_repeats,
                         "distinct_outcomes": {k: len(v) for k, v in outcomes.items()},
                         "spread": {k: max(card._max_abs_diff(v[0], o) for o in v) for k, v in outcomes.items()}})
            print(json.dumps(rows[-1]), flush=True)

            def matches(key, value, outcomes=outcomes):
                return any(torch.equal(value, seen) for seen in outcomes[key])

            # session mode copies nothing ahead: one run per spec there, prefetch None
            combos = dict.fromkeys((spec, mode, p if mode == "stream" else None) for spec, mode, p in itertools.product(
                args.specs.split(","), args.modes.split(","), (int(p) for p in args.prefetch.split(","))))
            for spec, mode, prefetch in combos:
                t0 = time.perf_counter()
                ahead = {} if prefetch is None else {"prefetch": prefetch}
                handle = lp_plugin.attach(model, offload=spec.replace(":", ","), mode=mode, **ahead, tier=args.tier)
                try:
                    got = card._forced_outputs(model, ids, tokens)
                    with lp_plugin.session(model):
                        in_session = card._forced_outputs(model, ids, tokens)
                    steps = []
                    got_tokens, _ = card._generate(model, ids, args.new, steps)
                finally:
                    handle.detach()
                row = {"context": context, "spec": spec, "mode": mode, "prefetch": prefetch, "tier": args.tier,
                       **card._compare_forced(plain, got), "in_session": card._compare_forced(plain, in_session),
                       "generate_tokens_equal": got_tokens == tokens,
                       "seconds": round(time.perf_counter() - t0, 1)}
                # exact: every result is one the plain model itself gives (bit for bit)
                row["matches_a_plain_run"] = {
                    "forced": all(matches(k, got[k]) for k in got),
                    "in_session": all(matches(k, in_session[k]) for k in in_session),
                    "generate": got_tokens == tokens and matches("generate", torch.stack(steps)),
                }
                exact &= all(row["matches_a_plain_run"].values())
                rows.append(row)
                print(json.dumps(row), flush=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "sdpa": args.sdpa, "deterministic": args.deterministic, "dtype": args.dtype,
           "model": args.model or args.shape or "qwen2.5-3b-shape"}
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "exact": exact, "cases": rows}, indent=1) + "\n")
    print("exact" if exact else "NOT exact: see the cases above")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
