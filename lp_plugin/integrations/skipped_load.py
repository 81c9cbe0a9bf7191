"""Loading a checkpoint without the decoder layers it skips, and freeing skipped layers once chosen.

Where the skipped layers are known before loading (:func:`lp_plugin.planning.skipping.resolve.known_before_loading`:
an explicit list without stand-ins), :func:`load_without` loads through a subclass of the model's own
class made for the call: its ``post_init`` (the last step of the model's ``__init__``, while every
tensor is still on the meta device) empties those layers (:mod:`lp_plugin.core.absent`), so their
keys are not in the model's state dict and transformers never materializes the checkpoint's tensors
for them (they are unexpected keys, left unread and not reported: the subclass ignores them by a
pattern with a '.' after the index, so layer 1 never matches layers 10-19). The loaded model gets
its own class back. Where the skip needs the loaded model (a policy, stand-ins), :func:`release`
empties the skipped layers after they were chosen and fitted, freeing their device memory and
their host copies.
"""

from __future__ import annotations

import gc
import logging
import re

from ..core import absent
from ..errors import AttachError
from ..planning.arch import find_decoder_layers

log = logging.getLogger("lp_plugin")


def _skipping_class(base: type, prefix: str, layers: tuple) -> type:
    """A subclass of ``base`` whose instances empty ``layers`` at the end of ``__init__`` and whose loading
    leaves their checkpoint keys unreported."""
    # a checkpoint saved from the base model has its keys without the base model's prefix (gpt2: "h.1.attn...")
    base_prefix = getattr(base, "base_model_prefix", "") or ""
    names = [prefix]
    if base_prefix and prefix.startswith(base_prefix + "."):
        names.append(prefix[len(base_prefix) + 1 :])
    pattern = rf"(^|\.)({'|'.join(re.escape(n) for n in names)})\.({'|'.join(str(i) for i in layers)})\."
    ignored = set(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or ()) | {pattern}

    def post_init(self):
        base.post_init(self)
        _, layer_list = find_decoder_layers(self)
        for i in layers:
            absent.empty(layer_list[i], i, absent.NEVER_LOADED)

    # the same name and module as the base class: transformers looks its weight conversions up by class name
    # and treats a class outside its own modules as custom code
    return type(
        base.__name__,
        (base,),
        {
            "post_init": post_init,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_keys_to_ignore_on_load_unexpected": ignored,
        },
    )


def load_without(base: type, name_or_path, prefix: str, layers: tuple, **hf_kwargs):
    """``base.from_pretrained(name_or_path, **hf_kwargs)`` with decoder layers ``layers`` (of the list at
    ``prefix``) never read from the checkpoint. Returns the model, of class ``base``."""
    model = _skipping_class(base, prefix, tuple(sorted(layers))).from_pretrained(name_or_path, **hf_kwargs)
    model.__class__ = base
    _, layer_list = find_decoder_layers(model)
    loaded = [i for i in layers if not absent.is_absent(layer_list[i])]
    if loaded:  # an architecture whose __init__ does not end in post_init(): loaded after all, freed now
        log.warning(
            "lp_plugin: %s does not call post_init(), so skipped layers %s were loaded; they are freed now",
            base.__name__,
            loaded,
        )
        release(model, loaded)
    refuse_saving(model)
    return model


def release(model, layers, device=None) -> list[int]:
    """Empty the skipped ``layers`` of ``model`` that still hold weights (freeing them on the device and
    in host memory, Accelerate's host copies included). Returns the layers emptied."""
    _, layer_list = find_decoder_layers(model)
    todo = [i for i in layers if not absent.is_absent(layer_list[i])]
    for i in todo:
        absent.empty(layer_list[i], i, absent.RELEASED)
    if todo:
        refuse_saving(model)
        gc.collect()
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    return todo


class _RefuseSaving:
    """A model's ``save_pretrained`` while some of its decoder layers hold no weights: a checkpoint saved
    from it would lack those layers (and load with them randomly initialised), so saving is refused."""

    def __init__(self, model):
        _, layer_list = find_decoder_layers(model)
        self.layers = absent.absent_layers(layer_list)

    def __call__(self, *args, **kwargs):
        raise AttachError(
            f"this model holds no weights for decoder layers {self.layers} (skipped when it was loaded), so a "
            "checkpoint saved from it would lack them; load the model again without skip= to save it"
        )


def refuse_saving(model) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) refuse, naming the layers it lacks."""
    model.save_pretrained = _RefuseSaving(model)
