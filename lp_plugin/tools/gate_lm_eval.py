"""``python -m lp_plugin compare-lm-eval BASE CANDIDATE``: gate one lm-eval results file against another.

For teams whose CI already runs lm-eval: evaluate the plain model (``--model hf``) and the offloaded
one (``--model hf-residual-offload``), or one commit against the next, then compare the two results
files. Every metric of every task in BASE must be in CANDIDATE and equal to it (the default), or within a
relative tolerance (``--tolerance 1e-6``, per metric ``--tolerance 1e-6,acc=0.01``); each line
says which metric moved and by how much. When a file comes from ``hf-residual-offload``, its
``config.residual_offload.tokens_per_second`` is shown, and the throughput ratio when both have
it (``--min-throughput-ratio R`` makes a ratio below R fail).

Exit status: 0 equal within tolerance, 1 a metric moved past it (or a task or metric is missing, or
is not a finite number in CANDIDATE, or the throughput ratio is below ``--min-throughput-ratio``),
2 bad arguments or files that cannot be compared (unreadable, not lm-eval results, wrong-typed
sections, no sample counts, a task run differently: other sample counts, few-shot count or task version;
a metric of BASE that is not a finite number; a ``--tolerance`` for a metric BASE does not have);
each finding is one line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

_NOT_METRICS = ("alias", "name", "sample_len", " ")
_MISSING = object()


class NotComparable(ValueError):
    """Files the gate cannot compare (exit status 2)."""


def load_results(path) -> dict:
    """An lm-eval results dict from a ``results_*.json`` file, or the newest one under a folder (the
    ``--output_path`` of an lm_eval run); :class:`NotComparable` for anything of another shape."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("results_*.json"), key=lambda f: f.stat().st_mtime)
        if not files:
            raise NotComparable(f"{path}: no results_*.json under this folder (lm_eval --output_path writes one)")
        p = files[-1]
    if p.exists() and not p.is_file():
        raise NotComparable(f"{path}: not a regular file (a results_*.json file or the folder holding it)")
    try:
        data = json.loads(p.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise NotComparable(f"{path}: cannot read it as JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise NotComparable(f"{p}: not an lm-eval results file (no 'results' table)")
    for task, row in data["results"].items():
        if not isinstance(row, dict):
            raise NotComparable(f"{p}: results[{task!r}] is a {type(row).__name__}, not a table of metrics")
    for key in ("n-samples", "config", "n-shot", "versions"):
        if not isinstance(data.get(key) or {}, dict):
            raise NotComparable(f"{p}: {key!r} is a {type(data[key]).__name__}, not a table")
    for task, row in (data.get("n-samples") or {}).items():
        if not isinstance(row or {}, dict):
            raise NotComparable(f"{p}: n-samples[{task!r}] is a {type(row).__name__}, not a table")
    if not isinstance((data.get("config") or {}).get("residual_offload") or {}, dict):
        raise NotComparable(f"{p}: config.residual_offload is not a table")
    data["_path"] = str(p)
    return data


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def metrics(data: dict) -> dict:
    """``{(task, "metric,filter"): number}`` of the numeric metrics (standard errors left out); a
    value that is not a finite number (NaN, Inf, too large for a float) is kept as the original."""
    out = {}
    for task, row in data["results"].items():
        for key, value in row.items():
            if (
                key in _NOT_METRICS
                or "_stderr" in key
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            out[(task, key)] = float(value) if _finite(value) else value
    return out


def parse_tolerance(text: str) -> tuple:
    """``"1e-6"`` or ``"1e-6,acc=0.01,word_perplexity=0"`` -> ``(default, {metric: tolerance})``;
    relative tolerances (``|candidate - base| <= tol * |base|``), 0 meaning equal."""
    default, per_metric = 0.0, {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, _, value = part.rpartition("=")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise NotComparable(f"--tolerance: {part!r} is not a number (write 1e-6 or METRIC=1e-6)") from None
        if number < 0 or not math.isfinite(number):
            raise NotComparable(f"--tolerance: {part!r} must be a finite number >= 0")
        if name:
            per_metric[name] = number
        else:
            default = number
    return default, per_metric


def _sample_counts(data: dict) -> dict:
    return {task: (row or {}).get("effective") for task, row in (data.get("n-samples") or {}).items()}


# what must be the same for a task of both files: (results key, what it is, how to make it the same). Not
# task_hashes: lm-eval hashes the logged samples in the order the ranks gathered them, so a data-parallel
# run of the same documents hashes differently
_SETUP = (
    ("n-shot", "few-shot examples", "run both with the same --num_fewshot"),
    ("versions", "task version", "run both with the same task definition"),
)


def _check_same_setup(base: dict, cand: dict) -> None:
    """:class:`NotComparable` unless every task of BASE that CANDIDATE also ran was run the same way: as many
    samples (both files must say), the same few-shot count and task version, where both record them."""
    counts_b, counts_c = _sample_counts(base), _sample_counts(cand)
    for data, counts in ((base, counts_b), (cand, counts_c)):
        if not counts:
            raise NotComparable(
                f"{data['_path']}: no n-samples table, so the sample counts cannot be checked (lm_eval writes one)"
            )
    for task, n in counts_b.items():
        if task in counts_c and n != counts_c[task]:
            raise NotComparable(
                f"task {task}: BASE evaluated {n} samples, CANDIDATE {counts_c[task]} (run both with the same --limit)"
            )
    for key, what, fix in _SETUP:
        b, c = base.get(key) or {}, cand.get(key) or {}
        for task in sorted(set(b) & set(c)):
            if b[task] != c[task]:
                raise NotComparable(f"task {task}: {what} {b[task]!r} in BASE, {c[task]!r} in CANDIDATE ({fix})")


def _check_tolerance_names(base: dict, per_metric: dict) -> None:
    names = {key.split(",", 1)[0] for _, key in metrics(base)}
    unknown = sorted(set(per_metric) - names)
    if unknown:
        raise NotComparable(f"--tolerance names {unknown}, which BASE does not have; its metrics are {sorted(names)}")


def _setup_notes(base: dict, cand: dict) -> list:
    """Lines on how the two runs' batching differed: a padded batch may round a score differently from one
    sequence at a time, so equal metrics across batch sizes are not a per-sample check."""
    b, c = (str((d.get("config") or {}).get("batch_size")) for d in (base, cand))
    if b == c:
        return []
    return [f"note: BASE ran --batch_size {b}, CANDIDATE {c}; scores of padded batches may differ in the last digits"]


def throughput(data: dict) -> float | None:
    """``config.residual_offload.tokens_per_second`` of an ``hf-residual-offload`` run, else None."""
    value = ((data.get("config") or {}).get("residual_offload") or {}).get("tokens_per_second")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value) and value > 0:
        return float(value)
    return None


def compare(base: dict, cand: dict, tolerance: tuple) -> tuple:
    """``(report lines, regression lines, cannot-compare lines)`` of CANDIDATE against BASE."""
    default, per_metric = tolerance
    _check_same_setup(base, cand)
    mb, mc = metrics(base), metrics(cand)
    if not mb:
        raise NotComparable(f"{base['_path']}: no numeric metric to compare")
    _check_tolerance_names(base, per_metric)
    report, regressions, incomparable = [], [], []
    for task in sorted({task for task, _ in mb} - set(cand["results"])):
        regressions.append(f"{task}: task missing from CANDIDATE")
    for (task, key), b in sorted(mb.items()):
        name = key.split(",", 1)[0]
        if not _finite(b):
            incomparable.append(f"{task} {key}: BASE value {b!r} is not a finite number")
            continue
        if task not in cand["results"]:
            continue  # (said once per task above)
        if (task, key) not in mc:
            value = cand["results"][task].get(key, _MISSING)
            regressions.append(
                f"{task} {key}: missing from CANDIDATE"
                if value is _MISSING
                else f"{task} {key}: {b!r} -> {value!r}: not a number"
            )
            continue
        c, tol = mc[(task, key)], per_metric.get(name, default)
        if not _finite(c):
            regressions.append(f"{task} {key}: {b!r} -> {c!r}: not a finite number")
            continue
        diff = abs(c - b)
        rel = diff / abs(b) if b else (0.0 if diff == 0 else math.inf)
        line = f"{task} {key}: {b!r} -> {c!r}" + (
            " (equal)" if diff == 0 else f" (moved {c - b:+.6g}, relative {rel:.3g}; tolerance {tol:g})"
        )
        report.append(line)
        if not rel <= tol:
            regressions.append(line)
    return report, regressions, incomparable


def _check_min_ratio(min_ratio) -> None:
    if min_ratio is not None and not (_finite(min_ratio) and min_ratio > 0):
        raise NotComparable(f"--min-throughput-ratio {min_ratio!r} must be a finite number > 0")


def _throughput_lines(base, cand, min_ratio) -> tuple:
    tb, tc = throughput(base), throughput(cand)
    lines, failed = [], []
    for label, value in (("BASE", tb), ("CANDIDATE", tc)):
        if value is not None:
            lines.append(f"throughput {label}: {value:,.1f} tokens/s (config.residual_offload.tokens_per_second)")
    _check_min_ratio(min_ratio)
    if tb and tc:
        ratio = tc / tb
        lines.append(f"throughput CANDIDATE / BASE: {ratio:.3f}")
        if min_ratio is not None and not ratio >= min_ratio:
            failed.append(f"throughput ratio {ratio:.3f} < --min-throughput-ratio {min_ratio:g}")
    elif min_ratio is not None:
        raise NotComparable(
            "--min-throughput-ratio needs config.residual_offload.tokens_per_second in both files, "
            "finite numbers > 0 (both from --model hf-residual-offload)"
        )
    return lines, failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="lm-eval results JSON (or the --output_path folder holding it)")
    parser.add_argument("candidate", metavar="CANDIDATE", help="the results to gate, same form")
    parser.add_argument(
        "--tolerance",
        default="0",
        help="relative tolerance, optionally per metric: 1e-6 or 1e-6,acc=0.01 (default 0: equal)",
    )
    parser.add_argument(
        "--min-throughput-ratio",
        type=float,
        default=None,
        help="fail when CANDIDATE/BASE tokens_per_second is below this (both must be hf-residual-offload runs)",
    )


def run(args, out=print, err=print) -> int:
    """Compare the files of parsed ``args``; print the findings; return the exit status."""
    try:
        parse_tolerance(args.tolerance)  # bad options before reading any file
        _check_min_ratio(args.min_throughput_ratio)
        base, cand = load_results(args.base), load_results(args.candidate)
        report, regressions, incomparable = compare(base, cand, parse_tolerance(args.tolerance))
        lines, failed = _throughput_lines(base, cand, args.min_throughput_ratio)
    except NotComparable as exc:
        err(f"compare-lm-eval: error: {exc}")
        return 2
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
        err(
            f"compare-lm-eval: error: a results file has a value of the wrong form "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        )
        return 2
    out(f"compare-lm-eval: BASE {base['_path']}, CANDIDATE {cand['_path']}")
    for line in report + lines + _setup_notes(base, cand):
        out(f"  {line}")
    regressions += failed
    if regressions:
        out(f"REGRESSION ({len(regressions)}):")
        for line in regressions:
            out(f"  {line}")
    if incomparable:
        out(f"CANNOT COMPARE ({len(incomparable)}):")
        for line in incomparable:
            out(f"  {line}")
    if regressions:
        return 1
    if incomparable:
        return 2
    out("compare-lm-eval: every metric within tolerance")
    return 0
