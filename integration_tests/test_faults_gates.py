"""Fault tests of the two gates: ``lp-bench --compare`` and ``python -m lp_plugin compare-lm-eval``.

A gate never passes what it cannot compare: NaN or Inf in a compared figure, a figure the reference
has and the new run lacks, an empty or mismatched reference, a config that stopped running, and
NaN tolerances or ratios each fail, with exit status 1 (a regression) or 2 (cannot compare).
Malformed JSON of any shape exits 2 with one ``error:`` line, never a traceback.

lp-bench cases doctor one real run of a tiny checkpoint; compare-lm-eval cases use results files
of lm-eval's shape (the gate reads nothing else of them).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import pytest
from bench_helpers import ROOT, SMALL, bench, config, read

from lp_plugin.tools import gate_lm_eval

NAN, INF = float("nan"), float("inf")
HUGE = int("9" * 400)  # a 400-digit integer: valid JSON, too large for a float


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One real lp-bench run of a tiny checkpoint (two timed rounds: the fewest the speed gate judges)."""
    from shapes import save_tiny

    root = tmp_path_factory.mktemp("gates")
    ckpt = save_tiny("qwen2", root / "tiny-qwen2")
    out = root / "ref.json"
    rc, stdout = bench(["--model", ckpt, *SMALL, "--configs", "baseline,session:even:cpu,stream:even:cpu",
                        "--repeats", "2", "--out", out])
    assert rc == 0, stdout
    return read(out)


def _write(tmp_path, name, data, allow_nan=True) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, allow_nan=allow_nan))
    return str(path)


def _gate(tmp_path, new, old) -> tuple:
    """``lp-bench --results NEW --compare OLD`` in this process: (exit status, stdout)."""
    return bench(["--results", _write(tmp_path, "new.json", new), "--compare", _write(tmp_path, "old.json", old)])


def _doctor(data, name, key, value):
    data = copy.deepcopy(data)
    c = config(data, name)
    if value is KeyError:
        c.pop(key)
    else:
        c[key] = value
    return data


# ------------------------------------------------------------------------------------------ lp-bench
def test_bench_self_compare_passes(reference, tmp_path):
    assert _gate(tmp_path, reference, reference)[0] == 0


@pytest.mark.parametrize("key,value", [
    ("max_abs_logit_diff", NAN), ("max_abs_logit_diff", INF), ("perplexity", NAN), ("argmax_agreement", NAN),
    ("generate_tokens_agree", NAN), ("max_abs_logit_diff", KeyError), ("argmax_agreement", KeyError),
    ("perplexity", KeyError), ("max_abs_decode_logit_diff", NAN), ("max_abs_decode_logit_diff", INF),
    ("max_abs_decode_logit_diff", KeyError), ("max_abs_decode_logit_diff", 1e-7),
])
def test_bench_new_figure_not_finite_or_missing_is_a_regression(reference, tmp_path, key, value):
    rc, stdout = _gate(tmp_path, _doctor(reference, "stream:even:cpu", key, value), reference)
    assert rc == 1, stdout
    assert "gate: no regression" not in stdout


@pytest.mark.parametrize("key,value", [
    ("max_abs_logit_diff", -1.0), ("argmax_agreement", 2.0), ("argmax_agreement", -0.5), ("decode_tokens_agree", 1.5),
    ("perplexity", 0.0), ("perplexity", -3.0),
])
def test_bench_new_figure_outside_what_it_can_measure_is_a_regression(reference, tmp_path, key, value):
    """A negative logit difference, an agreement outside [0, 1] or a perplexity <= 0 is no measurement."""
    rc, stdout = _gate(tmp_path, _doctor(reference, "stream:even:cpu", key, value), reference)
    assert rc == 1, stdout


@pytest.mark.parametrize("key,value", [("max_abs_logit_diff", -1.0), ("argmax_agreement", 1.5), ("perplexity", 0.0)])
def test_bench_reference_figure_outside_what_it_can_measure_cannot_compare(reference, tmp_path, key, value):
    rc, stdout = _gate(tmp_path, reference, _doctor(reference, "stream:even:cpu", key, value))
    assert rc == 2, stdout


