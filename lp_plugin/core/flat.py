"""One flat byte buffer per offloaded layer, and bindings of a layer's tensors to views of it.

A layer's *layout* (:class:`LayerLayout`) lists every tensor its forward reads (parameters, buffers and,
for bitsandbytes 4-bit weights, the tensors inside each ``QuantState``: absmax, code, offset, nested
state2) and gives each an offset in one flat ``uint8`` buffer (256-byte aligned), so a layer moves
host<->device as one contiguous copy. For a layer that computes on the CPU each offset keeps its source
tensor's address modulo :data:`RESIDUE` (a checkpoint's memory-mapped tensors often sit 8 bytes off a
16-byte boundary): on CPUs with AVX-512, MKL's matrix-vector kernels round differently for differently
aligned weights, and the plain model's own alignment is what makes a decode step equal it bit for bit.
A *binding* points every tensor at views of one such buffer (pinned host, a stream ring's slot, a session
buffer, or the meta device) by swapping ``.data`` and quant states in place: the module objects never
change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

ALIGN = 256
RESIDUE = 64  # an entry keeps its source's address modulo this (CPU layers, ``keep_alignment``)

_QS_TENSORS = ("absmax", "code", "offset")


@dataclass(frozen=True)
class Entry:
    key: str  # e.g. "mlp.up_proj.weight" or "mlp.up_proj.weight.quant_state.state2.absmax"
    dtype: torch.dtype
    shape: tuple
    offset: int  # bytes into the flat buffer
    nbytes: int

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def residue(t: torch.Tensor) -> int:
    """``t``'s address modulo :data:`RESIDUE` (0 for a tensor without storage: meta, empty)."""
    if t.device.type == "meta" or t.numel() == 0:
        return 0
    return t.data_ptr() % RESIDUE


def aligned_like(t: torch.Tensor, device=None) -> torch.Tensor:
    """An empty tensor shaped like ``t`` on ``device`` (default: ``t``'s) whose address has ``t``'s residue modulo
    :data:`RESIDUE` (a fresh allocation is aligned to it)."""
    device = t.device if device is None else torch.device(device)
    shift = residue(t) if device.type == "cpu" else 0
    if shift == 0 or shift % t.element_size():
        return torch.empty_like(t, device=device)
    raw = torch.empty(t.numel() * t.element_size() + RESIDUE, dtype=torch.uint8, device=device)
    start = (shift - raw.data_ptr()) % RESIDUE
    return raw[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)


def _quant_state(param):
    return getattr(param, "quant_state", None)


def quant_state_tensors(qs, prefix=""):
    """Yield (path, tensor) for the tensors of a bitsandbytes QuantState (recursing into state2)."""
    for name in _QS_TENSORS:
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            yield prefix + name, t
    state2 = getattr(qs, "state2", None)
    if state2 is not None:
        yield from quant_state_tensors(state2, prefix + "state2.")


