"""``attach``, ``OffloadHandle`` and ``session``: putting an :class:`OffloadPlan` onto a model.

``attach(model, ...)`` resolves the options into a plan, packs every offloaded layer into its tier
(reading the model only: a failure leaves the model as it was), then installs: the layers' tensors
point at the tier's host copy, Accelerate's offload of those layers and its leftover dispatch hooks
are suspended, hooks go on the layers (``hooks.py``) and on the model (``entry.py``).

* ``session`` mode: between sessions only the resident layers occupy the main device. A session
  (``with lp_plugin.session(model)``, each ``generate()`` call, each bare forward) copies every
  offloaded layer into a device buffer; leaving it points the layers back at their host copy.
* ``stream`` mode: each forward pulls the offloaded layers through a ring of device buffers
  (``stream.py``); a session keeps the ring and its prefetch alive across forwards.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import torch
from tqdm.auto import tqdm

from ..core import accel, hooks
from ..core.devices import map_value
from ..core.entry import ModelEntry
from ..core.group import OffloadedLayer, Stager
from ..core.report import layers_text, size_text
from ..core.resident import Residency
from ..core.stream import Ring
from ..errors import AttachError, OffloadResourceError
from ..planning.arch import find_decoder_layers
from ..planning.config import OffloadConfig
from ..planning.plan import OffloadPlan
from ..planning.plugins import tier_class
from .checks import check_model

log = logging.getLogger("lp_plugin")

_ATTR = "_lp_offload"
_GiB = 1024**3
_DEVICE_MARGIN = 256 * 1024**2  # room left on the device beyond what we allocate (activations, allocator slack)


def get_handle(model):
    """The :class:`OffloadHandle` attached to ``model``, or ``None``."""
    return model.__dict__.get(_ATTR)


def session(model):
    """Context manager keeping the offloaded layers of ``model`` resident (session mode) or its ring
    allocated (stream mode). Re-entrant and thread-safe; a no-op for a model with nothing attached."""
    handle = get_handle(model)
    return contextlib.nullcontext() if handle is None else handle.session()


class OffloadHandle:
    """What ``attach`` returns. ``detach()`` restores the plain model; ``info()`` describes the layout."""

    def __init__(self, model, plan: OffloadPlan, layers, dropped, tier):
        self.model = model
        self.plan = plan
        self.config = plan.config
        self.layers = layers  # [OffloadedLayer], execution order
        self.dropped = dropped  # [(index, module)]
        self.tier = tier
        self.main_device = plan.main_device
        # per device the offloaded layers compute on: a Ring (stream mode) or a Residency (session mode)
        self.movers = []
        self.entry = None
        self.suspended = []  # Accelerate dispatch hooks taken off the main device's modules
        self.torch_hooks = []  # state-dict hooks of streamed layers (removed by detach)
        self._device_map = None  # (model had hf_device_map, its value) before attach
        self._depth = 0
        self._in_session = False
        self._epoch = 0
        self._lock = threading.RLock()
        self._forwards = threading.local()  # per thread: bare forwards whose session is open
        self._attached = True
        self.stats = {"sessions": 0, "session_load_s": 0.0, "forwards": 0}
        self.peak_mapped_bytes = 0  # the most device memory the session buffers or rings held at once

    # ------------------------------------------------------------------ description
    mode = property(lambda self: self.config.mode)
    alpha = property(lambda self: self.config.alpha)
    tier_name = property(lambda self: self.config.tier)

    @property
    def layer_indices(self):
        return [l.index for l in self.layers if not l.stand_in]

    def info(self) -> dict:
        c = self.config
        offloaded = sum(l.nbytes for l in self.layers)
        return {
            "offload": c.offload if isinstance(c.offload, str) else ",".join(map(str, c.offload)),
            "layers": list(self.plan.selected),
            "offloaded_layers": [l.index for l in self.layers if not l.stand_in],
            "dropped_layers": [i for i, _ in self.dropped],
            "skipped_layers": list(self.plan.skips.layers),
            "stand_ins": {str(l.index): type(l.module).__name__ for l in self.layers if l.stand_in},
            "tier": c.tier,
            "mode": c.mode,
            "alpha": c.alpha,
            "prefetch": c.prefetch,
            "offload_folder": getattr(self.tier, "offload_folder", None) or c.offload_folder,
            "main_device": str(self.main_device),
            "protect_first": c.protect_first,
            "protect_last": c.protect_last,
            "offloaded_bytes": offloaded,
            "layer_bytes": max((l.nbytes for l in self.layers), default=0),
            "bytes_per_forward": offloaded if c.mode == "stream" else 0,
            "ring_slots": sum(r.nslots for r in self.rings),
            "devices": sorted({str(l.device) for l in self.layers}) or [str(self.main_device)],
            "budget": self.plan.budget.summary() if self.plan.budget is not None else None,
        }

    def __repr__(self):
        state = "" if self._attached else ", detached"
        return (
            f"OffloadHandle(layers={list(self.plan.selected)}, tier={self.tier_name!r}, mode={self.mode!r}, "
            f"alpha={self.alpha}, offloaded={size_text(self.offloaded_bytes)!r}{state})"
        )

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded layers (not the stand-ins) held by the tier."""
        return sum(l.nbytes for l in self.layers if not l.stand_in)

    def summary(self) -> str:
        """What ``print(handle)`` shows: what was offloaded, where it lives, what stays and moves."""
        c, offloaded = self.config, self.offloaded_bytes
        total = self.plan.num_layers
        model_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        what = (
            "exact" if c.alpha == 1 else "drops the layers" if c.alpha == 0 else f"scaled residual, alpha {c.alpha:g}"
        )
        lines = [
            f"lp_plugin: {len(self.layer_indices)} of {total} layers offloaded to the {c.tier} tier, {c.mode} mode "
            f"({what})"
        ]
        if not self._attached:
            return lines[0].replace("offloaded", "were offloaded", 1) + "; detached: the plain model again"
        rows = [
            ("offloaded", f"layers {layers_text(self.layer_indices)}: {size_text(offloaded)}"),
            ("resident", f"{size_text(max(model_bytes - offloaded, 0))} on {self.main_device}"),
        ]
        if c.mode == "stream":
            rows.append(
                ("per forward", f"{size_text(offloaded)} copied to {self.main_device} (ring of {c.prefetch + 1})")
            )
        if self.plan.skips.layers:
            stand_ins = {type(l.module).__name__ for l in self.layers if l.stand_in}
            rows.append(
                (
                    "skipped",
                    f"layers {layers_text(self.plan.skips.layers)}"
                    + (f" (stand-ins: {', '.join(sorted(stand_ins))})" if stand_ins else ""),
                )
            )
        dropped = [i for i, _ in self.dropped if i not in self.plan.skips.layers]
        if dropped:
            rows.append(("dropped", f"layers {layers_text(dropped)} (alpha 0: never run)"))
        folder = getattr(self.tier, "offload_folder", None)
        if folder:
            how = (
                "temporary: removed at detach or exit"
                if getattr(self.tier, "temporary", False)
                else "handle.detach(remove_files=True) removes them"
            )
            rows.append(("files", f"{folder} ({how})"))
        if self.plan.budget is not None:
            rows.append(("budget", "planned by offload='auto': handle.plan.budget"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(lines + [f"  {k.ljust(width)}  {v}" for k, v in rows])

    __str__ = summary

    def log_attached(self) -> None:
        """The one line ``attach`` (and so ``from_pretrained``) logs at INFO on logger ``lp_plugin``."""
        folder = getattr(self.tier, "offload_folder", None)
        if folder and getattr(self.tier, "temporary", False):
            folder = f"{folder} (temporary)"
        taken = sum(bool(l.accel_hooks) for l in self.layers)
        log.info(
            "lp_plugin: offloaded %d of %d layers (%s) to the %s tier%s, %s mode, alpha %g%s; print(handle) for "
            "details",
            len(self.layer_indices),
            self.plan.num_layers,
            size_text(self.offloaded_bytes),
            self.config.tier,
            f" in {folder}" if folder else "",
            self.config.mode,
            self.config.alpha,
            f", taking over Accelerate's offload of {taken} of them" if taken else "",
        )

    def __deepcopy__(self, memo):
        raise AttachError(
            "copy.deepcopy of a model with lp_plugin attached is not supported: the offloaded layers' weights live in "
            "lp_plugin's tier. Deep-copy the plain model (lp_plugin.get_handle(model).detach() first) and attach "
            "each copy"
        )

    @property
    def rings(self) -> list:
        return [m for m in self.movers if isinstance(m, Ring)]

    @property
    def ring(self):
        """The ring of a model whose offloaded layers compute on one device (stream mode), else None."""
        rings = self.rings
        return rings[0] if len(rings) == 1 else None

    @property
    def mapped_bytes(self) -> int:
        """Device memory held outside PyTorch's allocator (not in ``torch.cuda.memory_allocated``): the
        session buffers or rings while a session is open."""
        return sum(m.mapped_bytes for m in self.movers)

    def offloaded_dtypes(self) -> set:
        return {e.dtype for l in self.layers for e in l.slots.entries if ".quant_state." not in e.key}

    # ------------------------------------------------------------------ sessions
    @contextlib.contextmanager
    def session(self):
        """Offloaded layers resident (session mode) or the ring allocated (stream mode) for the block;
        re-entrant and thread-safe. Leaving the outermost block, also by an exception, returns to
        standby: the device memory is freed."""
        self._open()
        try:
            yield self
        finally:
            self._close()

    @property
    def in_session(self) -> bool:
        """A session is open (session mode: the offloaded layers are on the device). A bool, set when the
        outermost session opens and cleared when it closes: a compiled forward that reads it guards on a
        value that does not change between nested and per-call sessions (the depth does)."""
        return self._in_session

    def _open(self):
        self._check_attached()
        with self._lock:
            if self._depth == 0:
                opened = []
                try:
                    for mover in self.movers:
                        mover.open()
                        opened.append(mover)
                except BaseException:
                    for mover in opened:
                        mover.release()
                    raise
                self._epoch += 1
                self.peak_mapped_bytes = max(self.peak_mapped_bytes, self.mapped_bytes)
                self._in_session = True
            self._depth += 1

    def _close(self):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._in_session = False
                refused = []
                for mover in self.movers:
                    try:
                        mover.release()
                    except AttachError as exc:  # every mover is released before an edit is refused
                        refused.append(exc)
                if self.movers and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if refused:
                    raise refused[0]

    def enter_forward(self):
        """A bare forward of the model: a session of its own; in stream mode one forward at a time."""
        if self.rings:
            self._lock.acquire()
        try:
            self._open()
        except BaseException:
            if self.rings:
                self._lock.release()
            raise
        self._forwards.depth = getattr(self._forwards, "depth", 0) + 1
        self.stats["forwards"] += 1

    def exit_forward(self):
        """After a bare forward (also when it, or :meth:`enter_forward`, raised)."""
        if not getattr(self._forwards, "depth", 0):
            return  # enter_forward failed: nothing to close
        self._forwards.depth -= 1
        try:
            self._close()
        finally:
            if self.rings:
                self._lock.release()

    def grad_token(self):
        """What a backward through an offloaded layer checks: the session the forward ran in (None in
        stream mode, whose ring slots are reused at once)."""
        return self._epoch if not self.rings and self._depth > 0 else None

    def grad_token_valid(self, token) -> bool:
        return self._depth > 0 and self._epoch == token

    def check_device_room(self, nbytes, device, what, fix):
        free = _free_bytes(device)
        if free is None:
            return
        margin = 0 if self.plan.budget is not None else _DEVICE_MARGIN  # a budget plan counted the whole peak
        if nbytes + margin > free and device.type == "cuda":
            torch.cuda.empty_cache()  # blocks the caching allocator holds but nothing uses
            free = _free_bytes(device)
        if nbytes + margin > free:
            raise OffloadResourceError(
                f"{what} needs {nbytes / _GiB:.2f} GiB on {device} but only {free / _GiB:.2f} GiB is free; {fix}"
            )

    # ------------------------------------------------------------------ detach
    def _check_attached(self):
        if not self._attached:
            raise AttachError("this OffloadHandle was detached; call lp_plugin.attach(model, ...) again to offload")

    def detach(self, remove_files: bool = False):
        """Restore the plain model: offloaded weights back where they were as independent tensors (with
        any edit made while attached), Accelerate's hooks and device map as they were, our hooks
        removed, tier files closed. ``remove_files=True`` also deletes the disk tier's layer files
        (only those lp_plugin provably wrote; a temporary folder goes in any case)."""
        if not self._attached:
            raise AttachError("detach() called twice: this model is no longer attached")
        with self._lock:
            if self._depth:
                raise AttachError(
                    "cannot detach inside an open session; leave the `with lp_plugin.session(model)` block first"
                )
            for layer in self.layers:  # every copy detach reads is still the verified one, before anything changes
                layer.tier.check(layer.key)
            for mover in self.movers:
                mover.close()
            if self.entry is not None:
                self.entry.remove()
            for h in self.torch_hooks:
                h.remove()
            for layer in self.layers:
                for module in {id(m): m for m in [layer.module, *layer.stream_modules]}.values():
                    hooks.remove(module)
            for _, module in self.dropped:
                hooks.remove(module)
            for device, layers in _by_device(self.layers).items():
                with Stager(layers, device.type == "cuda", device) as stager:
                    for layer in layers:
                        if not layer.stand_in:  # a stand-in is not part of the model: it goes with the handle
                            layer.restore(stager.source(layer))
            for s in reversed(self.suspended):
                s.restore()
            if self._device_map is not None:
                had, value = self._device_map
                if had:
                    self.model.hf_device_map = value
            if remove_files:
                removed = self.tier.remove_files()
                if removed:
                    log.info("lp_plugin: removed %d offload file(s) from %s", len(removed), self.tier.offload_folder)
            self.tier.close()
            self._attached = False
            self.model.__dict__.pop(_ATTR, None)


def _free_bytes(device):
    """Free memory on ``device`` (None where it is not a GPU)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------- attach
def attach(model, config: OffloadConfig | None = None, *, plan: OffloadPlan | None = None, **options) -> OffloadHandle:
    """Offload the layers chosen by ``offload`` of an already loaded (or Accelerate-dispatched) model.
    Options are those of :class:`OffloadConfig` (``offload``, ``tier``, ``mode``, ``alpha``,
    ``offload_folder``, ``prefetch``, ...). Returns an :class:`OffloadHandle`; ``handle.detach()``
    restores the plain model.

    Nothing is changed on the model until every offloaded layer is safely stored on its tier: a failure
    (bad option, full disk, too little pinned memory) leaves the model as it was.
    """
    if get_handle(model) is not None:
        raise AttachError(
            "this model is already attached; call lp_plugin.get_handle(model).detach() before attaching again"
        )
    if plan is None:
        plan = OffloadPlan.for_model(model, OffloadConfig.from_options(config, **options))
    plan = plan.with_skips(model)
    config = plan.config
    _, layer_list = find_decoder_layers(model)
    check_model(model, plan, layer_list)

    pin = any(plan.device_of(i).type == "cuda" for i in range(plan.num_layers)) or plan.main_device.type == "cuda"
    tag = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    tier = tier_class(config.tier)(pin=pin, offload_folder=config.offload_folder, model_tag=tag)
    # what moves between tier and device, in execution order: offloaded layers and skipped layers' stand-ins
    units = sorted(
        [(i, layer_list[i], False) for i in plan.offloaded] + [(i, m, True) for i, m in plan.skips.stand_ins.items()],
        key=lambda unit: unit[0],
    )
    layers = []
    try:
        for i, module, stand_in in tqdm(
            units,
            desc=f"lp_plugin: packing layers ({config.tier} tier)",
            unit="layer",
            leave=False,
            disable=not sys.stderr.isatty(),
        ):
            layers.append(OffloadedLayer.pack(i, module, tier, plan.device_of(i), pin, stand_in=stand_in))
    except BaseException:
        tier.close()
        raise

    # --- from here on the model is changed
    handle = OffloadHandle(model, plan, layers, [(i, layer_list[i]) for i in plan.dropped], tier)
    try:
        _install(handle, model, layer_list)
    except BaseException:
        handle.detach()
        raise
    handle.log_attached()
    return handle


def _install(handle, model, layer_list):
    plan, config = handle.plan, handle.config
    model.__dict__[_ATTR] = handle
    for layer in handle.layers:
        if layer.accel_hooks:
            log.debug("lp_plugin: taking over Accelerate's offload of layer %d (restored by detach())", layer.index)
        layer.install()
    if plan.single_device:  # with several devices, Accelerate's hooks move activations between them
        handle.suspended = accel.suspend_dispatch_hooks(model, plan.main_device)
        handle.suspended += accel.suspend_move_wrappers(model)
    if hasattr(model, "hf_device_map"):
        handle._device_map = (True, model.hf_device_map)
        model.hf_device_map = _computing_map(model.hf_device_map, plan)
    stand_ins = {l.index: l.module for l in handle.layers if l.stand_in}
    for i, module in handle.dropped:
        hooks.add(module, hooks.SkipHook(handle, stand_ins.get(i)))
    skip_keys = getattr(model, "_skip_keys_device_placement", None)
    for device, layers in _by_device(handle.layers).items():
        if config.mode == "stream":
            mover = Ring(layers, config.prefetch, device, handle.check_device_room)
        else:
            mover = Residency(layers, device, handle.check_device_room, handle.stats)
        handle.movers.append(mover)
        for pos, layer in enumerate(layers):
            _hook_layer(handle, layer, mover, pos, skip_keys)
    base = model.get_submodule(plan.layer_prefix.rpartition(".")[0])
    handle.entry = ModelEntry(
        handle, model, base, [l.module for l in handle.layers if not l.stand_in], _ancestors(model, plan.layer_prefix)
    )
    handle.entry.install()


def _hook_layer(handle, layer, mover, pos, skip_keys):
    if not handle.plan.single_device and not layer.stand_in:
        hooks.add(layer.module, hooks.DeviceHook(handle, layer.device, skip_keys))
    # state_dict() reads the tier's copy in standby (and inside a ring, whose slots hold other layers'
    # bytes between uses): it is checked against its file first
    handle.torch_hooks += [
        layer.module.register_state_dict_pre_hook(lambda *a, l=layer: l.show_standby()),
        layer.module.register_state_dict_post_hook(lambda *a, l=layer: l.show_bound()),
    ]
    if isinstance(mover, Ring):
        for module in layer.stream_modules:
            hooks.add(module, hooks.StreamHook(handle, mover, pos))
    else:
        hooks.add(layer.module, hooks.SessionHook(handle, layer))
    if 0 < handle.config.alpha < 1 and not layer.stand_in:
        hooks.add(layer.module, hooks.ResidualHook(handle, handle.config.alpha))


def _by_device(layers) -> dict:
    """device -> its layers, in execution order."""
    out = {}
    for layer in layers:
        out.setdefault(layer.device, []).append(layer)
    return out


def _ancestors(model, prefix):
    parts = prefix.split(".")
    return [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]


def _computing_map(device_map: dict, plan) -> dict:
    """``hf_device_map`` as it is once attached: each offloaded layer computes on its device."""

    def where(key, value):
        for i in plan.offloaded:
            prefix = f"{plan.layer_prefix}.{i}"
            if value in ("cpu", "disk") and (key == prefix or key.startswith(prefix + ".")):
                return map_value(plan.device_of(i))
        return value

    return {k: where(k, v) for k, v in device_map.items()}
