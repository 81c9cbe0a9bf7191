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


SKIP_LAYERS = 12  # layer 1 and layers 10, 11: a prefix without a '.' boundary would take them together


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """lp_plugin's cache (stand-ins, skip choices) in the test's own folder."""
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def skip_checkpoint(tmp_path_factory):
    """A 12-layer tiny Qwen2 in float32 (safetensors, no tokenizer), for loading with skipped layers."""
    from shapes import save_tiny

    return save_tiny(
        "qwen2", tmp_path_factory.mktemp("skipload") / "ckpt", num_layers=SKIP_LAYERS, initializer_range=0.2, bos_token_id=0
    )
