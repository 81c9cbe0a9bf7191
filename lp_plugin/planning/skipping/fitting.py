"""Fitting the stand-ins of a set of skipped layers, in order, and caching them.

The stand-in of the first skipped layer is fitted on the plain model's hidden states at that layer;
each later one on the hidden states the model produces with every earlier skipped layer already
replaced by its fitted stand-in (what it will really see once attached). Targets are always the
plain model's hidden states after the layer (see :mod:`lp_plugin.planning.skipping.standins`).

Fitted tensors are cached as one safetensors file per (model weights, calibration tokens, stand-in
kind, skipped layers), verified by SHA-256 and by structure (exactly the expected tensors of every
layer, their shapes, float32, finite values; fit details of every layer) before use; a file that
fails verification is refitted with a warning.
"""

from __future__ import annotations

import math

import torch

from ...core.progress import bar
from . import cache, standins
from .metrics import SkipContext
from .runner import Replacement


def _split(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{"12.weight": t}`` -> ``{12: {"weight": t}}``."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        layer, _, param = name.partition(".")
        out.setdefault(int(layer), {})[param] = t
    return out


def expected_shapes(spec, hidden: int) -> dict:
    """``{tensor name: shape}`` of one stand-in of ``spec`` for hidden size ``hidden``."""
    if spec.kind == "mean":
        return {"bias": (hidden,)}
    if spec.rank is None or spec.rank >= hidden:
        return {"bias": (hidden,), "weight": (hidden, hidden)}
    return {"bias": (hidden,), "down": (spec.rank, hidden), "up": (hidden, spec.rank)}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_cached(spec, layers, hidden: int):
    """A check for a cached ``(tensors, info)``: ValueError unless it holds exactly the tensors of
    ``spec``'s stand-ins of ``layers`` (names, shapes, float32, finite) and fit details for each."""
    shapes = expected_shapes(spec, hidden)
    want = {f"{i}.{name}": shape for i in layers for name, shape in shapes.items()}

    def check(cached) -> None:
        tensors, info = cached
        if set(tensors) != set(want):
            raise ValueError(f"it holds tensors {sorted(tensors)[:6]}, not the expected {sorted(want)[:6]}")
        for name, t in tensors.items():
            if tuple(t.shape) != want[name] or t.dtype != torch.float32:
                raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, not float32 {want[name]}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds values that are not finite")
        fit = info.get("fit")
        if not isinstance(fit, dict) or set(fit) != {str(i) for i in layers}:
            raise ValueError("its fit details do not name the skipped layers")
        for details in fit.values():
            if not isinstance(details, dict) or not all(_finite(v) for v in details.values()):
                raise ValueError("its fit details are not finite numbers")
        if set(info) - {"fit"}:
            raise ValueError(f"its fit details hold unknown fields {sorted(set(info) - {'fit'})}")

    return check


def _fit_in_order(
    ctx: SkipContext, layers: list[int]
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict[str, float]]]:
    """``({layer: {name: float32 tensor}}, {layer: fit details})`` fitted in layer order."""
    spec, runner = ctx.stand_in, ctx.runner
    teacher = ctx.teacher_layers([layers[0]] + [s + 1 for s in layers])
    fitted: dict[int, dict[str, torch.Tensor]] = {}
    details: dict[int, dict[str, float]] = {}
    replace: dict[int, Replacement] = {}
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
    hidden = ctx.model.get_input_embeddings().weight.shape[1]
    check = check_cached(spec, layers, hidden)
    cached = cache.load_tensors("standins", key, f"{spec} stand-ins of layers {layers}", check)
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