def _speeds(data, name, value):
    data = copy.deepcopy(data)
    figure = config(data, name)["decode_tok_s"]
    figure.update(runs=[value] * len(figure["runs"]), median=value, min=value, max=value)
    return data


@pytest.mark.parametrize("name", ["baseline", "session:even:cpu"])
@pytest.mark.parametrize("value", [0.0, -5.0])
def test_bench_reference_speed_not_above_zero_cannot_compare(reference, tmp_path, name, value):
    """A reference whose plain model decoded at 0 tok/s leaves no ratio to compare: never a pass."""
    rc, stdout = _gate(tmp_path, reference, _speeds(reference, name, value))
    assert rc == 2, stdout


@pytest.mark.parametrize("name", ["baseline", "session:even:cpu"])
def test_bench_new_speed_not_above_zero_is_a_regression(reference, tmp_path, name):
    assert _gate(tmp_path, _speeds(reference, name, -5.0), reference)[0] == 1


def test_bench_400_digit_figure_cannot_be_read(reference, tmp_path):
    """A number too large for a float in the new run: the file cannot be read (exit 2, not 0)."""
    assert _gate(tmp_path, _doctor(reference, "stream:even:cpu", "max_abs_logit_diff", HUGE), reference)[0] == 2


def test_bench_all_nan_decode_runs_is_a_regression(reference, tmp_path):
    new = copy.deepcopy(reference)
    figure = config(new, "session:even:cpu")["decode_tok_s"]
    figure.update(runs=[NAN] * len(figure["runs"]), median=NAN, min=NAN, max=NAN)
    assert _gate(tmp_path, new, reference)[0] == 1


def test_bench_nan_in_the_plain_models_figures_fails(reference, tmp_path):
    new = _doctor(reference, "baseline", "perplexity", NAN)
    assert _gate(tmp_path, new, reference)[0] == 1


@pytest.mark.parametrize("key,value", [("max_abs_logit_diff", NAN), ("perplexity", INF), ("argmax_agreement", -INF),
                                       ("max_abs_decode_logit_diff", INF)])
def test_bench_reference_figure_not_finite_cannot_compare(reference, tmp_path, key, value):
    rc, stdout = _gate(tmp_path, reference, _doctor(reference, "stream:even:cpu", key, value))
    assert rc == 2, stdout
    assert "CANNOT COMPARE" in stdout


def _decode(data, name, diff, equal):
    data = _doctor(data, name, "max_abs_decode_logit_diff", diff)
    config(data, name)["decode_logits_equal"] = equal
    return data


def test_bench_decode_logits_not_finite_in_the_new_run_is_a_regression(reference, tmp_path):
    """No difference recorded and decode_logits_equal false: the decode steps gave logits that are not
    finite where the plain model's are. A regression against a reference that has the figure."""
    rc, stdout = _gate(tmp_path, _decode(reference, "stream:even:cpu", None, False), reference)
    assert rc == 1 and "stream:even:cpu: max abs decode-step logit diff vs the plain model: 0.0 -> not finite" in stdout
    assert "NOT EXACT (1 of 2 configs differ from the plain model, 1 in the decode steps only)" in stdout


def test_bench_reference_without_the_decode_check_is_not_compared_on_it(reference, tmp_path):
    """A reference from before the decode-step check (or one whose decode steps were not exact, with
    no difference recorded): the new run is not held to that figure, and still gated on the rest."""
    old = copy.deepcopy(reference)
    for c in old["configs"]:
        c.pop("max_abs_decode_logit_diff")
        c.pop("decode_logits_equal")
    rc, stdout = _gate(tmp_path, reference, old)
    assert rc == 0, stdout
    assert bench(["--results", _write(tmp_path, "old-only.json", old)])[1].splitlines()[-1].startswith(
        "verdict: exact (2 of 2 configs equal the plain model; decode steps unchecked: 2)")
    assert _gate(tmp_path, reference, _decode(reference, "stream:even:cpu", None, False))[0] == 0
    assert _gate(tmp_path, _doctor(reference, "stream:even:cpu", "max_abs_logit_diff", 1e-7), old)[0] == 1


