"""Storage tiers for offloaded layers: where a layer's flat buffer lives between uses.

* :mod:`~lp_plugin.core.tiers.base`: the :class:`Tier` interface the engine uses, and the shared helpers
  (:func:`allocate_host`, :func:`sha256_of`, :func:`describe`);
* :mod:`~lp_plugin.core.tiers.cpu`: ``cpu``, one pinned host buffer per layer;
* :mod:`~lp_plugin.core.tiers.disk`: ``disk``, one verified, memory-mapped safetensors file per layer,
  built from :mod:`~lp_plugin.core.tiers.layerfile` (the file format, through ``safetensors``),
  :mod:`~lp_plugin.core.tiers.mapped` (a verified file and its per-use check),
  :mod:`~lp_plugin.core.tiers.folder` (the offload folder as shared ground: lock, links, special files,
  writes) and :mod:`~lp_plugin.core.tiers.journal` (the record of what lp_plugin wrote there).

Third-party tiers subclass :class:`Tier` and register through the ``register_tiers`` plugin hook.
No pickle anywhere.
"""

from __future__ import annotations

from .base import Tier, allocate_host, describe, sha256_of
from .cpu import CpuTier
from .disk import DiskTier

__all__ = ["CpuTier", "DiskTier", "Tier", "allocate_host", "describe", "sha256_of"]
