"""The ``lp-bench`` command (``python -m lp_plugin.bench.cli`` where the package is not installed).

Exit status: 0 all good; 1 ``--compare`` found a regression past the tolerance; 2 bad arguments;
3 a config failed to run (its error is in the JSON and on the terminal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .configs import ConfigError, parse_configs

DEFAULT_CONFIGS = "baseline,session:even:cpu,stream:even:cpu,stream:even:disk,accelerate_cpu:even"

EPILOG = """\
configs (comma separated):
  baseline                                   the plain model
  accelerate_cpu[:SPEC][:new=N]              Accelerate dispatch_model with SPEC's layers on "cpu" (the peer)
  MODE:SPEC:TIER[:alpha=A][:prefetch=N][:new=N][:cold]
                                             lp_plugin.attach(offload=SPEC, tier=TIER, mode=MODE, ...);
                                             MODE session|stream, SPEC even|odd|all|2-32:2|2,4,6|<plugin>,
                                             TIER cpu|disk; new=N overrides --new for that config,
                                             cold evicts the offload files from the page cache before each timed part
models: a local path or hub id (real weights), or a shape with seeded random weights:
  qwen2.5-3b-shape, smollm2-135m-shape, tiny-qwen2, tiny-llama
protocol: one base model; each config attached -> measured -> detached, round-robin over configs;
  round 0 is a discarded warm-up (it also checks logits vs the plain model and perplexity), then
  --repeats timed rounds; figures are median [min-max].
examples:
  lp-bench --model qwen2.5-3b-shape --dtype bf16 --out r.json --plot r.png
  lp-bench --model tiny-qwen2 --dtype fp32 --configs baseline,stream:even:cpu --out new.json --compare old.json
  lp-bench --results new.json --compare old.json --tolerance speed=0.8,ppl=1e-6,logit=0
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lp-bench",
        description="Measure offloaded configs against the plain model in one run: VRAM, speed, exactness.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="path, hub id, or shape name (see below)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma separated configs (default: {DEFAULT_CONFIGS})")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "nf4"])
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--prompt", type=int, default=100, help="prompt tokens for decode/generate/logits (default 100)")
    p.add_argument("--new", type=int, default=64, help="new tokens per decode/generate run (default 64)")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill forward (default 512)")
    p.add_argument("--ppl-tokens", type=int, default=512, help="tokens of the perplexity text (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds after the warm-up (default 3, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of a shape model's random weights")
    p.add_argument("--tokenizer", default="auto",
                   help="auto (the model's; for shapes the bundled model's), none (UTF-8 bytes as ids), or a path")
    p.add_argument("--offload-dir", default=None, help="folder for disk-tier files (default: a temporary folder, removed after)")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the H2D bandwidth copy in MiB (default 1024)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--plot", help="write a PNG of standby/peak VRAM against decode tokens/s here")
    p.add_argument("--compare", metavar="OLD_JSON", help="exit 1 if a figure regressed past --tolerance against this file")
    p.add_argument("--tolerance", default="",
                   help="speed=0.8,ppl=1e-6,logit=0,argmax=0,vram=1.02 (any subset; these are the defaults)")
    p.add_argument("--results", metavar="JSON", help="do not run: take these results (for --compare, --plot and the table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .report import compare, format_table, load_results, parse_tolerance, plot

    try:
        tol = parse_tolerance(args.tolerance)
    except ValueError as exc:
        parser.error(str(exc))
    if args.results is None and not args.model:
        parser.error("--model is required (or --results JSON to compare/plot an existing run)")
    for name in ("prompt", "new", "prefill", "ppl_tokens", "repeats", "bandwidth_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    def load_or_fail(flag, path):
        try:
            return load_results(path)
        except (OSError, ValueError) as exc:
            parser.error(f"{flag}: {exc}")

    old = load_or_fail("--compare", args.compare) if args.compare else None

    failed = False
    if args.results:
        out = load_or_fail("--results", args.results)
    else:
        try:
            configs = parse_configs(args.configs)
        except ConfigError as exc:
            parser.error(str(exc))
        from .runner import GIB, BenchSettings, run_bench

        settings = BenchSettings(
            model=args.model, dtype=args.dtype, device=args.device, prompt=args.prompt, new=args.new,
            prefill=args.prefill, ppl_tokens=args.ppl_tokens, repeats=args.repeats, seed=args.seed,
            tokenizer=args.tokenizer, offload_dir=args.offload_dir,
            bandwidth_bytes=args.bandwidth_mib * GIB // 1024, progress=not args.no_progress,
        )
        out = run_bench(settings, configs)
        if args.out:
            _write_json(out, args.out)
        failed = any(c.get("error") for c in out["configs"])

    print(format_table(out))
    if args.out and not args.results:
        print(f"results: {args.out}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(out, args.plot)
        print(f"plot: {args.plot}")
    if failed:
        for c in out["configs"]:
            if c.get("error"):
                print(f"config {c['name']} failed: {c['error']}", file=sys.stderr)
                if c.get("traceback"):
                    print(c["traceback"], file=sys.stderr)
    if old is not None:
        regressions, notes = compare(out, old, tol)
        for line in notes:
            print(line)
        if regressions:
            print(f"REGRESSION against {args.compare} (tolerance {_tol_text(tol)}):")
            for line in regressions:
                print(f"  {line}")
            return 1
        print(f"compare: no regression against {args.compare} (tolerance {_tol_text(tol)})")
    return 3 if failed else 0


def _tol_text(tol: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in tol.items())


def _write_json(out: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1, allow_nan=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
