"""The mover contract: what brings the units that compute on one device (offloaded layers and stand-ins,
``group.py``) onto it, and back.

Mover (ABC)                 one per device the units compute on; opened by the session gate
| units, device             the units it moves (execution order) and where they compute
| open()                    a session starts: the units can run on the device
| release()                 the session ends: the units on standby again, the device memory given back
| close()                   detach: release if open, free what open kept between sessions
| is_open, mapped_bytes     a session holds it; device memory it holds outside PyTorch's allocator
| reuses_buffers            units share device buffers within a forward (forwards one at a time,
|                           no backward)
| layer_hooks(pos, gate)    the hooks that run unit ``pos`` through it
| end_forward(output)       after each forward of the model
| check_unedited()          before a replayed CUDA graph reads the units (graphs.py): refuse an edit it
|                           could not keep
| forget_loads()            after a failed CUDA graph capture: loads issued inside it never ran
| ready_for_replay()        its buffers hold what a captured forward expects at its start
|
+-- Residency  (resident.py)  session mode: every unit in one device buffer for the whole session
+-- Ring       (stream.py)    stream mode: each forward pulls the units through prefetch + 1 buffers
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .group import OffloadedUnit


class Mover(ABC):
    units: list[OffloadedUnit]  # offloaded layers and stand-ins, execution order
    device: torch.device
    # True where the units share device buffers within a forward: a forward runs alone, and a backward
    # cannot reach the weights a forward read (their buffer holds another layer by then)
    reuses_buffers: ClassVar[bool]

    @abstractmethod
    def open(self) -> None:
        """A session starts: every unit checked, the device memory mapped, the units bound to it."""

    @abstractmethod
    def release(self) -> None:
        """The session ends: the units back on standby, the device memory unmapped. An edit this mover
        cannot keep is raised after everything is released."""

    @abstractmethod
    def close(self) -> None:
        """Detach: released if open, and what is kept between sessions (buffers, threads) freed."""

    @property
    @abstractmethod
    def is_open(self) -> bool: ...

    @property
    @abstractmethod
    def mapped_bytes(self) -> int:
        """Device memory held outside PyTorch's allocator (not in ``torch.cuda.memory_allocated``)."""

    @abstractmethod
    def layer_hooks(self, pos: int, gate) -> list[tuple[torch.nn.Module, Any]]:
        """``[(module, hook)]``: the Accelerate hooks that run unit ``pos`` (execution order) through
        this mover; ``gate`` is the session gate they consult."""

    def end_forward(self, output) -> None:
        """After a forward of the model (also when it raised; ``output`` is None then). Nothing, unless
        the mover's buffers change hands within a forward."""
        return None

    def check_unedited(self) -> None:
        """Before a CUDA graph replays a forward (``graphs.py``), which runs none of the hooks: refuse an edit of
        a unit this mover could not keep. Nothing, unless edits inside a session are refused."""
        return None

    def forget_loads(self) -> None:
        """After a CUDA graph capture failed: the copies issued inside it never ran, so nothing may count on
        them. Nothing, unless the mover copies within a forward."""
        return None

    def ready_for_replay(self) -> bool:
        """Whether the device buffers hold what a captured forward expects as it starts (a forward cut short by an
        exception may have left them out of step). True, unless the mover copies within a forward."""
        return True
