"""The mover contract: what brings the offloaded layers that compute on one device onto it, and back.

Mover (ABC)                 one per device the offloaded layers compute on; opened by the session gate
| layers, device            the layers it moves (execution order) and where they compute
| open()                    a session starts: the layers can run on the device
| release()                 the session ends: the layers on standby again, the device memory given back
| close()                   detach: release if open, free what open kept between sessions
| is_open, mapped_bytes     a session holds it; device memory it holds outside PyTorch's allocator
| reuses_buffers            layers share device buffers within a forward (forwards one at a time,
|                           no backward)
| layer_hooks(pos, gate)    the hooks that run layer ``pos`` through it
| end_forward(output)       after each forward of the model
|
+-- Residency  (resident.py)  session mode: every layer in one device buffer for the whole session
+-- Ring       (stream.py)    stream mode: each forward pulls the layers through prefetch + 1 buffers
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class Mover(ABC):
    layers: list  # [OffloadedLayer], execution order
    device: torch.device
    # True where the layers share device buffers within a forward: a forward runs alone, and a backward
    # cannot reach the weights a forward read (their buffer holds another layer by then)
    reuses_buffers: ClassVar[bool]

    @abstractmethod
    def open(self) -> None:
        """A session starts: every layer checked, the device memory mapped, the layers bound to it."""

    @abstractmethod
    def release(self) -> None:
        """The session ends: the layers back on standby, the device memory unmapped. An edit this mover
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
        """``[(module, hook)]``: the Accelerate hooks that run layer ``pos`` (execution order) through
        this mover; ``gate`` is the session gate they consult."""

    def end_forward(self, output) -> None:
        """After a forward of the model (also when it raised; ``output`` is None then). Nothing, unless
        the mover's buffers change hands within a forward."""
        return None
