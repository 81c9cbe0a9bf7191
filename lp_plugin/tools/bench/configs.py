"""The ``--configs`` grammar of lp-bench (pure Python, no torch).

    baseline[:new=N]                          the plain model
    baseline:twin                             the plain model again, measured last in every round: the
                                              run's own noise (always added)
    accelerate_cpu[:SPEC][:new=N]             Accelerate's dispatch_model with SPEC's layers on "cpu" (a peer)
    accelerate_disk[:SPEC][:new=N][:cold]     the same with SPEC's layers on "disk" (Accelerate's offload folder)
    airllm[:new=N][:cold]                     AirLLM (PyPI ``airllm``, optional): every module streamed from
                                              its per-layer shards on disk through transformers' forward
    MODE:SPEC:TIER[:alpha=A][:prefetch=N][:new=N][:cold][:load=attach|pretrained]
                  [:skip=SKIP][:stand_in=KIND][:calib=CALIB][:decode=graph]
                                              an offloaded model: lp_plugin.attach on the loaded plain model
                                              (load=attach, the default) or lp_plugin.from_pretrained from
                                              the checkpoint (load=pretrained, as users and lm-eval load);
                                              skip/stand_in/calib: training-free layer skipping, as the
                                              options of the same names (``skip=greedy:20%``); decode=graph:
                                              decode steps replayed as CUDA graphs (docs/graphs.md)

MODE is ``session`` or ``stream``; SPEC any offload spec (``even``, ``odd``, ``all``, ``2-32:2``,
``2,4,6``, a plugin policy); TIER a registered tier (``cpu``, ``disk``). ``new=N`` overrides
``--new`` for that config (slow peers); ``cold`` drops the page cache of the files a config reads
before every timed part and every timed decode step (disk tier, ``accelerate_disk``, ``airllm``: cold-cache
figures, judged against the storage's read speed: :mod:`lp_plugin.tools.bench.storage`). Configs
are separated by commas; a comma inside a layer list is fine (``stream:2,4,6:cpu``), and so is a
colon inside a skip, stand_in or calib value (``skip=greedy:20%``, ``stand_in=linear:64``,
``calib=pydoc:32768``). Numbers are written in ASCII digits. A config with ``skip`` is not exact, like
``alpha < 1``.

An lp config holds an :class:`lp_plugin.OffloadConfig` built from MODE, SPEC, TIER and its options by
``OffloadConfig`` itself (as lm-eval's ``model_args`` strings are read), so every value is checked and
normalised exactly as ``attach`` and ``from_pretrained`` check it; lp-bench adds only what is its own
(``new``, ``cold``, ``load``, ``twin``). A value OffloadConfig refuses is a :class:`ConfigError` naming the
config and the option, its cause the :class:`lp_plugin.OffloadSpecError`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from lp_plugin.errors import OffloadSpecError
from lp_plugin.planning.config import MODES, LayerSpec, OffloadConfig

PEERS = ("accelerate_cpu", "accelerate_disk", "airllm")  # what users would run instead, measured beside lp_plugin
HEADS = ("baseline", *PEERS, *MODES)
LOADS = ("attach", "pretrained")
TWIN = "baseline:twin"
FLAGS = ("cold", "twin")  # options written without a value
# the OffloadConfig options an lp config takes after TIER (MODE, SPEC and TIER are its mode, offload and tier;
# lp-bench sets offload_folder and main_device itself)
OFFLOAD_OPTIONS = ("alpha", "prefetch", "protect_first", "protect_last", "skip", "stand_in", "calib", "decode")
_LP_OPTIONS = (
    "alpha=A, prefetch=N, new=N, cold, load=attach|pretrained, protect_first=N, protect_last=N, skip=SKIP, "
    "stand_in=KIND, calib=CALIB, decode=eager|graph"
)
_COLON_OPTIONS = ("skip", "stand_in", "calib")  # values that may hold a colon themselves
# what results JSON records of a config without offload options (baseline; a peer's lp-only keys)
_NO_OPTIONS = {
    "mode": None,
    "spec": None,
    "tier": None,
    "alpha": 1.0,
    "prefetch": 1,
    "skip": None,
    "stand_in": "none",
    "calib": None,
    "protect_first": None,
    "protect_last": None,
    "decode": "eager",
}
_FIELD = {"spec": "offload"}  # a word of the grammar and results JSON: the OffloadConfig field it names
_WORD = {v: k for k, v in _FIELD.items()}


def is_exact(cfg: dict) -> bool:
    """Whether a config (as its results-JSON dict) must reproduce the plain model's logits: alpha 1,
    nothing skipped."""
    return cfg.get("alpha", 1.0) == 1.0 and not cfg.get("skip")


class ConfigError(ValueError):
    """A config string lp-bench cannot read. ``config``: the config string (None for the ``--configs`` list as
    a whole); ``option``: the option it refuses, where one is to blame. A value that OffloadConfig refuses
    has that :class:`lp_plugin.OffloadSpecError` as ``__cause__``."""

    def __init__(self, message: str, config: str | None = None, option: str | None = None):
        super().__init__(message)
        self.config = config
        self.option = option


@dataclass(frozen=True)
class BenchConfig:
    """One measured config: what lp-bench puts on the model (``kind`` and ``options``) and how it measures
    it (``new``, ``cold``, ``load``, ``twin``)."""

    name: str
    """The config string as written on the command line (the key of its results)."""
    kind: str
    """``baseline``, ``lp`` (lp_plugin) or one of :data:`PEERS`."""
    options: OffloadConfig | None = None
    """lp: what ``attach``/``from_pretrained`` get (lp-bench adds ``offload_folder`` and ``main_device``); a peer:
    the layers it offloads (``offload``) and where they go (``tier``), its other fields unused; baseline: None."""
    new: int | None = None
    """Tokens to generate, for this config only (None: ``--new``)."""
    cold: bool = False
    """Drop the page cache of the files the config reads before every timed part."""
    load: str = "attach"
    """lp: ``attach`` to the loaded plain model, or ``pretrained``: ``lp_plugin.from_pretrained``."""
    twin: bool = False
    """The plain model measured again, last in every round (:data:`TWIN`)."""

    @property
    def spec(self) -> LayerSpec | None:
        """The layers offloaded (``options.offload``; None for the plain model)."""
        return None if self.options is None else self.options.offload

    @property
    def tier(self) -> str | None:
        return None if self.options is None else self.options.tier

    @property
    def exact(self) -> bool:
        return is_exact(self.to_dict())

    def to_dict(self) -> dict:
        """The config as results JSON records it, under the keys derive, report and the gate read: the
        options in OffloadConfig's normal form; for a config without them, the values of :data:`_NO_OPTIONS`."""
        values = dict(_NO_OPTIONS)
        if self.options is not None:
            given = self.options.to_dict()
            keys = tuple(values) if self.kind == "lp" else ("spec", "tier")
            values.update({key: given[_FIELD.get(key, key)] for key in keys})
        return {
            "name": self.name,
            "kind": self.kind,
            **{key: values[key] for key in ("mode", "spec", "tier", "alpha", "prefetch")},
            "new": self.new,
            "cold": self.cold,
            "load": self.load,
            "twin": self.twin,
            **{key: values[key] for key in ("skip", "stand_in", "calib", "protect_first", "protect_last", "decode")},
        }

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

    return tuple(tier_names())


