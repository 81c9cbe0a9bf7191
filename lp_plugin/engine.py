"""The residual offload engine: ``attach`` / ``OffloadHandle`` / ``session``.

``attach(model, ...)`` packs every offloaded decoder layer into one flat buffer on its tier
(pinned host memory or a safetensors file), points the layer's parameters away from the GPU and
installs hooks:

* ``session`` mode: between sessions only the resident layers occupy the main device. Entering a
  session (``with lp_plugin.session(model)``, any ``generate()`` call, or a bare forward outside a
  session) copies every offloaded layer into a device buffer; leaving it frees them. Inside a
  session the model runs at baseline speed.
* ``stream`` mode: every forward pulls each offloaded layer through a ring of ``prefetch + 1``
  device buffers. Copies run on a side CUDA stream from pinned memory, ``prefetch`` layers ahead
  (wrapping into the next forward), ordered with events: the compute stream waits only for the
  layer it needs, and a copy into a slot waits only for the layer that last used it. While the ring
  is open a layer's tensors stay bound to its slot between uses (rebound only when it moves to
  another slot); closing the ring puts every layer back on its standby binding. A tier without a
  host buffer (disk) is read by one reader thread into pinned staging buffers.

On a machine without CUDA the same code runs with plain host copies (no streams, no pinning).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import hooks as _hooks
from .arch import find_decoder_layers
from .errors import AttachError, OffloadResourceError, OffloadSpecError
from .flat import LayerSlots
from .plugins import get_tier_class
from .specs import PROTECT_FIRST, PROTECT_LAST, resolve_layers, validate_alpha, validate_mode, validate_prefetch
from .tiers import allocate_host, sha256_of

log = logging.getLogger("lp_plugin")

_ATTR = "_lp_offload"
_GiB = 1024**3
# room left on the device beyond what we allocate ourselves (activations, allocator slack)
_DEVICE_MARGIN = 256 * 1024**2


def get_handle(model):
    """The :class:`OffloadHandle` attached to ``model``, or ``None``."""
    return getattr(model, _ATTR, None)


def session(model):
    """Context manager keeping the offloaded layers of ``model`` resident (``session`` mode).
    Re-entrant and thread-safe; a no-op in ``stream`` mode and for a model with nothing attached."""
    handle = get_handle(model)
    if handle is None:
        return contextlib.nullcontext()
    return handle.session()


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _offload_hook_of(module):
    """The Accelerate hook that offloads ``module``'s own weights, if any."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    candidates = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    for h in candidates:
        if isinstance(h, AlignDevicesHook) and h.offload:
            return h
    return None


def accelerate_offload_hooks(layer):
    """``[(qualified name, submodule, hook)]`` for every Accelerate offload hook inside ``layer``
    (Accelerate puts them on the submodules that own weights, e.g. ``self_attn.q_proj``)."""
    found = []
    for name, sub in layer.named_modules():
        hook = _offload_hook_of(sub)
        if hook is not None:
            found.append((name, sub, hook))
    return found


def accelerate_values(layer, hooks):
    """The real values of an Accelerate-offloaded layer, ``{key in layer: host tensor}``, read
    from the hooks' ``weights_map``; also ``[(dict, full key)]`` of entries held in host memory."""
    values, held = {}, []
    for qual, sub, hook in hooks:
        wm = hook.weights_map
        names = [n for n, _ in sub.named_parameters(recurse=hook.place_submodules)]
        if hook.offload_buffers:
            names += [n for n, _ in sub.named_buffers(recurse=hook.place_submodules)]
        for n in names:
            key = f"{qual}.{n}" if qual else n
            values[key] = wm[n]
            if isinstance(getattr(wm, "dataset", None), dict):
                held.append((wm.dataset, wm.prefix + n, key))
    return values, held


