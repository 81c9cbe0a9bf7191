"""The CI recipe in examples/ci/: each GitHub Actions workflow validates against the GitHub workflow
schema (check-jsonschema's vendored copy, no network; actionlint has no pip wheel that bundles it),
its shell steps parse, and every lp-bench and compare-lm-eval command in it is one the current
command-line parsers accept."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "examples" / "ci").glob("*.yml"))
MODEL = "/models/bundled"  # what $(python -m lp_plugin bundled-model) prints


def check_jsonschema(*paths) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "check-jsonschema"
    cmd = [str(exe)] if exe.is_file() else [shutil.which("check-jsonschema") or "check-jsonschema"]
    return subprocess.run([*cmd, "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def steps(path):
    """``(job env, step)`` of every step that runs a shell script."""
    data = yaml.safe_load(path.read_text())
    for job in data["jobs"].values():
        for step in job["steps"]:
            if "run" in step:
                yield job.get("env", {}), step


def commands(script: str, name: str):
    """The argument lists of every ``name`` command in ``script`` (continuation lines joined)."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line.strip())
        if name in words:
            yield words[words.index(name) + 1:]


def test_there_is_a_cpu_and_a_gpu_workflow():
    assert [p.name for p in WORKFLOWS] == ["lp-gate-cpu.yml", "lp-gate-gpu.yml"]
    gpu = yaml.safe_load(WORKFLOWS[1].read_text())
    assert "self-hosted" in gpu["jobs"]["gate"]["runs-on"]


def test_workflows_match_the_github_schema(tmp_path):
    ok = check_jsonschema(*WORKFLOWS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load(WORKFLOWS[0].read_text())
    del broken["jobs"]["gate"]["runs-on"]  # the check does catch a broken workflow
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema(tmp_path / "broken.yml").returncode == 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shell_steps_parse(path):
    for _env, step in steps(path):
        proc = subprocess.run(["bash", "-n"], input=step["run"], capture_output=True, text=True)
        assert proc.returncode == 0, (step.get("name"), proc.stderr)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_commands_are_accepted_by_the_parsers(path):
    from lp_plugin.tools import gate_lm_eval
    from lp_plugin.tools.bench.cli import build_parser
    from lp_plugin.tools.bench.configs import parse_configs

    bench_runs, lm_eval_gates = 0, 0
    for env, step in steps(path):
        script = step["run"].replace('"$(python -m lp_plugin bundled-model)"', MODEL)
        for words in commands(script, "lp-bench"):
            words = [w for part in words for w in (env["BENCH_ARGS"].split() if part == "${args[@]}" else [part])]
            args = build_parser().parse_args(words)
            assert args.model == MODEL and parse_configs(args.configs)
            bench_runs += 1
        for words in commands(script, "compare-lm-eval"):
            parser = argparse.ArgumentParser()
            gate_lm_eval.add_arguments(parser)
            args = parser.parse_args(words)
            assert gate_lm_eval.parse_tolerance(args.tolerance) == (0.0, {})  # alpha=1: metrics must be equal
            lm_eval_gates += 1
    assert bench_runs == 2 and lm_eval_gates == 1
    gated = [w for env, step in steps(path) for w in commands(step["run"].replace("\\\n", " "), "lp-bench") if "--compare" in w]
    assert len(gated) == 1
