"""Accelerate interop: taking over Accelerate's offload of a layer, and suspending the dispatch hooks
left on modules that compute on the main device.

Hooks are taken off *verbatim*: the module's ``_hf_hook``, ``_old_forward`` and ``forward`` instance
attributes are saved and removed, and put back exactly as they were. Neither Accelerate's
``detach_hook`` nor its ``init_hook`` runs, so the hook objects keep their state (``weights_map``,
``original_devices``, ``tied_params_names``) and restoring is exact.
"""

from __future__ import annotations

import contextlib

from .devices import normalize_device

_HOOK_ATTRS = ("_hf_hook", "_old_forward", "forward")
_MOVE_METHODS = ("to", "cuda", "npu", "xpu", "mlu", "sdaa", "musa", "neuron")  # what dispatch_model wraps


class SuspendedHook:
    """The hook attributes of one module, taken off; :meth:`restore` puts them back."""

    def __init__(self, module, names=_HOOK_ATTRS):
        self.module = module
        self.attrs = {name: module.__dict__.pop(name) for name in names if name in module.__dict__}

    @property
    def hook(self):
        return self.attrs.get("_hf_hook")

    def restore(self) -> None:
        self.module.__dict__.update(self.attrs)


def _hooks_of(module) -> list:
    from accelerate.hooks import SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]


def offload_hooks(layer) -> list:
    """``[(qualified name, submodule, hook)]`` for every Accelerate offload hook inside ``layer``
    (Accelerate puts them on the submodules that own weights, e.g. ``self_attn.q_proj``)."""
    from accelerate.hooks import AlignDevicesHook

    found = []
    for name, sub in layer.named_modules():
        for hook in _hooks_of(sub):
            if isinstance(hook, AlignDevicesHook) and hook.offload:
                found.append((name, sub, hook))
                break
    return found


def hooked_values(layer, hooks) -> tuple:
    """The real values of an Accelerate-offloaded layer, ``{key in layer: host tensor}``, read from the
    hooks' ``weights_map``; and ``[(dict, full key, key)]`` for the entries Accelerate holds in host
    memory (freed while we hold the layer, put back by :func:`give_back`)."""
    values, held = {}, []
    for wm, names in _hooked_names(hooks):
        store = host_store(wm)
        with _reading_to_host(wm):
            for n, key in names:
                values[key] = wm[n]
                if store is not None and wm.prefix + n in store:
                    held.append((store, wm.prefix + n, key))
    return values, held


def _hooked_names(hooks) -> list:
    """``[(weights_map, [(name in the map, key in the layer)])]``: what each offload hook of a layer reads from its
    weights map (its submodule's parameters, and buffers where the hook offloads them)."""
    out = []
    for qual, sub, hook in hooks:
        names = [n for n, _ in sub.named_parameters(recurse=hook.place_submodules)]
        if hook.offload_buffers:
            names += [n for n, _ in sub.named_buffers(recurse=hook.place_submodules)]
        out.append((hook.weights_map, [(n, f"{qual}.{n}" if qual else n) for n in names]))
    return out


@contextlib.contextmanager
def _reading_to_host(weights_map):
    """While values are read: an ``OffloadedWeightsLoader`` that reads files onto its execution device (what
    ``dispatch_model`` makes for modules mapped to "disk") reads them into host memory instead, where lp_plugin
    packs them (a GPU-sized layer at a time would not fit a small card)."""
    dataset = getattr(weights_map, "dataset", None)
    device = getattr(dataset, "device", None)
    if dataset is None or device is None or not hasattr(dataset, "index"):
        yield
        return
    dataset.device = None  # (the loader's own default: the host)
    try:
        yield
    finally:
        dataset.device = device


