"""The one set of tiny model shapes every test builds from.

Two architectures cover what the engine must tell apart: ``qwen2`` (GQA, qkv bias, tied
embeddings) and ``llama`` (no bias, untied lm_head). Both have 8 layers, so ``offload="even"``
picks layers 2 and 4 (protect_first=2, protect_last=3). The vocabulary is a parameter: engine tests
use 256 ids, lm-eval tests the bundled SmolLM2 tokenizer's 49152.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ARCHS = ("qwen2", "llama")
LAYERS = 8
VOCAB = 256
TOKENIZER_VOCAB = 49152  # the bundled SmolLM2 tokenizer

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
_ARCH = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "llama": dict(model_type="llama", tie_word_embeddings=False),
}


def tiny_config(arch: str, num_layers: int = LAYERS, vocab_size: int = VOCAB, max_positions: int = 256, **extra):
    """The transformers config of a tiny ``arch`` model."""
    from transformers import AutoConfig

    if arch not in _ARCH:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    values = dict(_COMMON, **_ARCH[arch], num_hidden_layers=num_layers, vocab_size=vocab_size,
                  max_position_embeddings=max_positions, **extra)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def on_tier(tier: str, folder) -> dict:
    """``tier=`` with ``offload_folder=folder`` for a tier that keeps files there (lp_plugin refuses a folder that a
    tier would ignore)."""
    return {"tier": tier, "offload_folder": folder} if tier == "disk" else {"tier": tier}


def build_tiny(arch: str, num_layers: int = LAYERS, seed: int = 0, **config_kw):
    """A seeded random tiny model (fp32, CPU, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, **config_kw)).eval()


def save_tiny(arch: str, folder, *, dtype=None, seed: int = 0, tokenizer_dir=None, **config_kw) -> str:
    """Save a tiny checkpoint (safetensors) into ``folder``, with the tokenizer of ``tokenizer_dir``
    when given (the vocabulary then follows the tokenizer). Written to a temporary sibling and renamed,
    so a folder that exists is complete. Returns the folder."""
    from transformers import AutoTokenizer

    out = Path(folder)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config_kw = dict(config_kw, vocab_size=TOKENIZER_VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=pad)
    model = build_tiny(arch, seed=seed, **config_kw)
    if dtype is not None:
        model = model.to(dtype)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return str(out)
