"""Stream mode's ring: each forward pulls the units (offloaded layers and stand-ins) through ``prefetch + 1``
device buffers, unit ``pos`` always in slot ``pos % slots``, copied on a side CUDA stream (or through pinned staging
buffers read by one thread, for a tier without a pinned host copy). Implements the mover contract
(``mover.py``). How and why: docs/architecture.md."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import AttachError
from . import hooks, ops
from .group import edit_error
from .mover import Mover
from .tiers import allocate_host
from .vmm import PlainBuffer, StableBuffer, device_buffer


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


class Ring(Mover):
    reuses_buffers = True

    def __init__(self, units, prefetch: int, device, room_check):
        self.units = units
        self.k = len(units)
        self.prefetch = min(prefetch, self.k - 1)
        self.nslots = self.prefetch + 1
        self.device = device
        self.cuda = device.type == "cuda"
        self.room_check = room_check
        self.slot_bytes = max(u.nbytes for u in units)
        # the tensors a unit reads outside its Linear modules (norm weights: a few KiB) stay on the
        # device while the ring is open, so the ring's ops sit only at the Linear modules' inputs and
        # outputs, where a compiled forward has a kernel boundary anyway (same kernels, same numerics)
        self.other_bytes = [u.layout.other_nbytes for u in units]
        self.nlinear = [len(u.stream_modules) for u in units]
        self.calls = [0] * self.k  # Linear modules of each unit run so far in this forward
        # per unit, the pinned host tensor its tier lends as a copy source, or None: read through staging (set at open)
        self.host: list[torch.Tensor | None] = [None] * self.k
        self.needs_staging = False  # a unit of this session reads through staging
        self._gil_lowered = False  # this session lowered the GIL switch interval (gil_switch)
        self.side = torch.cuda.Stream(device) if self.cuda else None
        # the stream the model computes on: read as the ring opens and as each forward starts (a forward
        # runs on one stream), so the calls per unit need not ask for it (a new Stream object, ~6 us)
        self.compute: torch.cuda.Stream | None = None
        self.on_current_device = False  # the ring's device is the current device (read with compute)
        self.executor: ThreadPoolExecutor | None = None  # the reader thread (made when a unit first reads via staging)
        self.buffer: StableBuffer | PlainBuffer | None = None  # every slot, at a fixed address across sessions
        self.staging: list[torch.Tensor] | None = None
        self.slots: list[torch.Tensor] | None = None
        # the bound tensors of every unit and their versions at open
        self._watched: list[torch.Tensor] = []
        self._versions: list[int] = []
        self._riders: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device, pinned host) pieces, last issued first
        self._riders_done: torch.cuda.Event | None = None  # recorded on the side stream after the last piece
        self.carried = 0  # copies carried (each cut into pieces)
        self.id = ops.register(self)

    @property
    def is_open(self) -> bool:
        return self.slots is not None

    # ------------------------------------------------------------------ open / close
    def open(self):
        for unit in self.units:
            unit.check_intact()
        sources = [unit.tier.host_view(unit.key) for unit in self.units]  # (each checked against its file)
        self.host = [u.tier.transfer_view(u.key) if u.tier.direct(u.key) else None for u in self.units]
        self.room_check(
            self.nslots * self.slot_bytes,
            self.device,
            f"stream mode's ring of {self.nslots} layer buffers",
            "lower prefetch, or offload fewer/smaller layers",
        )
        self.loaded = [torch.cuda.Event() for _ in range(self.nslots)] if self.cuda else None
        self.event_ok = [False] * self.nslots  # loaded[slot] was recorded outside a graph capture
        self.in_capture = [False] * self.k  # the load of unit pos was issued inside the current capture
        self.pending = {}  # pos -> reader-thread future
        self.holds = [None] * self.nslots  # the unit each slot was last loaded with
        self.calls = [0] * self.k
        self._read_compute_stream()
        if self.buffer is None:
            self.buffer = device_buffer(self.nslots * self.slot_bytes + sum(self.other_bytes), self.device)
        flat = self.buffer.map()
        try:
            self.needs_staging = False
            if any(h is None for h in self.host):
                self._start_staging()
            self.slots = [flat[i * self.slot_bytes : (i + 1) * self.slot_bytes] for i in range(self.nslots)]
            offset = self.nslots * self.slot_bytes
            for pos, (unit, nbytes) in enumerate(zip(self.units, self.other_bytes)):
                other = flat[offset : offset + nbytes]
                unit.layout.copy_other(other, sources[pos])
                offset += nbytes
                slot = self.slots[pos % self.nslots]
                unit.bind_slot_(unit.layout.split_binding(slot[: unit.nbytes], other), slot)
            for pos in range(min(self.nslots, self.k)):
                self._issue(pos)
            self._watched = [t for unit in self.units for t in unit._watched]  # (one list: a cheap check per forward)
            self._versions = [t._version for t in self._watched]
        except BaseException:
            self._drain()
            self._unbind()
            self._restore_gil()
            raise

    def _start_staging(self) -> None:
        """From now on in this session a unit reads through staging: the pinned staging buffers (kept across
        sessions), the reader thread, and the GIL switch interval lowered until release. Riders still waiting are
        issued first: from here on the reader thread issues copies on the side stream, and carry refuses."""
        self.flush()
        if self.staging is None:
            self.staging = [
                allocate_host(self.slot_bytes, self.cuda, "stream staging buffers") for _ in range(self.nslots)
            ]
        if self.executor is None:
            self.executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="lp_plugin-reader",
                initializer=_reader_init,  # (not a method: the thread would keep the ring alive)
                initargs=(self.device, self.side),
            )
        if not self._gil_lowered:
            gil_switch.enter()
            self._gil_lowered = True
        self.needs_staging = True

    def _restore_gil(self) -> None:
        if self._gil_lowered:
            gil_switch.leave()
            self._gil_lowered = False

    def _read_compute_stream(self) -> None:
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
            self.on_current_device = self.device.index == torch.cuda.current_device()

    def _unbind(self):
        for unit in self.units:
            unit.unbind_slot_()
        self.slots = None
        assert self.buffer is not None  # mapped by open
        self.buffer.unmap()

    def edited_units(self) -> list:
        """The units changed in place while bound to the ring (their tensors' version counters moved)."""
        return [unit for unit in self.units if unit.bound_flat is not None and unit.edited()]

    def check_unedited(self) -> None:
        """Refuse an in-place edit of an offloaded layer made while the ring is open. Its tensors are
        ring slots, refilled from the tier's copy and shared with other layers between uses: the edit
        could neither be kept nor be used consistently (it may even have landed in another layer's
        bytes), so nothing computes with it and the error says how to edit instead."""
        if [t._version for t in self._watched] != self._versions:
            raise edit_error(self.edited_units())

    def ready_for_replay(self) -> bool:
        """A captured forward starts with the first ``prefetch`` units in their slots, loaded by the forward before it
        (as every completed forward leaves them), and no reader-thread load pending."""
        return (
            self.is_open
            and not self.pending
            and all(self.holds[pos] == pos for pos in range(min(self.prefetch, self.k)))
        )

    def forget_loads(self) -> None:
        """A CUDA graph capture failed: the loads it issued never ran, so every slot is loaded again when its
        unit next needs it (after the loads issued outside it are done)."""
        if self.slots is None:
            return
        if self.cuda:
            assert self.side is not None  # made with the ring on CUDA
            self.side.synchronize()
        self.holds = [None] * self.nslots
        self.in_capture = [False] * self.k
        self.event_ok = [False] * self.nslots
        self.calls = [0] * self.k

    def release(self):
        """End of the session: units back on standby (an edit made inside it is refused: the tier's
        copy is left as it was), the ring's memory given back."""
        edited = self.edited_units()
        self._drain()
        self._unbind()
        self._restore_gil()
        self.host = [None] * self.k  # (what the tiers lent is asked for again at the next open)
        if edited:
            raise edit_error(edited)

    def close(self):
        if self.is_open:
            self.release()
        self._restore_gil()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        if self.buffer is not None:
            self.buffer.close()
        ops.unregister(self.id)
        self.staging = None

    @property
    def mapped_bytes(self) -> int:
        return self.buffer.mapped_bytes if self.buffer is not None else 0

    def layer_hooks(self, pos, gate) -> list:
        """A stream hook on each Linear module of the unit (its module itself if it has none)."""
        return [(module, hooks.StreamHook(gate, self, pos)) for module in self.units[pos].stream_modules]

    def end_forward(self, output) -> None:
        """The forward's :meth:`join`: through its op when compiling (where the forward produced an output)."""
        if torch.compiler.is_compiling():
            if output is not None:
                torch.ops.lp_plugin.ring_join(_first_tensor(output), self.id)
        else:
            self.join()

    # ------------------------------------------------------------------ copies
    def _issue(self, pos):
        """Start copying unit ``pos`` into its slot once the compute stream is past its previous user."""
        capturing = self.cuda and torch.cuda.is_current_stream_capturing()
        unit = self.units[pos]
        if capturing and (self.host[pos] is None or unit.tier.checks_files):
            raise AttachError(
                "stream mode on a tier without a pinned host copy (disk) cannot run inside a CUDA graph: "
                "use tier='cpu' for captured or compiled decoding (decode='graph', torch.compile with CUDA graphs), "
                "or decode eagerly (decode='eager'; generate(disable_compile=True) for transformers' own compile)"
            )
        if self.host[pos] is not None and not unit.tier.direct(unit.key):
            self._start_staging()  # the tier took its copy source back (an edit, a cold-cache benchmark)
            self.host[pos] = None
        self.in_capture[pos] = capturing
        self.holds[pos % self.nslots] = pos
        fork = None
        if self.cuda:
            assert self.compute is not None  # read as the ring opened
            fork = torch.cuda.Event()
            self.compute.record_event(fork)
        src = self.host[pos]
        if src is None:
            assert self.executor is not None  # made where a unit reads through staging
            self.pending[pos] = self.executor.submit(self._read_and_copy, pos, fork)
        else:
            unit.tier.check(unit.key)
            self._copy(pos, src[: unit.nbytes], fork, capturing)

    def _copy(self, pos, src, fork, capturing, reader: bool = False):
        """Copy ``src`` into unit ``pos``'s slot on the side stream, after ``fork``. The reader thread's
        current stream is the side stream already; the main thread switches to it and back by
        ``set_stream`` (the ``torch.cuda.stream`` context costs ~10 us more a load), or by that context
        where the ring's device is not the current one (``set_stream`` would change the current device)."""
        slot = pos % self.nslots
        assert self.slots is not None  # the ring is open
        dst = self.slots[slot][: src.numel()]
        if not self.cuda:
            dst.copy_(src)
            return
        assert self.side is not None and self.compute is not None  # made and read with the ring on CUDA
        self.side.wait_event(fork)
        if reader:
            self._load(dst, src, slot, capturing)
        elif self.on_current_device:
            torch.cuda.set_stream(self.side)
            try:
                self._load(dst, src, slot, capturing)
            finally:
                torch.cuda.set_stream(self.compute)
        else:
            with torch.cuda.stream(self.side):
                self._load(dst, src, slot, capturing)
        self.event_ok[slot] = not capturing

    def _load(self, dst, src, slot, capturing) -> None:
        """The copy into ``dst`` and its event (current stream: the side stream)."""
        assert self.side is not None and self.loaded is not None  # made with the ring on CUDA
        dst.copy_(src, non_blocking=True)
        self.loaded[slot].record(self.side)
        if self._riders and not capturing:
            self._ride()  # after the unit's event: the unit does not wait for the piece

    # ------------------------------------------------------------------ a copy riding along
    def carry(self, pairs, done: torch.cuda.Event) -> bool:
        """Copy ``pairs`` (``[(device tensor, pinned host tensor of the same bytes)]``) on the side stream, cut into
        about one piece per unit, each issued after the next unit's copy; ``done`` is recorded after the last. The
        side stream first waits for the compute stream's queue as it is now (where the device tensors were
        allocated). False where the ring cannot carry them (closed, not CUDA, reading through staging, or carrying
        already): the caller copies them itself. :meth:`flush` issues what is left at once."""
        if not (self.cuda and self.is_open) or self.needs_staging or self._riders_done is not None:
            return False
        assert self.side is not None  # made with the ring on CUDA
        # the units loaded after this point of a forward: all but the first prefetch ones, which the previous
        # forward's end loaded (later loads are the next forward's, which wait for this one's last layers)
        pieces = max(1, self.k - self.prefetch)
        total = sum(dst.numel() * dst.element_size() for dst, _ in pairs)
        step = max(1, -(-total // pieces))
        riders = []
        for dst, src in pairs:
            d, h = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
            riders += [(d[i : i + step], h[i : i + step]) for i in range(0, d.numel(), step)]
        if not riders:
            return False
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        self._riders, self._riders_done = riders[::-1], done
        self.carried += 1
        return True

    def _ride(self) -> None:
        """Issue the next piece (current stream: the side stream)."""
        dst, src = self._riders.pop()
        dst.copy_(src, non_blocking=True)
        if not self._riders:
            assert self._riders_done is not None  # set by carry with the pieces
            self._riders_done.record()
            self._riders_done = None

    def flush(self) -> None:
        """Issue every piece still waiting (its ``done`` recorded after them)."""
        if self._riders_done is None:
            return
        assert self.side is not None  # carry only runs on CUDA
        with torch.cuda.stream(self.side):
            while self._riders:
                self._ride()

    def _read_and_copy(self, pos, fork):
        """Reader thread (current stream: the side stream): the slot's staging buffer from the tier, then
        its copy into the slot. Few calls: each return from a call that released the GIL waits for the
        GIL while the main thread launches kernels."""
        slot = pos % self.nslots
        unit = self.units[pos]
        assert self.staging is not None  # made by open where a unit reads through staging
        buf = self.staging[slot][: unit.nbytes]
        if self.cuda and self.event_ok[slot]:
            assert self.loaded is not None  # made with the ring on CUDA
            self.loaded[slot].synchronize()  # the previous copy out of this staging buffer is done
        unit.tier.read_into(unit.key, buf)
        self._copy(pos, buf, fork, False, reader=True)

    def _drain(self):
        self.flush()
        for fut in list(self.pending.values()):
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - the error was raised to the forward that needed it
                pass
        self.pending = {}
        if self.cuda:
            assert self.side is not None  # made with the ring on CUDA
            self.side.synchronize()
            torch.cuda.current_stream(self.device).synchronize()

    # ------------------------------------------------------------------ what the hooks and ops call
    def enter(self, pos) -> bool:
        """A Linear module of unit ``pos`` is about to run; True for the unit's first one in this forward."""
        first = self.calls[pos] == 0
        self.calls[pos] += 1
        return first

    def leave(self, pos) -> bool:
        """A Linear module of unit ``pos`` ran; True for the unit's last one in this forward."""
        if self.calls[pos] < self.nlinear[pos]:
            return False
        self.calls[pos] = 0
        return True

    def wait(self, pos):
        """Before unit ``pos`` reads its weights: its bytes are in its slot."""
        if self.slots is None:
            raise AttachError(
                f"offloaded layer {self.units[pos].index} was called outside a forward of the model, so no ring "
                "buffer holds it; call the model itself, or wrap the call in `with lp_plugin.session(model):`"
            )
        if pos == 0:
            self._read_compute_stream()
            if not torch.compiler.is_compiling():
                self.check_unedited()  # before any streamed unit of this forward reads its weights
        slot = pos % self.nslots
        if self.holds[slot] != pos:
            # the last slot's first unit is loaded as a forward starts (the copy engine then has work at
            # once); or a forward was cut short (an exception): a copy queues behind the side stream's others
            self._issue(pos)
        fut = self.pending.pop(pos, None)
        if fut is not None:
            fut.result()
        if not self.cuda:
            return
        assert self.side is not None and self.loaded is not None  # made with the ring on CUDA
        stream = self.compute
        assert stream is not None  # read as the ring opened
        if torch.cuda.is_current_stream_capturing():
            if self.in_capture[pos]:  # (a load issued before the capture was complete when it began)
                stream.wait_event(self.loaded[slot])
                self.in_capture[pos] = False
        elif self.event_ok[slot]:
            stream.wait_event(self.loaded[slot])
        else:
            stream.wait_stream(self.side)  # the event was recorded inside a capture: not usable here

    def done(self, pos):
        """After unit ``pos`` read its weights, its slot is free: load the slot's next user in this
        forward, or in the next one (but for the last slot, whose load starts the next forward)."""
        nxt = pos + self.nslots
        if nxt < self.k:
            self._issue(nxt)
        elif pos % self.nslots < self.nslots - 1:
            self._issue(pos % self.nslots)

    def join(self):
        """End of a forward: the compute stream waits for the loads of the next forward's first units
        (a CUDA graph must join its side-stream work before its capture ends)."""
        self.calls = [0] * self.k  # (a forward cut short by an exception leaves counts behind)
        if self.slots is None or not self.cuda:
            return
        stream = self.compute
        assert stream is not None  # read as the ring opened
        capturing = torch.cuda.is_current_stream_capturing()
        for pos in range(min(self.nslots - 1, self.k)):
            slot = pos % self.nslots
            if pos in self.pending or self.holds[slot] != pos:
                continue  # a reader-thread load (the unit waits for it itself), or a forward cut short
            if capturing:
                if self.in_capture[pos]:
                    stream.wait_event(self.loaded[slot])
            elif self.event_ok[slot]:
                stream.wait_event(self.loaded[slot])
            else:
                stream.wait_stream(self.side)
            self.in_capture[pos] = False


def _reader_init(device, side) -> None:
    """The reader thread computes on the ring's device, its current stream the side stream."""
    if side is not None:
        torch.cuda.set_device(device)
        torch.cuda.set_stream(side)


def _first_tensor(output):
    """The hidden states of a base model's output (a ModelOutput, a tuple or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]
