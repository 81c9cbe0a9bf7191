"""The measuring part of lp-bench: one base model, every config attached -> measured -> detached in
round-robin, round 0 a discarded warm-up (which also checks logits and perplexity).

Everything here imports torch lazily (inside functions) so ``lp-bench --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

SCHEMA = "lp-bench/1"
GIB = 1024 ** 3


@dataclass
class BenchSettings:
    model: str
    dtype: str = "bf16"
    device: str | None = None
    prompt: int = 100
    new: int = 64
    prefill: int = 512
    ppl_tokens: int = 512
    repeats: int = 3
    seed: int = 0
    tokenizer: str = "auto"  # auto | none | PATH
    offload_dir: str | None = None
    bandwidth_bytes: int = GIB
    bandwidth_iters: int = 3
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


# ----------------------------------------------------------------------------- small helpers
def stat(values) -> dict | None:
    """median/min/max of the timed runs (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_cuda(device) -> bool:
    return device.type == "cuda"


def _allocated(device):
    import torch

    if not _is_cuda(device):
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(device))


def _module_bytes(module) -> int:
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax and friends
        if qs is not None:
            for name in ("absmax", "code"):
                v = getattr(qs, name, None)
                if v is not None and hasattr(v, "numel"):
                    total += v.numel() * v.element_size()
            nested = getattr(qs, "state2", None)
            if nested is not None and getattr(nested, "absmax", None) is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def _decoder_layers(model):
    try:
        from lp_plugin.arch import find_decoder_layers

        return find_decoder_layers(model)[1]
    except ImportError:  # pragma: no cover - arch.py is part of the engine
        return model.model.layers


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        try:
            mod = __import__(name)
            return getattr(mod, "__version__", None)
        except Exception:
            return None


