"""What ``attach`` refuses before it changes anything: a layer listed twice, an offloaded layer that
shares a tensor with a module that stays resident, a resident layer without weights."""

from __future__ import annotations

from ..core import accel
from ..errors import AttachError


def check_model(model, plan, layer_list):
    """Refuse what attach cannot follow, before anything changes."""
    chosen = set(plan.selected)
    counts = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    for i, layer in enumerate(layer_list):
        if i in chosen and counts[id(layer)] > 1:
            raise AttachError(
                f"layer {i} appears more than once in the model (the same module object twice); "
                "lp_plugin cannot offload a shared layer: leave it resident (offload=... without it)"
            )
        if i in plan.offloaded:
            continue
        if any(p.device.type == "meta" for p in layer.parameters()) and not accel.offload_hooks(layer):
            raise AttachError(
                f"resident layer {i} has parameters on the meta device; load the model's weights before attaching"
            )
    check_not_shared(model, [layer_list[i] for i in plan.offloaded], plan.offloaded)


def check_not_shared(model, modules, indices):
    """An offloaded layer must own its tensors: one shared with a module that stays resident would be
    moved under that module's feet (the same Parameter, or another one over the same memory)."""
    names = {id(m): n for n, m in model.named_modules()}
    owners = {}  # id(param) or storage pointer -> (layer index, its name inside the layer, layer prefix)
    for i, module in zip(indices, modules):
        for name, p in module.named_parameters(remove_duplicate=False):
            owner = (i, name, names[id(module)] + ".")
            owners[id(p)] = owner
            if p.device.type != "meta" and p.numel():
                owners[("ptr", p.device, p.data_ptr())] = owner
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = owners.get(id(p))
        if owner is None and p.device.type != "meta" and p.numel():
            owner = owners.get(("ptr", p.device, p.data_ptr()))
        if owner is not None and not name.startswith(owner[2]):
            raise AttachError(
                f"offloaded layer {owner[0]} shares its parameter {owner[1]} with {name}; lp_plugin cannot offload a "
                "tensor another module uses: leave that layer resident, or untie the parameter first"
            )
