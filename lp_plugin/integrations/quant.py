"""bitsandbytes 4-bit (NF4) support: the NF4 config, and loading offloaded layers in 4-bit.

transformers keeps host-mapped layers of a 4-bit load unquantized (``llm_int8_enable_fp32_cpu_offload``),
so :class:`Nf4Load` quantizes each offloaded layer itself on the main device, one layer at a time,
with the same ``Params4bit(...).to(device)`` call transformers uses for resident layers (the same
bytes as a plain 4-bit load); ``attach`` then packs it. The offloaded layers are mapped one key per
child (:meth:`OffloadPlan.split_device_map`), because the quantizer matches host-mapped keys without
a boundary and would leave neighbouring resident layers unquantized.
"""

from __future__ import annotations

import copy
import gc
import logging

from ..core import accel
from ..core.absent import is_absent
from ..errors import OffloadSpecError
from ..planning.arch import find_decoder_layers, text_config
from ..planning.footprint import checkpoint_dtype

log = logging.getLogger("lp_plugin")


def nf4_config(compute_dtype=None, double_quant: bool = True, quant_type: str = "nf4"):
    """The bitsandbytes 4-bit config lp_plugin uses by default (NF4, double quant, bf16 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
        bnb_4bit_use_double_quant=double_quant,
    )


class Nf4Load:
    """The adjustments a 4-bit ``from_pretrained`` needs when layers are offloaded (see the module doc)."""

    def __init__(self, hf_config, plan, hf_kwargs: dict):
        self.plan = plan
        self.hf_config = hf_config
        qconfig = hf_kwargs.get("quantization_config")
        if qconfig is not None and getattr(qconfig, "load_in_8bit", False):
            raise OffloadSpecError(
                "8-bit (load_in_8bit) models are not supported; use load_in_4bit (NF4) or a float dtype"
            )
        self.active = (
            qconfig is not None
            and getattr(qconfig, "load_in_4bit", False)
            and plan.main_device.type == "cuda"
            and (bool(plan.selected) or plan.config.embeddings == "host")
        )  # (the CPU backend quantizes host layers)
        self.user_qconfig = qconfig
        self.hf_kwargs = dict(hf_kwargs)
        if self.active:
            qconfig = copy.deepcopy(qconfig)
            qconfig.llm_int8_enable_fp32_cpu_offload = True
            self.hf_kwargs["quantization_config"] = qconfig
            ckpt = checkpoint_dtype(hf_config, {})
            if "dtype" not in hf_kwargs and "torch_dtype" not in hf_kwargs and ckpt is not None:
                # the dtype a plain 4-bit load gives unquantized tensors, explicit so that fp32 cpu
                # offload has nothing to decide
                self.hf_kwargs["dtype"] = ckpt

    def device_map(self, device_map: dict) -> dict:
        return self.plan.split_device_map(device_map) if self.active else device_map

    def finish(self, model) -> None:
        if not self.active:
            return
        # llm_int8_enable_fp32_cpu_offload loads every unquantized module in fp32; a plain 4-bit load
        # keeps them in the checkpoint dtype: cast back (lossless: they came from it)
        ckpt = checkpoint_dtype(self.hf_config, self.hf_kwargs)
        if ckpt is not None:
            _cast_unquantized(model, ckpt)
            if self.plan.config.embeddings == "host":
                _cast_host_ends(model, ckpt)
        if getattr(text_config(self.hf_config), "tie_word_embeddings", False):
            # a plain 4-bit load shares one tensor between lm_head and the embeddings; keep them shared
            model.tie_weights()
        if self.plan.offloaded:
            _quantize_offloaded_layers(model, self.plan, self.user_qconfig, ckpt)
        model.config.quantization_config = self.user_qconfig


def _cast_unquantized(model, dtype):
    """Cast floating parameters that are not 4-bit weights (and not in ``_keep_in_fp32_modules``) to
    ``dtype``. Offloaded layers behind Accelerate hooks sit on ``meta`` and are left alone."""
    import torch.nn as nn

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():
        if (
            type(p) is nn.Parameter
            and p.is_floating_point()
            and p.dtype != dtype
            and p.device.type != "meta"
            and not any(k in name for k in keep)
        ):
            p.data = p.data.to(dtype)


def _cast_host_ends(model, dtype):
    """The input embeddings and the lm_head mapped to "cpu" (``embeddings="host"``) sit behind Accelerate's
    offload hooks, their values (fp32, as for every host-mapped module) in its weights map: cast those to
    ``dtype``, a tied value once (one tensor for both keys)."""
    cast: dict = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)()
        hooks = accel.offload_hooks(module)
        if not hooks:
            continue
        _, held = accel.hooked_values(module, hooks)
        for store, full_key, _ in held:
            value = store[full_key]
            if value.is_floating_point() and value.dtype != dtype:
                store[full_key] = cast.setdefault(id(value), value.to(dtype))


def _quantize_offloaded_layers(model, plan, qconfig, ckpt_dtype=None):
    """Quantize each host-mapped layer to bitsandbytes 4-bit on the device it computes on, one layer at a
    time, leaving its quantized tensors in host memory for ``attach`` to pack."""
    import torch

    layers = plan.offloaded
    _, layer_list = find_decoder_layers(model)
    # transformers keeps host-offloaded layers of a 4-bit model in fp32; a plain 4-bit load quantizes
    # (and keeps norms/biases) in the checkpoint dtype, which a resident layer shows
    resident = [l for j, l in enumerate(layer_list) if j not in set(layers) and not is_absent(l)]
    ref_dtypes = {n: p.dtype for n, p in resident[0].named_parameters()} if resident else {}
    default_dtype = ckpt_dtype or model.get_input_embeddings().weight.dtype
    for i in layers:
        layer, device = layer_list[i], plan.device_of(i)
        hooks = accel.offload_hooks(layer)
        if hooks:
            values, held = accel.hooked_values(layer, hooks)
            values = {
                k: v.to(device=device, dtype=_float_dtype(ref_dtypes.get(k), default_dtype))
                if v.is_floating_point()
                else v.to(device)
                for k, v in values.items()
            }
            accel.take_over(layer, values)  # the hooks are dropped: attach packs the quantized layer
            for store, full_key, _ in held:
                store.pop(full_key, None)  # the unquantized host copy is no longer needed
            del values
        else:
            layer.to(device)
        _to_4bit(layer, i, qconfig)
        layer.to("cpu")  # host copies of the quantized layer for attach() to pack; the device copy is freed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log.debug(
                "lp_plugin: quantized layer %d; %.3f GiB allocated", i, torch.cuda.memory_allocated(device) / 1024**3
            )


def _to_4bit(layer, index, qconfig):
    import bitsandbytes as bnb
    import torch.nn as nn

    skip = list(qconfig.llm_int8_skip_modules or [])
    for name, child in list(layer.named_modules()):
        if not isinstance(child, nn.Linear) or isinstance(child, bnb.nn.Linear4bit):
            continue
        if any(s in f"{index}.{name}" for s in skip):
            continue
        new = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            child.bias is not None,
            qconfig.bnb_4bit_compute_dtype,
            compress_statistics=qconfig.bnb_4bit_use_double_quant,
            quant_type=qconfig.bnb_4bit_quant_type,
            quant_storage=qconfig.bnb_4bit_quant_storage,
            device="meta",
        )
        value = child.weight.data
        new.weight = bnb.nn.Params4bit(value, requires_grad=False, **new.weight.__dict__).to(value.device)
        new.weight.module = new
        if child.bias is not None:
            new.bias = nn.Parameter(child.bias.data, requires_grad=False)
        new.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)


def _float_dtype(reference, default):
    """The dtype a plain 4-bit load gives a floating tensor: the resident layers' (uint8 for a quantized
    weight, so fall back to the checkpoint dtype)."""
    if reference is not None and reference.is_floating_point:
        return reference
    return default
