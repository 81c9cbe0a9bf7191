"""Session mode on one device: for the length of a session every unit computing on that device (offloaded
layers and stand-ins) is resident, in one device buffer at a fixed address (``vmm.py``), so a compiled
forward's CUDA graphs stay valid from one session to the next; between sessions the buffer's memory is
given back and the units point at their tier's host copy again. Implements the mover contract (``mover.py``)."""

from __future__ import annotations

import time

from . import hooks
from .group import Stager
from .mover import Mover
from .vmm import PlainBuffer, StableBuffer, device_buffer


class Residency(Mover):
    reuses_buffers = False

    def __init__(self, units, device, room_check, stats):
        self.units = units
        self.device = device
        self.room_check = room_check
        self.stats = stats
        self.nbytes = sum(u.nbytes for u in units)
        self.buffer: StableBuffer | PlainBuffer | None = None
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def mapped_bytes(self) -> int:
        return self.buffer.mapped_bytes if self.buffer is not None else 0

    def open(self) -> None:
        t0 = time.perf_counter()
        for unit in self.units:
            unit.check_intact()
        self.room_check(
            self.nbytes,
            self.device,
            "a session (all offloaded layers resident)",
            "use mode='stream', or offload fewer layers",
        )
        if self.buffer is None:
            self.buffer = device_buffer(self.nbytes, self.device)
        loaded = []
        try:
            flat, offset = self.buffer.map(), 0
            with Stager(self.units, self.device.type == "cuda", self.device) as stager:
                for unit in self.units:
                    unit.onload_(flat[offset : offset + unit.nbytes], stager.source(unit))
                    offset += unit.nbytes
                    loaded.append(unit)
        except BaseException:
            for unit in loaded:
                unit.to_standby()
            self.buffer.unmap()
            raise
        self._open = True
        self.stats["sessions"] += 1
        self.stats["session_load_s"] += time.perf_counter() - t0

    def release(self) -> None:
        """End of the session: edits made on the device are written back, the memory given back."""
        for unit in self.units:
            unit.to_standby()
        assert self.buffer is not None  # mapped by open
        self.buffer.unmap()
        self._open = False

    def close(self) -> None:
        if self.is_open:
            self.release()
        if self.buffer is not None:
            self.buffer.close()

    def layer_hooks(self, pos, gate) -> list:
        """A session hook on the unit's module: it refuses to run outside a session."""
        unit = self.units[pos]
        return [(unit.module, hooks.SessionHook(gate, unit))]
