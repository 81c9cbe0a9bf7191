"""The CPU-checkable parts of ``benchmarks/card.py`` (card emulation): its command line, the arithmetic of its
summary and verdict, and its refusal to run without a CUDA GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_helpers import benchmark_module

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


card = benchmark_module("card.py", "card_bench")


def test_arguments_parsed_with_sizes_and_defaults(tmp_path):
    args = card.parse_args(["--card", "6GiB", "--out", str(tmp_path), "--max-memory", "5.5GiB", "--lm-eval"])
    assert (args.card_bytes, args.max_memory_bytes, args.model, args.dtype, args.context, args.new_tokens,
            args.rounds, args.lm_eval) == (6 * GIB, int(5.5 * GIB), "qwen2.5-3b-shape", "bf16", 8192, 32, 5, True)
    args = card.parse_args(["--card", "4GiB", "--out", str(tmp_path), "--model", "llama-3-8b-shape", "--dtype", "nf4",
                            "--context", "1024", "--new-tokens", "8", "--rounds", "2", "--max-context", "2048"])
    assert (args.model, args.dtype, args.context, args.new_tokens, args.rounds, args.max_context,
            args.max_memory_bytes) == ("llama-3-8b-shape", "nf4", 1024, 8, 2, 2048, None)


@pytest.mark.parametrize("argv", [
    ["--out", "OUT"],  # no card
    ["--card", "6GiB"],  # no out
    ["--card", "6 gigs", "--out", "OUT"],
    ["--card", "1MiB", "--out", "OUT"],
    ["--card", "6GiB", "--out", "OUT", "--context", "32", "--new-tokens", "32"],
    ["--card", "6GiB", "--out", "OUT", "--new-tokens", "1"],
    ["--card", "6GiB", "--out", "OUT", "--rounds", "0"],
    ["--card", "6GiB", "--out", "OUT", "--max-context", "4096"],  # below the default --context 8192
    ["--card", "6GiB", "--out", "OUT", "--max-memory", "lots"],
    ["--card", "6GiB", "--out", "OUT", "--model", "no-such-shape-or-folder"],
    ["--card", "6GiB", "--out", "OUT", "--tokenizer", "no-such-folder"],
    ["--card", "6GiB", "--out", "OUT", "--lm-eval-limit", "0"],
    ["--card", "6GiB", "--out", "OUT", "--lm-eval-task", "lp_pydoc_long"],  # no lm-eval step to run it
    ["--card", "6GiB", "--out", "OUT", "--only-lm-eval", "--lm-eval-throughput-goal", "0"],
    ["--card", "6GiB", "--out", "OUT", "--lm-eval", "--lm-eval-task", "lp_pydoc_ppl,"],
    ["--card", "6GiB", "--out", "OUT", "--only-lm-eval", "--lm-eval-task", "lp_pydoc_lnog"],
])
def test_bad_arguments_refused_before_any_work(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert card.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_lm_eval_task_and_only_lm_eval_arguments(tmp_path):
    out = str(tmp_path / "out")
    args = card.parse_args(["--card", "6GiB", "--out", out, "--lm-eval"])
    assert args.lm_eval_tasks == ["lp_pydoc_ppl"] and not args.only_lm_eval and args.lm_eval_throughput_goal is None
    args = card.parse_args(["--card", "6GiB", "--out", out, "--only-lm-eval", "--lm-eval-task",
                            "lp_pydoc_long, lp_pydoc_ppl", "--lm-eval-throughput-goal", "0.8"])
    assert args.lm_eval and args.only_lm_eval and args.lm_eval_throughput_goal == 0.8
    assert args.lm_eval_tasks == ["lp_pydoc_long", "lp_pydoc_ppl"]
    argv = card._lm_eval_args(args, "/ckpt", True, tmp_path / "lm")
    assert argv[argv.index("--tasks") + 1] == "lp_pydoc_long,lp_pydoc_ppl"
    assert Path(argv[argv.index("--include_path") + 1], "lp_pydoc_ppl", "lp_pydoc_long.yaml").is_file()
    assert "offload=auto" in argv[argv.index("--model_args") + 1] and "--limit" not in argv
    assert not (tmp_path / "out").exists()


def test_lm_eval_task_names_checked_against_ours_and_lm_evals():
    ours = card.our_lm_eval_tasks()
    assert {"lp_pydoc_ppl", "lp_pydoc_chunks", "lp_pydoc_long", "lp_heldout_slices"} <= ours
    assert card.unknown_lm_eval_tasks(["lp_pydoc_long", "lp_no_such_task"]) == ["lp_no_such_task"]
    # a name that is not lp_plugin's is looked up in lm-eval's own tasks (indexing them: ~20 s)
    assert card.unknown_lm_eval_tasks(["wikitext", "no_such_task_anywhere", "lp_pydoc_ppl"]) == ["no_such_task_anywhere"]


def test_lm_eval_on_a_folder_without_tokenizer_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = ["--card", "6GiB", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model")]
    assert card.parse_args(argv).model == str(tmp_path / "model")  # fine without --lm-eval
    with pytest.raises(card.ArgError):
        card.parse_args(argv + ["--lm-eval"])


def test_out_that_is_a_file_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(card.ArgError):
        card.parse_args(["--card", "6GiB", "--out", str(tmp_path / "f")])


def test_argparse_choices_exit_2():
    with pytest.raises(SystemExit) as exc:
        card.parse_args(["--card", "6GiB", "--out", "x", "--dtype", "int3"])
    assert exc.value.code == 2


def test_refuses_to_run_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    proc = subprocess.run([sys.executable, "benchmarks/card.py", "--card", "6GiB", "--context", "64", "--new-tokens",
                           "4", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not list((tmp_path / "out").glob("card-*.json"))  # no report from a run that did not happen


def test_head_copy_benchmark_refuses_to_run_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "benchmarks/head_copy.py", "--ckpt-dir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())  # refused before saving a checkpoint


# ---------------------------------------------------------------------------------------- arithmetic
def test_round_stats_and_transfer_bound():
    assert card.round_stats([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert card.round_stats([]) is None and card.round_stats([None]) is None
    assert card.transfer_bound(50.0, 2 * 10**9) == 25.0  # 50 GB/s moving 2 GB a token
    assert card.transfer_bound(50.0, 0) is None and card.transfer_bound(None, 10) is None


def test_speed_ratios_against_the_bound_or_the_plain_model():
    streaming = [{"decode_tok_s": 18.0, "h2d_gbps": 40.0, "bytes_per_forward": 2 * 10**9},
                 {"decode_tok_s": 20.0, "h2d_gbps": 50.0, "bytes_per_forward": 2 * 10**9}]
    assert card.speed_ratios(streaming, plain_decode=100.0) == [0.9, 0.8]  # bounds 20 and 25 tok/s
    resident = [{"decode_tok_s": 45.0, "h2d_gbps": 50.0, "bytes_per_forward": 0}]
    assert card.speed_ratios(resident, plain_decode=50.0) == [0.9]
    assert card.speed_ratios(resident, plain_decode=None) == [None]  # nothing to compare with
    # the plain model decodes below the transfer bound (NF4: launch-bound): its own speed is the ceiling
    launch_bound = [{"decode_tok_s": 15.0, "h2d_gbps": 50.0, "bytes_per_forward": 10**9}]  # bound 50 tok/s
    assert card.speed_ratios(launch_bound, plain_decode=16.0) == [15.0 / 16.0]
    assert card.ratio_basis(launch_bound, 16.0).startswith("vs plain decode")
    assert card.ratio_basis(streaming, 100.0) == "vs transfer bound"


@pytest.mark.parametrize("workload,spread,exact", [
    ({"forced_logits_equal": True, "forced_decode_logits_equal": True, "outputs_equal": False}, None, True),
    ({"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
      "forced_decode_max_abs_logit_diff": 0.1}, None, False),
    # the plain model's second process differs by more: within its own spread
    ({"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
      "forced_decode_max_abs_logit_diff": 0.1},
     {"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
      "forced_decode_max_abs_logit_diff": 0.2}, True),
    # the plain model repeats itself exactly: any difference fails
    ({"forced_logits_equal": False, "forced_decode_logits_equal": True, "forced_max_abs_logit_diff": 0.01,
      "forced_decode_max_abs_logit_diff": 0.0},
     {"forced_logits_equal": True, "forced_decode_logits_equal": True, "forced_max_abs_logit_diff": 0.0,
      "forced_decode_max_abs_logit_diff": 0.0}, False),
    # generate's own scores differ: judged against the plain model's repeat of its generate in one process
    ({"forced_logits_equal": True, "forced_decode_logits_equal": True, "forced_max_abs_logit_diff": 0.0,
      "forced_decode_max_abs_logit_diff": 0.0, "generate_logits_equal": False, "generate_max_abs_logit_diff": 0.05},
     None, False),
    ({"outputs_equal": True}, None, True),  # an old reference: greedy tokens only
    ({"outputs_equal": None}, None, False),
])
def test_outputs_exact_uses_teacher_forced_logits_and_the_plain_spread(workload, spread, exact):
    assert card.outputs_exact(workload, spread) is exact


def test_outputs_exact_takes_the_largest_decode_spread_the_plain_model_showed():
    w = {"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
         "forced_decode_max_abs_logit_diff": 0.055, "generate_logits_equal": False, "generate_max_abs_logit_diff": 0.055}
    second = {"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
              "forced_decode_max_abs_logit_diff": 0.031}
    assert card.outputs_exact(w, second) is False  # over the second process's 0.031
    assert card.outputs_exact(w, second, {"repeat_tokens_equal": True, "repeat_max_abs_logit_diff": 0.086}) is True
    # a repeat that made other tokens measures nothing comparable
    assert card.outputs_exact(w, second, {"repeat_tokens_equal": False, "repeat_max_abs_logit_diff": 0.086}) is False
    # one forward must stay within the plain model's one-forward spread (here: exact)
    assert card.outputs_exact({**w, "forced_logits_equal": False, "forced_max_abs_logit_diff": 0.01}, second,
                              {"repeat_tokens_equal": True, "repeat_max_abs_logit_diff": 0.086}) is False


def test_outputs_exact_takes_the_plain_models_teacher_forced_repeat_in_one_process():
    w = {"forced_logits_equal": True, "forced_decode_logits_equal": False, "forced_max_abs_logit_diff": 0.0,
         "forced_decode_max_abs_logit_diff": 0.158}
    # no second plain process (--plain-once), and its generate repeated made other tokens: nothing to compare with
    generate_parted = {"repeat_tokens_equal": False, "repeat_max_abs_logit_diff": 9.05}
    assert card.outputs_exact(w, None, generate_parted) is False
    forced = {"forced_logits_equal": True, "forced_max_abs_logit_diff": 0.0, "forced_decode_logits_equal": False}
    assert card.outputs_exact(w, None, {**generate_parted, "repeat_forced": {
        **forced, "forced_decode_max_abs_logit_diff": 0.2}}) is True
    assert card.outputs_exact(w, None, {**generate_parted, "repeat_forced": {
        **forced, "forced_decode_max_abs_logit_diff": 0.1}}) is False  # over the plain model's own 0.1
    # the plain model exact against itself in one forward: the workload's one forward must be exact too
    assert card.outputs_exact({**w, "forced_logits_equal": False, "forced_max_abs_logit_diff": 0.01}, None, {
        **generate_parted, "repeat_forced": {**forced, "forced_decode_max_abs_logit_diff": 0.2}}) is False


def test_forced_spread_is_the_widest_pair_of_runs():
    torch = pytest.importorskip("torch")
    base = torch.zeros(3, 5)
    runs = [{"forced_logits": base, "forced_decode_logits": base + d} for d in (0.0, 0.25, -0.5)]
    spread = card._forced_spread(runs)
    assert spread["runs"] == 3
    assert spread["forced_logits_equal"] is True and spread["forced_max_abs_logit_diff"] == 0.0
    assert spread["forced_decode_logits_equal"] is False
    assert spread["forced_decode_max_abs_logit_diff"] == pytest.approx(0.75)  # runs 2 and 3, not run 1 against each
    assert card._forced_spread(runs[:1]) == {"runs": 1}  # one run: no pair, no spread (outputs_exact then has none)


def test_moved_bytes_count_the_lm_head_copy_of_host_embeddings():
    assert card.moved_per_token({"bytes_per_forward": 10, "lm_head_bytes_per_call": 5}) == 15
    assert card.moved_per_token({"bytes_per_forward": 10, "lm_head_bytes_per_call": 0}) == 10
    assert card.moved_per_token({}) == 0


def test_device_peak_and_relative_error():
    assert card.device_peak(10 * GIB, 4 * GIB) == 6 * GIB
    assert card.device_peak(3 * GIB, 4 * GIB) == 0  # the device never went above its baseline
    assert card.relative_error(1.0, 1.0) == 0.0 and card.relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert card.relative_error(1.0, 0.0) == float("inf")


def test_compare_metrics_every_metric_and_missing_ones():
    plain = {"lp_pydoc_ppl": {"alias": "lp_pydoc_ppl", "word_perplexity,none": 10.0, "bits_per_byte,none": 2.0,
                              "bits_per_byte_stderr,none": "N/A", "sample_len": 8}}
    same = card.compare_metrics(plain, {"lp_pydoc_ppl": dict(plain["lp_pydoc_ppl"])})
    assert set(same) == {"lp_pydoc_ppl/word_perplexity,none", "lp_pydoc_ppl/bits_per_byte,none"}
    assert all(m["rel_error"] == 0.0 for m in same.values())
    off = {"lp_pydoc_ppl": {"word_perplexity,none": 10.00001, "bits_per_byte,none": 2.0}}
    diff = card.compare_metrics(plain, off)
    assert diff["lp_pydoc_ppl/word_perplexity,none"]["rel_error"] == pytest.approx(1e-6)
    missing = card.compare_metrics(plain, {"lp_pydoc_ppl": {"bits_per_byte,none": 2.0}})
    assert missing["lp_pydoc_ppl/word_perplexity,none"]["rel_error"] == float("inf")


def _report(**over):
    report = {"model": "qwen2.5-3b-shape", "dtype": "bf16", "card": "6GiB", "card_bytes": 6 * GIB, "context": 8192,
              "new_tokens": 32, "workload": {"ok": True, "outputs_equal": True},
              "peak": {"device_bytes": int(5.8 * GIB), "prediction_error": 0.02},
              "speed": {"ratio": {"median": 0.95, "min": 0.9, "max": 0.97, "n": 5}}}
    for key, value in over.items():
        report[key] = {**report[key], **value} if isinstance(value, dict) and key in report else value
    return report


def test_verdict_passes_only_when_every_check_holds():
    ok, checks, line = card.verdict(_report())
    assert ok and all(checks.values()) and line.startswith("PASS")
    for over, failed in [({"workload": {"ok": False, "error": "OutOfMemoryError"}}, "no_oom"),
                         ({"workload": {"outputs_equal": False}}, "outputs_equal"),
                         ({"workload": {"outputs_equal": None}}, "outputs_equal"),  # not compared: not a pass
                         ({"peak": {"device_bytes": 6 * GIB + 1}}, "peak_within_card"),
                         ({"peak": {"device_bytes": None}}, "peak_within_card"),
                         ({"speed": {"ratio": {"median": 0.89, "min": 0.8, "max": 0.95, "n": 5}}}, "speed"),
                         ({"speed": {"ratio": None}}, "speed"),
                         ({"peak": {"prediction_error": -0.051}}, "prediction"),
                         ({"peak": {"prediction_error": None}}, "prediction")]:
        ok, checks, line = card.verdict(_report(**over))
        assert not ok and [k for k, v in checks.items() if not v] == [failed] and line.startswith("FAIL")


def test_verdict_with_lm_eval():
    equal = {"metrics": {"t/m": {"plain": 1.0, "offload": 1.0, "rel_error": 0.0}},
             "offload": {"device_peak_bytes": 5 * GIB}}
    assert card.verdict(_report(lm_eval=equal))[0]
    worse = {**equal, "metrics": {"t/m": {"plain": 1.0, "offload": 1.1, "rel_error": 0.1}}}
    ok, checks, _ = card.verdict(_report(lm_eval=worse))
    assert not ok and not checks["lm_eval_equal"] and checks["lm_eval_peak_within_card"]
    ok, checks, _ = card.verdict(_report(lm_eval={"metrics": {}, "offload": {"device_peak_bytes": 7 * GIB}}))
    assert not ok and not checks["lm_eval_equal"] and not checks["lm_eval_peak_within_card"]


def test_verdict_lm_eval_throughput_goal_and_lm_eval_only():
    """The lm-eval throughput ratio is in the verdict line; with a goal it is a check. An lm-eval-only report is
    judged on its lm-eval checks alone."""
    lm = {"metrics": {"t/m": {"plain": 1.0, "offload": 1.0, "rel_error": 0.0}},
          "plain": {"ok": True, "max_length": 8192}, "offload": {"ok": True, "device_peak_bytes": 5 * GIB,
                                                                 "max_length": 8192},
          "throughput_vs_plain": 0.85}
    ok, checks, line = card.verdict(_report(lm_eval=lm))
    assert ok and "lm_eval_throughput" not in checks and "lm-eval throughput 0.85x plain" in line
    ok, checks, line = card.verdict(_report(lm_eval=lm, goals={"lm_eval_throughput": 0.8}))
    assert ok and checks["lm_eval_throughput"]
    ok, checks, line = card.verdict(_report(lm_eval=lm, goals={"lm_eval_throughput": 0.9}))
    assert not ok and [k for k, v in checks.items() if not v] == ["lm_eval_throughput"] and "below 0.9" in line
    no_ratio = {**lm, "throughput_vs_plain": None, "throughput_note": "max_length differs"}
    ok, checks, line = card.verdict(_report(lm_eval=no_ratio, goals={"lm_eval_throughput": 0.8}))
    assert not ok and not checks["lm_eval_throughput"] and "max_length differs" in line
    # lm-eval only: no workload, no reference, no speed; the lm-eval checks decide
    only = {"model": "qwen2.5-3b-shape", "dtype": "bf16", "card": "6GiB", "card_bytes": 6 * GIB, "context": 8192,
            "only_lm_eval": True, "lm_eval_options": {"tasks": ["lp_pydoc_long"], "max_length": None, "limit": 1}}
    ok, checks, line = card.verdict({**only, "lm_eval": lm})
    assert ok and set(checks) == {"lm_eval_equal", "lm_eval_peak_within_card"}
    assert line.startswith("PASS") and "lp_pydoc_long at max_length 8192" in line
    failed = {**lm, "metrics": {}, "offload": {"ok": False, "error": "BudgetError: nothing fits"}}
    ok, checks, line = card.verdict({**only, "lm_eval": failed})
    assert not ok and not checks["lm_eval_equal"] and "BudgetError" in line
    ok, checks, _ = card.verdict(only)  # no lm-eval section at all (a step that never ran)
    assert not ok and not checks["lm_eval_equal"]


def test_lm_eval_throughput_only_for_the_same_work(tmp_path):
    """Request times compare only where both runs scored the same documents at the same max_length."""
    def run(seconds):
        return {"ok": True, "request_seconds": seconds, "device_peak_bytes": GIB}

    def res(max_length, n):
        return {"results": {"t": {"m,none": 1.0}}, "max_length": max_length, "n-samples": {"t": {"effective": n}}}

    same = card._lm_eval_section((run(2.0), res(8192, 4)), (run(2.5), res(8192, 4)), None, "t")
    assert same["throughput_vs_plain"] == 0.8 and "throughput_note" not in same
    shorter = card._lm_eval_section((run(2.0), res(32768, 4)), (run(1.0), res(16384, 4)), None, "t")
    assert shorter["throughput_vs_plain"] is None and "max_length differs" in shorter["throughput_note"]
    fewer = card._lm_eval_section((run(2.0), res(8192, 4)), (run(1.0), res(8192, 2)), None, "t")
    assert fewer["throughput_vs_plain"] is None and fewer["throughput_note"]
    failed = card._lm_eval_section((run(2.0), res(8192, 4)), ({"ok": False, "error": "x"}, None), None, "t")
    assert failed["throughput_vs_plain"] is None and failed["metrics"] == {}


def test_lm_eval_only_report_written_under_its_own_name(tmp_path):
    """--only-lm-eval's report: lm-eval sections only, named for the task and max_length, its own table; --recheck
    reads it back."""
    lm_json = {"results": {"lp_pydoc_long": {"bits_per_byte,none": 4.3}}, "max_length": 32768,
               "n-samples": {"lp_pydoc_long": {"original": 3, "effective": 1}},
               "config": {"residual_offload": {"tokens_per_second": 9000.0, "max_length_source": "model",
                                               "prefill_chunk": 4096}}}
    lm_runs = (({"ok": True, "request_seconds": 3.0, "device_peak_bytes": 30 * GIB}, lm_json),
               ({"ok": True, "request_seconds": 4.0, "device_peak_bytes": int(5.9 * GIB)}, lm_json))
    report = {"model": "qwen2.5-3b-shape", "dtype": "bf16", "card": "6GiB", "card_bytes": 6 * GIB, "context": 8192,
              "new_tokens": 32, "env": {"gpu": "test"}, "only_lm_eval": True,
              "goals": {"lm_eval_throughput": None},
              "lm_eval_options": {"tasks": ["lp_pydoc_long"], "max_length": None, "limit": 1}}
    card.assemble(report, None, None, "nvml", lm_runs, tmp_path, "t")
    assert "workload" not in report and "speed" not in report
    assert report["lm_eval"]["throughput_vs_plain"] == 0.75
    assert card._finish(report, tmp_path) == 0 and report["passed"]
    path = tmp_path / "card-qwen2.5-3b-shape-bf16-6GiB-lmeval-lp_pydoc_long-auto-limit1.json"
    saved = json.loads(path.read_text())
    assert saved["verdict"].startswith("PASS") and "0.75x plain" in saved["verdict"]
    text = card.table(report)
    assert "lp_pydoc_long" in text and "prefill chunk 4096" in text and "decode tok/s" not in text
    saved["goals"]["lm_eval_throughput"] = 0.8  # the rules changed: judged again from what was recorded
    path.write_text(json.dumps(saved))
    assert card.main(["--recheck", str(path)]) == 1
    assert json.loads(path.read_text())["checks"]["lm_eval_throughput"] is False


def test_names_and_table():
    assert card.card_name("qwen2.5-3b-shape", "bf16", "6GiB", 8192) == "card-qwen2.5-3b-shape-bf16-6GiB-8192.json"
    assert card.card_name("/models/My Model/", "nf4", "2GiB", 2048) == "card-My_Model-nf4-2GiB-2048.json"
    assert (card.lm_eval_card_name("qwen2.5-3b-shape", "nf4", "3GiB", ["lp_pydoc_ppl", "lp_pydoc_long"], 8192)
            == "card-qwen2.5-3b-shape-nf4-3GiB-lmeval-lp_pydoc_ppl+lp_pydoc_long-8192.json")
    assert card.compact([2, 3, 4, 7, 9, 10]) == "2-4,7,9-10" and card.compact([]) == "none"
    report = _report(plan={"mode": "stream", "offloaded_layers": [2, 3], "offloaded_compact": "2-3"})
    report["verdict"] = card.verdict(report)[2]
    text = card.table(report)
    assert "stream" in text and "2-3" in text and report["verdict"] in text


def test_assemble_and_finish_write_one_report_with_lm_eval_copied_flat(tmp_path):
    """The report from steps' results: plan, peaks, speed against the bound, lm-eval side by side (its results
    JSONs copied flat next to the card JSON), verdict and exit status."""
    results = {"lp_pydoc_ppl": {"alias": "lp_pydoc_ppl", "bits_per_byte,none": 4.28, "word_perplexity,none": 5.6e8}}
    lm_json = {"results": results, "max_length": 1024, "config": {"residual_offload": {"tokens_per_second": 7000.0}}}
    rounds = [{"decode_tok_s": d, "prefill_tok_s": 9000.0, "h2d_gbps": 50.0, "bytes_per_forward": 10**9,
               "bound_tok_s": 50.0} for d in (46.0, 48.0, 44.0)]
    w = {"ok": True, "outputs_equal": True, "context_bytes": 500 * 2**20, "max_reserved_bytes": 4 * GIB,
         "peak_mapped_bytes": 256 * 2**20, "samples": 900, "device_peak_bytes": int(4.9 * GIB),
         "plan": {"mode": "stream", "offloaded_layers": [2, 3, 4], "offloaded_compact": "2-4",
                  "bytes_per_forward": 10**9, "budget": {"peak_bytes": int(4.8 * GIB)}}, "rounds": rounds}
    report = {"model": "qwen2.5-3b-shape", "dtype": "bf16", "card": "5GiB", "card_bytes": 5 * GIB, "context": 1024,
              "new_tokens": 16, "env": {"gpu": "test"}}
    lm_runs = (({"ok": True, "request_seconds": 2.0, "device_peak_bytes": 7 * GIB}, lm_json),
               ({"ok": True, "request_seconds": 2.5, "device_peak_bytes": int(4.5 * GIB)}, lm_json))
    card.assemble(report, w, {"decode_tok_s": {"median": 60.0}}, "nvml", lm_runs, tmp_path, "t")
    assert report["speed"]["ratio"] == {"median": 0.92, "min": 0.88, "max": 0.96, "n": 3}
    assert report["peak"]["self_view_bytes"] == 500 * 2**20 + 4 * GIB + 256 * 2**20
    assert report["peak"]["prediction_error"] == pytest.approx((4.8 - 4.9) / 4.9, abs=1e-9)
    assert report["lm_eval"]["throughput_vs_plain"] == 0.8 and report["lm_eval"]["offload"]["max_length"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmeval-offload-t.json", "lmeval-plain-t.json"]
    assert card._finish(report, tmp_path) == 0 and report["passed"]
    saved = json.loads((tmp_path / "card-qwen2.5-3b-shape-bf16-5GiB-1024.json").read_text())
    assert saved["verdict"].startswith("PASS") and saved["checks"]["speed"]
    assert report["lm_eval"]["plain"]["results_json"] == lm_json  # the card JSON holds everything
    w["device_peak_bytes"] = 5 * GIB + 1  # one byte over the card
    card.assemble(report, w, None, "nvml", lm_runs, tmp_path / "none", "t", copy_lm_eval=False)
    assert card._finish(report, tmp_path) == 1 and not report["checks"]["peak_within_card"]
    # --recheck: the verdict derived again from the recorded rounds (here a plain model slower than the bound)
    path = tmp_path / "card-qwen2.5-3b-shape-bf16-5GiB-1024.json"
    w["device_peak_bytes"] = int(4.9 * GIB)
    card.assemble(report, w, {"decode_tok_s": {"median": 40.0}}, "nvml", lm_runs, tmp_path / "none", "t",
                  copy_lm_eval=False)
    report["reference"] = {"decode_tok_s": {"median": 40.0}}  # as the run records the plain model's
    report["speed"]["ratio"], report["verdict"] = None, "stale"
    path.write_text(json.dumps(report))
    assert card.main(["--recheck", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["speed"]["ratio"]["median"] == 46.0 / 40.0 and saved["verdict"].startswith("PASS")
    path.write_text("[1, 2]")
    assert card.main(["--recheck", str(path)]) == 2 and path.read_text() == "[1, 2]"  # refused, left as it was


def test_teacher_forced_logits_match_generate_and_each_other():
    """The forced logits the card compares: the decode steps reproduce greedy generate's scores, one forward gives
    the same positions, and feeding a model its own tokens twice is bit for bit equal."""
    import torch
    from shapes import build_tiny

    model = build_tiny("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    tokens, last = card._generate(model, ids, 5)
    forced = card._forced_outputs(model, ids, tokens)
    assert forced["forced_logits"].shape == forced["forced_decode_logits"].shape == (5, model.config.vocab_size)
    assert forced["forced_decode_logits"].argmax(-1).tolist() == tokens
    finite = torch.isfinite(last)  # generate's min_new_tokens masks the end-of-sequence token
    torch.testing.assert_close(forced["forced_decode_logits"][-1][finite], last[finite])
    torch.testing.assert_close(forced["forced_logits"], forced["forced_decode_logits"], rtol=1e-4, atol=1e-4)
    same = card._compare_forced(forced, card._forced_outputs(model, ids, tokens))
    assert same["forced_logits_equal"] and same["forced_decode_logits_equal"]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    moved = card._compare_forced(forced, card._forced_outputs(model, ids, tokens))
    assert not moved["forced_logits_equal"] and moved["forced_decode_max_abs_logit_diff"] > 0


def test_static_cache_reference_generates_with_the_cache_a_graph_decode_uses(monkeypatch):
    """With --decode graph the plain model's reference generates with a static cache, not compiled: what
    generate() is asked for, and the same greedy tokens as a dynamic cache on the CPU."""
    import torch
    from shapes import build_tiny

    model = build_tiny("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    asked = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    dynamic, _ = card._generate(model, ids, 5)
    static, _ = card._generate(model, ids, 5, None, static_cache=True)
    assert "cache_implementation" not in asked[0]
    assert asked[1]["cache_implementation"] == "static" and asked[1]["disable_compile"] is True
    assert static == dynamic


def test_host_memory_read_from_proc_status():
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nRssAnon:\t   51200 kB\nRssShmem:\t 1024 kB\n"
    assert card.host_memory(text) == {"peak_rss": 200 * 2**20, "rss": 100 * 2**20, "anon": 50 * 2**20,
                                      "shmem": 2**20}
    assert card.host_memory("Name:\tpython\n") is None
    if sys.platform.startswith("linux"):  # this process: resident memory, at most its peak
        now = card.host_memory()
        assert now is not None and 0 < now["rss"] <= now["peak_rss"]
    report = _report(plan={"mode": "stream", "offloaded_layers": [2], "offloaded_compact": "2", "offloaded_bytes": 2**30})
    report["workload"].update(host_after_load={"rss": 3 * 2**30, "anon": 2**30, "shmem": 0},
                              host_at_end={"peak_rss": 4 * 2**30})
    report["verdict"] = card.verdict(report)[2]
    row = next(line for line in card.table(report).splitlines() if line.startswith("host memory"))
    assert "3.00 GiB after load" in row and "peak 4.00 GiB" in row and "keeps 1.00 GiB" in row
