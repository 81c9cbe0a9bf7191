"""``OffloadConfig``: every option of lp_plugin, declared and validated in one place.

``attach``, ``from_pretrained``, the lm-eval model type and lp-bench all build one of these
(from keyword arguments or from lm-eval's ``model_args`` strings) and pass it down; nothing below
validates an option again. No torch import here.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Sequence

from .errors import OffloadSpecError
from .policies import PROTECT_FIRST, PROTECT_LAST

MODES = ("session", "stream")


@dataclass(frozen=True)
class OffloadConfig:
    """What to offload, where, and how it comes back.

    offload: which decoder layers (a policy name such as ``even``, ``"2,4,6"``, ``"2-32:2"`` or a list of ints).
    tier: where offloaded layers live between uses (``cpu``: pinned host memory; ``disk``: safetensors files).
    mode: ``session`` (resident for a session, standby VRAM saved) or ``stream`` (a ring of GPU buffers per forward).
    alpha: ``x + alpha * (L(x) - x)`` per offloaded layer; 1 is exact, 0 drops the layers.
    offload_folder: the disk tier's folder (``~`` is expanded).
    prefetch: stream mode: layers copied ahead (a ring of ``prefetch + 1`` buffers).
    protect_first / protect_last: layers a named policy never offloads at either end.
    main_device: where resident layers run (default: the model's embeddings' device, or the current GPU).
    skip: layers not run at all (training-free layer skipping): a layer list or range, or a skip policy
        (see ``lp_plugin.skipping``); composes with ``offload``, which then applies to the other layers.
    stand_in: what runs in place of a skipped layer: ``none`` (its output is its input) or a fitted stand-in.
    calib: calibration text for skip policies and stand-ins (see ``lp_plugin.skipping``).
    """

    offload: object = "even"
    tier: str = "cpu"
    mode: str = "session"
    alpha: float = 1.0
    offload_folder: str | None = None
    prefetch: int = 1
    protect_first: int = PROTECT_FIRST
    protect_last: int = PROTECT_LAST
    main_device: object = None
    skip: object = None
    stand_in: str = "none"
    calib: object = None

    def __post_init__(self):
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))
        from .plugins import tier_class

        if getattr(tier_class(self.tier), "needs_folder", False) and self.offload_folder is None:
            raise OffloadSpecError(
                f"tier={self.tier!r} needs offload_folder=DIR (a folder on a local disk with room for the offloaded layers)"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, config: "OffloadConfig | None" = None, **options) -> "OffloadConfig":
        """``config`` with ``options`` applied (the keyword arguments of ``attach``/``from_pretrained``)."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise OffloadSpecError(f"unknown option(s) {unknown}; lp_plugin's options are {list(cls.names())}")
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise OffloadSpecError(f"config must be an lp_plugin.OffloadConfig, got {type(config).__name__}")
        return replace(config, **options) if options else config

    @classmethod
    def split(cls, kwargs: dict) -> tuple:
        """``(options, rest)``: the lp_plugin options among ``kwargs`` and everything else."""
        ours = {k: v for k, v in kwargs.items() if k in cls.names()}
        return ours, {k: v for k, v in kwargs.items() if k not in ours}

    @classmethod
    def from_strings(cls, values: dict) -> "OffloadConfig":
        """Build from lm-eval ``model_args``, which arrive as strings or as lm-eval typed them
        (``offload=none`` as None, ``offload=3`` as 3, ``alpha=1`` as 1). Explicit layer lists use
        ``;`` (``offload=2;4;6``) because ``,`` separates model_args."""
        values = dict(values)
        for name in ("offload", "skip"):
            if name in values:
                values[name] = _offload_from_string(values[name])
        for name in ("prefetch", "protect_first", "protect_last"):
            if isinstance(values.get(name), str):
                values[name] = _int_from_string(name, values[name])
        if isinstance(values.get("alpha"), str):
            values["alpha"] = _float_from_string("alpha", values["alpha"])
        return cls.from_options(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offload"] = self.offload if isinstance(self.offload, str) else list(self.offload)
        d["main_device"] = None if self.main_device is None else str(self.main_device)
        return d


# ---------------------------------------------------------------------------------- one check per option
def _check_offload(value):
    if value is None:
        raise OffloadSpecError("offload spec is None; pass 'even', 'odd', 'none', 'all', '2,4,6' or '2-32:2'")
    if isinstance(value, str):
        if not value.strip():
            raise OffloadSpecError("offload spec is empty; use offload='none' to offload nothing")
        return value.strip()
    if isinstance(value, (Sequence, set, frozenset)):
        items = list(value)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise OffloadSpecError(f"offload layer list must hold ints, got {item!r}")
        if not items:
            raise OffloadSpecError("offload layer list is empty; use offload='none' to offload nothing")
        return tuple(int(i) for i in items)
    raise OffloadSpecError(f"offload spec must be a str or a list of ints, got {type(value).__name__}")


def _check_skip(value):
    return None if value is None else _check_offload(value)


def _check_stand_in(value):
    if not isinstance(value, str) or not value.strip():
        raise OffloadSpecError(f"stand_in must be a name such as 'none', 'mean' or 'linear', got {value!r}")
    return value.strip()


def _check_tier(value):
    from .plugins import tier_names

    if not isinstance(value, str):
        raise OffloadSpecError(f"tier must be a tier name such as 'cpu' or 'disk', got {value!r}")
    names = tier_names()
    if value not in names:
        raise OffloadSpecError(f"unknown tier {value!r}; choose one of {names} (or install a plugin that registers it)")
    return value


def _check_mode(value):
    if value not in MODES:
        raise OffloadSpecError(
            f"unknown mode {value!r}; choose 'session' (layers resident for a session) or 'stream' (ring of GPU buffers)"
        )
    return value


def _check_alpha(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OffloadSpecError(f"alpha must be a number in [0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise OffloadSpecError(f"alpha must be in [0, 1] (1 = exact offloading, 0 = drop the layers), got {value!r}")
    return value


def _check_folder(value):
    if value is None:
        return None
    try:
        path = os.fsdecode(os.fspath(value))
    except (TypeError, UnicodeDecodeError):
        raise OffloadSpecError(f"offload_folder must be a path (str or os.PathLike), got {value!r}") from None
    if not path.strip() or "\0" in path:
        raise OffloadSpecError(f"offload_folder {value!r} is not a usable path; pass a folder such as '/mnt/nvme/offload'")
    return os.path.abspath(os.path.expanduser(path))


def _non_negative_int(name, what):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OffloadSpecError(f"{name} must be an int >= 0 ({what}), got {value!r}")
        return value

    return check


def _check_main_device(value):
    if value is None or isinstance(value, (str, int)) or type(value).__name__ == "device":
        return value
    raise OffloadSpecError(f"main_device must be a device such as 'cuda:0', 0 or 'cpu', got {value!r}")


_CHECKS = {
    "offload": _check_offload,
    "tier": _check_tier,
    "mode": _check_mode,
    "alpha": _check_alpha,
    "offload_folder": _check_folder,
    "prefetch": _non_negative_int("prefetch", "layers copied ahead in stream mode"),
    "protect_first": _non_negative_int("protect_first", "leading layers a named policy keeps resident"),
    "protect_last": _non_negative_int("protect_last", "trailing layers a named policy keeps resident"),
    "main_device": _check_main_device,
    "skip": _check_skip,
    "stand_in": _check_stand_in,
    "calib": lambda value: value,  # its forms are read by lp_plugin.skipping, which checks them
}


# ---------------------------------------------------------------------------------- lm-eval's typed strings
def _offload_from_string(value):
    if value is None:
        return "none"
    if isinstance(value, bool):
        raise OffloadSpecError(f"offload={value!r} is not a spec; use a policy name ('even', 'odd', 'all', 'none'), '2;4;6' or '2-32:2'")
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        raise OffloadSpecError(f"offload={value!r} is not a layer index; write layers as ints such as offload=3 or offload=2;4;6")
    if isinstance(value, str):
        parts = [p for p in value.replace("+", ";").replace(" ", ";").split(";") if p]
        return ",".join(parts) if len(parts) > 1 else value.strip()
    return value


def _int_from_string(name, text):
    digits = text.strip().lstrip("-")
    if digits.isascii() and digits.isdigit():
        return int(text)
    raise OffloadSpecError(f"{name} must be an int, got {text!r}")


def _float_from_string(name, text):
    try:
        return float(text)
    except ValueError:
        raise OffloadSpecError(f"{name} must be a number, got {text!r}") from None
