"""Forwards of a plain model over calibration windows with some decoder layers swapped out.

Everything that measures or fits (importance metrics, stand-in fitting) runs the model's own
``forward`` (so masks, rotary embeddings, final norm and head are the model's), one window at a time,
and changes it only for the duration of one call:

* ``replace={i: fn}``: layer ``i`` returns ``fn(hidden_states)`` instead of running (``fn`` is the
  identity for a skipped layer, a stand-in module for a replaced one);
* ``start=j, states=...``: the run begins at layer ``j`` from stored hidden states: layers before
  ``j`` are bypassed and layer ``j`` reads the stored states, so a measurement after a change at
  layer ``j`` costs only the layers from ``j`` on;
* ``stop=s``: the run ends when layer ``s`` is reached (no later layer, no head);
* ``tokens=n`` (scores): only the first ``n`` tokens of each window are run. Attention is causal,
  so their logits are those of the whole window's first ``n`` positions.

A layer's ``forward`` is swapped for the call and put back after it (also Accelerate's wrapper,
when the layer carries one). The model must not be attached by lp_plugin: measure the plain model.

:func:`low_precision_copy` makes a copy of the model in a lower precision (bfloat16) for measurements
that can be approximate; a :class:`Runner` of the copy reads the same windows, and stored hidden
states given to it are cast to its dtype where it starts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core import hooks
from ...core.progress import bar
from ...errors import AttachError
from ..arch import find_decoder_layers
from .calib import CalibData

BATCH_TOKENS = 2048  # tokens run together in one forward (windows of equal length batched)

# what runs in place of a layer: the identity (a skipped layer) or a stand-in module (a replaced one)
Replacement = Callable[[torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Raised by the hook on the ``stop`` layer to end a forward early."""


