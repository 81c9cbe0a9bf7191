"""pluggy hook specifications of lp_plugin (project name ``lp_plugin``).

A plugin is any module or object with ``@lp_plugin.hookspecs.hookimpl`` functions below, exposed
through the ``lp_plugin`` entry-point group. Each hook receives a ``register`` callback; call it
once per thing you contribute. Built-ins (``lp_plugin.planning.builtins``) register the same way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lp_plugin")
hookimpl = pluggy.HookimplMarker("lp_plugin")


@hookspec
def register_policies(register):
    """Contribute offload policies: ``register(policy)`` with an ``lp_plugin.OffloadPolicy``
    instance. Its ``name`` becomes a valid ``offload=`` spec."""


@hookspec
def register_tiers(register):
    """Contribute storage tiers: ``register(name, tier_class)`` where ``tier_class`` is an
    ``lp_plugin.Tier`` subclass or a lazy ``"module:Class"`` string. ``name`` becomes a
    valid ``tier=`` value."""


@hookspec
def register_skip_policies(register):
    """Contribute skip policies: ``register(name, policy)`` where ``policy`` is an
    ``lp_plugin.SkipPolicy`` instance or subclass, or a lazy ``"module:attr"`` string naming
    one. ``name`` becomes a valid ``skip="NAME:COUNT"`` spec (``COUNT``: layers, or ``N%`` of them).
    The policy's ``select(ctx, count)`` receives a ``lp_plugin.planning.skipping.SkipContext``: the model, its
    calibration token windows, the stand-in the chosen layers will get, and cached importance scores."""
