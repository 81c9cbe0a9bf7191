"""Skipped decoder layers whose weights the model does not hold.

``from_pretrained`` with a skip known before loading empties each skipped layer before transformers
reads the checkpoint, so its tensors are never read; a skip decided on the loaded model (a policy, a
stand-in fit) empties the skipped layers once it is resolved, freeing their weights on the device and
in host memory. An emptied layer stays in the decoder list (indices, the hooks transformers put on
it, its plain attributes such as ``attention_type`` stay as they were) but holds no submodule,
parameter or buffer, and its class becomes a subclass of its own whose ``forward`` raises
:class:`AttachError`: while attached a :class:`~lp_plugin.core.hooks.SkipHook` runs instead, and after
``detach()`` calling it says why it cannot run.
"""

from __future__ import annotations

import threading

from ..errors import AttachError

_ACCELERATE_ATTRS = ("_hf_hook", "_old_forward", "forward")  # what Accelerate's add_hook_to_module sets
NEVER_LOADED = "never loaded"  # skipped before loading: the checkpoint's tensors were never read
RELEASED = "released"  # loaded to choose the layers or fit their stand-ins, then freed

_classes: dict[type, type] = {}
_lock = threading.Lock()


def _absent_forward(self, *args, **kwargs):
    raise AttachError(
        f"decoder layer {self._lp_absent_index} holds no weights: it was skipped when the model was loaded "
        f"({self._lp_absent_how}); attach with a skip that lists it (lp_plugin.attach(model, skip=...)), or load "
        "the model again without skip= to run every layer"
    )


def _extra_repr(self) -> str:
    return f"skipped layer {self._lp_absent_index}, weights {self._lp_absent_how}"


def _reduce_ex(self, protocol):
    """Pickling (``torch.save``, ``copy.deepcopy``) by the layer's own class, which pickle can find by name:
    the emptied class is made at run time and is made again when the layer is loaded."""
    return _rebuild, (type(self).__mro__[1],), self.__dict__.copy()


def _rebuild(cls: type):
    made = _absent_class(cls)
    return object.__new__(made)


def _absent_class(cls: type) -> type:
    """The class an emptied layer of class ``cls`` takes (one per class, made once)."""
    with _lock:
        made = _classes.get(cls)
        if made is None:
            made = type(
                f"Skipped{cls.__name__}",
                (cls,),
                {
                    "__module__": __name__,
                    "__doc__": f"A skipped {cls.__name__} that holds no weights (lp_plugin.core.absent).",
                    "forward": _absent_forward,
                    "extra_repr": _extra_repr,
                    "__reduce_ex__": _reduce_ex,
                    "_lp_absent": True,
                },
            )
            _classes[cls] = made
        return made


def is_absent(layer) -> bool:
    return bool(getattr(type(layer), "_lp_absent", False))


def absent_layers(layer_list) -> list[int]:
    """Indices of the layers of ``layer_list`` that hold no weights."""
    return [i for i, layer in enumerate(layer_list) if is_absent(layer)]


def _drop_accelerate_values(layer) -> None:
    """Take the layer's entries out of the host weights maps of Accelerate's offload hooks (without
    reading them: a disk-backed map is never touched), so nothing keeps its host copies alive."""
    from . import accel

    for _, sub, hook in accel.offload_hooks(layer):
        wm = hook.weights_map
        store = accel.host_store(wm)
        if store is None:
            continue
        names = [n for n, _ in sub.named_parameters(recurse=hook.place_submodules)]
        names += [n for n, _ in sub.named_buffers(recurse=hook.place_submodules)]
        for n in names:
            store.pop(wm.prefix + n, None)


def empty(layer, index: int, how: str) -> None:
    """Make ``layer`` (decoder layer ``index``) hold no weights: Accelerate's hooks inside it and its
    host copies are dropped, its submodules, parameters and buffers removed, and its class turned into
    :func:`_absent_class` of its own. ``how`` says what happened to the weights (:data:`NEVER_LOADED`,
    :data:`RELEASED`)."""
    if is_absent(layer):
        return
    _drop_accelerate_values(layer)
    for sub in layer.modules():  # the hooks are taken off verbatim: no detach_hook runs (it would load weights)
        for name in _ACCELERATE_ATTRS:
            sub.__dict__.pop(name, None)
    layer._modules.clear()
    layer._parameters.clear()
    layer._buffers.clear()
    layer._non_persistent_buffers_set.clear()
    layer._lp_absent_index = index
    layer._lp_absent_how = how
    layer.__class__ = _absent_class(type(layer))
