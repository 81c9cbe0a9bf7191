"""Storage tiers for offloaded layers: where a layer's flat buffer lives between uses.

* ``cpu``: one pinned host buffer per layer (plain host memory when there is no CUDA), allocated
  once at attach and never re-pinned; it is also the copy source for every transfer.
* ``disk``: one safetensors file per layer in ``offload_folder`` holding the flat buffer as a single
  ``uint8`` tensor, with the layout and a SHA-256 fingerprint of the source weights in its metadata.
  Files are written atomically (temp file, fsync, rename, fsync of the folder) under a folder lock,
  verified before use (stale, foreign, truncated, bit-flipped and missing files are detected and
  rebuilt from the source weights). Each verified file is then memory-mapped read-only and read
  back with one ``Tensor.copy_`` into a pinned staging buffer: a copy out of the page cache that
  runs on torch's intra-op threads without the GIL (positional reads from a Python thread pool
  stalled on the GIL while the main thread launched kernels).

Third-party tiers subclass :class:`Tier` and register through the ``register_tiers`` plugin hook.
No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import tempfile
from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch

from . import shm
from .errors import OffloadFileError, OffloadResourceError, OffloadSpecError

log = logging.getLogger("lp_plugin")

FORMAT = "lp_plugin.layer/1"
# madvise(2) advice that maps a file's pages in one call (Linux >= 5.14; Python names it from 3.13)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)
_GiB = 1024**3


def allocate_host(nbytes: int, pin: bool, what: str) -> torch.Tensor:
    """A flat uint8 host buffer, pinned when ``pin`` (clear error when the OS refuses)."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    except (RuntimeError, MemoryError) as exc:
        kind = "pinned host memory" if pin else "host memory"
        raise OffloadResourceError(
            f"cannot allocate {nbytes / _GiB:.2f} GiB of {kind} for {what}: {exc}. "
            "Free host memory, offload fewer layers, or use tier='disk' (which pins only small staging buffers)"
        ) from exc