def release_accelerate(layer, hooks, values, device):
    """Remove Accelerate's offload hooks from ``layer`` and give its placeholder (meta) tensors
    real ``values`` on ``device``. The caller keeps ``hooks`` to restore them later."""
    import torch.nn as nn
    from accelerate.hooks import remove_hook_from_module

    for _, sub, hook in hooks:
        remove_hook_from_module(sub)
    for key, value in values.items():
        parent_name, _, attr = key.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        value = value.to(device)
        if attr in parent._parameters:
            old = parent._parameters[attr]
            parent._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        else:
            parent._buffers[attr] = value


def _main_device_of(model):
    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    if device.type == "meta":
        hook = getattr(emb, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", "cpu") or "cpu")
    return torch.device(device)


class _OffLayer:
    """Book-keeping of one offloaded layer."""

    def __init__(self, index, module, slots, orig_device, accel_hooks, held, accel_keys=()):
        self.index = index
        self.module = module
        self.slots = slots
        self.nbytes = slots.nbytes
        self.orig_device = orig_device  # where detach puts the weights back (None: back to Accelerate's host copy)
        self.accel_hooks = accel_hooks  # Accelerate offload hooks we took over, restored on detach
        # [(hook, its original_devices)]: Accelerate's init_hook rewrites them when detach re-adds the hook
        self.accel_devices = [(h, dict(getattr(h, "original_devices", None) or {})) for _, _, h in accel_hooks]
        self.accel_keys = frozenset(accel_keys)  # tensors whose values Accelerate's weights_map holds
        self.held = held  # [(dict, full key, key)] Accelerate host copies we freed (detach puts them back)
        self.standby = None  # Binding used between uses (host views or meta)
        self.device_buf = None  # session mode: the layer's device buffer while a session is open
        self.added_hook = False
        self.prior_hook = None  # a hook that was on the layer before ours (ours are appended to it)


class OffloadHandle:
    """What ``attach`` returns. ``detach()`` restores the plain model; ``info()`` describes the layout."""

    def __init__(self, model, *, base, spec, layers, dropped, tier, tier_name, mode, alpha, prefetch,
                 main_device, offload_folder, protect_first, protect_last):
        self.model = model
        self.base = base  # the module whose forward runs the decoder layers (model.model for Qwen2/Llama)
        self.spec = spec
        self.layers = layers  # list[_OffLayer], execution order
        self.dropped = dropped  # list[(index, module, previous forward attr or None)]
        self.tier = tier
        self.tier_name = tier_name
        self.mode = mode
        self.alpha = alpha
        self.prefetch = prefetch
        self.main_device = main_device
        self.offload_folder = offload_folder
        self.protect_first = protect_first
        self.protect_last = protect_last
        self.streamer = None
        self._depth = 0
        self._lock = threading.RLock()
        self._attached = True
        self._saved_attrs = {}
        self.stats = {"sessions": 0, "session_load_s": 0.0, "forwards": 0}

    # ------------------------------------------------------------------ description
    @property
    def layer_indices(self):
        return [l.index for l in self.layers]

    def info(self) -> dict:
        per_forward = sum(l.nbytes for l in self.layers) if self.mode == "stream" else 0
        return {
            "offload": self.spec if isinstance(self.spec, str) else ",".join(map(str, self.spec)),
            "layers": sorted(self.layer_indices + [d[0] for d in self.dropped]),
            "offloaded_layers": self.layer_indices,
            "dropped_layers": [d[0] for d in self.dropped],
            "tier": self.tier_name,
            "mode": self.mode,
            "alpha": self.alpha,
            "prefetch": self.prefetch,
            "offload_folder": self.offload_folder,
            "main_device": str(self.main_device),
            "protect_first": self.protect_first,
            "protect_last": self.protect_last,
            "offloaded_bytes": sum(l.nbytes for l in self.layers),
            "layer_bytes": max((l.nbytes for l in self.layers), default=0),
            "bytes_per_forward": per_forward,
            "ring_slots": self.streamer.nslots if self.streamer else 0,
        }

    def __repr__(self):
        i = self.info()
        return f"OffloadHandle(layers={i['layers']}, tier={self.tier_name!r}, mode={self.mode!r}, alpha={self.alpha})"

    # ------------------------------------------------------------------ sessions
    @contextlib.contextmanager
    def session(self):
        """Offloaded layers resident (session mode) or the GPU ring allocated (stream mode) for the
        block; re-entrant and thread-safe. Leaving the outermost block, also by an exception,
        returns to standby: the device memory is freed."""
        self._check_attached()
        if not self.layers:
            yield self
            return
        with self._lock:
            if self._depth == 0:
                if self.mode == "session":
                    self._load_all()
                else:
                    self.streamer.open()
            self._depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    if self.mode == "session":
                        self._release_all()
                    else:
                        self.streamer.close_ring()
                    if _is_cuda(self.main_device):
                        torch.cuda.empty_cache()

    @property
    def in_session(self) -> bool:
        return self._depth > 0

    def _check_device_room(self, nbytes, what, fix):
        if not _is_cuda(self.main_device):
            return
        free, _ = torch.cuda.mem_get_info(self.main_device)
        if nbytes + _DEVICE_MARGIN > free:
            raise OffloadResourceError(
                f"{what} needs {nbytes / _GiB:.2f} GiB on {self.main_device} but only {free / _GiB:.2f} GiB is free; {fix}"
            )

    def _load_all(self):
        import time

        t0 = time.perf_counter()
        total = sum(l.nbytes for l in self.layers)
        self._check_device_room(total, "a session (all offloaded layers resident)",
                                "use mode='stream', or offload fewer layers' worth of work to the GPU")
        loaded = []
        try:
            with _Stager(self) as stager:
                for layer in self.layers:
                    buf = torch.empty(layer.nbytes, dtype=torch.uint8, device=self.main_device)
                    stager.copy_layer(layer, buf)
                    layer.device_buf = buf
                    loaded.append(layer)
                    layer.slots.binding(buf).apply()
        except BaseException:
            for layer in loaded:
                layer.standby.apply()
                layer.device_buf = None
            raise
        self.stats["sessions"] += 1
        self.stats["session_load_s"] += time.perf_counter() - t0

    def _release_all(self):
        for layer in self.layers:
            layer.standby.apply()
            layer.device_buf = None

    # ------------------------------------------------------------------ forward / generate wrappers
    @contextlib.contextmanager
    def _forward_context(self):
        if self.mode == "stream":
            with self._lock, self.session():  # one forward at a time through the ring
                yield
        else:
            with self.session():
                yield

    def _install_model_wrappers(self):
        """Wrap the forward of the module that runs the layer list (a session per bare forward in
        session mode, one forward at a time in stream mode) and the model's ``generate`` (a session
        per call). Instance attributes, removed again by ``detach``."""
        handle = self
        targets = [(self.base, "forward")]
        if hasattr(self.model, "generate"):
            targets.append((self.model, "generate"))
        for module, name in targets:
            self._saved_attrs[(id(module), name)] = (module, name, module.__dict__.get(name))
        orig_forward = self.base.forward

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            with handle._forward_context():
                handle.stats["forwards"] += 1
                return orig_forward(*args, **kwargs)

        self.base.forward = forward
        if hasattr(self.model, "generate"):
            orig_generate = self.model.generate

            @functools.wraps(orig_generate)
            def generate(*args, **kwargs):
                with handle.session():
                    return orig_generate(*args, **kwargs)

            self.model.generate = generate

    def _remove_model_wrappers(self):
        for module, name, saved in self._saved_attrs.values():
            if saved is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, saved)

    # ------------------------------------------------------------------ detach
    def _check_attached(self):
        if not self._attached:
            raise AttachError("this OffloadHandle was detached; call lp_plugin.attach(model, ...) again to offload")

    def detach(self):
        """Restore the plain model: offloaded weights back on their device as independent tensors,
        Accelerate hooks as they were, our hooks and wrappers removed, tier files closed."""
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        if not self._attached:
            raise AttachError("detach() called twice: this model is no longer attached")
        with self._lock:
            if self._depth:
                raise AttachError("cannot detach inside an open session; leave the `with lp_plugin.session(model)` block first")
            if self.streamer is not None:
                self.streamer.close()
            with _Stager(self) as stager:
                for layer in self.layers:
                    if layer.added_hook:
                        if layer.prior_hook is not None:
                            add_hook_to_module(layer.module, layer.prior_hook)
                        else:
                            remove_hook_from_module(layer.module)
                    device = layer.orig_device if layer.orig_device is not None else torch.device("cpu")
                    restored = layer.slots.binding(stager.host_copy(layer), device, copy=True)
                    restored.apply()
                    for store, full_key, key in layer.held:
                        store[full_key] = restored.views[key]
                    if layer.accel_hooks:
                        # as dispatch left them: Accelerate's weights_map holds the values, the module
                        # meta placeholders, each hook its original_devices. (init_hook also looks a
                        # real host tensor's data pointer up in its tied-parameter map, keyed by host
                        # pointers that may since have been reused: meta tensors cannot match.)
                        meta = layer.slots.binding(None, "meta")
                        _apply_some(layer.slots, meta, layer.accel_keys)
                        for _, sub, hook in layer.accel_hooks:
                            add_hook_to_module(sub, hook)
                        for hook, devices in layer.accel_devices:
                            if devices:
                                hook.original_devices = devices
            for index, module, prev_forward in self.dropped:
                if prev_forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = prev_forward
            self._remove_model_wrappers()
            self.tier.close()
            self._attached = False
            self.model.__dict__.pop(_ATTR, None)


