"""``OffloadConfig``: every option of lp_plugin, declared and validated in one place.

``attach``, ``from_pretrained``, the lm-eval model type and lp-bench all build one of these
(from keyword arguments or from lm-eval's ``model_args`` strings) and pass it down; nothing below
validates an option again. No torch import here.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, TypeAlias, Union, cast

from ..errors import OffloadSpecError, outside_stacklevel
from .plugins import tier_names
from .policies import PROTECT_FIRST, PROTECT_LAST, layer_int
from .skipping.spec import check_calib, parse_policy, parse_stand_in

if TYPE_CHECKING:
    import torch

LayerSpec: TypeAlias = str | Sequence[int]  # a policy name or range spec, or layer indices
MemorySpec: TypeAlias = str | int | Mapping[int | str, int | str] | tuple[tuple[int | str, int], ...]
# (torch is not imported here: these two name its types by string)
DeviceSpec: TypeAlias = Union[str, int, "torch.device"]  # "cuda:0", a GPU index, or a device
CalibSpec: TypeAlias = Union[str, os.PathLike, Sequence[int], "torch.Tensor"]  # a corpus name, a file, token ids

MODES = ("session", "stream")
PREFETCH = 1  # stream mode's layers copied ahead, by default
DECODES = ("eager", "graph")  # how a decode step runs: its forward as called, or a replayed CUDA graph
EMBEDDINGS = ("device", "host")  # where the input embeddings and the lm_head keep their weights
WORKS = ("generate", "loglikelihood")
BUDGET_OPTIONS = ("max_context", "batch_size", "work")  # what offload="auto" plans for, and nothing else reads
_BITS = {"TB": "terabits", "GB": "gigabits", "MB": "megabits", "KB": "kilobits"}
_UNITS = (
    ("TIB", 2**40),
    ("GIB", 2**30),
    ("MIB", 2**20),
    ("KIB", 2**10),
    ("TB", 10**12),
    ("GB", 10**9),
    ("MB", 10**6),
    ("KB", 10**3),
)


@dataclass(frozen=True)
class OffloadConfig:
    """What to offload, where, and how it comes back: every option of ``attach`` and ``from_pretrained``,
    checked (and put in one normal form) when the config is built. With ``offload="auto"`` the layers and
    the mode are planned to fit ``max_memory`` for the work the budget options describe (``lp_plugin.planning.
    budget``; docs/budgets.md); ``mode="session"`` then lets the planner pick session or stream."""

    offload: LayerSpec = "even"
    """Which decoder layers: a policy name (``even``, ``auto``, ...), ``"2,4,6"``, ``"2-32:2"`` or layer indices."""
    tier: str = "cpu"
    """Where offloaded layers live between uses: ``cpu`` (pinned host memory), ``disk`` (safetensors files)."""
    mode: str = "session"
    """``session`` (resident for a session, standby VRAM saved) or ``stream`` (a ring of GPU buffers per forward)."""
    alpha: float = 1.0
    """``x + alpha * (L(x) - x)`` per offloaded layer: 1 is exact, 0 drops the layers."""
    offload_folder: str | None = None
    """The disk tier's folder, ``~`` expanded (default: a temporary folder, removed at detach or exit)."""
    prefetch: int = PREFETCH
    """Stream mode: layers copied ahead (a ring of ``prefetch + 1`` buffers)."""
    protect_first: int = PROTECT_FIRST
    """Leading layers a named policy never offloads."""
    protect_last: int = PROTECT_LAST
    """Trailing layers a named policy never offloads."""
    main_device: DeviceSpec | None = None
    """Where resident layers run (default: the model's embeddings' device, or the current GPU)."""
    embeddings: str = "device"
    """Input embeddings and lm_head: ``device`` (offload="auto" may move them) or ``host`` (pinned host memory)."""
    skip: LayerSpec | None = None
    """Layers not run at all: a layer list or range, or a skip policy (``bi:3``, docs/skipping.md)."""
    stand_in: str = "none"
    """What runs in place of a skipped layer: ``none`` (its input), ``mean`` or ``linear[:RANK]`` (fitted)."""
    calib: CalibSpec | None = None
    """Calibration tokens for skip policies and stand-ins: ``mix`` (default), ``mix:N``, ``pydoc[:N]``, a file, ids."""
    max_memory: MemorySpec | None = None
    """The budget, Accelerate's form (``{0: "6GiB", "cpu": "30GiB"}``, a bare ``"6GiB"``, ``"0:6GiB;cpu:30GiB"``)."""
    max_context: int | str | None = None
    """Tokens of context the budget must hold (default: the model's), or ``"auto"``: the longest that fits."""
    batch_size: int | None = None
    """Sequences per forward the budget must hold (default 1)."""
    work: str | None = None
    """What the budget plans for: ``generate`` (the default) or ``loglikelihood`` (lm-eval's scoring)."""
    decode: str = "eager"
    """Decode steps: ``eager`` (as called) or ``graph`` (captured once per session and replayed as a CUDA graph)."""

    def __post_init__(self):
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))
        self._check_budget()
        self._check_skip_options()
        self._check_prefetch()

    def _check_prefetch(self):
        if self.mode == "session" and self.offload != "auto" and self.prefetch != PREFETCH:
            raise OffloadSpecError(
                f"prefetch={self.prefetch} sets how many layers stream mode copies ahead; with mode='session' it "
                "would be ignored: pass mode='stream', or drop prefetch"
            )

    def _given(self, name: str) -> bool:
        value, unset = getattr(self, name), _UNSET[name]
        return value is not None if unset is None else value != unset

    def _check_skip_options(self):
        given = [f"{name}={_short(getattr(self, name))}" for name in _UNSET if self._given(name)]
        if self.skip is None and given:
            raise OffloadSpecError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to skipped layers: without "
                f"skip= {'they' if len(given) > 1 else 'it'} would be ignored; pass skip= (e.g. skip='greedy:10%'), "
                f"or drop {'them' if len(given) > 1 else 'it'}"
            )

    def _check_budget(self):
        given = [name for name in BUDGET_OPTIONS if getattr(self, name) is not None]
        if self.offload != "auto":
            if given:
                raise OffloadSpecError(
                    f"{given} only apply with offload='auto' (they are what it plans for); with "
                    f"offload={self.offload!r} they would be ignored: drop them, or pass offload='auto'"
                )
            return  # max_memory may still bound a device_map="auto" base placement (from_pretrained checks its use)
        if self.alpha == 0:
            raise OffloadSpecError(
                "offload='auto' picks layers to offload and run; alpha=0 would drop them instead: "
                "pass an explicit layer list to drop, or alpha > 0"
            )
        if self.skip is not None:
            raise OffloadSpecError(
                "offload='auto' plans every layer's memory and does not know which layers skip= "
                "leaves out: pass an explicit offload spec with skip="
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, config: OffloadConfig | None = None, **options) -> OffloadConfig:
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
    def from_strings(cls, values: dict) -> OffloadConfig:
        """Build from lm-eval ``model_args``, which arrive as strings or as lm-eval typed them
        (``offload=none`` as None, ``offload=3`` as 3, ``alpha=1`` as 1). Explicit layer lists use
        ``;`` (``offload=2;4;6``) because ``,`` separates model_args."""
        values = dict(values)
        if "stand_in" in values and values["stand_in"] is None:
            values["stand_in"] = "none"  # lm-eval reads stand_in=none as None
        for name in ("offload", "skip"):
            if name in values:
                values[name] = _offload_from_string(values[name])
        for name in ("prefetch", "protect_first", "protect_last", "max_context", "batch_size"):
            if isinstance(values.get(name), str) and not (
                name == "max_context" and values[name].strip().lower() == "auto"
            ):
                values[name] = _int_from_string(name, values[name])
        if isinstance(values.get("alpha"), str):
            values["alpha"] = _float_from_string("alpha", values["alpha"])
        return cls.from_options(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offload"] = self.offload if isinstance(self.offload, str) else list(self.offload)
        d["main_device"] = None if self.main_device is None else str(self.main_device)
        parsed = cast("tuple[tuple[int | str, int], ...] | None", self.max_memory)  # (parsed when built)
        d["max_memory"] = None if parsed is None else {str(k): v for k, v in parsed}
        return d


_UNSET = {"stand_in": "none", "calib": None}  # the skip options' values when not given


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a calibration given as token ids can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- memory sizes
def parse_size(value, what: str = "max_memory") -> int:
    """Bytes of ``value``: an int, a digit string, or a number with a unit, read like Accelerate's
    ``convert_file_size_to_int``: ``TiB``/``GiB``/``MiB``/``KiB`` are powers of 2, ``TB``/``GB``/``MB``/``KB``
    powers of 10 (case-insensitive), and a unit ending in a lower-case ``b`` (``"5Gb"``) counts bits."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = value.strip() if isinstance(value, str) else None
    if text and text.isascii():
        if text.isdigit():
            return int(text)
        for unit, factor in _UNITS:
            if text.upper().endswith(unit):
                try:
                    number = float(text[: -len(unit)])
                except ValueError:
                    break
                if not math.isfinite(number) or number < 0:
                    break
                size = int(number * factor)
                bits = not unit.endswith("IB") and text.endswith("b")  # "5Gb": gigabits, as Accelerate reads it
                if bits:
                    warnings.warn(
                        f"{what}: {value!r} is read as {_BITS[unit]}, as Accelerate reads a lower-case 'b': "
                        f"{size // 8:,} bytes; for bytes write '{text[: -len(unit)]}{unit}' or use GiB/MiB",
                        UserWarning,
                        stacklevel=outside_stacklevel(),
                    )
                return size // 8 if bits else size
    raise OffloadSpecError(
        f"{what}: cannot read {value!r} as a memory size; write bytes as an int or a number with a unit such as "
        "'6GiB', '6144MiB' or '6.5GB'"
    )


def _memory_key(key):
    """Accelerate's device keys: a GPU index (``0``, ``"0"``, ``"cuda:0"``) or ``"cpu"``."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if type(key).__name__ == "device" and getattr(key, "type", None) in ("cuda", "cpu"):  # a torch.device
        return "cpu" if key.type == "cpu" else (key.index or 0)
    if isinstance(key, str):
        text = key.strip().lower()
        if text == "cpu":
            return "cpu"
        index = text.removeprefix("cuda:")
        if index.isascii() and index.isdigit():
            return int(index)
    if key == "disk":
        raise OffloadSpecError(
            "max_memory has no 'disk' entry here: the disk tier is chosen with tier='disk' (offload_folder=DIR "
            "picks its folder)"
        )
    raise OffloadSpecError(f"max_memory key {key!r} is not a device; use a GPU index (0, 'cuda:0') or 'cpu'")


def parse_max_memory(value):
    """``max_memory`` as a tuple of ``(key, bytes)``: key a GPU index, ``"cpu"`` (host memory for
    offloaded layers), or ``"main"`` (a bare size: the main device). Takes a dict, a bare size, or a
    string ``"0:6GiB;cpu:30GiB"`` (``=`` also separates key and size; ``,`` also separates entries)."""
    if value is None:
        return None
    if isinstance(value, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in value):
        value = dict(value)  # already parsed
    if isinstance(value, str) and any(sep in value for sep in ":=;,"):
        items = {}
        for part in (p.strip() for p in value.replace(",", ";").split(";")):
            if not part:
                continue
            if _names_a_device(part):
                raise OffloadSpecError(f"max_memory entry {part!r} in {value!r} has no size; {_entry_hint(part)}")
            sep = "=" if "=" in part else ":"
            key, found, size = part.rpartition(sep)
            key = key if found else "main"
            if key in items and key == "main":
                raise OffloadSpecError(
                    f"max_memory {value!r} gives two sizes without a device; name each one's device, e.g. "
                    "'0:6GiB;cpu:30GiB'"
                )
            if key in items:
                raise OffloadSpecError(f"max_memory names {key!r} twice in {value!r}")
            items[key] = size
        value = items
    if not isinstance(value, dict):
        if isinstance(value, str) and _names_a_device(value):
            raise OffloadSpecError(f"max_memory {value!r} names a device and no size; {_entry_hint(value)}")
        return (("main", parse_size(value)),)
    if not value:
        raise OffloadSpecError("max_memory is empty; give at least the main device's budget, e.g. max_memory='6GiB'")
    out = {}
    for key, size in value.items():
        norm = key if key == "main" else _memory_key(key)
        if norm in out:
            raise OffloadSpecError(f"max_memory names device {norm!r} twice ({list(value)})")
        out[norm] = parse_size(size, f"max_memory[{key!r}]")
    return tuple(sorted(out.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]))))