def host_store(weights_map) -> dict | None:
    """The dict in host memory behind an Accelerate hook's ``weights_map`` (a ``PrefixedDataset``): its
    dataset itself where that is a dict (``cpu_offload``), or the state dict of the
    ``OffloadedWeightsLoader`` that ``dispatch_model`` makes for modules mapped to ``"cpu"``; None where
    the values are read from files only."""
    dataset = getattr(weights_map, "dataset", None)
    if isinstance(dataset, dict):
        return dataset
    state = getattr(dataset, "state_dict", None)
    return state if isinstance(state, dict) else None


def take_over(layer, values: dict) -> list:
    """Suspend Accelerate's hooks inside ``layer`` (its offload hooks, and the hook that moves the
    layer's inputs to where Accelerate would run it: lp_plugin decides that now) and give its meta
    placeholders real ``values`` (new Parameters, as Accelerate itself makes). Returns the suspended hooks."""
    from accelerate.hooks import AlignDevicesHook

    suspended = [
        SuspendedHook(sub)
        for _, sub in layer.named_modules()
        if _hooks_of(sub) and all(isinstance(h, AlignDevicesHook) for h in _hooks_of(sub))
    ]
    _assign(layer, values)
    return suspended


def read_from_files(layer, hooks) -> list:
    """``[(dict, full key, key)]`` for the values of an Accelerate-offloaded layer that its weights maps read from
    files (``dispatch_model``'s "disk"): the dict is the loader's state dict, which its reads look in first, so a
    value put there replaces the file's (how an edit made while lp_plugin held the layer is given back)."""
    found = []
    for wm, names in _hooked_names(hooks):
        state = getattr(getattr(wm, "dataset", None), "state_dict", None)
        if isinstance(state, dict) and hasattr(wm.dataset, "index"):
            found += [(state, wm.prefix + n, key) for n, key in names if wm.prefix + n not in state]
    return found


def give_back(layer, suspended, held, meta_values: dict, host_values: dict, replace_files=()) -> None:
    """Undo :func:`take_over`: meta placeholders for the taken-over tensors, Accelerate's host copies
    (``host_values``, keyed like ``held``) back in its weights maps, the values in ``replace_files`` (entries of
    :func:`read_from_files`: the layer was edited) put where its reads find them before the files, and its hooks
    as they were."""
    _assign(layer, meta_values)
    for store, full_key, key in [*held, *replace_files]:
        store[full_key] = host_values[key]
    for s in suspended:
        s.restore()


def _assign(layer, values: dict) -> None:
    import torch.nn as nn

    for key, value in values.items():
        parent_name, _, attr = key.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if attr in parent._parameters:
            old = parent._parameters[attr]
            parent._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        else:
            parent._buffers[attr] = value


def suspend_dispatch_hooks(model, main_device) -> list:
    """Suspend every Accelerate hook that only aligns devices for a module computing on
    ``main_device`` (what ``dispatch_model`` leaves on every module of a model with host-mapped
    layers): on one device they move nothing, but run on every call of every module."""
    from accelerate.hooks import AlignDevicesHook

    out = []
    for module in model.modules():
        hooks = _hooks_of(module)
        if hooks and all(
            isinstance(h, AlignDevicesHook) and not h.offload and _same(h.execution_device, main_device) for h in hooks
        ):
            out.append(SuspendedHook(module))
    return out


def suspend_move_wrappers(model) -> list:
    """``dispatch_model`` wraps ``model.to``/``model.cuda`` (and the like) to warn that its hooks would
    fight a move. Once no Accelerate device hook is left active on the model, that warning is false
    (lm-eval moves every model it gets): the wrappers are taken off, to be restored by detach."""
    from accelerate.hooks import AlignDevicesHook

    if any(isinstance(h, AlignDevicesHook) for m in model.modules() for h in _hooks_of(m)):
        return []
    names = [n for n in _MOVE_METHODS if hasattr(model.__dict__.get(n), "__wrapped__")]
    return [SuspendedHook(model, names)] if names else []


def _same(execution_device, main_device) -> bool:
    return execution_device is None or normalize_device(execution_device) == main_device
