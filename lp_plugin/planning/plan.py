"""``OffloadPlan``: an :class:`OffloadConfig` resolved once against one model or its config.

Data flows one way: model (or config) -> plan -> Accelerate device map -> offloaded layers and
hooks -> tiers. The plan says which decoder layers are offloaded or dropped and where the resident
part runs; :func:`residual_offload_device_map`, ``from_pretrained`` and ``attach`` all read it and
never resolve the spec again. ``offload="auto"`` is resolved here too, by :mod:`lp_plugin.planning.budget`: the
plan's config then names the chosen layers and mode, and ``plan.budget`` holds the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core import accel
from ..core.devices import main_device_of, map_value, normalize_device
from ..errors import OffloadSpecError
from . import arch, footprint
from .budget import BudgetPlan, plan_offload
from .config import OffloadConfig
from .plugins import check_folder_tier, policies
from .policies import PROTECT_FIRST, PROTECT_LAST, select_layers
from .skipping import resolve_skips

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .skipping.resolve import SkipPlan

_UNUSED_MAX_MEMORY = (
    "max_memory bounds offload='auto' (the plan fits it) or a device_map='auto' base placement; with an "
    "explicit offload spec and no device_map='auto' nothing would read it: drop it, or pass offload='auto'"
)


def resolve_layers(
    spec, num_layers: int, protect_first: int = PROTECT_FIRST, protect_last: int = PROTECT_LAST
) -> tuple:
    """The layers an offload spec selects among ``num_layers``, with the registered policies:
    ``resolve_layers("even", 36) == (2, 4, ..., 32)``."""
    return select_layers(spec, num_layers, protect_first, protect_last, policies=policies())


@dataclass(frozen=True)
class OffloadPlan:
    config: OffloadConfig
    layer_prefix: str  # "model.layers"
    num_layers: int
    other_keys: tuple  # the top-level modules around the layer list (embeddings, norm, rotary, lm_head)
    offloaded: tuple  # layers kept on the tier and brought back for their forward (alpha > 0)
    dropped: tuple  # layers never run (alpha == 0)
    main_device: torch.device  # where the resident part runs
    skeleton: nn.Module | None = field(default=None, repr=False, compare=False)  # meta model, planned from a config
    skips: SkipPlan | None = field(default=None, compare=False)  # None until resolved against the loaded model
    devices: dict = field(default_factory=dict, compare=False)  # layer -> the device it computes on, where not main
    base: BaseMap | None = field(default=None, repr=False, compare=False)  # the base placement the plan keeps
    budget: BudgetPlan | None = field(default=None, compare=False)  # the budget plan behind offload="auto"
    end_keys: tuple = ()  # the input embeddings' and the lm_head's module keys (host memory with embeddings="host")

    @classmethod
    def for_model(cls, model, config: OffloadConfig) -> OffloadPlan:
        """The plan for a loaded model. Layers Accelerate already offloads (a dispatched model's "cpu"/"disk"
        layers) are taken over too, each computing where Accelerate ran it; every other layer computes
        where its weights are."""
        prefix, other, n = arch.module_keys(model)
        main = normalize_device(config.main_device) if config.main_device is not None else main_device_of(model)
        _, layer_list = arch.find_decoder_layers(model)
        devices, accelerated = {}, []
        for i, layer in enumerate(layer_list):
            hooks = accel.offload_hooks(layer)
            if hooks:
                accelerated.append(i)
                device = normalize_device(hooks[0][2].execution_device or main)
            else:
                device = next((p.device for p in layer.parameters() if p.device.type != "meta"), main)
            if device != main:
                devices[i] = device
        if config.offload != "auto" and config.max_memory is not None:
            raise OffloadSpecError(_UNUSED_MAX_MEMORY)
        budget = None
        if config.offload == "auto":  # planned on the model's real tensors
            if devices:
                raise OffloadSpecError(
                    f"offload='auto' fits one device, but layers {sorted(devices)} of this model compute "
                    "elsewhere: pick the layers with an explicit offload spec"
                )
            budget = _budget(model, config, main)
            config = budget.resolved(config)
        plan = cls._make(config, prefix, other, n, main, devices=devices, budget=budget, ends=arch.end_keys(model))
        if accelerated and config.alpha > 0:
            plan = replace(plan, offloaded=tuple(sorted(set(plan.offloaded) | set(accelerated))))
        return plan.with_skips(model)

    @classmethod
    def for_config(cls, hf_config, config: OffloadConfig, base_map=None, weights=None) -> OffloadPlan:
        """The plan for a model about to be loaded from ``hf_config``. ``base_map`` (an Accelerate device
        map, e.g. ``device_map="auto"`` across GPUs) keeps its placement: each layer computes where the
        base map puts it, and only the chosen layers move to the tier. ``weights``: the format the model
        is loaded in (``"bf16"``, ``"nf4"``, a torch dtype, a ``BitsAndBytesConfig``; default: the
        checkpoint's dtype), which ``offload="auto"`` plans with."""
        meta = arch.skeleton(hf_config)
        prefix, other, n = arch.module_keys(meta)
        if config.offload == "auto":
            if base_map is not None:
                raise OffloadSpecError(
                    "offload='auto' fits the main device alone; with a base device map, pick the "
                    "layers with an explicit offload spec"
                )
            main = normalize_device(config.main_device)
            budget = _budget(hf_config, config, main, weights, meta)
            return cls._make(
                budget.resolved(config), prefix, other, n, main, meta, budget=budget, ends=arch.end_keys(meta)
            )
        if base_map is None:
            if config.max_memory is not None:
                raise OffloadSpecError(_UNUSED_MAX_MEMORY)
            return cls._make(
                config, prefix, other, n, normalize_device(config.main_device), meta, ends=arch.end_keys(meta)
            )
        placed = BaseMap(base_map, prefix, _tied_modules(meta, other))
        main = normalize_device(config.main_device) if config.main_device is not None else placed.main(other)
        devices = {i: d for i, d in enumerate(placed.layer_devices(n, main)) if d != main}
        return cls._make(config, prefix, other, n, main, meta, devices=devices, base=placed, ends=arch.end_keys(meta))

    @classmethod
    def _make(cls, config, prefix, other, n, main, skeleton=None, devices=None, base=None, budget=None, ends=()):
        chosen = resolve_layers(config.offload, n, config.protect_first, config.protect_last)
        if base is not None:  # layers the base map already puts on "cpu"/"disk" are offloaded (and taken over) too
            chosen = tuple(sorted(set(chosen) | set(base.host_layers(n)))) if config.alpha > 0 else chosen
        offloaded, dropped = (chosen, ()) if config.alpha > 0 else ((), chosen)
        return cls(
            config,
            prefix,
            n,
            tuple(other),
            offloaded,
            dropped,
            main,
            skeleton,
            devices=dict(devices or {}),
            base=base,
            budget=budget,
            end_keys=tuple(ends),
        )

    def device_of(self, i):
        """The device layer ``i`` computes on."""
        return self.devices.get(i, self.main_device)

    @property
    def single_device(self) -> bool:
        return not self.devices

    def with_skips(self, model) -> OffloadPlan:
        """This plan with the ``skip`` option resolved against the loaded ``model`` (skip policies and
        stand-ins need its weights): skipped layers are dropped, and no longer offloaded."""
        if self.skips is not None:
            return self
        return self.with_resolved_skips(resolve_skips(model, self.config, self.num_layers))

    def with_resolved_skips(self, skips: SkipPlan) -> OffloadPlan:
        """This plan with ``skips`` (resolved already, e.g. before loading): skipped layers are dropped, and
        no longer offloaded."""
        skipped = set(skips.layers)
        return replace(
            self,
            offloaded=tuple(i for i in self.offloaded if i not in skipped),
            dropped=tuple(sorted(set(self.dropped) | skipped)),
            skips=skips,
        )

    @property
    def selected(self) -> tuple:
        """Every layer the plan touches (offloaded or dropped)."""
        return tuple(sorted(self.offloaded + self.dropped))

    def device_map(self, host: str = "cpu") -> dict:
        """An Accelerate device map: offloaded layers on ``host`` ("cpu" or "disk"), everything else on
        the main device, one explicit key per decoder layer (transformers' ``expand_device_map``
        matches prefixes without a '.' boundary: ``model.layers.1`` would also catch ``model.layers.10``).
        With ``embeddings="host"`` the input embeddings and the lm_head go to "cpu": they never touch the
        device while loading (attach takes Accelerate's offload of them over)."""
        main = map_value(self.main_device)
        out = {key: main if self.base is None else self.base.value(key) for key in self.other_keys}
        if self.config.embeddings == "host":
            out.update(dict.fromkeys(self.end_keys, "cpu"))
        for i in range(self.num_layers):
            out[f"{self.layer_prefix}.{i}"] = host if i in self.offloaded else map_value(self.device_of(i))
        return out

    def split_device_map(self, device_map: dict) -> dict:
        """``device_map`` with each offloaded layer split into one key per child (``model.layers.2.mlp``).

        Under ``llm_int8_enable_fp32_cpu_offload`` transformers' bitsandbytes quantizer leaves every
        host-mapped key unquantized and matches those keys as prefixes with no '.' boundary: a key
        ``model.layers.2`` also leaves the resident ``model.layers.21``..``29`` unquantized. A child key
        is followed by a name, never a digit, so it matches only its own layer."""
        if self.skeleton is None:
            raise OffloadSpecError("split_device_map needs a plan made from a config (OffloadPlan.for_config)")
        _, layer_list = arch.find_decoder_layers(self.skeleton)
        out = dict(device_map)
        for i in self.offloaded:
            key = f"{self.layer_prefix}.{i}"
            device = out.pop(key)
            layer = layer_list[i]
            for name, child in layer.named_children():
                if arch.holds_tensors(child):
                    out[f"{key}.{name}"] = device
            for name, _ in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
                out[f"{key}.{name}"] = device
        return out


def _budget(source, config, main, weights=None, skeleton=None, **speed):
    """The :class:`lp_plugin.planning.budget.BudgetPlan` of ``config`` for a loaded model (its real tensors) or
    a transformers config (loaded in ``weights``)."""
    import torch.nn as nn

    if isinstance(source, nn.Module):
        fp, hf_config = footprint.from_model(source), source.config
    else:
        fp, hf_config = footprint.from_config(source, weights, skeleton), source
    name = str(getattr(hf_config, "_name_or_path", "") or getattr(hf_config, "model_type", "model"))
    return plan_offload(config, fp, main, name=name, **speed)


def check_graph_device(decode: str, main_device) -> None:
    """Refuse ``decode="graph"`` off CUDA (``main_device``: a ``torch.device``), where no graph can replay."""
    if decode == "graph" and main_device.type != "cuda":
        raise OffloadSpecError(
            f"decode='graph' replays CUDA graphs, but the model runs on {main_device}; "
            "use decode='eager' (the default) off CUDA"
        )


def fit_budget(
    model_or_config, config: OffloadConfig | None = None, *, weights=None, bandwidth=None, compute_tok_s=None, **options
):
    """What ``offload="auto"`` would do: the :class:`lp_plugin.planning.budget.BudgetPlan` for a loaded model or
    a transformers config (no weights; loaded in ``weights``: ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"nf4"``,
    a torch dtype or a ``BitsAndBytesConfig``; default the checkpoint's dtype). ``options`` are
    :class:`OffloadConfig`'s (``max_memory``, ``max_context``, ``batch_size``, ``work``, ``prefetch``,
    ...); ``bandwidth`` (GB/s) replaces the measured or nominal link bandwidth, ``compute_tok_s``
    (``(decode, prefill)``, measured on the plain model) caps the predicted speeds. Raises
    :class:`lp_plugin.BudgetError` when nothing fits."""
    import torch.nn as nn

    config = OffloadConfig.from_options(config, **{"offload": "auto", **options})
    if isinstance(model_or_config, nn.Module) and config.main_device is None:
        main = main_device_of(model_or_config)
    else:
        main = normalize_device(config.main_device)
    check_graph_device(config.decode, main)
    check_folder_tier(config.tier, config.offload_folder)
    return _budget(model_or_config, config, main, weights, bandwidth=bandwidth, compute_tok_s=compute_tok_s)


class BaseMap:
    """An Accelerate device map to keep: where each module goes, looked up at '.' boundaries."""

    def __init__(self, device_map: dict, layer_prefix: str, tied=()):
        if not isinstance(device_map, dict) or not device_map:
            raise OffloadSpecError(f"a base device map must be a non-empty dict {{module: device}}, got {device_map!r}")
        self.map = dict(device_map)
        self.prefix = layer_prefix
        # modules sharing a tensor (a tied lm_head and input embedding) go where the first of them goes
        self.tied = {key: group[0] for group in tied for key in group[1:]}
        # with a GPU in the map, "cpu" means Accelerate's host offload; on a CPU-only map it is the compute device
        gpu = any(
            isinstance(v, int) and not isinstance(v, bool) or str(v).startswith("cuda") for v in self.map.values()
        )
        self.host = ("cpu", "disk") if gpu else ("disk",)

    def value(self, key: str):
        """The map's value for module ``key``: its own entry, else its closest ancestor's."""
        key = self.tied.get(key, key)
        best = None
        for k, v in self.map.items():
            if k == "" or key == k or key.startswith(k + "."):
                if best is None or len(k) > len(best[0]):
                    best = (k, v)
        if best is None:
            inside = [v for k, v in self.map.items() if k.startswith(key + ".")]
            if not inside:
                raise OffloadSpecError(f"the base device map places no module at {key!r}; give every module a device")
            return inside[0]
        return best[1]

    def layer_devices(self, n, main) -> list:
        """The device each of ``n`` layers computes on: where the map puts it, or for a layer the map puts
        on "cpu"/"disk", where its neighbours compute (the previous layer's device; the next one's first)."""
        placed = [
            None if v in self.host else normalize_device(v)
            for v in (self.value(f"{self.prefix}.{i}") for i in range(n))
        ]
        out, last = [], next((d for d in placed if d is not None), main)
        for d in placed:
            last = d or last
            out.append(last)
        return out

    def host_layers(self, n) -> list:
        return [i for i in range(n) if self.value(f"{self.prefix}.{i}") in self.host]

    def main(self, other_keys):
        """Where the model's input runs: the embeddings' device (the first module on a device otherwise)."""
        for key in other_keys:
            value = self.value(key)
            if value not in self.host:
                return normalize_device(value)
        return normalize_device(None)


def _tied_modules(meta, other_keys) -> list:
    """Groups of top-level module keys that share a parameter, each in forward order (the embeddings first)."""
    from accelerate.utils import find_tied_parameters

    order = {key: i for i, key in enumerate(other_keys)}
    groups = []
    for names in find_tied_parameters(meta):
        found = (next((k for k in other_keys if n == k or n.startswith(k + ".")), None) for n in names)
        keys = {k for k in found if k is not None}
        if len(keys) > 1:
            groups.append(sorted(keys, key=lambda k: order[k]))
    return groups


def auto_base_map(hf_config, max_memory=None, dtype=None) -> dict:
    """Accelerate's ``device_map="auto"`` placement of the model of ``hf_config`` within ``max_memory``."""
    from accelerate import infer_auto_device_map

    meta = arch.skeleton(hf_config)
    return infer_auto_device_map(
        meta, max_memory=max_memory, no_split_module_classes=meta._no_split_modules, dtype=dtype
    )


def residual_offload_device_map(
    model_or_config,
    offload="even",
    tier: str = "cpu",
    main_device=None,
    protect_first: int | None = None,
    protect_last: int | None = None,
    base_map=None,
    max_memory=None,
    dtype=None,
) -> dict:
    """``{module_key: device}`` with the offloaded layers on ``tier`` ("cpu" or "disk") and everything
    else on ``main_device`` (default: the current GPU if there is one, else "cpu"), or where ``base_map``
    puts it: a device map to keep (``"auto"``: Accelerate's placement within ``max_memory``, e.g. across
    several GPUs), of which only the chosen layers move to the tier, each to be brought back to the
    device that runs it.

    Usable as ``from_pretrained(device_map=..., offload_folder=...)``, ``accelerate.dispatch_model``
    and ``load_checkpoint_and_dispatch``. ``model_or_config`` is a model (also on the meta device)
    or a ``PretrainedConfig``.
    """
    import torch.nn as nn

    if tier not in ("cpu", "disk"):
        raise OffloadSpecError(
            f"an Accelerate device map can only place layers on 'cpu' or 'disk', got tier={tier!r}; "
            "plugin tiers work through lp_plugin.attach/from_pretrained"
        )
    options: dict[str, Any] = {
        k: v for k, v in dict(protect_first=protect_first, protect_last=protect_last).items() if v is not None
    }
    if main_device is not None or base_map is None:
        options["main_device"] = normalize_device(main_device)
    config = OffloadConfig(offload=offload, **options)
    hf_config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    if base_map == "auto":
        base_map = auto_base_map(hf_config, max_memory, dtype)
    if isinstance(model_or_config, nn.Module) and base_map is None:
        plan = OffloadPlan.for_model(model_or_config, config)
    else:
        plan = OffloadPlan.for_config(hf_config, config, base_map=base_map)
    return plan.device_map(host=tier)