def _apply_some(slots, binding, keys):
    """Apply the entries of ``binding`` named in ``keys`` (parameters and buffers) and no others."""
    import torch.nn as nn

    for module, name, key in slots.params:
        if key in keys:
            old = module._parameters[name]  # a new Parameter, as Accelerate itself moves one to meta
            module._parameters[name] = nn.Parameter(binding.views[key], requires_grad=old.requires_grad)
    for (module, name, key) in slots.buffers:
        if key in keys:
            module._buffers[name] = binding.views[key]


class _Stager:
    """Host-side source of a layer's bytes for one-off copies (session load, detach): the tier's
    own host buffer, or a pinned staging buffer filled from the tier (disk)."""

    def __init__(self, handle):
        self.handle = handle
        self.staging = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.staging is not None and _is_cuda(self.handle.main_device):
            torch.cuda.current_stream(self.handle.main_device).synchronize()
        self.staging = None

    def host_copy(self, layer):
        host = self.handle.tier.host_buffer(layer.index)
        if host is not None:
            return host[: layer.nbytes]
        if self.staging is None or self.staging.numel() < layer.nbytes:
            if self.staging is not None and _is_cuda(self.handle.main_device):
                torch.cuda.current_stream(self.handle.main_device).synchronize()
            self.staging = allocate_host(max(l.nbytes for l in self.handle.layers), self.handle.tier.pin, "a staging buffer")
        elif _is_cuda(self.handle.main_device):
            # the previous copy out of the staging buffer must finish before we overwrite it
            torch.cuda.current_stream(self.handle.main_device).synchronize()
        dst = self.staging[: layer.nbytes]
        self.handle.tier.read_into(layer.index, dst)
        return dst

    def copy_layer(self, layer, device_buf):
        src = self.host_copy(layer)
        device_buf.copy_(src, non_blocking=src.is_pinned())


