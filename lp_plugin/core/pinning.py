"""Host memory lent to CUDA as a copy source (``cudaHostRegister``, read-only): mappings that were not allocated
pinned (shared host copies, page-cached layer files) become sources the GPU copies from at the link's full speed,
without a second copy in host memory. A refusal leaves no CUDA error behind for the next kernel launch to report.
A :class:`Lent` mapping is given back when it is released or collected, before the mapping can go: CUDA must never
keep an address range registered that the process may map again (its next use there fails, "resource already
mapped")."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import warnings
import weakref

import torch

log = logging.getLogger("lp_plugin")

READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads; no page is made writable (no copy-on-write)


def register(ptr: int, nbytes: int) -> bool:
    """Register ``nbytes`` of host memory at ``ptr`` (page-aligned) read-only; False where CUDA refuses."""
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, READ_ONLY))
    if err == 0:
        return True
    _clear_error()
    log.info("lp_plugin: CUDA refused to register %d bytes of host memory (error %d)", nbytes, err)
    return False


def unregister(ptr: int) -> None:
    """Give back memory :func:`register` lent (nothing in a forked child: the registration was the parent's)."""
    if torch.cuda._is_in_bad_fork():
        return
    if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
        _clear_error()


class Lent:
    """``mapping``'s memory registered with CUDA (:func:`register`): :attr:`tensor` is a copy source at the link's
    full speed. :meth:`release` gives it back and closes the mapping. Collecting this object (its owner dropped
    without closing, such as a model deleted without ``detach``) gives it back too, after the devices are done with
    it, and leaves the mapping to go with its last view: never unmapped while still registered, never unmapped
    under a live view. Where CUDA refuses, :attr:`ok` is False and nothing is held."""

    def __init__(self, mapping: mmap.mmap):
        with warnings.catch_warnings():  # (a read-only buffer: nothing writes through this tensor)
            warnings.simplefilter("ignore", UserWarning)
            base = torch.frombuffer(mapping, dtype=torch.uint8)
        self.ok = register(base.data_ptr(), base.numel())
        self.tensor: torch.Tensor | None = base if self.ok else None
        self.mapping: mmap.mmap | None = mapping if self.ok else None
        self._collected = weakref.finalize(self, _unregister_collected, base.data_ptr())
        self._collected.atexit = False  # (the process ending gives everything back)
        if not self.ok:
            self._collected.detach()  # nothing lent; the mapping stays its caller's

    def release(self) -> None:
        """Give the memory back now and close the mapping, so that its pages can leave the page cache. The caller
        makes sure no copy from it is in flight and that no view of :attr:`tensor` is used after."""
        held = self._collected.detach()  # (None once given back)
        if held is not None:
            unregister(held[2][0])
        self.tensor = None
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()


def _unregister_collected(ptr: int) -> None:
    """A :class:`Lent` collected unreleased: wait for what may still copy from it, then unregister it."""
    with contextlib.suppress(Exception):  # (CUDA may be gone when the process is ending)
        synchronize_devices()
    unregister(ptr)


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
