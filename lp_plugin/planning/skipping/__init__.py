"""Training-free layer skipping: which layers to skip, and what stands in for them.

The engine calls :func:`resolve_skips` once per attach: it turns the ``skip`` / ``stand_in`` /
``calib`` options of an :class:`lp_plugin.OffloadConfig` into a :class:`SkipPlan` for the loaded
model: the layers that are not run, and for each an optional stand-in module (``x -> x + f(x)``)
that runs in its place. The engine stores stand-ins on the tier and moves them like layers.

Modules: ``spec`` (option grammar, no torch), ``calib`` (calibration and held-out text),
``domains`` (named offline text sources and the evaluation slices),
``runner`` (forwards with layers swapped out), ``metrics`` (importance scores, the policies'
context), ``standins`` (stand-in modules and their closed-form fit), ``fitting`` (fitting a set in
order, cached), ``cache`` (fingerprints, verified cache files), ``policies`` (named skip policies),
``resolve`` (the engine's entry point), ``sweep``/``cli`` (the ``lp-prune`` frontier sweep).

Importing this package is cheap: torch is imported when one of the names below is first used.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "SkipPlan": "resolve",
    "resolve_skips": "resolve",
    "importance": "metrics",
    "Importance": "metrics",
    "SkipContext": "metrics",
    "SkipPolicy": "policies",
    "LinearStandIn": "standins",
    "MeanStandIn": "standins",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lp_plugin.planning.skipping' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