class _GilSwitch:
    """While a stream ring reads from a tier without a host buffer (disk), the reader thread needs
    the GIL back after every read and copy, and the main thread holds it while it launches kernels:
    a waiting thread gets it only after ``sys.getswitchinterval()`` (5 ms by default), longer than
    a layer takes to move. So while such a ring is open the interval is lowered to 0.5 ms, and put
    back when the last one closes (unless someone else changed it meanwhile)."""

    INTERVAL = 0.0005

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    def enter(self):
        import sys

        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                if self._saved > self.INTERVAL:
                    sys.setswitchinterval(self.INTERVAL)
            self._users += 1

    def leave(self):
        import sys

        with self._lock:
            self._users -= 1
            if self._users == 0 and self._saved is not None:
                if self._saved > self.INTERVAL and abs(sys.getswitchinterval() - self.INTERVAL) < 1e-9:
                    sys.setswitchinterval(self._saved)
                self._saved = None


_gil_switch = _GilSwitch()


class _Streamer:
    """The ring of device buffers used in ``stream`` mode (see the module docstring). The ring is
    allocated when a session opens (every ``generate()`` call and bare forward opens one) and freed
    when it closes, so standby VRAM holds no ring."""

    def __init__(self, handle):
        self.h = handle
        self.layers = handle.layers
        self.k = len(self.layers)
        self.prefetch = min(handle.prefetch, self.k - 1)
        self.nslots = self.prefetch + 1
        self.device = handle.main_device
        self.cuda = _is_cuda(self.device)
        self.slot_bytes = max(l.nbytes for l in self.layers)
        self.host = [handle.tier.host_buffer(l.index) for l in self.layers]
        self.needs_staging = any(h is None for h in self.host)
        if self.cuda:
            self.side = torch.cuda.Stream(self.device)
        # the reader thread issues its copies on the side stream (its current stream, set once)
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lp_plugin-reader",
                                            initializer=self._reader_init)
                         if self.needs_staging else None)
        self.slots = None
        self.staging = None

    @property
    def is_open(self):
        return self.slots is not None

    def open(self):
        self.h._check_device_room(self.nslots * self.slot_bytes, f"stream mode's ring of {self.nslots} layer buffers",
                                  "lower prefetch, or offload fewer/smaller layers")
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]
        # bindings[pos][slot]: views of ring slot `slot` laid out for layer `pos`
        self.bindings = [[l.slots.binding(s[: l.nbytes]) for s in self.slots] for l in self.layers]
        if self.needs_staging and self.staging is None:
            self.staging = [allocate_host(self.slot_bytes, self.h.tier.pin, "stream staging buffers")
                            for _ in range(self.nslots)]
        if self.cuda:
            self.loaded = [torch.cuda.Event() for _ in range(self.nslots)]
            self.freed = [torch.cuda.Event() for _ in range(self.nslots)]
        if self.needs_staging:
            _gil_switch.enter()  # left in close_ring
        self.pending = {}
        self.issued = 0  # next load number to issue; load n is layer n % k into slot n % nslots
        self.cur = 0  # load number the next acquire expects
        # bound[pos]: the ring slot layer pos's tensors point at (None: its standby binding). A layer
        # keeps pointing at its slot after it ran (the slot then fills with other layers' bytes) until
        # the ring closes: rebinding ~20 tensors twice per layer and forward cost ~0.1 ms of host time
        # per layer in a launch-bound decode. When k % nslots == 0 a layer always gets the same slot,
        # so it is bound once per ring.
        self.bound = [None] * self.k

    def close_ring(self):
        self._drain()
        for l in self.layers:
            l.standby.apply()
        self.slots = self.bindings = self.bound = None
        if self.needs_staging:
            _gil_switch.leave()

    def _reader_init(self):
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.side)

    # load n: layer n % k into slot n % nslots
    def _copy(self, n, src):
        """Main thread: enqueue the copy of ``src`` into ring slot ``n % nslots`` on the side stream."""
        with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
            self._enqueue(n % self.nslots, src)

    def _enqueue(self, slot, src):
        """Copy ``src`` into ring slot ``slot`` once the layer that last used it is done, and mark
        it loaded. On CUDA the current stream must be the side stream."""
        dst = self.slots[slot][: src.numel()]
        if self.cuda:
            self.side.wait_event(self.freed[slot])
            dst.copy_(src, non_blocking=True)
            self.loaded[slot].record(self.side)
        else:
            dst.copy_(src)

    def _read_and_copy(self, n):
        """Reader thread (current stream: the side stream): staging buffer ``n % nslots`` from the
        tier, then its copy into ring slot ``n % nslots``. Kept to a few calls, since each return
        from a call that released the GIL waits for the GIL while the main thread launches kernels."""
        pos, slot = n % self.k, n % self.nslots
        layer = self.layers[pos]
        buf = self.staging[slot][: layer.nbytes]
        if self.cuda:
            # the previous copy out of this staging buffer was the previous load into this ring slot
            self.loaded[slot].synchronize()
        self.h.tier.read_into(layer.index, buf)
        self._enqueue(slot, buf)

    def _issue(self, n):
        pos = n % self.k
        host = self.host[pos]
        if host is not None:
            self._copy(n, host[: self.layers[pos].nbytes])
        else:
            self.pending[n] = self.executor.submit(self._read_and_copy, n)

    def _drain(self):
        for fut in getattr(self, "pending", {}).values():
            with contextlib.suppress(Exception):
                fut.result()
        self.pending = {}
        if self.cuda:
            self.side.synchronize()
            torch.cuda.current_stream(self.device).synchronize()

    def acquire(self, pos):
        if self.slots is None:
            raise AttachError(
                f"offloaded layer {self.layers[pos].index} was called outside a forward of the model, so no ring "
                "buffer holds it; call the model itself, or wrap the call in `with lp_plugin.session(model):`"
            )
        n = self.cur
        if n % self.k != pos:
            # a forward was cut short (exception) or layers ran out of order: start a fresh cycle
            self._drain()
            n = self.issued + (pos - self.issued) % self.k
            self.cur = self.issued = n
        while self.issued <= n + self.prefetch:
            self._issue(self.issued)
            self.issued += 1
        fut = self.pending.pop(n, None)
        if fut is not None:
            try:
                fut.result()
            except BaseException:
                self.cur = -1  # force a resync next time
                raise
        slot = n % self.nslots
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[slot])
        if self.bound[pos] != slot:
            self.bindings[pos][slot].apply()
            self.bound[pos] = slot

    def release(self, pos):
        n = self.cur
        if self.cuda:
            self.freed[n % self.nslots].record(torch.cuda.current_stream(self.device))
        self.cur = n + 1

    def close(self):
        if self.is_open:
            self.close_ring()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.staging = None


