"""Device buffers that keep their address while their memory comes and goes (CUDA virtual memory).

A captured CUDA graph (transformers' compiled static-cache decode) bakes tensor addresses in. Session
mode frees its device buffers between sessions, so a plain allocation would come back elsewhere and the
graph would have to be recorded again. :class:`StableBuffer` reserves a virtual address range once and
maps physical memory into it for each session (``map``) and out of it after (``unmap``), through the CUDA
driver's virtual memory API (``cuMemAddressReserve``/``cuMemCreate``/``cuMemMap``): the same address every
session, no memory between sessions. This memory is not PyTorch's: ``torch.cuda.memory_allocated`` does
not count it, so :attr:`StableBuffer.mapped_bytes` is reported beside it. When the driver has no room for a
mapping, the caching allocator's unused blocks are given back (``torch.cuda.empty_cache``) and the mapping is
tried once more: memory PyTorch keeps cached but unused is part of the card, not a reason to fail.

Where the driver API is not available (no CUDA, a driver without virtual memory management) the buffer
is an ordinary PyTorch allocation made per session (:class:`PlainBuffer`): correct, not address-stable.
"""

from __future__ import annotations

import ctypes

import torch

_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
_CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
_CUDA_ERROR_OUT_OF_MEMORY = 2


class DriverError(RuntimeError):
    """A CUDA driver call that failed; ``code`` is the driver's ``CUresult``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Driver:
    """The few CUDA driver calls used here, each checked."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def __call__(self, name, *args):
        err = getattr(self.lib, name)(*args)
        if err != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(err, ctypes.byref(text))
            raise DriverError(f"{name} failed: {text.value.decode() if text.value else err}", err)


_driver = None


def _get_driver():
    global _driver
    if _driver is None:
        _driver = _Driver()
    return _driver


def vmm_supported(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        drv = _get_driver()
        torch.cuda.init()
        value = ctypes.c_int()
        drv(
            "cuDeviceGetAttribute",
            ctypes.byref(value),
            _CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            ctypes.c_int(device.index),
        )
        return bool(value.value)
    except (OSError, RuntimeError, AttributeError):
        return False


class _Pointer:
    """What ``torch.as_tensor`` needs to view device memory it does not own."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


class StableBuffer:
    """``nbytes`` of device memory at one fixed address; physical memory only between ``map`` and ``unmap``."""

    def __init__(self, nbytes: int, device):
        self.device = device
        self.drv = _get_driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # the runtime makes the device's primary context current
            self.prop = _AllocationProp()
            self.prop.type = _CU_MEM_ALLOCATION_TYPE_PINNED
            self.prop.location = _Location(_CU_MEM_LOCATION_TYPE_DEVICE, device.index)
            gran = ctypes.c_size_t()
            self.drv(
                "cuMemGetAllocationGranularity",
                ctypes.byref(gran),
                ctypes.byref(self.prop),
                _CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
            self.size = max(gran.value, -(-nbytes // gran.value) * gran.value)
            ptr = ctypes.c_uint64()
            self.drv(
                "cuMemAddressReserve",
                ctypes.byref(ptr),
                ctypes.c_size_t(self.size),
                ctypes.c_size_t(0),
                ctypes.c_uint64(0),
                ctypes.c_uint64(0),
            )
        self.ptr = ptr.value
        self.handle: ctypes.c_uint64 | None = None
        self.nbytes = nbytes
        self.tensor: torch.Tensor | None = (
            None  # made at the first map: the runtime looks the address up, which needs it mapped
        )
        self.reclaims = 0  # maps that first had to give the caching allocator's unused blocks back

    @property
    def mapped_bytes(self) -> int:
        return self.size if self.handle is not None else 0

    def map(self) -> torch.Tensor:
        if self.handle is None:
            handle = ctypes.c_uint64()
            with torch.cuda.device(self.device):
                try:
                    self._create(handle)
                except DriverError as exc:
                    if exc.code != _CUDA_ERROR_OUT_OF_MEMORY:
                        raise
                    torch.cuda.empty_cache()  # cached but unused blocks: the room this mapping was planned in
                    self.reclaims += 1
                    self._create(handle)
                try:
                    self.drv(
                        "cuMemMap",
                        ctypes.c_uint64(self.ptr),
                        ctypes.c_size_t(self.size),
                        ctypes.c_size_t(0),
                        handle,
                        ctypes.c_uint64(0),
                    )
                    access = _AccessDesc(
                        _Location(_CU_MEM_LOCATION_TYPE_DEVICE, self.device.index), _CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                    )
                    self.drv(
                        "cuMemSetAccess",
                        ctypes.c_uint64(self.ptr),
                        ctypes.c_size_t(self.size),
                        ctypes.byref(access),
                        ctypes.c_size_t(1),
                    )
                except BaseException:
                    self.drv("cuMemRelease", handle)
                    raise
            self.handle = handle
        tensor = self.tensor
        if tensor is None:
            tensor = self.tensor = torch.as_tensor(_Pointer(self.ptr, self.nbytes), device=self.device)
        return tensor

    def _create(self, handle) -> None:
        self.drv(
            "cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(self.size), ctypes.byref(self.prop), ctypes.c_uint64(0)
        )

    def unmap(self) -> None:
        """Give the physical memory back (after the device is done with it); the address stays reserved."""
        if self.handle is not None:
            torch.cuda.synchronize(self.device)
            with torch.cuda.device(self.device):
                self.drv("cuMemUnmap", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))
                self.drv("cuMemRelease", self.handle)
            self.handle = None

    def close(self) -> None:
        self.unmap()
        self.tensor = None
        with torch.cuda.device(self.device):
            self.drv("cuMemAddressFree", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))


class PlainBuffer:
    """The same interface over one PyTorch allocation per ``map``."""

    def __init__(self, nbytes: int, device):
        self.nbytes, self.device = nbytes, device
        self.tensor: torch.Tensor | None = None

    mapped_bytes = property(lambda self: 0)  # counted by torch.cuda.memory_allocated

    def map(self) -> torch.Tensor:
        tensor = self.tensor
        if tensor is None:
            tensor = self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return tensor

    def unmap(self) -> None:
        self.tensor = None

    def close(self) -> None:
        self.tensor = None


def device_buffer(nbytes: int, device) -> StableBuffer | PlainBuffer:
    """An address-stable buffer where the driver allows it, else a plain one."""
    return StableBuffer(nbytes, device) if vmm_supported(device) else PlainBuffer(nbytes, device)
