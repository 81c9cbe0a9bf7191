"""``OffloadPlan``: an :class:`OffloadConfig` resolved once against one model or its config.

Data flows one way: model (or config) -> plan -> Accelerate device map -> offloaded layers and
hooks -> tiers. The plan says which decoder layers are offloaded or dropped and where the resident
part runs; :func:`residual_offload_device_map`, ``from_pretrained`` and ``attach`` all read it and
never resolve the spec again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import arch
from .config import OffloadConfig
from .errors import OffloadSpecError
from .plugins import policies
from .policies import PROTECT_FIRST, PROTECT_LAST, select_layers
from .skipping import resolve_skips


def normalize_device(device=None):
    """The one place a device name becomes a ``torch.device``: ``None`` is the current GPU (or the
    CPU without one), ``"cuda"`` and a bare index are the current/that GPU with its index spelled out."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def map_value(device):
    """How an Accelerate device map spells ``device`` (a GPU index, or ``"cpu"``)."""
    return device.index if device.type == "cuda" else device.type


def main_device_of(model):
    """Where a loaded (or Accelerate-dispatched) model computes: its input embeddings' device."""
    import torch

    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    if device.type == "meta":
        hook = getattr(emb, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return normalize_device(device)


def resolve_layers(spec, num_layers: int, protect_first: int = PROTECT_FIRST, protect_last: int = PROTECT_LAST) -> tuple:
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
    main_device: object  # torch.device the resident part runs on
    skeleton: object = field(default=None, repr=False, compare=False)  # meta model, when planned from a config
    skips: object = field(default=None, compare=False)  # SkipPlan; None until resolved against the loaded model

    @classmethod
    def for_model(cls, model, config: OffloadConfig) -> "OffloadPlan":
        prefix, other, n = arch.module_keys(model)
        main = normalize_device(config.main_device) if config.main_device is not None else main_device_of(model)
        return cls._make(config, prefix, other, n, main).with_skips(model)

    @classmethod
    def for_config(cls, hf_config, config: OffloadConfig) -> "OffloadPlan":
        meta = arch.skeleton(hf_config)
        prefix, other, n = arch.module_keys(meta)
        return cls._make(config, prefix, other, n, normalize_device(config.main_device), meta)

    @classmethod
    def _make(cls, config, prefix, other, n, main, skeleton=None):
        chosen = resolve_layers(config.offload, n, config.protect_first, config.protect_last)
        offloaded, dropped = (chosen, ()) if config.alpha > 0 else ((), chosen)
        return cls(config, prefix, n, tuple(other), offloaded, dropped, main, skeleton)

    def with_skips(self, model) -> "OffloadPlan":
        """This plan with the ``skip`` option resolved against the loaded ``model`` (skip policies and
        stand-ins need its weights): skipped layers are dropped, and no longer offloaded."""
        if self.skips is not None:
            return self
        skips = resolve_skips(model, self.config, self.num_layers)
        skipped = set(skips.layers)
        return replace(self, offloaded=tuple(i for i in self.offloaded if i not in skipped),
                       dropped=tuple(sorted(set(self.dropped) | skipped)), skips=skips)

    @property
    def selected(self) -> tuple:
        """Every layer the plan touches (offloaded or dropped)."""
        return tuple(sorted(self.offloaded + self.dropped))

    def device_map(self, host: str = "cpu") -> dict:
        """An Accelerate device map: offloaded layers on ``host`` ("cpu" or "disk"), everything else on
        the main device, one explicit key per decoder layer (transformers' ``expand_device_map``
        matches prefixes without a '.' boundary: ``model.layers.1`` would also catch ``model.layers.10``)."""
        main = map_value(self.main_device)
        out = {key: main for key in self.other_keys}
        for i in range(self.num_layers):
            out[f"{self.layer_prefix}.{i}"] = host if i in self.offloaded else main
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


def residual_offload_device_map(
    model_or_config,
    offload="even",
    tier: str = "cpu",
    main_device=None,
    protect_first: int | None = None,
    protect_last: int | None = None,
) -> dict:
    """``{module_key: device}`` with the offloaded layers on ``tier`` ("cpu" or "disk") and everything
    else on ``main_device`` (default: the current GPU if there is one, else "cpu").

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
    options = {k: v for k, v in dict(protect_first=protect_first, protect_last=protect_last).items() if v is not None}
    config = OffloadConfig(offload=offload, main_device=normalize_device(main_device), **options)
    if isinstance(model_or_config, nn.Module):
        plan = OffloadPlan.for_model(model_or_config, config)
    else:
        plan = OffloadPlan.for_config(model_or_config, config)
    return plan.device_map(host=tier)
