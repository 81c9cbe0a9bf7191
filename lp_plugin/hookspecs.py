"""pluggy hook specifications of lp_plugin (project name ``lp_plugin``).

A plugin is any module or object with ``@lp_plugin.hookspecs.hookimpl`` functions below, exposed
through the ``lp_plugin`` entry-point group. Each hook receives a ``register`` callback; call it
once per thing you contribute. Built-ins (``lp_plugin.builtins``) register the same way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lp_plugin")
hookimpl = pluggy.HookimplMarker("lp_plugin")


@hookspec
def register_policies(register):
    """Contribute offload policies: ``register(policy)`` with an ``lp_plugin.policies.OffloadPolicy``
    instance. Its ``name`` becomes a valid ``offload=`` spec."""


@hookspec
def register_tiers(register):
    """Contribute storage tiers: ``register(name, tier_class)`` where ``tier_class`` is an
    ``lp_plugin.tiers.Tier`` subclass or a lazy ``"module:Class"`` string. ``name`` becomes a
    valid ``tier=`` value."""
