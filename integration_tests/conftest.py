"""Shared fixtures: tiny hand-built Qwen2 / Llama checkpoints saved to real folders, and the device
the engine tests run on (CUDA when there is one, so the GPU machine runs the same table with
streams; CPU otherwise)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config(arch: str, num_layers: int = 8):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise ValueError(arch)


def build_tiny(arch: str, num_layers: int = 8, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> folder of a saved bf16 tiny checkpoint."""
    import torch

    out = {}
    for arch in ("qwen2", "llama"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        build_tiny(arch).to(torch.bfloat16).save_pretrained(folder)
        out[arch] = str(folder)
    return out


@pytest.fixture(scope="session")
def device():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
