"""The storage tier interface every tier implements, and the helpers tiers and the engine share
(host buffers, fingerprints, how a unit is named in messages)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import torch

from ...errors import OffloadFileError, OffloadResourceError
from ..report import GIB

ALIGN = 4096  # host buffers start on a page: direct I/O reads into them (tiers/layerfile.py)


def allocate_host(nbytes: int, pin: bool, what: str) -> torch.Tensor:
    """A flat uint8 host buffer starting on an :data:`ALIGN` boundary, pinned when ``pin`` (clear error
    when the OS refuses)."""
    try:
        if pin:  # pinned blocks are whole pages (checked: over-allocating would cross the allocator's size classes)
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            if buf.data_ptr() % ALIGN == 0:
                return buf
            del buf
        buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
        skip = -buf.data_ptr() % ALIGN
        return buf[skip : skip + nbytes]
    except (RuntimeError, MemoryError) as exc:
        kind = "pinned host memory" if pin else "host memory"
        raise OffloadResourceError(
            f"cannot allocate {nbytes / GIB:.2f} GiB of {kind} for {what}: {exc}. "
            "Free host memory, offload fewer layers, or use tier='disk' (which pins only small staging buffers)"
        ) from exc


def available_host_memory() -> int | None:
    """Bytes of host memory available to new work without swapping (``MemAvailable`` in ``/proc/meminfo``:
    free memory and reclaimable caches), or None where the platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sha256_of(flat) -> str:
    """Hex SHA-256 of a host uint8 tensor (or any buffer): the fingerprint of a unit's bytes."""
    data = flat.numpy().data if isinstance(flat, torch.Tensor) else flat
    return hashlib.sha256(data).hexdigest()


def describe(key: str) -> str:
    """How messages name a unit: ``layer_00004`` is "layer 4"."""
    kind, _, number = str(key).rpartition("_")
    return f"{kind} {int(number)}" if kind and number.isdigit() else str(key)


