"""Accelerate ``ModelHook``s on offloaded and dropped decoder layers and on stand-ins, and how they are
added and removed by name. Each hook is a thin caller of a mover or of the session gate (``gate.py``) and owns
its own setup and teardown:

* :class:`SessionHook` (session mode): refuses to run a unit (an offloaded layer or a stand-in) whose
  weights are not resident.
* :class:`StreamHook` (stream mode): takes the unit's weights from the ring before its forward
  and hands the slot back after it.
* :class:`ResidualHook` (``0 < alpha < 1``): the output ``L(x)`` becomes ``x + alpha * (L(x) - x)``;
  at ``alpha == 1`` nothing touches the output, so it is ``L(x)`` bit for bit.
* :class:`SkipHook` (``alpha == 0``): the layer is not run; its output is its input.

Hooks are chained after any hook already on the module (``add_hook_to_module(..., append=True)``)
and removed without disturbing the others. Every hook keeps a reference to the session gate, so
``copy.deepcopy`` of an attached model reaches the gate and gets its clear error.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module

from ..errors import AttachError
from . import ops  # noqa: F401  (registers the torch.ops.lp_plugin ops the hooks call)

PREFIX = "lp_plugin."


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class _Hook(ModelHook):
    name = ""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate  # the session gate (first attribute: a deep copy reaches it first)


class _GradGuard:
    """Gradients through an offloaded layer (for its weights, or for what came before it) are right
    only while its weights stay where the forward read them: a backward that reaches the layer raises
    unless the session that ran the forward is still open (session mode; stream mode reuses the ring
    at once)."""

    gate: Any  # the session gate (set by _Hook)

    def _guard(self, unit, output):
        if not torch.is_grad_enabled():
            return
        out = _first(output)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(_backward_check, self.gate, self.gate.grad_token(), unit.index))


def _backward_check(gate, token, index, grad):
    if token is None or not gate.grad_token_valid(token):
        raise AttachError(
            f"backward reached offloaded layer {index} after its weights left the device, so its gradients would be "
            "wrong; in mode='session' run forward and backward inside one `with lp_plugin.session(model):` block "
            "(stream mode does not support gradients), or detach() before training. The layers after it already hold "
            "this backward's gradients: zero them (model.zero_grad()) before the next"
        )
    return grad


class SessionHook(_Hook, _GradGuard):
    name = PREFIX + "session"

    def __init__(self, gate, unit):
        super().__init__(gate)
        self.unit = unit  # the offloaded layer or stand-in whose module the hook is on

    def pre_forward(self, module, *args, **kwargs):
        if not self.gate.in_session:
            raise AttachError(
                f"offloaded layer {self.unit.index} was called outside a session, so its weights are not on "
                "the device; call the model itself, or wrap the call in `with lp_plugin.session(model):`"
            )
        return args, kwargs

    def post_forward(self, module, output):
        self._guard(self.unit, output)
        return output


class StreamHook(_Hook, _GradGuard):
    """On each Linear module of a streamed layer: before the layer's first one runs, wait for the
    layer's ring slot; after its last one, free the slot. Through the ops of ``ops.py`` when compiling
    (a compiled forward keeps them at the Linear modules' inputs and outputs, kernel boundaries
    already), by direct calls otherwise (the ops' dispatch costs ~15 us a call in a launch-bound decode)."""

    name = PREFIX + "stream"

    def __init__(self, gate, ring, position: int):
        super().__init__(gate)
        self.ring = ring
        self.position = position  # index of the unit among the ring's units, in execution order

    def pre_forward(self, module, *args, **kwargs):
        if self.ring.enter(self.position):
            if torch.compiler.is_compiling():
                torch.ops.lp_plugin.ring_wait(args[0] if args else kwargs["input"], self.ring.id, self.position)
            else:
                self.ring.wait(self.position)
        return args, kwargs

    def post_forward(self, module, output):
        if self.ring.leave(self.position):
            if torch.compiler.is_compiling():
                torch.ops.lp_plugin.ring_done(_first(output), self.ring.id, self.position)
            else:
                self.ring.done(self.position)
            self._guard(self.ring.units[self.position], output)
        return output


class DeviceHook(_Hook):
    """On an offloaded layer of a model spread over several devices: its inputs move to the device it
    computes on (what Accelerate's hook on that layer did before lp_plugin took the layer over)."""

    name = PREFIX + "device"

    def __init__(self, gate, device, skip_keys=None):
        super().__init__(gate)
        self.device = device
        self.skip_keys = skip_keys

    def pre_forward(self, module, *args, **kwargs):
        from accelerate.utils import send_to_device

        return send_to_device(args, self.device), send_to_device(kwargs, self.device, skip_keys=self.skip_keys)


class ResidualHook(_Hook):
    """``out = x + alpha * (L(x) - x)`` for the layer's hidden states, shape [batch, seq, hidden]."""

    name = PREFIX + "residual"

    def __init__(self, gate, alpha: float):
        super().__init__(gate)
        self.alpha = alpha
        self._inputs: list = []  # a stack: a layer may be re-entered (gradient checkpointing)

    def pre_forward(self, module, *args, **kwargs):
        self._inputs.append(_hidden_states(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        x = self._inputs.pop()
        if isinstance(output, tuple):
            return (torch.lerp(x.to(output[0].dtype), output[0], self.alpha),) + tuple(output[1:])
        return torch.lerp(x.to(output.dtype), output, self.alpha)


class SkipHook(_Hook):
    """The layer is not run: while the hook is on, Accelerate's wrapper calls :func:`skip_forward`
    instead of the layer's own forward (swapped in ``init_hook``, swapped back in ``detach_hook``),
    which runs the layer's stand-in if it has one."""

    name = PREFIX + "skip"

    def __init__(self, gate, stand_in=None):
        super().__init__(gate)
        self.stand_in = stand_in

    def init_hook(self, module):
        self._forward = module._old_forward
        module._old_forward = functools.partial(skip_forward, self.stand_in)
        return module

    def detach_hook(self, module):
        module._old_forward = self._forward
        return module


def skip_forward(stand_in, hidden_states=None, *args, **kwargs):
    """The forward of a dropped layer: its input (``x + 0 * (L(x) - x)``), or what its stand-in makes of it."""
    x = kwargs["hidden_states"] if hidden_states is None else hidden_states
    return x if stand_in is None else stand_in(x)


# -------------------------------------------------------------------------------- registration by name
def _chain(module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]


def add(module, hook) -> None:
    """Chain ``hook`` after the hooks already on ``module``."""
    add_hook_to_module(module, hook, append=True)


def names(module) -> list:
    return [getattr(h, "name", type(h).__name__) for h in _chain(module)]


def remove(module: torch.nn.Module) -> None:
    """Remove lp_plugin's hooks from ``module`` (each runs its own ``detach_hook``); any other hook
    stays on, untouched."""
    chain = _chain(module)
    ours = [h for h in chain if isinstance(h, _Hook)]
    if not ours:
        return
    others = [h for h in chain if not isinstance(h, _Hook)]
    if not others:
        remove_hook_from_module(module)
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
            del module.forward  # the class's own forward again, as before any hook
        return
    for hook in reversed(ours):
        hook.detach_hook(module)
    module._hf_hook = others[0] if len(others) == 1 else SequentialHook(*others)
