"""Host memory that ``lp_plugin.from_pretrained`` leaves resident (Linux, CUDA): the shape's checkpoint saved once
(as ``card.py`` saves it), then loaded in a fresh process with ``offload=SPEC``, one forward run, and the process's
``/proc/self/status`` read (``card.host_memory``) beside the bytes the plan offloaded to host memory.

    python benchmarks/host_memory.py --model qwen2.5-3b-shape --offload all --out host.json

Run it from two checkouts to compare them (the lp_plugin imported is the one on ``PYTHONPATH``, recorded in the
output). ``--child`` is the measured process (internal).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _card():
    sys.path.insert(0, str(HERE))
    from decode_exactness import _card as load

    return load()


def measure(folder: str, offload: str, tier: str, mode: str) -> dict:
    """In this process: load, one forward, host memory."""
    import torch

    import lp_plugin

    model = lp_plugin.from_pretrained(folder, dtype=torch.bfloat16, offload=offload, protect_first=0, protect_last=0,
                                      tier=tier, mode=mode)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]], device=model.device))
    gc.collect()
    info = lp_plugin.get_handle(model).info()
    return {"lp_plugin": lp_plugin.__file__, "offload": offload, "tier": tier, "mode": mode,
            "offloaded_bytes": info["offloaded_bytes"], "host": _card().host_memory()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-3b-shape", help="a shape name (random-init bf16, saved once)")
    ap.add_argument("--offload", default="all", help="the layers to offload (lp_plugin's offload=)")
    ap.add_argument("--tier", default="cpu", choices=["cpu", "disk"])
    ap.add_argument("--mode", default="stream", choices=["stream", "session"])
    ap.add_argument("--ckpt-dir", default="/dev/shm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.offload, args.tier, args.mode)))
        return 0
    from lp_plugin.errors import OffloadSpecError
    from lp_plugin.tools.shapes import is_shape, shape_config, shape_names

    if not is_shape(args.model):
        print(f"error: --model {args.model!r} is not a shape; choose from {', '.join(shape_names())}", file=sys.stderr)
        return 2
    import lp_plugin

    try:
        lp_plugin.resolve_layers(args.offload, shape_config(args.model).num_hidden_layers, 0, 0)
    except OffloadSpecError as exc:
        print(f"error: --offload: {exc}", file=sys.stderr)
        return 2
    if not sys.platform.startswith("linux"):
        print("error: host_memory.py reads /proc/self/status: run it on Linux", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: host_memory.py loads onto a GPU (Accelerate keeps no host copies for a CPU model)",
              file=sys.stderr)
        return 2
    spec = {"model": args.model, "seed": 0, "dirs": [args.ckpt_dir], "tokenizer": None}
    folder = _card().step_checkpoint(spec)["folder"]
    proc = subprocess.run([sys.executable, __file__, "--child", folder, "--offload", args.offload, "--tier", args.tier,
                           "--mode", args.mode], capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    result = {"model": args.model, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
