"""GPU check of the budget planner (``offload="auto"``) against measurement.

For each case ``DTYPE:BUDGET:CONTEXT`` it plans (``lp_plugin.fit_budget``), loads the model through
``lp_plugin.from_pretrained(offload="auto", max_memory={0: BUDGET}, ...)`` from a saved shape
checkpoint, runs the work the plan assumed, and writes predicted against measured standby VRAM, peak
VRAM (``torch.cuda.max_memory_allocated`` + the engine's ``peak_mapped_bytes``, against the plan's peak less
its CUDA-runtime and allocator-slack terms, which ``benchmarks/card.py`` checks at the device level; the work
runs inside a session, so the ring or session buffer is mapped throughout, as the plan assumes) and
decode tok/s. For the same budget it also tries a few hand-picked specs on one plain model (attach,
measure, detach) and keeps the fastest whose measured peak fits, to compare decode speed.

    python benchmarks/budget_check.py --model qwen2.5-3b-shape --work generate \\
        --cases bf16:6GiB:8192,nf4:2GiB:512 --out benchmarks/results/h100-budget-generate.json
    python benchmarks/budget_check.py --model PATH --plan-only --out plans.json   # no GPU: the plans
    python benchmarks/budget_check.py --recheck REPORT.json                       # the checks derived again

Work: ``loglikelihood`` is lm-eval's: one forward of CONTEXT tokens (batch ``--batch``) with every
position's logits, then ``F.log_softmax(logits, dim=-1)``; ``generate`` is a prompt of CONTEXT - NEW
tokens and NEW greedy tokens. Decode tok/s: ``(NEW - 1) / (t(NEW tokens) - t(1 token))`` of a short
prompt. Exit status: 0 done, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

GOAL_CASES = ("bf16:8GiB:512,bf16:8GiB:8192,bf16:6GiB:512,bf16:6GiB:8192,bf16:4GiB:512,bf16:4GiB:8192,bf16:3GiB:512,"
              "bf16:3GiB:8192,nf4:3GiB:512,nf4:3GiB:8192,nf4:2GiB:512,nf4:2GiB:8192,nf4:1.6GiB:512,nf4:1.6GiB:8192")
DTYPES = ("bf16", "fp16", "fp32", "nf4")
PEAK_TOLERANCE = 0.05


@dataclass(frozen=True)
class Case:
    dtype: str
    budget: str
    budget_bytes: int
    context: int

    @property
    def name(self) -> str:
        return f"{self.dtype}:{self.budget}:{self.context}"


def parse_cases(text: str) -> list:
    """``"bf16:6GiB:8192,nf4:2GiB:512"`` as :class:`Case` objects (ValueError naming the bad one)."""
    from lp_plugin.planning.config import parse_size

    cases = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in DTYPES or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"case {item!r} is not DTYPE:BUDGET:CONTEXT (DTYPE one of {DTYPES}, e.g. bf16:6GiB:8192)")
        cases.append(Case(parts[0], parts[1], parse_size(parts[1], f"case {item!r}"), int(parts[2])))
    if not cases:
        raise ValueError("no cases given; e.g. --cases bf16:6GiB:8192")
    return cases


def plan_case(case: Case, hf_config, args, compute_tok_s=None) -> dict:
    """The plan for ``case`` as JSON, or the refusal with the smallest budget."""
    from lp_plugin import BudgetError, fit_budget

    try:
        plan = fit_budget(hf_config, weights=case.dtype, max_memory={0: case.budget_bytes}, max_context=case.context,
                          batch_size=args.batch, work=args.work, main_device=args.device, compute_tok_s=compute_tok_s)
    except BudgetError as exc:
        return {"fits": False, "error": str(exc), "min_bytes": exc.min_bytes}
    return {"fits": True, **plan.to_dict()}


def hand_specs(k: int, lo: int, hi: int) -> list:
    """Hand-picked ``(mode, offload spec)`` to compare with a plan of ``k`` streamed layers among
    ``lo..hi``: the plain model, and for a few counts around ``k`` both a contiguous block and every
    n-th layer."""
    specs = [("session", "none")]
    n = hi - lo + 1
    for count in sorted({c for c in (k - 1, k, k + 1, k + 2, k + 4) if 1 <= c <= n}):
        specs.append(("stream", f"{lo}-{lo + count - 1}"))
        step = max(n // count, 1)
        strided = list(range(lo, hi + 1, step))[:count]
        if len(strided) == count and strided != list(range(lo, lo + count)):
            specs.append(("stream", ",".join(map(str, strided))))
    return specs


# the plan's terms that no allocation counts: the CUDA context and runtime, and the caching allocator's reserve beyond
# what is allocated (benchmarks/card.py measures them, at the device level, inside an emulated card)
DEVICE_ONLY_TERMS = ("cuda_runtime", "allocator_slack")


def allocated_peak(plan: dict) -> int:
    """The plan's peak as allocations and the engine's mapped buffers (what :func:`measure` measures): its
    card-level peak without :data:`DEVICE_ONLY_TERMS`."""
    breakdown = plan.get("breakdown") or {}
    return plan["peak_bytes"] - sum(breakdown.get(k, 0) for k in DEVICE_ONLY_TERMS)


def verdict(case: Case, predicted: dict, measured: dict) -> dict:
    """The goal's checks: measured peak within the budget, the plan's allocated peak within 5% of the measured one."""
    peak_error = (allocated_peak(predicted) - measured["peak_bytes"]) / measured["peak_bytes"]
    return {"peak_within_budget": measured["peak_bytes"] <= case.budget_bytes,
            "peak_error": round(peak_error, 4), "peak_within_5pct": abs(peak_error) <= PEAK_TOLERANCE,
            "standby_error": round((predicted["standby_bytes"] - measured["standby_bytes"]) / measured["standby_bytes"], 4)}


def load_kwargs(dtype: str) -> dict:
    import torch

    if dtype == "nf4":
        from lp_plugin.integrations.quant import nf4_config

        return {"quantization_config": nf4_config(), "dtype": torch.bfloat16}
    return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]}


# ---------------------------------------------------------------------------------------- measuring (GPU)
def _free():
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def run_work(model, args, context: int, vocab: int) -> None:
    """The work the plan assumed, as lm-eval and generate() run it."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if args.work == "loglikelihood":
            ids = torch.randint(0, vocab, (args.batch, context), generator=g).cuda()
            logits = model(ids).logits
            F.log_softmax(logits, dim=-1)
        else:
            ids = torch.randint(0, vocab, (args.batch, max(context - args.new, 1)), generator=g).cuda()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                           do_sample=False, pad_token_id=0)


