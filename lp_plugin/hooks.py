"""Accelerate ``ModelHook`` subclasses installed on offloaded decoder layers. Each does one thing:

* :class:`ResidualHook` turns the layer's output ``L(x)`` into ``x + alpha * (L(x) - x)``
  (installed only for ``0 < alpha < 1``; at ``alpha == 1`` nothing touches the output, so the
  result is ``L(x)`` bit for bit).
* :class:`SessionGuardHook` (session mode) refuses to run a layer outside a session.
* :class:`StreamHook` asks the stream engine for the layer's weights before the forward and hands
  its GPU slot back after it.

They are chained after any hook already there with ``add_hook_to_module(..., append=True)``.
Dropped layers (``alpha == 0``) are not hooked: their ``forward`` is replaced by
:func:`skip_forward`, so they are never run and their weights never move.
"""

from __future__ import annotations

import torch
from accelerate.hooks import ModelHook


def _hidden_states_arg(args, kwargs):
    if args:
        return args[0]
    return kwargs["hidden_states"]


class ResidualHook(ModelHook):
    """``out = x + alpha * (L(x) - x)`` for the layer's hidden states, shape [batch, seq, hidden]."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha
        self._inputs = []  # stack: a layer may be re-entered (e.g. gradient checkpointing)

    def pre_forward(self, module, *args, **kwargs):
        self._inputs.append(_hidden_states_arg(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        x = self._inputs.pop()
        if isinstance(output, tuple):
            return (torch.lerp(x.to(output[0].dtype), output[0], self.alpha),) + tuple(output[1:])
        return torch.lerp(x.to(output.dtype), output, self.alpha)


class StreamHook(ModelHook):
    """Bind the layer to a GPU ring slot before its forward; free the slot after it."""

    def __init__(self, streamer, position: int):
        super().__init__()
        self.streamer = streamer
        self.position = position  # index of this layer among the streamed layers, in execution order

    def pre_forward(self, module, *args, **kwargs):
        self.streamer.acquire(self.position)
        return args, kwargs

    def post_forward(self, module, output):
        self.streamer.release(self.position)
        return output


class SessionGuardHook(ModelHook):
    """Session mode: refuse to run an offloaded layer whose weights are not resident (a layer
    called directly, bypassing the model forward that opens a session)."""

    def __init__(self, handle, index: int):
        super().__init__()
        self.handle = handle
        self.index = index

    def pre_forward(self, module, *args, **kwargs):
        if not self.handle.in_session:
            from .errors import AttachError

            raise AttachError(
                f"offloaded layer {self.index} was called outside a session, so its weights are not on the device; "
                "call the model itself, or wrap the call in `with lp_plugin.session(model):`"
            )
        return args, kwargs


def skip_forward(hidden_states=None, *args, **kwargs):
    """The forward of a dropped layer: its output is its input (``x + 0 * (L(x) - x)``)."""
    if hidden_states is None:
        hidden_states = kwargs["hidden_states"]
    return hidden_states
