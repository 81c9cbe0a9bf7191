"""The ``cpu`` tier: one host buffer per layer (pinned when there is a GPU), allocated once at attach
and never re-pinned; it is also the copy source for every transfer. Data-parallel ranks of one host
share one copy (:mod:`lp_plugin.core.shm`); then the weights are read-only in standby."""

from __future__ import annotations

from .. import shm
from .base import Tier


class CpuTier(Tier):
    name = "cpu"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._buffers: dict = {}
        self._shared: dict = {}
        self.shared = shm.sharing()  # one read-only copy for the ranks of this host
        self.keeps_flat = not self.shared
        self.read_only = self.shared

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

    def shared_host_bytes(self):
        return sum(b.nbytes for b in self._shared.values())

    def close(self):
        self._buffers.clear()
        for buf in self._shared.values():
            buf.close()
        self._shared.clear()
