"""``resolve_skips``: the ``skip``/``stand_in``/``calib`` options of one config, for one loaded model.

``skip`` is a skip policy spec (``NAME:COUNT``, ``COUNT`` layers or ``N%`` of them; policies come
from the ``register_skip_policies`` plugin hook), or an explicit layer list or range read like an
offload spec (``"5,9"``, ``"5-7"``, ``[5, 9]``). ``stand_in`` other than ``none`` fits a stand-in for
every skipped layer on the calibration data (cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import OffloadSpecError
from ..plugins import policies, skip_policy, skip_policy_names
from ..policies import select_layers
from .fitting import fit_stand_ins
from .metrics import SkipContext
from .spec import PolicySpec, parse_policy, parse_stand_in


@dataclass(frozen=True)
class SkipPlan:
    layers: tuple = ()  # skipped layers, sorted
    stand_ins: dict = field(default_factory=dict)  # layer index -> nn.Module run in its place
    info: dict = field(default_factory=dict)  # how they were chosen and fitted (JSON-ready)


def _checked_policy(spec: PolicySpec, num_layers: int) -> tuple:
    """``(policy, count)`` of the skip policy ``spec`` names, for a model of ``num_layers`` layers."""
    policy = skip_policy(spec.name)
    if policy is None:
        raise OffloadSpecError(
            f"unknown skip policy {spec.name!r} in skip={str(spec)!r}; choose one of "
            f"{skip_policy_names()} (or install a plugin that registers it), or list layers ('5,9', '5-7')"
        )
    count = spec.count(num_layers)
    if count >= num_layers:
        raise OffloadSpecError(
            f"skip={str(spec)!r} asks for {count} of the model's {num_layers} layers; leave at least one layer to run"
        )
    return policy, count


def _policy_layers(spec: PolicySpec, model, config, stand_in, num_layers: int) -> tuple:
    """``(layers, context)`` chosen by the policy ``spec`` names (checked before any calibration)."""
    policy, count = _checked_policy(spec, num_layers)
    if count == 0:
        return (), None
    ctx = SkipContext(model, config.calib, stand_in)
    chosen = [int(i) for i in policy.select(ctx, count)]
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or len(set(chosen)) != len(chosen) or len(chosen) != count:
        raise OffloadSpecError(
            f"skip policy {spec.name!r} returned {chosen} for {count} of {num_layers} layers "
            "(out of range, repeated or the wrong number); fix the policy plugin"
        )
    return tuple(sorted(chosen)), ctx


def _explicit_layers(skip, num_layers: int) -> tuple:
    if isinstance(skip, str):
        name = skip.strip()
        if name in skip_policy_names():
            raise OffloadSpecError(
                f"skip={name!r} needs a count: '{name}:3' skips 3 layers, '{name}:10%' a tenth of them"
            )
    layers = select_layers(skip, num_layers, 0, 0, policies=policies(), option="skip")
    if len(layers) >= num_layers:
        raise OffloadSpecError(
            f"skip={skip!r} names all {num_layers} of the model's layers; leave at least one layer to run"
        )
    return layers


def check_skips(config, num_layers: int) -> None:
    """Refuse what :func:`resolve_skips` would refuse for a model of ``num_layers`` layers before it
    touches the model (skip spec, layer range, count; a stand_in without skip is refused by the config
    itself): tools call it before loading weights."""
    if config.skip is None:
        return
    spec = parse_policy(config.skip) if isinstance(config.skip, str) else None
    if spec is not None:
        _checked_policy(spec, num_layers)
    else:
        _explicit_layers(config.skip, num_layers)


def _info(config, layers, stand_in) -> dict:
    return {
        "skip": config.skip if isinstance(config.skip, str) else list(config.skip),
        "layers": list(layers),
        "stand_in": str(stand_in),
    }


def known_before_loading(config, num_layers: int) -> SkipPlan | None:
    """The :class:`SkipPlan` of ``config`` where it needs no weights: an explicit layer list (or a
    policy asking for 0 layers) without stand-ins. None where the model must be loaded first: a
    policy measures the layers on calibration text, and a stand-in is fitted to a skipped layer's own
    output (its cache key is a SHA-256 of every weight)."""
    check_skips(config, num_layers)
    stand_in = parse_stand_in(config.stand_in)
    if config.skip is None:
        return SkipPlan()
    if stand_in.kind != "none":
        return None
    spec = parse_policy(config.skip) if isinstance(config.skip, str) else None
    if spec is not None:
        if _checked_policy(spec, num_layers)[1]:
            return None
        layers: tuple = ()
    else:
        layers = _explicit_layers(config.skip, num_layers)
    return SkipPlan(layers, {}, _info(config, layers, stand_in))


def resolve_skips(model, config, num_layers: int):
    """The :class:`SkipPlan` of ``config`` for ``model``."""
    check_skips(config, num_layers)
    stand_in = parse_stand_in(config.stand_in)
    if config.skip is None:
        return SkipPlan()
    spec = parse_policy(config.skip) if isinstance(config.skip, str) else None
    ctx = None
    if spec is not None:
        layers, ctx = _policy_layers(spec, model, config, stand_in, num_layers)
    else:
        layers = _explicit_layers(config.skip, num_layers)
    info = _info(config, layers, stand_in)
    stand_ins = {}
    if stand_in.kind != "none" and layers:
        ctx = ctx or SkipContext(model, config.calib, stand_in)
        stand_ins, info["stand_in_fit"] = fit_stand_ins(ctx, layers)
    if ctx is not None:
        info["calib"] = ctx.calib.source
    return SkipPlan(layers, stand_ins, info)
