"""``lp_plugin.from_pretrained``: load a checkpoint straight into the offloaded layout.

The model is loaded with an Accelerate device map that puts the resident modules on the main
device and the offloaded layers in host memory, so peak GPU memory while loading is the resident
part (plus one layer for NF4, see below), never the whole model; then :func:`lp_plugin.attach`
takes the offloaded layers over from Accelerate into their tier.

bitsandbytes 4-bit: transformers keeps host-mapped layers unquantized, so each offloaded layer is
quantized here on the main device, one layer at a time, by the same ``Params4bit(...).to(device)``
call transformers uses for resident layers (same bytes as a plain 4-bit load), then packed. The
offloaded layers are mapped one key per child (:func:`bnb_safe_device_map`), because the quantizer
matches host-mapped keys without a boundary and would leave neighbouring resident layers unquantized.
"""

from __future__ import annotations

import copy
import logging

from .errors import OffloadSpecError
from .specs import PROTECT_FIRST, PROTECT_LAST, resolve_layers, validate_alpha, validate_mode, validate_prefetch

log = logging.getLogger("lp_plugin")

_CONFIG_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "gguf_file", "subfolder")


def from_pretrained(
    name_or_path,
    offload="even",
    tier: str = "cpu",
    mode: str = "session",
    alpha: float = 1.0,
    offload_folder=None,
    prefetch: int = 1,
    protect_first: int = PROTECT_FIRST,
    protect_last: int = PROTECT_LAST,
    main_device=None,
    **hf_kwargs,
):
    """Load ``name_or_path`` with ``AutoModelForCausalLM`` into the offloaded layout and attach.

    ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``quantization_config``,
    ``attn_implementation``, ...). The device map is built here: pass ``main_device`` (default
    ``cuda:0`` if there is a GPU, else ``cpu``) rather than ``device_map``. Returns the model; its
    handle is ``lp_plugin.get_handle(model)``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .devicemap import residual_offload_device_map
    from .engine import attach
    from .plugins import get_tier_class

    # fail fast, before any weight is read
    alpha = validate_alpha(alpha)
    validate_mode(mode)
    validate_prefetch(prefetch)
    get_tier_class(tier)
    if tier == "disk" and offload_folder is None:
        raise OffloadSpecError("tier='disk' needs offload_folder=DIR (a folder on a local disk with room for the offloaded layers)")
    if "device_map" in hf_kwargs:
        raise OffloadSpecError(
            "lp_plugin.from_pretrained builds the device map itself; drop device_map= and pass main_device= "
            "(or load the model yourself and call lp_plugin.attach(model, ...))"
        )
    if main_device is None:
        main_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    main = torch.device(main_device)
    if main.type == "cuda" and main.index is None:
        main = torch.device("cuda", 0)
    map_device = main.index if main.type == "cuda" else "cpu"

    config = AutoConfig.from_pretrained(name_or_path, **{k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs})
    device_map = residual_offload_device_map(config, offload, "cpu", map_device, protect_first, protect_last)
    from .arch import num_layers_of

    layers = resolve_layers(offload, num_layers_of(config), protect_first, protect_last)
    qconfig = hf_kwargs.get("quantization_config")
    quantize_here = qconfig is not None and getattr(qconfig, "load_in_4bit", False) and main.type == "cuda" and layers
    if quantize_here:
        user_qconfig = qconfig
        qconfig = copy.deepcopy(qconfig)
        qconfig.llm_int8_enable_fp32_cpu_offload = True
        hf_kwargs = dict(hf_kwargs, quantization_config=qconfig)
        if "dtype" not in hf_kwargs and "torch_dtype" not in hf_kwargs and _checkpoint_dtype(config, {}) is not None:
            # the dtype a plain 4-bit load gives unquantized tensors (the checkpoint's), explicit so
            # that fp32 cpu offload has nothing to decide
            hf_kwargs["dtype"] = _checkpoint_dtype(config, {})
    elif qconfig is not None and getattr(qconfig, "load_in_8bit", False):
        raise OffloadSpecError("8-bit (load_in_8bit) models are not supported; use load_in_4bit (NF4) or a float dtype")

    if quantize_here:
        device_map = bnb_safe_device_map(config, device_map, layers)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, device_map=device_map, **hf_kwargs)
    model.eval()
    if quantize_here:
        # llm_int8_enable_fp32_cpu_offload also loads every unquantized module in fp32; a plain
        # 4-bit load keeps them in the checkpoint dtype: cast back (lossless: they came from it)
        ckpt_dtype = _checkpoint_dtype(config, hf_kwargs)
        if ckpt_dtype is not None:
            _cast_unquantized(model, ckpt_dtype)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "tie_word_embeddings", False):
            # a plain 4-bit load shares one tensor between lm_head and the embeddings; make sure the
            # fp32-offload load (and the cast above) left them shared
            model.tie_weights()
        if alpha > 0:
            _quantize_offloaded_layers(model, layers, user_qconfig, main, ckpt_dtype)
        model.config.quantization_config = user_qconfig
    attach(model, offload=offload, tier=tier, mode=mode, alpha=alpha, offload_folder=offload_folder,
           prefetch=prefetch, protect_first=protect_first, protect_last=protect_last, main_device=main)
    return model


def bnb_safe_device_map(config, device_map, layers) -> dict:
    """``device_map`` with each offloaded layer split into one key per child (``model.layers.2.mlp``).

    Under ``llm_int8_enable_fp32_cpu_offload`` transformers' bitsandbytes quantizer leaves every
    host-mapped key unquantized, and it matches those keys as regex prefixes with no '.' boundary:
    a key ``model.layers.2`` also left the resident ``model.layers.21`` .. ``29`` unquantized (measured
    on an H100, Qwen2.5-3B shape: 5 resident layers in bf16, standby 1.93 GiB instead of 1.38, logits
    off by 0.42). A child key is followed by a name, never a digit, so it matches only its own layer."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .arch import find_decoder_layers

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    prefix, layer_list = find_decoder_layers(skeleton)
    out = dict(device_map)
    for i in layers:
        key = f"{prefix}.{i}"
        device = out.pop(key)
        layer = layer_list[i]
        for name, child in layer.named_children():
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out[f"{key}.{name}"] = device
        for name, _ in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            out[f"{key}.{name}"] = device
    return out


