"""``python -m lp_plugin compare-lm-eval`` on results of real ``lm_eval`` runs (a tiny random checkpoint
with the bundled tokenizer, CPU): equal results pass, a changed model fails naming the metric and by
how much, files that cannot be compared exit 2; and the ``lp_pydoc_ppl`` task warns about nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import lm_eval_fixtures as fx
import pytest

RUNS = {
    "hf": ("hf", {}),
    "offload": ("hf-residual-offload", {"offload": "even", "tier": "cpu", "mode": "session"}),
    "alpha-0.5": ("hf-residual-offload", {"offload": "even", "tier": "cpu", "alpha": 0.5}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folder and stderr of each lm_eval run in :data:`RUNS` (two at a time)."""
    root = tmp_path_factory.mktemp("gate-lm-eval")
    tiny = fx.build_tiny_model("qwen2", root / "tiny-qwen2")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(key):
        model, args = RUNS[key]
        proc, _ = fx.run_lm_eval(model, {"pretrained": tiny, **args}, root / key, limit=1, env=env)
        newest = max((root / key).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        return key, {"dir": root / key, "stderr": proc.stderr, "file": newest}

    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, RUNS))


def compare(*args):
    return subprocess.run([sys.executable, "-m", "lp_plugin", "compare-lm-eval", *map(str, args)],
                          capture_output=True, text=True, env=fx.offline_env(), timeout=120)


def test_equal_results_pass(runs):
    proc = compare(runs["hf"]["dir"], runs["offload"]["dir"])  # folders: the newest results file inside
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert f"lp_pydoc_ppl {metric},none: " in proc.stdout and "(equal)" in proc.stdout
    assert "throughput CANDIDATE: " in proc.stdout  # the offloaded run's tokens/s


def test_changed_model_fails_naming_metric_and_amount(runs):
    proc = compare(runs["offload"]["file"], runs["alpha-0.5"]["file"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    regressions = proc.stdout.split("REGRESSION", 1)[1]
    assert "lp_pydoc_ppl word_perplexity,none: " in regressions and "relative" in regressions
    assert "throughput CANDIDATE / BASE: " in proc.stdout  # both offloaded: their ratio
    # a tolerance wide enough for the move passes; one metric's own tolerance overrides the default
    base = json.loads(runs["offload"]["file"].read_text())["results"]["lp_pydoc_ppl"]
    cand = json.loads(runs["alpha-0.5"]["file"].read_text())["results"]["lp_pydoc_ppl"]
    rel = {m: abs(cand[f"{m},none"] / base[f"{m},none"] - 1) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    wide = 2 * max(rel.values())
    assert compare(runs["offload"]["file"], runs["alpha-0.5"]["file"], "--tolerance", f"{wide}").returncode == 0
    narrow_word = compare(runs["offload"]["file"], runs["alpha-0.5"]["file"], "--tolerance", f"{wide},word_perplexity=0")
    assert narrow_word.returncode == 1 and "word_perplexity" in narrow_word.stdout.split("REGRESSION", 1)[1]


def test_throughput_ratio_can_gate(runs):
    a, b = runs["offload"]["file"], runs["alpha-0.5"]["file"]
    wide = "--tolerance=1e9"
    assert compare(a, b, wide, "--min-throughput-ratio", "1e-6").returncode == 0
    slow = compare(a, b, wide, "--min-throughput-ratio", "1e6")
    assert slow.returncode == 1 and "--min-throughput-ratio" in slow.stdout
    plain = compare(runs["hf"]["file"], a, "--min-throughput-ratio", "0.5")  # the plain run has no tokens/s
    assert plain.returncode == 2 and "needs config.residual_offload.tokens_per_second in both" in plain.stderr


def test_files_that_cannot_be_compared_exit_2(runs, tmp_path):
    other_limit = json.loads(runs["hf"]["file"].read_text())
    other_limit["n-samples"]["lp_pydoc_ppl"]["effective"] += 1
    (tmp_path / "more.json").write_text(json.dumps(other_limit))
    (tmp_path / "not-results.json").write_text('{"configs": []}')
    cases = [(tmp_path / "more.json", "same --limit"), (tmp_path / "not-results.json", "not an lm-eval results file"),
             (tmp_path / "missing.json", "cannot read it"), (tmp_path, "no results_*.json")]
    for path, message in cases:
        proc = compare(runs["hf"]["file"], path)
        assert proc.returncode == 2 and message in proc.stderr, (path, proc.stderr)
    bad_tol = compare(runs["hf"]["file"], runs["offload"]["file"], "--tolerance", "lots")
    assert bad_tol.returncode == 2 and "not a number" in bad_tol.stderr


def test_missing_task_fails(runs, tmp_path):
    data = json.loads(runs["offload"]["file"].read_text())
    data["results"] = {"other_task": {"acc,none": 0.5}}
    (tmp_path / "other.json").write_text(json.dumps(data))
    proc = compare(runs["hf"]["file"], tmp_path / "other.json")
    assert proc.returncode == 1 and "lp_pydoc_ppl: task missing from CANDIDATE" in proc.stdout


def test_task_emits_no_warnings(runs):
    """lm-eval warns about metrics without aggregation/higher_is_better and about custom_dataset
    hooks; the lp_pydoc_ppl task spells out the former and builds its dataset itself."""
    for key, run in runs.items():
        lines = [line for line in run["stderr"].splitlines() if "WARNING" in line and "lp_pydoc_ppl" in line]
        assert lines == [], (key, lines)
