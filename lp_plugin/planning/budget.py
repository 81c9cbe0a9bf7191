"""Fit a memory budget (``offload="auto"``): which decoder layers to offload, in which mode, and (for
lm-eval's scoring) how long a window and in what prefill chunks, so that a model and its work fit the
main device.

``max_memory`` for a GPU is the card: everything this process holds on it counts (CUDA context and
kernels, PyTorch's allocations and the caching allocator's slack, cuBLAS workspaces, the engine's mapped
buffers). Without ``max_memory`` the budget is what the device has free at load (Accelerate's
``get_max_memory``). Session mode brings every layer back, so it is planned only when the whole model
fits; else stream mode with the fewest offloaded layers that fit, spread evenly, the protected ends
given up (and said so) only when nothing else fits; only then, the input embeddings and the lm_head in
host memory (``embeddings="host"``: their weights leave the device, the lm_head phase holds a copy of the
lm_head), said so too. What each term is and how it was calibrated: docs/card.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..core.devices import cuda_runtime, free_bytes, h2d_bandwidth
from ..core.mlp_chunks import MIN_MLP_CHUNK
from ..core.report import GIB, jsonable, size_text
from ..errors import BudgetError, OffloadSpecError
from .config import PREFETCH, OffloadConfig
from .footprint import Footprint, Work, work_peak
from .policies import check_counts

MIB = 2**20
WORKSPACE = 64 * MIB  # cuBLAS/cuBLASLt workspaces, attention kernels' log-sum-exp, nf4's dequantized absmax
SLACK_FRACTION = 0.03  # the caching allocator's reserved-but-free blocks, of what it holds at the peak
SLACK_BYTES = 32 * MIB
GRANULE = 2 * MIB
MIN_PREFILL_CHUNK = 256  # the shortest chunk a loglikelihood window is prefilled in
NOMINAL_GBPS = 25.0
PROBE_BYTES = 256 * MIB
DEFAULT_CONTEXT = 2048  # lm-eval's HFLM default max_length, for a config without a length


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pinned(n: int) -> int:
    """What PyTorch's pinned host allocator takes for an ``n``-byte buffer (the next power of two)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def spread(k: int, lo: int, hi: int) -> tuple:
    """``k`` layers spread evenly over ``lo..hi`` (both ends for k > 1): ``spread(16, 2, 32) == (2, 4, ..., 32)``."""
    n = hi - lo + 1
    if not 0 <= k <= n:
        raise OffloadSpecError(f"cannot pick {k} layers among {max(n, 0)} (layers {lo}..{hi})")
    if k <= 1:
        return (lo + (n - 1) // 2,) if k else ()
    return tuple(lo + (2 * i * (n - 1) + k - 1) // (2 * (k - 1)) for i in range(k))


def device_budgets(max_memory, main_device) -> tuple:
    """``(main device bytes, host bytes or None)`` out of a parsed ``max_memory``."""
    entries = dict(max_memory)
    cuda = main_device.type == "cuda"
    key = main_device.index if cuda else "cpu"
    if "main" in entries and key in entries:
        raise OffloadSpecError(
            f"max_memory gives the main device {main_device} twice (a bare size and {key!r}); keep one"
        )
    vram = entries.pop("main" if "main" in entries else key, None)
    if vram is None:
        hint = "" if cuda else "; without a GPU the main device is the CPU: max_memory='6GiB' or {'cpu': '6GiB'}"
        raise OffloadSpecError(
            f"max_memory {dict(max_memory)} has no entry for the main device {main_device}: "
            f"add {key!r} (or give a bare size such as '6GiB'){hint}"
        )
    host = entries.pop("cpu", None) if cuda else None
    if entries:
        raise OffloadSpecError(
            f"max_memory names {sorted(map(str, entries))} besides the main device {main_device}; "
            "the planner fits one device: give only the main device (and 'cpu')"
        )
    return vram, host


def host_budget(max_memory, main_device) -> int | None:
    """``max_memory["cpu"]`` where it bounds host memory (the main device is a GPU), else None."""
    if max_memory is None or main_device.type != "cuda":
        return None
    return dict(max_memory).get("cpu")


@functools.cache
def measured_bandwidth(device: str) -> float:
    """Pinned host-to-device bandwidth to ``device`` in GB/s: one 256 MiB copy (measured once)."""
    measured = h2d_bandwidth(torch.device(device), PROBE_BYTES, pinned=True)
    assert measured is not None  # (a CUDA device: link_bandwidth asks for no other)
    return measured["gbps"]


def link_bandwidth(main_device, given=None) -> tuple:
    """``(GB/s or None, where the figure comes from)``."""
    if given is not None and (
        isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given) or given <= 0
    ):
        raise OffloadSpecError(f"bandwidth must be a number of GB/s > 0, got {given!r}")
    if main_device.type != "cuda":
        return None, "none: the main device is the CPU"
    if given is not None:
        return float(given), "given"
    if not torch.cuda.is_available():
        return NOMINAL_GBPS, "nominal: PCIe 4.0 x16, no GPU here to measure"
    try:
        return measured_bandwidth(str(main_device)), f"measured: one pinned copy of {PROBE_BYTES // MIB} MiB"
    except RuntimeError as exc:  # no room for the probe (a full GPU, too little pinned memory)
        return NOMINAL_GBPS, f"nominal: PCIe 4.0 x16, the probe failed ({type(exc).__name__})"


@dataclass(frozen=True)
class BudgetPlan:
    model: str
    format: str
    source: str  # sizes from "model" (real tensors) or "config" (skeleton shapes)
    main_device: str
    num_layers: int
    budget_bytes: int
    host_budget_bytes: int | None
    work: Work
    notes: tuple  # the defaults that were used
    mode: str
    tier: str
    prefetch: int
    offloaded: tuple
    standby_bytes: int
    peak_bytes: int
    phase: str  # the work's peak phase
    # cuda runtime, allocator slack, weights, buffer, kv, activations, logits, workspace: sums to peak_bytes
    breakdown: dict
    offloaded_bytes: int  # packed: moved per forward in stream mode
    host_bytes: int  # host memory the tier needs (pinned)
    disk_bytes: int
    bandwidth_gbps: float | None
    bandwidth_source: str
    decode_tok_s: float | None
    prefill_tok_s: float | None
    speed_basis: str
    budget_source: str = "max_memory"  # or the free memory the device had at load
    runtime_source: str = ""  # where the CUDA runtime figure comes from
    prefill_chunk: int | None = None  # loglikelihood: tokens a window is prefilled in (None: whole)
    mlp_chunk: int | None = None  # generate: positions a prefill's MLPs run at a time (None: all)
    context_source: str = "given"  # where work.context comes from
    embeddings: str = "device"  # where the input embeddings and the lm_head are: "device" or "host"

    def __str__(self) -> str:
        return describe(self)

    @property
    def left_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes

    @property
    def resident(self) -> tuple:
        return tuple(i for i in range(self.num_layers) if i not in set(self.offloaded))

    def resolved(self, config: OffloadConfig) -> OffloadConfig:
        """``config`` with the planned layers and mode in place of ``offload="auto"`` and its budget."""
        return dataclasses.replace(
            config,
            offload=self.offloaded or "none",
            mode=self.mode,
            prefetch=config.prefetch if self.mode == "stream" else PREFETCH,  # (session mode copies nothing ahead)
            embeddings=self.embeddings,
            max_memory=None,
            max_context=None,
            batch_size=None,
            work=None,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resident"] = list(self.resident)
        return jsonable(d)

    def summary(self) -> dict:
        """The figures ``OffloadHandle.info()`` reports under ``budget``."""
        keys = (
            "budget_bytes",
            "budget_source",
            "mode",
            "standby_bytes",
            "peak_bytes",
            "phase",
            "breakdown",
            "host_bytes",
            "bandwidth_gbps",
            "bandwidth_source",
            "decode_tok_s",
            "prefill_tok_s",
            "speed_basis",
            "prefill_chunk",
            "mlp_chunk",
            "context_source",
            "embeddings",
            "notes",
        )
        return jsonable({"work": dataclasses.asdict(self.work), **{k: getattr(self, k) for k in keys}})


# ---------------------------------------------------------------------------------------- planning
def work_of(config: OffloadConfig, fp: Footprint, context: int | None = None) -> tuple:
    """``(Work, notes)``: the work the budget must hold, with the defaults said out loud."""
    notes = []
    if context is None:
        context = config.max_context if isinstance(config.max_context, int) else None
    if context is None:
        context = fp.max_positions or DEFAULT_CONTEXT
        where = "the model's max_position_embeddings" if fp.max_positions else "lm-eval's default"
        notes.append(
            f"max_context={context}: {where}, as lm-eval's HFLM picks max_length; pass max_context= to plan for less"
        )
    if config.batch_size is None:
        notes.append("batch_size=1: the default")
    if config.work is None:
        notes.append("work=generate: the default; lm-eval's loglikelihood tasks need work=loglikelihood")
    static = config.decode == "graph" and (config.work or "generate") == "generate"
    return Work(config.work or "generate", context, config.batch_size or 1, static_cache=static), tuple(notes)


@dataclass(frozen=True)
class Card:
    """What the main device holds besides the model's tensors, the work's and the engine's buffers."""

    budget: int
    budget_source: str
    runtime: int  # CUDA context, kernels, library handles (0 on the CPU)
    runtime_source: str
    cuda: bool

    def overhead(self, allocated: int) -> dict:
        """The terms a GPU adds to ``allocated`` bytes of PyTorch tensors at the peak."""
        if not self.cuda:
            return {"cuda_runtime": 0, "allocator_slack": 0, "workspace": 0}
        slack = SLACK_BYTES + int(SLACK_FRACTION * (allocated + WORKSPACE))
        return {"cuda_runtime": self.runtime, "allocator_slack": slack, "workspace": WORKSPACE}


def card_of(max_memory, main_device) -> tuple:
    """``(Card, host budget or None)``: the main device's budget (``max_memory``'s entry, or the memory
    free at load) and what the CUDA runtime takes of it."""
    cuda = main_device.type == "cuda"
    context, runtime, runtime_source = cuda_runtime(main_device) if cuda else (0, 0, "none: the main device is the CPU")
    if max_memory is not None:
        vram, host = device_budgets(max_memory, main_device)
        return Card(vram, "max_memory", runtime, runtime_source, cuda), host
    if cuda and not torch.cuda.is_available():
        raise OffloadSpecError(
            f"offload='auto' without max_memory plans for the memory {main_device} has free, but this "
            "machine has no GPU to ask: give max_memory (the card's size, e.g. max_memory='6GiB')"
        )
    free = free_bytes(main_device)
    if cuda:  # the context this process holds by now (cuda_runtime made it) is part of the card, not of what is free
        return Card(
            free + context,
            f"free on {main_device} at load + this process's CUDA context",
            runtime,
            runtime_source,
            True,
        ), None
    return Card(free, "available host memory at load", 0, runtime_source, False), None


@dataclass(frozen=True)
class _Option:
    peak: int
    layers: tuple
    mode: str
    standby: int
    buffer: int
    phase: str
    parts: dict  # kv, activations, logits
    prefill_chunk: int | None  # loglikelihood: tokens a window is prefilled in (None: whole)
    mlp_chunk: int | None  # generate: positions a prefill's MLPs run at a time (None: all)
    overhead: dict
    embeddings: str  # "device", or "host": the input embeddings and the lm_head in host memory


def _layout(fp: Footprint, layers, mode: str, prefetch: int, cuda: bool) -> tuple:
    """``(standby bytes, device buffer bytes)`` with ``layers`` offloaded in ``mode``."""
    chosen = set(layers)
    standby = fp.base_bytes + sum(b for i, b in enumerate(fp.layer_bytes) if i not in chosen)
    if mode == "stream" and layers:
        buffer = min(prefetch + 1, len(layers)) * max(fp.packed_bytes[i] for i in layers)
        buffer += sum(fp.other_bytes[i] for i in layers)
    else:
        buffer = sum(fp.packed_bytes[i] for i in layers)
    return standby, _round_up(buffer, GRANULE) if cuda else buffer


def _scan(fp: Footprint, work: Work, card: Card, mode: str, prefetch: int, lo: int, hi: int, chunks: tuple):
    """:class:`_Option` for 0, 1, ... offloaded layers among ``lo..hi`` (fewest first), with ``chunks``
    ``(prefill chunk, MLP chunk)``."""
    prefill_chunk, mlp_chunk = chunks
    phase, parts = work_peak(fp, work, prefill_chunk, card.cuda, mlp_chunk)
    work_bytes = sum(parts.values())
    for k in range(max(hi - lo + 1, 0) + 1):
        layers = spread(k, lo, hi)
        m = "session" if k == 0 and mode == "session" else "stream"
        standby, buffer = _layout(fp, layers, m, prefetch, card.cuda)
        overhead = card.overhead(standby + work_bytes)
        yield _Option(
            standby + buffer + work_bytes + sum(overhead.values()),
            layers,
            m,
            standby,
            buffer,
            phase,
            parts,
            prefill_chunk,
            mlp_chunk,
            overhead,
            fp.embeddings,
        )


def _chunks(work: Work, fp: Footprint, cuda: bool) -> list:
    """``(prefill chunk, MLP chunk)`` pairs to try for ``work``, longest first, after none: loglikelihood, its
    window's prefill in halves down to :data:`MIN_PREFILL_CHUNK`; generate (on CUDA, dense MLPs), the prefill's
    MLPs in halves down to :data:`~lp_plugin.core.mlp_chunks.MIN_MLP_CHUNK` positions (generate's prefill is the
    caller's)."""
    out: list[tuple[int | None, int | None]] = [(None, None)]
    if work.kind == "loglikelihood":
        least, pair = MIN_PREFILL_CHUNK, lambda c: (c, None)
    elif cuda and fp.mlp_chunks:
        least, pair = MIN_MLP_CHUNK, lambda c: (None, c)
    else:
        return out
    if work.context > least:
        c = 1 << ((work.context - 1).bit_length() - 1)  # the largest power of two below the context
        while c >= least:
            out.append(pair(c))
            c //= 2
    return out


def placements(fp: Footprint, config: OffloadConfig) -> list:
    """The footprints to plan with, in the order of preference: the input embeddings and the lm_head on the
    device, then (where they can move) in host memory; ``embeddings="host"``: only there."""
    if config.embeddings == "host":
        return [fp.on_host()]
    return [fp, fp.on_host()] if fp.host_embedding_bytes else [fp]


def _options(fp: Footprint, work: Work, card: Card, config: OffloadConfig):
    """Every plan for ``work``, in the order of preference: the embeddings and lm_head on the device before in
    host memory, the whole window before prefill chunks (exact against the plain model, and faster), the protected
    layers kept before given up, fewest layers first."""
    n = fp.num_layers
    ranges = [(config.protect_first, n - 1 - config.protect_last)]
    if config.protect_first or config.protect_last:
        ranges.append((0, n - 1))
    for placed in placements(fp, config):
        for chunks in _chunks(work, placed, card.cuda):
            for lo, hi in ranges:
                yield from _scan(placed, work, card, config.mode, config.prefetch, lo, hi, chunks)


def _first_fit(fp, work, card, config):
    """``(the preferred option within the budget or None, the least-needing option)``."""
    least = None
    for option in _options(fp, work, card, config):
        if option.peak <= card.budget:
            return option, option
        if least is None or option.peak < least.peak:
            least = option
    return None, least


def longest_context(fp, config, card, upto: int) -> int:
    """The longest context up to ``upto`` tokens whose work fits ``card`` (0: none)."""
    lo, hi = 0, upto
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _first_fit(fp, work_of(config, fp, mid)[0], card, config)[0] is not None:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_offload(
    config: OffloadConfig, fp: Footprint, main_device, *, name: str = "model", bandwidth=None, compute_tok_s=None
) -> BudgetPlan:
    """The plan for ``config`` (``offload="auto"`` and its budget options) on ``fp``, computing on
    ``main_device`` (a ``torch.device``). Raises :class:`BudgetError` when nothing fits."""
    check_counts(fp.num_layers, config.protect_first, config.protect_last)
    if bandwidth is not None:  # checked even where nothing will stream
        link_bandwidth(torch.device("cpu"), bandwidth)
    card, host_budget = card_of(config.max_memory, main_device)
    context, context_source = None, "given"
    if config.max_context == "auto":
        upto = fp.max_positions or DEFAULT_CONTEXT
        context = longest_context(fp, config, card, upto) or upto
        context_source = "the model's" if context == upto else f"the longest that fits (the model's is {upto:,})"
    elif config.max_context is None:
        context_source = "the model's"
    work, notes = work_of(config, fp, context)
    fit, best = _first_fit(fp, work, card, config)
    n = fp.num_layers
    if (
        fit is not None
        and fit.layers
        and not set(fit.layers) <= set(range(config.protect_first, n - config.protect_last))
    ):
        notes += (
            f"protect_first={config.protect_first}, protect_last={config.protect_last} given up: "
            "nothing fits with the protected ends resident",
        )
    if fit is not None and fit.prefill_chunk:
        notes += (f"prefill in chunks of {fit.prefill_chunk} tokens: a whole {work.context}-token window does not fit",)
    if fit is not None and fit.mlp_chunk:
        notes += (
            f"the prefill's MLPs run {fit.mlp_chunk} positions at a time: the whole {work.context}-token prefill's "
            "do not fit (the same values: lp_plugin.core.mlp_chunks)",
        )
    if best.embeddings == "host":
        notes += (_host_embeddings_note(fp, config, fit is not None),)
    host, disk = _host_need(fp, best.layers, best.mode, config.tier, config.prefetch, card.cuda)
    head = fp.head_bytes if best.embeddings == "host" else 0  # copied to the device for each forward's lm_head
    if best.embeddings == "host":
        pin = _pinned if card.cuda else (lambda n: n)
        host += pin(fp.embed_bytes) + (0 if fp.tied_head else pin(fp.head_bytes))
    moved = (sum(fp.packed_bytes[i] for i in best.layers) if best.mode == "stream" else 0) + head
    gbps, source = link_bandwidth(main_device, bandwidth) if moved else (None, "not needed: nothing streamed")
    decode, prefill, basis = _speeds(work, moved, gbps, compute_tok_s)
    engine = {"ring" if best.mode == "stream" else "session_buffer": best.buffer}
    plan = BudgetPlan(
        model=name,
        format=fp.format,
        source=fp.source,
        main_device=str(main_device),
        num_layers=n,
        budget_bytes=card.budget if fit else best.peak,
        host_budget_bytes=host_budget,
        work=work,
        notes=notes,
        mode=best.mode,
        tier=config.tier,
        prefetch=config.prefetch,
        offloaded=best.layers,
        standby_bytes=best.standby,
        peak_bytes=best.peak,
        phase=best.phase,
        breakdown={
            "cuda_runtime": best.overhead["cuda_runtime"],
            "allocator_slack": best.overhead["allocator_slack"],
            "weights": best.standby,
            **engine,
            **best.parts,
            "workspace": best.overhead["workspace"],
        },
        offloaded_bytes=moved,
        host_bytes=host,
        disk_bytes=disk,
        bandwidth_gbps=gbps,
        bandwidth_source=source,
        decode_tok_s=decode,
        prefill_tok_s=prefill,
        speed_basis=basis,
        budget_source=card.budget_source,
        runtime_source=card.runtime_source,
        prefill_chunk=best.prefill_chunk,
        mlp_chunk=best.mlp_chunk,
        context_source=context_source,
        embeddings=best.embeddings,
    )
    if fit is None:
        raise BudgetError(_nothing_fits(plan, card, config, fp), min_bytes=best.peak, smallest=plan, host_bytes=host)
    if host_budget is not None and host > host_budget:
        raise BudgetError(
            f"the plan for max_memory {size_text(card.budget)} on {main_device} offloads {len(best.layers)} layers, "
            f"whose {config.tier} tier needs {size_text(host)} of pinned host memory, but max_memory['cpu'] is "
            f"{size_text(host_budget)}: raise it to at least {size_text(host, up=True)}"
            + (
                ", or use tier='disk' (offload_folder=DIR), which pins only the ring's staging buffers"
                if config.tier == "cpu"
                else ""
            ),
            smallest=plan,
            host_bytes=host,
        )
    return plan


def _host_embeddings_note(fp: Footprint, config: OffloadConfig, fits: bool) -> str:
    why = "embeddings='host'" if config.embeddings == "host" else "nothing fits with them on the device"
    if not fits and config.embeddings != "host":
        why = "the least this needs"
    weights = "their tied weight ({}) leaves" if fp.tied_head else "their weights ({}) leave"
    return (
        f"embeddings and lm_head stream from host memory: {why}; {weights.format(size_text(fp.host_embedding_bytes))} "
        f"the device, the lm_head ({size_text(fp.head_bytes)}) is copied to it for each call"
    )


def _host_need(fp: Footprint, layers, mode: str, tier: str, prefetch: int, cuda: bool) -> tuple:
    """``(host bytes, disk bytes)`` the tier needs for ``layers``."""
    pin = _pinned if cuda else (lambda n: n)
    packed = [fp.packed_bytes[i] for i in layers]
    if tier == "cpu":
        return sum(pin(n) for n in packed), 0
    slots = (min(prefetch + 1, len(packed)) if mode == "stream" else 1) if packed else 0
    return slots * pin(max(packed, default=0)), sum(packed)


def _speeds(work: Work, moved: int, bandwidth, compute_tok_s) -> tuple:
    """``(decode tok/s, prefill tok/s, basis)``."""
    decode_c, prefill_c = compute_tok_s if compute_tok_s is not None else (None, None)
    if not moved:
        return (
            decode_c,
            prefill_c,
            "the plain model's rate (nothing streamed)" + ("" if compute_tok_s else ": not predicted"),
        )
    if bandwidth is None:
        return None, None, "not predicted: no host-to-device link"
    per_forward = moved / (bandwidth * 1e9)
    decode, prefill = work.batch / per_forward, work.batch * work.context / per_forward
    basis = f"transfer bound: {moved / GIB:.2f} GiB per forward at {bandwidth:.1f} GB/s"
    if compute_tok_s is None:
        return decode, prefill, basis + " (an upper bound: the model's own compute rate caps it, prefill most)"
    return (
        (min(decode, decode_c) if decode_c else decode),
        (min(prefill, prefill_c) if prefill_c else prefill),
        basis + ", capped by the given compute rate",
    )


def _least(fp, work, card, config, **changes) -> int:
    """The least peak of ``work`` with ``config`` changed (``prefetch=0``, no protected ends)."""
    return min(o.peak for o in _options(fp, work, card, dataclasses.replace(config, **changes)))


def _nothing_fits(plan: BudgetPlan, card: Card, config, fp) -> str:
    b, w = plan.breakdown, plan.work
    what = f"{w.kind}, {w.context} tokens of context, batch {w.batch}"
    layers = (
        f"layers {compact(plan.offloaded)} offloaded ({len(plan.offloaded)} of {fp.num_layers})"
        if plan.offloaded
        else "nothing offloaded"
    )
    parts_text = ", ".join(f"{k.replace('_', ' ')} {size_text(v)}" for k, v in b.items())
    fixes = [f"raise max_memory to at least {size_text(plan.peak_bytes, up=True)}"]
    if w.context > 1 or w.batch > 1:
        upper = min(w.context - 1, fp.max_positions) if fp.max_positions else w.context - 1
        longest = longest_context(fp, config, card, upper) if upper >= 1 else 0
        if longest:
            own = " (the model's own context)" if longest == fp.max_positions else ""
            fixes.append(f"a context of at most {longest} tokens fits{own}")
        elif w.batch > 1:
            fixes.append("plan for a smaller batch_size")
    if config.prefetch > 0:
        fixes.append(f"prefetch=0 needs {size_text(_least(fp, w, card, config, prefetch=0), up=True)}")
    where = f"max_memory {size_text(card.budget)}" if card.budget_source == "max_memory" else card.budget_source
    return (
        f"nothing fits {where} on {plan.main_device} for {what} ({plan.format}): the least this needs is "
        f"{size_text(plan.peak_bytes, up=True)} in {plan.mode} mode with {layers} (at its {plan.phase} peak: "
        f"{parts_text}). "
        "To fit: " + "; or ".join(fixes)
    )


# ---------------------------------------------------------------------------------------- text
def compact(layers) -> str:
    """``(0, 1, 2, 5, 7, 8)`` as ``"0-2,5,7-8"``."""
    runs: list[list[int]] = []
    out: list[str] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    for a, b in runs:
        out.append(str(a) if a == b else f"{a}-{b}")
    return ",".join(out) or "none"


_CARD_ROWS = {  # breakdown key -> how the card view names it
    "cuda_runtime": "CUDA context + kernels",
    "allocator_slack": "allocator slack",
    "weights": "weights (resident)",
    "ring": "engine ring buffers",
    "session_buffer": "engine session buffer",
    "head_buffer": "lm_head copy (host)",
    "kv": "KV cache",
    "activations": "activations",
    "logits": "logits",
    "workspace": "workspaces",
}


def describe(plan: BudgetPlan) -> str:
    """The plan as the ``plan`` command prints it: what runs where, then the card: each term of the
    predicted peak and what is left."""
    w, rate = plan.work, (lambda v: "-" if v is None else f"{v:,.1f}")
    host = f"; host (cpu) {size_text(plan.host_budget_bytes)}" if plan.host_budget_bytes is not None else ""
    place = {"cpu": "cpu (pinned host memory)", "disk": "disk (files)"}.get(plan.tier, plan.tier)
    chunk = f", prefill in chunks of {plan.prefill_chunk:,}" if plan.prefill_chunk else ""
    chunk += f", prefill MLPs in chunks of {plan.mlp_chunk:,} positions" if plan.mlp_chunk else ""
    lines = [
        f"model {plan.model}: {plan.num_layers} decoder layers, {plan.format}, sizes from the {plan.source}",
        f"card: {plan.main_device} {size_text(plan.budget_bytes)} ({plan.budget_source}){host}",
        f"work: {w.kind}, context {w.context:,} tokens ({plan.context_source}), batch {w.batch}{chunk}",
        *(f"  ({note})" for note in plan.notes),
        f"plan: {plan.mode} mode"
        + (f", tier {plan.tier}, prefetch {plan.prefetch}" if plan.offloaded else ", nothing offloaded"),
        f"  {plan.main_device} (resident): layers {compact(plan.resident)} ({len(plan.resident)})",
    ]
    if plan.offloaded:
        lines.append(
            f"  {place}: layers {compact(plan.offloaded)} ({len(plan.offloaded)}; "
            f"offload={','.join(map(str, plan.offloaded))})"
        )
    if plan.embeddings == "host":
        lines.append("  cpu (pinned host memory): input embeddings and lm_head (embeddings=host)")
    lines.append(f"the card at the {plan.phase} peak (predicted):")
    lines += [f"  {_CARD_ROWS.get(k, k.replace('_', ' ')):<24} {size_text(v):>11}" for k, v in plan.breakdown.items()]
    lines.append(f"  {'= peak':<24} {size_text(plan.peak_bytes):>11}")
    lines.append(f"  {'left':<24} {size_text(max(plan.left_bytes, 0)):>11}")
    lines.append(f"predicted standby (between sessions): {size_text(plan.standby_bytes)} of weights")
    if plan.runtime_source and plan.breakdown.get("cuda_runtime"):
        lines.append(f"CUDA runtime: {plan.runtime_source}")
    if plan.offloaded or plan.embeddings == "host":
        lines.append(
            f"host memory: {size_text(plan.host_bytes)} pinned"
            + (f", {size_text(plan.disk_bytes)} of files" if plan.disk_bytes else "")
            + (
                " (where they fit the host budget and half the available memory, their cached pages are pinned instead)"
                if plan.disk_bytes and plan.main_device.startswith("cuda")
                else ""
            )
        )
    if "upper bound" in plan.speed_basis:  # transfers alone: the model's compute is not in the figure
        lines.append(
            f"speed at most (not a prediction): decode {rate(plan.decode_tok_s)} tok/s, "
            f"prefill {rate(plan.prefill_tok_s)} tok/s: {plan.speed_basis}"
        )
    else:
        lines.append(
            f"predicted decode {rate(plan.decode_tok_s)} tok/s, prefill {rate(plan.prefill_tok_s)} tok/s: "
            f"{plan.speed_basis}"
        )
    lines.append(
        f"bandwidth: {'-' if plan.bandwidth_gbps is None else f'{plan.bandwidth_gbps:.1f} GB/s'} "
        f"({plan.bandwidth_source})"
    )
    return "\n".join(lines)
