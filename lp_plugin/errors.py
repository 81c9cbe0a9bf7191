"""Exception types of lp_plugin. Every message says what went wrong and how to fix it."""

from __future__ import annotations


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