def _names_a_device(text: str) -> bool:
    """``text`` names a device (``cpu``, ``disk``, ``cuda``, ``cuda:N``) and gives no size."""
    text = text.strip().lower()
    return text in ("cpu", "disk", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())


def _entry_hint(device: str) -> str:
    """How to write a ``max_memory`` entry for ``device``."""
    device = device.strip().lower()
    if device == "disk":
        return "max_memory has no 'disk' entry: the disk tier is chosen with tier='disk' (its host memory: cpu:SIZE)"
    if device == "cpu":
        return "write cpu:SIZE, e.g. cpu:30GiB"
    index = device.removeprefix("cuda").lstrip(":") or "0"
    return f"write the GPU's index and its size, e.g. {index}:6GiB"


# ---------------------------------------------------------------------------------- one check per option
def _check_offload(value, what: str = "offload"):
    if value is None:
        raise OffloadSpecError(f"{what} spec is None; pass 'even', 'odd', 'none', 'all', '2,4,6' or '2-32:2'")
    if isinstance(value, str):
        if not value.strip():
            raise OffloadSpecError(f"{what} spec is empty; use {what}='none' to {what} nothing")
        return value.strip()
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (bytes, bytearray)):
        items = [layer_int(item, what) for item in value]
        if not items:
            raise OffloadSpecError(f"{what} layer list is empty; use {what}='none' to {what} nothing")
        return tuple(items)
    raise OffloadSpecError(f"{what} spec must be a str or a list of ints, got {type(value).__name__}")


