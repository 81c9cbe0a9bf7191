"""``python -m lp_plugin``: small helpers for the lm-eval integration.

    python -m lp_plugin tasks-path       # folder to pass to lm_eval --include_path
    python -m lp_plugin bundled-model    # convert (once) and print the bundled SmolLM2-135M folder
                  [--force | --check] [--verify]   # convert again / only check; hash every file
    python -m lp_plugin compare-lm-eval BASE.json CANDIDATE.json [--tolerance 1e-6]
                                         # gate lm-eval results: exit 0 equal, 1 regression, 2 bad input
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
    args = parser.parse_args(argv)

    if args.command == "tasks-path":
        print(tasks_path())
        return 0
    if args.command == "bundled-model":
        return bundled_model(args)
    if args.command == "compare-lm-eval":
        return gate_lm_eval.run(args, err=lambda msg: print(msg, file=sys.stderr))
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
