"""Does offloading keep transformers' fast paths? Measured through the entry points users take.

    python benchmarks/fast_paths.py --model qwen2.5-3b-shape --dtype bf16 --rounds 6 --out r.json

One process, one GPU, one checkpoint (a seeded random-init shape saved to /dev/shm). Models:
``plain`` (``from_pretrained(device_map=cuda)``), ``fp_session`` / ``fp_stream``
(``lp_plugin.from_pretrained``, the path lm-eval takes too), ``attach_session`` (plain load + ``attach``)
and ``dispatched_session`` (``from_pretrained(device_map=residual_offload_device_map(...))`` +
``attach``). Reported:

* the Accelerate hooks left on each model and the values of its ``hf_device_map``;
* bare-loop decode inside a session (eager, DynamicCache), configs interleaved round by round, round 0
  discarded: median [min, max] of per-round ratios against ``plain``;
* ``generate(cache_implementation="static")`` (transformers compiles the forward and replays CUDA
  graphs): after a compiling call, three calls that each open their own session (with other
  allocations between them: session mode loads its layers each time) and three inside one session,
  tok/s and ratios against the plain model's compiled runs, and whether the tokens equal the plain
  compiled model's.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time

import torch

import lp_plugin
from lp_plugin.tools import shapes
from lp_plugin.integrations.quant import nf4_config


def _hooks(model) -> dict:
    from accelerate.hooks import ModelHook

    from lp_plugin.core.hooks import _Hook

    kinds = {}
    for module in model.modules():
        hook = module.__dict__.get("_hf_hook")
        for h in getattr(hook, "hooks", [hook] if hook is not None else []):
            if isinstance(h, ModelHook) and not isinstance(h, _Hook):
                kinds[type(h).__name__] = kinds.get(type(h).__name__, 0) + 1
    return kinds


def _bare_decode(model, ids, new, warm=4):
    from transformers import DynamicCache

    with torch.no_grad(), lp_plugin.session(model):
        cache = DynamicCache(config=model.config)
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(warm):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        toks = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            toks.append(tok)
        torch.cuda.synchronize()
        return new / (time.perf_counter() - t0), torch.cat(toks, 1)[0].tolist()


def _static_generate(model, ids, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                         pad_token_id=0)
    torch.cuda.synchronize()
    return new / (time.perf_counter() - t0), out[0, ids.shape[1]:].tolist()


def _stat(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _load(name, folder, kwargs, device):
    from transformers import AutoModelForCausalLM

    if name == "plain":
        return AutoModelForCausalLM.from_pretrained(folder, device_map={"": device.index}, **kwargs).eval()
    if name.startswith("fp_"):
        return lp_plugin.from_pretrained(folder, offload="even", tier="cpu", mode=name[3:], main_device=device, **kwargs)
    if name == "attach_session":
        model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": device.index}, **kwargs).eval()
        lp_plugin.attach(model, offload="even", tier="cpu", mode="session")
        return model
    if name == "dispatched_session":
        from transformers import AutoConfig

        dmap = lp_plugin.residual_offload_device_map(AutoConfig.from_pretrained(folder), offload="even", main_device=device.index)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=dmap, **kwargs).eval()
        lp_plugin.attach(model, offload="even", tier="cpu", mode="session")
        return model
    raise ValueError(name)


def _write(out, path):
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-3b-shape")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "nf4"])
    p.add_argument("--configs", default="plain,fp_session,attach_session,dispatched_session,fp_stream")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds; the first is discarded")
    p.add_argument("--new", type=int, default=32, help="tokens per bare decode run")
    p.add_argument("--static-new", type=int, default=64, help="new tokens per static-cache generate() call")
    p.add_argument("--prompt", type=int, default=100)
    p.add_argument("--static", default="plain,fp_session,fp_stream", help="configs measured with a static cache")
    p.add_argument("--compile-forward", action="store_true",
                   help="torch.compile(model.forward, mode='reduce-overhead') for the static runs (transformers does not "
                        "auto-compile bitsandbytes 4-bit models)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    folder = tempfile.mkdtemp(prefix="lp-fast-", dir="/dev/shm")
    shapes.build_shape_model(args.model, "bf16", device).save_pretrained(folder)
    gc.collect()
    torch.cuda.empty_cache()
    kwargs = {"dtype": torch.bfloat16} if args.dtype == "bf16" else {"quantization_config": nf4_config(), "dtype": torch.bfloat16}
    names = args.configs.split(",")
    models = {n: _load(n, folder, kwargs, device) for n in names}
    ids = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    out = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
           "rounds": args.rounds, "new": args.new, "configs": {}}
    for n, m in models.items():
        out["configs"][n] = {"accelerate_hooks": _hooks(m), "hf_device_map_values": sorted({str(v) for v in getattr(m, "hf_device_map", {}).values()})}
    decode = {n: [] for n in names}
    tokens = {}
    for r in range(args.rounds):
        for n in names:
            tps, toks = _bare_decode(models[n], ids, args.new)
            tokens.setdefault(n, toks)
            if r:
                decode[n].append(tps)
    for n in names:
        c = out["configs"][n]
        c["decode_tok_s"] = _stat(decode[n])
        c["decode_vs_plain_paired"] = _stat([a / b for a, b in zip(decode[n], decode["plain"])])
        c["decode_tokens_equal_plain"] = tokens[n] == tokens["plain"]
    _write(out, args.out)  # the decode figures, in case the compiled part does not finish
    static = [n for n in args.static.split(",") if n in models]
    static_tokens = {}
    for n in static:
        gc.collect()
        torch.cuda.empty_cache()
        if args.compile_forward:
            models[n].forward = torch.compile(models[n].forward, mode="reduce-overhead")
        try:
            first, toks = _static_generate(models[n], ids, args.static_new)  # compiles
        except Exception as exc:  # noqa: BLE001 - recorded: whether this stack can compile it at all
            out["configs"][n]["static_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            static_tokens[n] = None
            continue
        runs, alone = [], []
        for _ in range(3):
            junk = [torch.empty(int(64e6), dtype=torch.uint8, device=device) for _ in range(3)]  # move the allocator around
            tps, again = _static_generate(models[n], ids, args.static_new)  # a session of its own (loads the layers)
            del junk
            alone.append(tps)
            toks = toks if again == toks else None
        with lp_plugin.session(models[n]):  # many calls in one session: the speed of session mode
            for _ in range(3):
                tps, again = _static_generate(models[n], ids, args.static_new)
                runs.append(tps)
                toks = toks if again == toks else None
        c = out["configs"][n]
        c["static_own_session_tok_s"] = _stat(alone)
        c["static_first_call_s"] = args.static_new / first
        c["static_tok_s"] = _stat(runs)
        c["static_tokens_stable"] = toks is not None
        c["static_compiled"] = hasattr(models[n], "_compiled_call")
        static_tokens[n] = toks
    for n in static:
        c = out["configs"][n]
        if "static_tok_s" not in c or "static_tok_s" not in out["configs"]["plain"]:
            continue
        c["static_vs_plain"] = c["static_tok_s"]["median"] / out["configs"]["plain"]["static_tok_s"]["median"]
        c["static_own_session_vs_plain"] = c["static_own_session_tok_s"]["median"] / out["configs"]["plain"]["static_own_session_tok_s"]["median"]
        c["static_tokens_equal_plain_compiled"] = static_tokens[n] is not None and static_tokens[n] == static_tokens.get("plain")
    for n in names:
        h = lp_plugin.get_handle(models[n])
        out["configs"][n]["standby_GiB_note"] = "see engine_memory.py"
        if h is not None:
            out["configs"][n]["info"] = {k: v for k, v in h.info().items() if k in ("layers", "mode", "tier")}
    _write(out, args.out)
    print(json.dumps({n: {k: v for k, v in c.items() if k not in ("decode_tok_s",)} for n, c in out["configs"].items()}, indent=1))


if __name__ == "__main__":
    main()