def split_configs(text: str) -> list:
    """Split a ``--configs`` value on commas, gluing back commas that sit inside a layer list (a piece that
    starts with a digit or a minus: ``stream:2,4:cpu``); any other piece is a config of its own."""
    out: list = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if not (piece[0].isdigit() or piece[0] == "-") or not out:
            out.append(piece)
        else:
            out[-1] = out[-1] + "," + piece
    return out


def _glue(options: list) -> list:
    """Options split on ':' with the colons inside skip/stand_in/calib values put back (``skip=greedy``, ``20%``)."""
    out: list = []
    for opt in options:
        if out and "=" not in opt and opt not in FLAGS and out[-1].split("=", 1)[0].strip() in _COLON_OPTIONS:
            out[-1] += ":" + opt
        else:
            out.append(opt)
    return out


@dataclass
class _Written:
    """A config's options as written: lp-bench's own, checked here, and OffloadConfig's, as strings."""

    new: int | None = None
    cold: bool = False
    load: str | None = None
    twin: bool = False
    offload: dict = field(default_factory=dict)  # OffloadConfig's name: the value as written


def _read_options(options: list, text: str) -> _Written:
    out = _Written()
    for opt in _glue(options):
        if opt in FLAGS:
            setattr(out, opt, True)
            continue
        if "=" not in opt:
            raise ConfigError(f"cannot read option {opt!r} in config {text!r}; options are {_LP_OPTIONS}", text, opt)
        key, value = (s.strip() for s in opt.split("=", 1))
        if key == "new":
            out.new = int(value) if re.fullmatch(r"[+-]?[0-9]{1,18}", value, flags=re.ASCII) else 0
            if out.new < 1:
                raise ConfigError(f"bad value {value!r} for new in config {text!r}: an int >= 1", text, key)
        elif key == "load":
            if value not in LOADS:
                raise ConfigError(f"bad value {value!r} for load in config {text!r}: one of {LOADS}", text, key)
            out.load = value
        elif key in OFFLOAD_OPTIONS:
            out.offload[key] = value
        else:
            raise ConfigError(f"unknown option {key!r} in config {text!r}; options are {_LP_OPTIONS}", text, key)
    return out


