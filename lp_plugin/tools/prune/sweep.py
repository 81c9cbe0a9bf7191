"""The quality frontier of layer skipping: every (share skipped, selection, stand-in) measured through
the engine.

Each row loads the model with :func:`lp_plugin.from_pretrained` and the row's ``skip`` /
``stand_in`` / ``calib`` options (plus the sweep's offload options), so policies, stand-in fitting,
caching and the forward are exactly what a user gets; then it scores the held-out documents with
the attached model's own forward: perplexity, tokens/s, standby and peak VRAM (None on the CPU),
and bytes moved between tier and device per token. Held-out documents are the ``lp_pydoc_heldout``
lm-eval task's (tokens 4096-8192 of the pydoc stream), scored the way lm-eval scores them, so
``lm_eval --model hf-residual-offload --tasks lp_pydoc_heldout`` with the same options reports the
same ``token_perplexity``. Calibration reads other tokens only (see :mod:`.calib`).
"""

from __future__ import annotations

import gc
import math
import platform
import time
from typing import TypedDict

import torch

import lp_plugin

from ...core.progress import bar
from ...planning.arch import find_decoder_layers
from ...planning.skipping import domains
from ...planning.skipping.calib import (
    HELDOUT,
    WINDOW,
    calibration,
    doc_start_token,
    document_ids,
    heldout_documents,
    tokenizer_for,
)

SELECTIONS = ("bi", "angular", "greedy")
STAND_INS = ("none", "mean", "linear")
FRACTIONS = (0, 10, 20, 30, 40)

# a slice's documents: (the token each is read after, [document token ids])
SliceSet = tuple[int, list[list[int]]]


class Evaluation(TypedDict):
    """One slice's scores under one model (:func:`evaluate`)."""

    nll: float  # summed over the documents' tokens
    tokens: int
    ppl: float
    forward_s: float
    tokens_per_second: float | None  # None when the forwards took no measurable time
    peak_vram_bytes: int | None  # None on the CPU


def heldout_ids(model, start=HELDOUT[0], end=HELDOUT[1], window=WINDOW) -> SliceSet:
    """``(prefix token, [document token ids])`` of the held-out documents, for ``model``'s tokenizer."""
    tokenizer = tokenizer_for(model, "the held-out documents")
    docs = [document_ids(tokenizer, text) for text in heldout_documents(tokenizer, start, end, window)]
    return doc_start_token(model, tokenizer), docs


def slice_sets(model, names, calib, heldout=(HELDOUT[0], HELDOUT[1], WINDOW)) -> dict[str, SliceSet]:
    """``{slice name: (prefix token, [document token ids])}``: ``calib`` (the first
    :data:`domains.SLICE_TOKENS` calibration tokens, as windows) and every slice of ``names``
    (:data:`domains.SLICES`) as documents; ``heldout`` sets ``pydoc-a``'s range and every window."""
    tokenizer = tokenizer_for(model, "the held-out documents")
    prefix = doc_start_token(model, tokenizer)
    start, end, window = heldout
    data = calibration(model, calib, window)
    out: dict[str, SliceSet] = {"calib": (prefix, [])}
    taken = 0
    for w in data.windows:
        if taken >= domains.SLICE_TOKENS:
            break
        out["calib"][1].append(list(w))
        taken += len(w)
    for name in names:
        piece = domains.SLICES[name]
        texts = domains.slice_documents(tokenizer, piece, window, *((start, end) if name == "pydoc-a" else ()))
        out[name] = (prefix, [document_ids(tokenizer, text) for text in texts])
    return out


@torch.no_grad()
def evaluate(model, prefix: int, docs: list[list[int]]) -> Evaluation:
    """Perplexity of ``docs`` (token id lists) under ``model``'s own forward, each document read after
    ``prefix``; with tokens/s of the forwards and the peak VRAM they reached (None on the CPU)."""
    device = model.get_input_embeddings().weight.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    nll, tokens, seconds = 0.0, 0, 0.0
    for ids in bar(docs, desc="evaluation (held-out documents)", unit="doc"):
        inputs = torch.tensor([[prefix, *ids[:-1]]], device=device)
        t0 = time.perf_counter()
        logits = model(inputs, use_cache=False).logits[0]
        if cuda:
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        nll += torch.nn.functional.cross_entropy(
            logits.float(), torch.tensor(ids, device=device), reduction="sum"
        ).item()
        tokens += len(ids)
    return {
        "nll": nll,
        "tokens": tokens,
        "ppl": math.exp(nll / tokens),
        "forward_s": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "peak_vram_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
    }


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def measure(path, options: dict, hf_kwargs: dict, sets: dict[str, SliceSet]) -> dict:
    """One row: load ``path`` through the engine with ``options``, score every slice of ``sets``
    (:func:`slice_sets`); the row's ``ppl`` and speed are the ``pydoc-a`` slice's (the
    ``lp_pydoc_heldout`` task's documents) when it is measured, else the first slice's."""
    t0 = time.perf_counter()
    model = lp_plugin.from_pretrained(path, **options, **hf_kwargs)
    handle = lp_plugin.get_handle(model)
    device = handle.main_device
    standby = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        standby = int(torch.cuda.memory_allocated(device))
    setup_s = time.perf_counter() - t0
    per_slice = {name: evaluate(model, *docs) for name, docs in sets.items()}
    result = per_slice.get("pydoc-a") or next(iter(per_slice.values()))
    info, forwards, skips = handle.info(), handle.stats["forwards"], handle.plan.skips
    stand_in_bytes = sum(s.nbytes for s in handle.stand_ins.values())
    handle.detach()
    _, layer_list = find_decoder_layers(model)
    skipped_bytes = sum(_bytes(layer_list[i]) for i in skips.layers)
    row = {
        "skipped": len(skips.layers),
        "layers": list(skips.layers),
        "ppl": result["ppl"],
        "nll": result["nll"],
        "tokens": result["tokens"],
        "tokens_per_second": result["tokens_per_second"],
        "standby_vram_bytes": standby,
        "peak_vram_bytes": result["peak_vram_bytes"],
        "bytes_per_forward": info["bytes_per_forward"],
        "bytes_moved_per_token": info["bytes_per_forward"] * forwards / result["tokens"],
        "stand_in_bytes": stand_in_bytes,
        "forward_weight_bytes": _bytes(model) - skipped_bytes + stand_in_bytes,
        "setup_s": setup_s,
        "skip_info": skips.info,
        "slices": {name: {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]} for name, r in per_slice.items()},
    }
    del model, handle
    gc.collect()
    return row


