"""GPU evidence for the offload engine: exactness and VRAM of session/stream x cpu/disk against the
plain model, for a random-init model of a real shape loaded through ``lp_plugin.from_pretrained``.

    python benchmarks/engine_memory.py --shape qwen2.5-3b-shape --dtypes bf16,nf4 --out DIR

For each dtype: the plain model (``from_pretrained(device_map=cuda)``) and each offload config are
loaded in turn from the same checkpoint; we record peak VRAM while loading, standby VRAM (allocated
after set-up, caches emptied), peak VRAM during a 100-token prefill plus a 16-token ``generate()``,
and whether the logits of both are bit-identical to the plain model's. Writes one JSON per dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time

import torch

GiB = 1024**3


def _qconfig(dtype):
    if dtype == "nf4":
        from lp_plugin.integrations.quant import nf4_config

        return {"quantization_config": nf4_config()}
    return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]}


def _free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _resident(model) -> dict:
    """GiB of distinct CUDA storage held by the model's tensors, by kind (where standby goes), and
    whether lm_head shares the embedding's storage (a tied model)."""
    seen, by = set(), {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cuda":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        kind = "layers" if ".layers." in name else name.rsplit(".", 1)[0]
        by[kind] = by.get(kind, 0) + t.untyped_storage().nbytes()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(head is not None and head.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr())
    return {"resident_GiB": {k: round(v / GiB, 4) for k, v in sorted(by.items())}, "lm_head_tied": tied}


def _measure(model, ids, ref=None):
    _free()
    standby = torch.cuda.memory_allocated() / GiB
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GiB
    res = {"standby_GiB": round(standby, 4), "peak_inference_GiB": round(peak, 4),
           "generate_tok_s_rough": round(32 / gen_s, 2), **_resident(model)}
    gen_logits = torch.stack(out.logits)
    if ref is not None:
        res["logits_equal"] = bool(torch.equal(logits, ref[0]))
        res["generate_equal"] = bool(torch.equal(out.sequences, ref[1]) and torch.equal(gen_logits, ref[2]))
        res["max_abs_logit_diff"] = float((logits.float() - ref[0].float()).abs().max())
    return res, (logits, out.sequences, gen_logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-3b-shape")
    ap.add_argument("--dtypes", default="bf16,nf4")
    ap.add_argument("--configs", default="session:cpu,session:disk,stream:cpu,stream:disk")
    ap.add_argument("--offload", default="even")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    import lp_plugin
    from lp_plugin.tools.shapes import build_shape_model

    os.makedirs(args.out, exist_ok=True)
    work = args.workdir or tempfile.mkdtemp(prefix="lp_engine_")
    ckpt = os.path.join(work, "ckpt")
    model = build_shape_model(args.shape, "bf16", "cuda", seed=0)
    model.save_pretrained(ckpt)
    vocab = model.config.vocab_size
    del model
    _free()
    ids = torch.randint(0, vocab, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()
    for dtype in args.dtypes.split(","):
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "python": platform.python_version(),
                  "shape": args.shape, "dtype": dtype, "offload": args.offload, "runs": {}}
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        plain = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cuda:0", **_qconfig(dtype)).eval()
        load_peak = torch.cuda.max_memory_allocated() / GiB
        res, ref = _measure(plain, ids)
        res.update(load_peak_GiB=round(load_peak, 4), load_s=round(time.perf_counter() - t0, 2))
        report["runs"]["baseline"] = res
        print(dtype, "baseline", res, flush=True)
        del plain
        _free()
        for cfg in args.configs.split(","):
            mode, tier = cfg.split(":")
            folder = os.path.join(work, f"off-{dtype}")
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            where = {"offload_folder": folder} if tier == "disk" else {}  # (a cpu tier keeps no files)
            m = lp_plugin.from_pretrained(ckpt, offload=args.offload, tier=tier, mode=mode, **where, **_qconfig(dtype))
            load_peak = torch.cuda.max_memory_allocated() / GiB
            load_s = time.perf_counter() - t0
            res, _ = _measure(m, ids, ref)
            info = lp_plugin.get_handle(m).info()
            res.update(load_peak_GiB=round(load_peak, 4), load_s=round(load_s, 2),
                       layer_GiB=round(info["layer_bytes"] / GiB, 4), offloaded_GiB=round(info["offloaded_bytes"] / GiB, 4),
                       layers=info["layers"], session_load_s=round(lp_plugin.get_handle(m).stats["session_load_s"], 3))
            report["runs"][f"{mode}:{args.offload}:{tier}"] = res
            print(dtype, cfg, res, flush=True)
            lp_plugin.get_handle(m).detach()
            del m
            _free()
            shutil.rmtree(folder, ignore_errors=True)
        path = os.path.join(args.out, f"engine_memory_{args.shape}_{dtype}.json")
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)
        print("wrote", path)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