def decode_rate(model, args, vocab: int) -> float:
    import torch

    ids = torch.randint(0, vocab, (args.batch, 64), generator=torch.Generator().manual_seed(1)).cuda()
    times = {}
    for new in (1, args.new, 1, args.new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        torch.cuda.synchronize()
        times[new] = time.perf_counter() - t0  # the second of each pair counts (the first warms up)
    return args.batch * (args.new - 1) / max(times[args.new] - times[1], 1e-9)


def measure(model, args, context: int) -> dict:
    """Standby now, then peak of the work (inside a session, so the ring or session buffer is mapped
    throughout, as the plan assumes) and decode tok/s."""
    import torch

    import lp_plugin

    vocab = model.config.vocab_size
    _free()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:  # earlier matmuls' cuBLAS workspaces: a fresh process has none before its first matmul
        clear()
    standby = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with lp_plugin.session(model):
        run_work(model, args, context, vocab)
        torch.cuda.synchronize()
    handle = lp_plugin.get_handle(model)
    mapped = handle.peak_mapped_bytes if handle is not None else 0
    peak = torch.cuda.max_memory_allocated() + mapped
    return {"standby_bytes": standby, "peak_bytes": peak, "mapped_bytes": mapped, "decode_tok_s": decode_rate(model, args, vocab)}


def paired_decode(planned, best: dict, case: Case, ckpt: str, args) -> dict:
    """Decode speed of the plan against the best hand-picked spec, round-robin in one process (batch-1
    decode is launch-bound and drifts between rounds): the plain model attached with that spec next to
    the planned one, ``args.rounds`` rounds after a discarded warm-up round, order alternating."""
    import statistics

    from transformers import AutoModelForCausalLM

    import lp_plugin

    other = AutoModelForCausalLM.from_pretrained(ckpt, device_map={"": 0}, **load_kwargs(case.dtype)).eval()
    handle = lp_plugin.attach(other, offload=best["offload"], mode=best["mode"])
    vocab = planned.config.vocab_size
    ratios = []
    try:
        for r in range(args.rounds + 1):
            if r % 2:
                b, a = decode_rate(other, args, vocab), decode_rate(planned, args, vocab)
            else:
                a, b = decode_rate(planned, args, vocab), decode_rate(other, args, vocab)
            if r:
                ratios.append(a / b)
    finally:
        handle.detach()
        del other, handle
        _free()
    return {"spec": {"mode": best["mode"], "offload": best["offload"]}, "rounds": len(ratios),
            "ratios": [round(x, 4) for x in ratios], "median": round(statistics.median(ratios), 4),
            "min": round(min(ratios), 4), "max": round(max(ratios), 4)}


def check_planned(case: Case, ckpt: str, args, best_hand=None) -> dict:
    """Load through from_pretrained(offload="auto") and measure against the plan (and, given the best
    hand-picked spec, the paired decode comparison with it)."""
    import lp_plugin

    model = lp_plugin.from_pretrained(ckpt, offload="auto", max_memory={0: case.budget_bytes}, max_context=case.context,
                                      batch_size=args.batch, work=args.work, **load_kwargs(case.dtype))
    handle = lp_plugin.get_handle(model)
    try:
        measured = measure(model, args, case.context)
        if best_hand is not None and args.rounds > 0:
            measured["paired_vs_best_hand"] = paired_decode(model, best_hand, case, ckpt, args)
    finally:
        handle.detach()
        del model, handle
        _free()
    return measured


def best_hand_picked(model, case: Case, plan: dict, args) -> dict:
    """Each hand-picked spec attached to the plain ``model`` in turn; the fastest that fits."""
    import lp_plugin

    lo, hi = 2, plan["num_layers"] - 4  # the default protect_first=2, protect_last=3
    tried = []
    for mode, spec in hand_specs(len(plan["offloaded"]), lo, hi):
        handle = lp_plugin.attach(model, offload=spec, mode=mode)
        try:
            m = measure(model, args, case.context)
        except Exception as exc:  # noqa: BLE001 - an out-of-memory or a refused spec is a result here
            m = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            handle.detach()
            _free()
        m.update(mode=mode, offload=spec, fits=m.get("peak_bytes", float("inf")) <= case.budget_bytes)
        tried.append(m)
    fitting = [t for t in tried if t["fits"]]
    return {"tried": tried, "best": max(fitting, key=lambda t: t["decode_tok_s"]) if fitting else None}


def ensure_checkpoint(model: str, folder: str) -> str:
    """``model`` itself if it is a folder, else the shape saved once (seeded, bf16, built on the GPU)."""
    from lp_plugin.tools.shapes import build_shape_model, is_shape

    if not is_shape(model):
        return model
    path = os.path.join(folder, model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        built = build_shape_model(model, "bf16", "cuda", seed=0)
        built.save_pretrained(path, safe_serialization=True)
        del built
        _free()
    return path


def run_dtype(dtype: str, cases: list, ckpt: str, hf_config, args) -> list:
    """Every case of one dtype: plans (with the plain model's decode rate), hand-picked specs on the
    plain model, then each plan loaded through from_pretrained and measured."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(ckpt, device_map={"": 0}, **load_kwargs(dtype)).eval()
    plain_decode = decode_rate(plain, args, plain.config.vocab_size)
    out = []
    for case in cases:
        entry = {"case": case.name, "plain_decode_tok_s": plain_decode, "plan": plan_case(case, hf_config, args, (plain_decode, None))}
        if not args.no_hand:
            # a refused budget is checked too: every candidate layer offloaded, to see whether a hand-picked spec fits
            plan = entry["plan"] if entry["plan"]["fits"] else {"num_layers": plain.config.num_hidden_layers,
                                                              "offloaded": range(plain.config.num_hidden_layers - 5)}
            entry["hand_picked"] = best_hand_picked(plain, case, plan, args)
        out.append(entry)
    del plain
    _free()
    for case, entry in zip(cases, out):
        if entry["plan"]["fits"]:
            best = (entry.get("hand_picked") or {}).get("best")
            entry["measured"] = check_planned(case, ckpt, args, best)
            entry["checks"] = verdict(case, entry["plan"], entry["measured"])
            if best:
                paired = entry["measured"].get("paired_vs_best_hand")
                # the paired median when measured; else the two single measurements
                entry["checks"]["decode_vs_best_hand"] = (paired["median"] if paired else
                                                          round(entry["measured"]["decode_tok_s"] / best["decode_tok_s"], 3))
        elif (entry.get("hand_picked") or {}).get("best"):
            entry["checks"] = {"refused_but_hand_picked_fits": True}
        print(json.dumps({"case": case.name, "checks": entry.get("checks")}), flush=True)
    return out


def recheck(path: str) -> int:
    """The checks and summary of a report derived again (after a change of the rules), the file rewritten."""
    try:
        with open(path) as f:
            report = json.load(f)
        if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
            raise ValueError("it holds no 'cases' list")
    except (OSError, ValueError) as exc:
        print(f"error: --recheck {path}: not a budget_check report ({exc}); give the JSON a run wrote", file=sys.stderr)
        return 2
    for entry in report["cases"]:
        if "measured" in entry:
            kept = {k: v for k, v in (entry.get("checks") or {}).items() if k == "decode_vs_best_hand"}
            entry["checks"] = {**verdict(parse_cases(entry["case"])[0], entry["plan"], entry["measured"]), **kept}
            print(json.dumps({"case": entry["case"], "checks": entry["checks"]}))
    report["summary"] = summarize(report["cases"])
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def summarize(entries: list) -> dict:
    checked = [e["checks"] for e in entries if "peak_error" in (e.get("checks") or {})]
    ratios = [c["decode_vs_best_hand"] for c in checked if "decode_vs_best_hand" in c]
    return {"cases": len(entries), "planned": sum(e["plan"]["fits"] for e in entries), "measured": len(checked),
            "peak_within_budget": sum(c["peak_within_budget"] for c in checked),
            "peak_within_5pct": sum(c["peak_within_5pct"] for c in checked),
            "max_abs_peak_error": max((abs(c["peak_error"]) for c in checked), default=None),
            "refused_but_hand_picked_fits": sum(bool((e.get("checks") or {}).get("refused_but_hand_picked_fits")) for e in entries),
            "min_decode_vs_best_hand": min(ratios, default=None)}


def config_of(model: str):
    from transformers import AutoConfig

    from lp_plugin.tools.shapes import is_shape, shape_config

    config = shape_config(model) if is_shape(model) else AutoConfig.from_pretrained(model)
    config._name_or_path = model
    return config


def environment() -> dict:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-3b-shape", help="a shape name or a checkpoint folder")
    ap.add_argument("--cases", default=GOAL_CASES, help="DTYPE:BUDGET:CONTEXT,... (default: the issue's goal cases)")
    ap.add_argument("--work", choices=("generate", "loglikelihood"), default="generate")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=16, help="new tokens of the generate work and of the decode timing")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--ckpt-dir", default="/tmp/lp-budget-ckpt", help="where a shape's checkpoint is saved")
    ap.add_argument("--out", help="JSON file (default: stdout)")
    ap.add_argument("--plan-only", action="store_true", help="only the plans (no GPU needed)")
    ap.add_argument("--no-hand", action="store_true", help="skip the hand-picked specs")
    ap.add_argument("--rounds", type=int, default=5,
                    help="paired decode rounds of the plan against the best hand-picked spec (0: single measurements)")
    ap.add_argument("--recheck", metavar="JSON", help="do not run: derive the checks and the summary of this report "
                                                       "again from its plans and measurements, rewriting the file")
    args = ap.parse_args(argv)
    from lp_plugin.errors import OffloadSpecError

    if args.recheck:
        return recheck(args.recheck)

    try:
        cases = parse_cases(args.cases)
        if args.batch < 1 or args.new < 2:
            raise ValueError("--batch must be >= 1 and --new >= 2")
        hf_config = config_of(args.model)
    except (ValueError, OSError, OffloadSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {"model": args.model, "work": args.work, "batch": args.batch, **environment()}
    if args.plan_only:
        report["cases"] = [{"case": c.name, "plan": plan_case(c, hf_config, args)} for c in cases]
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: no GPU here; pass --plan-only for the plans alone", file=sys.stderr)
            return 2
        from lp_plugin.planning.budget import measured_bandwidth

        ckpt = ensure_checkpoint(args.model, args.ckpt_dir)
        report["pinned_h2d_gbps"] = measured_bandwidth(str(torch.device(args.device)))
        report["cases"] = [e for d in dict.fromkeys(c.dtype for c in cases)
                           for e in run_dtype(d, [c for c in cases if c.dtype == d], ckpt, hf_config, args)]
        report["summary"] = summarize(report["cases"])
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
