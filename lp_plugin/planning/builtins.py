"""Built-in offload policies, tiers and skip policies, registered through the same plugin hooks as third parties."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .policies import AllPolicy, EvenPolicy, NonePolicy, OddPolicy


@hookimpl
def register_policies(register):
    for policy in (EvenPolicy(), OddPolicy(), AllPolicy(), NonePolicy()):
        register(policy)


@hookimpl
def register_tiers(register):
    # lazy strings: registering a tier must not import torch
    register("cpu", "lp_plugin.core.tiers:CpuTier")
    register("disk", "lp_plugin.core.tiers:DiskTier")


@hookimpl
def register_skip_policies(register):
    # lazy strings: registering a policy must not import torch
    for name, cls in (
        ("bi", "BlockInfluencePolicy"),
        ("angular", "AngularPolicy"),
        ("ppl", "PerplexityPolicy"),
        ("greedy", "GreedyPolicy"),
    ):
        register(name, f"lp_plugin.planning.skipping.policies:{cls}")
