"""Built-in offload policies and tiers, registered through the same plugin hooks as third parties."""

from __future__ import annotations

from .hookspecs import hookimpl
from .policies import AllPolicy, EvenPolicy, NonePolicy, OddPolicy


@hookimpl
def register_policies(register):
    for policy in (EvenPolicy(), OddPolicy(), AllPolicy(), NonePolicy()):
        register(policy)


@hookimpl
def register_tiers(register):
    # lazy strings: registering a tier must not import torch
    register("cpu", "lp_plugin.tiers:CpuTier")
    register("disk", "lp_plugin.tiers:DiskTier")
