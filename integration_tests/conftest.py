"""Shared fixtures: tiny hand-built Qwen2 / Llama checkpoints saved to real folders, and the device
the engine tests run on (CUDA when there is one, so the GPU machine runs the same table with
streams; CPU otherwise)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from shapes import build_tiny, save_tiny, tiny_config  # noqa: E402,F401  (re-exported for the test modules)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> folder of a saved bf16 tiny checkpoint."""
    import torch
    from shapes import ARCHS

    return {arch: save_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}") / "ckpt", dtype=torch.bfloat16) for arch in ARCHS}


@pytest.fixture(scope="session")
def device():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU spinning threads slow them 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
