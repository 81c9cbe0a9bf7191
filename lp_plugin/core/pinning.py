"""Host memory lent to CUDA as a copy source (``cudaHostRegister``, read-only): mappings that were not allocated
pinned (shared host copies, page-cached layer files) become sources the GPU copies from at the link's full speed,
without a second copy in host memory. A refusal leaves no CUDA error behind for the next kernel launch to report.

A :class:`Lent` mapping is given back when it is released, or, when its owner is collected without releasing it (a
model deleted without ``detach``), at the next safe point (:func:`give_back_collected`): CUDA must never keep an
address range registered that the process may map again (its next use there fails, "resource already mapped"), and
a collection, which may come at any allocation, in any thread, during a CUDA graph capture, never calls CUDA itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import threading
import warnings
import weakref

import torch

log = logging.getLogger("lp_plugin")

READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads; no page is made writable (no copy-on-write)


_NOT_REGISTERED = 713  # cudaErrorHostMemoryNotRegistered: nothing to give back
_collected: list = []  # (pointer, mapping) of Lent objects collected unreleased, kept mapped until given back
_stuck: list = []  # those CUDA would not unregister: kept mapped for the process's life rather than reused
_collected_lock = threading.Lock()


def register(ptr: int, nbytes: int) -> bool:
    """Register ``nbytes`` of host memory at ``ptr`` (page-aligned) read-only; False where CUDA refuses."""
    give_back_collected()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, READ_ONLY))
    if err == 0:
        return True
    _clear_error()
    log.info("lp_plugin: CUDA refused to register %d bytes of host memory (error %d)", nbytes, err)
    return False


def unregister(ptr: int) -> bool:
    """Give back memory :func:`register` lent; whether it is no longer registered (True in a forked child, where
    the registration was the parent's)."""
    if torch.cuda._is_in_bad_fork():
        return True
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        _clear_error()
    return err in (0, _NOT_REGISTERED)


class Lent:
    """``mapping``'s memory registered with CUDA (:func:`register`): :attr:`tensor` is a copy source at the link's
    full speed. :meth:`release` gives it back and closes the mapping. Collected unreleased (its owner dropped without
    closing), it is queued, still mapped, for :func:`give_back_collected`. Never unmapped while registered. Where
    CUDA refuses, :attr:`ok` is False and nothing is held."""

    def __init__(self, mapping: mmap.mmap):
        with warnings.catch_warnings():  # (a read-only buffer: nothing writes through this tensor)
            warnings.simplefilter("ignore", UserWarning)
            base = torch.frombuffer(mapping, dtype=torch.uint8)
        self.ok = register(base.data_ptr(), base.numel())
        self.tensor: torch.Tensor | None = base if self.ok else None
        self.mapping: mmap.mmap | None = mapping if self.ok else None
        self._on_collect = weakref.finalize(self, _queue_collected, base.data_ptr(), mapping)
        self._on_collect.atexit = False  # (the process ending gives everything back)
        if not self.ok:
            self._on_collect.detach()  # nothing lent; the mapping stays its caller's

    def release(self) -> None:
        """Give the memory back now and close the mapping, so that its pages can leave the page cache. The caller
        makes sure no copy from it is in flight and that no view of :attr:`tensor` is used after."""
        held = self._on_collect.detach()  # (None once given back)
        self.tensor = None
        mapping, self.mapping = self.mapping, None
        if held is None or mapping is None:
            return
        if not unregister(held[2][0]):
            with _collected_lock:
                _stuck.append(mapping)
            return
        with contextlib.suppress(BufferError):
            mapping.close()


def _queue_collected(ptr: int, mapping: mmap.mmap) -> None:
    """A :class:`Lent` collected unreleased: no CUDA call here (a collection may run inside a graph capture, or in
    a reader thread); the mapping stays mapped, held by the queue, until :func:`give_back_collected`."""
    with _collected_lock:
        _collected.append((ptr, mapping))


def give_back_collected() -> int:
    """Unregister what :class:`Lent` objects collected unreleased still hold, after the devices are done with it,
    and let their mappings go (each unmapped with its last view). Called where lp_plugin is about to lend or load:
    a new registration, an attach, a session; skipped while the current stream captures a CUDA graph. Returns how
    many were given back."""
    if not _collected or not torch.cuda.is_initialized() or torch.cuda.is_current_stream_capturing():
        return 0
    with _collected_lock:
        queued, _collected[:] = list(_collected), []
    with contextlib.suppress(Exception):  # (a failed synchronization is the copies' own error, reported by them)
        synchronize_devices()
    for ptr, mapping in queued:
        if not unregister(ptr):
            with _collected_lock:
                _stuck.append(mapping)
    return len(queued)


def synchronize_devices() -> None:
    """Wait for the work queued on every GPU this process has a context on (a copy from lent memory may be in flight
    on any of them), creating none; nothing in a forked child, where CUDA cannot be used (nor was lent anything)."""
    if not torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork():
        return
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    for index in range(torch.cuda.device_count()):
        if has_context is None or has_context(index):
            torch.cuda.synchronize(index)


def _clear_error() -> None:
    """Reset the calling thread's last CUDA error: PyTorch checks it after each kernel launch, and a refused
    registration (handled here) would surface there as that kernel's failure."""
    for get_last in _get_last_error():
        get_last()


@functools.cache
def _get_last_error() -> tuple:
    """``cudaGetLastError`` of each CUDA runtime this process loaded (PyTorch's bindings do not expose it; which
    runtime PyTorch's own calls went through is not known here, and asking one that was not used changes nothing)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcudart" in line})
    except OSError:
        paths = []
    found = []
    for path in [*paths, None]:  # None: a runtime linked into PyTorch itself
        try:
            fn = ctypes.CDLL(path).cudaGetLastError
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        found.append(fn)
    return tuple(found)
