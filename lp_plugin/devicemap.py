"""Accelerate device maps for residual offloading.

Every decoder layer gets its own key (``model.layers.7``), so transformers' prefix matching in
``expand_device_map`` (which has no boundary: ``model.layers.1`` would also catch
``model.layers.10``) never confuses layers; every other top-level module (embeddings, norm,
rotary, lm_head) gets its own key on the main device.
"""

from __future__ import annotations

from .specs import PROTECT_FIRST, PROTECT_LAST, resolve_layers


def default_main_device():
    import torch

    return 0 if torch.cuda.is_available() else "cpu"


def residual_offload_device_map(
    model_or_config,
    offload="even",
    tier: str = "cpu",
    main_device=None,
    protect_first: int = PROTECT_FIRST,
    protect_last: int = PROTECT_LAST,
) -> dict:
    """Return ``{module_key: device}`` with the offloaded layers on ``tier`` ("cpu" or "disk") and
    everything else on ``main_device`` (default: GPU 0 if there is one, else "cpu").

    Usable as ``from_pretrained(device_map=..., offload_folder=...)``, ``accelerate.dispatch_model``
    and ``load_checkpoint_and_dispatch``. ``model_or_config`` is a model (also on the meta device)
    or a ``PretrainedConfig``.
    """
    from .arch import module_keys, module_keys_from_config
    from .errors import OffloadSpecError

    if tier not in ("cpu", "disk"):
        raise OffloadSpecError(
            f"an Accelerate device map can only place layers on 'cpu' or 'disk', got tier={tier!r}; "
            "plugin tiers work through lp_plugin.attach/from_pretrained"
        )
    if main_device is None:
        main_device = default_main_device()
    import torch.nn as nn

    if isinstance(model_or_config, nn.Module):
        prefix, other, n = module_keys(model_or_config)
    else:
        prefix, other, n = module_keys_from_config(model_or_config)
    layers = set(resolve_layers(offload, n, protect_first, protect_last))
    device_map = {key: main_device for key in other}
    for i in range(n):
        device_map[f"{prefix}.{i}"] = tier if i in layers else main_device
    return device_map