def _check_skip(value):
    if value is None:
        return None
    value = _check_offload(value, "skip")
    if isinstance(value, str) and ":" in value and value.split(":", 1)[0].strip().isidentifier():
        if parse_policy(value) is None:  # a policy name with an amount that is not a count or a share
            name = value.split(":", 1)[0].strip()
            raise OffloadSpecError(
                f"skip={value!r}: after '{name}:' give a number of layers (>= 0) or a share of them, "
                f"e.g. '{name}:3' or '{name}:10%'"
            )
    return value


def _check_stand_in(value):
    return str(parse_stand_in(value))


def _check_tier(value):
    if not isinstance(value, str):
        raise OffloadSpecError(f"tier must be a tier name such as 'cpu' or 'disk', got {value!r}")
    names = tier_names()
    if value not in names:
        raise OffloadSpecError(f"unknown tier {value!r}; choose one of {names} (or install a plugin that registers it)")
    return value


def _check_mode(value):
    if value not in MODES:
        raise OffloadSpecError(
            f"unknown mode {value!r}; choose 'session' (layers resident for a session) or 'stream' "
            "(ring of GPU buffers)"
        )
    return value


def _check_embeddings(value):
    if value not in EMBEDDINGS:
        raise OffloadSpecError(
            f"embeddings must be 'device' (input embeddings and lm_head on the main device) or 'host' (their "
            f"weights in pinned host memory, the lm_head copied in per call), got {value!r}"
        )
    return value