def prepare(path, hf_kwargs: dict, calib, stand_ins, max_count: int, log) -> None:
    """Run the greedy selections once for the largest count (each stand-in kind), so every row of the
    sweep reads its layers from the cache instead of measuring again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs).eval()
    for stand_in in stand_ins:
        t0 = time.perf_counter()
        result = lp_plugin.importance(model, calib, "greedy", stand_in=stand_in, steps=max_count)
        log(f"greedy ({stand_in}): removal order {list(result.order)} ({time.perf_counter() - t0:.0f} s)")
    del model
    gc.collect()


def run_sweep(
    path,
    *,
    fractions=FRACTIONS,
    selections=SELECTIONS,
    stand_ins=STAND_INS,
    calib=None,
    engine: dict | None = None,
    hf_kwargs: dict | None = None,
    heldout=(HELDOUT[0], HELDOUT[1], WINDOW),
    greedy_stand_ins=None,
    slices=tuple(domains.SLICES),
    log=print,
) -> dict:
    """Measure every (fraction, selection, stand-in) on the calibration slice and every slice of
    ``slices`` (:data:`domains.SLICES` names); returns the JSON-ready results, each row's
    ``worst_change`` the largest perplexity rise over those slices. ``greedy_stand_ins``
    (default: ``stand_ins``) limits the stand-in kinds of the ``greedy`` rows: greedy measures every
    candidate layer at every step, once per stand-in kind, which dominates the sweep's time."""
    from transformers import AutoConfig

    engine = dict(engine or {})
    hf_kwargs = dict(hf_kwargs or {})
    num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    counts = sorted({int(math.floor(f * num_layers / 100 + 0.5)) for f in fractions})
    greedy_stand_ins = list(stand_ins if greedy_stand_ins is None else greedy_stand_ins)
    if "greedy" in selections and max(counts) > 0:
        prepare(path, hf_kwargs, calib, greedy_stand_ins, max(counts), log)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
    sets = slice_sets(plain, slices, calib, heldout)
    del plain
    rows = []
    plan = [(0, None, "none")] + [
        (k, sel, si)
        for k in counts
        if k
        for sel in selections
        for si in (greedy_stand_ins if sel == "greedy" else stand_ins)
    ]
    for k, selection, stand_in in bar(plan, desc="sweep", unit="row", leave=True):
        skips = {"skip": f"{selection}:{k}", "stand_in": stand_in, "calib": calib} if k else {}
        options = dict(engine, **skips)
        row = {
            "fraction": round(100 * k / num_layers, 1),
            "selection": selection or "plain",
            "stand_in": stand_in,
            **measure(path, options, hf_kwargs, sets),
        }
        rows.append(row)
        log(
            f"{row['selection']:>8} {stand_in:>8} skip {k:2d}: "
            + "  ".join(f"{name} {r['ppl']:.3f}" for name, r in row["slices"].items())
            + f"  layers {row['layers']}"
        )
    base = rows[0]
    for row in rows:
        row["ppl_change"] = row["ppl"] / base["ppl"] - 1
        for name, r in row["slices"].items():
            r["change"] = r["ppl"] / base["slices"][name]["ppl"] - 1
        row["worst_slice"] = max(row["slices"], key=lambda name: row["slices"][name]["change"])
        row["worst_change"] = row["slices"][row["worst_slice"]]["change"]
        # what skipping gains over the plain row: forward speed and the standby VRAM it saves (None on the CPU)
        tps, base_tps = row["tokens_per_second"], base["tokens_per_second"]
        row["speedup_vs_plain"] = tps / base_tps if tps and base_tps else None
        standby, base_standby = row["standby_vram_bytes"], base["standby_vram_bytes"]
        row["standby_saved_bytes"] = None if standby is None or base_standby is None else base_standby - standby
    return {
        "model": str(path),
        "num_layers": num_layers,
        "engine": engine,
        "calib": calib or "mix",
        "heldout": {
            "start": heldout[0],
            "end": heldout[1],
            "window": heldout[2],
            "documents": len(sets["pydoc-a"][1]) if "pydoc-a" in sets else 0,
            "tokens": rows[0]["tokens"],
        },
        "slices": {
            name: {
                "documents": len(docs),
                "tokens": sum(len(d) for d in docs),
                "domain": domains.SLICES[name].domain if name in domains.SLICES else "calibration",
                "kind": domains.SLICES[name].kind if name in domains.SLICES else "calibration",
            }
            for name, (_, docs) in sets.items()
        },
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
    }
