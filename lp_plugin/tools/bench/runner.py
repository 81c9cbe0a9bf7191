"""One lp-bench run: the plain model is built once, then every config is put on -> measured ->
taken off, round-robin over the configs; round 0 is a discarded warm-up that also checks logits,
perplexity and tokens against the plain model's.

The warm-up round also feeds the plain model's first greedy tokens through every config's decode
steps (teacher forcing: a prompt prefilled into a KV cache, then one token a step), since a config can
equal the plain model in one forward over a sequence and still differ token by token.

The plain model is measured first in every round (``baseline``) and again last (``baseline:twin``),
so the run measures its own noise: how far two measurements of the same model drift apart within
one round, and whether the plain model's logits repeat. The gate (:mod:`lp_plugin.tools.bench.gate`)
derives its tolerances from those.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

from lp_plugin.core.devices import h2d_bandwidth
from lp_plugin.core.report import jsonable
from lp_plugin.tools.shapes import is_shape

from . import measure
from .apply import Placement, broken
from .derive import derive
from .setup import (
    BaseModel,
    decoder_layers,
    environment,
    layer_bytes,
    make_inputs,
    make_tokenizer,
    resolve_device,
    static_enabled,
)
from .stats import stat
from .storage import storage_read

SCHEMA = "lp-bench/3"  # 3: cold configs read every decode step from the storage; 2 read them from the page cache
DECODE_CHECK_TOKENS = 8  # the plain model's greedy tokens fed through the decode steps of every config
TIMED = (
    "setup_s",
    "standby_vram_bytes",
    "peak_vram_bytes",
    "prefill_tok_s",
    "decode_tok_s",
    "decode_step_tok_s",
    "generate_tok_s",
    "static_tok_s",
    "static_first_s",
    "leak_bytes",
)


class Run:
    """Everything one run shares: device, plain model, inputs and the plain model's reference figures."""

    def __init__(self, settings, configs, log):
        import torch

        self.settings, self.configs, self.log = settings, configs, log
        # the tokenizer first: a --tokenizer that cannot load is refused before any weights are built
        self.tokenizer, self.tok_info = make_tokenizer(settings.tokenizer, settings.model, is_shape(settings.model))
        self.threads_before = torch.get_num_threads()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = resolve_device(settings.device)
        self.static = static_enabled(settings.static, self.device)
        self.env = environment(self.device)
        log(f"lp-bench: building {settings.model} ({settings.dtype}) on {self.device}")
        t0 = time.perf_counter()
        need_ckpt = any((c.kind == "lp" and c.load == "pretrained") or c.kind == "airllm" for c in configs)
        try:
            self.base = BaseModel(settings, self.device, need_ckpt)
        except BaseException:
            torch.set_num_threads(self.threads_before)  # the caller's thread count, as close() gives it back
            raise
        self.build_s = time.perf_counter() - t0
        self.offload_root = settings.offload_dir or tempfile.mkdtemp(prefix="lp-bench-offload-")
        try:
            os.makedirs(self.offload_root, exist_ok=True)
            self.layers = decoder_layers(self.base.model)
            self.layer_sizes = [layer_bytes(layer) for layer in self.layers]
            self._make_inputs()
            self.bandwidth = self._bandwidth()
            self.storage = self._storage()
            self._reference()
        except BaseException:
            self.close()  # no temporary checkpoint or offload folder is left behind
            raise

    def _make_inputs(self):
        import torch

        from lp_plugin.planning.arch import text_config

        s = self.settings
        self.vocab = int(text_config(self.base.model.config).vocab_size)
        tok = self.tokenizer
        if self.tok_info.get("note"):
            self.log(f"lp-bench: {self.tok_info['note']}")
        if tok is not None:
            self.base.add_tokenizer(tok)
        self.inputs = make_inputs(tok, self.vocab, s.prompt, s.prefill, s.ppl_tokens)
        if self.inputs["note"]:
            self.tok_info["note"] = "; ".join(filter(None, [self.tok_info.get("note"), self.inputs["note"]]))
        as_ids = lambda xs: torch.tensor([xs], dtype=torch.long, device=self.device)  # noqa: E731
        self.ids = {k: as_ids(self.inputs[k]) for k in ("prompt", "prefill", "ppl")}

    def _bandwidth(self) -> dict:
        s = self.settings
        out: dict[str, dict | None] = {"pinned": None, "pageable": None}
        if self.device.type == "cuda":
            self.log("lp-bench: measuring host-to-device bandwidth (pinned, pageable)")
            for kind in out:
                out[kind] = h2d_bandwidth(self.device, s.bandwidth_bytes, kind == "pinned", s.bandwidth_iters)
        return out

    def _storage(self) -> dict | None:
        """The read speed of the storage under the offload folder, where a cold-cache config will be judged
        against it."""
        if not any(c.cold for c in self.configs):
            return None
        self.log(f"lp-bench: measuring the storage's read speed under {self.offload_root}")
        return storage_read(self.offload_root, self.settings.bandwidth_bytes, self.settings.bandwidth_iters)

    def _reference(self):
        """The plain model's figures before any config touches it (also a global warm-up)."""
        self.log("lp-bench: reference logits, perplexity and greedy tokens of the plain model")
        model, ids = self.base.model, self.ids
        self.ref_logits = measure.logits_of(model, ids["prompt"])
        self.ref_argmax = self.ref_logits.argmax(-1)
        self.ref_ppl = measure.perplexity(model, ids["ppl"])
        self.max_new = max([self.settings.new] + [c.new or 0 for c in self.configs])
        self.ref_tokens = measure.bare_decode(model, ids["prompt"], self.max_new, self.device)["tokens"]
        self.forced_tokens = self.ref_tokens[:DECODE_CHECK_TOKENS]
        self.ref_decode_logits = measure.forced_decode_logits(model, ids["prompt"], self.forced_tokens)
        self.ref_static = None
        if self.static:
            self.log("lp-bench: the plain model's static-cache generate (the reference of the static columns)")
            self.ref_static = measure.static_runs(model, ids["prompt"], self.max_new, self.device)
        self.base_allocated = measure.allocated(self.device)

    def close(self):
        import torch

        if not self.settings.offload_dir:
            shutil.rmtree(self.offload_root, ignore_errors=True)
        self.base.close()
        torch.set_num_threads(self.threads_before)


