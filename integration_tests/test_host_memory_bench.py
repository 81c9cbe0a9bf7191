"""``benchmarks/host_memory.py``: its argument checks (before any checkpoint is written) and its measured process,
run here on a tiny checkpoint on the CPU (the GPU is where Accelerate's host copies would stay alive)."""

from __future__ import annotations

import sys

import pytest
import torch
from bench_helpers import benchmark_module
from shapes import save_tiny

bench = benchmark_module("host_memory.py", "host_memory")


@pytest.mark.parametrize("argv", [["--model", "nope"], ["--offload", "0-99"], ["--offload", "bogus"]])
def test_bad_arguments_are_refused_before_any_work(argv, capsys, tmp_path):
    assert bench.main([*argv, "--ckpt-dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no checkpoint written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_where_to_run(capsys, tmp_path):
    assert bench.main(["--ckpt-dir", str(tmp_path)]) == 2
    assert "GPU" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_measured_process_reports_host_memory_and_the_offloaded_bytes(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "ckpt", num_layers=6)
    got = bench.measure(str(folder), "even", "cpu", "stream")
    assert got["offloaded_bytes"] > 0 and got["tier"] == "cpu"
    assert 0 < got["host"]["rss"] <= got["host"]["peak_rss"]