def _checkpoint_dtype(config, hf_kwargs):
    import torch

    dtype = hf_kwargs.get("dtype", hf_kwargs.get("torch_dtype", "auto"))
    if dtype == "auto" or dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _cast_unquantized(model, dtype):
    """Cast floating parameters that are not 4-bit weights (and not in ``_keep_in_fp32_modules``)
    to ``dtype``. Offloaded layers behind Accelerate hooks sit on ``meta`` and are left alone."""
    import torch.nn as nn

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():
        if (type(p) is nn.Parameter and p.is_floating_point() and p.dtype != dtype and p.device.type != "meta"
                and not any(k in name for k in keep)):
            p.data = p.data.to(dtype)


def _quantize_offloaded_layers(model, layers, qconfig, device, ckpt_dtype=None):
    """Quantize each host-mapped layer to bitsandbytes 4-bit on ``device``, one layer at a time,
    leaving its quantized tensors in host memory behind Accelerate's hook as before."""
    import bitsandbytes as bnb
    import torch
    import torch.nn as nn
    from .arch import find_decoder_layers
    from .engine import accelerate_offload_hooks, accelerate_values, release_accelerate

    import gc

    _, layer_list = find_decoder_layers(model)
    skip = list(qconfig.llm_int8_skip_modules or [])
    # transformers keeps host-offloaded layers of a 4-bit model in fp32; a plain 4-bit load
    # quantizes (and keeps norms/biases) in the checkpoint dtype, which a resident layer shows
    reference = next(l for j, l in enumerate(layer_list) if j not in set(layers)) if len(layers) < len(layer_list) else None
    ref_dtypes = {n: p.dtype for n, p in reference.named_parameters()} if reference is not None else {}
    default_dtype = ckpt_dtype or model.get_input_embeddings().weight.dtype
    for i in layers:
        layer = layer_list[i]
        hooks = accelerate_offload_hooks(layer)
        if hooks:
            values, held = accelerate_values(layer, hooks)
            values = {k: v.to(_float_dtype(ref_dtypes.get(k), default_dtype)) if v.is_floating_point() else v
                      for k, v in values.items()}
            release_accelerate(layer, hooks, values, device)
            for store, full_key, _ in held:
                store.pop(full_key, None)  # the unquantized host copy is no longer needed
            del values
        else:
            layer.to(device)
        for name, child in list(layer.named_modules()):
            if not isinstance(child, nn.Linear) or isinstance(child, bnb.nn.Linear4bit):
                continue
            if any(s in f"{i}.{name}" for s in skip):
                continue
            new = bnb.nn.Linear4bit(
                child.in_features, child.out_features, child.bias is not None, qconfig.bnb_4bit_compute_dtype,
                compress_statistics=qconfig.bnb_4bit_use_double_quant, quant_type=qconfig.bnb_4bit_quant_type,
                quant_storage=qconfig.bnb_4bit_quant_storage, device="meta",
            )
            value = child.weight.data
            new.weight = bnb.nn.Params4bit(value, requires_grad=False, **new.weight.__dict__).to(value.device)
            new.weight.module = new
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            new.requires_grad_(False)
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)
        # host copies of the quantized layer for attach() to pack; the device copy is freed
        layer.to("cpu")
        del hooks
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log.debug("lp_plugin: quantized layer %d; %.3f GiB allocated", i, torch.cuda.memory_allocated(device) / 1024**3)


def _float_dtype(reference, default):
    """The dtype a plain 4-bit load gives a floating tensor: the resident layers' (uint8 for a
    quantized weight, so fall back to the checkpoint dtype)."""
    if reference is not None and reference.is_floating_point:
        return reference
    return default
