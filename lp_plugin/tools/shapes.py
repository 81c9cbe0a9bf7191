"""Named model shapes: real architecture config values with seeded random weights.

Speed and memory do not depend on weight values, so ``lp-bench --model qwen2.5-3b-shape`` measures
Qwen2.5-3B without downloading it. ``build_shape_model`` builds the model straight on the target
device in the target dtype (no fp32, full-size detour on the host), seeded, so two builds with the
same seed on the same device type are identical.

Shapes: ``qwen2.5-3b-shape`` (Qwen2.5-3B), ``llama-3-8b-shape`` (Meta-Llama-3-8B) and
``smollm2-135m-shape`` (SmolLM2-135M, Llama). Any checkpoint folder (a saved shape, a real model) loads
plainly through :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import tempfile

from ..integrations.quant import nf4_config

# Values copied from the models' config.json on the Hub (Qwen/Qwen2.5-3B, meta-llama/Meta-Llama-3-8B,
# HuggingFaceTB/SmolLM2-135M).
SHAPES: dict = {
    "qwen2.5-3b-shape": {
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 36,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "llama-3-8b-shape": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "smollm2-135m-shape": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


def shape_names() -> list:
    return sorted(SHAPES)


def is_shape(name) -> bool:
    return isinstance(name, str) and name in SHAPES


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model (None when it can): it must be a shape, a folder, or a Hub id
    ``owner/name``. Checked before anything is sent to the Hub, so a typo fails at once (a Hub
    lookup without network retries for ~20 s) and names the closest shape."""
    if is_shape(name) or os.path.isdir(os.path.expanduser(name)):
        return None
    close = difflib.get_close_matches(name, shape_names(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    what = f"neither a shape ({', '.join(shape_names())}), a model folder nor a Hub id (owner/name)"
    if name.startswith(("/", ".", "~")) or os.path.exists(name) or not _HUB_ID.fullmatch(name):
        return f"{name!r} is {what}; {hint}pass a shape name, a folder holding config.json, or owner/name"
    return None


def shape_config(name: str):
    """The transformers config of a named shape (a fresh object each call)."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known shapes: {', '.join(shape_names())}")
    from transformers import AutoConfig

    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def torch_dtype(dtype):
    """The torch dtype of ``bf16``/``fp16``/``fp32`` (and their long names; a torch dtype passes through)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    from lp_plugin.planning.footprint import DTYPES as table

    if dtype not in table:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32 (nf4 loads a checkpoint with load_checkpoint)"
        )
    return table[dtype]


@contextlib.contextmanager
def _fork_rng(device):
    """Seed inside a block without disturbing the caller's global RNG state."""
    import torch

    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


def build_shape_model(name: str, dtype="bf16", device="cpu", seed: int = 0):
    """Build the named shape with seeded random weights directly on ``device`` in ``dtype``.

    Parameters are created on the device in the requested dtype (``torch.device`` context plus
    transformers' dtype context), so a 3B bf16 model on a GPU never exists in fp32 or on the host.
    Returns the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..planning.plan import normalize_device

    device = normalize_device(device)
    config = shape_config(name)
    with _fork_rng(device):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    model.config.name_or_path = name
    model.name_or_path = name
    return model


def scratch_dir():
    """Where temporary checkpoints go: ``/dev/shm`` (RAM, no disk round-trip) when it is writable,
    else None (the system's temporary folder)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def save_shape_checkpoint(name: str, folder, dtype="bf16", device="cpu", seed: int = 0):
    """Build the named shape (as :func:`build_shape_model`) and save it as safetensors into ``folder``.
    Returns the model (still on ``device``)."""
    model = build_shape_model(name, dtype, device, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def load_checkpoint(path, dtype="bf16", device="cpu"):
    """Load a checkpoint plainly onto one device (``dtype`` bf16/fp16/fp32, or nf4: bitsandbytes
    4-bit with bf16 compute, the way ``load_in_4bit`` users get it). Eval mode, no gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..planning.plan import map_value, normalize_device

    kwargs = (
        {"dtype": torch.bfloat16, "quantization_config": nf4_config(torch.bfloat16)}
        if dtype == "nf4"
        else {"dtype": torch_dtype(dtype)}
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), device_map={"": map_value(normalize_device(device))}, **kwargs
    )
    model.eval()
    model.requires_grad_(False)
    return model


def build_shape_model_nf4(name: str, device="cpu", seed: int = 0, tmp_dir=None):
    """The named shape, seeded random-init in bf16, then quantized to NF4 the way users get it.

    The bf16 model is saved as safetensors to a temporary folder (:func:`scratch_dir`) and loaded
    back with :func:`load_checkpoint`, so the result is exactly what ``load_in_4bit`` gives for a real
    checkpoint (``is_loaded_in_4bit``, ``hf_quantizer``, ``Linear4bit`` modules, tied lm_head kept in
    bf16). Works on CPU (bitsandbytes CPU backend) and CUDA.
    """
    import gc

    import torch

    folder = tempfile.mkdtemp(prefix=f"lp-shape-{name}-", dir=tmp_dir or scratch_dir())
    try:
        save_shape_checkpoint(name, folder, "bf16", device, seed)  # the bf16 model is dropped right away
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_checkpoint(folder, "nf4", device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    model.config.name_or_path = name
    model.name_or_path = name
    return model
