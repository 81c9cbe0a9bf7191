"""The ``--configs`` grammar of lp-bench (pure Python, no torch).

    baseline[:new=N]                          the plain model
    baseline:twin                             the plain model again, measured last in every round: the
                                              run's own noise (always added)
    accelerate_cpu[:SPEC][:new=N]             Accelerate's dispatch_model with SPEC's layers on "cpu" (a peer)
    accelerate_disk[:SPEC][:new=N][:cold]     the same with SPEC's layers on "disk" (Accelerate's offload folder)
    airllm[:new=N][:cold]                     AirLLM (PyPI ``airllm``, optional): every module streamed from
                                              its per-layer shards on disk through transformers' forward
    MODE:SPEC:TIER[:alpha=A][:prefetch=N][:new=N][:cold][:load=attach|pretrained]
                  [:skip=SKIP][:stand_in=KIND][:calib=CALIB]
                                              an offloaded model: lp_plugin.attach on the loaded plain model
                                              (load=attach, the default) or lp_plugin.from_pretrained from
                                              the checkpoint (load=pretrained, as users and lm-eval load);
                                              skip/stand_in/calib: training-free layer skipping, as the
                                              options of the same names (``skip=greedy:20%``)

MODE is ``session`` or ``stream``; SPEC any offload spec (``even``, ``odd``, ``all``, ``2-32:2``,
``2,4,6``, a plugin policy); TIER a registered tier (``cpu``, ``disk``). ``new=N`` overrides
``--new`` for that config (slow peers); ``cold`` drops the page cache of the files a config reads
before every timed part (disk tier, ``accelerate_disk``, ``airllm``: cold-cache figures). Configs
are separated by commas; a comma inside a layer list is fine (``stream:2,4,6:cpu``), and so is a
colon inside a skip, stand_in or calib value (``skip=greedy:20%``, ``stand_in=linear:64``,
``calib=pydoc:32768``). Numbers are written in ASCII digits. A config with
``skip`` is not exact, like ``alpha < 1``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

HEADS = ("baseline", "accelerate_cpu", "accelerate_disk", "airllm", "session", "stream")
PEERS = ("accelerate_cpu", "accelerate_disk", "airllm")  # what users would run instead, measured beside lp_plugin
LOADS = ("attach", "pretrained")
TWIN = "baseline:twin"
_DEFAULT_TIERS = ("cpu", "disk")
_LP_OPTIONS = (
    "alpha=A, prefetch=N, new=N, cold, load=attach|pretrained, protect_first=N, protect_last=N, skip=SKIP, "
    "stand_in=KIND, calib=CALIB"
)
_NUMBER_OPTIONS = ("alpha", "prefetch", "new", "protect_first", "protect_last")
_TEXT_OPTIONS = ("skip", "stand_in", "calib")  # checked by OffloadConfig before the run (cli)
_COLON_OPTIONS = ("skip", "stand_in", "calib")  # values that may hold a colon themselves


def is_exact(cfg: dict) -> bool:
    """Whether a config (as its results-JSON dict) must reproduce the plain model's logits: alpha 1,
    nothing skipped."""
    return cfg.get("alpha", 1.0) == 1.0 and not cfg.get("skip")


class ConfigError(ValueError):
    """A config string lp-bench cannot read."""


@dataclass
class BenchConfig:
    name: str
    kind: str  # baseline | lp | one of PEERS
    mode: str | None = None
    spec: str | None = None
    tier: str | None = None
    alpha: float = 1.0
    prefetch: int = 1
    new: int | None = None
    cold: bool = False
    load: str = "attach"
    twin: bool = False
    skip: str | None = None
    stand_in: str = "none"
    calib: str | None = None
    protect_first: int | None = None  # None: OffloadConfig's default
    protect_last: int | None = None

    @property
    def exact(self) -> bool:
        return is_exact(self.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def bare_only(self) -> bool:
        """AirLLM is timed on prefill and the bare decode loop only, without untimed warm steps: its generate
        is transformers' generate over the same streamed forward, and each of its forwards reads the whole
        model (seconds on a GPU), which no warm-up changes."""
        return self.kind == "airllm"

    @property
    def key(self) -> str:
        """A file-system friendly name."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name)


def _tier_names() -> tuple:
    from lp_plugin.planning.plugins import tier_names

    return tuple(tier_names()) or _DEFAULT_TIERS


def split_configs(text: str) -> list:
    """Split a ``--configs`` value on commas, gluing back commas that sit inside a layer list."""
    out: list = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if piece.split(":", 1)[0] in HEADS or not out:
            out.append(piece)
        else:
            out[-1] = out[-1] + "," + piece
    return out


def _set_option(cfg: BenchConfig, key: str, value: str, text: str) -> None:
    try:
        if key in _NUMBER_OPTIONS and not value.isascii():
            raise ValueError  # int() and float() read other scripts' digits; the options grammar does not
        if key == "alpha":
            cfg.alpha = float(value)
            if not 0.0 <= cfg.alpha <= 1.0:
                raise ValueError
        elif key == "prefetch":
            cfg.prefetch = int(value)
            if cfg.prefetch < 0:
                raise ValueError
        elif key == "new":
            cfg.new = int(value)
            if cfg.new < 1:
                raise ValueError
        elif key in ("protect_first", "protect_last"):
            setattr(cfg, key, int(value))
            if getattr(cfg, key) < 0:
                raise ValueError
        elif key == "load":
            if value not in LOADS:
                raise ValueError
            cfg.load = value
        elif key in _TEXT_OPTIONS:
            if not value:
                raise ConfigError(f"empty value for {key} in config {text!r}")
            setattr(cfg, key, value)
        else:
            raise ConfigError(f"unknown option {key!r} in config {text!r}; options are {_LP_OPTIONS}")
    except ValueError:
        raise ConfigError(
            f"bad value {value!r} for {key} in config {text!r} "
            "(alpha in [0,1], prefetch >= 0, new >= 1, protect_first/protect_last >= 0, load attach or pretrained)"
        ) from None


