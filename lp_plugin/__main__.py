"""``python -m lp_plugin``: small helpers for the lm-eval integration.

    python -m lp_plugin tasks-path       # folder to pass to lm_eval --include_path
    python -m lp_plugin bundled-model    # convert (once) and print the bundled SmolLM2-135M folder
                  [--force | --check] [--verify]   # convert again / only check; hash every file
    python -m lp_plugin compare-lm-eval BASE.json CANDIDATE.json [--tolerance 1e-6]
                                         # gate lm-eval results: exit 0 equal, 1 regression, 2 bad input
    python -m lp_plugin plan --model PATH|SHAPE --max-memory 0=6GiB [--max-memory cpu=30GiB]
                  --context 8192 [--batch 1] [--dtype nf4] [--work generate|loglikelihood] [--json]
                             # what offload="auto" would do, without loading weights
"""

from __future__ import annotations

import argparse
import sys

from . import gate_lm_eval


def tasks_path() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "tasks")


def bundled_model(args) -> int:
    """``bundled-model``: 0 with the folder on stdout, 1 when ``--check`` finds it missing or
    damaged, 2 (message, no traceback) on a cache or package problem."""
    from .bundled import bundled_model_path, bundled_model_problem, cache_dir
    from .errors import LPPluginError

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.check:
            why = bundled_model_problem(verify=args.verify, log=say)
            if why is not None:
                say(f"{cache_dir()}: {why}")
                return 1
            path = str(cache_dir())
        else:
            path = bundled_model_path(force=args.force, verify=args.verify, log=say)
    except LPPluginError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted (an unfinished conversion leaves nothing behind)")
        return 130
    print(path)
    return 0


def plan(args) -> int:
    """``plan``: 0 with the plan on stdout; 2 (one ``error:`` line) for bad arguments or when nothing
    fits (the message names the smallest budget; ``--json`` also prints it as JSON)."""
    import json

    from .errors import BudgetError, LPPluginError
    from .plan import fit_budget
    from .shapes import is_shape, shape_config

    try:
        if is_shape(args.model):
            hf_config = shape_config(args.model)
            hf_config._name_or_path = args.model
        else:
            from transformers import AutoConfig

            try:
                hf_config = AutoConfig.from_pretrained(args.model)
            except (OSError, ValueError) as exc:
                raise LPPluginError(f"--model {args.model!r} is neither a shape ({', '.join(SHAPE_HINT)}) nor a model "
                                    f"folder with a config.json: {exc}") from None
        weights = args.dtype or ("bf16" if getattr(hf_config, "dtype", None) is None else None)
        result = fit_budget(hf_config, weights=weights, max_memory=";".join(args.max_memory) if args.max_memory else None,
                            max_context=_context_arg(args.context), batch_size=args.batch, work=args.work, prefetch=args.prefetch, protect_first=args.protect_first,
                            protect_last=args.protect_last, tier=args.tier, offload_folder=args.offload_folder,
                            mode=args.mode, main_device=args.device, bandwidth=args.bandwidth)
    except BudgetError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "min_bytes": exc.min_bytes, "host_bytes": exc.host_bytes,
                              "smallest": exc.smallest.to_dict() if exc.smallest else None}, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LPPluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .budget import describe

    print(json.dumps(result.to_dict(), indent=2) if args.json else describe(result))
    return 0


SHAPE_HINT = ("qwen2.5-3b-shape", "llama-3-8b-shape", "smollm2-135m-shape")


def _context_arg(text):
    """``--context``: a whole number of tokens or ``auto``."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    if not (text.isascii() and text.isdigit()):
        from .errors import OffloadSpecError

        raise OffloadSpecError(f"--context must be a whole number of tokens or 'auto', got {text!r}")
    return int(text)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="print what offload='auto' would do for a budget, without loading weights",
                       description="Plan offload='auto' for a VRAM budget from the model's config alone (no weights).")
    p.add_argument("--model", required=True, help="a model folder (its config.json) or a shape name such as qwen2.5-3b-shape")
    p.add_argument("--max-memory", action="append", metavar="[DEVICE=]SIZE",
                   help="the card, Accelerate's form: 0=6GiB (GPU 0: everything the process holds there counts), "
                        "cpu=30GiB (host memory for the offloaded layers), or a bare 6GiB (the main device); repeat for "
                        "several (default: what the device has free now)")
    p.add_argument("--context", help="tokens of context the budget must hold (default: the model's "
                                     "max_position_embeddings, as lm-eval picks max_length; auto: the longest that fits)")
    p.add_argument("--batch", type=int, help="sequences per forward (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "nf4"),
                   help="format the model is loaded in (default: the config's dtype, else bf16)")
    p.add_argument("--work", choices=("generate", "loglikelihood"),
                   help="generate (last-token logits; default) or loglikelihood (lm-eval's full logits)")
    p.add_argument("--mode", choices=("session", "stream"), default="session",
                   help="session (default) lets the planner pick session or stream; stream keeps to stream")
    p.add_argument("--tier", default="cpu", help="cpu (pinned host memory; default) or disk (needs --offload-folder)")
    p.add_argument("--offload-folder", help="the disk tier's folder")
    p.add_argument("--prefetch", type=int, default=1, help="stream mode: layers copied ahead (default 1)")
    p.add_argument("--protect-first", type=int, default=2, help="leading layers never offloaded (default 2)")
    p.add_argument("--protect-last", type=int, default=3, help="trailing layers never offloaded (default 3)")
    p.add_argument("--device", default="cuda:0", help="the main device the plan is for (default cuda:0; no GPU is needed here)")
    p.add_argument("--bandwidth", type=float, help="host-to-device GB/s to predict speed with (default: measured on "
                                                   "this machine's GPU, else a nominal 25)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lp_plugin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks-path", help="print the lm-eval task folder (for --include_path)")
    bm = sub.add_parser("bundled-model", help="print the path of the bundled SmolLM2-135M-Instruct transformers folder")
    what = bm.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="convert again even if a cached copy exists")
    what.add_argument("--check", action="store_true",
                      help="only check the cache, never convert: print its path and exit 0 if intact, else say why and exit 1")
    bm.add_argument("--verify", action="store_true",
                    help="hash every cached file (SHA-256) even when their sizes, inodes and times are unchanged")
    cmp = sub.add_parser("compare-lm-eval", help="gate one lm-eval results file against another (metrics, throughput)",
                         description=gate_lm_eval.__doc__.split("\n\n")[0])
    gate_lm_eval.add_arguments(cmp)
    _plan_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "tasks-path":
        print(tasks_path())
        return 0
    if args.command == "bundled-model":
        return bundled_model(args)
    if args.command == "compare-lm-eval":
        return gate_lm_eval.run(args, err=lambda msg: print(msg, file=sys.stderr))
    if args.command == "plan":
        return plan(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
