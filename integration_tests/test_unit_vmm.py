"""Device buffers (lp_plugin/core/vmm.py) where there is no CUDA driver: the plain fallback behind the same
interface (``map`` / ``unmap`` / ``close`` / ``mapped_bytes``) that session buffers and stream rings use."""

from __future__ import annotations

import torch

from lp_plugin.core.vmm import PlainBuffer, device_buffer, vmm_supported

CPU = torch.device("cpu")


def test_the_cpu_gets_a_plain_buffer():
    assert vmm_supported(CPU) is False
    buf = device_buffer(1000, CPU)
    assert isinstance(buf, PlainBuffer)
    assert (buf.nbytes, buf.mapped_bytes) == (1000, 0)


def test_a_mapped_buffer_keeps_its_memory_until_unmapped():
    buf = device_buffer(4096, CPU)
    first = buf.map()
    assert (first.dtype, first.numel(), first.device) == (torch.uint8, 4096, CPU)
    first.fill_(7)
    again = buf.map()
    assert again is first and int(again[0]) == 7  # mapping twice is the same memory
    buf.unmap()
    assert buf.tensor is None
    assert buf.map().numel() == 4096
    buf.close()
    assert buf.tensor is None
