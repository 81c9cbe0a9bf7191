"""Time ``attach(model, skip="greedy:K", stand_in=..., calib=...)`` on a model folder (default: the
bundled SmolLM2-135M-Instruct) or a random-init shape, with a fresh skipping cache, and write the timing as JSON.

    PYTHONPATH=. python benchmarks/greedy_time.py --skip greedy:20% --out benchmarks/results/cpu-skipping-greedy-time.json
    PYTHONPATH=. python benchmarks/greedy_time.py --model qwen2.5-3b-shape --dtype bf16 --tokenizer TOKENIZER_DIR --out X.json

A shape has random weights: its timing is what counts (the chosen layers mean nothing); its calibration text is
encoded with ``--tokenizer`` (a folder holding a tokenizer, e.g. the bundled model's).

Records the host load (``os.getloadavg``) before and after: the CPU machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model folder or shape name (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="weights' dtype (default: fp32 for a folder, bf16 for a shape)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a shape's calibration text")
    p.add_argument("--skip", default="greedy:20%")
    p.add_argument("--stand-in", default="linear")
    p.add_argument("--calib", default=None, help="calib option (default: lp_plugin's default)")
    p.add_argument("--device", default=None, help="device to load the model on (default: cuda when there is one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default torch's; on a shared CPU one thread can be several times faster)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("LP_PLUGIN_PROGRESS", "1")
    os.environ["LP_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="lp-greedy-time-")  # nothing cached: time it all
    import torch
    from transformers import AutoModelForCausalLM

    import lp_plugin
    from lp_plugin.tools.bundled import bundled_model_path
    from lp_plugin.tools.shapes import build_shape_model, is_shape, torch_dtype

    shape = bool(args.model) and is_shape(args.model)
    if shape and not args.tokenizer:
        p.error(f"--model {args.model} is a random-init shape: pass --tokenizer DIR for its calibration text")

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("lp_plugin").setLevel(logging.INFO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.model or bundled_model_path()
    dtype = args.dtype or ("bf16" if shape else "fp32")
    if shape:
        model = build_shape_model(path, dtype, device)
        model.config.name_or_path = os.path.abspath(args.tokenizer)  # where the calibration's tokenizer loads from
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    handle = lp_plugin.attach(model, offload="none", skip=args.skip, stand_in=args.stand_in, calib=args.calib)
    seconds = time.perf_counter() - t0
    info = handle.info()
    out = {"model": str(path), "dtype": dtype, "skip": args.skip, "stand_in": args.stand_in, "calib": args.calib or "default",
           "calib_source": handle.plan.skips.info.get("calib"), "device": device, "seconds": seconds,
           "skipped_layers": info["skipped_layers"], "skip_info": handle.plan.skips.info,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    print(json.dumps({k: out[k] for k in ("seconds", "skipped_layers", "loadavg_before", "loadavg_after")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
