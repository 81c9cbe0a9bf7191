"""Card emulation: run a model as a user with an N GiB GPU would, on a larger CUDA GPU.

A ballast process holds all of the GPU but ``--card``; the workload then loads in a fresh process with
``lp_plugin.from_pretrained(folder, offload="auto")`` (no other hint), generates, and is timed, while this
parent samples the device's used memory (NVML, else a monitor process) every ~2 ms. The plain model runs
first on the whole GPU as the reference for outputs and speed; ``--lm-eval`` adds the stock lm-eval CLI
(``hf`` on the whole GPU, ``hf-residual-offload`` in the card, the same task and documents: metrics compared, and
the offloaded run's evaluation throughput against the plain one's); ``--only-lm-eval`` runs that step alone. Every
step runs in its own subprocess (``--step``); the parent never initialises CUDA, and kills the ballast on exit and
on signals.

    python benchmarks/card.py --card 6GiB --model qwen2.5-3b-shape --dtype bf16 --context 8192 --out DIR
    python benchmarks/card.py --card 6GiB --only-lm-eval --lm-eval-task lp_pydoc_long --lm-eval-limit 1 --out DIR

Writes DIR/card-<model>-<dtype>-<card>-<context>.json (with ``--only-lm-eval``:
card-<model>-<dtype>-<card>-lmeval-<task>-<max_length or auto>[-limit<N>].json; everything, lm-eval's results JSONs
included, with a one-line verdict) and, with ``--lm-eval``, copies of lm-eval's results JSONs flat in DIR
(``--no-lm-eval-files``: none). ``--max-memory SIZE`` passes a budget to the load instead of the device's free
memory. Exit status: 0 every check passed, 1 a check failed or a step failed, 2 bad arguments or no CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB, GiB = 2**20, 2**30
BALLAST_CHUNK = 256 * MiB
BALLAST_TOLERANCE = 2 * MiB  # free memory left to the card, within this much of it
SAMPLE_S = 0.002
SPEED_GOAL = 0.9  # decode >= this fraction of the transfer bound (or of the plain model where nothing streams)
PREDICTION_GOAL = 0.05  # predicted peak within this fraction of the measured device-level peak
METRIC_RTOL = 1e-6  # lm-eval metrics, relative error against the plain model's
LM_EVAL_TASK = "lp_pydoc_ppl"  # the lm-eval step's task unless --lm-eval-task names others
DTYPES = ("bf16", "fp16", "nf4")
STEPS = ("probe", "checkpoint", "reference", "ballast", "monitor", "workload", "lmeval")
DECODE_PROMPT = 64  # tokens of context of the bare decode loop
CKPT_MARKER = "lp-card-complete.json"  # written last: a folder without it is a save that did not finish
HERE = Path(__file__).resolve()
DEVICE = "cuda"  # where the steps run (the steps' helpers also run on "cpu", for checking them without a GPU)


class ArgError(ValueError):
    """A bad command line (exit status 2)."""


# ---------------------------------------------------------------------------------------- pure functions
def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (:class:`ArgError` naming the fix). No torch, no GPU."""
    ap = argparse.ArgumentParser(
        prog="card.py", description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/card.py --card 6GiB --model qwen2.5-3b-shape --dtype bf16 --context 8192 "
               "--out results/  (add --lm-eval for the lm-eval step; --model llama-3-8b-shape or a folder)")
    ap.add_argument("--card", help="the emulated card: memory left free on the GPU, e.g. 6GiB, 4GiB, 5.5GiB")
    ap.add_argument("--recheck", nargs="+", metavar="CARD_JSON",
                    help="do not run: derive the speed ratios and the verdict of these card reports again from the "
                         "rounds they recorded (after a change of the rules), rewriting each file")
    ap.add_argument("--model", default="qwen2.5-3b-shape",
                    help="a shape (qwen2.5-3b-shape, llama-3-8b-shape: seeded random weights, saved once) or a "
                         "checkpoint folder (default: %(default)s)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES,
                    help="bf16, fp16, or nf4 (bitsandbytes 4-bit, bf16 compute)")
    ap.add_argument("--context", type=int, default=8192,
                    help="tokens of the generate work: a prompt of CONTEXT - NEW_TOKENS, then NEW_TOKENS greedy "
                         "tokens; also the full-context prefill timed (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=32,
                    help="greedy tokens generated and timed (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="paired timing rounds after a warm-up (default: %(default)s)")
    ap.add_argument("--out", help="folder for the card JSON (and lm-eval's results JSONs, flat)")
    ap.add_argument("--work-dir", help="intermediate files: step specs, results, logs, references (default: "
                                       "$TMPDIR/lp-card-work)")
    ap.add_argument("--ckpt-dir", help="where a shape is saved (default: /dev/shm when it has room, else $TMPDIR)")
    ap.add_argument("--tokenizer", help="tokenizer folder saved with a shape for --lm-eval (default: the bundled "
                                        "SmolLM2 tokenizer, `python -m lp_plugin bundled-model`'s; ids < the vocab)")
    ap.add_argument("--max-memory", help="pass max_memory={0: SIZE} to the load (default: none, the card is what the "
                                         "device has free)")
    ap.add_argument("--max-context", type=int, help="pass max_context=N to the load (default: none, the model's own)")
    ap.add_argument("--decode", default="eager", choices=("eager", "graph"),
                    help="pass decode=graph to the load: decode steps replayed as CUDA graphs (default: %(default)s, "
                         "no option passed); the report's name ends in -graph")
    ap.add_argument("--lm-eval", action="store_true",
                    help=f"add the lm-eval step (task {LM_EVAL_TASK} unless --lm-eval-task, batch 1)")
    ap.add_argument("--only-lm-eval", action="store_true",
                    help="run the lm-eval step alone: no reference, no generate workload (implies --lm-eval)")
    ap.add_argument("--lm-eval-task",
                    help=f"lm-eval task(s) of the lm-eval step, comma-separated: lp_plugin's (e.g. lp_pydoc_long, "
                         f"documents over 32768 tokens) or lm-eval's own (default: {LM_EVAL_TASK})")
    ap.add_argument("--lm-eval-throughput-goal", type=float, metavar="RATIO",
                    help="a check of the verdict: the offloaded lm-eval run's evaluation throughput >= RATIO x the "
                         "plain run's (default: the ratio is reported, not judged)")
    ap.add_argument("--lm-eval-max-length", type=int, help="lm-eval's max_length for both runs (default: the model's)")
    ap.add_argument("--lm-eval-limit", type=int, help="lm-eval --limit (default: every document)")
    ap.add_argument("--lm-eval-files", action=argparse.BooleanOptionalAction, default=True,
                    help="also copy lm-eval's results JSONs flat into --out (they are in the card JSON either way)")
    ap.add_argument("--skip-reference", action="store_true",
                    help="do not run the plain model; reuse its saved reference from --work-dir if there")
    ap.add_argument("--plain-once", action="store_true",
                    help="run the plain model in one process only (default: a second process feeds it the first's "
                         "tokens, the plain model's own spread the workload is judged against)")
    ap.add_argument("--plain-repeats", type=int, default=3,
                    help="times the plain model's tokens are fed to it again in its first process: the largest "
                         "difference between any two of these teacher-forced runs is its own spread in one process "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shape's weights and of the prompt")
    ap.add_argument("--step-timeout", type=int, default=1800, help="seconds each step may run (default: %(default)s)")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step is None:
        check_args(args)
    return args


def check_args(args) -> None:
    """Everything a run needs from its command line, before any heavy work (:class:`ArgError`)."""
    from lp_plugin.errors import OffloadSpecError
    from lp_plugin.planning.config import parse_size
    from lp_plugin.tools.shapes import is_shape, shape_names

    if args.recheck:
        return
    if not args.card:
        raise ArgError("--card SIZE is required, e.g. --card 6GiB")
    if not args.out:
        raise ArgError("--out DIR is required (the card JSON goes there)")
    try:
        args.card_bytes = parse_size(args.card, "--card")
        args.max_memory_bytes = None if args.max_memory is None else parse_size(args.max_memory, "--max-memory")
    except OffloadSpecError as exc:
        raise ArgError(str(exc)) from None
    if args.card_bytes < 64 * MiB:
        raise ArgError(f"--card {args.card} is below 64 MiB; give the card's size, e.g. --card 6GiB")
    if args.new_tokens < 2:
        raise ArgError("--new-tokens must be >= 2")
    if args.context < args.new_tokens + 1:
        raise ArgError(f"--context {args.context} leaves no prompt for {args.new_tokens} new tokens; "
                       f"give --context > --new-tokens")
    if args.rounds < 1:
        raise ArgError("--rounds must be >= 1")
    if args.max_context is not None and args.max_context < args.context:
        raise ArgError(f"--max-context {args.max_context} is below --context {args.context}: the plan would not hold "
                       "the work; drop it or raise it")
    for name in ("lm_eval_max_length", "lm_eval_limit", "step_timeout", "plain_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgError(f"--{name.replace('_', '-')} must be >= 1")
    if args.only_lm_eval:
        args.lm_eval = True
    if not args.lm_eval:
        for name in ("lm_eval_task", "lm_eval_throughput_goal"):
            if getattr(args, name) is not None:
                raise ArgError(f"--{name.replace('_', '-')} applies to the lm-eval step: add --lm-eval (or "
                               "--only-lm-eval)")
    if args.lm_eval_throughput_goal is not None and not args.lm_eval_throughput_goal > 0:
        raise ArgError("--lm-eval-throughput-goal must be > 0, e.g. 0.8")
    args.lm_eval_tasks = lm_eval_tasks(args.lm_eval_task)
    if not is_shape(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ArgError(f"--model {args.model!r} is neither a shape ({', '.join(shape_names())}) nor a folder with "
                       "a config.json")
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise ArgError(f"--tokenizer {args.tokenizer!r} is not a folder")
    if args.lm_eval and not is_shape(args.model) and not any(
            os.path.isfile(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ArgError(f"--lm-eval needs a tokenizer in the model folder {args.model!r} (tokenizer.json); save one "
                       "there, or drop --lm-eval")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ArgError(f"--out {args.out!r} is a file; give a folder")
    if args.lm_eval:  # last: a name that is not lp_plugin's indexes lm-eval's tasks
        unknown = unknown_lm_eval_tasks(args.lm_eval_tasks)
        if unknown:
            raise ArgError(f"--lm-eval-task: no lm-eval task {', '.join(map(repr, unknown))} (lp_plugin's: "
                           f"{', '.join(sorted(our_lm_eval_tasks()))}; or a task of `lm_eval ls tasks`)")


def lm_eval_tasks(value: str | None) -> list:
    """``--lm-eval-task``'s comma-separated names (:data:`LM_EVAL_TASK` when not given)."""
    names = [n.strip() for n in (value if value is not None else LM_EVAL_TASK).split(",")]
    if not all(names):
        raise ArgError(f"--lm-eval-task {value!r} has an empty name; give names separated by commas, e.g. "
                       "lp_pydoc_long or lp_pydoc_ppl,lp_pydoc_long")
    return names


def tasks_folder() -> Path:
    """lp_plugin's lm-eval task folder (lm-eval's ``--include_path``)."""
    from lp_plugin import __file__ as pkg

    return Path(pkg).resolve().parent / "integrations" / "tasks"


def our_lm_eval_tasks() -> set:
    """The task and group names of lp_plugin's task YAMLs (read as text: no lm-eval indexing)."""
    names: set = set()
    for path in tasks_folder().rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group):\s*([A-Za-z0-9_.-]+)\s*$", path.read_text(), re.M))
    return names


def unknown_lm_eval_tasks(names: list) -> list:
    """The names neither lp_plugin's (an ``lp_`` name is ours or nothing) nor lm-eval's own; lm-eval's ~10k task
    YAMLs are indexed (~20 s) only when a name is not lp_plugin's."""
    ours = our_lm_eval_tasks()
    unknown = [n for n in names if n not in ours and n.startswith("lp_")]
    rest = [n for n in names if n not in ours and not n.startswith("lp_")]
    if rest:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise ArgError(f"--lm-eval needs lm-eval installed (pip install lm-eval): {exc}") from None
        manager = TaskManager(include_path=str(tasks_folder()))
        unknown += [n for n in rest if not manager.match_tasks([n])]
    return unknown


def _report_file(model: str, dtype: str, card: str, tail: str, keep: str = "._-") -> str:
    """``card-<model>-<dtype>-<card>-<tail>.json`` (a folder's last part as the model), characters other than
    letters, digits and ``keep`` replaced by ``_``."""
    base = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(f"[^A-Za-z0-9{re.escape(keep)}]", "_", f"card-{base}-{dtype}-{card}-{tail}") + ".json"


def card_name(model: str, dtype: str, card: str, context: int) -> str:
    """``card-<model>-<dtype>-<card>-<context>.json`` (a folder's last part as the model)."""
    return _report_file(model, dtype, card, str(context))


def lm_eval_card_name(model: str, dtype: str, card: str, tasks: list, max_length: int | None,
                      limit: int | None = None) -> str:
    """``--only-lm-eval``'s report: ``card-<model>-<dtype>-<card>-lmeval-<tasks>-<max_length or auto>[-limit<N>].json``
    (tasks joined by ``+``)."""
    tail = f"lmeval-{'+'.join(tasks)}-{max_length or 'auto'}" + (f"-limit{limit}" if limit else "")
    return _report_file(model, dtype, card, tail, keep="._+-")


def report_name(report: dict) -> str:
    """The file name of a card report (:func:`card_name`, or :func:`lm_eval_card_name` for an lm-eval-only one)."""
    if report.get("only_lm_eval"):
        options = report.get("lm_eval_options") or {}
        return lm_eval_card_name(report["model"], report["dtype"], report["card"],
                                 options.get("tasks") or [LM_EVAL_TASK], options.get("max_length"),
                                 options.get("limit"))
    name = card_name(report["model"], report["dtype"], report["card"], report["context"])
    return name[: -len(".json")] + "-graph.json" if report.get("decode") == "graph" else name


def round_stats(values) -> dict | None:
    """Median, min and max of per-round figures (None for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def transfer_bound(gbps, bytes_per_forward) -> float | None:
    """Tokens/s a decode can reach when each token moves ``bytes_per_forward`` at ``gbps`` (1e9 B/s);
    None where nothing streams."""
    if not bytes_per_forward or not gbps:
        return None
    return gbps * 1e9 / bytes_per_forward


def speed_ratios(rounds: list, plain_decode) -> list:
    """Per round: decode / the most it could reach, the lower of the transfer bound of what the plan streams and the
    plain model's own decode on the whole GPU (its compute and launches: NF4 decode is launch-bound below the
    transfer bound); the plain model's decode alone where nothing streams."""
    out = []
    for r in rounds:
        bound = transfer_bound(r.get("h2d_gbps"), r.get("bytes_per_forward"))
        ceilings = [b for b in (bound, plain_decode) if b]
        base = min(ceilings) if bound is not None and ceilings else plain_decode
        out.append(r["decode_tok_s"] / base if base else None)
    return out


def ratio_basis(rounds: list, plain_decode) -> str:
    """Which ceiling :func:`speed_ratios` divided by (the one of most rounds)."""
    bounds = [transfer_bound(r.get("h2d_gbps"), r.get("bytes_per_forward")) for r in rounds]
    if not any(b is not None for b in bounds):
        return "vs plain decode, other process"
    plain_lower = sum(1 for b in bounds if b is not None and plain_decode and plain_decode < b)
    if plain_lower * 2 > len(bounds):  # the plain model ran in its own process: the ratio is not a paired one
        return "vs plain decode in another process (below the transfer bound; not paired)"
    return "vs transfer bound"


def device_peak(max_used: int, baseline: int) -> int:
    """The workload's device-level peak: the most the device had in use while it ran, less what was in use
    just before it started (ballast, monitor, other processes)."""
    return max(max_used - baseline, 0)


def host_memory(status_text: str | None = None) -> dict | None:
    """This process's host memory from ``/proc/self/status`` (Linux; None elsewhere), bytes: ``rss`` (resident
    now), ``peak_rss`` (the most resident so far), and of ``rss`` the ``anon`` part (private memory: pinned
    tier copies made by cudaHostAlloc count here or in ``shmem``, by the driver's choice) and ``shmem`` (shared
    memory, including files in /dev/shm that are mapped, such as a checkpoint read from there)."""
    if status_text is None:
        try:
            with open("/proc/self/status") as f:
                status_text = f.read()
        except OSError:
            return None
    fields = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "anon", "RssShmem": "shmem"}
    out = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in fields and value.strip().endswith("kB"):
            out[fields[key]] = int(value.split()[0]) * 1024
    return out or None


def relative_error(a, b) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b else float("inf")


def compare_metrics(plain: dict, offload: dict) -> dict:
    """lm-eval ``results`` of both runs, metric by metric: values and relative error; a metric only one run
    has counts as a mismatch (error inf)."""
    out = {}
    for task in sorted(set(plain) | set(offload)):
        a, b = plain.get(task, {}), offload.get(task, {})
        for key in sorted(set(a) | set(b)):
            if "stderr" in key or key in ("alias", "name", "sample_len"):
                continue
            va, vb = a.get(key), b.get(key)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb)):
                if va is None or vb is None:
                    out[f"{task}/{key}"] = {"plain": va, "offload": vb, "rel_error": float("inf")}
                continue
            out[f"{task}/{key}"] = {"plain": va, "offload": vb, "rel_error": relative_error(vb, va)}
    return out


def outputs_exact(w: dict, spread: dict | None, repeat: dict | None = None) -> bool:
    """The workload computes what the plain model computes: with the plain model's tokens fed to both, logits bit
    for bit equal in one forward and through the decode steps (greedy tokens alone can part at a near tie where
    the plain model parts from itself across processes). Where the plain model already differs from itself, the
    workload may differ by no more than that: in one forward, by its second process's difference; through the decode
    steps (generate's own scores and the teacher-forced steps), by the largest decode-step difference the plain model
    showed, in its second process or repeated in one process (``repeat``: the reference's ``repeat_tokens_equal`` and
    ``repeat_max_abs_logit_diff`` for its generate, ``repeat_forced`` for its teacher-forced logits)."""
    keys = ("forced_logits_equal", "forced_decode_logits_equal")
    if any(k not in w for k in keys):
        return w.get("outputs_equal") is True  # a reference without teacher-forced logits: greedy tokens only
    if all(w[k] is True for k in keys) and w.get("generate_logits_equal") is not False:
        return True
    plain_decode = []
    if spread and spread.get("forced_decode_max_abs_logit_diff") is not None:
        plain_decode.append(spread["forced_decode_max_abs_logit_diff"])
    if repeat and repeat.get("repeat_tokens_equal") and repeat.get("repeat_max_abs_logit_diff") is not None:
        plain_decode.append(repeat["repeat_max_abs_logit_diff"])
    repeat_forced = (repeat or {}).get("repeat_forced") or {}
    if repeat_forced.get("forced_decode_max_abs_logit_diff") is not None:
        plain_decode.append(repeat_forced["forced_decode_max_abs_logit_diff"])
    decode_spread = max(plain_decode, default=0.0)
    if not decode_spread:  # the plain model repeats itself exactly: any difference fails
        return False
    forced_spread = max((spread or {}).get("forced_max_abs_logit_diff") or 0.0,
                        repeat_forced.get("forced_max_abs_logit_diff") or 0.0)
    if w.get("forced_max_abs_logit_diff", 0.0) > forced_spread:
        return False
    return all(
        (w.get(k) or 0.0) <= decode_spread for k in ("forced_decode_max_abs_logit_diff", "generate_max_abs_logit_diff")
    )


def verdict(report: dict) -> tuple:
    """``(passed, {check: ok}, one line)`` from a card report: no OOM, equal outputs, device-level peak within the card,
    decode >= 0.9 of the bound, prediction within 5%; with lm-eval, equal metrics and the lm-eval peak within the card
    (and, with a throughput goal in ``goals``, the offloaded run's evaluation throughput >= goal x the plain run's).
    An lm-eval-only report (``only_lm_eval``) has the lm-eval checks alone. The line states the lm-eval throughput
    ratio whenever there is one."""
    only = bool(report.get("only_lm_eval"))
    checks = {}
    if not only:
        w = report.get("workload") or {}
        checks["no_oom"] = bool(w.get("ok"))
        reference = report.get("reference") or {}
        checks["outputs_equal"] = outputs_exact(w, reference.get("plain_spread"), reference)
        peak = (report.get("peak") or {}).get("device_bytes")
        checks["peak_within_card"] = peak is not None and peak <= report["card_bytes"]
        ratio = (report.get("speed") or {}).get("ratio")
        checks["speed"] = ratio is not None and ratio["median"] >= SPEED_GOAL
        err = (report.get("peak") or {}).get("prediction_error")
        checks["prediction"] = err is not None and abs(err) <= PREDICTION_GOAL
    lm = report.get("lm_eval")
    if only and lm is None:
        lm = {}
    throughput = None
    if lm is not None:
        metrics = lm.get("metrics") or {}
        checks["lm_eval_equal"] = bool(metrics) and all(m["rel_error"] <= METRIC_RTOL for m in metrics.values())
        lm_peak = (lm.get("offload") or {}).get("device_peak_bytes")
        checks["lm_eval_peak_within_card"] = lm_peak is not None and lm_peak <= report["card_bytes"]
        throughput = lm.get("throughput_vs_plain")
        goal = (report.get("goals") or {}).get("lm_eval_throughput")
        if goal is not None:
            checks["lm_eval_throughput"] = throughput is not None and throughput >= goal
    failed = [k for k, ok in checks.items() if not ok]
    if only:
        off = (lm or {}).get("offload") or {}
        options = report.get("lm_eval_options") or {}
        length = off.get("max_length") or options.get("max_length") or "auto"
        head = (f"{report['model']} {report['dtype']} in a {report['card']} card, lm-eval "
                f"{','.join(options.get('tasks') or [LM_EVAL_TASK])} at max_length {length}")
    else:
        head = f"{report['model']} {report['dtype']} in a {report['card']} card at {report['context']} tokens"
    rate = "" if throughput is None else f", lm-eval throughput {throughput:.2f}x plain"
    if not failed:
        if only:
            return True, checks, f"PASS {head}: lm-eval equal, lm-eval peak within the card{rate}"
        return True, checks, (f"PASS {head}: no OOM, equal outputs, peak within the card, speed >= {SPEED_GOAL} of "
                              f"the bound, prediction within {PREDICTION_GOAL:.0%}" + (", lm-eval equal" if lm else "")
                              + rate)
    return False, checks, f"FAIL {head}: " + ", ".join(_why(k, report) for k in failed) + (
        rate if "lm_eval_throughput" not in failed else "")


def _why(check: str, report: dict) -> str:
    w, peak, speed = report.get("workload") or {}, report.get("peak") or {}, report.get("speed") or {}
    if check == "no_oom":
        return "workload failed (" + str(w.get("error") or "no result")[:160] + ")"
    if check == "outputs_equal":
        if w.get("outputs_equal") is None:
            return "outputs not checked"
        if "forced_decode_logits_equal" not in w:
            return "greedy tokens differ from the plain model's (no teacher-forced logits recorded)"
        where = [n for k, n in (("forced_logits_equal", "one forward"), ("forced_decode_logits_equal", "decode steps"))
                 if w.get(k) is not True]
        return f"logits differ from the plain model's with its tokens fed to both ({', '.join(where)})"
    if check == "peak_within_card":
        b = peak.get("device_bytes")
        return "no device peak" if b is None else f"peak {b / GiB:.2f} GiB over the card"
    if check == "speed":
        r = speed.get("ratio")
        return "no speed ratio" if r is None else f"decode {r['median']:.2f} of its bound"
    if check == "prediction":
        e = peak.get("prediction_error")
        return "no prediction" if e is None else f"prediction off by {e:+.1%}"
    lm = report.get("lm_eval") or {}
    if check == "lm_eval_equal":
        failed = [label for label in ("plain", "offload") if not (lm.get(label) or {}).get("ok")]
        if failed:
            errors = "; ".join(f"{label}: {str((lm.get(label) or {}).get('error') or 'no result')[:160]}"
                               for label in failed)
            return f"lm-eval run failed ({errors})"
        return "lm-eval metrics differ (or missing)"
    if check == "lm_eval_throughput":
        ratio, goal = lm.get("throughput_vs_plain"), (report.get("goals") or {}).get("lm_eval_throughput")
        if ratio is None:
            return f"no lm-eval throughput ratio ({lm.get('throughput_note') or 'a run has no request time'})"
        return f"lm-eval throughput {ratio:.2f}x plain, below {goal}"
    return "lm-eval peak over the card (or not measured)"


def _spread_text(spread: dict | None) -> str:
    if not spread:
        return "- (one plain process)"
    if "error" in spread:
        return f"second plain process failed: {str(spread['error'])[:80]}"
    return (f"second process: tokens equal {spread.get('tokens_equal')}; its logits with the first's tokens equal "
            f"{spread.get('forced_logits_equal')} (one forward), {spread.get('forced_decode_logits_equal')} "
            f"(decode steps)")


def table(report: dict) -> str:
    """A short text table of one card report."""
    gi = lambda b: "-" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    fl = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    card_row = ("card", f"{report['card']} ({gi(report['card_bytes'])} GiB) on {report.get('env', {}).get('gpu')}")
    if report.get("only_lm_eval"):
        rows = [card_row, ("model", f"{report['model']} {report['dtype']} (lm-eval only)")]
    else:
        rows = [card_row] + _workload_rows(report, gi, fl)
    lm = report.get("lm_eval")
    if lm is not None:
        errs = [m["rel_error"] for m in (lm.get("metrics") or {}).values()]
        off, plain = lm.get("offload") or {}, lm.get("plain") or {}
        tasks = ",".join((report.get("lm_eval_options") or {}).get("tasks") or [LM_EVAL_TASK])
        rows.append(("lm-eval", f"{tasks}: max rel error {fl(max(errs) if errs else None, '{:.2e}')}, peak "
                                f"{gi(off.get('device_peak_bytes'))} GiB, max_length {off.get('max_length')} (plain "
                                f"{plain.get('max_length')}; {off.get('max_length_source')}, prefill chunk "
                                f"{off.get('prefill_chunk')}), {fl(off.get('tokens_per_second'), '{:.0f}')} tok/s"))
        rows.append(("lm-eval throughput", f"{fl(lm.get('throughput_vs_plain'), '{:.2f}')}x plain (requests "
                                           f"{fl(off.get('request_seconds'), '{:.2f}')} s, plain "
                                           f"{fl(plain.get('request_seconds'), '{:.2f}')} s)"
                                           + (f"; {lm['throughput_note']}" if lm.get("throughput_note") else "")))
    rows.append(("verdict", report.get("verdict", "-")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _workload_rows(report: dict, gi, fl) -> list:
    """The table's rows of the generate workload against the plain model."""
    w, p, s = report.get("workload") or {}, report.get("peak") or {}, report.get("speed") or {}
    plan = report.get("plan") or {}
    r = s.get("ratio")
    return [
        ("model", f"{report['model']} {report['dtype']}, context {report['context']}, {report['new_tokens']} new"),
        ("plan", f"mode {plan.get('mode')}, {len(plan.get('offloaded_layers') or [])} layers offloaded "
                 f"({plan.get('offloaded_compact')}), streams {gi(plan.get('bytes_per_forward'))} GiB/forward"),
        ("peak (device, NVML)", f"{gi(p.get('device_bytes'))} GiB via {p.get('source')}; predicted "
                                f"{gi(p.get('predicted_bytes'))} GiB "
                                f"({fl(_pct(p.get('prediction_error')), '{:+.1f}%')})"),
        ("peak (self view)", f"{gi(p.get('self_view_bytes'))} GiB = context {gi(p.get('context_bytes'))} + reserved "
                             f"{gi(p.get('max_reserved_bytes'))} + mapped {gi(p.get('peak_mapped_bytes'))}"),
        ("host memory", _host_text(w, plan, gi)),
        ("outputs equal", f"{w.get('outputs_equal')} (last-step max |dlogit| "
                          f"{fl(w.get('max_abs_logit_diff'), '{:.3g}')}; plain's tokens fed: logits equal "
                          f"{w.get('forced_logits_equal')} (one forward), {w.get('forced_decode_logits_equal')} "
                          f"(decode steps))"),
        ("plain vs itself", _spread_text((report.get("reference") or {}).get("plain_spread"))),
        ("decode tok/s", f"{fl((s.get('decode_tok_s') or {}).get('median'))} (plain "
                         f"{fl(s.get('plain_decode_tok_s'))}); bound {fl((s.get('bound_tok_s') or {}).get('median'))}"),
        ("prefill tok/s", f"{fl((s.get('prefill_tok_s') or {}).get('median'), '{:.0f}')} (plain "
                          f"{fl(s.get('plain_prefill_tok_s'), '{:.0f}')})"),
        ("ratio (" + str(s.get("ratio_basis")) + ")",
         "-" if r is None else f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] over {r['n']} rounds"),
    ]


def _host_text(w: dict, plan: dict, gi) -> str:
    """The workload's host memory against what the plan keeps in host memory (offloaded layers, embeddings)."""
    load, end = w.get("host_after_load") or {}, w.get("host_at_end") or {}
    kept = (plan.get("offloaded_bytes") or 0) + (plan.get("embeddings_host_bytes") or 0)
    return (f"resident {gi(load.get('rss'))} GiB after load (anon {gi(load.get('anon'))}, shared "
            f"{gi(load.get('shmem'))}), peak {gi(end.get('peak_rss'))} GiB; the plan keeps {gi(kept)} GiB there")


def _pct(x):
    return None if x is None else 100 * x


def compact(layers) -> str:
    """``[2, 3, 4, 7]`` as ``"2-4,7"``."""
    layers, parts, i = sorted(layers or []), [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts) or "none"


# ---------------------------------------------------------------------------------------- child steps
def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the parent dies (even by SIGKILL), so no ballast outlives a run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _load_kwargs(dtype: str) -> dict:
    import torch

    if dtype == "nf4":
        from lp_plugin.integrations.quant import nf4_config

        return {"quantization_config": nf4_config(torch.bfloat16), "dtype": torch.bfloat16}
    return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]}


def step_probe(spec: dict) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    for name in ("lm_eval", "bitsandbytes", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an optional package's absence is information here
            env[name] = None
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, total_bytes=props.total_memory, uuid=str(getattr(props, "uuid", "")),
                   cuda=torch.version.cuda, free_bytes=torch.cuda.mem_get_info(0)[0])
    return env


def step_checkpoint(spec: dict) -> dict:
    """The shape saved once (bf16, seeded, built on the GPU) with a tokenizer; reused when complete."""
    import torch

    from lp_plugin.planning import footprint
    from lp_plugin.tools.shapes import save_shape_checkpoint, shape_config

    name, seed = spec["model"], spec["seed"]
    leaf = f"lp-card-{name}-seed{seed}"
    candidates = [os.path.join(d, leaf) for d in spec["dirs"]]
    folder = next((c for c in candidates if os.path.isfile(os.path.join(c, CKPT_MARKER))), None)
    reused = folder is not None
    if folder is None:
        need = footprint.from_config(shape_config(name), "bf16").total_bytes
        folder = next((c for c in candidates if _room(os.path.dirname(c)) > 1.2 * need), None)
        if folder is None:
            raise RuntimeError(f"no room for the {need / GiB:.1f} GiB checkpoint in {spec['dirs']}; "
                               "pass --ckpt-dir DIR")
        shutil.rmtree(folder, ignore_errors=True)
        model = save_shape_checkpoint(name, folder, "bf16", "cuda", seed)
        del model
        torch.cuda.empty_cache()
    tokenizer = None
    if spec.get("tokenizer"):
        if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(folder)
        tokenizer = spec["tokenizer"]
    if not reused:
        with open(os.path.join(folder, CKPT_MARKER), "w") as f:
            json.dump({"shape": name, "seed": seed, "dtype": "bf16"}, f)
    return {"folder": folder, "reused": reused, "tokenizer": tokenizer}


def shape_folder(model: str, seed: int, ckpt_dir: str) -> str:
    """The folder of a saved shape (:func:`step_checkpoint` in this process, no tokenizer): what the one-process
    benchmarks beside this one load."""
    return step_checkpoint({"model": model, "seed": seed, "dirs": [ckpt_dir], "tokenizer": None})["folder"]


def _room(folder: str) -> int:
    try:
        os.makedirs(folder, exist_ok=True)
        return shutil.disk_usage(folder).free if os.access(folder, os.W_OK) else 0
    except OSError:
        return 0


def _prompt(vocab: int, length: int, seed: int):
    import torch

    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, new_tokens: int, steps: list | None = None, static_cache: bool = False):
    """Greedy ``new_tokens`` tokens and the last step's scores (copied to the host at every step, so no logits
    stay on the device). With ``steps`` (a list), every step's scores are appended to it (float32, host).
    ``static_cache``: generate with a static cache, not compiled: the cache ``decode="graph"`` generates with, so a
    plain model's tokens and scores are what a graph's replayed steps must equal (attention over a static cache's
    whole length sums in another order than over a dynamic cache's, and greedy tokens can part at a near tie)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepScores(LogitsProcessor):
        last = None

        def __call__(self, input_ids, scores):
            StepScores.last = scores[0].detach().float().cpu()
            if steps is not None:
                steps.append(StepScores.last)
            return scores

    cache = {"cache_implementation": "static", "disable_compile": True} if static_cache else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([StepScores()]), **cache)
    return out[0, ids.shape[1]:].tolist(), StepScores.last


def _forced_logits(model, ids, tokens: list):
    """Logits at the positions that predicted ``tokens``, from one forward over the prompt and the tokens
    (teacher forcing): the same inputs for the plain model and the workload even where their greedy tokens part."""
    import torch

    seq = torch.cat([ids, torch.tensor([tokens[:-1]], device=ids.device, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        return model(input_ids=seq, logits_to_keep=len(tokens)).logits[0].float().cpu()


def _forced_outputs(model, ids, tokens: list) -> dict:
    """The plain model's ``tokens`` fed back: logits in one forward, and through the decode steps (the prompt
    prefilled into a KV cache, then one token at a time: ``lp_plugin.tools.bench.measure.forced_decode_logits``)."""
    from lp_plugin.tools.bench.measure import forced_decode_logits

    return {"forced_logits": _forced_logits(model, ids, tokens),
            "forced_decode_logits": forced_decode_logits(model, ids, tokens)}


def _compare_forced(saved: dict, got: dict) -> dict:
    """Bitwise comparison of two runs' teacher-forced logits (one forward; the decode steps)."""
    import torch

    out = {}
    for key, name in (("forced_logits", "forced"), ("forced_decode_logits", "forced_decode")):
        if key in saved and key in got:
            a, b = saved[key], got[key]
            out[f"{name}_logits_equal"] = bool(torch.equal(a, b))
            out[f"{name}_max_abs_logit_diff"] = _max_abs_diff(a, b)
            out[f"{name}_argmax_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return out


def _forced_spread(runs: list) -> dict:
    """:func:`_compare_forced` over every pair of ``runs`` (teacher-forced outputs of one model): equal only where
    every pair is, the largest difference and the lowest argmax agreement of any pair, and the number of runs."""
    pairs = [_compare_forced(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    out: dict = {"runs": len(runs)}
    for key in (pairs[0] if pairs else {}):
        values = [p[key] for p in pairs]
        out[key] = all(values) if key.endswith("_equal") else max(values) if "diff" in key else min(values)
    return out


def _decode_rate(model, vocab: int, steps: int, seed: int) -> float:
    """Tokens/s of lp-bench's bare greedy decode loop (``lp_plugin.tools.bench.measure.bare_decode``: a short
    prompt, untimed warm steps, then ``steps`` timed single-token forwards), inside a session."""
    import torch

    import lp_plugin
    from lp_plugin.tools.bench.measure import bare_decode

    ids = _prompt(vocab, DECODE_PROMPT, seed + 1).to(DEVICE)
    with lp_plugin.session(model):
        return bare_decode(model, ids, steps, torch.device(DEVICE))["tok_s"]


def _prefill_rate(model, vocab: int, context: int, seed: int) -> float:
    """Tokens/s of one full-context prefill into a fresh KV cache, last-token logits only (as generate's
    prefill; ``lp_plugin.tools.bench.measure.prefill_run``), inside a session."""
    import torch

    import lp_plugin
    from lp_plugin.tools.bench.measure import prefill_run

    ids = _prompt(vocab, context, seed + 2).to(DEVICE)
    with lp_plugin.session(model):
        return prefill_run(model, ids, torch.device(DEVICE))


def _sync() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


def _h2d_gbps() -> float | None:
    """Pinned host-to-device GB/s of a 64 MiB copy (None on the CPU)."""
    import torch

    from lp_plugin.core.devices import h2d_bandwidth

    measured = h2d_bandwidth(torch.device(DEVICE, 0) if DEVICE != "cpu" else torch.device("cpu"), 64 * MiB, pinned=True)
    return measured["gbps"] if measured else None


def moved_per_token(plan: dict) -> int:
    """Bytes a decode step moves host to device: the streamed layers, plus the lm_head's copy for each call where
    the embeddings stay in host memory."""
    return (plan.get("bytes_per_forward") or 0) + (plan.get("lm_head_bytes_per_call") or 0)


def _timing_rounds(model, spec: dict, bytes_per_forward: int) -> list:
    vocab = model.config.vocab_size
    rounds = []
    for r in range(spec["rounds"] + 1):  # round 0 warms up and is dropped
        row = {"decode_tok_s": _decode_rate(model, vocab, spec["new_tokens"], spec["seed"]),
               "prefill_tok_s": _prefill_rate(model, vocab, spec["context"], spec["seed"]),
               "h2d_gbps": _h2d_gbps(), "bytes_per_forward": bytes_per_forward}
        row["bound_tok_s"] = transfer_bound(row["h2d_gbps"], bytes_per_forward)
        if r:
            rounds.append(row)
    return rounds


def step_reference(spec: dict) -> dict:
    """The plain model on the whole GPU: tokens, last-step scores (saved for the workload) and its speed."""
    import torch

    from lp_plugin.tools.shapes import load_checkpoint

    model = load_checkpoint(spec["folder"], spec["dtype"], DEVICE)
    vocab = model.config.vocab_size
    ids = _prompt(vocab, spec["context"] - spec["new_tokens"], spec["seed"]).to(DEVICE)
    steps: list = []
    static = bool(spec.get("static_cache"))
    tokens, last = _generate(model, ids, spec["new_tokens"], steps, static)
    again, last_again = _generate(model, ids, spec["new_tokens"], None, static)  # its own spread, in one process
    first = spec.get("first_reference_file")  # a second plain process: teacher-forced with the first one's tokens
    saved = torch.load(first) if first and os.path.isfile(first) else None
    fed = saved["tokens"] if saved else tokens
    forced = _forced_outputs(model, ids, fed)
    torch.save({"tokens": tokens, "last_scores": last, "step_scores": torch.stack(steps), **forced, "spec": spec},
               spec["reference_file"])
    # the same tokens fed again in this process: the plain model's own teacher-forced spread, over every pair of runs
    again_forced = [_forced_outputs(model, ids, fed) for _ in range(spec.get("plain_repeats", 1))]
    result = {"tokens": tokens, "repeat_tokens_equal": again == tokens,
              "repeat_max_abs_logit_diff": _max_abs_diff(last, last_again),
              "repeat_forced": _forced_spread([forced, *again_forced])}
    if saved is not None:
        result["vs_first_process"] = {"tokens_equal": saved["tokens"] == tokens, **_compare_forced(saved, forced)}
        return result
    rounds = _timing_rounds(model, spec, 0)
    return {**result, "rounds": rounds, "decode_tok_s": round_stats([r["decode_tok_s"] for r in rounds]),
            "prefill_tok_s": round_stats([r["prefill_tok_s"] for r in rounds]),
            "max_reserved_bytes": torch.cuda.max_memory_reserved() if DEVICE != "cpu" else None}


def _max_abs_diff(a, b):
    from lp_plugin.tools.bench.measure import max_abs_diff

    return max_abs_diff(a, b)


def step_workload(spec: dict) -> dict:
    """In the card: load with offload="auto", generate, compare with the reference, then the timing rounds."""
    import torch

    import lp_plugin

    free0, total = torch.cuda.mem_get_info()  # this creates the CUDA context
    out = {"free_after_init": free0, "total_bytes": total}
    if spec.get("free_at_start") is not None:
        out["context_bytes"] = spec["free_at_start"] - free0
    options = {"offload": "auto", **_load_kwargs(spec["dtype"])}
    if spec.get("max_memory") is not None:
        options["max_memory"] = {0: spec["max_memory"]}
    if spec.get("max_context") is not None:
        options["max_context"] = spec["max_context"]
    if spec.get("decode", "eager") != "eager":
        options["decode"] = spec["decode"]
    t0 = time.perf_counter()
    model = lp_plugin.from_pretrained(spec["folder"], **options)
    out["load_s"] = time.perf_counter() - t0
    gc.collect()
    out["host_after_load"] = host_memory()
    handle = lp_plugin.get_handle(model)
    info = handle.info()
    out["plan"] = {k: info.get(k) for k in ("mode", "tier", "prefetch", "offloaded_layers", "offloaded_bytes",
                                            "layer_bytes", "bytes_per_forward", "ring_slots", "embeddings",
                                            "embeddings_host_bytes", "lm_head_bytes_per_call", "budget", "decode")}
    out["plan"]["offloaded_compact"] = compact(info.get("offloaded_layers"))
    out["num_layers"] = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    ids = _prompt(vocab, spec["context"] - spec["new_tokens"], spec["seed"]).to(DEVICE)
    steps: list = []
    tokens, last = _generate(model, ids, spec["new_tokens"], steps)
    out["tokens"] = tokens
    out["after_generate"] = {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
                             "max_reserved_bytes": torch.cuda.max_memory_reserved(),
                             "peak_mapped_bytes": handle.peak_mapped_bytes}
    ref = spec.get("reference_file")
    if ref and os.path.isfile(ref):
        saved = torch.load(ref)
        out["outputs_equal"] = saved["tokens"] == tokens
        out["first_mismatch"] = next((i for i, (a, b) in enumerate(zip(saved["tokens"], tokens)) if a != b), None)
        out["max_abs_logit_diff"] = _max_abs_diff(saved["last_scores"], last)
        if "step_scores" in saved and saved["tokens"] == tokens:  # generate's own scores, every step (same inputs)
            got = torch.stack(steps)
            out["generate_logits_equal"] = bool(torch.equal(saved["step_scores"], got))
            out["generate_max_abs_logit_diff"] = _max_abs_diff(saved["step_scores"], got)
        # the plain model's tokens fed to both: logits position by position, in one forward and through decode steps
        forced = _forced_outputs(model, ids, saved["tokens"])
        out.update(_compare_forced(saved, forced))
        # where a difference comes from: the same forced run again (per-call sessions) and inside one session
        out["diagnostics"] = {"forced_again": _compare_forced(forced, _forced_outputs(model, ids, saved["tokens"]))}
        with lp_plugin.session(model):
            in_session = _forced_outputs(model, ids, saved["tokens"])
        out["diagnostics"]["forced_in_session_vs_plain"] = _compare_forced(saved, in_session)
        out["diagnostics"]["rows_differing"] = [
            i for i in range(len(saved["tokens"]))
            if not torch.equal(saved["forced_decode_logits"][i], forced["forced_decode_logits"][i])]
    else:
        out["outputs_equal"] = None
    out["rounds"] = _timing_rounds(model, spec, moved_per_token(info))
    with lp_plugin.session(model):
        out["mapped_bytes_in_session"] = handle.mapped_bytes
    out.update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
               max_reserved_bytes=torch.cuda.max_memory_reserved(),
               peak_mapped_bytes=handle.peak_mapped_bytes, engine_stats=dict(handle.stats),
               lm_head_copies=handle.info().get("lm_head_copies"), decode=handle.info().get("decode"),
               host_at_end=host_memory())
    return out


def step_ballast(spec: dict) -> None:
    """Hold all of the GPU but ``card`` bytes (plain cudaMalloc: PYTORCH_NO_CUDA_MEMORY_CACHING=1) until killed."""
    import torch

    card = spec["card_bytes"]
    parent = os.getppid()
    held = []
    free, total = torch.cuda.mem_get_info()
    if free < card:
        print(f"ERROR the GPU has {free / GiB:.2f} GiB free, less than the card's {card / GiB:.2f} GiB", flush=True)
        sys.exit(3)
    while True:
        excess = torch.cuda.mem_get_info()[0] - card
        if excess <= BALLAST_TOLERANCE:
            break
        n = min(BALLAST_CHUNK, excess) // (2 * MiB) * (2 * MiB)
        try:
            held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            break
    free = torch.cuda.mem_get_info()[0]
    print(f"READY {sum(t.numel() for t in held)} {free} {total}", flush=True)
    while os.getppid() == parent:  # hold until killed (or orphaned)
        time.sleep(0.2)


def step_monitor(spec: dict) -> None:
    """Fallback sampler without NVML: polls ``mem_get_info`` every ~2 ms; stdin ``reset`` answers the device's used
    bytes now and restarts the maximum, ``peak`` answers the maximum since (and the sample count)."""
    import torch

    torch.cuda.init()
    state = {"max": 0, "n": 0}
    lock = threading.Lock()

    def poll():
        while True:
            free, total = torch.cuda.mem_get_info()
            with lock:
                state["max"] = max(state["max"], total - free)
                state["n"] += 1
                state["now"] = total - free
            time.sleep(SAMPLE_S)

    free, total = torch.cuda.mem_get_info()
    state["now"] = state["max"] = total - free
    threading.Thread(target=poll, daemon=True).start()
    print("READY", flush=True)
    for line in sys.stdin:
        with lock:
            if line.strip() == "reset":
                print(state.get("now", 0), flush=True)
                state["max"], state["n"] = state.get("now", 0), 0
            elif line.strip() == "peak":
                print(state["max"], state["n"], flush=True)


def step_lmeval(spec: dict) -> dict:
    """The stock lm-eval CLI in this process (with hf-residual-offload registered, as the .pth hook does)."""
    import lp_plugin.integrations._lm_eval_register as register

    register.install()
    from lm_eval.__main__ import cli_evaluate

    timing = _time_requests()
    sys.argv = ["lm_eval", *spec["argv"]]
    try:
        cli_evaluate()
    except SystemExit as exc:  # the CLI's own exit: a failure unless it says 0
        if exc.code not in (0, None):
            raise RuntimeError(f"lm_eval exited with status {exc.code}") from None
    return {"ok": True, "request_seconds": timing["seconds"], "request_calls": timing["calls"]}


def _time_requests() -> dict:
    """Wall time of HFLM's request methods (the outermost call, synchronized at its end): the evaluation without
    loading, the same measure for ``hf`` and ``hf-residual-offload`` (whose request methods call HFLM's)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    timing, depth = {"seconds": 0.0, "calls": 0}, [0]

    def timed(method):
        def wrapper(self, *a, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return method(self, *a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    timing["seconds"] += time.perf_counter() - t0
                    timing["calls"] += 1
        return wrapper

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(HFLM, name, timed(getattr(HFLM, name)))
    return timing


def run_child(args) -> int:
    _die_with_parent()
    with open(args.spec) as f:
        spec = json.load(f)
    fn = globals()[f"step_{args.step}"]
    if os.environ.get("LP_CARD_MEMORY_HISTORY") == "1":  # where each block was allocated, reported at an OOM
        import torch

        torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    try:
        result = fn(spec)
    except Exception as exc:  # noqa: BLE001 - the parent reads the failure from the result file
        import traceback

        traceback.print_exc()
        oom = type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError") and "out of memory" in str(exc)
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "oom": oom}
        if oom:
            try:
                result["allocator_at_oom"] = _allocator_state()
            except Exception as why:  # noqa: BLE001 - the failure itself must still reach the parent
                result["allocator_at_oom"] = f"not read: {type(why).__name__}: {why}"
        _write_json(args.result, result)
        return 1
    if args.result and result is not None:
        result.setdefault("ok", True)
        _write_json(args.result, result)
    return 0


def _allocator_state() -> dict | None:
    """What PyTorch's caching allocator held when a step ran out of memory, per pool (the general one, CUDA graphs'
    private ones): segments, bytes reserved and allocated, the largest free block, the ten largest allocated blocks,
    and with LP_CARD_MEMORY_HISTORY=1 the allocated bytes by the innermost frame of lp_plugin, transformers or
    bitsandbytes that allocated them."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    pools: dict = {}
    for seg in torch.cuda.memory_snapshot():
        pool = "general" if tuple(seg.get("segment_pool_id") or (0, 0)) == (0, 0) else "private"
        p = pools.setdefault(pool, {"segments": 0, "reserved": 0, "allocated": 0, "largest_free": 0, "blocks": [],
                                    "by_origin": {}})
        p["segments"] += 1
        p["reserved"] += seg["total_size"]
        p["allocated"] += seg["allocated_size"]
        for block in seg["blocks"]:
            if block["state"] == "inactive":
                p["largest_free"] = max(p["largest_free"], block["size"])
            elif block["state"] == "active_allocated":
                p["blocks"].append(block["size"])
                origin = next((f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']} {f['name']}"
                               for f in block.get("frames", ())
                               if re.search(r"lp_plugin|transformers|bitsandbytes", f["filename"])), "unknown")
                p["by_origin"][origin] = p["by_origin"].get(origin, 0) + block["size"]
    for p in pools.values():
        p["blocks"] = sorted(p["blocks"], reverse=True)[:10]
        p["by_origin"] = dict(sorted(p["by_origin"].items(), key=lambda kv: -kv[1])[:20])
    return pools


def _write_json(path, data) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- the parent
_CHILDREN: list = []


def _spawn(step: str, work: Path, label: str, spec: dict, env=None, script: Path = HERE, **popen):
    """``script --step STEP`` in a fresh process (this file's steps, or another benchmark's that takes the same
    ``--step/--spec/--result`` arguments)."""
    spec_path, result_path = work / f"{label}-spec.json", work / f"{label}-result.json"
    _write_json(spec_path, spec)
    if result_path.exists():
        result_path.unlink()
    cmd = [sys.executable, str(script), "--step", step, "--spec", str(spec_path), "--result", str(result_path)]
    base = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env={**os.environ, **base, **(env or {})}, **popen)
    _CHILDREN.append(proc)
    return proc, result_path