# ---------------------------------------------------------------------------------------- attach
def attach(
    model,
    offload="even",
    tier: str = "cpu",
    mode: str = "session",
    alpha: float = 1.0,
    offload_folder=None,
    prefetch: int = 1,
    protect_first: int = PROTECT_FIRST,
    protect_last: int = PROTECT_LAST,
    main_device=None,
) -> OffloadHandle:
    """Offload the layers chosen by ``offload`` of an already loaded (or Accelerate-dispatched)
    model. Returns an :class:`OffloadHandle`; ``handle.detach()`` restores the plain model.

    Nothing is changed on the model until every offloaded layer is safely stored on its tier: a
    failure (bad option, full disk, too little pinned memory) leaves the model as it was.
    """
    if get_handle(model) is not None:
        raise AttachError("this model is already attached; call lp_plugin.get_handle(model).detach() before attaching again")
    alpha = validate_alpha(alpha)
    mode = validate_mode(mode)
    prefetch = validate_prefetch(prefetch)
    if not isinstance(tier, str):
        raise OffloadSpecError(f"tier must be a tier name such as 'cpu' or 'disk', got {tier!r}")
    tier_cls = get_tier_class(tier)
    prefix, layer_list = find_decoder_layers(model)
    indices = resolve_layers(offload, len(layer_list), protect_first, protect_last)
    main_device = torch.device(main_device) if main_device is not None else _main_device_of(model)
    if main_device.type == "cuda" and main_device.index is None:
        main_device = torch.device("cuda", torch.cuda.current_device())

    # Accelerate maps: offloaded layers may be taken over, anything else must be on the main device
    for i, layer in enumerate(layer_list):
        if accelerate_offload_hooks(layer) and i not in indices:
            raise AttachError(
                f"layer {i} is offloaded by Accelerate's device map but is not in offload={offload!r}; "
                f"build the map with lp_plugin.residual_offload_device_map(config, offload={offload!r}) "
                "so both agree, or load the model without offloading"
            )
        if i not in indices:
            devices = {p.device for p in layer.parameters()}
            if torch.device("meta") in devices:
                raise AttachError(f"resident layer {i} has parameters on the meta device; load the model's weights before attaching")
            if devices and devices != {main_device}:
                raise AttachError(
                    f"resident layer {i} is on {sorted(map(str, devices))}, not on the main device {main_device}; "
                    "lp_plugin needs every resident layer on one device: use lp_plugin.residual_offload_device_map(...) "
                    "or pass main_device="
                )

    pin = main_device.type == "cuda"
    tag = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    store = tier_cls(pin=pin, offload_folder=offload_folder, model_tag=tag)
    offloaded, dropped = [], []
    try:
        if alpha > 0:
            for i in indices:
                offloaded.append(_store_layer(store, i, layer_list[i], main_device, pin))
    except BaseException:
        store.close()
        raise

    handle = OffloadHandle(
        model, base=model.get_submodule(prefix.rpartition(".")[0]), spec=offload, layers=offloaded, dropped=dropped, tier=store, tier_name=tier, mode=mode,
        alpha=alpha, prefetch=prefetch, main_device=main_device,
        offload_folder=getattr(store, "offload_folder", offload_folder),
        protect_first=protect_first, protect_last=protect_last,
    )
    # --- from here on the model is changed
    from accelerate.hooks import add_hook_to_module

    if alpha == 0:
        for i in indices:
            module = layer_list[i]
            dropped.append((i, module, module.__dict__.get("forward")))
            module.forward = _hooks.skip_forward
    for layer in offloaded:
        if layer.accel_hooks:
            log.info("lp_plugin: taking over Accelerate's offload of layer %d (restored by detach())", layer.index)
            release_accelerate(layer.module, layer.accel_hooks, layer.slots.placeholders(), "cpu")
            for held_dict, full_key, _ in layer.held:
                held_dict.pop(full_key, None)  # our tier holds these bytes now
        host = store.host_buffer(layer.index)
        layer.standby = layer.slots.binding(host[: layer.nbytes] if host is not None else None, main_device)
        layer.standby.apply()
        layer.slots.release_sources()
    if mode == "stream" and offloaded:
        try:
            handle.streamer = _Streamer(handle)
        except BaseException:
            handle.detach()
            raise
    for pos, layer in enumerate(offloaded):
        layer.prior_hook = getattr(layer.module, "_hf_hook", None)
        for hook in _layer_hooks(handle, pos):
            add_hook_to_module(layer.module, hook, append=True)
            layer.added_hook = True
    handle._install_model_wrappers()
    setattr(model, _ATTR, handle)
    return handle


