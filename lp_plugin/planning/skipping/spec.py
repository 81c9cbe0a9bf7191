"""The grammar of the ``skip`` and ``stand_in`` options (pure Python, no torch).

* ``stand_in``: ``none`` (a skipped layer's output is its input), ``mean`` (``x + b``) or ``linear``
  (``x + W x + b``), ``linear:RANK`` for a low-rank ``W`` (``linear:64``).
* ``skip`` policy specs: ``NAME:COUNT`` where ``COUNT`` is a number of layers (``greedy:6``) or a
  share of the model's layers (``greedy:20%``: 6 of 30, rounded to the nearest layer). Explicit
  layer lists and ranges (``"5,9"``, ``"5-7"``) are read by :func:`lp_plugin.policies.select_layers`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ...errors import OffloadSpecError

STAND_IN_KINDS = ("none", "mean", "linear")
_POLICY = re.compile(r"^([A-Za-z][\w-]*):\s*(\d+(?:\.\d+)?)\s*(%?)$", re.ASCII)


@dataclass(frozen=True)
class StandInSpec:
    kind: str = "none"
    rank: int | None = None  # linear only: rank of W (None: full rank)

    def __str__(self):
        return self.kind if self.rank is None else f"{self.kind}:{self.rank}"


def parse_stand_in(text) -> StandInSpec:
    """``"linear:64"`` -> ``StandInSpec("linear", 64)``; anything else gets an error naming the forms."""
    forms = "use 'none', 'mean', 'linear' or 'linear:RANK' (RANK an int >= 1, e.g. 'linear:64')"
    if not isinstance(text, str) or not text.strip():
        raise OffloadSpecError(f"stand_in must be a name, got {text!r}; {forms}")
    kind, sep, rank = text.strip().partition(":")
    if kind not in STAND_IN_KINDS:
        raise OffloadSpecError(f"unknown stand_in {text!r}; {forms}")
    if not sep:
        return StandInSpec(kind)
    if kind != "linear" or not re.fullmatch(r"[0-9]{1,9}", rank.strip(), flags=re.ASCII) or int(rank) < 1:
        raise OffloadSpecError(f"stand_in {text!r} is not valid; {forms}")
    return StandInSpec(kind, int(rank))


@dataclass(frozen=True)
class PolicySpec:
    name: str
    amount: float
    percent: bool

    def count(self, num_layers: int) -> int:
        """How many layers the spec asks for in a model of ``num_layers`` layers."""
        if not self.percent:
            return int(self.amount)
        return int(math.floor(self.amount * num_layers / 100 + 0.5))

    def __str__(self):
        amount = f"{self.amount:g}"
        return f"{self.name}:{amount}%" if self.percent else f"{self.name}:{amount}"


def parse_policy(text: str) -> PolicySpec | None:
    """``"greedy:20%"`` -> ``PolicySpec("greedy", 20, True)``; None for text of another form (a
    layer list, a range, or a bare name)."""
    m = _POLICY.match(text.strip())
    if not m:
        return None
    name, amount, percent = m[1], float(m[2]), bool(m[3])
    if not percent and not amount.is_integer():
        raise OffloadSpecError(
            f"skip={text!r}: a layer count must be a whole number; write e.g. '{name}:3' or '{name}:10%'"
        )
    if percent and not 0 <= amount <= 100:
        raise OffloadSpecError(f"skip={text!r}: a share of the layers must be between 0% and 100%")
    return PolicySpec(name, amount, percent)


def check_calib(value):
    """``calib`` as given, once its form is one lp_plugin reads: None (mix), ``mix``, ``mix:TOKENS``,
    ``pydoc``, ``pydoc:TOKENS`` (ASCII digits), the path of an existing file, a sequence of int token ids, or a
    1-D integer tensor of them (checked against the model later). Checked before any model loads."""
    forms = "pass 'mix', 'mix:TOKENS', 'pydoc', 'pydoc:TOKENS', a text file path or a list of token ids"
    if value is None:
        return value
    if type(value).__name__ == "Tensor":
        if value.dtype.is_floating_point or value.dtype.is_complex or str(value.dtype) == "torch.bool":
            raise OffloadSpecError(f"calib token ids must be an integer tensor, got {value.dtype}; {forms}")
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            text = os.fsdecode(os.fspath(value)).strip()
        except (TypeError, UnicodeDecodeError):
            raise OffloadSpecError(f"calib {value!r:.80} is not a usable path; {forms}") from None
        if not text:
            raise OffloadSpecError(f"calib is empty; {forms}")
        name, sep, count = text.partition(":")
        if name in ("pydoc", "mix"):
            if sep and (not re.fullmatch(r"[0-9]{1,12}", count, flags=re.ASCII) or int(count) < 2):
                raise OffloadSpecError(
                    f"calib={text!r}: TOKENS is a whole number in ASCII digits; ask for at least 2 (e.g. 'pydoc:4096')"
                )
            return text if isinstance(value, str) else value
        if "\0" in text or not os.path.isfile(os.path.expanduser(text)):
            raise OffloadSpecError(
                f"calib={text!r} is neither 'mix', 'mix:TOKENS', 'pydoc', 'pydoc:TOKENS' nor an existing text file; "
                f"{forms}"
            )
        from .calib import check_file

        check_file(os.path.expanduser(text))
        return text if isinstance(value, str) else value
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return tuple(value)
    raise OffloadSpecError(
        "calib must be 'mix', 'mix:TOKENS', 'pydoc', 'pydoc:TOKENS', a text file path or a list of token ids, "
        f"got {value!r:.80}"
    )
