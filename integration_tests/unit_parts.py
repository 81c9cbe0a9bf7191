"""Small real parts for the unit tests: a layer-like module with mixed dtypes, a minimal in-memory tier
without a pinned host copy (so the ring reads it through staging buffers, as it reads the disk tier), and one
that lends its copies until told to stop (as the disk tier lends cached pages until an edit or a cold-cache
benchmark takes them back)."""

from __future__ import annotations

import torch
import torch.nn as nn

from lp_plugin.core.tiers import Tier


class Block(nn.Module):
    """Two Linear modules (bf16) around a LayerNorm (fp32), a buffer and an empty buffer: the kinds of tensor
    a decoder layer holds."""

    def __init__(self, seed: int, width: int = 8, inner: int = 24, buffers: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, inner).to(torch.bfloat16)
        self.down = nn.Linear(inner, width, bias=False).to(torch.bfloat16)
        if buffers:
            self.register_buffer("scale", torch.tensor([2.0, 3.0]))
            self.register_buffer("empty", torch.empty(0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def state(self) -> dict:
        """Independent copies of every parameter and buffer."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def matches(self, state: dict) -> bool:
        return all(torch.equal(self.state_dict()[k], v) for k, v in state.items())


class MemoryTier(Tier):
    """Keeps each unit's bytes in a private tensor; no pinned host copy, so transfers go through staging."""

    name = "memory"

    def __init__(self):
        super().__init__(pin=False)
        self.units: dict[str, torch.Tensor] = {}

    def put(self, key, flat, layout, sha256):
        self.units[key] = flat.clone()

    def host_view(self, key):
        return self.units[key]


class LendingTier(MemoryTier):
    """Lends a copy of each unit's bytes, made at put, as the transfers' source until :meth:`stop_lending` for
    that unit; reads through staging (``read_into``) copy its own tensor, which may have changed since."""

    name = "lending"

    def __init__(self):
        super().__init__()
        self.lent: dict[str, torch.Tensor] = {}
        self.withdrawn: set[str] = set()

    def put(self, key, flat, layout, sha256):
        super().put(key, flat, layout, sha256)
        self.lent[key] = flat.clone()

    def direct(self, key):
        return key not in self.withdrawn

    def transfer_view(self, key):
        return self.lent[key]

    def stop_lending(self, key):
        self.withdrawn.add(key)
