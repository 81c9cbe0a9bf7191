"""Where lp_plugin keeps files on this machine: one cache folder, shared by the bundled model and
the layer-skipping cache (``$LP_PLUGIN_CACHE``, else ``$XDG_CACHE_HOME/lp_plugin`` or ``~/.cache/lp_plugin``)."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODEL = "smollm2-135m-instruct"  # the bundled model converted to a transformers folder
BUNDLED_TOKENIZER = "smollm2-tokenizer"  # its tokenizer alone
SKIPPING = "skipping"  # layer-skipping scores and fitted stand-ins


def cache_root() -> Path:
    """The folder lp_plugin caches under (it may not exist yet)."""
    env = os.environ.get("LP_PLUGIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lp_plugin"


def managed_folders() -> list:
    """The folders under :func:`cache_root` that lp_plugin rebuilds: nothing else belongs in them."""
    root = cache_root()
    return [root / name for name in (BUNDLED_MODEL, BUNDLED_TOKENIZER, SKIPPING)]
