"""Training-free layer skipping: which layers to skip, and what stands in for them.

:func:`resolve_skips` turns the ``skip`` / ``stand_in`` / ``calib`` options of an
:class:`lp_plugin.OffloadConfig` into a :class:`SkipPlan` for one loaded model: the layers that are
not run, and for each an optional stand-in module (``x -> x + f(x)``) that runs in its place. The
engine stores stand-ins on the tier and moves them like layers. This module reads the model only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OffloadSpecError
from ..plugins import policies
from ..policies import select_layers


@dataclass(frozen=True)
class SkipPlan:
    layers: tuple = ()  # skipped layers, sorted
    stand_ins: dict = field(default_factory=dict)  # layer index -> nn.Module run in its place
    info: dict = field(default_factory=dict)  # how they were chosen and fitted (JSON-ready)


def resolve_skips(model, config, num_layers: int) -> SkipPlan:
    """The skip plan of ``config`` for ``model``: an explicit layer list or range (``skip="5,9"``)."""
    if config.skip is None:
        return SkipPlan()
    if config.stand_in != "none":
        raise OffloadSpecError(f"stand_in={config.stand_in!r} is not available; use stand_in='none'")
    layers = select_layers(config.skip, num_layers, 0, 0, policies=policies())
    return SkipPlan(layers, {}, {"skip": config.skip, "stand_in": "none"})