_FIRST = ("offload", "tier", "mode", "skip")  # options that others apply to (prefetch to mode, stand_in to skip)


def _offload_config(text: str, given: dict) -> OffloadConfig:
    """``OffloadConfig.from_strings`` on the options one at a time, those others apply to first and then in the
    order written, so that a refusal names the option that brought it (a bad value, or one that does not go
    with those before it)."""
    so_far: dict = {}
    order = [k for k in _FIRST if k in given] + [k for k in given if k not in _FIRST]
    for key, value in ((k, given[k]) for k in order):
        so_far[key] = value
        try:
            config = OffloadConfig.from_strings(so_far)
        except OffloadSpecError as exc:
            word = _WORD.get(key, key)
            raise ConfigError(f"config {text!r}: {word}={value}: {exc}", text, word) from exc
    return config


def _check_options(kind: str, opts: _Written, text: str) -> None:
    if opts.cold and kind not in ("lp", "accelerate_disk", "airllm"):
        raise ConfigError(
            f"config {text!r}: cold applies to configs that read files (session/stream, accelerate_disk, airllm)",
            text,
            "cold",
        )
    if kind != "lp" and (opts.offload or opts.load is not None):
        raise ConfigError(
            f"config {text!r}: alpha, prefetch, load, protect_first, protect_last, skip, stand_in, calib and decode "
            "apply to session/stream configs only",
            text,
            next(iter(opts.offload), "load"),
        )
    if opts.twin and (kind != "baseline" or text != TWIN):
        raise ConfigError(
            f"config {text!r}: 'twin' is written exactly {TWIN!r} (the plain model measured again)", text, "twin"
        )


def _config(text: str, kind: str, options: list, layers: dict | None = None) -> BenchConfig:
    """Config ``text`` of ``kind`` with ``options`` (the tokens after its head, spec and tier); ``layers``: its
    offload, tier (and mode), as OffloadConfig names them."""
    opts = _read_options(options, text)
    _check_options(kind, opts, text)
    offload = None if layers is None else _offload_config(text, {**layers, **opts.offload})
    if opts.cold and kind == "lp" and offload is not None and not _reads_files(offload.tier):
        raise ConfigError(
            f"config {text!r}: cold applies to tiers that read files (disk); the {offload.tier!r} tier reads none",
            text,
            "cold",
        )
    return BenchConfig(
        name=text, kind=kind, options=offload, new=opts.new, cold=opts.cold, load=opts.load or "attach", twin=opts.twin
    )


