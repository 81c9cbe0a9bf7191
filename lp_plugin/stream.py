"""Stream mode's ring: every forward pulls each offloaded layer through ``prefetch + 1`` device buffers.

Load ``n`` is layer ``n % k`` into ring slot ``n % slots``. Copies run on a side CUDA stream from
pinned host memory, ``prefetch`` loads ahead of the layer that runs (wrapping into the next
forward), ordered with events: the compute stream waits only for the slot it needs, and a copy into
a slot waits only for the layer that last used it. A layer's tensors point at its slot for its own
forward and at the tier's host copy otherwise, so the model never hands out ring-slot bytes. A tier
without a pinned host copy (disk) is read by one reader thread into pinned staging buffers.

The ring is allocated when a session opens (every ``generate()`` call and bare forward opens one)
and freed when it closes, so standby VRAM holds no ring. On a machine without CUDA the same code
runs with plain host copies.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import AttachError
from .tiers import allocate_host


class GilSwitch:
    """While a ring reads from a tier without a pinned host copy (disk), the reader thread needs the
    GIL back after every read and copy, and the main thread holds it while it launches kernels: a
    waiting thread gets it only after ``sys.getswitchinterval()`` (5 ms by default), longer than a
    layer takes to move. So while such a ring is open the interval is lowered to 0.5 ms, and put back
    when the last one closes (unless someone else changed it meanwhile, or it was shorter already)."""

    INTERVAL = 0.0005

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    def enter(self):
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                if self._saved > self.INTERVAL:
                    sys.setswitchinterval(self.INTERVAL)
            self._users += 1

    def leave(self):
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._saved is not None:
                if self._saved > self.INTERVAL and abs(sys.getswitchinterval() - self.INTERVAL) < 1e-9:
                    sys.setswitchinterval(self._saved)
                self._saved = None


gil_switch = GilSwitch()


class Ring:
    def __init__(self, layers, prefetch: int, device, room_check):
        self.layers = layers
        self.k = len(layers)
        self.prefetch = min(prefetch, self.k - 1)
        self.nslots = self.prefetch + 1
        self.device = device
        self.cuda = device.type == "cuda"
        self.room_check = room_check
        self.slot_bytes = max(l.nbytes for l in layers)
        # a direct copy source per layer (the tier's pinned host copy), or None: read through staging
        self.host = [l.tier.host_view(l.key) if l.tier.direct(l.key) else None for l in layers]
        self.needs_staging = any(h is None for h in self.host)
        if self.cuda:
            self.side = torch.cuda.Stream(device)
        # the reader thread issues its copies on the side stream (its current stream, set once)
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lp_plugin-reader", initializer=self._reader_init)
                         if self.needs_staging else None)
        self.slots = None
        self.staging = None

    @property
    def is_open(self):
        return self.slots is not None

    def open(self):
        self.room_check(self.nslots * self.slot_bytes, f"stream mode's ring of {self.nslots} layer buffers",
                        "lower prefetch, or offload fewer/smaller layers")
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]
        # bindings[pos][slot]: views of ring slot `slot` laid out for layer `pos`
        self.bindings = [[l.slots.binding(s[: l.nbytes]) for s in self.slots] for l in self.layers]
        if self.needs_staging and self.staging is None:
            self.staging = [allocate_host(self.slot_bytes, self.cuda, "stream staging buffers") for _ in range(self.nslots)]
        if self.cuda:
            self.loaded = [torch.cuda.Event() for _ in range(self.nslots)]
            self.freed = [torch.cuda.Event() for _ in range(self.nslots)]
        if self.needs_staging:
            gil_switch.enter()  # left in close_ring
        self.pending = {}
        self.issued = 0  # next load number to issue
        self.cur = 0  # load number the next acquire expects

    def close_ring(self):
        self._drain()
        for layer in self.layers:
            layer.offload_()
        self.slots = self.bindings = None
        if self.needs_staging:
            gil_switch.leave()

    def _reader_init(self):
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.side)

    def _enqueue(self, slot, src):
        """Copy ``src`` into ring slot ``slot`` once the layer that last used it is done, and mark it
        loaded. On CUDA the current stream must be the side stream."""
        dst = self.slots[slot][: src.numel()]
        if self.cuda:
            self.side.wait_event(self.freed[slot])
            dst.copy_(src, non_blocking=True)
            self.loaded[slot].record(self.side)
        else:
            dst.copy_(src)

    def _read_and_copy(self, n):
        """Reader thread (current stream: the side stream): staging buffer ``n % slots`` from the tier,
        then its copy into ring slot ``n % slots``. Few calls: each return from a call that released the
        GIL waits for the GIL while the main thread launches kernels."""
        pos, slot = n % self.k, n % self.nslots
        layer = self.layers[pos]
        buf = self.staging[slot][: layer.nbytes]
        if self.cuda:
            # the previous copy out of this staging buffer was the previous load into this ring slot
            self.loaded[slot].synchronize()
        layer.tier.read_into(layer.key, buf)
        self._enqueue(slot, buf)

    def _issue(self, n):
        pos = n % self.k
        host = self.host[pos]
        if host is None:
            self.pending[n] = self.executor.submit(self._read_and_copy, n)
            return
        self.layers[pos].tier.check(self.layers[pos].key)
        with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
            self._enqueue(n % self.nslots, host[: self.layers[pos].nbytes])

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
        self.bindings[pos][slot].apply()

    def release(self, pos):
        n = self.cur
        if self.cuda:
            self.freed[n % self.nslots].record(torch.cuda.current_stream(self.device))
        self.layers[pos].standby.apply()
        self.cur = n + 1

    def close(self):
        if self.is_open:
            self.close_ring()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.staging = None
