"""lp_plugin: offload decoder layers of a Hugging Face causal LM to pinned host memory or disk
and bring them back through residual hooks, exactly (alpha=1) or as a scaled residual (alpha<1).

This module stays cheap to import: torch, transformers and accelerate are imported only when one
of the public functions below is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily on first attribute access)
_LAZY = {
    "attach": "lp_plugin.integrations.engine",
    "session": "lp_plugin.integrations.engine",
    "get_handle": "lp_plugin.integrations.engine",
    "OffloadHandle": "lp_plugin.integrations.engine",
    "from_pretrained": "lp_plugin.integrations.loading",
    "residual_offload_device_map": "lp_plugin.planning.plan",
    "resolve_layers": "lp_plugin.planning.plan",
    "fit_budget": "lp_plugin.planning.plan",
    "OffloadConfig": "lp_plugin.planning.config",
    "OffloadPlan": "lp_plugin.planning.plan",
    "OffloadPolicy": "lp_plugin.planning.policies",
    "Tier": "lp_plugin.core.tiers",
    "LPPluginError": "lp_plugin.errors",
    "OffloadSpecError": "lp_plugin.errors",
    "OffloadFileError": "lp_plugin.errors",
    "OffloadResourceError": "lp_plugin.errors",
    "AttachError": "lp_plugin.errors",
    "importance": "lp_plugin.planning.skipping.metrics",
    "Importance": "lp_plugin.planning.skipping.metrics",
    "SkipPolicy": "lp_plugin.planning.skipping.policies",
    "BudgetError": "lp_plugin.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lp_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
