"""What a model occupies on its device, and what a piece of work adds to it: the sizes
:mod:`lp_plugin.planning.budget` plans with.

Weights come from a loaded model's real tensors, or from a config (no weights) through the shapes of
a meta skeleton (:func:`lp_plugin.planning.arch.skeleton`) and the rules of a load in that format:

* ``bfloat16``/``float16``/``float32``: every parameter in that dtype; buffers keep their own dtype
  (RoPE's ``inv_freq`` stays float32, as transformers loads it).
* ``nf4`` (bitsandbytes 4-bit, :func:`lp_plugin.integrations.quant.nf4_config`): every ``nn.Linear`` but the output
  embedding (lm_head) and ``llm_int8_skip_modules`` holds its weight packed two values a byte, and a
  QuantState per 64-value block: one absmax (uint8 with double quant, else float32) and a 16-entry
  float32 code; double quant adds a float32 offset, one float32 absmax per 256 blocks and a 256-entry
  float32 code. Biases, norms, embeddings and lm_head stay in the unquantized dtype (bf16 by default).

A tied lm_head shares the embeddings' storage and counts once. Each decoder layer has three sizes:
on the device (the sum of its tensors), as the engine packs it (:class:`lp_plugin.core.flat.LayerLayout`:
256-byte aligned entries; what a tier holds and a ring slot or session buffer takes), and its
non-Linear part (norm weights, kept on the device while a stream ring is open).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.chunk_attention import config_supports
from ..core.flat import LayerLayout, aligned, quant_state_tensors
from ..core.logprobs import head_rows
from ..core.mlp_chunks import dense_mlp
from ..errors import OffloadSpecError
from . import arch

DTYPES = {  # the dtype names lp_plugin reads, and their torch dtypes
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
NF4_BLOCK = 64  # values per absmax (bitsandbytes' 4-bit blocksize)
NESTED_BLOCK = 256  # absmax values per second-level absmax (double quant)
SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # where lm-eval's HFLM reads max_length


def checkpoint_dtype(hf_config, hf_kwargs):
    """The floating dtype a load gives unquantized tensors: the one asked for, else the checkpoint's."""
    dtype = hf_kwargs.get("dtype", hf_kwargs.get("torch_dtype", "auto"))
    if dtype == "auto" or dtype is None:
        # transformers 5 names it ``dtype`` (reading ``torch_dtype`` there logs a deprecation warning)
        dtype = (
            getattr(hf_config, "dtype", None)
            if hasattr(hf_config, "dtype")
            else getattr(hf_config, "torch_dtype", None)
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@dataclass(frozen=True)
class WeightFormat:
    """How weights are stored: ``dtype`` for everything unquantized (and the activations), and
    whether ``nn.Linear`` weights are NF4."""

    dtype: torch.dtype = torch.bfloat16
    nf4: bool = False
    double_quant: bool = True
    skip_modules: tuple = ()  # Linear modules bitsandbytes leaves unquantized (name substrings)

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"nf4 ({dtype})" if self.nf4 else dtype


def weight_format(value, hf_config=None) -> WeightFormat:
    """A :class:`WeightFormat` from ``"bf16"``/``"fp16"``/``"fp32"``/``"nf4"``, a torch dtype, a 4-bit
    ``BitsAndBytesConfig``, or None (the checkpoint's dtype from ``hf_config``, else float32)."""
    if isinstance(value, WeightFormat):
        return value
    if value is None or value == "auto":
        return (
            WeightFormat(checkpoint_dtype(hf_config, {}) or torch.float32)
            if hf_config is not None
            else WeightFormat(torch.float32)
        )
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return WeightFormat(value)
    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return WeightFormat(DTYPES[value.strip().lower()])
    if isinstance(value, str) and value.strip().lower() == "nf4":
        return WeightFormat(torch.bfloat16, nf4=True)
    if getattr(value, "load_in_4bit", False):
        dtype = (checkpoint_dtype(hf_config, {}) if hf_config is not None else None) or torch.bfloat16
        return WeightFormat(
            dtype,
            nf4=True,
            double_quant=bool(value.bnb_4bit_use_double_quant),
            skip_modules=tuple(value.llm_int8_skip_modules or ()),
        )
    raise OffloadSpecError(f"unknown weight format {value!r}; use bf16, fp16, fp32 or nf4")


def load_format(hf_config, hf_kwargs: dict) -> WeightFormat:
    """The format ``AutoModelForCausalLM.from_pretrained(**hf_kwargs)`` gives (as lp_plugin loads it)."""
    qconfig = hf_kwargs.get("quantization_config")
    dtype = checkpoint_dtype(hf_config, hf_kwargs) or torch.float32
    if qconfig is not None and getattr(qconfig, "load_in_4bit", False):
        return WeightFormat(
            dtype,
            nf4=True,
            double_quant=bool(qconfig.bnb_4bit_use_double_quant),
            skip_modules=tuple(qconfig.llm_int8_skip_modules or ()),
        )
    return WeightFormat(dtype)


@dataclass(frozen=True)
class Footprint:
    source: str  # "model" (real tensors) or "config" (skeleton shapes and format rules)
    format: str
    base_bytes: int  # everything outside the decoder layers
    layer_bytes: tuple  # per layer, on the device
    packed_bytes: tuple  # per layer, as the engine packs it (tier, ring slot, session buffer)
    other_bytes: tuple  # per layer, the non-Linear part a stream ring keeps on the device
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_windows: tuple  # per layer: the tokens its cache keeps (None: all)
    act_size: int  # bytes per element of activations, KV cache and logits
    dequant_bytes: int  # nf4: the largest Linear weight dequantized for a multi-token matmul; else 0
    max_positions: int | None  # the context lm-eval's HFLM would use (None: its default, 2048)
    embed_bytes: int = 0  # the input embeddings' tensors (0: they cannot leave the device)
    head_bytes: int = 0  # the lm_head's tensors (what embeddings="host" copies to the device per call)
    tied_head: bool = False  # the lm_head shares the input embeddings' weight
    embeddings: str = "device"  # where the input embeddings and the lm_head are: "device" or "host" (see on_host)
    # prefill chunks can attend through lp_plugin.core.chunk_attention (SDPA, full attention only, no softcapping)
    chunk_attention: bool = False
    # every decoder layer's MLP is dense and position-wise: a prefill can run it in chunks (lp_plugin.core.mlp_chunks)
    mlp_chunks: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + sum(self.layer_bytes)

    @property
    def host_embedding_bytes(self) -> int:
        """Bytes the input embeddings and the lm_head hold (a tied weight once)."""
        return self.embed_bytes + (0 if self.tied_head else self.head_bytes)

    def on_host(self) -> Footprint:
        """This footprint with the input embeddings and the lm_head in host memory (``embeddings="host"``):
        their bytes leave the device's weights; the lm_head phase holds a device copy of the lm_head."""
        if self.embeddings == "host":
            return self
        return dataclasses.replace(self, base_bytes=self.base_bytes - self.host_embedding_bytes, embeddings="host")


def _shape_fields(hf_config, act_size, dequant_bytes, layer_list) -> dict:
    cfg = arch.text_config(hf_config)
    heads = cfg.num_attention_heads
    intermediate = getattr(cfg, "intermediate_size", None) or max(
        (m.out_features for m in layer_list[0].modules() if isinstance(m, nn.Linear)), default=cfg.hidden_size
    )
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * len(layer_list)
    return dict(
        hidden=cfg.hidden_size,
        intermediate=intermediate,
        vocab=cfg.vocab_size,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        kv_windows=tuple(window if kind == "sliding_attention" and window else None for kind in kinds),
        act_size=act_size,
        dequant_bytes=dequant_bytes,
        max_positions=next((int(getattr(cfg, a)) for a in SEQLEN_ATTRS if getattr(cfg, a, None) is not None), None),
        chunk_attention=config_supports(cfg),
        mlp_chunks=bool(layer_list) and all(dense_mlp(layer) is not None for layer in layer_list),
    )


# ---------------------------------------------------------------------------------------- loaded model
def from_model(model) -> Footprint:
    """The footprint of a loaded model, from its real tensors."""
    prefix, layer_list = arch.find_decoder_layers(model)
    layouts = [LayerLayout(layer) for layer in layer_list]
    in_layers = {id(t) for layer in layer_list for t in [*layer.parameters(), *layer.buffers()]}
    seen, base = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in in_layers:
            continue
        qs = getattr(t, "quant_state", None)
        for x in [t, *(v for _, v in (quant_state_tensors(qs) if qs is not None else ()))]:
            key = id(x) if x.device.type == "meta" else (x.device, x.data_ptr(), x.nbytes)
            if key not in seen:
                seen.add(key)
                base += x.numel() * x.element_size()
    emb = model.get_input_embeddings().weight
    quantized = [
        m
        for layer in layer_list
        for m in layer.modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
    ]
    dequant = max((m.in_features * m.out_features for m in quantized), default=0) * emb.element_size()
    return Footprint(
        "model",
        WeightFormat(emb.dtype, nf4=bool(quantized)).name,
        base,
        tuple(sum(e.nbytes for e in s.entries) for s in layouts),
        tuple(s.nbytes for s in layouts),
        tuple(s.other_nbytes for s in layouts),
        **_shape_fields(model.config, emb.element_size(), dequant, layer_list),
        **_end_fields(model, lambda module, name, seen: _module_bytes(module, seen)),
    )


def _module_bytes(module, seen: set) -> int:
    """Bytes of ``module``'s tensors (a loaded model's), those whose id is in ``seen`` left out."""
    out = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out += t.numel() * t.element_size()
    return out


def _end_fields(model, size) -> dict:
    """The input embeddings' and the lm_head's bytes (``size(module, name, seen)``), and whether they are
    tied; none where embeddings="host" cannot apply (no such modules, or an lm_head that is not a plain Linear)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Module) or type(head) is not nn.Linear:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    tied = any(p is q for p in embed.parameters() for q in head.parameters())
    return dict(
        embed_bytes=size(embed, names[id(embed)], set()),
        head_bytes=size(head, names[id(head)], set()),
        tied_head=tied,
    )


# ---------------------------------------------------------------------------------------- config
def _nf4_entries(numel: int, double_quant: bool) -> list:
    """Bytes of each tensor a 4-bit weight of ``numel`` values packs into (weight, then its QuantState)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return [(numel + 1) // 2, blocks * 4, 16 * 4]
    return [(numel + 1) // 2, blocks, 16 * 4, 4, math.ceil(blocks / NESTED_BLOCK) * 4, 256 * 4]


def _entries(module, name, fmt: WeightFormat, head, seen):
    """``(nbytes, in_a_linear)`` of every tensor directly in ``module`` (called ``name``) once loaded in
    ``fmt``, skeleton shapes; tensors whose id is in ``seen`` (a tied weight met before) are left out."""
    linear = isinstance(module, nn.Linear)
    quantized = fmt.nf4 and linear and module is not head and not any(s in name for s in fmt.skip_modules)
    for pname, p in module.named_parameters(recurse=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if quantized and pname == "weight":
            yield from ((n, True) for n in _nf4_entries(p.numel(), fmt.double_quant))
        else:
            yield p.numel() * (fmt.dtype.itemsize if p.is_floating_point() else p.element_size()), linear
    for _, b in module.named_buffers(recurse=False):
        if b is not None and id(b) not in seen:
            seen.add(id(b))
            yield b.numel() * b.element_size(), linear


def from_config(hf_config, fmt=None, skeleton=None) -> Footprint:
    """The footprint of ``hf_config`` loaded in ``fmt`` (see :func:`weight_format`), without weights."""
    fmt = weight_format(fmt, hf_config)
    meta = skeleton if skeleton is not None else arch.skeleton(hf_config)
    prefix, layer_list = arch.find_decoder_layers(meta)
    head = meta.get_output_embeddings()
    seen: set[int] = set()  # (a skeleton is tied: a tied lm_head's weight is met once)
    layers = [
        [e for name, m in layer.named_modules(prefix=f"{prefix}.{i}") for e in _entries(m, name, fmt, head, seen)]
        for i, layer in enumerate(layer_list)
    ]
    base = sum(
        n
        for name, m in meta.named_modules()
        if not name.startswith(prefix + ".")
        for n, _ in _entries(m, name, fmt, head, seen)
    )
    linears = [m for layer in layer_list for m in layer.modules() if isinstance(m, nn.Linear)]
    dequant = max((m.in_features * m.out_features for m in linears), default=0) * fmt.dtype.itemsize if fmt.nf4 else 0
    return Footprint(
        "config",
        fmt.name,
        base,
        tuple(sum(n for n, _ in entries) for entries in layers),
        tuple(sum(aligned(n) for n, _ in entries) for entries in layers),
        tuple(sum(aligned(n) for n, linear in entries if not linear) for entries in layers),
        **_shape_fields(hf_config, fmt.dtype.itemsize, dequant, layer_list),
        **_end_fields(
            meta,
            lambda module, name, seen: sum(
                n for sub, m in module.named_modules(prefix=name) for n, _ in _entries(m, sub, fmt, head, seen)
            ),
        ),
    )


# ---------------------------------------------------------------------------------------- work
@dataclass(frozen=True)
class Work:
    """What runs on the model: ``generate`` (a prefill of ``context`` tokens, then decoding with logits
    of the last token) or ``loglikelihood`` (lm-eval through lp_plugin's model type: windows of ``context``
    tokens scored position by position), ``batch`` sequences at a time. ``static_cache``: ``generate`` runs with a
    static cache (``decode="graph"``), of the context's length from the start, read by every decode step through a
    mask."""

    kind: str
    context: int
    batch: int
    static_cache: bool = False


def kv_bytes(fp: Footprint, context: int, batch: int) -> int:
    """Keys and values of every layer for ``context`` tokens (a sliding-window layer keeps its window)."""
    return sum(
        2 * batch * fp.kv_heads * fp.head_dim * fp.act_size * (min(context, w) if w else context) for w in fp.kv_windows
    )


def _layer_activations(fp: Footprint, bt: int, mlp_rows: int | None = None) -> int:
    """Bytes alive inside one decoder layer over ``bt`` tokens (its peak: the MLP's product, or attention); with
    ``mlp_rows`` (fewer than ``bt``) the MLP runs that many rows at a time (:mod:`lp_plugin.core.mlp_chunks`): one
    chunk's products, and its output beside the whole output it is written into."""
    s, h = fp.act_size, fp.hidden
    rows = mlp_rows if mlp_rows and mlp_rows < bt else bt
    mlp = 3 * rows * fp.intermediate * s
    if fp.dequant_bytes and rows > 1:
        mlp = max(mlp, 2 * rows * fp.intermediate * s + fp.dequant_bytes)
    if rows < bt:
        mlp += rows * h * s
    attn = bt * fp.head_dim * (4 * fp.heads + 3 * fp.kv_heads) * s
    return max(4 * bt * h * s + mlp, 3 * bt * h * s + attn, 3 * bt * h * s + 8 * bt * h)


def lower_right_chunks(fp: Footprint, cuda: bool) -> bool:
    """Whether prefill chunks attend through :mod:`lp_plugin.core.chunk_attention` (no mask, keys and values
    as cached): on CUDA, for a model whose config supports it, in fp16/bf16 (what
    :func:`lp_plugin.core.chunk_attention.applies` checks at run time)."""
    return cuda and fp.chunk_attention and fp.act_size == 2


def work_phases(
    fp: Footprint, work: Work, prefill_chunk: int | None = None, cuda: bool = False, mlp_chunk: int | None = None
) -> dict:
    """Bytes alive at each peak candidate of ``work`` (on a CUDA device where ``cuda``), split into
    kv / activations / logits:

    * ``prefill``: inside the last decoder layer. The model keeps its input embeddings and the layer's
      input alive; the layer its residual and normed input; the MLP ``down(act(gate(x)) * up(x))``
      holds three intermediates at its product (nf4: a weight dequantized for the matmul may stand in
      for one); attention and RMSNorm (float32 upcast) peaks are smaller for MLP-heavy layers but
      counted; plus RoPE's cos/sin and the integer inputs.
      ``generate``: the cache of every layer is full. ``loglikelihood`` (lp_plugin's lm-eval scoring,
      :mod:`lp_plugin.core.logprobs`): a whole window runs without a cache; with ``prefill_chunk`` the window
      runs that many tokens at a time through a cache of the whole window, each chunk scored before the
      next. A chunk attends to the cache through a materialized mask and keys and values expanded to every
      query head, or, where :func:`lower_right_chunks`, through the flash kernel with neither (its own
      scratch is in the planner's workspace); then the attention's own peak is the cache's append, one
      layer's earlier keys and values alive next to their concatenation with the chunk's.
    * ``decode`` (``generate``): a decode step's attention over the full cache (:func:`decode_attention_bytes`), and
      its logits; with a static cache, also the prefill's block kept beside the graph's pool
      (:func:`_graph_pool_apart`).
    * ``lm_head``: ``generate``: the cache, the final hidden states and the last position's logits (and
      generate's float32 copy). ``loglikelihood``: the final hidden states and one head chunk's logits
      and log_softmax (:func:`lp_plugin.core.logprobs.head_rows` positions), never the full vocabulary's.
      With the embeddings in host memory (:meth:`Footprint.on_host`) it also holds the lm_head's device copy
      (``head_buffer``; one copy for all of a scoring pass's head chunks), and so does a decode step.
    """
    s, b, t = fp.act_size, work.batch, work.context
    bt, h = b * t, fp.hidden
    inputs = 8 * t * (2 * b + 2)  # input_ids, attention_mask (B x T int64), position_ids, cache_position (T)
    rope = 2 * t * fp.head_dim * s
    if work.kind == "loglikelihood":
        chunk = prefill_chunk if prefill_chunk and prefill_chunk < t else None
        if chunk is None:
            prefill = {"kv": 0, "activations": _layer_activations(fp, bt) + rope + inputs + bt * h * s, "logits": 0}
        else:
            if lower_right_chunks(fp, cuda):
                attend = 2 * b * (t - chunk) * fp.kv_heads * fp.head_dim * s  # one layer's cache before the append
            else:
                attend = b * chunk * t * (1 + s) + 2 * bt * fp.heads * fp.head_dim * s  # mask, expanded keys/values
            prefill = {
                "kv": kv_bytes(fp, t, b),
                "activations": _layer_activations(fp, b * chunk) + attend + rope + inputs + b * chunk * h * s,
                "logits": 0,
            }
        rows = min(bt, head_rows(fp.vocab, s, s))
        held = bt * h * s if chunk is None else b * chunk * h * s  # the final hidden states being scored
        return _with_head_buffer(
            fp,
            {
                "prefill": prefill,
                "lm_head": {
                    "kv": kv_bytes(fp, t, b) if chunk else 0,
                    "activations": held + inputs,
                    "logits": 2 * rows * fp.vocab * s,
                },
            },
        )
    kv = kv_bytes(fp, t, b)
    mlp_rows = b * mlp_chunk if mlp_chunk and mlp_chunk < t else None
    # a static cache's prefill of several sequences attends to the whole cache's length: transformers builds the
    # boolean mask, SDPA its additive copy, and with a mask the keys and values are expanded to every query head (one
    # sequence needs no mask: SDPA runs causal on the keys cut to the prompt)
    attend = b * t * t * (1 + s) + 2 * bt * fp.heads * fp.head_dim * s if work.static_cache and b > 1 else 0
    return _with_head_buffer(
        fp,
        {
            "prefill": {
                "kv": kv,
                "activations": _layer_activations(fp, bt, mlp_rows) + attend + rope + inputs,
                "logits": 0,
            },
            "decode": {
                "kv": kv,
                "activations": decode_attention_bytes(fp, work) + _graph_pool_apart(fp, work, mlp_rows or bt),
                "logits": b * fp.vocab * (s + 4),
            },
            "lm_head": {"kv": kv, "activations": bt * h * s + inputs, "logits": b * fp.vocab * (s + 4)},
        },
    )


def _graph_pool_apart(fp: Footprint, work: Work, mlp_rows: int) -> int:
    """With a static cache (``decode="graph"``) the captured step allocates from the graph's own pool, which cannot
    use what the caching allocator keeps free in the segments the prefill left partly in use: about one of the
    prefill's largest blocks (an MLP intermediate over the rows it runs at once) beside the pool."""
    return mlp_rows * fp.intermediate * fp.act_size if work.static_cache else 0


def decode_attention_bytes(fp: Footprint, work: Work) -> int:
    """What one decode step's attention adds to the full cache, at its longest layer: a static cache is read through a
    mask of the cache's length, and so is a batch of several sequences (padded), and where the installed transformers
    expands masked keys and values to every query head (:func:`sdpa_expands_masked_decode`) both are copied at that
    size; else a dynamic cache grows by concatenation, a layer's keys and values held twice for a moment."""
    b, s = work.batch, fp.act_size
    longest = max((min(work.context, w) if w else work.context) for w in fp.kv_windows) if fp.kv_windows else 0
    if (work.static_cache or b > 1) and sdpa_expands_masked_decode():
        return 2 * b * fp.heads * fp.head_dim * longest * s + b * longest * (1 + s)
    return 2 * b * fp.kv_heads * fp.head_dim * longest * s


def sdpa_expands_masked_decode() -> bool:
    """Whether transformers' SDPA attention expands a masked one-token query's keys and values to every query head
    (``repeat_kv``), as releases before ``pack_gqa`` do; later ones reshape the query onto the key/value heads."""
    from transformers.integrations import sdpa_attention

    return not hasattr(sdpa_attention, "pack_gqa")


def _with_head_buffer(fp: Footprint, phases: dict) -> dict:
    """With the embeddings in host memory the lm_head phase holds a device copy of the lm_head (``head_buffer``), and
    so does a decode step from its input embeddings on (:mod:`lp_plugin.core.host_embeddings` copies it ahead)."""
    if fp.embeddings != "host":
        return phases
    held = ("lm_head", "decode")
    return {name: {**parts, "head_buffer": fp.head_bytes if name in held else 0} for name, parts in phases.items()}


def work_peak(
    fp: Footprint, work: Work, prefill_chunk: int | None = None, cuda: bool = False, mlp_chunk: int | None = None
) -> tuple:
    """``(phase, {"kv", "activations", "logits"})`` of the phase of ``work`` (on CUDA where ``cuda``) that
    needs the most."""
    phases = work_phases(fp, work, prefill_chunk, cuda, mlp_chunk)
    name = max(phases, key=lambda k: sum(phases[k].values()))
    return name, phases[name]
