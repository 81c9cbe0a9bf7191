"""Where lp_plugin keeps files on this machine: one cache folder, shared by the bundled model and
the layer-skipping cache (``$LP_PLUGIN_CACHE``, else ``$XDG_CACHE_HOME/lp_plugin`` or ``~/.cache/lp_plugin``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The folder lp_plugin caches under (it may not exist yet)."""
    env = os.environ.get("LP_PLUGIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lp_plugin"