def environment(device) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _dist_version("transformers"),
        "accelerate": _dist_version("accelerate"),
        "bitsandbytes": _dist_version("bitsandbytes"),
        "lp_plugin": _lp_version(),
        "device": str(device),
        "gpu_name": None,
        "gpu_total_memory_bytes": None,
        "gpu_capability": None,
    }
    if _is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_total_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def _lp_version():
    try:
        import lp_plugin

        return lp_plugin.__version__
    except Exception:  # pragma: no cover
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ----------------------------------------------------------------------------- model and inputs
def resolve_device(name):
    import torch

    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def load_model(name: str, dtype: str, device, seed: int):
    """A shape name builds seeded random weights on the device; anything else goes to from_pretrained."""
    import torch
    from lp_plugin import shapes

    if shapes.is_shape(name):
        if dtype == "nf4":
            return shapes.build_shape_model_nf4(name, device, seed), "shape"
        return shapes.build_shape_model(name, dtype, device, seed), "shape"
    from transformers import AutoModelForCausalLM

    device_map = {"": device.index if _is_cuda(device) else "cpu"}
    kwargs = {}
    if dtype == "nf4":
        from lp_plugin.quant import nf4_config

        kwargs["quantization_config"] = nf4_config(torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = shapes._resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(name, device_map=device_map, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model, "pretrained"


def fixed_text(max_chars: int = 200_000) -> str:
    """A fixed English text shipped with CPython (the pydoc topics), for perplexity and prompts."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def bundled_model_path(timeout: float = 180.0):
    """``python -m lp_plugin bundled-model`` (converts once, prints the folder); None if unavailable."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lp_plugin", "bundled-model"],
            capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, "python -m lp_plugin bundled-model did not finish"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines or not os.path.isdir(lines[-1].strip()):
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"python -m lp_plugin bundled-model failed: {why}"
    return lines[-1].strip(), None


def make_tokenizer(choice: str, model_name: str, is_shape: bool):
    """Return ``(tokenizer or None, info dict)``."""
    info = {"choice": choice, "source": None, "note": None}
    if choice == "none":
        info["note"] = "no tokenizer (--tokenizer none): token ids are the UTF-8 bytes of the fixed text"
        return None, info
    from transformers import AutoTokenizer

    candidates = []
    if choice != "auto":
        candidates.append(choice)
    elif not is_shape:
        candidates.append(model_name)
    notes = []
    for cand in candidates:
        try:
            tok = AutoTokenizer.from_pretrained(cand)
            info["source"] = cand
            return tok, info
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next source
            notes.append(f"tokenizer of {cand!r} not loadable ({type(exc).__name__})")
    if choice == "auto":
        path, why = bundled_model_path()
        if path is not None:
            try:
                tok = AutoTokenizer.from_pretrained(path)
                info["source"] = f"bundled model ({path})"
                return tok, info
            except Exception as exc:  # noqa: BLE001
                notes.append(f"bundled model tokenizer not loadable ({type(exc).__name__})")
        else:
            notes.append(why)
    notes.append("token ids are the UTF-8 bytes of the fixed text")
    info["note"] = "; ".join(notes)
    return None, info


def make_inputs(tokenizer, vocab_size: int, prompt: int, prefill: int, ppl_tokens: int) -> dict:
    """Token id lists (plain Python ints) for the prompt, the prefill and the perplexity text."""
    text = fixed_text()
    if tokenizer is None:
        ids = list(text.encode("utf-8"))
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    note = None
    if max(ids) >= vocab_size:
        ids = [i % vocab_size for i in ids]
        note = f"token ids folded modulo the model's vocab_size {vocab_size}"
    need = max(prompt, prefill) + ppl_tokens
    if len(ids) < need:
        raise RuntimeError(f"fixed text gives {len(ids)} tokens, fewer than the {need} needed")
    half = len(ids) // 2
    out = {
        "prompt": ids[:prompt],
        "prefill": ids[:prefill],
        "ppl": ids[half:half + ppl_tokens],
        "note": note,
    }
    out["ppl_ids_sha256"] = hashlib.sha256(",".join(map(str, out["ppl"])).encode()).hexdigest()
    out["prompt_ids_sha256"] = hashlib.sha256(",".join(map(str, out["prompt"])).encode()).hexdigest()
    return out


# ----------------------------------------------------------------------------- bandwidth
def h2d_bandwidth(device, nbytes: int, pinned: bool, iters: int = 3) -> dict | None:
    """Host-to-device copy bandwidth in GB/s (1e9 bytes/s) of one ``nbytes`` copy, median of ``iters``."""
    import torch

    if not _is_cuda(device):
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch every page
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    try:
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        del src, dst
        torch.cuda.empty_cache()
    rates = [nbytes / t / 1e9 for t in times]
    return {"gbps": statistics.median(rates), "min": min(rates), "max": max(rates), "bytes": nbytes}


# ----------------------------------------------------------------------------- configs in action
class _Setup:
    """Puts one config on the base model and takes it off again."""

    def __init__(self, model, cfg, device, offload_root: str):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.offload_root = offload_root
        self.handle = None
        self.acc_layers = ()
        self.hf_device_map = None
        self.info = {}

    @property
    def folder(self):
        return os.path.join(self.offload_root, self.cfg.key)

    def attach(self) -> None:
        cfg = self.cfg
        if cfg.kind == "baseline":
            self.info = {"layers": [], "bytes_per_forward": 0}
        elif cfg.kind == "lp":
            import lp_plugin

            os.makedirs(self.folder, exist_ok=True)
            self.handle = lp_plugin.attach(
                self.model, offload=cfg.spec, tier=cfg.tier, mode=cfg.mode, alpha=cfg.alpha,
                offload_folder=self.folder if cfg.tier != "cpu" else None, prefetch=cfg.prefetch,
            )
            self.info = dict(self.handle.info())
        elif cfg.kind == "accelerate_cpu":
            self._attach_accelerate()
        else:  # pragma: no cover
            raise ValueError(cfg.kind)

    def _attach_accelerate(self) -> None:
        from accelerate import dispatch_model
        from lp_plugin.plan import resolve_layers

        if any(type(p).__name__ == "Params4bit" for p in self.model.parameters()):
            # measured: dispatch_model dies half-way (bitsandbytes QuantState on meta: "Tensor.item()
            # cannot be called on meta tensors") and leaves the model unusable; refuse up front
            raise NotImplementedError(
                "Accelerate's cpu offload (dispatch_model) cannot offload bitsandbytes 4-bit layers; "
                "accelerate_cpu is measured for bf16/fp16/fp32 only"
            )
        layers = _decoder_layers(self.model)
        idx = resolve_layers(self.cfg.spec, len(layers))
        main = self.device.index if _is_cuda(self.device) else "cpu"
        try:
            from lp_plugin import residual_offload_device_map
        except (ImportError, AttributeError):  # pragma: no cover - devicemap.py is part of the engine
            residual_offload_device_map = None
        if residual_offload_device_map is not None:
            device_map = residual_offload_device_map(self.model, offload=self.cfg.spec, tier="cpu", main_device=main)
        else:  # pragma: no cover
            device_map = {"model.embed_tokens": main, "model.norm": main, "model.rotary_emb": main, "lm_head": main}
            device_map.update({f"model.layers.{i}": ("cpu" if i in idx else main) for i in range(len(layers))})
        layer_bytes = [_module_bytes(layers[i]) for i in idx]
        self.hf_device_map = getattr(self.model, "hf_device_map", None)
        # Accelerate keeps "cpu" weights where they are: put them in (pageable) host memory first,
        # the way a user who loads with this device_map gets them.
        for i in idx:
            layers[i].to("cpu")
        self.acc_layers = tuple(idx)
        dispatch_model(self.model, device_map=device_map, main_device=main)
        self.info = {
            "layers": list(idx),
            "offloaded_bytes": sum(layer_bytes),
            "bytes_per_forward": sum(layer_bytes) if _is_cuda(self.device) else 0,
            "main_device": str(self.device),
        }

    def detach(self) -> None:
        if self.cfg.kind == "lp" and self.handle is not None:
            self.handle.detach()
            self.handle = None
        elif self.cfg.kind == "accelerate_cpu":
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(self.model, recurse=True)
            layers = _decoder_layers(self.model)
            for i in self.acc_layers:
                layers[i].to(self.device)
            if self.hf_device_map is not None:
                self.model.hf_device_map = self.hf_device_map
            elif hasattr(self.model, "hf_device_map"):
                del self.model.hf_device_map
            self.acc_layers = ()
        bad = [n for n, p in self.model.named_parameters() if p.device != self.device]
        if bad:
            raise RuntimeError(
                f"after detaching {self.cfg.name!r} {len(bad)} parameter(s) are not back on {self.device}: "
                f"{bad[:3]} on {self.model.get_parameter(bad[0]).device}"
            )

    def inference(self):
        """The context a user runs a bare loop in: ``lp_plugin.session`` (offloaded layers resident
        in session mode; the GPU ring kept across forwards, with prefetch wrapping into the next
        step, in stream mode). ``generate()`` opens one by itself."""
        if self.cfg.kind == "lp":
            import lp_plugin

            return lp_plugin.session(self.model)
        return contextlib.nullcontext()

    def drop_page_cache(self) -> None:
        """Evict the offload files from the page cache (cold-cache figures for the disk tier)."""
        if not self.cfg.cold or not os.path.isdir(self.folder):
            return
        tier = getattr(self.handle, "tier", None)
        if hasattr(tier, "drop_page_cache"):
            tier.drop_page_cache()  # also unmaps the pages it has mapped (else they stay cached)
            return
        for root, _dirs, files in os.walk(self.folder):
            for f in files:
                path = os.path.join(root, f)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except (OSError, AttributeError):
                    pass
                finally:
                    os.close(fd)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()


@contextlib.contextmanager
def _no_gc():
    """Collect garbage now and keep the collector off while timing (as ``timeit`` does): a
    collection in a launch-bound decode loop shows up as a slow step."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prefill_run(model, ids, device) -> float:
    """tokens/s of one forward over ``ids`` (batch 1) with a fresh KV cache, last logits only."""
    import torch

    with torch.no_grad():
        cache = _new_cache(model)
        with _no_gc():
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _sync(device)
            dt = time.perf_counter() - t0
    return ids.shape[1] / dt


DECODE_WARM_STEPS = 4


def bare_decode(model, prompt_ids, new: int, device, warm_steps: int = DECODE_WARM_STEPS):
    """The one bare greedy loop used for every config: prefill the prompt into a DynamicCache and
    run ``warm_steps`` single-token steps (not timed: on a GPU the first steps after other work run
    slow while clocks and caches settle), then ``new`` single-token forwards with argmax, timed
    between two synchronizes with the garbage collector off.
    Returns ``(tokens/s, generated token ids: the warm-up ones first)``."""
    import torch

    def step(tok):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        cache = _new_cache(model)
        out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        toks = [tok]
        for _ in range(warm_steps):
            tok = step(tok)
            toks.append(tok)
        with _no_gc():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(new):
                tok = step(tok)
                toks.append(tok)
            _sync(device)
            dt = time.perf_counter() - t0
    return new / dt, torch.cat(toks, dim=1)[0].tolist()


def generate_run(model, prompt_ids, new: int, device):
    """tokens/s of ``model.generate`` (greedy, exactly ``new`` new tokens, prompt prefill included)."""
    import torch

    mask = torch.ones_like(prompt_ids)
    pad = model.config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else 0
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, num_beams=1, pad_token_id=pad if pad is not None else 0,
    )
    _sync(device)
    dt = time.perf_counter() - t0
    gen = out[0, prompt_ids.shape[1]:].tolist()
    return len(gen) / dt, gen


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.detach().to("cpu")


def perplexity(model, ids) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        loss = F.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(loss))


def _agree(a, b) -> float | None:
    if not a or not b:
        return None
    n = min(len(a), len(b))
    return sum(int(x == y) for x, y in zip(a[:n], b[:n])) / n


# ----------------------------------------------------------------------------- the run
def run_bench(settings: BenchSettings, configs: list, log=None) -> dict:
    """Measure every config; return the results dict (the JSON lp-bench writes)."""
    import torch
    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = resolve_device(settings.device)
    started = time.time()
    env = environment(device)

    log(f"lp-bench: building {settings.model} ({settings.dtype}) on {device}")
    t0 = time.perf_counter()
    model, model_kind = load_model(settings.model, settings.dtype, device, settings.seed)
    build_s = time.perf_counter() - t0
    layers = _decoder_layers(model)
    cfg_text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(cfg_text.vocab_size)

    tokenizer, tok_info = make_tokenizer(settings.tokenizer, settings.model, model_kind == "shape")
    if tok_info.get("note"):
        log(f"lp-bench: {tok_info['note']}")
    inputs = make_inputs(tokenizer, vocab, settings.prompt, settings.prefill, settings.ppl_tokens)
    if inputs["note"]:
        tok_info["note"] = "; ".join(filter(None, [tok_info.get("note"), inputs["note"]]))
    as_ids = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    prompt_ids, prefill_ids, ppl_ids = as_ids(inputs["prompt"]), as_ids(inputs["prefill"]), as_ids(inputs["ppl"])

    bandwidth = {"pinned": None, "pageable": None}
    if _is_cuda(device):
        log("lp-bench: measuring host-to-device bandwidth (pinned, pageable)")
        bandwidth["pinned"] = h2d_bandwidth(device, settings.bandwidth_bytes, True, settings.bandwidth_iters)
        bandwidth["pageable"] = h2d_bandwidth(device, settings.bandwidth_bytes, False, settings.bandwidth_iters)
    pinned_bps = bandwidth["pinned"]["gbps"] * 1e9 if bandwidth["pinned"] else None

    # reference figures of the plain model, before any config touches it (also a global warm-up)
    log("lp-bench: reference logits, perplexity and greedy tokens of the plain model")
    ref_logits = logits_of(model, prompt_ids)
    ref_argmax = ref_logits.argmax(-1)
    ref_ppl = perplexity(model, ppl_ids)
    max_new = max([settings.new] + [c.new or 0 for c in configs])
    _, ref_tokens = bare_decode(model, prompt_ids, max_new, device)
    base_allocated = _allocated(device)
    layer_sizes = [_module_bytes(layer) for layer in layers]

    own_root = settings.offload_dir is None
    offload_root = settings.offload_dir or tempfile.mkdtemp(prefix="lp-bench-offload-")
    os.makedirs(offload_root, exist_ok=True)

    results = {c.name: _empty_result(c) for c in configs}
    setups = {c.name: _Setup(model, c, device, offload_root) for c in configs}
    rounds = settings.repeats + 1
    bar = tqdm(total=rounds * len(configs), desc="lp-bench", unit="run", disable=not settings.progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for r in range(rounds):
            for cfg in configs:
                res, st = results[cfg.name], setups[cfg.name]
                bar.set_description(f"{'warm-up' if r == 0 else f'round {r}/{settings.repeats}'} {cfg.name}")
                if res["error"] is None:
                    try:
                        _measure_once(model, cfg, st, res, r, device, prompt_ids, prefill_ids, ppl_ids,
                                      settings, ref_logits, ref_argmax, ref_tokens, bar)
                    except Exception as exc:  # noqa: BLE001 - record, keep the other configs going
                        res["error"] = f"{type(exc).__name__}: {exc}"
                        res["traceback"] = traceback.format_exc()
                        log(f"\nlp-bench: config {cfg.name!r} failed in {'warm-up' if r == 0 else f'round {r}'}: {res['error']}")
                        with contextlib.suppress(Exception):
                            st.detach()
                        broken = _broken(model, device)
                        if broken:
                            log(f"lp-bench: the model is not intact after {cfg.name!r} failed ({broken}); "
                                "skipping the remaining configs")
                            for other in configs:
                                if results[other.name]["error"] is None:
                                    results[other.name]["error"] = f"skipped: the model was left broken by {cfg.name!r} ({broken})"
                bar.update(1)
    finally:
        bar.close()
        if own_root:
            shutil.rmtree(offload_root, ignore_errors=True)

    for cfg in configs:
        _finish_result(results[cfg.name], cfg, settings, pinned_bps, layer_sizes, len(layers))

    out = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": None,
        "settings": dict(settings.to_dict(), device=str(device), configs=[c.name for c in configs],
                         decode_loop=("model(input_ids, past_key_values=DynamicCache, use_cache=True) + argmax, timed between cuda "
                                      f"synchronizes with gc off, after {DECODE_WARM_STEPS} untimed steps (none for cold-cache configs)"),
                         generate="model.generate(greedy, min_new_tokens=max_new_tokens=new), called as a user would (opens its own session); tok/s include the prompt prefill",
                         warmup_rounds=1, interleaved=True),
        "env": env,
        "model": {
            "name": settings.model,
            "kind": model_kind,
            "architecture": type(model).__name__,
            "dtype": settings.dtype,
            "num_layers": len(layers),
            "hidden_size": getattr(cfg_text, "hidden_size", None),
            "vocab_size": vocab,
            "param_bytes": _module_bytes(model),
            "layer_bytes": statistics.median(layer_sizes) if layer_sizes else None,
            "build_s": build_s,
            "allocated_bytes": base_allocated,
        },
        "inputs": {
            "tokenizer": tok_info,
            "text": "pydoc_data.topics (CPython), sorted topics joined by blank lines",
            "prompt_tokens": len(inputs["prompt"]),
            "prefill_tokens": len(inputs["prefill"]),
            "ppl_tokens": len(inputs["ppl"]),
            "ppl_ids_sha256": inputs["ppl_ids_sha256"],
            "prompt_ids_sha256": inputs["prompt_ids_sha256"],
        },
        "reference": {"perplexity": ref_ppl},
        "bandwidth": {
            "pinned_h2d_gbps": bandwidth["pinned"]["gbps"] if bandwidth["pinned"] else None,
            "pageable_h2d_gbps": bandwidth["pageable"]["gbps"] if bandwidth["pageable"] else None,
            "pinned": bandwidth["pinned"],
            "pageable": bandwidth["pageable"],
            "note": None if _is_cuda(device) else "no CUDA device: bandwidth and transfer bounds skipped",
        },
        "configs": [results[c.name] for c in configs],
    }
    from .report import derive

    derive(out)
    out["wall_s"] = time.time() - started
    return out


def _broken(model, device):
    """A reason if some parameter is not on the main device any more, else None."""
    for name, p in model.named_parameters():
        if p.device != device:
            return f"{name} is on {p.device}"
    return None


def _empty_result(cfg) -> dict:
    return {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "error": None,
        "traceback": None,
        "layers": None,
        "offloaded_bytes": None,
        "bytes_per_forward": None,
        "layer_bytes": None,
        "info": None,
        "setup_s": [], "standby_vram_bytes": [], "peak_vram_bytes": [], "prefill_tok_s": [],
        "decode_tok_s": [], "generate_tok_s": [], "leak_bytes": [],
        "max_abs_logit_diff": None, "logits_equal": None, "argmax_agreement": None, "perplexity": None,
        "decode_tokens_agree": None, "generate_tokens_agree": None,
    }


def _measure_once(model, cfg, st, res, r, device, prompt_ids, prefill_ids, ppl_ids, settings,
                  ref_logits, ref_argmax, ref_tokens, bar) -> None:
    import torch

    cuda = _is_cuda(device)
    new = cfg.new or settings.new
    before = _allocated(device)
    phase = lambda p: bar.set_postfix_str(p, refresh=True)  # noqa: E731

    phase("attach")
    t0 = time.perf_counter()
    st.attach()
    _sync(device)
    setup_s = time.perf_counter() - t0
    standby = _allocated(device)
    if res["info"] is None:
        res["info"] = _jsonable(st.info)

    if r == 0:  # warm-up round: correctness (not timed, not in the peak)
        phase("logits")
        logits = logits_of(model, prompt_ids)  # a plain forward, as a user would call it
        res["logits_equal"] = bool(torch.equal(logits, ref_logits))
        res["max_abs_logit_diff"] = float((logits.float() - ref_logits.float()).abs().max())
        res["argmax_agreement"] = float((logits.argmax(-1) == ref_argmax).float().mean())
        phase("perplexity")
        with st.inference():
            res["perplexity"] = perplexity(model, ppl_ids)
        del logits

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    st.drop_page_cache()
    with st.inference():
        phase("prefill")
        st.drop_page_cache()
        prefill = prefill_run(model, prefill_ids, device)
        phase("decode")
        st.drop_page_cache()
        # a cold-cache config times its first (cold) steps: no warm-up steps there
        decode, toks = bare_decode(model, prompt_ids, new, device, warm_steps=0 if cfg.cold else DECODE_WARM_STEPS)
    phase("generate")
    st.drop_page_cache()
    gen, gen_toks = generate_run(model, prompt_ids, new, device)
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None

    phase("detach")
    st.detach()
    after = _allocated(device)
    # greedy tokens against the plain model's, every round (the lowest agreement is kept): a
    # detach that does not restore the weights exactly shows up here in the next round
    for key, got in (("decode_tokens_agree", toks), ("generate_tokens_agree", gen_toks)):
        a = _agree(got, ref_tokens)  # generate's first new token is the bare loop's toks[0]
        res[key] = a if res[key] is None or a is None else min(res[key], a)
    if r == 0:
        return
    res["setup_s"].append(setup_s)
    res["standby_vram_bytes"].append(standby)
    res["peak_vram_bytes"].append(peak)
    res["prefill_tok_s"].append(prefill)
    res["decode_tok_s"].append(decode)
    res["generate_tok_s"].append(gen)
    res["leak_bytes"].append(None if before is None else after - before)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _finish_result(res, cfg, settings, pinned_bps, layer_sizes, num_layers) -> None:
    info = res["info"] or {}
    layers = info.get("layers")
    res["layers"] = list(layers) if layers is not None else None
    res["offloaded_bytes"] = info.get("offloaded_bytes")
    bpf = info.get("bytes_per_forward")
    res["bytes_per_forward"] = int(bpf) if isinstance(bpf, (int, float)) else None
    if isinstance(info.get("layer_bytes"), (int, float)) and info["layer_bytes"]:
        res["layer_bytes"] = info["layer_bytes"]  # the engine's largest offloaded layer
    elif res["layers"]:
        if isinstance(res["offloaded_bytes"], (int, float)) and res["offloaded_bytes"]:
            res["layer_bytes"] = res["offloaded_bytes"] / len(res["layers"])
        else:
            res["layer_bytes"] = statistics.median(layer_sizes[i] for i in res["layers"] if i < num_layers)
    for key in ("setup_s", "standby_vram_bytes", "peak_vram_bytes", "prefill_tok_s", "decode_tok_s",
                "generate_tok_s", "leak_bytes"):
        res[key] = stat(res[key])
    res["transfer_bound_tok_s"] = None
    res["prefill_transfer_bound_tok_s"] = None
    if pinned_bps and res["bytes_per_forward"]:
        res["transfer_bound_tok_s"] = pinned_bps / res["bytes_per_forward"]
        res["prefill_transfer_bound_tok_s"] = settings.prefill * pinned_bps / res["bytes_per_forward"]
    if res["perplexity"] is not None and not math.isfinite(res["perplexity"]):
        res["perplexity"] = None
