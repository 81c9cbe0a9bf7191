"""The units the movers move: a module whose bytes live on a tier, and where its tensors point.

* :class:`OffloadedLayer`: a decoder layer of the model; detach gives it back to the model.
* :class:`StandIn`: a skipped layer's fitted stand-in, run in the layer's place; moved like an
  offloaded layer, but not part of the model (it goes with the handle).

Both share :class:`OffloadedUnit`'s movement code. Between uses (standby) a unit's tensors are views
of the tier's host copy (pinned memory, or the verified file's mapping), so everything the model hands
out is the real weights. ``onload_`` copies the bytes into a device buffer and points the tensors
there; ``to_standby`` points them back, first writing back an in-place edit made while they were on
the device (tracked by the tensors' version counters); ``OffloadedLayer.restore`` gives the module
independent tensors again (detach).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import AttachError
from . import accel
from .flat import Binding, LayerLayout
from .tiers import allocate_host, sha256_of


def edit_error(units) -> AttachError:
    indices = [unit.index for unit in units]
    return AttachError(
        f"offloaded layer(s) {indices} were changed in place inside a stream-mode session; stream mode refills its "
        "ring buffers from the tier's copy, so the change was not kept (the tier's copy is unchanged). Change "
        "offloaded weights outside a session (they land in the tier's copy), or attach with mode='session', "
        "whose sessions write edits back"
    )


def offloaded_dtypes(units) -> set:
    """The dtypes of the units' tensors (not NF4's quantization state)."""
    return {e.dtype for unit in units for e in unit.layout.entries if ".quant_state." not in e.key}


def execution_order(layers, stand_ins: dict) -> list[OffloadedUnit]:
    """The offloaded layers and the stand-ins (index -> :class:`StandIn`) as one list, in execution order."""
    return sorted([*layers, *stand_ins.values()], key=lambda unit: unit.index)


class OffloadedUnit:
    """What a mover moves between a tier and a device (the movers' contract with their units)."""

    key_prefix: ClassVar[str]  # the tier's name for a unit's bytes: "{key_prefix}_{index:05d}"

    def __init__(self, index, module, key, layout, tier, device):
        self.index = index  # the decoder layer it runs as (a stand-in: the skipped layer it runs for)
        self.module = module
        self.key = key  # the tier's name for these bytes ("layer_00004")
        self.layout = layout
        self.nbytes = layout.nbytes
        self.tier = tier
        self.device = device  # where the unit computes
        self.standby: Binding | None = None  # the tier's host copy (set by install)
        self.binding: Binding | None = None  # the binding to bound_flat
        self.bound_flat: torch.Tensor | None = None  # the buffer the tensors point at when it is not the standby one
        self.streamed = False  # bound to a stream ring's slot (which holds other units' bytes between uses)
        self.written = False  # an edit was written to the tier's copy: the bytes differ from those attach stored
        self._watched: list[torch.Tensor] = []
        self._versions: list[int] = []

    # ------------------------------------------------------------------ attach
    @classmethod
    def _store(cls, index, module, tier, pin, device, values=None) -> tuple[str, LayerLayout]:
        """Pack ``module`` (with ``values`` for the tensors it does not hold itself) into a flat host
        buffer and hand it to ``tier``: its key and layout. Reads the module only. A unit computing on the CPU
        keeps its tensors' alignment (``lp_plugin.core.flat``)."""
        layout = LayerLayout(module, values, keep_alignment=torch.device(device).type == "cpu")
        key = f"{cls.key_prefix}_{index:05d}"
        flat = allocate_host(layout.nbytes, pin and tier.keeps_flat, f"layer {index}")  # pinned only if it is kept
        layout.pack_into(flat)
        tier.put(key, flat, layout.layout_json(), sha256_of(flat))
        return key, layout

    def install(self) -> None:
        """Point the unit's tensors at the tier's copy (the module changes from here on)."""
        self.standby = self.layout.binding(self.tier.host_view(self.key))
        self.standby.apply()
        self.layout.release_sources()
        self._record()

    # ------------------------------------------------------------------ moving
    def onload_(self, device_buf, source) -> None:
        """Copy the unit into ``device_buf`` from the host tensor ``source`` and point it there."""
        device_buf.copy_(source, non_blocking=source.is_pinned())
        self.bind_(self.layout.binding(device_buf), device_buf)

    def bind_(self, binding, flat) -> None:
        binding.apply()
        self.binding, self.bound_flat = binding, flat
        self._record()

    def bind_slot_(self, binding, slot) -> None:
        """Point the tensors at a stream ring's slot (which holds other units' bytes between uses)."""
        self.bind_(binding, slot)
        self.streamed = True

    def unbind_slot_(self) -> None:
        """Back to standby from a ring slot: nothing to write back, the slot is refilled from the tier."""
        self.bound_flat, self.streamed = None, False
        self.to_standby()

    def show_standby(self) -> None:
        """Before ``state_dict``: the tier's copy is checked, and in a stream ring (whose slots hold other
        units' bytes between uses) the tensors point at it for a moment; :meth:`show_bound` points them back."""
        if self.streamed and self.edited():
            raise edit_error([self])
        if self.bound_flat is None or self.streamed:
            self.tier.check(self.key)
        if self.bound_flat is not None and self.streamed:
            assert self.standby is not None  # installed
            self.standby.apply()

    def show_bound(self) -> None:
        if self.bound_flat is not None and self.streamed:
            assert self.binding is not None  # bound with bound_flat
            self.binding.apply()

    def to_standby(self) -> None:
        """Back to standby; an in-place edit made meanwhile is written back to the tier's copy first."""
        edited = self.bound_flat is not None and self.edited()
        if edited and not self.tier.read_only:
            self.tier.host_view(self.key).copy_(self.bound_flat)
            self.tier.mark_written(self.key)
            self.written = True
        assert self.standby is not None  # installed
        self.standby.apply()
        self.bound_flat = None
        self._record()
        if edited and self.tier.read_only:
            raise AttachError(
                f"offloaded layer {self.index} was changed in place during the session, and its host copy is shared "
                "read-only by the ranks of this host, so the change was dropped; change the weights before attaching"
            )

    def _record(self) -> None:
        self._watched = list(self._tensors())  # the tensors bound now, in a list (read on every stream forward)
        self._versions = [t._version for t in self._watched]

    def _tensors(self):
        for module, name, _ in self.layout.params:
            yield module._parameters[name]
        for module, name, _ in self.layout.buffers:
            yield module._buffers[name]

    def note_standby_edit(self) -> bool:
        """Whether an in-place edit was made in standby; it went into the tier's host view, so a tier that may be
        written is told (its transfers must carry the edit from now on)."""
        edited = self.bound_flat is None and self.edited()
        if edited and not self.tier.read_only:
            self.tier.mark_written(self.key)
            self.written = True
        return edited

    def edited(self) -> bool:
        """True if a tensor of the unit was changed in place since it was last bound (``with
        torch.no_grad(): p.mul_(2)``, ``load_state_dict``, an optimizer step; not writes through ``.data``)."""
        return [t._version for t in self._watched] != self._versions

    @property
    def stream_modules(self) -> list:
        """Where stream mode's hooks go: the unit's Linear modules (the unit's module if it has none)."""
        return self.layout.linears or [self.module]

    def check_intact(self) -> None:
        """Refuse a unit whose tensors were replaced behind lp_plugin's back (a new Parameter
        assigned, ``.data`` rebound): its bytes would no longer be the ones the tier brings back; and,
        where the tier's host copy is shared read-only (data-parallel ranks), one edited in place."""
        if self.note_standby_edit() and self.tier.read_only:
            raise AttachError(
                f"offloaded layer {self.index} was changed in place while its weights were in the host memory that "
                "the ranks of this host share (read-only); change the weights before attaching, or inside a session"
            )
        assert self.standby is not None  # installed
        for (module, name, key), (param, view) in zip(self.layout.params, self.standby.pairs):
            now = module._parameters.get(name)
            if now is not param or (self.bound_flat is None and now.data_ptr() != view.data_ptr()):
                raise AttachError(
                    f"offloaded layer {self.index}: {key} was replaced after attach; lp_plugin keeps that layer's "
                    "weights itself, so detach() before assigning or re-binding its tensors, then attach again"
                )


class OffloadedLayer(OffloadedUnit):
    """A decoder layer of the model, offloaded; where Accelerate offloaded it, lp_plugin takes that over
    at install and gives it back at detach."""

    key_prefix = "layer"

    def __init__(self, index, module, key, layout, tier, device, hooks=(), held=(), accel_keys=()):
        super().__init__(index, module, key, layout, tier, device)
        self.accel_hooks = hooks  # Accelerate offload hooks found inside the layer (taken over by install)
        self.held = held  # [(dict, full key, key)]: Accelerate's host copies of the values
        self.accel_keys = frozenset(accel_keys)  # tensors Accelerate held (the module kept meta placeholders)
        self.from_files = accel.read_from_files(module, hooks) if hooks else []  # values Accelerate reads from files
        self.suspended: list = []

    @classmethod
    def pack(cls, index, module, tier, device, pin) -> OffloadedLayer:
        """Pack the layer ``module`` into a flat host buffer and hand it to ``tier``. Reads the model only."""
        hooks = accel.offload_hooks(module)
        values, held = accel.hooked_values(module, hooks) if hooks else (None, [])
        meta = [
            n for n, p in module.named_parameters() if p.device.type == "meta" and (values is None or n not in values)
        ]
        if meta:
            raise AttachError(
                f"layer {index} has parameters on the meta device ({meta[:3]}...) and no Accelerate hook holding "
                "their values; load the model's weights before attaching"
            )
        key, layout = cls._store(index, module, tier, pin, device, values)
        return cls(index, module, key, layout, tier, device, hooks, held, values or ())

    def install(self) -> None:
        """Point the layer's tensors at the tier's copy (the model changes from here on)."""
        if self.accel_hooks:
            self.suspended = accel.take_over(self.module, self.layout.placeholders())
            for store, full_key, _ in self.held:
                store.pop(full_key, None)  # the tier holds these bytes now
        super().install()

    # ------------------------------------------------------------------ detach
    def restore(self, source) -> None:
        """Give the module independent tensors holding its bytes (from the host tensor ``source``):
        on its device, or back behind the Accelerate hooks taken over at install."""
        device = torch.device("cpu") if self.accel_hooks else self.device
        restored = self.layout.binding(source, device, copy=True)
        restored.apply()
        if self.accel_hooks:
            meta = self.layout.binding(None, "meta").views
            accel.give_back(
                self.module,
                self.suspended,
                self.held,
                {k: meta[k] for k in self.accel_keys},
                restored.views,
                replace_files=self.from_files if self.written else (),  # (else the files hold these bytes)
            )
        self.bound_flat = None


class StandIn(OffloadedUnit):
    """A skipped layer's fitted stand-in (``stand_in=...``): the skip hook runs it in the layer's place.
    It is moved like an offloaded layer but is not part of the model: detach leaves it with the handle."""

    key_prefix = "standin"

    @classmethod
    def pack(cls, index, module, tier, device, pin) -> StandIn:
        """Pack the stand-in ``module`` of layer ``index`` into a flat host buffer and hand it to ``tier``."""
        key, layout = cls._store(index, module, tier, pin, device)
        return cls(index, module, key, layout, tier, device)


class Stager:
    """Host-side source of a unit's bytes for one-off copies (session load, detach): the pinned host memory
    the tier lends, or a pinned staging buffer filled from the tier (one buffer, reused)."""

    def __init__(self, units, pin: bool, device):
        self.units = units
        self.pin = pin
        self.device = device
        self.buf: torch.Tensor | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._wait()
        self.buf = None

    def _wait(self):
        if self.buf is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def source(self, unit) -> torch.Tensor:
        if unit.tier.direct(unit.key):
            unit.tier.check(unit.key)
            return unit.tier.transfer_view(unit.key)
        self._wait()  # the previous copy out of the staging buffer must finish before it is refilled
        if self.buf is None:
            self.buf = allocate_host(max(u.nbytes for u in self.units), self.pin, "a staging buffer")
        dst = self.buf[: unit.nbytes]
        unit.tier.read_into(unit.key, dst)
        return dst