def _reads_files(tier: str) -> bool:
    """Whether tier ``tier`` reads its units from files it can evict from the page cache (``drop_page_cache``)."""
    from lp_plugin.core.tiers import Tier
    from lp_plugin.planning.plugins import tier_class

    return tier_class(tier).drop_page_cache is not Tier.drop_page_cache


def parse_config(text: str) -> BenchConfig:
    """Parse one config string. Raises :class:`ConfigError` saying how to write it."""
    text = text.strip()
    tokens = text.split(":")
    head = tokens[0]
    if head == "baseline":
        return _config(text, "baseline", tokens[1:])
    if head in ("accelerate_cpu", "accelerate_disk"):
        rest = tokens[1:]
        spec = ":".join(t for t in rest if "=" not in t and t not in FLAGS) or "even"
        layers = {"offload": spec, "tier": head.split("_")[1]}
        return _config(text, head, [t for t in rest if "=" in t or t in FLAGS], layers)
    if head == "airllm":
        extra = [t for t in tokens[1:] if "=" not in t and t not in FLAGS]
        if extra:
            raise ConfigError(
                f"config {text!r}: AirLLM streams every module, it takes no offload spec "
                f"({':'.join(extra)!r}); write airllm[:new=N][:cold]",
                text,
            )
        return _config(text, "airllm", tokens[1:], {"offload": "all", "tier": "disk"})
    if head in MODES:
        tiers = _tier_names()
        tier_at = next((i for i in range(2, len(tokens)) if tokens[i] in tiers), None)
        if tier_at is None:
            words = [t for t in tokens[2:] if t.isidentifier() and t not in FLAGS]
            what = f"{words[-1]!r} is not a tier" if words else "names no tier"
            raise ConfigError(
                f"config {text!r}: {what}; write MODE:SPEC:TIER[:alpha=A][:prefetch=N], TIER one of {', '.join(tiers)}",
                text,
            )
        spec = ":".join(tokens[1:tier_at]).strip()
        if not spec:
            raise ConfigError(
                f"config {text!r} has an empty offload spec; e.g. {head}:even:{tokens[tier_at]}", text, "spec"
            )
        layers = {"mode": head, "offload": spec, "tier": tokens[tier_at]}
        return _config(text, "lp", tokens[tier_at + 1 :], layers)
    near = difflib.get_close_matches(head, HEADS, n=1)
    raise ConfigError(
        (f"unknown config {text!r} (did you mean {near[0]!r}?)" if near else f"unknown config {text!r}")
        + "; use baseline, accelerate_cpu[:SPEC], accelerate_disk[:SPEC], airllm, or "
        "MODE:SPEC:TIER[:alpha=A][:prefetch=N] "
        "with MODE session or stream (e.g. stream:even:cpu)",
        text,
    )


def parse_configs(text: str) -> list:
    """The configs of a ``--configs`` value, in measuring order: ``baseline`` first (added if missing:
    every ratio is taken against it), ``baseline:twin`` last (added if missing: the plain model
    measured against itself a whole round later gives the run's noise)."""
    configs = [parse_config(piece) for piece in split_configs(text)]
    if not configs:
        raise ConfigError("--configs is empty; e.g. --configs baseline,session:even:cpu,stream:even:cpu")
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config(s) {dupes} listed twice")
    base = next((c for c in configs if c.kind == "baseline" and not c.twin), None) or parse_config("baseline")
    twin = next((c for c in configs if c.twin), None) or parse_config(TWIN)
    middle = [c for c in configs if c is not base and c is not twin]
    if any(c.kind == "baseline" for c in middle):
        raise ConfigError("one plain config is measured (plus its twin): write baseline once (with new=N if needed)")
    return [base, *middle, replace(twin, new=base.new)]  # the twin repeats the baseline exactly