def run_bench(settings, configs: list, log=None, on_round=None) -> dict:
    """Measure every config; return the results dict (the JSON lp-bench writes). ``on_round`` is given the
    results so far (``complete`` False, ``rounds_done``) once the run is set up and after every timed round but
    the last: a run stopped early keeps what it measured, and never leaves an older run's file looking like its own."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    with _hf_progress(settings.progress):
        return _run_bench(settings, configs, log, on_round)


@contextlib.contextmanager
def _hf_progress(enabled: bool):
    """transformers' own progress bars (loading and saving weights) follow ``--no-progress`` too."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _run_bench(settings, configs, log, on_round=None) -> dict:
    from tqdm.auto import tqdm

    started = time.time()
    run = Run(settings, configs, log)
    bar = None
    try:
        results = {c.name: _empty_result(c) for c in configs}
        places = {c.name: Placement(run.base, c, run.offload_root, settings.dtype) for c in configs}
        for c in configs:
            results[c.name]["not_applicable"] = places[c.name].not_applicable()
        rounds = settings.repeats + 1
        bar = tqdm(
            total=rounds * len(configs),
            desc="lp-bench",
            unit="run",
            disable=not settings.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        if on_round is not None:  # from here on the results file is this run's, even if it stops before a round ends
            on_round(_results(run, configs, copy.deepcopy(results), started, 0))
        for r in range(rounds):
            for cfg in configs:
                bar.set_description(f"{'warm-up' if r == 0 else f'round {r}/{settings.repeats}'} {cfg.name}")
                _measure_safely(run, places[cfg.name], results, r, bar)
                bar.update(1)
            if not settings.progress:  # no bar: one line a round, so a log shows the run is alive
                what = "warm-up" if r == 0 else f"round {r}/{settings.repeats}"
                log(f"lp-bench: {what} done ({time.time() - started:.0f} s)")
            if on_round is not None and 0 < r < settings.repeats:
                on_round(_results(run, configs, copy.deepcopy(results), started, r))
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return _results(run, configs, results, started, settings.repeats)


def _results(run, configs, results, started, rounds_done) -> dict:
    """The results dict of ``rounds_done`` timed rounds (``results`` is turned into its summary)."""
    for cfg in configs:
        _finish_result(results[cfg.name], run)
    out = _output(run, configs, results)
    out["rounds_done"], out["complete"] = rounds_done, rounds_done == run.settings.repeats
    derive(out)
    out["wall_s"] = time.time() - started
    return out


def _measure_safely(run, place, results, r, bar) -> None:
    """Measure one config once; a failure is recorded and the run goes on (unless the plain model
    was left broken, which ends every config)."""
    res = results[place.cfg.name]
    if res["error"] is not None or res["not_applicable"]:
        return
    try:
        measure_once(run, place, res, r, lambda p: bar.set_postfix_str(p, refresh=True))
    except Exception as exc:  # noqa: BLE001 - record, keep the other configs going
        res["error"] = f"{type(exc).__name__}: {exc}".strip()
        res["traceback"] = traceback.format_exc()
        run.log(
            f"\nlp-bench: config {place.cfg.name!r} failed in {'warm-up' if r == 0 else f'round {r}'}: {res['error']}"
        )
        with contextlib.suppress(Exception):
            place.take_off()
        why = broken(run.base.model, run.device)
        if why:
            run.log(
                f"lp-bench: the plain model is not intact after {place.cfg.name!r} failed ({why}); skipping the rest"
            )
            for other in results.values():
                if other["error"] is None:
                    other["error"] = f"skipped: the plain model was left broken by {place.cfg.name!r} ({why})"


def first_line(exc) -> str:
    """``Type: first line of the message`` (compiler errors run to pages)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _empty_result(cfg) -> dict:
    out = {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "error": None,
        "traceback": None,
        "not_applicable": None,
        "layers": None,
        "offloaded_bytes": None,
        "skipped_bytes": None,
        "bytes_per_forward": None,
        "layer_bytes": None,
        "info": None,
        "max_abs_logit_diff": None,
        "logits_equal": None,
        "argmax_agreement": None,
        "decode_logits_equal": None,
        "max_abs_decode_logit_diff": None,
        "perplexity": None,
        "decode_tokens_agree": None,
        "generate_tokens_agree": None,
        "static_tokens_agree": None,
        "static_compiled": None,
        "static_error": None,
    }
    out.update({key: [] for key in TIMED})
    return out


def _correctness(run, place, res) -> None:
    """Warm-up round only (not timed): logits of a plain forward, logits of the decode steps fed the plain
    model's greedy tokens, and perplexity, against the plain model's."""
    import torch

    logits = measure.logits_of(place.model, run.ids["prompt"])  # a plain forward, as a user would call it
    res["logits_equal"] = bool(torch.equal(logits, run.ref_logits))
    res["max_abs_logit_diff"] = float((logits.float() - run.ref_logits.float()).abs().max())
    res["argmax_agreement"] = float((logits.argmax(-1) == run.ref_argmax).float().mean())
    with place.inference():
        res["perplexity"] = measure.perplexity(place.model, run.ids["ppl"])
        decode = measure.forced_decode_logits(place.model, run.ids["prompt"], run.forced_tokens)
    res["decode_logits_equal"] = bool(torch.equal(decode, run.ref_decode_logits))
    res["max_abs_decode_logit_diff"] = measure.max_abs_diff(decode, run.ref_decode_logits)


def _timed(run, place, res, new, phase) -> dict:
    """Prefill, bare decode, generate (and the static-cache generate) of the config that is on."""
    device, ids, model = run.device, run.ids, place.model
    got = {}
    with place.inference():
        phase("prefill")
        place.drop_page_cache()
        got["prefill_tok_s"] = measure.prefill_run(model, ids["prefill"], device)
        phase("decode")
        # a cold-cache config has no warm-up steps, and every timed step reads its layers from the storage:
        # the page cache is dropped before each step (untimed; the prompt before them reads what is cached)
        warm = 0 if place.cfg.cold or place.cfg.bare_only else measure.DECODE_WARM_STEPS
        drop = place.drop_page_cache if place.cfg.cold else None
        dec = measure.bare_decode(model, ids["prompt"], new, device, warm, before_step=drop)
        got.update(decode_tok_s=dec["tok_s"], decode_step_tok_s=dec["step_tok_s"], decode_tokens=dec["tokens"])
    if place.cfg.bare_only:
        return got
    phase("generate")
    place.drop_page_cache()
    got["generate_tok_s"], got["generate_tokens"] = measure.generate_run(model, ids["prompt"], new, device)
    if run.static and res["static_error"] is None:
        phase("static cache")
        place.drop_page_cache()
        try:
            st = measure.static_runs(model, ids["prompt"], new, device)
        except Exception as exc:  # noqa: BLE001 - a config that cannot generate with a static cache keeps its other figures
            res["static_error"] = first_line(exc)
            run.log(f"\nlp-bench: {place.cfg.name!r}: static-cache generate failed: {res['static_error']}")
        else:
            got.update(static_tok_s=st["tok_s"], static_first_s=st["first_s"], static_tokens=st["tokens"])
            res["static_compiled"] = (
                st["compiled"] if res["static_compiled"] is None else res["static_compiled"] and st["compiled"]
            )
    return got


def measure_once(run, place, res, r, phase) -> None:
    import torch

    device, cuda = run.device, run.device.type == "cuda"
    before = measure.allocated(device)
    phase("set up")
    t0 = time.perf_counter()
    place.put_on()
    measure.sync(device)
    setup_s = time.perf_counter() - t0
    other = place.other_bytes
    now = measure.allocated(device)
    standby = None if now is None else now - other
    if res["info"] is None:
        res["info"] = jsonable(place.info)
    if r == 0:
        phase("logits")
        _correctness(run, place, res)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    got = _timed(run, place, res, place.cfg.new or run.settings.new, phase)
    peak = int(torch.cuda.max_memory_allocated(device)) - other if cuda else None
    phase("take off")
    place.take_off()
    after = measure.allocated(device)
    # tokens against the plain model's, every round (the lowest agreement is kept): a take-off that
    # does not restore the weights exactly shows up in the next round
    for key, ref in (
        ("decode", run.ref_tokens),
        ("generate", run.ref_tokens),
        ("static", run.ref_static["tokens"] if run.ref_static else None),
    ):
        if f"{key}_tokens" in got:
            a = measure.agreement(got[f"{key}_tokens"], ref)  # generate's first new token is the loop's toks[0]
            res[f"{key}_tokens_agree"] = (
                a if res[f"{key}_tokens_agree"] is None or a is None else min(res[f"{key}_tokens_agree"], a)
            )
    if r == 0:
        return
    figures = dict(
        setup_s=setup_s,
        standby_vram_bytes=standby,
        peak_vram_bytes=peak,
        leak_bytes=None if before is None else after - before,
    )
    figures.update({k: v for k, v in got.items() if not k.endswith("_tokens")})
    for key, value in figures.items():
        res[key].append(value)


def _finish_result(res, run) -> None:
    info = res["info"] or {}
    layers = info.get("layers")
    res["layers"] = list(layers) if layers is not None else None
    res["offloaded_bytes"] = info.get("offloaded_bytes")
    # the plain model's bytes of the skipped layers the measured model does not hold (never loaded, or freed)
    absent = [i for i in info.get("skipped_without_weights") or [] if i < len(run.layer_sizes)]
    res["skipped_bytes"] = sum(run.layer_sizes[i] for i in absent) if absent else None
    bpf = info.get("bytes_per_forward")
    res["bytes_per_forward"] = int(bpf) if isinstance(bpf, (int, float)) else None
    if isinstance(info.get("layer_bytes"), (int, float)) and info["layer_bytes"]:
        res["layer_bytes"] = info["layer_bytes"]  # the engine's largest offloaded layer
    elif res["layers"]:
        res["layer_bytes"] = max(run.layer_sizes[i] for i in res["layers"] if i < len(run.layer_sizes))
    for key in TIMED:
        res[key] = stat(res[key])
    pinned = run.bandwidth["pinned"]
    res["transfer_bound_tok_s"] = res["prefill_transfer_bound_tok_s"] = None
    if pinned and res["bytes_per_forward"]:
        res["transfer_bound_tok_s"] = pinned["gbps"] * 1e9 / res["bytes_per_forward"]
        res["prefill_transfer_bound_tok_s"] = run.settings.prefill * res["transfer_bound_tok_s"]
    # a cold-cache config reads its bytes from the storage: the bound is its read speed (or the PCIe bound, if lower)
    res["storage_bound_tok_s"] = res["prefill_storage_bound_tok_s"] = None
    storage = (run.storage or {}).get("gbps")
    if res["config"].get("cold") and storage and res["bytes_per_forward"]:
        gbps = min(storage, pinned["gbps"]) if pinned else storage
        res["storage_bound_tok_s"] = gbps * 1e9 / res["bytes_per_forward"]
        res["prefill_storage_bound_tok_s"] = run.settings.prefill * res["storage_bound_tok_s"]
    if res["perplexity"] is not None and not math.isfinite(res["perplexity"]):
        res["perplexity"] = None
    if res["max_abs_decode_logit_diff"] is not None and not math.isfinite(res["max_abs_decode_logit_diff"]):
        # strict JSON has no Infinity: logits not finite where the plain model's are (or the reverse)
        # read as decode_logits_equal False with no difference to give
        res["max_abs_decode_logit_diff"] = None


def _output(run, configs, results) -> dict:
    s, model = run.settings, run.base.model
    static_note = None
    if run.static and run.device.type != "cuda":
        static_note = "CPU: transformers compiles the static-cache path on CUDA only, so these runs are uncompiled"
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": None,
        "settings": dict(
            s.to_dict(),
            device=str(run.device),
            configs=[c.name for c in configs],
            warmup_rounds=1,
            interleaved=True,
            decode_loop=(
                "model(input_ids, cache=DynamicCache, use_cache=True) + argmax, timed between synchronizes "
                f"with gc off, after {measure.DECODE_WARM_STEPS} untimed steps (cold-cache configs: none, and the "
                "page cache dropped before every step, untimed)"
            ),
            decode_check=(
                f"teacher forcing: the logits that predict the plain model's first {len(run.forced_tokens)} "
                "greedy tokens, from the prompt prefilled into a DynamicCache and then those tokens fed one a "
                "step (in lp_plugin.session for lp configs), compared with the plain model's"
            ),
            generate=(
                "model.generate(greedy, min_new_tokens=max_new_tokens=new), called as a user would (opens its "
                "own session); tok/s include the prompt prefill"
            ),
            static={
                "measured": run.static,
                "compiled_by_transformers": run.device.type == "cuda" if run.static else None,
                "call": 'model.generate(..., cache_implementation="static"); on CUDA one untimed call compiles first',
                "note": static_note,
            },
        ),
        "env": run.env,
        "model": {
            "name": s.model,
            "kind": run.base.kind,
            "architecture": type(model).__name__,
            "dtype": s.dtype,
            "num_layers": len(run.layers),
            "hidden_size": getattr(model.config, "hidden_size", None),
            "vocab_size": run.vocab,
            "param_bytes": int(model.get_memory_footprint()),
            "layer_bytes": max(run.layer_sizes) if run.layer_sizes else None,
            "build_s": run.build_s,
            "allocated_bytes": run.base_allocated,
        },
        "inputs": {
            "tokenizer": run.tok_info,
            "text": "pydoc_data.topics (CPython), sorted topics joined by blank lines",
            "prompt_tokens": len(run.inputs["prompt"]),
            "prefill_tokens": len(run.inputs["prefill"]),
            "ppl_tokens": len(run.inputs["ppl"]),
            "ppl_ids_sha256": run.inputs["ppl_ids_sha256"],
            "prompt_ids_sha256": run.inputs["prompt_ids_sha256"],
        },
        "reference": {
            "perplexity": run.ref_ppl,
            "static_tok_s": run.ref_static["tok_s"] if run.ref_static else None,
            "static_compiled": run.ref_static["compiled"] if run.ref_static else None,
        },
        "bandwidth": {
            "pinned_h2d_gbps": run.bandwidth["pinned"]["gbps"] if run.bandwidth["pinned"] else None,
            "pageable_h2d_gbps": run.bandwidth["pageable"]["gbps"] if run.bandwidth["pageable"] else None,
            **run.bandwidth,
            "note": None if run.device.type == "cuda" else "no CUDA device: bandwidth and transfer bounds skipped",
            "storage_read": run.storage,
        },
        "configs": [results[c.name] for c in configs],
    }
