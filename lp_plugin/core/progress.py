"""Progress bars for lp_plugin's long waits (calibration, fitting, importance scoring, sweeps).

One place decides whether a bar is drawn: on when stderr is a terminal or the process is a Jupyter
(IPython) kernel, where tqdm.auto draws a notebook bar; off otherwise (logs, CI).
``LP_PLUGIN_PROGRESS=1`` forces bars on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def enabled() -> bool:
    forced = os.environ.get("LP_PLUGIN_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if "ipykernel" in sys.modules:  # a notebook: stderr is no terminal there, yet the user watches it
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, *, desc: str, total=None, unit: str = "it", leave: bool = False):
    """A tqdm bar named ``lp_plugin: desc`` (a no-op bar when :func:`enabled` says no)."""
    return tqdm(
        iterable,
        desc=f"lp_plugin: {desc}",
        total=total,
        unit=unit,
        leave=leave,
        disable=not enabled(),
        dynamic_ncols=True,
    )
