"""Attention for prefill chunks that neither expands keys and values nor builds a mask.

A chunk of ``q`` tokens after ``s`` cached ones attends to all ``s + q`` keys, causally with the diagonal
aligned to the lower right. transformers' SDPA path builds a boolean ``[q, s + q]`` mask for that, and
with a mask its ``sdpa_attention_forward`` expands keys and values to every query head (``repeat_kv``):
for a GQA model at a long context that is most of a chunk's memory. Here the mask is torch's
``causal_lower_right`` bias, passed to ``scaled_dot_product_attention`` with ``enable_gqa``: on CUDA it
dispatches to the flash kernel (keys and values as cached, lower-right alignment, no mask); elsewhere it
materializes the mask. The flash kernel computes a query block over the same key blocks in the same order
whether its rows come in one window or in chunks starting at multiples of its block size (128), so such
chunks give the values of a whole window run through the flash kernel bit for bit (SDPA may pick another
kernel for a whole window, cuDNN's on an H200: then they differ by rounding, as the masked path's do).

:func:`lower_right_attention` switches a decoder to it (registered with transformers' attention and mask
interfaces as :data:`NAME`) for the forwards run inside it; :func:`applies` says where that is done.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

#: the attention implementation's name in transformers' AttentionInterface and AttentionMaskInterface
NAME = "lp_plugin_lower_right"
#: activation dtypes the flash kernel takes
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` ``[batch, heads, q, dim]`` against ``key``/``value``
    ``[batch, kv_heads, kv, dim]`` (``kv >= q``, the last ``q`` keys the query's own), causal with the
    diagonal at the lower right; returns ``([batch, q, heads, dim], None)`` as ``sdpa_attention_forward`` does."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention is causal only: it takes no attention mask (use 'sdpa' for one)")
    for name in ("sliding_window", "softcap", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME} attention has no {name}: run this model with 'sdpa'")
    q_len, kv_len = query.shape[2], key.shape[2]
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=causal_lower_right(q_len, kv_len),
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers' mask interface: builds nothing (``None``: the attention gets no mask), for a batch
    without padding in its 2D ``attention_mask`` (padding would need a mask: ``ValueError``)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{NAME} attention takes no padding mask: run this batch with 'sdpa'")
    return None


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, no_mask)


def config_supports(config) -> bool:
    """Whether a model of ``config`` (its text config) can run chunks through :data:`NAME`: SDPA attention
    (or none chosen yet, which loads as SDPA), every layer full attention, no attention logit softcapping."""
    impl = getattr(config, "_attn_implementation", None)
    kinds = getattr(config, "layer_types", None) or ()
    return (
        impl in (None, "sdpa")
        and getattr(config, "sliding_window", None) is None
        and all(kind == "full_attention" for kind in kinds)
        and getattr(config, "attn_logit_softcapping", None) is None
    )


def configs_of(decoder: nn.Module) -> list:
    """Every distinct config the decoder's modules read (the decoder's own first)."""
    found: dict[int, object] = {}
    for module in decoder.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.setdefault(id(config), config)
    return list(found.values())


def applies(decoder: nn.Module, device: torch.device) -> bool:
    """Whether chunks of ``decoder`` on ``device`` run through :data:`NAME`: CUDA (where it avoids the mask
    and the expanded keys and values), fp16/bf16 activations (the flash kernel's), and every config
    :func:`config_supports` with SDPA chosen."""
    if device.type != "cuda":
        return False
    get_embeddings = getattr(decoder, "get_input_embeddings", None)
    weight = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
    configs = configs_of(decoder)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype in FLASH_DTYPES
        and bool(configs)
        and all(getattr(c, "_attn_implementation", None) == "sdpa" and config_supports(c) for c in configs)
    )


@contextlib.contextmanager
def lower_right_attention(decoder: nn.Module, configs: list | None = None):
    """Run ``decoder``'s forwards inside with :data:`NAME` attention: every config its modules read
    (``configs``, :func:`configs_of` the decoder when not given) is switched (transformers' attention modules
    look ``config._attn_implementation`` up at each call) and restored on the way out, exceptions included."""
    register()
    if configs is None:
        configs = configs_of(decoder)
    before = [c._attn_implementation for c in configs]
    try:
        for config in configs:
            config._attn_implementation = NAME
        yield
    finally:
        for config, impl in zip(configs, before):
            config._attn_implementation = impl