def run_step(step: str, work: Path, label: str, spec: dict, timeout: int, env=None, script: Path = HERE) -> dict:
    """One step in a fresh process, to completion; its result file (plus ``rc``, and the log's tail on failure)."""
    log_path = work / f"{label}.log"
    print(f"[card] {label} ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc, result_path = _spawn(step, work, label, spec, env, script, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = "timeout"
        _CHILDREN.remove(proc)  # (on a signal it stays listed, and main's finally stops it)
    result = json.loads(result_path.read_text()) if result_path.exists() else {"ok": False}
    result.update(rc=rc, seconds=round(time.perf_counter() - t0, 1), log=str(log_path))
    if rc != 0:
        result["ok"] = False
        tail = log_path.read_text(errors="replace")[-3000:]
        result.setdefault("error", f"exit status {rc}: " + tail[-600:])
        print(f"[card] {label} FAILED ({rc}); log tail:\n{tail}", flush=True)
    else:
        print(f"[card] {label} done in {result['seconds']} s", flush=True)
    return result


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sampler:
    """The device's used memory every ~2 ms: NVML in a thread of this process (no CUDA context here), else
    a monitor subprocess (its own context is then part of every baseline)."""

    def __init__(self, env: dict, work: Path):
        self.source, self._nvml, self._proc = None, None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = None
            uuid = env.get("uuid") or ""
            for key in (uuid, f"GPU-{uuid}"):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(key) if uuid else None
                except pynvml.NVMLError:
                    handle = None
                if handle is not None:
                    break
            if handle is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            if handle is not None:
                self._nvml, self._handle, self.source = pynvml, handle, "nvml"
        except Exception:  # noqa: BLE001 - no NVML binding or driver: the monitor process samples instead
            self._nvml = None
        if self._nvml is None:
            self._proc, _ = _spawn("monitor", work, "monitor", {}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
            line = self._proc.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"the memory monitor did not start ({line!r})")
            self.source = "monitor (torch.cuda.mem_get_info)"
        self._stop = threading.Event()
        self._max, self._n, self._thread = 0, 0, None

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._used())
            self._n += 1
            time.sleep(SAMPLE_S)

    def start(self) -> int:
        """Begin a window; returns the baseline (used now)."""
        if self._proc is not None:
            self._proc.stdin.write("reset\n")
            self._proc.stdin.flush()
            return int(self._proc.stdout.readline())
        self._stop.clear()
        baseline = self._used()
        self._max, self._n = baseline, 0
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return baseline

    def stop(self) -> tuple:
        """End the window: ``(max used, samples)``."""
        if self._proc is not None:
            self._proc.stdin.write("peak\n")
            self._proc.stdin.flush()
            peak, n = self._proc.stdout.readline().split()
            return int(peak), int(n)
        self._stop.set()
        self._thread.join()
        return self._max, self._n

    def used_now(self):
        return self._used() if self._nvml is not None else None

    def close(self):
        if self._proc is not None:
            _stop(self._proc)
            if self._proc in _CHILDREN:
                _CHILDREN.remove(self._proc)


