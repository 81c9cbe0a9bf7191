"""Offload policies and the offload spec grammar: which decoder layers go to the offload tier.

A spec is a registered policy name (built-ins: ``even``, ``odd``, ``none``, ``all``; plugins may
add more), an explicit list ``"2,4,6"``, ranges ``"2-32:2"`` (inclusive, optional step), a mix of
lists and ranges, or a sequence of ints. Named policies honour ``protect_first``/``protect_last``
(defaults 2 and 3: the first two and last three layers are never offloaded); explicit layers are
taken as given but must be in range and unique. Pure Python: no torch import, no plugin registry
(:mod:`lp_plugin.planning.plan` passes the registered policies in).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from ..errors import OffloadSpecError

PROTECT_FIRST = 2
PROTECT_LAST = 3
_RANGE = re.compile(r"^(\d+)-(\d+)(?::(\d+))?$", re.ASCII)
_INT = re.compile(r"^-?\d+$", re.ASCII)


class OffloadPolicy(ABC):
    """A named way to pick layers. Subclasses must set ``name`` (the spec string users type) and
    ``description``, and implement :meth:`select`; register instances through the
    ``register_policies`` plugin hook."""

    name: str = ""
    description: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and not cls.name:
            raise TypeError(f"{cls.__name__} must set a non-empty class attribute 'name'")

    @abstractmethod
    def select(self, num_layers: int, lo: int, hi: int) -> Iterable[int]:
        """Return the layer indices to offload among ``lo..hi`` (inclusive): the layers left after
        protecting the first and last ones. ``num_layers`` is the model's total."""


def check_counts(num_layers: int, protect_first: int, protect_last: int) -> None:
    for label, value in (("num_layers", num_layers), ("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OffloadSpecError(f"{label} must be a non-negative int, got {value!r}")
    if protect_first + protect_last > num_layers:
        raise OffloadSpecError(
            f"protect_first ({protect_first}) + protect_last ({protect_last}) is larger than the model's "
            f"{num_layers} layers; lower them, or give an explicit layer list such as offload='1,2'"
        )


def _parse_explicit(spec: str, num_layers: int) -> list:
    layers: list = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise OffloadSpecError(f"empty item in offload spec {spec!r}; write e.g. '2,4,6' or '2-32:2'")
        if _INT.match(part):
            layers.append(int(part))
            continue
        m = _RANGE.match(part)
        if not m:
            raise OffloadSpecError(
                f"cannot read {part!r} in offload spec {spec!r}; use a policy name, layer numbers "
                f"'2,4,6' or a range 'START-END[:STEP]' such as '2-32:2'"
            )
        start, end, step = int(m[1]), int(m[2]), int(m[3] or 1)
        if step < 1 or end < start:
            raise OffloadSpecError(
                f"range {part!r} is empty or has a bad step; write START-END[:STEP] with START<=END and STEP>=1"
            )
        if (
            start + (end - start) // step * step >= num_layers
        ):  # before expanding: '0-99999999999' must not build a huge list
            raise OffloadSpecError(
                f"range {part!r} goes past the last layer of a model with {num_layers} decoder layers (valid: "
                f"0..{num_layers - 1})"
            )
        layers.extend(range(start, end + 1, step))
    return layers


def select_layers(
    spec,
    num_layers: int,
    protect_first: int = PROTECT_FIRST,
    protect_last: int = PROTECT_LAST,
    *,
    policies: dict,
) -> tuple:
    """Turn an offload spec into a sorted tuple of distinct layer indices in ``[0, num_layers)``.

    ``select_layers("even", 36, policies=...) == (2, 4, ..., 32)``; ``"none"`` selects ``()``.
    ``policies`` maps names to :class:`OffloadPolicy` instances (:func:`lp_plugin.planning.plugins.policies`).
    Raises :class:`OffloadSpecError` with the fix for anything it cannot accept.
    """
    check_counts(num_layers, protect_first, protect_last)
    if spec is None:
        raise OffloadSpecError("offload spec is None; pass 'even', 'odd', 'none', 'all', '2,4,6' or '2-32:2'")
    if isinstance(spec, str):
        text = spec.strip()
        if text in policies:
            lo, hi = protect_first, num_layers - 1 - protect_last
            chosen = sorted(int(i) for i in policies[text].select(num_layers, lo, hi))
            bad = [i for i in chosen if not lo <= i <= hi]
            if bad:
                raise OffloadSpecError(
                    f"policy {text!r} chose protected or out-of-range layers {bad}; fix the policy plugin"
                )
            if len(set(chosen)) != len(chosen):
                raise OffloadSpecError(f"policy {text!r} chose a layer twice; fix the policy plugin")
            if not chosen and text != "none":
                raise OffloadSpecError(
                    f"offload={text!r} selects no layer of a {num_layers}-layer model with protect_first="
                    f"{protect_first}, protect_last={protect_last}; lower the protection, or use offload='none' to "
                    "offload nothing"
                )
            return tuple(chosen)
        if not text:
            raise OffloadSpecError("offload spec is empty; use offload='none' to offload nothing")
        if text[0].isalpha():
            raise OffloadSpecError(
                f"unknown offload policy {text!r}; choose one of {sorted(policies)}, 'auto' (fit a memory budget: "
                "max_memory=...), an explicit list '2,4,6', a range '2-32:2', or install a plugin that registers it"
            )
        layers = _parse_explicit(text, num_layers)
    elif isinstance(spec, Sequence) or isinstance(spec, (set, frozenset)):
        layers = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int):
                raise OffloadSpecError(f"offload layer list must hold ints, got {item!r}")
            layers.append(int(item))
        if not layers:
            raise OffloadSpecError("offload layer list is empty; use offload='none' to offload nothing")
    else:
        raise OffloadSpecError(f"offload spec must be a str or a list of ints, got {type(spec).__name__}")
    out_of_range = sorted({i for i in layers if not 0 <= i < num_layers})
    if out_of_range:
        raise OffloadSpecError(
            f"layers {out_of_range} are out of range for a model with {num_layers} decoder layers (valid: "
            f"0..{num_layers - 1})"
        )
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise OffloadSpecError(f"layers {dupes} appear more than once in offload spec {spec!r}; list each layer once")
    return tuple(sorted(layers))


# ----------------------------------------------------------------------------- built-in policies
class EvenPolicy(OffloadPolicy):
    name = "even"
    description = "even layers between the protected ends (Qwen2.5-3B: 2,4,...,32 of 36)"

    def select(self, num_layers, lo, hi):
        return [i for i in range(lo, hi + 1) if i % 2 == 0]


class OddPolicy(OffloadPolicy):
    name = "odd"
    description = "odd layers between the protected ends (Qwen2.5-3B: 3,5,...,31)"

    def select(self, num_layers, lo, hi):
        return [i for i in range(lo, hi + 1) if i % 2 == 1]


class AllPolicy(OffloadPolicy):
    name = "all"
    description = "every layer between the protected ends (the first protect_first and last protect_last stay resident)"

    def select(self, num_layers, lo, hi):
        return list(range(lo, hi + 1))


class NonePolicy(OffloadPolicy):
    name = "none"
    description = "offload nothing (the plain model)"

    def select(self, num_layers, lo, hi):
        return []
