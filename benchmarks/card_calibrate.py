"""Calibrate the card terms of the budget planner on a GPU: for each case, in a fresh process, the CUDA
context (through the driver, before and after CUDA starts), the device-level peak of the whole run
(the driver's used memory sampled every millisecond), PyTorch's allocated and reserved peaks and the
engine's mapped buffers, against the plan's prediction term by term.

    python benchmarks/card_calibrate.py --model qwen2.5-3b-shape --cases bf16:6GiB:8192:generate,... --out DIR

A case is ``DTYPE:BUDGET:CONTEXT:WORK`` (work ``generate``: a prompt of CONTEXT-32 tokens and 32 greedy
tokens through ``generate``; ``loglikelihood``: one window of CONTEXT tokens scored by lp_plugin's
lm-eval path). The budget is passed as ``max_memory``: no ballast, the rest of the GPU stays free, so
a too-low prediction shows as a peak over the budget rather than as an out-of-memory error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

NEW_TOKENS = 32


def _case(args) -> dict:
    import torch

    import lp_plugin
    from lp_plugin.core import devices, logprobs
    from lp_plugin.integrations.quant import nf4_config

    dtype, budget, context, work = args.case.split(":")
    dev = torch.device("cuda", 0)
    before = devices._nvml_used(dev)
    torch.cuda.init()
    torch.cuda.mem_get_info(dev)
    after_init = devices._nvml_used(dev)
    peak = {"used": after_init or 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            used = devices._nvml_used(dev)
            if used is not None and used > peak["used"]:
                peak["used"] = used
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    kwargs = {"dtype": torch.bfloat16}
    if dtype == "nf4":
        kwargs["quantization_config"] = nf4_config(torch.bfloat16)
    model = lp_plugin.from_pretrained(args.folder, offload="auto", max_memory=budget, max_context=int(context), work=work,
                                      **kwargs)
    handle = lp_plugin.get_handle(model)
    plan = handle.plan.budget
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        if work == "generate":
            ids = torch.randint(0, 32000, (1, int(context) - NEW_TOKENS), generator=g).to(dev)
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            result = out[0, -NEW_TOKENS:].tolist()
        else:
            ids = torch.randint(0, 32000, (1, int(context)), generator=g).to(dev)
            rows = torch.arange(int(context) - 1, device=dev)
            targets = ids[0, 1:].unsqueeze(1)
            with lp_plugin.session(model):
                values, _ = logprobs.score_window(model, ids, rows, targets, None, plan.prefill_chunk)
            result = float(values.float().sum())
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    time.sleep(0.05)
    stop.set()
    sampler.join()
    context_bytes = (after_init - before) if before is not None and after_init is not None else None
    device_peak = peak["used"] - before if before is not None else None
    reserved, allocated = torch.cuda.max_memory_reserved(dev), torch.cuda.max_memory_allocated(dev)
    mapped = handle.peak_mapped_bytes
    return {
        "case": args.case, "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "plan": plan.to_dict(), "result": result, "seconds": seconds,
        "context_bytes": context_bytes, "device_peak_bytes": device_peak, "max_reserved_bytes": reserved,
        "max_allocated_bytes": allocated, "peak_mapped_bytes": mapped,
        "runtime_bytes": device_peak - reserved - mapped if device_peak is not None else None,
        "slack_bytes": reserved - allocated,
        "predicted_peak_bytes": plan.peak_bytes, "budget_bytes": plan.budget_bytes,
        "prediction_error": (plan.peak_bytes - device_peak) / device_peak if device_peak else None,
        "within_budget": device_peak is not None and device_peak <= plan.budget_bytes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-3b-shape")
    p.add_argument("--cases", default="bf16:6GiB:8192:generate")
    p.add_argument("--out", default="out")
    p.add_argument("--folder", help="(internal) the saved checkpoint")
    p.add_argument("--case", help="(internal) run one case in this process")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path("/dev/shm") / f"lp-card-{args.model}"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-c", "import sys; from lp_plugin.tools.shapes import save_shape_checkpoint; "
                        f"save_shape_checkpoint({args.model!r}, {str(folder)!r}, 'bf16', 'cuda')"], check=True)
    rows = []
    for case in args.cases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--folder", str(folder)], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
        row = json.loads(line) if line else {"case": case, "error": proc.stderr[-3000:]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan"})[:1500], flush=True)
    (out / f"card-calibrate-{args.model}.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<32} ERROR")
            continue
        g = 2**30
        print(f"{r['case']:<32} ctx {r['context_bytes'] / g if r['context_bytes'] else float('nan'):.3f} "
              f"runtime {r['runtime_bytes'] / g:.3f} slack {r['slack_bytes'] / g:.3f} device {r['device_peak_bytes'] / g:.3f} "
              f"pred {r['predicted_peak_bytes'] / g:.3f} budget {r['budget_bytes'] / g:.2f} err {r['prediction_error']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
