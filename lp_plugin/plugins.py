"""The plugin manager: loads ``lp_plugin`` entry points once, lazily, and keeps the registries of
offload policies and tiers that the hooks in ``hookspecs.py`` fill."""

from __future__ import annotations

import importlib
import threading

import pluggy

from . import hookspecs
from .errors import OffloadSpecError

pm = pluggy.PluginManager("lp_plugin")
pm.add_hookspecs(hookspecs)

_lock = threading.Lock()
_policies: dict | None = None
_tiers: dict | None = None


def _plugin_name(impl) -> str:
    return pm.get_name(impl.plugin) or repr(impl.plugin)


def _collect(hook_name: str, make_register):
    """Call every implementation of one hook, with a ``register`` bound to that plugin."""
    registry: dict = {}
    owners: dict = {}
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
        impl.function(make_register(registry, owners, _plugin_name(impl)))
    return registry


def _load() -> None:
    global _policies, _tiers
    with _lock:
        if _policies is not None:
            return
        pm.load_setuptools_entrypoints("lp_plugin")
        if not any(getattr(p, "__name__", "") == "lp_plugin.builtins" for p in pm.get_plugins()):
            # running from a source tree without installed metadata: register built-ins directly
            pm.register(importlib.import_module("lp_plugin.builtins"), name="builtins")

        def policy_register(registry, owners, plugin):
            def register(policy):
                from .specs import OffloadPolicy

                if not isinstance(policy, OffloadPolicy):
                    raise TypeError(
                        f"plugin {plugin!r} registered {policy!r}; register an instance of "
                        "lp_plugin.specs.OffloadPolicy"
                    )
                _reject_duplicate("offload policy", policy.name, owners, plugin)
                registry[policy.name] = policy

            return register

        def tier_register(registry, owners, plugin):
            def register(name, tier_class):
                if not isinstance(name, str) or not name:
                    raise TypeError(f"plugin {plugin!r} registered a tier with name {name!r}; use a non-empty str")
                _reject_duplicate("tier", name, owners, plugin)
                registry[name] = tier_class

            return register

        policies = _collect("register_policies", policy_register)
        _tiers = _collect("register_tiers", tier_register)
        _policies = policies


def _reject_duplicate(kind: str, name: str, owners: dict, plugin: str) -> None:
    if name in owners:
        raise OffloadSpecError(
            f"{kind} {name!r} is registered twice (by plugin {owners[name]!r} and by {plugin!r}); "
            f"rename one of them, or uninstall the plugin you do not want"
        )
    owners[name] = plugin


def get_policies() -> dict:
    """name -> OffloadPolicy, built-ins and plugins."""
    _load()
    return dict(_policies)


def get_tier_class(name: str):
    """The Tier subclass registered as ``name`` (lazy ``module:Class`` strings are imported here)."""
    _load()
    if name not in _tiers:
        raise OffloadSpecError(f"unknown tier {name!r}; choose one of {sorted(_tiers)} (or install a plugin that registers it)")
    target = _tiers[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _tiers[name] = target
    return target


def tier_names() -> list:
    _load()
    return sorted(_tiers)


def reset_for_tests() -> None:
    """Forget loaded registries so the next call reloads entry points (used by tests that install plugins)."""
    global _policies, _tiers
    with _lock:
        for plugin in list(pm.get_plugins()):
            pm.unregister(plugin)
        _policies = _tiers = None