@pytest.mark.parametrize("diff,rc", [(1.5e-3, 0), (2e-3, 0), (2.5e-3, 1)])
def test_bench_decode_logits_may_drift_as_far_as_the_plain_model_allows(reference, tmp_path, diff, rc):
    """The plain model's own decode-step drift (``baseline`` and ``baseline:twin`` against the reference
    logits) sets the allowance: NOISE_MARGIN (2) times 1e-3 here; beyond it the gate fails. The
    goal of an exact config follows the same allowance."""
    def drifting(data, value):
        data = copy.deepcopy(data)
        for name in ("baseline", "baseline:twin"):
            data = _decode(data, name, 1e-3, False)
        return _decode(data, "stream:even:cpu", value, False)

    new_rc, stdout = _gate(tmp_path, drifting(reference, diff), drifting(reference, 0.0))
    assert new_rc == rc, stdout
    goal = "stream:even:cpu: decode-step logits: max abs diff"
    assert (f"[ok] {goal} = {diff:.3g} (target <= 0.002" in stdout) == (rc == 0), stdout


def test_bench_inexact_config_is_not_held_to_decode_exactness(reference, tmp_path):
    """alpha < 1 changes the model: its decode-step difference is reported, never a goal or the verdict."""
    data = _decode(reference, "stream:even:cpu", 0.25, False)
    config(data, "stream:even:cpu")["config"]["alpha"] = 0.5
    stdout = bench(["--results", _write(tmp_path, "half.json", data)])[1]
    assert "stream:even:cpu: decode-step logits" not in stdout
    assert stdout.splitlines()[-1].startswith("verdict: exact (1 of 1 configs equal the plain model)")
    exact = _decode(reference, "stream:even:cpu", 0.25, False)
    stdout = bench(["--results", _write(tmp_path, "bad.json", exact)])[1]
    assert "[MISS] stream:even:cpu: decode-step logits: max abs diff = 0.25" in stdout
    assert stdout.splitlines()[-1].startswith("verdict: NOT EXACT (1 of 2 configs differ")


def test_bench_reference_plain_perplexity_nan_cannot_compare(reference, tmp_path):
    old = copy.deepcopy(reference)
    old["reference"]["perplexity"] = NAN
    assert _gate(tmp_path, reference, old)[0] == 2


def test_bench_empty_reference_cannot_compare(reference, tmp_path):
    old = dict(reference, configs=[])
    assert _gate(tmp_path, reference, old)[0] == 2


@pytest.mark.parametrize("section,key,value", [
    ("model", "name", "another-model"),
    ("model", "architecture", "LlamaForCausalLM"),
    ("model", "num_layers", 7),            # the same folder saved again with another config
    ("model", "hidden_size", 48),
    ("model", "vocab_size", 7),
    ("settings", "dtype", "bf16"),
    ("settings", "device", "cuda:0"),      # ratios against transfer bounds, not the cpu's
])
def test_bench_mismatched_reference_cannot_compare(reference, tmp_path, section, key, value):
    old = copy.deepcopy(reference)
    old[section][key] = value
    rc, stdout = _gate(tmp_path, reference, old)[:2]
    assert rc == 2 and "REGRESSION" not in stdout


def test_bench_reference_from_another_device_of_the_same_type_is_a_note(reference, tmp_path):
    old = copy.deepcopy(reference)
    old["settings"]["device"] = "cpu:1"
    old["env"]["cpu"] = "another processor"
    rc, stdout = _gate(tmp_path, reference, old)[:2]
    assert rc == 0 and "note: device differs" in stdout


def test_bench_config_that_stopped_running_is_a_regression(reference, tmp_path):
    new = _doctor(reference, "stream:even:cpu", "not_applicable", "pretend the tier went away")
    assert _gate(tmp_path, new, reference)[0] == 1


def test_bench_config_missing_from_new_run_is_a_regression(reference, tmp_path):
    new = copy.deepcopy(reference)
    new["configs"] = [c for c in new["configs"] if c["name"] != "stream:even:cpu"]
    assert _gate(tmp_path, new, reference)[0] == 1


