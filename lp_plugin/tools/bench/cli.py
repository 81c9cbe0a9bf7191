"""The ``lp-bench`` command (``python -m lp_plugin.tools.bench.cli`` where the package is not installed).

Exit status: 0 clean; 1 a regression against ``--compare`` (or, with ``--fail-on-miss``, a missed
goal): every line printed under REGRESSION names the config, the figure and by how much; 2 bad
arguments (also ``--device cuda`` on a machine without CUDA, or config options lp_plugin refuses for
the model, checked before any weights load), a results file that is not one, or runs the gate cannot
compare (lines under CANNOT COMPARE: a figure in the reference that is no measurement, a reference
without configs, another model or dtype, a run that stopped early); 3 a config failed to run (its error is in
the JSON and on stderr), or the results could not be written; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM):
both end through the clean-ups, and the rounds done stay in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback

from .. import Parser, check_writable
from .configs import ConfigError, parse_configs
from .gate import DEFAULT_TOLERANCE, TOLERANCE_HELP, compare, missed_goals, parse_tolerance, tolerance_text
from .report import FORM_ERRORS, format_table, load_results, verdict, write_json

MIB = 1024**2

DEFAULT_CONFIGS = (
    "baseline,session:even:cpu,session:even:cpu:load=pretrained,stream:even:cpu,stream:even:disk,accelerate_cpu:even"
)

EPILOG = f"""\
configs (comma separated; baseline is measured first and baseline:twin last in every round, added if missing):
  baseline                                   the plain model
  baseline:twin                              the plain model again: the run's own noise, which the gate reads
  accelerate_cpu[:SPEC][:new=N]              Accelerate dispatch_model with SPEC's layers on "cpu" (a peer;
                                             not applicable without CUDA: nothing leaves the CPU)
  accelerate_disk[:SPEC][:new=N][:cold]      the same with SPEC's layers on "disk" (Accelerate's offload folder)
  airllm[:new=N][:cold]                      AirLLM (pip install airllm): every module streamed from per-layer
                                             shards; compare it with stream:all:disk (slow: give it new=N;
                                             timed on prefill and the bare decode loop only)
  MODE:SPEC:TIER[:alpha=A][:prefetch=N][:new=N][:cold][:load=attach|pretrained][:protect_first=N][:protect_last=N]
                                             MODE session|stream, SPEC even|odd|all|2-32:2|2,4,6|<plugin>,
                                             TIER cpu|disk; load=attach: lp_plugin.attach on the loaded plain
                                             model; load=pretrained: lp_plugin.from_pretrained from the checkpoint
                                             (a shape is saved once to a temporary folder); new=N overrides --new;
                                             cold evicts the offload files from the page cache before each timed part
                                             and every decode step, judged against the storage's read speed;
                                             protect_first/protect_last: layers kept on the device at the ends
                                             (default 2 and 3; all:protect_first=0:protect_last=0 streams every layer)
models: a checkpoint folder or hub id, or a shape with seeded random weights: qwen2.5-3b-shape, llama-3-8b-shape,
  smollm2-135m-shape
protocol: one plain model; each config put on -> measured -> taken off, round-robin; round 0 is a discarded
  warm-up (it also checks logits, perplexity and tokens against the plain model), then --repeats timed rounds;
  figures are median [min-max], ratios to the plain model medians of per-round ratios.
