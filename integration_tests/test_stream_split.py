"""The CPU-checkable parts of ``benchmarks/stream_split.py``: its argument checks (before any model is built) and
that its ``stream_two_hooks`` config still computes the plain model's logits (the ring waits at a layer's first
Linear module and frees the slot after its last, with no hook between)."""

from __future__ import annotations

import pytest
import torch
from bench_helpers import benchmark_module

split = benchmark_module("stream_split.py", "stream_split")


@pytest.mark.parametrize("argv", [["--layers", "0-99"], ["--shape", "nope"], ["--configs", "plain,bogus"],
                                  ["--new", "0"], ["--rounds", "0"]])
def test_bad_arguments_are_refused_before_any_model(argv, capsys):
    assert split.main(argv) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_where_to_run(capsys):
    assert split.main([]) == 2
    assert "GPU" in capsys.readouterr().err


def test_two_hooks_config_keeps_the_plain_logits():
    from shapes import build_tiny

    model, plain = build_tiny("qwen2"), build_tiny("qwen2")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    handle = split.setup(model, "stream_two_hooks", "all")
    try:
        ring = handle.ring
        assert ring.nlinear == [2] * ring.k and all(len(u.stream_modules) > 2 for u in ring.units)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain(ids).logits)
    finally:
        handle.detach()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