def test_bench_speed_measured_in_the_reference_only_is_a_regression(reference, tmp_path):
    new = _doctor(reference, "session:even:cpu", "generate_tok_s", None)
    assert _gate(tmp_path, new, reference)[0] == 1


@pytest.mark.parametrize("tolerance", ["logit=nan", "speed=inf", "ppl=-1", "argmax=1e999", "tokens=x"])
def test_bench_tolerance_not_finite_is_refused(reference, tmp_path, tolerance):
    path = _write(tmp_path, "r.json", reference)
    assert bench(["--results", path, "--compare", path, "--tolerance", tolerance])[0] == 2


def _malformed(reference) -> dict:
    nameless = copy.deepcopy(reference)
    nameless["configs"][1].pop("name")
    no_kind = copy.deepcopy(reference)
    no_kind["configs"][1]["config"] = "stream"
    wrong_figure = _doctor(reference, "stream:even:cpu", "decode_tok_s", "fast")
    wrong_runs = _doctor(reference, "stream:even:cpu", "decode_tok_s", {"runs": "many", "median": 1})
    return {
        "config-without-name": nameless,
        "config-is-a-string": dict(reference, configs=["baseline", *reference["configs"][1:]]),
        "configs-is-a-table": dict(reference, configs={"baseline": 1}),
        "config-spec-not-a-table": no_kind,
        "model-is-a-list": dict(reference, model=[1, 2]),
        "figure-is-a-string": wrong_figure,
        "runs-is-a-string": wrong_runs,
        "deep-nesting": "[" * 100000 + "]" * 100000,
        "not-json": "{configs: nope",
        "top-level-list": [reference],
        "huge-integer": json.dumps(reference).replace('"perplexity": ', '"perplexity": ' + "7" * 400 + ", \"_p\": ", 1),
    }


MALFORMED = ["config-without-name", "config-is-a-string", "configs-is-a-table", "config-spec-not-a-table",
             "model-is-a-list", "figure-is-a-string", "runs-is-a-string", "deep-nesting", "not-json", "top-level-list",
             "huge-integer"]


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("side", ["--compare", "--results"])
def test_bench_malformed_results_exit_2(reference, tmp_path, case, side):
    bad = _write(tmp_path, "bad.json", _malformed(reference)[case])
    good = _write(tmp_path, "good.json", reference)
    args = ["--results", bad, "--compare", good] if side == "--results" else ["--results", good, "--compare", bad]
    assert bench(args)[0] == 2


