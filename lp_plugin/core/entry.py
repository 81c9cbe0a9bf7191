"""How lp_plugin hooks into the model object itself (the layers get Accelerate hooks, see ``hooks.py``):

* a forward pre-hook and an always-called forward hook on the module that runs the decoder layers
  open and close a session around a bare forward through the session gate (exception-safe, and a no-op
  while compiling: a compiled forward runs inside the session that ``generate`` opened); the hook also
  ends the forward with each mover's ``end_forward`` (stream mode: the ring's join). PyTorch skips that
  hook on a KeyboardInterrupt: the gate closes such a forward as the interrupt leaves ``generate``, or
  before the thread's next forward, session or ``detach`` (``SessionGate.close_interrupted``);
* ``generate`` is wrapped so one call is one session (not one per decode step);
* ``_apply`` of the offloaded layers (and of the embeddings kept in host memory, ``host_embeddings.py``) and their
  ancestors checks a conversion first: a move to the
  main device is a no-op for layers lp_plugin keeps (so ``model.to(device)``, as lm-eval calls it,
  works), a cast or a move elsewhere of the tensors lp_plugin keeps (offloaded layers and stand-ins) is
  refused before any module changes.

Everything here is undone by :meth:`ModelEntry.remove`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

from ..errors import AttachError
from .group import execution_order, offloaded_dtypes


class ModelEntry:
    def __init__(self, gate, model, base, layers, stand_ins, main_device, ancestors, host_embeddings=None):
        self.gate = gate  # the session gate (first attribute: a deep copy reaches it first)
        self.model = model
        self.base = base  # the module whose forward runs the decoder layers (model.model for Qwen2/Llama)
        self.units = execution_order(layers, stand_ins)  # every unit on a tier: what a conversion must not change
        self.main_device = main_device
        # modules whose tensors lp_plugin keeps: the offloaded layers, and the embeddings kept in host memory
        offloaded_modules = [layer.module for layer in layers] + (
            [host_embeddings.embed, host_embeddings.head] if host_embeddings else []
        )
        self.offloaded = set(map(id, offloaded_modules))
        self.guarded = offloaded_modules + list(ancestors)
        self.kept_dtypes = (
            host_embeddings.dtypes() if host_embeddings else set()
        )  # their dtypes: a cast must not change them
        self._torch_hooks = []
        self._had_generate = False

    def install(self) -> None:
        gate = self.gate

        def pre(module, args):
            if not torch.compiler.is_compiling():
                gate.enter_forward(sys._getframe(1))  # (the module call running this forward)

        def post(module, args, output):
            try:
                gate.end_forward(output)
            finally:
                if not torch.compiler.is_compiling():
                    gate.exit_forward()

        self._torch_hooks = [
            self.base.register_forward_pre_hook(pre),
            self.base.register_forward_hook(post, always_call=True),
        ]
        if hasattr(self.model, "generate"):
            self._had_generate = "generate" in self.model.__dict__
            self._saved_generate = self.model.__dict__.get("generate")
            original = self.model.generate

            @functools.wraps(original)
            def generate(*args, **kwargs):
                try:
                    with gate.session():
                        return original(*args, **kwargs)
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # a Ctrl-C inside a forward skipped the hook that closes it
                        with contextlib.suppress(Exception):  # (the interrupt, not a refusal it met, goes on)
                            gate.close_interrupted()
                    raise

            self.model.generate = generate
        for module in self.guarded:
            module._apply = types.MethodType(functools.partial(_guarded_apply, self), module)

    def remove(self) -> None:
        for h in self._torch_hooks:
            h.remove()
        self._torch_hooks = []
        if hasattr(self, "_saved_generate"):
            if self._had_generate:
                self.model.generate = self._saved_generate
            else:
                self.model.__dict__.pop("generate", None)
        for module in self.guarded:
            module.__dict__.pop("_apply", None)

    def check_conversion(self, fn) -> None:
        """Refuse ``fn`` (what ``Module._apply`` is about to run on every tensor) if it would cast an
        offloaded tensor (or one of the embeddings kept in host memory) or move it off the main device. Probed
        on an empty tensor per device and dtype."""
        offloaded = [
            (device, offloaded_dtypes(self.units), "offloaded layers'", f" on {device}")
            for device in {unit.device for unit in self.units} or {self.main_device}
        ]
        kept = [(self.main_device, self.kept_dtypes, "input embeddings' and lm_head's", " kept in host memory")]
        for device, dtypes, whose, where in offloaded + kept:
            for dtype in dtypes:
                probe = fn(torch.empty(0, dtype=dtype, device=device))
                if probe.dtype != dtype or probe.device != device:
                    raise AttachError(
                        f"this conversion would turn the {whose} {dtype} tensors{where} into {probe.dtype} on "
                        f"{probe.device}; lp_plugin keeps those tensors itself: lp_plugin.get_handle(model).detach() "
                        "first, convert the model, then attach again"
                    )


def _guarded_apply(entry, module, fn, *args, **kwargs):
    entry.check_conversion(fn)
    if id(module) in entry.offloaded:
        return module  # its tensors stay where lp_plugin keeps them; they compute on the main device
    return type(module)._apply(module, fn, *args, **kwargs)