class LayerLayout:
    """The tensors of one decoder layer and where each one lives in the layer's flat buffer.

    ``source`` optionally maps parameter/buffer keys to tensors holding the real values when the
    module's own are placeholders (an Accelerate-offloaded layer keeps its params on ``meta`` and
    the values in the hook's ``weights_map``)."""

    def __init__(self, layer: torch.nn.Module, source=None, keep_alignment: bool = False):
        self.layer = layer
        self.params = []  # (module, name, key)
        self.buffers = []  # (module, name, key)
        self.qstates = []  # (module, name, key) of parameters that carry a QuantState
        entries, offset = [], 0
        self._tensors: dict[str, torch.Tensor] = {}

        def add(key, t):
            nonlocal offset
            nbytes = t.numel() * t.element_size()
            shift = residue(t) if keep_alignment else 0
            entries.append(Entry(key, t.dtype, tuple(t.shape), offset + shift, nbytes))
            self._tensors[key] = t
            offset += aligned(shift + nbytes)

        for mod_name, module in layer.named_modules():
            for name, p in module.named_parameters(recurse=False):
                key = f"{mod_name}.{name}" if mod_name else name
                t = source[key] if source is not None and key in source else p
                self.params.append((module, name, key))
                add(key, t.detach())
                qs = _quant_state(p)
                if qs is not None:
                    self.qstates.append((module, name, key))
                    for path, qt in quant_state_tensors(qs):
                        add(f"{key}.quant_state.{path}", qt)
            for name, b in module.named_buffers(recurse=False):
                if b is None:
                    continue
                key = f"{mod_name}.{name}" if mod_name else name
                t = source[key] if source is not None and key in source else b
                self.buffers.append((module, name, key))
                add(key, t)
        self.entries = tuple(entries)
        self.nbytes = offset
        # the QuantState objects as they were at attach time (restored by every binding)
        self._orig_qs = {key: _quant_state(getattr(m, n)) for m, n, key in self.qstates}
        # the layer's Linear modules (bitsandbytes' 4-bit ones too), and the entries they own; the others
        # (norm weights, a few KiB) get a compact layout of their own (see :meth:`split_binding`)
        self.linears = [m for _, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        owned = {id(m) for m in self.linears}
        linear_keys = {k for m, _, k in self.params + self.buffers if id(m) in owned}
        self.other = []  # (entry, offset in the compact buffer)
        other = 0
        for e in self.entries:
            if e.key.split(".quant_state.")[0] not in linear_keys:
                self.other.append((e, other))
                other += aligned(e.nbytes)
        self.other_nbytes = other

    # ------------------------------------------------------------------ packing
    def layout_json(self) -> list:
        return [e.to_json() for e in self.entries]

    def pack_into(self, flat: torch.Tensor) -> None:
        """Copy the layer's current values into ``flat`` (a uint8 tensor of ``nbytes``), once: the references
        to the source tensors go then (values read from a checkpoint's files for this packing, pages of a
        mapped file, are freed layer by layer instead of when the whole model is installed)."""
        for e in self.entries:
            src = self._tensors[e.key]
            view(flat, e).copy_(src.reshape(e.shape) if src.shape != e.shape else src)
            # zero the alignment padding: ``flat`` comes from torch.empty, and its bytes are hashed
            # into the disk tier's fingerprint (garbage there made every file look stale)
            flat[e.offset - e.offset % ALIGN : e.offset].zero_()
            flat[e.offset + e.nbytes : aligned(e.offset + e.nbytes)].zero_()
        self._tensors = {}

    def placeholders(self) -> dict:
        """Tiny host tensors (one element, expanded) standing in for each param/buffer, used to give
        meta placeholders a real (host) tensor type before the first binding."""
        out = {}
        for e in self.entries:
            if ".quant_state." not in e.key:
                out[e.key] = torch.zeros((), dtype=e.dtype).expand(e.shape)
        return out

    def release_sources(self) -> None:
        """At install (the source tensors went when they were packed, :meth:`pack_into`): the QuantState
        templates keep their fields but their tensors become meta placeholders: the original
        absmax/code/offset tensors (about 1.2 MiB per NF4 layer of Qwen2.5-3B, on the GPU) would otherwise
        stay allocated in standby."""
        self._orig_qs = {key: _meta_quant_state(qs) for key, qs in self._orig_qs.items()}

    # ------------------------------------------------------------------ binding
    def binding(self, flat: torch.Tensor | None, device=None, copy: bool = False) -> Binding:
        """Views of ``flat`` for every tensor of the layout. With ``copy=True``: independent tensors on ``device``
        holding those bytes (what ``detach`` gives back). With ``flat=None``: placeholders on
        ``device`` that own no memory (one element expanded to the shape), for layers whose bytes
        live only on disk."""
        views = {}
        for e in self.entries:
            if flat is None:
                views[e.key] = torch.zeros((), dtype=e.dtype, device=device).expand(e.shape)
            elif copy:
                source = view(flat, e)  # (an independent tensor keeps the offset's residue: see the module's opening)
                views[e.key] = aligned_like(source, device).copy_(source)
            else:
                views[e.key] = view(flat, e)
        qstates = {}
        for _module, _name, key in self.qstates:
            qstates[key] = _rebind_quant_state(self._orig_qs[key], views, f"{key}.quant_state.")
        return Binding(self, views, qstates)

    def split_binding(self, linear_flat: torch.Tensor, other_flat: torch.Tensor) -> Binding:
        """Views of ``linear_flat`` (laid out like the whole layer) for the Linear modules' tensors, and
        of ``other_flat`` (the compact layout of :attr:`other`) for the rest."""
        views = {e.key: view(linear_flat, e) for e in self.entries}
        for e, offset in self.other:
            views[e.key] = view(other_flat, Entry(e.key, e.dtype, e.shape, offset, e.nbytes))
        qstates = {
            key: _rebind_quant_state(self._orig_qs[key], views, f"{key}.quant_state.") for _, _, key in self.qstates
        }
        return Binding(self, views, qstates)

    def copy_other(self, other_flat: torch.Tensor, source: torch.Tensor) -> None:
        """Fill ``other_flat`` (compact) from ``source`` (a whole-layer buffer)."""
        for e, offset in self.other:
            other_flat[offset : offset + e.nbytes].copy_(source[e.offset : e.offset + e.nbytes])


def _map_quant_state(qs, fn, prefix=""):
    """A copy of a bitsandbytes QuantState (nested ``state2`` too) whose tensors are ``fn(path,
    tensor)``, ``path`` as :func:`quant_state_tensors` names it (``absmax``, ``state2.code``, ...)."""
    new = copy.copy(qs)
    for name in _QS_TENSORS:
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            setattr(new, name, fn(prefix + name, t))
    if getattr(qs, "state2", None) is not None:
        new.state2 = _map_quant_state(qs.state2, fn, prefix + "state2.")
    return new


def _meta_quant_state(qs):
    """A template for rebinding: ``qs`` with meta tensors of the same shape and dtype (no memory)."""
    return _map_quant_state(qs, lambda _, t: torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _rebind_quant_state(qs, views, prefix):
    """``qs`` with its tensors taken from ``views`` (keys ``prefix + path``)."""
    return _map_quant_state(qs, lambda path, _: views[prefix + path])


def view(flat: torch.Tensor, e: Entry) -> torch.Tensor:
    """A typed view of one entry inside a flat uint8 buffer."""
    raw = flat[e.offset : e.offset + e.nbytes]
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype, device=flat.device)
    return raw.view(e.dtype).view(e.shape)


class Binding:
    """A precomputed assignment of a layer's tensors to one set of views; ``apply()`` is the hot path.

    On the CPU, bitsandbytes' first 4-bit forward repacks a weight for its CPU kernel and changes the
    weight's QuantState in place (absmax, nested, a packing flag); a binding of host views therefore
    hands out a fresh shallow copy of each QuantState every time it is applied."""

    __slots__ = ("pairs", "qpairs", "views", "fresh_qs")

    def __init__(self, layout: LayerLayout, views: dict, qstates: dict):
        self.views = views
        self.fresh_qs = any(v.device.type == "cpu" for v in views.values())
        # parameters and buffers keep their tensor objects and their own version counters (``.data``
        # points them at the views): a view assigned directly would share the flat buffer's counter,
        # and every copy into the buffer would read as an in-place edit of the layer
        self.pairs = [(m._parameters[n], views[k]) for m, n, k in layout.params]
        self.pairs += [(m._buffers[n], views[k]) for m, n, k in layout.buffers]
        self.qpairs = []
        for m, n, k in layout.qstates:
            self.qpairs.append((m, m._parameters[n], qstates[k]))

    def apply(self) -> None:
        for t, v in self.pairs:
            t.data = v
        for module, p, qs in self.qpairs:
            if self.fresh_qs:
                qs = copy.copy(qs)
            p.quant_state = qs
            if module.__dict__.get("quant_state") is not None:  # a plain attribute: skip Module.__setattr__
                module.__dict__["quant_state"] = qs
