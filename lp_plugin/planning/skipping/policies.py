"""Skip policies: named ways to choose which layers to skip, usable as ``skip="NAME:COUNT"``.

Built-ins (registered through the ``register_skip_policies`` plugin hook, like third-party ones):

* ``bi:K``: the ``K`` layers of lowest Block Influence (ShortGPT).
* ``angular:K``: the block of ``K`` consecutive layers of least angular distance between its input
  and output (Gromov et al.).
* ``ppl:K``: the ``K`` layers whose removal alone (with the stand-in, if any) costs the least
  calibration perplexity.
* ``greedy:K``: SLEB's greedy removal, each step re-measured with the stand-ins the chosen layers
  will get, so the choice accounts for the stand-in.

``K`` is a number of layers or a share of them (``greedy:20%``). A policy is a :class:`SkipPolicy`:
``select(ctx, count)`` gets a :class:`~lp_plugin.planning.skipping.metrics.SkipContext` (the model, its
calibration tokens, the stand-in kind) and returns layer indices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from .metrics import SkipContext


class SkipPolicy(ABC):
    """A named way to choose ``count`` layers to skip. Set ``name`` and ``description``, implement
    :meth:`select`, and register an instance (or the class) through the ``register_skip_policies``
    plugin hook."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def select(self, ctx: SkipContext, count: int) -> Iterable[int]:
        """The ``count`` layers of ``ctx.model`` to skip (indices in ``[0, ctx.num_layers)``)."""


class _RankedPolicy(SkipPolicy):
    metric = ""

    def select(self, ctx, count):
        return ctx.importance(self.metric).order[:count]


class BlockInfluencePolicy(_RankedPolicy):
    name = "bi"
    metric = "bi"
    description = "layers of lowest Block Influence, 1 - cos(x_in, x_out) (ShortGPT)"


class PerplexityPolicy(_RankedPolicy):
    name = "ppl"
    metric = "ppl"
    description = "layers whose removal alone costs the least calibration perplexity"


class GreedyPolicy(SkipPolicy):
    name = "greedy"
    description = (
        "SLEB: remove one layer at a time, the one whose removal (with its stand-in) costs the least, "
        "re-measured after each"
    )

    def select(self, ctx, count):
        return ctx.importance("greedy", steps=count).order[:count] if count else ()


class AngularPolicy(SkipPolicy):
    name = "angular"
    description = (
        "the block of consecutive layers of least angular distance between its input and output (Gromov et al.)"
    )

    def select(self, ctx, count):
        if count == 0:
            return ()
        start = ctx.importance("angular", n=count).order[0]
        return range(start, start + count)
