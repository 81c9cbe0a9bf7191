"""What lp-bench times and checks on one model: prefill, the bare greedy decode loop, ``generate()``
with a dynamic and with a static cache, logits, perplexity, host-to-device bandwidth and device
memory. Every function takes the model as a user would hold it; none knows about configs.

torch is imported inside the functions so that ``lp-bench --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import time

DECODE_WARM_STEPS = 4


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device):
    """Bytes allocated on a CUDA device after freeing what can be freed (None on the CPU).

    cuBLAS keeps a workspace per stream in the caching allocator (32 MiB on Hopper), and CUDA graph
    captures (a compiled static-cache generate) drop them, so they come and go between configs:
    they are dropped before every reading, and no figure counts them."""
    import torch

    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(device))


@contextlib.contextmanager
def no_gc():
    """Keep the garbage collector off while timing (as ``timeit`` does): a collection in a
    launch-bound decode loop shows up as a slow step. (A full collection before each timed part
    would cost more than the part itself in a process holding many objects.)"""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def cache_kwargs(model, max_len: int | None = None) -> dict:
    """A fresh KV cache under the keyword this transformers version reads (``cache``; older
    releases: ``past_key_values``, which newer ones still take with a FutureWarning): a DynamicCache, or for a
    model attached with ``decode="graph"`` (given ``max_len``, the tokens it will hold) a StaticCache, as its
    ``generate()`` uses."""
    from transformers import DynamicCache, StaticCache

    import lp_plugin

    handle = lp_plugin.get_handle(model)
    cache: DynamicCache | StaticCache
    if max_len is not None and handle is not None and handle.config.decode == "graph":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    else:
        try:
            cache = DynamicCache(config=model.config)
        except TypeError:  # pragma: no cover - releases without the config argument
            cache = DynamicCache()
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def prefill_run(model, ids, device) -> float:
    """tokens/s of one forward over ``ids`` (batch 1) with a fresh KV cache, last logits only."""
    import torch

    with torch.no_grad():
        kw = cache_kwargs(model)
        with no_gc():
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1, **kw)
            sync(device)
            dt = time.perf_counter() - t0
    return ids.shape[1] / dt


def bare_decode(model, prompt_ids, new: int, device, warm_steps: int = DECODE_WARM_STEPS, before_step=None) -> dict:
    """The one bare greedy loop used for every config: prefill the prompt into a DynamicCache and
    run ``warm_steps`` single-token steps (not timed: on a GPU the first steps after other work run
    slow while clocks and caches settle), then ``new`` single-token forwards with argmax, timed
    between two synchronizes with the garbage collector off. ``before_step`` (a cold-cache config's
    page-cache drop) runs before every timed step, after a synchronize, outside the time.

    Returns ``tok_s`` (new tokens / time), ``tokens`` (generated ids, the warm-up ones first) and,
    on the CPU, ``step_tok_s``: 1 / the mean of the fastest quarter of the step times, what a step
    costs when no other process on a shared machine takes the core away (the minimum that
    ``timeit`` recommends, averaged over a few steps). A slowdown of every step moves it; stalls of
    a few steps move ``tok_s`` only. On CUDA the steps are not synchronized one by one, so their
    host times mean nothing and it is None."""
    import torch

    steps = []
    with torch.no_grad():
        kw = cache_kwargs(model, max_len=prompt_ids.shape[1] + warm_steps + new + 1)
        tok = model(input_ids=prompt_ids, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
        toks = [tok]
        for _ in range(warm_steps):
            tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
            toks.append(tok)
        with no_gc():
            sync(device)
            t0 = t = time.perf_counter()
            paused = 0.0
            for _ in range(new):
                if before_step is not None:
                    sync(device)
                    mark = time.perf_counter()
                    before_step()
                    t = time.perf_counter()
                    paused += t - mark
                tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
                toks.append(tok)
                now = time.perf_counter()
                steps.append(now - t)
                t = now
            sync(device)
            dt = time.perf_counter() - t0 - paused
    fastest = sorted(steps)[: max(1, len(steps) // 4)]
    step = None if device.type == "cuda" else len(fastest) / sum(fastest)
    return {"tok_s": new / dt, "step_tok_s": step, "tokens": torch.cat(toks, dim=1)[0].tolist()}


def generate_run(model, prompt_ids, new: int, device, static: bool = False):
    """tokens/s of ``model.generate`` (greedy, exactly ``new`` new tokens, prompt prefill included),
    called as a user calls it; ``static`` asks for ``cache_implementation="static"``, which
    transformers compiles on CUDA. Returns ``(tokens/s, new token ids)``."""
    import torch

    pad = model.config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else 0
    extra = {"cache_implementation": "static"} if static else {}
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad if pad is not None else 0,
        **extra,
    )
    sync(device)
    dt = time.perf_counter() - t0
    gen = out[0, prompt_ids.shape[1] :].tolist()
    return len(gen) / dt, gen


def static_runs(model, prompt_ids, new: int, device) -> dict:
    """The static-cache figures of one model: on CUDA a first, untimed call compiles (its time is
    kept as ``first_s``), then one timed call. ``compiled`` says whether transformers compiled the
    forward (it refuses to for some models, e.g. ones it thinks are offloaded). Every config compiles
    its own graphs, as a fresh process would, and they are dropped afterwards (:func:`release_compiled`)."""
    first_s = None
    try:
        if device.type == "cuda":
            t0 = time.perf_counter()
            generate_run(model, prompt_ids, new, device, static=True)
            first_s = time.perf_counter() - t0
        tok_s, tokens = generate_run(model, prompt_ids, new, device, static=True)
        compiled = "_compiled_call" in model.__dict__
    finally:
        release_compiled(model, device)
    return {"tok_s": tok_s, "tokens": tokens, "first_s": first_s, "compiled": compiled}


def release_compiled(model, device) -> None:
    """Drop what a static-cache ``generate`` left behind: the compiled forward transformers keeps on
    the model, a kept static cache (older releases), dynamo's caches and CUDA graph pools. Left in
    place, they would count in the next config's standby VRAM, and the recompiles of one model object
    across configs would hit dynamo's recompile limit (after which it silently runs eager)."""
    import torch

    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_cache", None)
    if device.type == "cuda":
        torch._dynamo.reset()  # also resets the CUDA graph trees
        gc.collect()
        torch.cuda.empty_cache()


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.detach().to("cpu")