def sampled_step(sampler: Sampler, *a, **k) -> dict:
    baseline = sampler.start()
    try:
        result = run_step(*a, **k)
    finally:
        max_used, n = sampler.stop()
    result.update(device_baseline_bytes=baseline, device_max_used_bytes=max_used, samples=n,
                  device_peak_bytes=device_peak(max_used, baseline))
    return result


def start_ballast(work: Path, card_bytes: int, timeout: int = 300):
    proc, _ = _spawn("ballast", work, "ballast", {"card_bytes": card_bytes},
                     env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    line = ""
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line or line.startswith(("READY", "ERROR")):
            break
    if not line.startswith("READY"):
        _stop(proc)
        raise RuntimeError(f"the ballast did not get ready: {line.strip() or 'it exited'}")
    _, held, free, total = line.split()
    print(f"[card] ballast holds {int(held) / GiB:.2f} GiB; {int(free) / GiB:.3f} GiB free of {int(total) / GiB:.1f}",
          flush=True)
    return proc, {"held_bytes": int(held), "free_bytes": int(free), "total_bytes": int(total)}


def _lm_eval_args(args, folder: str, offload: bool, out_path: Path) -> list:
    dtype = {"bf16": "bfloat16", "fp16": "float16", "nf4": "bfloat16"}[args.dtype]
    model_args = [f"pretrained={folder}", f"dtype={dtype}"]
    # stock hf cannot load 4-bit on transformers 5: the plain NF4 run is offload=none, full_logits
    if args.dtype == "nf4":
        model_args += ["load_in_4bit=True", "bnb_4bit_quant_type=nf4", "bnb_4bit_compute_dtype=bfloat16",
                       "bnb_4bit_use_double_quant=True"]
    if offload:
        model_args.append("offload=auto")
        if args.max_memory:  # (lm-eval's max_length, not --max-context, is what this run plans for)
            model_args.append(f"max_memory={args.max_memory}")
    elif args.dtype == "nf4":
        model_args += ["offload=none", "full_logits=True"]  # lm-eval's own scoring, nothing offloaded
    if args.lm_eval_max_length:
        model_args.append(f"max_length={args.lm_eval_max_length}")
    kind = "hf-residual-offload" if offload or args.dtype == "nf4" else "hf"
    argv = ["--model", kind, "--model_args", ",".join(model_args), "--tasks", ",".join(args.lm_eval_tasks),
            "--include_path", str(tasks_folder()), "--batch_size", "1", "--device", "cuda:0",
            "--output_path", str(out_path)]
    if args.lm_eval_limit:
        argv += ["--limit", str(args.lm_eval_limit)]
    return argv


def _lm_eval_result(path: Path) -> dict | None:
    found = sorted(path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def _lm_eval_summary(run: dict, results: dict | None) -> dict:
    out = {k: run.get(k) for k in ("ok", "rc", "seconds", "device_peak_bytes", "device_baseline_bytes", "error",
                                   "request_seconds")}
    if results:
        ro = (results.get("config") or {}).get("residual_offload") or {}
        out.update(max_length=results.get("max_length"), max_length_source=ro.get("max_length_source"),
                   prefill_chunk=ro.get("prefill_chunk"), n_samples=results.get("n-samples"),
                   total_evaluation_time_seconds=results.get("total_evaluation_time_seconds"),
                   tokens_per_second=ro.get("tokens_per_second"),
                   tokens_per_second_eval=ro.get("tokens_per_second_eval"), tokens_processed=ro.get("tokens_processed"),
                   self_peak_bytes=ro.get("peak_inference_vram_bytes"), mode=(ro.get("engine") or {}).get("mode"),
                   offloaded_layers=(ro.get("engine") or {}).get("offloaded_layers"))
    return out


def _tokenizer_for(args) -> str | None:
    from lp_plugin.tools.shapes import is_shape

    if not (args.lm_eval and is_shape(args.model)):
        return None
    if args.tokenizer:
        return os.path.abspath(args.tokenizer)
    from lp_plugin.tools.bundled import BundledModelError, bundled_tokenizer_path

    try:
        return bundled_tokenizer_path()
    except BundledModelError as exc:
        raise ArgError(f"--lm-eval on a shape needs a tokenizer: pass --tokenizer DIR ({exc})") from None


def orchestrate(args) -> int:
    from lp_plugin.tools.shapes import is_shape

    out = Path(args.out)
    tokenizer = _tokenizer_for(args)
    work = Path(args.work_dir or os.path.join(tempfile.gettempdir(), "lp-card-work"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = run_step("probe", work, "probe", {}, timeout=300)
    if not env.get("ok"):
        print(f"error: the probe step failed: {env.get('error')}", file=sys.stderr)
        return 2
    if not env.get("cuda_available"):
        print("error: no CUDA GPU here: card.py emulates a card on a CUDA machine (the CPU has no card to emulate)",
              file=sys.stderr)
        return 2
    if args.card_bytes >= env["free_bytes"]:
        print(f"error: --card {args.card} is not below the GPU's {env['free_bytes'] / GiB:.2f} GiB free; nothing to "
              "emulate", file=sys.stderr)
        return 2
    env["driver"] = _driver_version()
    timeout = args.step_timeout
    only = args.only_lm_eval
    report = {"model": args.model, "dtype": args.dtype, "card": args.card, "card_bytes": args.card_bytes,
              "context": args.context, "new_tokens": args.new_tokens, "rounds": args.rounds, "seed": args.seed,
              "max_memory": args.max_memory, "max_context": args.max_context, "decode": args.decode, "env": env,
              "goals": {"speed": SPEED_GOAL, "prediction": PREDICTION_GOAL, "metric_rtol": METRIC_RTOL,
                        "lm_eval_throughput": args.lm_eval_throughput_goal}}
    if args.lm_eval:
        report["lm_eval_options"] = {"tasks": args.lm_eval_tasks, "max_length": args.lm_eval_max_length,
                                     "limit": args.lm_eval_limit}
    if only:
        report["only_lm_eval"] = True
    tag = report_name(report)[5:-5]
    # a. the checkpoint
    if is_shape(args.model):
        dirs = [args.ckpt_dir] if args.ckpt_dir else ["/dev/shm", tempfile.gettempdir()]
        ck = run_step("checkpoint", work, "checkpoint", {"model": args.model, "seed": args.seed, "dirs": dirs,
                                                         "tokenizer": tokenizer}, timeout)
        if not ck.get("ok"):
            return _finish(report, out, "checkpoint failed: " + str(ck.get("error"))[:300])
        folder = ck["folder"]
    else:
        folder = os.path.abspath(args.model)
    report["checkpoint"] = folder
    base = {"folder": folder, "dtype": args.dtype, "context": args.context, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "seed": args.seed}
    # with --decode graph the plain model generates with the static cache the graph's steps use (eager, no compile)
    static = args.decode == "graph"
    ref_file = str(work / f"reference-{card_name(args.model, args.dtype, 'ref', args.context)[5:-5]}-"
                          f"{args.new_tokens}-seed{args.seed}{'-static' if static else ''}.pt")
    base_ref = {**base, "static_cache": static}
    # b. the plain model on the whole GPU (not for --only-lm-eval: its lm-eval run is the plain model's)
    ref, ref_summary = None, Path(ref_file).with_suffix(".json")
    if not only and not args.skip_reference:
        ref = run_step("reference", work, f"reference-{tag}",
                       {**base_ref, "reference_file": ref_file, "plain_repeats": args.plain_repeats}, timeout)
        report["reference"] = {k: ref.get(k) for k in ("ok", "error", "tokens", "repeat_tokens_equal",
                                                       "repeat_max_abs_logit_diff", "repeat_forced",
                                                       "decode_tok_s", "prefill_tok_s",
                                                       "max_reserved_bytes", "rounds", "seconds")}
        report["reference"]["generate_cache"] = "static" if static else "dynamic"
        if ref.get("ok"):
            if not args.plain_once:
                again = run_step("reference", work, f"reference-again-{tag}",
                                 {**base_ref, "reference_file": ref_file + ".again", "first_reference_file": ref_file},
                                 timeout)
                report["reference"]["plain_spread"] = again.get("vs_first_process") or {"error": again.get("error")}
            _write_json(ref_summary, report["reference"])
    elif not only and ref_summary.exists():  # an earlier run's plain model (its outputs: ref_file)
        ref = json.loads(ref_summary.read_text())
        report["reference"] = {**ref, "reused": str(ref_summary)}
    lm_plain = None
    if args.lm_eval:
        path = work / f"lmeval-plain-{tag}"
        shutil.rmtree(path, ignore_errors=True)
        sampler = Sampler(env, work)
        try:
            run = sampled_step(sampler, "lmeval", work, f"lmeval-plain-{tag}",
                               {"argv": _lm_eval_args(args, folder, False, path)}, timeout)
        finally:
            sampler.close()
        lm_plain = (run, _lm_eval_result(path))
    # c.-f. the card
    sampler = Sampler(env, work)  # before the ballast: a monitor's own context is not taken from the card
    ballast = None
    try:
        try:
            ballast, held = start_ballast(work, args.card_bytes)
        except RuntimeError as exc:
            return _finish(report, out, str(exc))
        report["ballast"] = held
        spec = {**base, "reference_file": ref_file, "free_at_start": held["free_bytes"],
                "max_memory": args.max_memory_bytes, "max_context": args.max_context, "decode": args.decode}
        w = None if only else sampled_step(sampler, "workload", work, f"workload-{tag}", spec, timeout)
        lm_off = None
        if args.lm_eval:
            path = work / f"lmeval-offload-{tag}"
            shutil.rmtree(path, ignore_errors=True)
            run = sampled_step(sampler, "lmeval", work, f"lmeval-offload-{tag}",
                               {"argv": _lm_eval_args(args, folder, True, path)}, timeout)
            lm_off = (run, _lm_eval_result(path))
    finally:
        if ballast is not None:
            _stop(ballast)
            _CHILDREN.remove(ballast)
        sampler.close()
    assemble(report, w, ref, sampler.source, (lm_plain, lm_off) if args.lm_eval else None, out, tag, args.lm_eval_files)
    return _finish(report, out)


def assemble(report: dict, w: dict | None, ref: dict | None, source: str, lm_runs, out: Path, tag: str,
             copy_lm_eval: bool = True) -> dict:
    """The card report's sections from the steps' results (``w``: the workload's, None where it did not run;
    ``lm_runs``: the plain and the offload lm-eval runs, each ``(step result, lm-eval results JSON or None)``, kept
    whole in the report and, with ``copy_lm_eval``, also copied flat into ``out``)."""
    if w is not None:
        report["workload"] = _workload_summary(w)
        report["plan"] = w.get("plan")
        report["peak"] = _peak_summary(w, source)
        report["speed"] = _speed_summary(w, ref)
    if lm_runs is not None:
        report["lm_eval"] = _lm_eval_section(*lm_runs, out if copy_lm_eval else None, tag)
    return report


def _driver_version():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _workload_summary(w: dict) -> dict:
    keys = ("ok", "error", "oom", "allocator_at_oom", "rc", "seconds", "load_s", "outputs_equal", "first_mismatch",
            "max_abs_logit_diff",
            "forced_logits_equal", "forced_max_abs_logit_diff", "forced_argmax_agreement",
            "forced_decode_logits_equal", "forced_decode_max_abs_logit_diff", "forced_decode_argmax_agreement",
            "generate_logits_equal", "generate_max_abs_logit_diff", "diagnostics",
            "tokens", "context_bytes", "free_after_init", "max_allocated_bytes", "max_reserved_bytes",
            "peak_mapped_bytes", "mapped_bytes_in_session", "after_generate", "engine_stats", "samples",
            "device_baseline_bytes", "device_max_used_bytes", "device_peak_bytes", "host_after_load", "host_at_end",
            "log")
    return {k: w.get(k) for k in keys if k in w}


def _peak_summary(w: dict, source: str) -> dict:
    device = w.get("device_peak_bytes") if w.get("samples") else None
    budget = ((w.get("plan") or {}).get("budget") or {})
    predicted = budget.get("peak_bytes")
    parts = [w.get(k) for k in ("context_bytes", "max_reserved_bytes", "peak_mapped_bytes")]
    return {"source": source, "device_bytes": device, "samples": w.get("samples"),
            "self_view_bytes": sum(parts) if all(p is not None for p in parts) else None,
            "context_bytes": parts[0], "max_reserved_bytes": parts[1], "peak_mapped_bytes": parts[2],
            "max_allocated_bytes": w.get("max_allocated_bytes"), "predicted_bytes": predicted,
            "predicted_standby_bytes": budget.get("standby_bytes"), "predicted_breakdown": budget.get("breakdown"),
            "prediction_error": (predicted - device) / device if predicted and device else None}


def _speed_summary(w: dict, ref: dict | None) -> dict:
    rounds = w.get("rounds") or []
    plain_decode = ((ref or {}).get("decode_tok_s") or {}).get("median")
    bpf = moved_per_token(w.get("plan") or {})
    ratios = speed_ratios(rounds, plain_decode)
    return {"rounds": rounds, "decode_tok_s": round_stats([r["decode_tok_s"] for r in rounds]),
            "prefill_tok_s": round_stats([r["prefill_tok_s"] for r in rounds]),
            "h2d_gbps": round_stats([r["h2d_gbps"] for r in rounds]),
            "bound_tok_s": round_stats([r["bound_tok_s"] for r in rounds]),
            "plain_decode_tok_s": plain_decode,
            "plain_prefill_tok_s": ((ref or {}).get("prefill_tok_s") or {}).get("median"),
            "ratio_basis": ratio_basis(rounds, plain_decode) if bpf else "vs plain decode, other process",
            "ratios": ratios, "ratio": round_stats(ratios)}


def _lm_eval_section(plain, offload, out: Path | None, tag: str) -> dict:
    section = {}
    results = {}
    for label, pair in (("plain", plain), ("offload", offload)):
        if pair is None:
            continue
        run, res = pair
        section[label] = _lm_eval_summary(run, res)
        if res is not None:
            if out is not None:
                dest = out / f"lmeval-{label}-{tag}.json"
                dest.write_text(json.dumps(res, indent=1, default=str))
                section[label]["results_file"] = dest.name
            section[label]["results_json"] = res
            results[label] = res.get("results") or {}
    both = len(results) == 2
    section["metrics"] = compare_metrics(results["plain"], results["offload"]) if both else {}
    p, o = section.get("plain", {}), section.get("offload", {})
    # evaluation throughput, offloaded over plain: the inverse ratio of the request times, where both runs did the
    # same work (the same documents of the same tasks at the same max_length)
    note = None
    if not (p.get("request_seconds") and o.get("request_seconds")):
        note = "a run has no request time"
    elif p.get("max_length") != o.get("max_length"):
        note = f"max_length differs (plain {p.get('max_length')}, offload {o.get('max_length')}): not the same work"
    elif p.get("n_samples") != o.get("n_samples"):
        note = "the runs scored different documents: not the same work"
    if note is None:
        section["throughput_vs_plain"] = p["request_seconds"] / o["request_seconds"]
    else:
        section["throughput_vs_plain"], section["throughput_note"] = None, note
    return section


def _finish(report: dict, out: Path, failure: str | None = None) -> int:
    if failure:
        report["verdict"] = f"FAIL {report['model']} {report['dtype']} {report['card']}: {failure}"
        report["passed"] = False
    else:
        report["passed"], report["checks"], report["verdict"] = verdict(report)
    path = out / report_name(report)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if not failure:
        print(table(report))
    print(report["verdict"])
    print(f"[card] wrote {path}", flush=True)
    return 0 if report["passed"] else 1


def recheck(path: Path) -> int:
    """A card report's speed summary and verdict derived again from its recorded rounds; 0 when it passes."""
    try:
        report = json.loads(path.read_text())
        speed = report.get("speed") or {}
        w = {"rounds": speed.get("rounds") or [], "plan": report.get("plan")}
        moved = moved_per_token(report.get("plan") or {})
        for r in w["rounds"]:  # reports that counted the streamed layers only
            if r.get("bytes_per_forward") and r["bytes_per_forward"] < moved:
                r["bytes_per_forward"] = moved
                r["bound_tok_s"] = transfer_bound(r.get("h2d_gbps"), moved)
    except (OSError, ValueError, AttributeError) as exc:
        print(f"error: {path}: not a card report ({exc})", file=sys.stderr)
        return 2
    if ("workload" not in report and not report.get("only_lm_eval")) or "card_bytes" not in report:
        print(f"error: {path}: not a card report (no workload or card_bytes)", file=sys.stderr)
        return 2
    if report.get("only_lm_eval"):
        report["passed"], report["checks"], report["verdict"] = verdict(report)
    elif report.get("workload", {}).get("ok"):
        report["speed"] = _speed_summary(w, report.get("reference"))
        report["passed"], report["checks"], report["verdict"] = verdict(report)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"{path.name}: {report.get('verdict')}")
    return 0 if report.get("passed") else 1


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.step is not None:
        return run_child(args)
    if args.recheck:
        return max(recheck(Path(p)) for p in args.recheck)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        return orchestrate(args)
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for proc in list(_CHILDREN):  # the ballast first of all: never leave the GPU held
            _stop(proc)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))  # the repository's lp_plugin when run from a checkout
    sys.exit(main())