def _check_decode(value):
    if value not in DECODES:
        raise OffloadSpecError(
            f"decode must be 'eager' (each decode step runs as called) or 'graph' (a decode step captured once "
            f"per session and replayed as a CUDA graph), got {value!r}"
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
        raise OffloadSpecError(
            f"offload_folder {value!r} is not a usable path; pass a folder such as '/mnt/nvme/offload'"
        )
    return os.path.abspath(os.path.expanduser(path))


def _non_negative_int(name, what):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OffloadSpecError(f"{name} must be an int >= 0 ({what}), got {value!r}")
        return value

    return check


def _check_main_device(value):
    if value is None or type(value).__name__ == "device":
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        from ..core.devices import parse_device

        parse_device(value)  # a spelling torch reads (no device is needed for that)
        return value
    raise OffloadSpecError(f"main_device must be a device such as 'cuda:0', 0 or 'cpu', got {value!r}")


def _optional_positive_int(name, what):
    def check(value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OffloadSpecError(f"{name} must be an int >= 1 ({what}), got {value!r}")
        return value

    return check


def _check_max_context(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _optional_positive_int("max_context", "tokens of context the budget must hold; or 'auto'")(value)


def _check_work(value):
    if value is not None and value not in WORKS:
        raise OffloadSpecError(
            f"work must be 'generate' (last-token logits) or 'loglikelihood' (lm-eval's full logits), got {value!r}"
        )
    return value


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
    "embeddings": _check_embeddings,
    "skip": _check_skip,
    "stand_in": _check_stand_in,
    "calib": check_calib,
    "max_memory": parse_max_memory,
    "max_context": _check_max_context,
    "batch_size": _optional_positive_int("batch_size", "sequences per forward the budget must hold"),
    "work": _check_work,
    "decode": _check_decode,
}


# ---------------------------------------------------------------------------------- lm-eval's typed strings
def _offload_from_string(value):
    if value is None:
        return "none"
    if isinstance(value, bool):
        raise OffloadSpecError(
            f"offload={value!r} is not a spec; use a policy name ('even', 'odd', 'all', 'none'), '2;4;6' or '2-32:2'"
        )
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        raise OffloadSpecError(
            f"offload={value!r} is not a layer index; write layers as ints such as offload=3 or offload=2;4;6"
        )
    if isinstance(value, str):
        parts = [p for p in value.replace("+", ";").replace(" ", ";").split(";") if p]
        return ",".join(parts) if len(parts) > 1 else value.strip()
    return value


def _int_from_string(name, text):
    if re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip(), flags=re.ASCII):
        return int(text.strip())
    raise OffloadSpecError(f"{name} must be an int written in ASCII digits (e.g. {name}=2), got {text!r}")


def _float_from_string(name, text):
    if not text.isascii():
        raise OffloadSpecError(f"{name} must be a number written in ASCII (e.g. {name}=0.5), got {text!r}")
    try:
        return float(text)
    except ValueError:
        raise OffloadSpecError(f"{name} must be a number, got {text!r}") from None