def forced_decode_logits(model, prompt_ids, tokens: list):
    """The decode path with the inputs fixed (teacher forcing): ``prompt_ids`` prefilled into a fresh
    DynamicCache, then ``tokens[:-1]`` fed one at a time. Returns the last-position logits of the
    prefill and of every step, the ones that predict ``tokens`` (``len(tokens)`` rows, float32, CPU).
    Two models given the same ``tokens`` (the plain model's greedy ones) compute from the same inputs
    even where their own greedy tokens would part."""
    import torch

    rows = []
    with torch.no_grad():
        kw = cache_kwargs(model)
        out = model(input_ids=prompt_ids, logits_to_keep=1, **kw)
        rows.append(out.logits[0, -1].detach().float().cpu())
        for tok in tokens[:-1]:
            step = torch.tensor([[tok]], dtype=prompt_ids.dtype, device=prompt_ids.device)
            rows.append(model(input_ids=step, **kw).logits[0, -1].detach().float().cpu())
    return torch.stack(rows)


def max_abs_diff(a, b) -> float:
    """The largest absolute difference of two logit tensors over their finite entries; ``inf`` when
    they are not finite at the same places or their non-finite entries differ (a NaN never equals)."""
    import torch

    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
        return float("inf")
    return float((a[fa] - b[fb]).abs().max()) if fa.any() else 0.0


def perplexity(model, ids) -> float:
    """Perplexity of ``ids`` (batch 1), computed in float64: a float32 loss would round away the
    small drift of a nondeterministic model, which the gate measures."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        loss = F.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(loss))


def agreement(a, b) -> float | None:
    """The share of positions where two token lists agree (over the shorter one)."""
    if not a or not b:
        return None
    n = min(len(a), len(b))
    return sum(int(x == y) for x, y in zip(a[:n], b[:n])) / n
