"""Fit a memory budget (``offload="auto"``): which decoder layers to offload, and in which mode, so
that a model and the work it must do stay within ``max_memory`` on the main device.

What counts against the budget is the peak on the main device during inference, measured as
``torch.cuda.max_memory_allocated()`` plus the engine's buffers mapped outside PyTorch's allocator
(``OffloadHandle.mapped_bytes``). Predicted peak = resident weights + the engine's device buffer + the
work's peak phase (KV cache, activations, logits: :func:`lp_plugin.footprint.work_phases`) + a margin.

* session mode: a session brings every offloaded layer back, so its peak is the whole model's
  whichever layers are offloaded. A session plan therefore offloads nothing (offloading would only
  lower standby VRAM, at the price of a copy per session) and is chosen when the whole model and the
  work fit: it runs at the plain model's speed.
* stream mode: one device buffer holding a ring of ``min(prefetch + 1, k)`` slots of the largest
  offloaded layer (as packed) plus every offloaded layer's non-Linear tensors. Chosen when session
  does not fit, with the fewest offloaded layers ``k`` that fit (each streamed byte costs speed),
  spread evenly between the protected ends (the most compute between two loads; offloading half the
  candidate layers gives ``even``).
* nothing fits: :class:`~lp_plugin.errors.BudgetError` names the smallest budget that fits (and its
  layers and mode), and what prefetch=0 or no protected layers would need.

Assumptions, each a place where a prediction can be wrong:

* Weights: exact bytes (:mod:`lp_plugin.footprint`); the allocator's 512-byte rounding per tensor is
  ignored. Engine buffers are mapped in 2 MiB granules (CUDA's recommended granularity on an H100).
* Margin (on a GPU): 64 MiB for what a forward allocates besides tensors of the model: cuBLAS and
  cuBLASLt workspaces (kept after the first matmul), attention kernels' log-sum-exp, nf4's dequantized
  absmax.
* Work: transformers' SDPA forward of Llama-style layers with no materialized mask (no padding: causal
  SDPA, memory linear in the context) and a DynamicCache; lm-eval's log_softmax in the logits' dtype
  (``softmax_dtype`` unset; float32 would add 8 bytes per logit); generate's prompt counted as the
  whole ``max_context``; a stream ring open through the whole work (inside a session).
* Standby = resident weights. Not counted anywhere: the CUDA context (~0.5 GiB a process on an H100)
  and blocks the caching allocator keeps free: on a real N GiB card, leave room for them.
* Host memory: the cpu tier pins one buffer per offloaded layer, which PyTorch's pinned allocator rounds
  up to a power of two (a 147 MiB layer takes 256 MiB; data-parallel ranks sharing one copy in
  /dev/shm need only the packed bytes, once per host); the disk tier pins one staging buffer per ring
  slot and keeps the layers in files.
* Speed: each forward moves every offloaded layer's packed bytes over the link once, overlapped with
  compute: decode tok/s = min(the plain model's rate, batch x bandwidth / offloaded bytes), prefill
  likewise with batch x context tokens per forward. The plain model's rate is not modelled (batch-1
  decode is launch-bound): pass ``compute_tok_s`` (measured) to cap the prediction, else it is the
  transfer bound. Bandwidth (only when something is streamed): one pinned 256 MiB copy to the main
  GPU, measured once per process when CUDA is there (PyTorch keeps the pinned block cached, and the
  first offloaded layer's buffer reuses it), else a nominal 25 GB/s (PCIe 4.0 x16), marked as such. The disk tier reads at
  page-cache speed at best: its prediction is an upper bound.

Without a GPU the main device is the CPU and the budget is its memory (``max_memory="6GiB"`` or
``{"cpu": "6GiB"}``: there the "cpu" entry is the main device's, not a separate host budget). The
arithmetic is the same (without the margin, which stands for CUDA's workspaces), but offloaded layers only move between two buffers of the same memory, so
nothing real is saved; no bandwidth is measured and no speed predicted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .bench.measure import h2d_bandwidth
from .config import OffloadConfig
from .errors import BudgetError, OffloadSpecError
from .footprint import Footprint, Work, work_peak
from .policies import check_counts
from .report import GIB, jsonable, size_text

MIB = 2**20
MARGIN = 64 * MIB
GRANULE = 2 * MIB
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
        raise OffloadSpecError(f"max_memory gives the main device {main_device} twice (a bare size and {key!r}); keep one")
    vram = entries.pop("main" if "main" in entries else key, None)
    if vram is None:
        hint = "" if cuda else "; without a GPU the main device is the CPU: max_memory='6GiB' or {'cpu': '6GiB'}"
        raise OffloadSpecError(f"max_memory {dict(max_memory)} has no entry for the main device {main_device}: "
                               f"add {key!r} (or give a bare size such as '6GiB'){hint}")
    host = entries.pop("cpu", None) if cuda else None
    if entries:
        raise OffloadSpecError(f"max_memory names {sorted(map(str, entries))} besides the main device {main_device}; "
                               "the planner fits one device: give only the main device (and 'cpu')")
    return vram, host


@functools.lru_cache(maxsize=None)
def measured_bandwidth(device: str) -> float:
    """Pinned host-to-device bandwidth to ``device`` in GB/s: one 256 MiB copy (measured once)."""
    return h2d_bandwidth(torch.device(device), PROBE_BYTES, pinned=True)["gbps"]


def link_bandwidth(main_device, given=None) -> tuple:
    """``(GB/s or None, where the figure comes from)``."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given)
                              or given <= 0):
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
    breakdown: dict  # weights, buffer, kv, activations, logits, margin: sums to peak_bytes
    offloaded_bytes: int  # packed: moved per forward in stream mode
    host_bytes: int  # host memory the tier needs (pinned)
    disk_bytes: int
    bandwidth_gbps: float | None
    bandwidth_source: str
    decode_tok_s: float | None
    prefill_tok_s: float | None
    speed_basis: str

    @property
    def resident(self) -> tuple:
        return tuple(i for i in range(self.num_layers) if i not in set(self.offloaded))

    def resolved(self, config: OffloadConfig) -> OffloadConfig:
        """``config`` with the planned layers and mode in place of ``offload="auto"`` and its budget."""
        return dataclasses.replace(config, offload=self.offloaded or "none", mode=self.mode, max_memory=None,
                                   max_context=None, batch_size=None, work=None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resident"] = list(self.resident)
        return jsonable(d)

    def summary(self) -> dict:
        """The figures ``OffloadHandle.info()`` reports under ``budget``."""
        keys = ("budget_bytes", "mode", "standby_bytes", "peak_bytes", "phase", "breakdown", "host_bytes",
                "bandwidth_gbps", "bandwidth_source", "decode_tok_s", "prefill_tok_s", "speed_basis", "notes")
        return jsonable({"work": dataclasses.asdict(self.work), **{k: getattr(self, k) for k in keys}})


# ---------------------------------------------------------------------------------------- planning
def work_of(config: OffloadConfig, fp: Footprint) -> tuple:
    """``(Work, notes)``: the work the budget must hold, with the defaults said out loud."""
    notes = []
    context = config.max_context
    if context is None:
        context = fp.max_positions or DEFAULT_CONTEXT
        where = "the model's max_position_embeddings" if fp.max_positions else "lm-eval's default"
        notes.append(f"max_context={context}: {where}, as lm-eval's HFLM picks max_length; pass max_context= to plan for less")
    if config.batch_size is None:
        notes.append("batch_size=1: the default")
    if config.work is None:
        notes.append("work=generate: the default; lm-eval's loglikelihood tasks need work=loglikelihood")
    return Work(config.work or "generate", context, config.batch_size or 1), tuple(notes)


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


def _margin(cuda: bool) -> int:
    return MARGIN if cuda else 0


def _scan(fp: Footprint, work_bytes: int, mode: str, prefetch: int, lo: int, hi: int, cuda: bool):
    """``(peak, layers, mode, standby, buffer)`` for 0, 1, ... offloaded layers among ``lo..hi``."""
    for k in range(max(hi - lo + 1, 0) + 1):
        layers = spread(k, lo, hi)
        m = "session" if k == 0 and mode == "session" else "stream"
        standby, buffer = _layout(fp, layers, m, prefetch, cuda)
        yield standby + buffer + work_bytes + _margin(cuda), layers, m, standby, buffer


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
        return decode_c, prefill_c, "the plain model's rate (nothing streamed)" + ("" if compute_tok_s else ": not predicted")
    if bandwidth is None:
        return None, None, "not predicted: no host-to-device link"
    per_forward = moved / (bandwidth * 1e9)
    decode, prefill = work.batch / per_forward, work.batch * work.context / per_forward
    basis = f"transfer bound: {moved / GIB:.2f} GiB per forward at {bandwidth:.1f} GB/s"
    if compute_tok_s is None:
        return decode, prefill, basis + " (the plain model's own rate caps it)"
    return (min(decode, decode_c) if decode_c else decode), (min(prefill, prefill_c) if prefill_c else prefill), \
        basis + ", capped by the given compute rate"


def plan_offload(config: OffloadConfig, fp: Footprint, main_device, *, name: str = "model", bandwidth=None,
                 compute_tok_s=None) -> BudgetPlan:
    """The plan for ``config`` (``offload="auto"`` and its budget options) on ``fp``, computing on
    ``main_device`` (a ``torch.device``). Raises :class:`BudgetError` when nothing fits."""
    vram, host_budget = device_budgets(config.max_memory, main_device)
    work, notes = work_of(config, fp)
    phase, parts = work_peak(fp, work)
    cuda = main_device.type == "cuda"
    check_counts(fp.num_layers, config.protect_first, config.protect_last)
    lo, hi = config.protect_first, fp.num_layers - 1 - config.protect_last
    scan = list(_scan(fp, sum(parts.values()), config.mode, config.prefetch, lo, hi, cuda))
    fits = [c for c in scan if c[0] <= vram]
    best = fits[0] if fits else min(scan, key=lambda c: c[0])
    peak, layers, mode, standby, buffer = best
    host, disk = _host_need(fp, layers, mode, config.tier, config.prefetch, cuda)
    moved = sum(fp.packed_bytes[i] for i in layers) if mode == "stream" else 0
    gbps, source = link_bandwidth(main_device, bandwidth) if moved else (None, "not needed: nothing streamed")
    decode, prefill, basis = _speeds(work, moved, gbps, compute_tok_s)
    plan = BudgetPlan(
        model=name, format=fp.format, source=fp.source, main_device=str(main_device), num_layers=fp.num_layers,
        budget_bytes=vram if fits else peak, host_budget_bytes=host_budget, work=work, notes=notes, mode=mode,
        tier=config.tier, prefetch=config.prefetch, offloaded=layers, standby_bytes=standby, peak_bytes=peak, phase=phase,
        breakdown={"weights": standby, "ring" if mode == "stream" else "session_buffer": buffer, **parts, "margin": _margin(cuda)},
        offloaded_bytes=moved, host_bytes=host, disk_bytes=disk, bandwidth_gbps=gbps, bandwidth_source=source,
        decode_tok_s=decode, prefill_tok_s=prefill, speed_basis=basis,
    )
    if not fits:
        raise BudgetError(_nothing_fits(plan, vram, config, fp, parts, cuda), min_bytes=peak, smallest=plan, host_bytes=host)
    if host_budget is not None and host > host_budget:
        raise BudgetError(
            f"the plan for max_memory {size_text(vram)} on {main_device} offloads {len(layers)} layers, whose {config.tier} tier needs "
            f"{size_text(host)} of pinned host memory, but max_memory['cpu'] is {size_text(host_budget)}: raise it to at least "
            f"{size_text(host, up=True)}" + (", or use tier='disk' (offload_folder=DIR), which pins only the ring's staging buffers"
                                          if config.tier == "cpu" else ""),
            smallest=plan, host_bytes=host)
    return plan


def _least(fp, parts, config, cuda, prefetch=None, protect=None) -> int:
    """The least peak over every layer count, with ``prefetch`` or both protections changed."""
    lo, hi = (config.protect_first, fp.num_layers - 1 - config.protect_last) if protect is None else (protect, fp.num_layers - 1 - protect)
    prefetch = config.prefetch if prefetch is None else prefetch
    return min(c[0] for c in _scan(fp, sum(parts.values()), config.mode, prefetch, lo, hi, cuda))


def _nothing_fits(plan: BudgetPlan, vram: int, config, fp, parts, cuda) -> str:
    b, w = plan.breakdown, plan.work
    what = f"{w.kind}, {w.context} tokens of context, batch {w.batch}"
    layers = f"layers {compact(plan.offloaded)} offloaded ({len(plan.offloaded)} of {fp.num_layers})" if plan.offloaded else "nothing offloaded"
    parts_text = ", ".join(f"{k.replace('_', ' ')} {size_text(v)}" for k, v in b.items())
    fixes = [f"raise max_memory to at least {size_text(plan.peak_bytes, up=True)}"]
    if w.context > 1 or w.batch > 1:
        fixes.append("plan for a shorter max_context or a smaller batch_size")
    if w.kind == "loglikelihood":
        fixes.append("work='generate' (last-token logits) needs less, if that is the work")
    if config.prefetch > 0:
        fixes.append(f"prefetch=0 needs {size_text(_least(fp, parts, config, cuda, prefetch=0), up=True)}")
    if config.protect_first or config.protect_last:
        fixes.append(f"protect_first=0, protect_last=0 needs {size_text(_least(fp, parts, config, cuda, protect=0), up=True)}")
    return (f"nothing fits max_memory {size_text(vram)} on {plan.main_device} for {what} ({plan.format}): the least this needs is "
            f"{size_text(plan.peak_bytes, up=True)} in {plan.mode} mode with {layers} (at its {plan.phase} peak: {parts_text}). "
            "To fit: " + "; or ".join(fixes))


# ---------------------------------------------------------------------------------------- text
def compact(layers) -> str:
    """``(0, 1, 2, 5, 7, 8)`` as ``"0-2,5,7-8"``."""
    runs, out = [], []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    for a, b in runs:
        out.append(str(a) if a == b else f"{a}-{b}")
    return ",".join(out) or "none"


def describe(plan: BudgetPlan) -> str:
    """The plan as the ``plan`` command prints it."""
    w, rate = plan.work, (lambda v: "-" if v is None else f"{v:,.1f}")
    host = f"; host (cpu) {size_text(plan.host_budget_bytes)}" if plan.host_budget_bytes is not None else ""
    place = {"cpu": "cpu (pinned host memory)", "disk": "disk (files)"}.get(plan.tier, plan.tier)
    lines = [
        f"model {plan.model}: {plan.num_layers} decoder layers, {plan.format}, sizes from the {plan.source}",
        f"budget: {plan.main_device} {size_text(plan.budget_bytes)}{host}",
        f"work: {w.kind}, context {w.context} tokens, batch {w.batch}",
        *(f"  ({note})" for note in plan.notes),
        f"plan: {plan.mode} mode" + (f", tier {plan.tier}, prefetch {plan.prefetch}" if plan.offloaded else ", nothing offloaded"),
        f"  {plan.main_device} (resident): layers {compact(plan.resident)} ({len(plan.resident)})",
    ]
    if plan.offloaded:
        lines.append(f"  {place}: layers {compact(plan.offloaded)} ({len(plan.offloaded)}; offload={','.join(map(str, plan.offloaded))})")
    lines += [f"predicted standby VRAM {size_text(plan.standby_bytes)}",
              f"predicted peak VRAM    {size_text(plan.peak_bytes)} of {size_text(plan.budget_bytes)} (at the {plan.phase} phase)"]
    lines += [f"  {k.replace('_', ' '):<15} {size_text(v)}" for k, v in plan.breakdown.items()]
    if plan.offloaded:
        lines.append(f"host memory: {size_text(plan.host_bytes)} pinned" + (f", {size_text(plan.disk_bytes)} of files" if plan.disk_bytes else ""))
    lines.append(f"predicted decode {rate(plan.decode_tok_s)} tok/s, prefill {rate(plan.prefill_tok_s)} tok/s: {plan.speed_basis}")
    lines.append(f"bandwidth: {'-' if plan.bandwidth_gbps is None else f'{plan.bandwidth_gbps:.1f} GB/s'} ({plan.bandwidth_source})")
    return "\n".join(lines)