def _identity(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    return kwargs["hidden_states"] if hidden_states is None else hidden_states


def _replaced(fn: Replacement, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    return fn(_identity(hidden_states, **kwargs))


@contextlib.contextmanager
def swapped_forwards(layers, forwards: dict):
    """``layers[i].forward = forwards[i]`` for the block; each layer's own attribute comes back after."""
    saved = {i: layers[i].__dict__.get("forward") for i in forwards}
    try:
        for i, fwd in forwards.items():
            layers[i].forward = fwd
        yield
    finally:
        for i, fwd in saved.items():
            if fwd is None:
                layers[i].__dict__.pop("forward", None)
            else:
                layers[i].forward = fwd


def low_precision_copy(model, dtype: torch.dtype):
    """A copy of ``model`` whose parameters are ``dtype`` (tied parameters stay tied); buffers (rotary
    frequencies) are copied as they are, and ``model`` itself is not changed. The float32 parameters
    are never copied: the copy costs ``dtype``'s bytes only."""
    memo: dict = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


class Runner:
    """Runs ``model`` over the windows of ``calib``, windows of equal length batched together;
    hidden states are kept on the model's device as one ``[window_tokens, hidden]`` tensor per window."""

    def __init__(self, model, calib: CalibData):
        _, self.layers = find_decoder_layers(model)
        if any(name.startswith(hooks.PREFIX) for layer in self.layers for name in hooks.names(layer)):
            raise AttachError(
                "layer importance and stand-in fitting run on the plain model; detach lp_plugin first "
                "(lp_plugin.get_handle(model).detach()), or pass skip=... to attach, which measures before attaching"
            )
        self.model = model
        self.calib = calib
        self.num_layers = len(self.layers)
        emb = model.get_input_embeddings()
        self.device = emb.weight.device if emb.weight.device.type != "meta" else torch.device("cpu")
        self.inputs = [torch.tensor([[calib.prefix, *w[:-1]]], device=self.device) for w in calib.windows]
        self.targets = [torch.tensor(w, device=self.device) for w in calib.windows]

    @property
    def num_tokens(self) -> int:
        return sum(t.numel() for t in self.targets)

    # ------------------------------------------------------------------ one forward
    def batches(self, windows: Iterable[int]) -> list[list[int]]:
        """``windows`` grouped for one forward each: windows of equal length, at most
        :data:`BATCH_TOKENS` tokens together (a window longer than that runs alone), in order."""
        groups: dict[int, list[int]] = {}
        out: list[list[int]] = []
        for w in windows:
            groups.setdefault(self.targets[w].numel(), []).append(w)
        for length, ws in groups.items():
            size = max(1, BATCH_TOKENS // length)
            out += [ws[i : i + size] for i in range(0, len(ws), size)]
        return out

    def _run(
        self,
        ws: list[int],
        replace: dict[int, Replacement] | None = None,
        start: int = 0,
        states: Sequence[torch.Tensor] | None = None,
        stop: int | None = None,
        record: Collection[int] = (),
        keep: torch.Tensor | None = None,
        tokens: int | None = None,
    ):
        """Run windows ``ws`` (equal length) as one batch; return ``(logits [B, T, V], or None when
        stopped early; {layer: its input, [B, T, H]})``. ``record`` names the layers whose input is
        kept (``num_layers``: the last layer's output); ``keep`` (positions) limits the logits to
        those positions (the head runs on them only); ``tokens`` runs the first ``tokens`` only."""
        n = self.num_layers
        forwards: dict[int, Callable[..., torch.Tensor]]
        forwards = {i: functools.partial(_replaced, fn) for i, fn in (replace or {}).items() if i >= start}
        forwards.update({i: _identity for i in range(start)})
        seen, handles = {}, []

        def pre(i, module, args, kwargs):
            if i == start and states is not None:
                args, kwargs = _with_hidden(args, kwargs, torch.stack([states[w][:tokens] for w in ws]))
            if i in record:
                seen[i] = _hidden(args, kwargs)
            if i == stop:
                raise _Stop
            return args, kwargs

        def post(module, args, output):
            seen[n] = _first(output)
            if stop == n:
                raise _Stop

        hooked = {start, *record} if stop is None else {start, stop, *record}
        for i in sorted(hooked - {n}):
            handles.append(self.layers[i].register_forward_pre_hook(functools.partial(pre, i), with_kwargs=True))
        if n in record or stop == n:
            handles.append(self.layers[-1].register_forward_hook(post))
        training = self.model.training
        if training:
            self.model.eval()  # dropout would make scores and fits random (and they are cached)
        inputs = torch.cat([self.inputs[w] for w in ws]) if len(ws) > 1 else self.inputs[ws[0]]
        if tokens is not None:
            inputs = inputs[:, :tokens]
        try:
            with swapped_forwards(self.layers, forwards):
                if keep is None:
                    out = self.model(inputs, use_cache=False)
                else:
                    out = self.model(inputs, use_cache=False, logits_to_keep=keep)
        except _Stop:
            return None, seen
        finally:
            for h in handles:
                h.remove()
            if training:
                self.model.train()
        return out.logits, seen

    def _forward(self, w: int, replace=None, start=0, states=None, stop=None, record=()):
        """Window ``w`` alone: ``(summed NLL, or None when stopped early; {layer: its input [T, H]})``."""
        logits, seen = self._run([w], replace, start, states, stop, record)
        seen = {i: h[0] for i, h in seen.items()}
        if logits is None:
            return None, seen
        return F.cross_entropy(logits[0].float(), self.targets[w], reduction="sum").item(), seen

    # ------------------------------------------------------------------ what callers use
    @torch.no_grad()
    def nll_sum(self, replace=None, start=0, states=None, windows=None) -> tuple:
        """``(summed negative log-likelihood, tokens)`` over ``windows`` (indices; default all), with
        ``replace``/``start``/``states`` as in the module docstring (``states`` indexed by window)."""
        windows = range(len(self.inputs)) if windows is None else windows
        total = sum(self._forward(w, replace, start, states)[0] for w in windows)
        return total, sum(self.targets[w].numel() for w in windows)

    def nll(self, replace=None, start=0, states=None) -> float:
        """Mean negative log-likelihood per calibration token."""
        total, tokens = self.nll_sum(replace, start, states)
        return total / tokens

    def positions(self, w: int, stride: int = 1, tokens: int | None = None):
        """The positions of window ``w`` (of its first ``tokens``) that are scored with ``stride``:
        every ``stride``-th (the last of each group), or None for all of the window."""
        n = self.targets[w].numel() if tokens is None else min(tokens, self.targets[w].numel())
        if stride == 1:
            return None if n == self.targets[w].numel() else torch.arange(n, device=self.device)
        return torch.arange(stride - 1, n, stride, device=self.device)

    @torch.no_grad()
    def score_sum(
        self, loss, replace=None, start=0, states=None, windows=None, stride: int = 1, tokens: int | None = None
    ) -> tuple:
        """``(sum over windows of loss(window, logits [P, V], positions), positions scored)``, the
        windows run in batches (:meth:`batches`), ``replace``/``start``/``states`` as in
        :meth:`nll_sum`, logits at every ``stride``-th position only (:meth:`positions`), of the
        first ``tokens`` of each window only (default all)."""
        windows = range(len(self.inputs)) if windows is None else windows
        total, count = 0.0, 0
        for ws in self.batches(windows):
            keep = self.positions(ws[0], stride, tokens)
            logits, _ = self._run(ws, replace, start, states, keep=keep, tokens=tokens)
            total += sum(float(loss(w, logits[b], keep)) for b, w in enumerate(ws))
            count += len(ws) * (self.targets[ws[0]].numel() if keep is None else keep.numel())
        return total, count

    def nll_loss(self, w: int, logits, keep=None) -> torch.Tensor:
        """Summed negative log-likelihood of window ``w``'s tokens (at ``keep``) under ``logits``."""
        targets = self.targets[w] if keep is None else self.targets[w][keep]
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    @torch.no_grad()
    def log_probs(self, windows, replace=None, stride: int = 1) -> dict:
        """``{window: log-probabilities [P, V] (float32)}`` of the model (with ``replace``) at
        every ``stride``-th position (:meth:`positions`)."""
        out = {}
        for ws in self.batches(windows):
            logits, _ = self._run(ws, replace, keep=self.positions(ws[0], stride))
            for b, w in enumerate(ws):
                out[w] = F.log_softmax(logits[b].float(), dim=-1)
        return out

    @torch.no_grad()
    def layer_inputs(self, replace=None, layers=None, start=0, states=None, windows=None, desc=None) -> dict:
        """``{i: [per-window input of layer i]}`` for ``layers`` (default: every layer from ``start``
        and, as index ``num_layers``, the last layer's output), for the model with ``replace`` applied;
        with ``states``, layer ``start`` reads them and earlier layers are not run. Only ``windows``
        (indices; default all) are run, in batches; the lists hold None for the others. ``desc``
        names a progress bar over the windows."""
        layers = tuple(range(start, self.num_layers + 1)) if layers is None else tuple(layers)
        windows = range(len(self.inputs)) if windows is None else windows
        return self._pass(windows, layers, replace, start, states, desc=desc)[0]

    @torch.no_grad()
    def plain_pass(self, windows, scored: Collection[int] = (), stride: int = 1, desc=None) -> tuple[dict, dict]:
        """``(layer_inputs(windows=windows), log_probs(scored, stride=stride))`` of the plain model in
        one pass over ``windows``: the head runs only in the batches that hold a ``scored`` window
        (``scored`` must be among ``windows``)."""
        return self._pass(windows, tuple(range(self.num_layers + 1)), scored=scored, stride=stride, desc=desc)

    def _pass(
        self,
        windows,
        layers: tuple,
        replace=None,
        start=0,
        states=None,
        scored: Collection[int] = (),
        stride=1,
        desc=None,
    ) -> tuple[dict, dict]:
        """``({i: [per-window input of layer i]}, {scored window: log-probabilities at every ``stride``-th
        position})`` over ``windows`` in batches; a batch runs the head only when it holds a ``scored`` window."""
        out: dict = {i: [None] * len(self.inputs) for i in layers}
        log_probs = {}
        record = set(layers)
        progress = bar(total=len(windows), desc=desc or "", unit="window") if desc else None
        for ws in self.batches(windows):
            if any(w in scored for w in ws):
                logits, seen = self._run(ws, replace, start, states, record=record, keep=self.positions(ws[0], stride))
                log_probs.update({w: F.log_softmax(logits[b].float(), dim=-1) for b, w in enumerate(ws) if w in scored})
            else:
                _, seen = self._run(ws, replace, start, states, stop=max(layers), record=record)
            for i in layers:
                for b, w in enumerate(ws):
                    out[i][w] = seen[i][b]
            if progress is not None:
                progress.update(len(ws))
        if progress is not None:
            progress.close()
        return out, log_probs

    @torch.no_grad()
    def advance(self, states, start: int, stop: int, replace=None) -> list:
        """Per-window inputs of layer ``stop`` when layer ``start`` reads ``states`` (layers in
        between run, or are replaced)."""
        if stop == start:
            return list(states)
        return self.layer_inputs(replace, layers=(stop,), start=start, states=states)[stop]


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, value):
    value = value.to(_hidden(args, kwargs).dtype)
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _first(output):
    return output[0] if isinstance(output, tuple) else output
