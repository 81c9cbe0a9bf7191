"""Log-probabilities of target tokens without full-vocabulary logits.

A causal LM's decoder gives the final hidden states; :class:`Head` turns a few positions at a time
into logits, their ``log_softmax`` gives the target tokens' values and the greedy token, and the
chunk is freed before the next (what Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy
avoid too). :func:`score_window` runs the decoder over a window whole, or in chunks through its KV
cache where one window's activations do not fit (chunked prefill; on CUDA the chunks attend without a mask
or expanded keys and values: :mod:`lp_plugin.core.chunk_attention`). How this compares with lm-eval's
full-logits path, number for number: docs/perplexity.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OffloadSpecError
from . import chunk_attention
from .host_embeddings import resident

#: logits plus their log_softmax of one head chunk stay under this many bytes (at least one position)
HEAD_CHUNK_BYTES = 128 * 2**20
#: the fewest positions a head chunk computes (CPU and GPU matrix kernels change below a few rows)
MIN_ROWS = 64


@dataclass(frozen=True)
class Head:
    """How final hidden states become logits: the output embedding, then the transforms some
    architectures apply to its output (in their own order)."""

    module: nn.Module
    softcap: float | None = None  # gemma2/3: tanh(logits / c) * c
    divide: float | None = None  # granite: logits / logits_scaling
    multiply: object = None  # cohere: logits * logit_scale

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.divide is not None:
            logits = logits / self.divide
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    @property
    def vocab(self) -> int:
        return int(cast(torch.Tensor, self.module.weight).shape[0])


def head_of(model) -> Head:
    """The :class:`Head` of a ``*ForCausalLM`` model (``OffloadSpecError`` for one without an output
    embedding)."""
    module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(module, nn.Module) or getattr(module, "weight", None) is None:
        raise OffloadSpecError(f"{type(model).__name__} has no output embedding (lm_head) to score tokens with")
    cfg = model.config
    scaling = getattr(cfg, "logits_scaling", None)
    return Head(
        module,
        softcap=getattr(cfg, "final_logit_softcapping", None) or None,
        divide=scaling if scaling not in (None, 1, 1.0) else None,
        multiply=getattr(model, "logit_scale", None),
    )


def decoder_of(model) -> nn.Module:
    """The module that runs the decoder layers and returns ``last_hidden_state`` (``model.model`` for
    Llama/Qwen2)."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise OffloadSpecError(f"{type(model).__name__} has no base model (decoder) to run without its output head")
    return base


def hidden_chunks(
    decoder: nn.Module, input_ids: torch.Tensor, prefill_chunk: int | None = None, lower_right: bool | None = None
):
    """``(start, [batch, tokens, hidden])`` final hidden states of ``input_ids``: the whole window at once
    (no attention mask: right padding never reaches earlier positions, as in lm-eval's own forward), or
    with ``prefill_chunk`` that many tokens at a time through the decoder's KV cache.

    The chunks attend to the cache through :mod:`lp_plugin.core.chunk_attention` (no mask, keys and values
    as cached) where ``lower_right`` is True, or where it is None and :func:`~lp_plugin.core.chunk_attention.applies`
    (CUDA, fp16/bf16, SDPA, full attention only); else through the decoder's own attention. On CUDA,
    chunks of a multiple of 128 tokens then give the values of the whole window run through the flash
    kernel bit for bit."""
    total = input_ids.shape[1]
    if prefill_chunk is None or prefill_chunk >= total:
        yield 0, decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return
    if lower_right is None:
        lower_right = chunk_attention.applies(decoder, input_ids.device)
    name = _cache_argument(decoder)
    cache = None
    # switched per chunk, not across the yield: the caller may run other forwards between chunks
    configs = chunk_attention.configs_of(decoder) if lower_right else None
    for start in range(0, total, prefill_chunk):
        with chunk_attention.lower_right_attention(decoder, configs) if lower_right else contextlib.nullcontext():
            out = decoder(input_ids=input_ids[:, start : start + prefill_chunk], use_cache=True, **{name: cache})
        cache = getattr(out, name)
        yield start, out.last_hidden_state
        del out


