"""The custom ops a forward calls around each streamed layer, so that a compiled forward (and the CUDA
graph replaying it) keeps them in place: ``ring_wait`` before a layer and ``ring_done`` after it declare
that they change the hidden states they receive, which orders them against the layer's own
computation, and ``ring_join`` ends the forward. Their Python bodies call the :class:`Ring` registered
under the id they carry."""

from __future__ import annotations

import itertools
import weakref

import torch

_rings: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # a model dropped unattached takes its ring along
_ids = itertools.count()


def register(ring) -> int:
    ring_id = next(_ids)
    _rings[ring_id] = ring
    return ring_id


def unregister(ring_id: int) -> None:
    _rings.pop(ring_id, None)


@torch.library.custom_op("lp_plugin::ring_wait", mutates_args=("hidden",))
def ring_wait(hidden: torch.Tensor, ring: int, pos: int) -> None:
    _rings[ring].wait(pos)


@torch.library.custom_op("lp_plugin::ring_done", mutates_args=("hidden",))
def ring_done(hidden: torch.Tensor, ring: int, pos: int) -> None:
    _rings[ring].done(pos)


@torch.library.custom_op("lp_plugin::ring_join", mutates_args=("hidden",))
def ring_join(hidden: torch.Tensor, ring: int) -> None:
    _rings[ring].join()


@ring_wait.register_fake
def _(hidden, ring, pos):
    return None


@ring_done.register_fake
def _(hidden, ring, pos):
    return None


@ring_join.register_fake
def _(hidden, ring):
    return None
