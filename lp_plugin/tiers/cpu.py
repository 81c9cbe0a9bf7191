"""The ``cpu`` tier: one host buffer per layer (pinned when there is a GPU), allocated once at attach
and never re-pinned; it is also the copy source for every transfer."""

from __future__ import annotations

from .base import Tier


class CpuTier(Tier):
    name = "cpu"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._buffers: dict = {}

    def put(self, key, flat, layout, sha256):
        self._buffers[key] = flat

    def host_view(self, key):
        return self._buffers[key]

    def direct(self, key):
        return True

    def close(self):
        self._buffers.clear()