def _cache_argument(decoder: nn.Module) -> str:
    """What the decoder's forward calls its KV cache: ``cache`` (transformers >= 5.20) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def score_window(
    model,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    prefill_chunk: int | None = None,
    lower_right: bool | None = None,
) -> tuple:
    """:func:`score` for the positions ``rows`` (indices into the ``batch * tokens`` positions of
    ``input_ids``): the decoder runs the window (whole, or in prefill chunks, each chunk's positions
    scored before the next runs; ``lower_right``: :func:`hidden_chunks`'), then the head."""
    head, decoder = head_of(model), decoder_of(model)
    batch, total = input_ids.shape
    values: torch.Tensor | None = None
    greedy: torch.Tensor | None = None
    for start, hidden in hidden_chunks(decoder, input_ids, prefill_chunk, lower_right):
        width = hidden.shape[1]
        if width == total:
            return score(head, hidden.reshape(batch * total, -1), rows, targets, dtype)
        if values is None or greedy is None:
            values = torch.empty(targets.shape, dtype=dtype or hidden.dtype, device=hidden.device)
            greedy = torch.empty(rows.shape[0], dtype=torch.long, device=hidden.device)
        pos = rows % total
        here = ((pos >= start) & (pos < start + width)).nonzero().squeeze(1)
        if here.numel():
            local = (rows[here] // total) * width + pos[here] - start
            values[here], greedy[here] = score(head, hidden.reshape(batch * width, -1), local, targets[here], dtype)
    return values, greedy


def head_rows(vocab: int, logits_size: int, out_size: int, cap: int = HEAD_CHUNK_BYTES) -> int:
    """Positions per head chunk: logits (``logits_size`` bytes a value) and their log_softmax
    (``out_size``) under ``cap`` bytes, and at least :data:`MIN_ROWS`."""
    return max(MIN_ROWS, cap // max(1, vocab * (logits_size + out_size)))


def chunk_rows(head: Head, hidden: torch.Tensor, dtype: torch.dtype | None = None, cap: int = HEAD_CHUNK_BYTES) -> int:
    """:func:`head_rows` for ``hidden``'s dtype and a log_softmax in ``dtype`` (None: the logits')."""
    size = hidden.element_size()
    return head_rows(head.vocab, size, torch.empty((), dtype=dtype).element_size() if dtype is not None else size, cap)


def score(
    head: Head,
    hidden: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    cap: int = HEAD_CHUNK_BYTES,
) -> tuple:
    """``(values, greedy)`` for the positions ``index`` ``[n]`` of ``hidden`` ``[positions, hidden]`` and
    ``targets`` ``[n, k]`` (token ids): the log-probability of each target at its position, ``[n, k]`` in
    the log_softmax dtype (``dtype``, or the logits'), and each position's most likely token ``[n]``.

    A matrix product's rows can round differently with the number of rows (small products take other
    kernels), so the head runs as lm-eval's own forward does where that is cheap: over every position
    at once when they fit one chunk; else over chunks of one fixed, large row count (the last chunk
    filled up with repeated rows), the regime the whole-batch product is in."""
    n, rows = index.shape[0], chunk_rows(head, hidden, dtype, cap)
    chunks: list[tuple[int, int, int | None]]
    if hidden.shape[0] <= rows:  # one product over every position, as the full forward's
        chunks = [(0, n, None)]
    else:
        chunks = [(a, min(n, a + rows), rows) for a in range(0, n, rows)]
    values = torch.empty(targets.shape, dtype=dtype or hidden.dtype, device=hidden.device)
    greedy = torch.empty(n, dtype=torch.long, device=hidden.device)
    with resident(head.module):  # a head kept in host memory is copied to the device once for all chunks
        for start, end, width in chunks:
            if width is None:
                logits = head(hidden)[index]
            else:
                picked = index[start:end]
                if end - start < width:  # keep the row count: fill up with the last position
                    picked = torch.cat([picked, picked[-1:].expand(width - (end - start))])
                logits = head(hidden[picked])[: end - start]
            logp = F.log_softmax(logits, dim=-1, dtype=dtype)
            del logits
            values[start:end] = logp.gather(1, targets[start:end])
            greedy[start:end] = logp.argmax(dim=-1)
            del logp
    return values, greedy