def sha256_of(flat: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()


class Tier(ABC):
    """Where offloaded layers are kept. Subclasses must provide :meth:`put` and :meth:`read_into`;
    a tier that keeps a host buffer per layer also overrides :meth:`host_buffer` so transfers copy
    from it directly (no staging)."""

    name: str = ""

    def __init__(self, *, pin: bool, offload_folder=None, model_tag: str = ""):
        self.pin = pin
        self.offload_folder = offload_folder
        self.model_tag = model_tag

    @abstractmethod
    def put(self, key: str, flat: torch.Tensor, layout: list, sha256: str) -> None:
        """Store one offloaded unit (``key``: ``layer_00004``) whose packed bytes are ``flat`` (host
        uint8, pinned when the tier pins). The tier may keep ``flat`` itself (the cpu tier does)."""

    @abstractmethod
    def host_view(self, key: str) -> torch.Tensor:
        """A host uint8 tensor holding the unit's bytes, valid until :meth:`close`: what the model's
        offloaded tensors point at between uses, so everything the model hands out (``state_dict``,
        ``named_parameters``) is the real weights. Writes through it change memory, never a file."""

    def direct(self, key: str) -> bool:
        """True when :meth:`host_view` is itself the source of transfers (the cpu tier: pinned when
        there is a GPU); else they go through a pinned staging buffer filled by :meth:`read_into`."""
        return False

    def read_into(self, key: str, dst: torch.Tensor) -> None:
        """Copy the unit's bytes into the host uint8 tensor ``dst`` (after :meth:`check`)."""
        self.check(key)
        src = self.host_view(key)
        if dst.numel() != src.numel():
            raise OffloadFileError(f"{describe(key)}: destination holds {dst.numel()} bytes, the tier {src.numel()}")
        dst.copy_(src)

    def check(self, key: str) -> None:
        """Raise :class:`OffloadFileError` if what backs ``key`` changed since it was verified."""

    def host_bytes(self) -> int:
        """Host memory this process holds for the tier (not the page cache, nor memory shared with others)."""
        return 0

    keeps_flat = False  # True when put() keeps the packed buffer itself (it is then allocated pinned)
    read_only = False  # True when the host copy the model points at in standby must not be written
    def close(self) -> None:
        """Release what the tier holds (called on detach and on a failed attach)."""


class CpuTier(Tier):
    """Pinned host memory, one flat buffer per layer. Data-parallel ranks of one host share one copy
    (``shm.py``); then the weights are read-only in standby."""

    name = "cpu"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._buffers: dict = {}
        self._shared: dict = {}
        self.shared = shm.sharing()

    @property
    def keeps_flat(self) -> bool:
        return not self.shared

    @property
    def read_only(self) -> bool:
        return self.shared

    def put(self, key, flat, layout, sha256):
        if self.shared:
            self._shared[key] = shm.SharedBuffer(flat, sha256, self.pin)
            self._buffers[key] = self._shared[key].tensor
        else:
            self._buffers[key] = flat

    def host_view(self, key):
        return self._buffers[key]

    def direct(self, key):
        return True

    def host_bytes(self):
        return 0 if self.shared else sum(b.numel() for b in self._buffers.values())

    def close(self):
        self._buffers.clear()
        for buf in self._shared.values():
            buf.close()
        self._shared.clear()


def describe(key: str) -> str:
    """How messages name a unit: ``layer_00004`` is "layer 4"."""
    kind, _, number = key.rpartition("_")
    return f"{kind} {int(number)}" if kind and number.isdigit() else key


def _layer_file(folder: str, key: str) -> str:
    return os.path.join(folder, f"{key}.safetensors")


def _safetensors_header(nbytes: int, metadata: dict) -> bytes:
    header = {"flat": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]},
              "__metadata__": {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def read_header(fh) -> tuple:
    """Parse a layer file's safetensors header: returns ``(metadata, data_start, nbytes)``.
    Raises ValueError with the reason when it is not a well-formed lp_plugin layer file."""
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        raise ValueError("file is shorter than a safetensors header (truncated or empty)")
    (size,) = struct.unpack("<Q", head)
    if size > 100 * 1024 * 1024:
        raise ValueError(f"header claims {size} bytes: not a safetensors file")
    raw = fh.read(size)
    if len(raw) < size:
        raise ValueError("header is truncated")
    try:
        header = json.loads(raw)
        info, meta = header["flat"], header["__metadata__"]
        start, end = info["data_offsets"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"header is not an lp_plugin layer file ({exc})") from None
    if info.get("dtype") != "U8" or meta.get("format") != FORMAT or start != 0:
        raise ValueError(f"not an lp_plugin layer file (format {meta.get('format')!r})")
    return meta, 8 + size, end


class DiskTier(Tier):
    name = "disk"
    needs_folder = True

    def __init__(self, **kw):
        super().__init__(**kw)
        folder = self.offload_folder
        if folder is None:
            raise OffloadSpecError("tier='disk' needs offload_folder=DIR (a folder on a local disk with room for the offloaded layers)")
        folder = os.path.abspath(os.fspath(folder))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OffloadFileError(f"offload_folder {folder!r} is a file, not a folder; pass a folder path")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise OffloadFileError(f"cannot create offload_folder {folder!r}: {exc.strerror}; pass a writable folder") from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OffloadFileError(f"offload_folder {folder!r} is not writable; pass a writable folder (or fix its permissions)")
        self.offload_folder = folder
        self._files: dict = {}  # key -> _Mapped
        self.report: dict = {}  # key -> "reused" | "written" | "rebuilt: <why>"

    @contextmanager
    def _folder_lock(self):
        """An exclusive lock on the folder while files are checked or written (other processes wait)."""
        path = os.path.join(self.offload_folder, ".lp_plugin.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_existing(self, path, key, layout, sha256, scratch):
        """Return None if ``path`` holds exactly this unit, else the reason it cannot be used."""
        if not os.path.exists(path):
            return "missing"
        try:
            with open(path, "rb") as fh:
                meta, start, nbytes = read_header(fh)
                if json.loads(meta.get("layout", "null")) != layout or meta.get("layer") != key:
                    return "foreign (made from a different model or layer)"
                if meta.get("source_sha256") != sha256:
                    return "stale (the source weights changed since it was written)"
                if nbytes != scratch.numel():
                    return "corrupt (its header's size does not match its layout)"
                size = os.fstat(fh.fileno()).st_size
                if size != start + nbytes:
                    return "truncated" if size < start + nbytes else "corrupt (bytes after its payload)"
                fh.seek(start)
                got = fh.readinto(memoryview(scratch.numpy()))
                if got != nbytes:
                    return "truncated"
                if sha256_of(scratch) != sha256:
                    return "corrupt (its bytes do not match its fingerprint)"
        except ValueError as exc:
            return f"unreadable ({exc})"
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        return None

    def put(self, key, flat, layout, sha256):
        path = _layer_file(self.offload_folder, key)
        with self._folder_lock():
            # temp files of this unit seen under the lock belong to a writer that died (kill -9)
            for name in os.listdir(self.offload_folder):
                if name.startswith(f".{key}.") and name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.offload_folder, name))
            scratch = torch.empty_like(flat)
            why = self._check_existing(path, key, layout, sha256, scratch)
            del scratch
            if why is None:
                self.report[key] = "reused"
            else:
                if why != "missing":
                    log.warning("lp_plugin: offload file %s is %s; rebuilding it from the source weights", path, why)
                self._write(path, key, flat, layout, sha256)
                self.report[key] = "written" if why == "missing" else f"rebuilt: {why}"
            self._open(key, path, sha256)

    def _write(self, path, key, flat, layout, sha256):
        meta = {"format": FORMAT, "layer": key, "model": self.model_tag, "layout": layout,
                "source_sha256": sha256}
        header = _safetensors_header(flat.numel(), meta)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.offload_folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(header)
                fh.write(memoryview(flat.numpy()))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            dfd = os.open(self.offload_folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OffloadResourceError(
                    f"out of disk space in {self.offload_folder!r} while writing {describe(key)} "
                    f"({flat.numel() / _GiB:.2f} GiB); free space there or pass another offload_folder"
                ) from exc
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise OffloadFileError(f"cannot write to offload_folder {self.offload_folder!r} ({exc.strerror}); pass a writable folder") from exc
            raise OffloadFileError(f"writing {describe(key)} to {self.offload_folder!r} failed: {exc}") from exc

    def _open(self, key, path, sha256):
        fh = open(path, "rb")  # kept open: a later replacement of the path cannot change what we read
        try:
            meta, start, nbytes = read_header(fh)
            if meta.get("source_sha256") != sha256:
                raise OffloadFileError(f"{describe(key)}: {path} changed while it was being opened; retry")
            size = os.fstat(fh.fileno()).st_size
            if size < start + nbytes:
                raise OffloadFileError(f"{describe(key)}: {path} was truncated while it was being opened; retry")
            self._files[key] = _Mapped(fh, start, nbytes)
        except BaseException:
            fh.close()
            raise

    def host_view(self, key):
        return self._entry(key).data

    def _entry(self, key):
        entry = self._files.get(key)
        if entry is None:
            raise OffloadFileError(f"{describe(key)} is not in this disk tier")
        return entry

    def check(self, key):
        """Reading a mapped page past the end of a truncated file would kill the process (SIGBUS):
        one fstat before each use (a truncation racing with the copy itself is not caught)."""
        entry = self._entry(key)
        size = os.fstat(entry.fh.fileno()).st_size
        if size < entry.start + entry.nbytes:
            raise OffloadFileError(
                f"{describe(key)}: {entry.fh.name} holds {max(0, size - entry.start)} of its {entry.nbytes} bytes: the file "
                "was truncated after attach, and it was the only copy of these weights; reload the "
                "model (lp_plugin.from_pretrained, or attach a freshly loaded model), which rebuilds the file"
            )

    def drop_page_cache(self) -> None:
        """Unmap this tier's file pages and evict them from the page cache, so that the next read of
        each layer comes from the disk (cold-cache benchmarks). Pages still mapped are never evicted
        by ``posix_fadvise`` alone."""
        for entry in self._files.values():
            if entry.map is not None:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    entry.map.madvise(mmap.MADV_DONTNEED)
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(entry.fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        for entry in self._files.values():
            entry.close()
        self._files.clear()


class _Mapped:
    """One open layer file, mapped read-only; ``data`` is a uint8 tensor over its payload."""

    def __init__(self, fh, start, nbytes):
        self.fh, self.start, self.nbytes = fh, start, nbytes
        # copy-on-write: the model's tensors point here in standby, so a write through them must
        # change memory only (a read-only map would crash the process), never the file
        self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if nbytes else None
        if self.map is not None:
            # map every page now (the file was just verified, so it sits in the page cache): the
            # first forward then takes no page faults; where the kernel lacks MADV_POPULATE_READ
            # (Linux < 5.14), at least start reading ahead
            for advice in (_MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
                if advice is None:
                    continue
                try:
                    self.map.madvise(advice)
                    break
                except (OSError, ValueError):
                    continue
            self.data = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=start)
        else:
            self.data = torch.empty(0, dtype=torch.uint8)

    def close(self):
        self.data = None
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still alive elsewhere: unmapped when it goes
                self.map.close()
        self.fh.close()
