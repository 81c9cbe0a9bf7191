"""Attention of a multi-position forward on a static cache under a materialized mask, one query head and one
block of query rows at a time (branch ``mlp-chunks``: not yet run on a GPU).

transformers skips the mask of a static cache's prefill where it can (batch 1, or no padding before the prompt:
``is_causal`` with the keys cut to the prompt, checked on the CPU with transformers 5.17 and 5.25). With left
padding it builds a boolean ``[batch, 1, q, cache length]`` mask, and then ``sdpa_attention_forward`` expands the
keys and values to every query head (``repeat_kv``), SDPA makes an additive copy of the mask and the output is
transposed into a second tensor. Here each call of ``scaled_dot_product_attention`` gets one query head's block of
:data:`QUERY_ROWS` rows, its own key/value head as cached (no expansion), and the mask's rows for that block. If
the kernel SDPA picks computes each head and block of rows on its own, the values are the whole call's:
``benchmarks/static_memory_probe.py`` checks that on a GPU (part A), with the decode step's forms too.

:func:`static_prefill_attention` switches a decoder to it (registered with transformers' attention interface as
:data:`NAME`, with SDPA's mask) for the forwards run inside it; :func:`applies` says where that is done. A call it
does not cover (one position, no 4D mask, dropout, a position bias) runs transformers' own SDPA function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chunk_attention import config_supports, configs_of, switched_attention

#: the attention implementation's name in transformers' AttentionInterface and AttentionMaskInterface
NAME = "lp_plugin_static_rows"
#: query rows per call (the additive mask of a call is ``QUERY_ROWS x cache length`` elements)
QUERY_ROWS = 1024


def covers(query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether :func:`attention_forward` splits this call: more than :data:`QUERY_ROWS` query rows, a 4D mask, no
    dropout, no position bias or softcapping, keys and values of one head size, query heads a multiple of the
    key/value heads."""
    return (
        query.shape[2] > QUERY_ROWS
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and not dropout
        and all(kwargs.get(name) is None for name in ("position_bias", "softcap", "sliding_window"))
        and key.shape[-1] == query.shape[-1]
        and query.shape[1] % key.shape[1] == 0
    )


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` ``[batch, heads, q, dim]`` against ``key``/``value``
    ``[batch, kv_heads, kv, dim]`` under ``attention_mask`` ``[batch or 1, 1 or heads, q, kv]``; returns
    ``([batch, q, heads, dim], None)`` as ``sdpa_attention_forward`` does."""
    if not covers(query, key, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    assert attention_mask is not None  # (covers() checked it)
    batch, heads, rows = query.shape[0], query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    out = query.new_empty((batch, rows, heads, value.shape[-1]))
    for head in range(heads):
        kv = head // groups  # repeat_kv's order: query head g * groups + r reads key/value head g
        k, v = key[:, kv : kv + 1], value[:, kv : kv + 1]
        mask_head = attention_mask[:, head : head + 1] if attention_mask.shape[1] > 1 else attention_mask
        for start in range(0, rows, QUERY_ROWS):
            stop = min(rows, start + QUERY_ROWS)
            part = F.scaled_dot_product_attention(
                query[:, head : head + 1, start:stop],
                k,
                v,
                attn_mask=mask_head[:, :, start:stop],
                scale=scaling,
            )
            out[:, start:stop, head] = part[:, 0]
            del part
    return out, None


def register() -> None:
    """Register :data:`NAME` with transformers' attention interface and SDPA's mask (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def applies(decoder: nn.Module, device: torch.device) -> bool:
    """Whether a static cache's prefill of ``decoder`` on ``device`` runs through :data:`NAME`: CUDA, and every
    config the decoder reads with SDPA chosen and :func:`~lp_plugin.core.chunk_attention.config_supports`."""
    if device.type != "cuda":
        return False
    configs = configs_of(decoder)
    return bool(configs) and all(
        getattr(c, "_attn_implementation", None) == "sdpa" and config_supports(c) for c in configs
    )


def static_prefill_attention(decoder: nn.Module):
    """Run ``decoder``'s forwards inside with :data:`NAME` attention (restored on the way out, exceptions
    included)."""
    register()
    return switched_attention(decoder, NAME)