def test_bench_malformed_reference_one_error_line_no_traceback(reference, tmp_path):
    bad = _write(tmp_path, "bad.json", _malformed(reference)["config-is-a-string"])
    good = _write(tmp_path, "good.json", reference)
    proc = subprocess.run([sys.executable, "-m", "lp_plugin.tools.bench.cli", "--results", good, "--compare", bad],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert sum("error:" in line for line in proc.stderr.splitlines()) == 1


# -------------------------------------------------------------------------------- compare-lm-eval
def _results(value=0.5, tps=100.0, **extra) -> dict:
    """An lm-eval results table of the shape lm_eval writes (one task, two metrics)."""
    data = {"results": {"lp_pydoc_ppl": {"alias": "lp_pydoc_ppl", "word_perplexity,none": value,
                                         "bits_per_byte,none": 1.25, "bits_per_byte_stderr,none": "N/A"}},
            "n-samples": {"lp_pydoc_ppl": {"original": 4, "effective": 4}},
            "config": {"model": "hf-residual-offload", "residual_offload": {"tokens_per_second": tps}}}
    data.update(extra)
    return data


def _lm_gate(tmp_path, base, cand, *options) -> tuple:
    """compare-lm-eval in this process: (exit status, stdout lines, stderr lines)."""
    parser = argparse.ArgumentParser()
    gate_lm_eval.add_arguments(parser)
    args = parser.parse_args([_write(tmp_path, "base.json", base), _write(tmp_path, "cand.json", cand), *options])
    out, err = [], []
    rc = gate_lm_eval.run(args, out=out.append, err=err.append)
    return rc, out, err


def test_lm_eval_equal_passes(tmp_path):
    assert _lm_gate(tmp_path, _results(), _results())[0] == 0


@pytest.mark.parametrize("base,cand,expect", [
    (0.5, NAN, 1), (0.5, INF, 1), (0.5, -INF, 1), (0.5, HUGE, 1),
    (NAN, NAN, 2), (INF, 0.5, 2), (INF, INF, 2), (NAN, 0.5, 2), (HUGE, 0.5, 2),
])
def test_lm_eval_metric_not_finite(tmp_path, base, cand, expect):
    rc, out, _ = _lm_gate(tmp_path, _results(base), _results(cand), "--tolerance", "0.5")
    assert rc == expect, out
    assert not any("every metric within tolerance" in line for line in out)


def test_lm_eval_metric_missing_from_candidate_is_a_regression(tmp_path):
    cand = _results()
    del cand["results"]["lp_pydoc_ppl"]["bits_per_byte,none"]
    assert _lm_gate(tmp_path, _results(), cand)[0] == 1


@pytest.mark.parametrize("ratio", ["nan", "inf", "-1", "0"])
def test_lm_eval_min_throughput_ratio_not_finite_is_refused(tmp_path, ratio):
    assert _lm_gate(tmp_path, _results(), _results(), "--min-throughput-ratio", ratio)[0] == 2


@pytest.mark.parametrize("base_tps,cand_tps", [(INF, INF), (NAN, 100.0), (100.0, NAN), (100.0, HUGE)])
def test_lm_eval_throughput_not_finite_cannot_compare(tmp_path, base_tps, cand_tps):
    rc, _, _ = _lm_gate(tmp_path, _results(tps=base_tps), _results(tps=cand_tps), "--min-throughput-ratio", "0.9")
    assert rc == 2


def test_lm_eval_nan_tolerance_is_refused(tmp_path):
    assert _lm_gate(tmp_path, _results(), _results(), "--tolerance", "nan")[0] == 2
    assert _lm_gate(tmp_path, _results(), _results(), "--tolerance", "1e999")[0] == 2


@pytest.mark.parametrize("bad", [
    {"results": {"lp_pydoc_ppl": [0.5]}},
    {"results": {"lp_pydoc_ppl": "0.5"}},
    _results(**{"n-samples": [4]}),
    _results(**{"n-samples": {"lp_pydoc_ppl": 4}}),
    _results(config=["hf"]),
    _results(config={"residual_offload": "fast"}),
    {"results": []},
    [],
    "[" * 100000 + "]" * 100000,
    '{"results": {"t": {"acc,none": 1' + "0" * 5000 + "}}}",  # past Python's limit on integer digits
    "\xff\xfe not json",
])
@pytest.mark.parametrize("side", ["base", "cand"])
def test_lm_eval_malformed_exit_2_with_one_error_line(tmp_path, bad, side):
    base, cand = (bad, _results()) if side == "base" else (_results(), bad)
    rc, out, err = _lm_gate(tmp_path, base, cand)
    assert rc == 2
    assert len(err) == 1 and "error:" in err[0]


def test_lm_eval_malformed_from_the_command_line_no_traceback(tmp_path):
    base = _write(tmp_path, "base.json", "[" * 100000 + "]" * 100000)
    cand = _write(tmp_path, "cand.json", _results())
    proc = subprocess.run([sys.executable, "-m", "lp_plugin", "compare-lm-eval", base, cand],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert sum("error:" in line for line in proc.stderr.splitlines()) == 1


def test_special_files_are_refused_without_blocking(reference, tmp_path):
    """A FIFO given as a results file would block a reader forever: refused (exit 2) at once."""
    import os
    import signal

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    good = _write(tmp_path, "good.json", reference)

    def hang(signum, frame):
        raise TimeoutError("a gate blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        assert bench(["--results", good, "--compare", fifo])[0] == 2
        parser = argparse.ArgumentParser()
        gate_lm_eval.add_arguments(parser)
        err = []
        assert gate_lm_eval.run(parser.parse_args([str(fifo), good]), out=lambda _: None, err=err.append) == 2
        assert len(err) == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("key,base,cand", [
    ("n-shot", {"lp_pydoc_ppl": 0}, {"lp_pydoc_ppl": 5}),
    ("versions", {"lp_pydoc_ppl": 1.0}, {"lp_pydoc_ppl": 2.0}),
])
def test_lm_eval_tasks_run_differently_cannot_compare(tmp_path, key, base, cand):
    rc, _, err = _lm_gate(tmp_path, _results(**{key: base}), _results(**{key: cand}))
    assert rc == 2 and len(err) == 1 and "lp_pydoc_ppl" in err[0]
    assert _lm_gate(tmp_path, _results(**{key: base}), _results(**{key: base}))[0] == 0
    assert _lm_gate(tmp_path, _results(**{key: base}), _results())[0] == 0  # recorded by one file only


@pytest.mark.parametrize("side", ["base", "cand"])
def test_lm_eval_without_sample_counts_cannot_compare(tmp_path, side):
    bare = _results()
    del bare["n-samples"]
    base, cand = (bare, _results()) if side == "base" else (_results(), bare)
    rc, _, err = _lm_gate(tmp_path, base, cand)
    assert rc == 2 and "n-samples" in err[0]


def test_lm_eval_tolerance_for_a_metric_base_lacks_is_refused(tmp_path):
    rc, _, err = _lm_gate(tmp_path, _results(), _results(), "--tolerance", "1e-6,word_perplexty=0.5")
    assert rc == 2 and "word_perplexty" in err[0]


@pytest.mark.parametrize("value", ["0.5", True, None])
def test_lm_eval_metric_of_another_type_is_a_regression_saying_so(tmp_path, value):
    cand = _results()
    cand["results"]["lp_pydoc_ppl"]["word_perplexity,none"] = value
    rc, out, _ = _lm_gate(tmp_path, _results(), cand)
    assert rc == 1 and any("word_perplexity,none" in line and "not a number" in line for line in out)


def test_lm_eval_missing_task_is_one_regression(tmp_path):
    cand = _results()
    cand["results"] = {"other": {"acc,none": 0.5}}
    rc, out, _ = _lm_gate(tmp_path, _results(), cand)
    assert rc == 1 and "REGRESSION (1):" in out


def test_lm_eval_different_batch_sizes_are_noted(tmp_path):
    base, cand = _results(), _results()
    base["config"]["batch_size"], cand["config"]["batch_size"] = 1, 4
    rc, out, _ = _lm_gate(tmp_path, base, cand)
    assert rc == 0 and any("--batch_size 1" in line and "CANDIDATE 4" in line for line in out)


def test_lm_eval_task_hashes_are_not_compared(tmp_path):
    """lm-eval hashes the logged samples in the order the ranks gathered them: a data-parallel run of the same
    documents hashes differently, and still compares."""
    base, cand = _results(task_hashes={"lp_pydoc_ppl": "ab12"}), _results(task_hashes={"lp_pydoc_ppl": "cd34"})
    assert _lm_gate(tmp_path, base, cand)[0] == 0


def test_bench_speed_from_one_round_cannot_be_judged(tmp_path):
    """A round is a ratio without a spread: t for 0 degrees of freedom would let a 2.5x slowdown pass."""
    from shapes import save_tiny

    ckpt = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    out = tmp_path / "one.json"
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "baseline,stream:even:cpu", "--repeats", "1", "--out", out])
    assert rc == 0
    one = read(out)
    rc, stdout = _gate(tmp_path, one, one)
    assert rc == 2 and "too few to judge a speed" in stdout


def test_bench_gate_that_compared_no_config_cannot_pass(tmp_path, reference):
    only_plain = copy.deepcopy(reference)
    only_plain["configs"] = [c for c in only_plain["configs"] if c["config"]["kind"] == "baseline"]
    rc, stdout = _gate(tmp_path, reference, only_plain)
    assert rc == 2 and "nothing was gated" in stdout
