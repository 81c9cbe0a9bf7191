"""Offload policies and the offload spec grammar: which decoder layers go to the offload tier.

A spec is a registered policy name (built-ins: ``even``, ``odd``, ``none``, ``all``; plugins may
add more), an explicit list ``"2,4,6"``, ranges ``"2-32:2"`` (inclusive, optional step), a mix of
lists and ranges, or a sequence of ints. Named policies honour ``protect_first``/``protect_last``
(defaults 2 and 3: the first two and last three layers are never offloaded); explicit layers are
taken as given but must be in range and unique. Pure Python: no torch import, no plugin registry
(:mod:`lp_plugin.planning.plan` passes the registered policies in).
"""

from __future__ import annotations

import operator
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


def check_counts(num_layers: int, protect_first: int, protect_last: int, named: bool = True) -> None:
    """The counts are non-negative ints and, where a named policy chooses (``named``), the protected layers fit
    the model (an explicit layer list ignores the protection)."""
    for label, value in (("num_layers", num_layers), ("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OffloadSpecError(f"{label} must be a non-negative int, got {value!r}")
    if named and protect_first + protect_last > num_layers:
        raise OffloadSpecError(
            f"protect_first ({protect_first}) + protect_last ({protect_last}) is larger than the model's "
            f"{num_layers} layers; lower them, or give an explicit layer list such as offload='1,2'"
        )


def _parse_explicit(spec: str, num_layers: int, option: str = "offload") -> list:
    layers: list = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise OffloadSpecError(f"empty item in {option} spec {spec!r}; write e.g. '2,4,6' or '2-32:2'")
        if _INT.match(part):
            layers.append(int(part))
            continue
        m = _RANGE.match(part)
        if not m:
            raise OffloadSpecError(
                f"cannot read {part!r} in {option} spec {spec!r}; use a policy name, layer numbers "
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


def layer_int(item, option: str) -> int:
    """A layer number of a list: an int or another integer type (numpy's, a one-element integer tensor); not a
    bool, not a float."""
    if isinstance(item, bool) or type(item).__name__ in ("bool_", "bool"):
        raise OffloadSpecError(f"{option} layer list must hold ints, got {item!r}")
    try:
        return operator.index(item)
    except TypeError:
        raise OffloadSpecError(f"{option} layer list must hold ints, got {item!r}") from None


def select_layers(
    spec,
    num_layers: int,
    protect_first: int = PROTECT_FIRST,
    protect_last: int = PROTECT_LAST,
    *,
    policies: dict,
    option: str = "offload",
) -> tuple:
    """Turn an offload spec into a sorted tuple of distinct layer indices in ``[0, num_layers)``.

    ``select_layers("even", 36, policies=...) == (2, 4, ..., 32)``; ``"none"`` selects ``()``.
    ``policies`` maps names to :class:`OffloadPolicy` instances (:func:`lp_plugin.planning.plugins.policies`).
    Raises :class:`OffloadSpecError` with the fix for anything it cannot accept, naming ``option`` (the
    keyword the spec was given as: ``offload``, or ``skip`` for a list of layers to skip).
    """
    check_counts(num_layers, protect_first, protect_last, named=isinstance(spec, str) and spec.strip() in policies)
    if spec is None:
        raise OffloadSpecError(f"{option} spec is None; pass 'even', 'odd', 'none', 'all', '2,4,6' or '2-32:2'")
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
                    f"{option}={text!r} selects no layer of a {num_layers}-layer model with protect_first="
                    f"{protect_first}, protect_last={protect_last}; lower the protection, or use {option}='none' to "
                    "select nothing"
                )
            return tuple(chosen)
        if not text:
            raise OffloadSpecError(f"{option} spec is empty; use {option}='none' to select nothing")
        if text[0].isalpha():
            raise OffloadSpecError(
                f"unknown {option} policy {text!r}; choose one of {sorted(policies)}"
                + (", 'auto' (fit a memory budget: max_memory=...)" if option == "offload" else "")
                + ", an explicit list '2,4,6', a range '2-32:2', or install a plugin that registers it"
            )
        layers = _parse_explicit(text, num_layers, option)
    elif isinstance(spec, Sequence) or isinstance(spec, (set, frozenset)):
        layers = []
        for item in spec:
            layers.append(layer_int(item, option))
        if not layers:
            raise OffloadSpecError(f"{option} layer list is empty; use {option}='none' to select nothing")
    else:
        raise OffloadSpecError(f"{option} spec must be a str or a list of ints, got {type(spec).__name__}")
    out_of_range = sorted({i for i in layers if not 0 <= i < num_layers})
    if out_of_range:
        raise OffloadSpecError(
            f"layers {out_of_range} are out of range for a model with {num_layers} decoder layers (valid: "
            f"0..{num_layers - 1})"
        )
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise OffloadSpecError(f"layers {dupes} appear more than once in {option} spec {spec!r}; list each layer once")
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
