"""Time ``attach(model, skip="greedy:K", stand_in=..., calib=...)`` on a model folder (default: the
bundled SmolLM2-135M-Instruct), with a fresh skipping cache, and write the timing as JSON.

    PYTHONPATH=. python benchmarks/greedy_time.py --skip greedy:20% --out benchmarks/results/cpu-skipping-greedy-time.json

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
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
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

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("lp_plugin").setLevel(logging.INFO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.model or bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    handle = lp_plugin.attach(model, offload="none", skip=args.skip, stand_in=args.stand_in, calib=args.calib)
    seconds = time.perf_counter() - t0
    info = handle.info()
    out = {"model": str(path), "skip": args.skip, "stand_in": args.stand_in, "calib": args.calib or "default",
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