def _layer_hooks(handle, pos):
    out = []
    if handle.streamer is not None:
        out.append(_hooks.StreamHook(handle.streamer, pos))
    elif handle.mode == "session":
        out.append(_hooks.SessionGuardHook(handle, handle.layers[pos].index))
    if 0 < handle.alpha < 1:
        out.append(_hooks.ResidualHook(handle.alpha))
    return out


def _store_layer(store, index, module, main_device, pin) -> _OffLayer:
    """Pack one layer into a flat host buffer and hand it to the tier. Reads the model only."""
    hooks = accelerate_offload_hooks(module)
    source, held = None, []
    if hooks:
        source, held = accelerate_values(module, hooks)
    meta = [n for n, p in module.named_parameters() if p.device.type == "meta" and (source is None or n not in source)]
    if meta:
        raise AttachError(
            f"layer {index} has parameters on the meta device ({meta[:3]}...) and no Accelerate hook holding "
            "their values; load the model's weights before attaching"
        )
    slots = LayerSlots(module, source)
    # detach puts weights back where the plain model runs them: on the main device, or behind
    # the Accelerate hooks we take over
    orig_device = None if hooks else main_device
    flat = allocate_host(slots.nbytes, pin, f"layer {index}")
    slots.pack_into(flat)
    store.put(index, flat, slots.layout_json(), sha256_of(flat))
    return _OffLayer(index, module, slots, orig_device, hooks, held, accel_keys=source or ())