def _glue(options: list) -> list:
    """Options split on ':' with the colons inside skip/calib values put back (``skip=greedy``, ``20%``)."""
    out: list = []
    for opt in options:
        if (
            out
            and "=" not in opt
            and opt not in ("cold", "twin")
            and out[-1].split("=", 1)[0].strip() in _COLON_OPTIONS
        ):
            out[-1] += ":" + opt
        else:
            out.append(opt)
    return out


def _apply_options(cfg: BenchConfig, options: list, text: str) -> None:
    for opt in _glue(options):
        if opt in ("cold", "twin"):
            setattr(cfg, opt, True)
            continue
        if "=" not in opt:
            raise ConfigError(f"cannot read option {opt!r} in config {text!r}; options are {_LP_OPTIONS}")
        key, value = (s.strip() for s in opt.split("=", 1))
        _set_option(cfg, key, value, text)
    if cfg.cold and cfg.kind not in ("lp", "accelerate_disk", "airllm"):
        raise ConfigError(
            f"config {text!r}: cold applies to configs that read files (session/stream, accelerate_disk, airllm)"
        )
    if cfg.kind != "lp" and (
        cfg.alpha != 1.0
        or cfg.prefetch != 1
        or cfg.load != "attach"
        or cfg.skip
        or cfg.stand_in != "none"
        or cfg.calib
        or cfg.protect_first is not None
        or cfg.protect_last is not None
    ):
        raise ConfigError(
            f"config {text!r}: alpha, prefetch, load, protect_first, protect_last, skip, stand_in and calib apply "
            "to session/stream configs only"
        )
    if cfg.twin and (cfg.kind != "baseline" or cfg.name != TWIN):
        raise ConfigError(f"config {text!r}: 'twin' is written exactly {TWIN!r} (the plain model measured again)")


def parse_config(text: str, tiers=None) -> BenchConfig:
    """Parse one config string. Raises :class:`ConfigError` saying how to write it."""
    text = text.strip()
    tiers = tuple(tiers) if tiers is not None else _tier_names()
    tokens = text.split(":")
    head = tokens[0]
    if head == "baseline":
        cfg = BenchConfig(name=text, kind="baseline")
        _apply_options(cfg, tokens[1:], text)
        return cfg
    if head in ("accelerate_cpu", "accelerate_disk"):
        rest = tokens[1:]
        spec = ":".join(t for t in rest if "=" not in t and t != "cold") or "even"
        cfg = BenchConfig(name=text, kind=head, spec=spec, tier=head.split("_")[1])
        _apply_options(cfg, [t for t in rest if "=" in t or t == "cold"], text)
        return cfg
    if head == "airllm":
        extra = [t for t in tokens[1:] if "=" not in t and t != "cold"]
        if extra:
            raise ConfigError(
                f"config {text!r}: AirLLM streams every module, it takes no offload spec "
                f"({':'.join(extra)!r}); write airllm[:new=N][:cold]"
            )
        cfg = BenchConfig(name=text, kind="airllm", spec="all", tier="disk")
        _apply_options(cfg, tokens[1:], text)
        return cfg
    if head in ("session", "stream"):
        tier_at = next((i for i in range(2, len(tokens)) if tokens[i] in tiers), None)
        if tier_at is None:
            raise ConfigError(
                f"config {text!r} names no tier; write MODE:SPEC:TIER[:alpha=A][:prefetch=N], "
                f"TIER one of {', '.join(tiers)}"
            )
        spec = ":".join(tokens[1:tier_at]).strip()
        if not spec:
            raise ConfigError(f"config {text!r} has an empty offload spec; e.g. {head}:even:{tokens[tier_at]}")
        cfg = BenchConfig(name=text, kind="lp", mode=head, spec=spec, tier=tokens[tier_at])
        _apply_options(cfg, tokens[tier_at + 1 :], text)
        return cfg
    raise ConfigError(
        f"unknown config {text!r}; use baseline, accelerate_cpu[:SPEC], accelerate_disk[:SPEC], airllm, or "
        "MODE:SPEC:TIER[:alpha=A][:prefetch=N] "
        "with MODE session or stream (e.g. stream:even:cpu)"
    )


def parse_configs(text: str, tiers=None) -> list:
    """The configs of a ``--configs`` value, in measuring order: ``baseline`` first (added if missing:
    every ratio is taken against it), ``baseline:twin`` last (added if missing: the plain model
    measured against itself a whole round later gives the run's noise)."""
    configs = [parse_config(piece, tiers) for piece in split_configs(text)]
    if not configs:
        raise ConfigError("--configs is empty; e.g. --configs baseline,session:even:cpu,stream:even:cpu")
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config(s) {dupes} listed twice")
    base = next((c for c in configs if c.kind == "baseline" and not c.twin), None) or parse_config("baseline", tiers)
    twin = next((c for c in configs if c.twin), None) or parse_config(TWIN, tiers)
    twin.new = base.new  # the twin repeats the baseline exactly
    middle = [c for c in configs if c is not base and c is not twin]
    if any(c.kind == "baseline" for c in middle):
        raise ConfigError("one plain config is measured (plus its twin): write baseline once (with new=N if needed)")
    return [base, *middle, twin]
