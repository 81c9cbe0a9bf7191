"""The layer-skipping benchmarks (``skip_fit_domain.py``, ``skip_ridge_domains.py``, ``skip_sublayer_probe.py``,
``skip_e2e_probe.py``) refuse bad arguments, and an ``--out`` they could not write, before they load the model."""

from __future__ import annotations

import pytest
from bench_helpers import benchmark_module

NO_FOLDER = "/nonexistent-lp-folder/r.json"
CASES = {
    "skip_fit_domain": [["--domain", "nope"], ["--sets", "1,x"], ["--oracle", "ten"], ["--sets", "1,99"],
                        ["--out", NO_FOLDER]],
    "skip_ridge_domains": [["--fits", "ridge"], ["--fits", ""], ["--fits", "-1"], ["--sets", "15%"],
                           ["--grid", "a,1"], ["--calib", "pydoc"], ["--out", NO_FOLDER]],
    "skip_sublayer_probe": [["--sets", "15%"], ["--halves", "norm"], ["--halves", "cut"], ["--halves", "cut0"],
                            ["--halves", "xyz12"], ["--out", NO_FOLDER]],
    "skip_e2e_probe": [["--sets", "15%"], ["--epochs", "0"], ["--lr", "0"], ["--tokens", "100"], ["--threads", "0"],
                       ["--out", NO_FOLDER]],
}


@pytest.mark.parametrize(("script", "argv"), [(s, a) for s, cases in CASES.items() for a in cases])
def test_bad_arguments_are_refused(script, argv, capsys, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    bench = benchmark_module(f"{script}.py", script)
    assert bench.main(argv) == 2
    assert "error:" in capsys.readouterr().err
