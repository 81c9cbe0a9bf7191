"""Prefill MLPs in chunks of positions (``lp_plugin.core.mlp_chunks``) against the whole prefill, on the GPU:
bit-for-bit equality of the logits and the memory the prefill allocates, for the plain transformers model.

    python benchmarks/mlp_chunks.py --model qwen2.5-3b-shape --dtypes nf4,bf16 --context 8192 --out r.json

For each format and cache (dynamic, static): the whole prefill twice (the second is the plain model's own
repeat), then the prefill with every decoder layer's MLP run over chunks of 4096, 2048 and 1024 positions.
Recorded per run: the last 64 positions' logits equal to the first whole run's, the next 4 greedy decode steps'
logits equal (decode steps of the plain model may differ from run to run by themselves: the repeat shows it), and
the peak the prefill allocated beyond the model. Also each MLP matmul (down_proj) over 8192 rows against chunks of
4096 down to 256 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from decode_exactness import _card  # noqa: E402  (benchmarks/card.py as a module)

from lp_plugin.core.mlp_chunks import MlpChunks, dense_mlp  # noqa: E402

CHUNKS = (4096, 2048, 1024)


def _run(model, ids, cache, dev):
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=64)
        peak = torch.cuda.max_memory_allocated(dev) - base
        logits = out.logits.float().cpu()
        tok = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(4):
            out = model(input_ids=tok, past_key_values=cache)
            steps.append(out.logits[:, -1].float().cpu())
            tok = out.logits[:, -1:].argmax(-1)
    return logits, torch.stack(steps), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-3b-shape")
    ap.add_argument("--dtypes", default="nf4,bf16")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--ckpt-dir", default="/dev/shm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mlp_chunks.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    card = _card()
    folder = card.shape_folder(args.model, 0, args.ckpt_dir)
    dev = torch.device("cuda", torch.cuda.current_device())
    t = args.context
    report: dict = {"model": args.model, "context": t, "env": {"device": torch.cuda.get_device_name(dev),
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__}, "runs": {}}
    for dtype in args.dtypes.split(","):
        model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": dev}, **card._load_kwargs(dtype)).eval()
        mlps = [dense_mlp(layer) for layer in model.model.layers]
        lin = model.model.layers[0].mlp.down_proj
        x = torch.randn(1, 8192, lin.in_features, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            whole = lin(x)
            report["runs"][f"{dtype}:down_proj"] = {
                str(c): bool(torch.equal(torch.cat([lin(x[:, s : s + c]) for s in range(0, 8192, c)], 1), whole))
                for c in (4096, 2048, 1024, 512, 256)
            }
        del x, whole
        ids = torch.randint(0, model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(1)).to(dev)
        for kind in ("dynamic", "static"):
            runs = {}
            for name, chunk in [("whole", None), ("whole_again", None), *((str(c), c) for c in CHUNKS)]:
                chunks = MlpChunks(mlps, chunk) if chunk else None
                if chunks:
                    chunks.install()
                cache = StaticCache(config=model.config, max_cache_len=t + 8) if kind == "static" else DynamicCache(
                    config=model.config)
                try:
                    runs[name] = _run(model, ids, cache, dev)
                finally:
                    if chunks:
                        chunks.remove()
                del cache
                torch.cuda.empty_cache()
            ref = runs["whole"]
            for name, (logits, steps, peak) in runs.items():
                row = {"prefill_peak_mib": round(peak / 2**20, 1), "prefill_logits_equal": bool(torch.equal(logits, ref[0])),
                       "decode_steps_equal": bool(torch.equal(steps, ref[1])),
                       "decode_steps_max_abs_diff": float((steps - ref[1]).abs().max())}
                report["runs"][f"{dtype}:{kind}:{name}"] = row
                print(f"{dtype}:{kind}:{name}", row, flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
