"""``python -m lp_plugin``: small helpers for the lm-eval integration.

    python -m lp_plugin tasks-path       # folder to pass to lm_eval --include_path
    python -m lp_plugin bundled-model    # convert (once) and print the bundled SmolLM2-135M folder
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lp_plugin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks-path", help="print the lm-eval task folder (for --include_path)")
    bm = sub.add_parser("bundled-model", help="print the path of the bundled SmolLM2-135M-Instruct transformers folder")
    bm.add_argument("--force", action="store_true", help="convert again even if a cached copy exists")
    cmp = sub.add_parser("compare-lm-eval", help="gate one lm-eval results file against another (metrics, throughput)",
                         description=gate_lm_eval.__doc__.split("\n\n")[0])
    gate_lm_eval.add_arguments(cmp)
    args = parser.parse_args(argv)

    if args.command == "tasks-path":
        print(tasks_path())
        return 0
    if args.command == "bundled-model":
        from .bundled import bundled_model_path
        from .errors import LPPluginError

        try:
            path = bundled_model_path(force=args.force, log=lambda msg: print(msg, file=sys.stderr))
        except LPPluginError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.command == "compare-lm-eval":
        return gate_lm_eval.run(args, err=lambda msg: print(msg, file=sys.stderr))
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
