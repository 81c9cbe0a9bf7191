"""What ``attach`` and ``from_pretrained`` refuse before they load or change anything: a main device nothing can
compute on, an offload folder the tier would not use or cannot write, a layer listed twice, an offloaded layer that
shares a tensor with a module that stays resident, a resident layer without weights, a skip that would run a layer
the model does not hold, a CUDA graph where none can run."""

from __future__ import annotations

import os

from ..core import accel
from ..core.absent import absent_layers
from ..core.devices import check_usable, normalize_device
from ..core.tiers.folder import check_usable as check_folder_usable
from ..errors import AttachError, OffloadSpecError
from ..planning.plan import check_graph_device
from ..planning.plugins import check_folder_tier


def check_options(config, checkpoint=None, device_option: tuple = ("main_device", "main_device='cpu'")) -> None:
    """Refuse what ``config`` asks of this machine and its folders: a ``main_device`` nothing can compute on here,
    an ``offload_folder`` its tier does not use or that cannot hold the layer files (``checkpoint``: the local
    folder the model is loaded from, if any, which the folder must not be). ``device_option``: how the caller
    spells the device option and its CPU fix (a command line: ``("--device", "--device cpu")``)."""
    if config.main_device is not None:
        check_usable(normalize_device(config.main_device), *device_option)
    if config.offload_folder is not None:
        check_offload_folder(config.tier, config.offload_folder, checkpoint)


def check_offload_folder(tier: str, folder, checkpoint=None) -> None:
    """Refuse ``folder`` as ``tier``'s offload folder: a tier that keeps no files, or a folder that cannot hold the
    layer files (``checkpoint``: the model's folder or Hub id, which the folder must not be where it is local)."""
    check_folder_tier(tier, folder)
    local = os.path.expanduser(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    local = local if local is not None and os.path.isdir(local) else None
    check_folder_usable(folder, local)


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


def check_absent(layer_list, config, skips=None) -> None:
    """Layers that hold no weights (skipped when the model was loaded, ``lp_plugin.core.absent``) can only
    be skipped again: refuse a skip that leaves one of them to run, and a skip policy or stand-ins, which
    run every layer on calibration text. ``skips``: the plan's resolved skips, if any."""
    missing = absent_layers(layer_list)
    if not missing:
        return
    if skips is None:
        from ..planning.skipping.resolve import known_before_loading

        skips = known_before_loading(config, len(layer_list))
        if skips is None:
            raise AttachError(
                f"layers {missing} of this model hold no weights (skipped when it was loaded), and "
                f"skip={config.skip!r} with stand_in={config.stand_in!r} runs every layer on calibration text; "
                f"attach with an explicit skip that lists them (skip={missing}) and no stand-in, or load the "
                "model again without skip="
            )
    left = sorted(set(missing) - set(skips.layers))
    if left:
        raise AttachError(
            f"layers {left} of this model hold no weights (skipped when it was loaded) but this skip runs them; "
            f"list them in skip= (e.g. skip={missing}), or load the model again without skip="
        )


def check_graph_decode(plan, config) -> None:
    """Refuse ``decode="graph"`` where no graph can run, before anything is loaded or changed."""
    check_graph_device(config.decode, plan.main_device)
    if config.decode != "graph":
        return
    if not plan.single_device:
        raise OffloadSpecError(
            "decode='graph' captures a decode step on one GPU, and this plan runs layers on several devices; "
            "use decode='eager', or place every layer on one GPU"
        )
    if config.mode == "stream" and plan.offloaded and config.tier == "disk":
        raise OffloadSpecError(
            "decode='graph' with mode='stream' needs the offloaded layers in pinned host memory (tier='cpu'): "
            "a CUDA graph cannot replay the disk tier's file reads; use tier='cpu', mode='session', or "
            "decode='eager'"
        )
