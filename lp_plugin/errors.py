"""Exception types of lp_plugin. Every message says what went wrong and how to fix it; warnings point at the
user's line (:func:`outside_stacklevel`)."""

from __future__ import annotations

import sys
from types import FrameType


def outside_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by this function's caller at the first frame outside
    lp_plugin (the user's line), however deep the call that raised it."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "lp_plugin":
        frame, level = frame.f_back, level + 1  # (a dataclass's generated __init__ has its module's globals)
    return level


class LPPluginError(Exception):
    """Base class of every error lp_plugin raises on purpose."""


class OffloadSpecError(LPPluginError, ValueError):
    """A bad offload spec, option value or layer selection."""


class AttachError(LPPluginError, RuntimeError):
    """The model cannot be attached/detached in its current state (wrong architecture, attached twice...)."""


class OffloadFileError(LPPluginError, RuntimeError):
    """An offload file is missing, stale, foreign, truncated or corrupt, or cannot be written."""


class OffloadResourceError(LPPluginError, RuntimeError):
    """Not enough disk space, pinned host memory or GPU memory for the requested layout."""


class BudgetError(OffloadSpecError):
    """Nothing fits the memory budget. ``min_bytes`` is the smallest main-device budget that fits (None
    when the host budget is what fails), ``smallest`` the plan at that budget, ``host_bytes`` the host
    memory it needs."""

    def __init__(self, message, min_bytes=None, smallest=None, host_bytes=None):
        super().__init__(message)
        self.min_bytes = min_bytes
        self.smallest = smallest
        self.host_bytes = host_bytes
