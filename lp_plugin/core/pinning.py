"""Host memory lent to CUDA as a copy source (``cudaHostRegister``, read-only): mappings that were not allocated
pinned (shared host copies, page-cached layer files) become sources the GPU copies from at the link's full speed,
without a second copy in host memory. A refusal leaves no CUDA error behind for the next kernel launch to report."""

from __future__ import annotations

import ctypes
import functools
import logging

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
