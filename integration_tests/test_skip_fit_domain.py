"""``benchmarks/skip_fit_domain.py`` refuses bad arguments before it loads the model."""

from __future__ import annotations

import pytest
from bench_helpers import benchmark_module

bench = benchmark_module("skip_fit_domain.py", "skip_fit_domain")


@pytest.mark.parametrize("argv", [["--domain", "nope"], ["--sets", "1,x"], ["--oracle", "ten"], ["--sets", "1,99"]])
def test_bad_arguments_are_refused(argv, capsys):
    assert bench.main(argv) == 2
    assert "error:" in capsys.readouterr().err
