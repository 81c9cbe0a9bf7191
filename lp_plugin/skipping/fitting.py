"""Fitting the stand-ins of a set of skipped layers, in order, and caching them.

The stand-in of the first skipped layer is fitted on the plain model's hidden states at that layer;
each later one on the hidden states the model produces with every earlier skipped layer already
replaced by its fitted stand-in (what it will really see once attached). Targets are always the
plain model's hidden states after the layer (see :mod:`lp_plugin.skipping.standins`).

Fitted tensors are cached as one safetensors file per (model weights, calibration tokens, stand-in
kind, skipped layers), verified by SHA-256 before use; a file that fails verification is refitted
with a warning.
"""

from __future__ import annotations

import torch

from ..progress import bar
from . import cache, standins
from .metrics import SkipContext

def _split(tensors: dict) -> dict:
    """``{"12.weight": t}`` -> ``{12: {"weight": t}}``."""
    out = {}
    for name, t in tensors.items():
        layer, _, param = name.partition(".")
        out.setdefault(int(layer), {})[param] = t
    return out


def _fit_in_order(ctx: SkipContext, layers) -> tuple:
    """``({layer: {name: float32 tensor}}, {layer: fit details})`` fitted in layer order."""
    spec, runner = ctx.stand_in, ctx.runner
    teacher = ctx.teacher_layers([layers[0]] + [s + 1 for s in layers])
    fitted, details, replace = {}, {}, {}
    prev = layers[0]
    states = teacher[prev]
    for s in bar(layers, desc=f"fitting {spec} stand-ins", unit="layer"):
        states = runner.advance(states, prev, s, replace)
        tensors, details[s] = standins.fit(spec, states, teacher[s + 1])
        fitted[s] = {k: v.to(torch.float32) for k, v in tensors.items()}
        dtype, device = states[0].dtype, states[0].device
        replace[s] = standins.build(spec, {k: v.to(device, dtype) for k, v in tensors.items()})
        prev = s
    return fitted, details


def fit_stand_ins(ctx: SkipContext, layers) -> tuple:
    """``({layer: stand-in module on the CPU, in the model's dtype}, info)`` for the skipped
    ``layers`` with ``ctx.stand_in`` (none: no stand-ins)."""
    layers = sorted(layers)
    spec = ctx.stand_in
    if spec.kind == "none" or not layers:
        return {}, {}
    key = ctx.key(kind="standins", stand_in=str(spec), layers=layers)
    cached = cache.load_tensors("standins", key, f"{spec} stand-ins of layers {layers}")
    if cached is not None:
        flat, info = cached
        fitted = _split(flat)
        info = {**info, "cached": True}
    else:
        fitted, details = _fit_in_order(ctx, layers)
        info = {"fit": {str(k): v for k, v in details.items()}}
        cache.save_tensors("standins", key, {f"{i}.{k}": v for i, t in fitted.items() for k, v in t.items()}, info)
        info = {**info, "cached": False}
    dtype = ctx.model.get_input_embeddings().weight.dtype  # the hidden states' dtype
    modules = {i: standins.build(spec, {k: v.to("cpu", dtype) for k, v in fitted[i].items()}) for i in layers}
    info["params"] = {str(i): sum(p.numel() for p in m.parameters()) for i, m in modules.items()}
    return modules, info