class Tier(ABC):
    """Where offloaded layers live between uses. The engine uses exactly this interface.

    Construction: ``Tier(pin=bool, offload_folder=str | None, model_tag=str)``; ``pin`` says whether
    host buffers should be pinned (there is a GPU), ``offload_folder`` is the folder of a tier whose
    class sets ``needs_folder = True`` (None: the tier's choice, the disk tier a temporary folder; a tier whose class
    leaves ``needs_folder`` False is refused an ``offload_folder`` up front), and
    ``model_tag`` names the model in anything the tier records.

    Per unit (``key`` such as ``"layer_00004"``):

    * :meth:`put` stores the unit once at attach (verify what is already there, or write it);
    * :meth:`host_view` is the host uint8 tensor the model's tensors point at between uses;
    * :meth:`direct` says whether transfers copy straight from pinned host memory the tier lends,
      :meth:`transfer_view` (by default the host view itself), or go through a pinned staging
      buffer filled by :meth:`read_into`;
    * :meth:`check` raises :class:`OffloadFileError` if what backs the unit changed since it was
      verified; the engine calls it (directly or through :meth:`read_into`) before every copy of
      the unit, including the one :meth:`OffloadHandle.detach` makes.

    And for the whole tier: :meth:`close` (detach, failed attach), :meth:`drop_page_cache`
    (cold-cache benchmarks), :meth:`host_bytes` (host memory it holds), :meth:`bytes_read` (what
    transfers read from storage), ``host_budget`` (``max_memory["cpu"]`` where given, set by attach),
    ``checks_files`` (True when :meth:`check` guards bytes that can change behind the tier: a copy
    captured in a CUDA graph would replay without it), ``keeps_flat`` (True when :meth:`put` keeps
    the packed buffer itself, which is then allocated pinned), ``read_only`` (True when the host copy
    the model points at in standby must not be written) and ``report``: key -> ``"reused"``,
    ``"written"`` or ``"rebuilt: <why>"`` for tiers that keep files (empty for the others).

    Third-party tiers subclass this class and register through the ``register_tiers`` plugin hook.
    """

    name: str = ""
    needs_folder: bool = False
    keeps_flat: bool = False
    read_only: bool = False
    checks_files: bool = False
    host_budget: int | None = None  # max_memory["cpu"] where one is given: host memory the process may hold

    def __init__(self, *, pin: bool, offload_folder=None, model_tag: str = ""):
        self.pin = pin
        self.offload_folder = offload_folder
        self.model_tag = model_tag
        self.report: dict = {}

    @abstractmethod
    def put(self, key: str, flat: torch.Tensor, layout: list, sha256: str) -> None:
        """Store one unit whose packed bytes are ``flat`` (host uint8, pinned when the tier pins),
        laid out as ``layout`` (JSON-ready list) and fingerprinted by ``sha256`` (hex SHA-256 of
        ``flat``). Verify-or-write: a tier that finds the unit already stored and intact reuses it.
        The tier may keep ``flat`` itself (the cpu tier does)."""

    @abstractmethod
    def host_view(self, key: str) -> torch.Tensor:
        """A host uint8 tensor holding the unit's bytes, valid until :meth:`close`: what the model's
        offloaded tensors point at between uses, so everything the model hands out (``state_dict``,
        ``named_parameters``) is the real weights. Writes through it change memory, never a file.
        A tier whose bytes can change behind it (files) runs :meth:`check` here too."""

    def direct(self, key: str) -> bool:
        """True when transfers copy straight from :meth:`transfer_view` (the cpu tier's host copy, pinned when
        there is a GPU); else they go through a pinned staging buffer filled by :meth:`read_into`. It may turn
        False during the tier's life (an edit written to the host view, a cold-cache benchmark), never True
        again for that unit."""
        return False

    def transfer_view(self, key: str) -> torch.Tensor:
        """Where :meth:`direct` is True: the host uint8 tensor transfers copy the unit from (by default the
        :meth:`host_view` itself), valid while :meth:`direct` stays True; the engine runs :meth:`check` before
        each copy out of it."""
        return self.host_view(key)

    def read_into(self, key: str, dst: torch.Tensor) -> None:
        """:meth:`check` the unit, then copy its bytes into the host uint8 tensor ``dst``."""
        self.check(key)
        src = self.host_view(key)
        if dst.numel() != src.numel():
            raise OffloadFileError(
                f"{describe(key)}: destination holds {dst.numel()} bytes, the tier {src.numel()}; "
                "pass a buffer of exactly the unit's size"
            )
        dst.copy_(src)

    def mark_written(self, key: str) -> None:  # noqa: B027 - optional, a no-op by default
        """The unit's :meth:`host_view` was written (an edit kept in standby): later transfers must carry it (a
        tier whose transfers read something else, such as the disk tier's files, reads the view from now on)."""

    def check(self, key: str) -> None:  # noqa: B027 - optional, a no-op by default
        """Raise :class:`OffloadFileError` if what backs ``key`` changed since it was verified
        (nothing can change behind a tier that keeps the bytes in its own memory)."""

    def host_bytes(self) -> int:
        """Host memory this process holds for the tier (not the page cache, nor memory shared with others)."""
        return 0

    def bytes_read(self) -> tuple[int, int]:
        """``(bytes read from storage, of which with direct I/O past the page cache)`` by transfers since
        the units were put (0, 0 for a tier that keeps its units in memory)."""
        return 0, 0

    def shared_host_bytes(self) -> int:
        """Host memory this process maps from the copy the ranks of one host share (counted once per host)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Release what the tier holds (called on detach and on a failed attach)."""

    def remove_files(self) -> list:
        """Delete the files this tier wrote (``detach(remove_files=True)``), before :meth:`close`;
        returns the paths removed (none for a tier without files)."""
        return []

    def drop_page_cache(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Evict the tier's files from the page cache (cold-cache benchmarks); no-op without files."""