gate (--compare REF.json): compares each config's ratios to the plain model (not absolute speeds, unless
  --absolute), its exactness and perplexity, and VRAM relative to the plain model, against REF; a speed fails
  only if it fell by more than the factor and by more than the noise both runs measured allows (t test on the
  plain model's own spread; with 7+ rounds also a Mann-Whitney U test, as asv does).
  tolerances (defaults): {tolerance_text(DEFAULT_TOLERANCE)}
{chr(10).join(f"    {k}: {v}" for k, v in TOLERANCE_HELP.items())}
exit status: 0 clean, 1 regression (or missed goal with --fail-on-miss), 2 bad arguments or CANNOT COMPARE,
  3 a config failed (or the results could not be written), 130/143 interrupted/terminated (rounds done kept in --out)
examples:
  lp-bench --model qwen2.5-3b-shape --dtype bf16 --out r.json --plot r.png
  lp-bench --model ./ckpt --dtype fp32 --configs session:even:cpu,stream:even:cpu --threads 1 \\
    --out new.json --compare old.json
  lp-bench --results new.json --compare old.json --tolerance speed=1.2,logit=1e-3
"""


def build_parser(prog: str = "lp-bench") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure offloaded configs against the plain model in one run (VRAM, speed, exactness) "
        "and gate on it.",
    )
    p.add_argument("--model", help="checkpoint folder, hub id, or shape name (see below)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma separated configs (default: {DEFAULT_CONFIGS})")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32", "nf4"],
        help="weights' format (default bf16; nf4: bitsandbytes 4-bit)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--prompt", type=int, default=100, help="prompt tokens for decode/generate/logits (default 100)")
    p.add_argument("--new", type=int, default=64, help="new tokens per decode/generate run (default 64)")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill forward (default 512)")
    p.add_argument("--ppl-tokens", type=int, default=512, help="tokens of the perplexity text (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds after the warm-up (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of a shape model's random weights")
    p.add_argument(
        "--tokenizer",
        default="auto",
        help="auto (the model's; for shapes the bundled model's), none (UTF-8 bytes as ids), a folder or a Hub id",
    )
    p.add_argument(
        "--offload-dir", default=None, help="folder for disk-tier files (default: a temporary folder, removed after)"
    )
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=1024,
        help="size of the H2D bandwidth copy, and of the storage read with cold configs, in MiB (default 1024)",
    )
    p.add_argument(
        "--static",
        default="auto",
        choices=["auto", "on", "off"],
        help='generate(cache_implementation="static") for every config: auto = on with CUDA (where '
        "transformers compiles it), off on the CPU (uncompiled there)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 steadies CPU timings"
    )
    p.add_argument("--out", help="write the results JSON here (also after every round, so a stopped run keeps them)")
    p.add_argument("--plot", help="write the frontier PNG (memory against decode tokens/s) here")
    p.add_argument("--compare", metavar="REF_JSON", help="gate against this reference run (exit 1 on a regression)")
    p.add_argument("--tolerance", default="", help=f"any subset of {tolerance_text(DEFAULT_TOLERANCE)}")
    p.add_argument("--absolute", action="store_true", help="with --compare, also gate on absolute tokens/s")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument(
        "--results", metavar="JSON", help="do not run: take these results (for --compare, --plot and the table)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--wide",
        action="store_true",
        help="print every figure with its [min-max] (wider than 120 columns); the JSON holds them all anyway",
    )
    return p


def _check_args(parser, args) -> dict:
    try:
        tol = parse_tolerance(args.tolerance)
    except ValueError as exc:
        parser.error(str(exc))
    if args.results is None and not args.model:
        parser.error("--model is required (or --results JSON to compare/plot an existing run)")
    if args.results is None:
        from lp_plugin.tools.shapes import model_name_problem

        why = model_name_problem(args.model)
        if why is not None:
            parser.error(f"--model {why}")
    for name in ("prompt", "new", "prefill", "ppl_tokens", "repeats", "bandwidth_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    _check_paths(parser, args)
    return tol


def _check_paths(parser, args) -> None:
    """Paths the run reads and writes, checked before anything runs: the results file is not the reference it
    is compared with, nor a folder; the offload folder is not a file; a tokenizer path is a folder (a name that
    is no path is taken as a Hub id)."""
    if args.out and args.results is not None:
        parser.error("--out writes a new run's results; with --results nothing runs: drop --out")
    for flag, path in (("--out", args.out), ("--plot", getattr(args, "plot", None))):
        if path:
            try:
                check_writable(flag, path)  # (made before the run: a bad path must not lose its results)
            except ValueError as exc:
                parser.error(str(exc))
    if args.out and args.compare and os.path.exists(args.out) and os.path.samefile(args.out, args.compare):
        parser.error(f"--out {args.out!r} is the --compare reference: the run would overwrite it; write elsewhere")
    folder = getattr(args, "offload_dir", None)
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"--offload-dir {folder!r} is a file; pass a folder (created if missing)")
    tok = getattr(args, "tokenizer", None)
    if tok not in (None, "auto", "none"):
        args.tokenizer = tok = os.path.expanduser(tok)
        if os.path.exists(tok) and not os.path.isdir(tok):
            parser.error(f"--tokenizer {tok!r} is a file; pass the tokenizer's folder, a Hub id, auto or none")
        if not os.path.exists(tok) and (tok.startswith(("/", ".")) or tok.count("/") > 1):
            parser.error(f"--tokenizer {tok!r}: no such folder; pass a tokenizer folder, a Hub id, auto or none")


def _load(parser, flag, path):
    try:
        return load_results(path)
    except (OSError, ValueError) as exc:  # ResultsError is a ValueError
        parser.error(f"{flag}: {exc}")


def _engine_problem(configs, model: str, longest: int = 0) -> str | None:
    """What lp_plugin would refuse in the configs' engine options (offload spec, mode, tier, alpha,
    prefetch, protect_*, skip, stand_in, calib), and a sequence (``longest`` tokens: prompt, warm-up
    steps and the most new tokens) beyond the model's positions, checked against the model's config
    before any weights load; None when nothing. A model whose config cannot be read here is reported
    when loaded."""
    from lp_plugin.errors import LPPluginError
    from lp_plugin.planning.plan import OffloadPlan
    from lp_plugin.planning.skipping.resolve import check_skips
    from lp_plugin.tools.shapes import is_shape, shape_config

    try:
        if is_shape(model):
            hf_config = shape_config(model)
        else:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - loading the model names the problem
        hf_config = None
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and longest > positions:
        return (
            f"--prompt and --new (or a config's new=N) ask for sequences of {longest} tokens with the warm-up "
            f"steps; the model has {positions} positions: lower --new or --prompt"
        )
    for cfg in configs:
        if cfg.kind not in ("lp", "accelerate_cpu", "accelerate_disk") or cfg.options is None:
            continue
        config = cfg.options  # an OffloadConfig already checked on its own when the config was parsed
        try:
            if hf_config is not None and cfg.spec != "auto":  # "auto" is planned against the device when applied
                check_skips(config, OffloadPlan.for_config(hf_config, config).num_layers)
        except LPPluginError as exc:
            return f"config {cfg.name!r}: {exc}"
    return None


def _check_cold(parser, configs, offload_dir, bandwidth_bytes: int) -> None:
    """Cold-cache configs read their files back from the storage after evicting them: a folder in memory
    (tmpfs) keeps no other copy, so its figures would be warm ones. Refused before anything runs."""
    from ...core.tiers.folder import nearest_existing
    from .storage import IN_MEMORY, fs_type, scratch_bytes

    cold = [c.name for c in configs if c.cold]
    if not cold:
        return
    folder = offload_dir or tempfile.gettempdir()
    kind = fs_type(folder)
    where = f"--offload-dir {offload_dir!r}" if offload_dir else f"the default offload folder (under {folder!r})"
    if kind in IN_MEMORY:
        parser.error(
            f"cold configs ({', '.join(cold)}) read their files back from a disk, but {where} is on {kind}, "
            "whose pages are the only copy: pass --offload-dir on a disk (e.g. /var/tmp/lp-bench)"
        )
    existing = nearest_existing(folder)
    if not os.path.exists(existing):
        parser.error(f"{where}: {existing!r} is a link to nothing; pass a folder on a disk")
    need, free = scratch_bytes(bandwidth_bytes), shutil.disk_usage(existing).free
    if need > free:
        parser.error(
            f"cold configs: measuring the storage's read speed writes a {need // MIB} MiB scratch file under {where}, "
            f"which has {free // MIB} MiB free: lower --bandwidth-mib or free space there"
        )


def _run(parser, args) -> dict | None:
    from .runner import run_bench
    from .setup import BenchSettings, SetupError

    try:
        configs = parse_configs(args.configs)
    except ConfigError as exc:
        parser.error(str(exc))
    from .measure import DECODE_WARM_STEPS

    _check_cold(parser, configs, args.offload_dir, args.bandwidth_mib * MIB)
    most_new = max([args.new, *(c.new for c in configs if c.new)])
    why = _engine_problem(configs, args.model, args.prompt + DECODE_WARM_STEPS + most_new)
    if why is not None:
        parser.error(why)
    settings = BenchSettings(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        prompt=args.prompt,
        new=args.new,
        prefill=args.prefill,
        ppl_tokens=args.ppl_tokens,
        repeats=args.repeats,
        seed=args.seed,
        tokenizer=args.tokenizer,
        offload_dir=args.offload_dir,
        bandwidth_bytes=args.bandwidth_mib * MIB,
        static=args.static,
        threads=args.threads,
        progress=not args.no_progress,
    )
    on_round = _partial_writer(args) if args.out else None
    try:
        out = run_bench(settings, configs, on_round=on_round)
    except SetupError as exc:
        parser.error(str(exc))
    except Exception:  # noqa: BLE001 - the run itself broke: exit 3 (failed), never 1 (a regression)
        traceback.print_exc()
        print("lp-bench: the run failed before any config could be measured", file=sys.stderr)
        return None
    return out


def _partial_writer(args):
    """Writes the results so far after every round (a run stopped early keeps what it measured) to ``args.out``,
    noting the rounds written in ``args.rounds_written``; a write that fails is said once and the run goes on (the
    final write is tried again at the end)."""
    failed: list[OSError] = []
    path = args.out

    def write(partial: dict) -> None:
        try:
            write_json(partial, path)
            args.rounds_written = partial.get("rounds_done")
        except OSError as exc:
            if not failed:
                print(f"lp-bench: cannot write the results so far to {path} ({exc}); the run goes on", file=sys.stderr)
            failed.append(exc)

    return write


def _gate(args, out, old, tol) -> tuple:
    """Print the gate's findings; ``(exit status, what the verdict line says of the gate)``: 1 when something
    regressed, 2 when something could not be compared, else 0."""
    lines, incomparable = [], []
    if old is not None:
        try:
            verdict = compare(out, old, tol, absolute=args.absolute)
        except FORM_ERRORS as exc:
            verdict = None
            incomparable.append(f"a figure has the wrong form ({type(exc).__name__}: {str(exc)[:200]})")
        if verdict is not None:
            for note in verdict.notes:
                print(note)
            lines += verdict.regressions
            incomparable += verdict.incomparable
    if args.fail_on_miss:
        lines += missed_goals(out)
    summary = None
    if lines:
        against = f" against {args.compare}" if old is not None else ""
        print(f"REGRESSION{against} (tolerance {tolerance_text(tol)}):")
        for line in lines:
            print(f"  {line}")
        summary = f"gate: REGRESSION ({len(lines)} above)"
    if incomparable:
        print(f"CANNOT COMPARE against {args.compare}:")
        for line in incomparable:
            print(f"  {line}")
        summary = summary or f"gate: CANNOT COMPARE ({len(incomparable)} above)"
    if not lines and not incomparable and (old is not None or args.fail_on_miss):
        what = f"no regression against {args.compare}" if old is not None else "every goal met"
        print(f"gate: {what} (tolerance {tolerance_text(tol)})")
        summary = "gate: no regression" if old is not None else "gate: every goal met"
    return (1 if lines else 2 if incomparable else 0), summary


@contextlib.contextmanager
def _terminate_cleanly():
    """SIGTERM (what ``timeout`` and job schedulers send) ends the run as Ctrl-C does, through its clean-ups: the
    temporary offload folder and checkpoint are removed, and the results of the rounds done stay written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-ups short
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _kept(args) -> str:
    """What of the run a stop leaves in ``--out``, and how to read it."""
    if not args.out or args.results:
        return ""
    written = getattr(args, "rounds_written", None)
    if written is None:
        return f" before it was set up: nothing of this run is in {args.out}"
    if not written:
        return f" before its first round ended: {args.out} holds no figures"
    return f" after {written} round(s): `lp-bench --results {args.out}` prints their table"


