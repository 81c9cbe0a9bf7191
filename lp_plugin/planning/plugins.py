"""The plugin manager of lp_plugin and the registries its hooks fill.

Entry points of the ``lp_plugin`` group are loaded into the plugin manager once, lazily. The
registries (offload policies, tiers, skip policies) are built at the call site from the hooks every time they are
asked for, so there is no cached registry to go stale: a plugin registered later is seen by the next
call.
"""

from __future__ import annotations

import importlib
import threading

import pluggy

from .. import hookspecs
from ..errors import OffloadSpecError
from . import builtins
from .policies import OffloadPolicy

pm = pluggy.PluginManager("lp_plugin")
pm.add_hookspecs(hookspecs)
_load_lock = threading.Lock()
_loaded = False


def load() -> pluggy.PluginManager:
    """Load the ``lp_plugin`` entry points (once) and the built-ins; return the plugin manager."""
    global _loaded
    with _load_lock:
        if not _loaded:
            pm.load_setuptools_entrypoints("lp_plugin")
            if not pm.is_registered(builtins) and pm.get_plugin("builtins") is None:
                # a source tree without installed metadata: register the built-ins directly
                pm.register(builtins, name="builtins")
            _loaded = True
    return pm


def _registry(hook_name: str, kind: str, check) -> dict:
    """Call every implementation of one hook with a ``register`` bound to that plugin; ``check(plugin,
    *args)`` validates one registration and returns ``(name, value)``. Duplicate names are refused."""
    registry: dict = {}
    owners: dict[str, str] = {}
    for impl in reversed(getattr(load().hook, hook_name).get_hookimpls()):  # registration order
        plugin = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(*args, _plugin=plugin):
            name, value = check(_plugin, *args)
            if name in owners:
                raise OffloadSpecError(
                    f"{kind} {name!r} is registered twice "
                    f"(by plugin {owners[name]!r} and by {_plugin!r}); rename one of them, or uninstall the "
                    "plugin you do not want"
                )
            owners[name] = _plugin
            registry[name] = value

        impl.function(register=register)
    return registry


def _check_policy(plugin, policy):
    if not isinstance(policy, OffloadPolicy):
        raise TypeError(f"plugin {plugin!r} registered {policy!r}; register an instance of lp_plugin.OffloadPolicy")
    return policy.name, policy


def _check_tier(plugin, name, tier_class):
    if not isinstance(name, str) or not name:
        raise TypeError(f"plugin {plugin!r} registered a tier with name {name!r}; use a non-empty str")
    return name, tier_class


def policies() -> dict:
    """name -> :class:`OffloadPolicy`, built-ins and plugins."""
    return _registry("register_policies", "offload policy", _check_policy)


def tier_names() -> list:
    return sorted(_registry("register_tiers", "tier", _check_tier))


def _check_skip_policy(plugin, name, policy):
    if (
        not isinstance(name, str)
        or not name
        or not (name[0].isalpha() and name.replace("_", "").replace("-", "").isalnum())
    ):
        raise TypeError(
            f"plugin {plugin!r} registered a skip policy named {name!r}; use a name of letters, digits, '-' and '_' "
            "that starts with a letter"
        )
    return name, policy


def skip_policy_names() -> list:
    return sorted(_registry("register_skip_policies", "skip policy", _check_skip_policy))


def skip_policy(name: str):
    """The skip policy registered as ``name`` (an instance: a lazy ``module:attr`` string is imported
    and a class instantiated here), or None if no plugin registers that name."""
    target = _registry("register_skip_policies", "skip policy", _check_skip_policy).get(name)
    if target is None:
        return None
    target = _resolve(target)
    if isinstance(target, type):
        target = target()
    if not callable(getattr(target, "select", None)):
        raise TypeError(
            f"skip policy {name!r} is {target!r}, which has no select(ctx, count) method; "
            "register an lp_plugin.SkipPolicy"
        )
    return target


def _resolve(target):
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def tier_class(name: str):
    """The Tier subclass registered as ``name`` (a lazy ``module:Class`` string is imported here)."""
    tiers = _registry("register_tiers", "tier", _check_tier)
    if name not in tiers:
        raise OffloadSpecError(
            f"unknown tier {name!r}; choose one of {sorted(tiers)} (or install a plugin that registers it)"
        )
    return _resolve(tiers[name])


def check_folder_tier(tier: str, offload_folder) -> None:
    """Refuse an ``offload_folder`` for a tier that keeps no files (it would be silently ignored)."""
    if offload_folder is not None and not tier_class(tier).needs_folder:
        raise OffloadSpecError(
            f"offload_folder is where a tier that keeps files writes them; tier={tier!r} keeps none (its "
            "class does not set needs_folder), so it would be ignored: pass tier='disk' (--tier disk) to keep the "
            "layers in files there, or drop offload_folder (--offload-folder)"
        )


def reset_for_tests() -> None:
    """Unregister every plugin so the next call loads the entry points again (tests that install plugins)."""
    global _loaded
    with _load_lock:
        for plugin in list(pm.get_plugins()):
            pm.unregister(plugin)
        _loaded = False
