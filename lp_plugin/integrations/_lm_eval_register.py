"""Startup hook that makes ``hf-residual-offload`` an lm-eval model name.

lm-eval 0.4.13 discovers no external models, so the package installs ``lp_plugin_lm_eval.pth``
into site-packages; its single line calls :func:`install` at interpreter start. ``install`` only
puts a tiny finder on ``sys.meta_path`` (no torch, no lm_eval import). The first time anything
imports ``lm_eval.models`` the finder wraps that module's loader; right after the module has run
(and registered lm-eval's own lazy model names) the wrapper registers the *lazy target string*
``"lp_plugin.integrations.lm_eval_model:ResidualOffloadLM"`` under ``hf-residual-offload`` and takes the
finder off ``sys.meta_path`` again. The model module (and torch) is only imported when lm-eval
looks the name up.

Why ``lm_eval.models`` and not ``lm_eval.api.registry``: 0.4.13's ``get_model`` imports
``lm_eval.models`` (which registers ``hf`` and every built-in) only while the registry is *empty*;
registering earlier would leave the built-ins unregistered.

Set ``LP_PLUGIN_NO_LM_EVAL_HOOK=1`` to disable the hook.
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "hf-residual-offload"
TARGET = "lp_plugin.integrations.lm_eval_model:ResidualOffloadLM"
TRIGGER = "lm_eval.models"


def register(registry=None) -> bool:
    """Register the lazy target in lm-eval's model registry. Idempotent; returns True if the
    name now resolves to our target (or its class), False if something else owns it."""
    if registry is None:
        from lm_eval.api.registry import model_registry as registry
    if MODEL_NAME in registry:
        current = registry._objs.get(MODEL_NAME) if hasattr(registry, "_objs") else None
        if current is None:
            return False
        if isinstance(current, str):
            return current == TARGET
        name = f"{getattr(current, '__module__', '')}:{getattr(current, '__qualname__', '')}"
        return name == TARGET or getattr(current, "__module__", None) == "lp_plugin.integrations.lm_eval_model"
    registry.register(MODEL_NAME, target=TARGET)
    return True


def _safe_register() -> None:
    try:
        register()
    except Exception as exc:  # never break lm-eval itself
        import warnings

        warnings.warn(
            f"lp_plugin could not register lm-eval model {MODEL_NAME!r}: {exc!r}", RuntimeWarning, stacklevel=2
        )


class _LoaderProxy:
    """Delegates everything to the real loader; runs the registration after ``exec_module``."""

    def __init__(self, loader):
        self._lp_loader = loader

    def create_module(self, spec):
        create = getattr(self._lp_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        # put the real loader back so reloads and introspection see the ordinary loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._lp_loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._lp_loader
        self._lp_loader.exec_module(module)
        _safe_register()

    def __getattr__(self, name):
        return getattr(self._lp_loader, name)


class LmEvalModelsFinder:
    """``sys.meta_path`` finder that reacts to one import (``lm_eval.models``) and then retires."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()  # one-shot; also prevents recursion while we ask the other finders
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            try:
                spec = find(fullname, path, target)
            except Exception:
                continue
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _LoaderProxy(spec.loader)
            return spec
        return None

    # the finder must not make importlib.invalidate_caches() etc. fail
    def invalidate_caches(self):
        return None


def _installed():
    return [f for f in sys.meta_path if isinstance(f, LmEvalModelsFinder) or type(f).__name__ == "LmEvalModelsFinder"]


def install() -> None:
    """Called from the ``.pth`` line. Cheap, silent, idempotent."""
    if os.environ.get("LP_PLUGIN_NO_LM_EVAL_HOOK"):
        return
    if TRIGGER in sys.modules:  # lm-eval already imported (e.g. install() called late): register now
        _safe_register()
        return
    if not _installed():
        sys.meta_path.insert(0, LmEvalModelsFinder())


def uninstall() -> None:
    for finder in _installed():
        try:
            sys.meta_path.remove(finder)
        except ValueError:
            pass