def main(argv=None, prog: str = "lp-bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    tol = _check_args(parser, args)
    old = _load(parser, "--compare", args.compare) if args.compare else None
    try:
        with _terminate_cleanly():
            out = _load(parser, "--results", args.results) if args.results else _run(parser, args)
    except KeyboardInterrupt:
        print(f"lp-bench: interrupted{_kept(args)}", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print(f"lp-bench: terminated{_kept(args)}", file=sys.stderr)
        raise
    if out is None:
        return 3
    print(format_table(out, wide=args.wide))
    unwritten = None
    if args.out and not args.results:
        try:
            write_json(out, args.out)
            print(f"results: {args.out}")
        except OSError as exc:
            unwritten = exc
            print(f"lp-bench: cannot write the results to {args.out} ({exc}): the table above is all", file=sys.stderr)
    if args.plot:
        from .plot import plot

        plot(out, args.plot)  # (its folder made by check_writable before the run)
        print(f"plot: {args.plot}")
    failed = [c for c in out["configs"] if c.get("error")]
    for c in failed:
        print(f"config {c['name']} failed: {c['error']}", file=sys.stderr)
        if c.get("traceback"):
            print(c["traceback"], file=sys.stderr)
    status, gate_text = _gate(args, out, old, tol)
    print(verdict(out, gate_text))
    return 3 if failed or unwritten else status


if __name__ == "__main__":
    sys.exit(main())
