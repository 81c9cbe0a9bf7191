"""Device names: the one place a device spelling becomes a ``torch.device``, and how an Accelerate
device map spells one."""

from __future__ import annotations

import statistics
import time


def parse_device(device):
    """``device`` (a name such as ``"cuda:0"`` or ``"cpu"``, a GPU index, or a ``torch.device``) as a
    ``torch.device``; an :class:`~lp_plugin.errors.OffloadSpecError` naming the forms otherwise."""
    import torch

    from ..errors import OffloadSpecError

    if isinstance(device, int) and not isinstance(device, bool):
        try:
            if device < 0:
                raise ValueError
            return torch.device("cuda", device)
        except (RuntimeError, ValueError, OverflowError):
            raise OffloadSpecError(f"a GPU index must be an int from 0, got {device!r}") from None
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise OffloadSpecError(f"a device must be a name such as 'cuda:0' or 'cpu', or a GPU index, got {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise OffloadSpecError(f"unknown device {device!r}; write 'cuda', 'cuda:N', 'cpu' or a GPU index N") from None


def normalize_device(device=None):
    """``None`` is the current GPU (or the CPU without one); ``"cuda"`` and a bare index are the
    current/that GPU with its index spelled out (``"cuda"`` is GPU 0 where torch has no CUDA)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device)
    if device.type == "cuda" and device.index is None:
        # planning for a GPU from a config alone works on a machine without one: GPU 0
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def check_usable(device, option: str = "main_device", cpu: str = "main_device='cpu'") -> None:
    """Refuse ``device`` (a ``torch.device``) as the device a model computes on where nothing can compute: the meta
    device, or a GPU this process does not see; the message names ``option`` and the fix ``cpu``. Planning for a
    GPU from a config alone does not call this."""
    import torch

    from ..errors import OffloadSpecError

    if device.type == "meta":
        raise OffloadSpecError(
            f"{option} 'meta' holds no values to compute with; pass the GPU ('cuda:0') or 'cpu' the model runs on"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise OffloadSpecError(
                f"{option} {str(device)!r}: this process sees no CUDA GPU (torch {torch.__version__}); pass "
                f"{cpu}, or run where a GPU is visible"
            )
        if device.index is not None and device.index >= count:
            raise OffloadSpecError(
                f"{option} {str(device)!r}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}; pass "
                "one of those (CUDA_VISIBLE_DEVICES renumbers them)"
            )


def map_value(device):
    """How an Accelerate device map spells ``device`` (a GPU index, or ``"cpu"``)."""
    return device.index if device.type == "cuda" else device.type


def main_device_of(model):
    """Where a loaded (or Accelerate-dispatched) model computes: its input embeddings' device."""
    import torch

    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    if device.type == "meta":
        hook = getattr(emb, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return normalize_device(device)


# ---------------------------------------------------------------------------------- what a GPU holds
#: CUDA context of one process, when it cannot be measured (0.51 GiB on an H200, torch 2.11+cu130)
CONTEXT_BYTES = 528 * 2**20
#: what the process adds on the device after its first allocation: kernel images loaded on first use,
#: cuBLAS/cuBLASLt handles, attention kernels (measured on an H200; see docs/budgets.md)
KERNELS_BYTES = 256 * 2**20
_RUNTIME: dict = {}


def _nvml_used(device) -> int | None:
    """Bytes in use on ``device`` by every process, from the driver (NVML through ctypes; None where it
    cannot be read). Needs no CUDA context."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            return None
        index = (
            torch.cuda._get_nvml_device_index(device) if hasattr(torch.cuda, "_get_nvml_device_index") else device.index
        )
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
            return None

        class Memory(ctypes.Structure):
            _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

        mem = Memory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        return int(mem.used)
    except (OSError, AttributeError, RuntimeError, ValueError):
        return None


def cuda_runtime(device) -> tuple:
    """``(context bytes, bytes with kernels and handles, source)``: what this process holds on the GPU
    ``device`` besides tensors and the engine's buffers. The CUDA context is measured through the driver
    when this process had none yet (else :data:`CONTEXT_BYTES`); kernel images and library handles add
    :data:`KERNELS_BYTES` once work runs. Without a usable GPU here: the documented figures."""
    import torch

    key = str(device)
    if key in _RUNTIME:
        return _RUNTIME[key]
    context, source = CONTEXT_BYTES, f"CUDA context {CONTEXT_BYTES / 2**30:.2f} GiB (documented figure)"
    if torch.cuda.is_available() and device.index is not None and device.index < torch.cuda.device_count():
        before = None if torch.cuda.is_initialized() else _nvml_used(device)
        torch.cuda.mem_get_info(device)  # creates this process's context on the device
        after = _nvml_used(device) if before is not None else None
        if before is not None and after is not None and after > before:
            context, source = after - before, f"CUDA context {(after - before) / 2**30:.2f} GiB (measured)"
    out = (context, context + KERNELS_BYTES, source + f" + {KERNELS_BYTES // 2**20} MiB kernels and library handles")
    if torch.cuda.is_available():
        _RUNTIME[key] = out
    return out


def free_bytes(device) -> int:
    """What ``device`` can still give this process: free device memory plus the caching allocator's
    reserved blocks (a GPU), or the host's available memory (the CPU)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def h2d_bandwidth(device, nbytes: int, pinned: bool, iters: int = 3) -> dict | None:
    """Host-to-device copy bandwidth in GB/s (1e9 bytes/s) of one ``nbytes`` copy, median of ``iters``."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch every page
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    try:
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        del src, dst
        torch.cuda.empty_cache()
    rates = [nbytes / t / 1e9 for t in times]
    return {"gbps": statistics.median(rates), "min": min(rates), "max": max(rates), "bytes": nbytes}


def bound_allocator_slack() -> bool:
    """Let PyTorch's caching allocator grow its segments in place (``expandable_segments``) so that blocks
    freed while loading (NF4 quantizes on the device) do not strand memory a card must hold: a plan for a
    card counts only a small slack. Left alone when ``PYTORCH_CUDA_ALLOC_CONF`` is set (the user's choice).
    Returns whether the setting is on for this process's allocations from now on."""
    import os

    import torch

    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is not None:
        return "expandable_segments:true" in conf.replace(" ", "").lower()
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None or not torch.cuda.is_available():
        return False
    setter("expandable_segments:True")
    return True
