"""The disk tier beyond host memory: a model larger than the host budget, streamed from its layer files in an
emulated card, as a user with a small GPU and little host memory would run it.

    python benchmarks/disk_tier.py --model llama-3-8b-shape --card 6GiB --host-memory 4GiB --out DIR

Steps, each in a fresh process: the shape saved once (bf16, seeded, on the GPU) into ``--ckpt-dir`` (a real disk:
direct I/O needs one); the plain model on the whole GPU (the prompt's last logits and greedy tokens); then in the
card (a ballast process holds the rest of the GPU) ``lp_plugin.from_pretrained(ckpt, offload="auto", tier="disk",
max_memory={0: CARD, "cpu": HOST})`` and, for comparison, the same load with the cpu tier and no host budget. In
each: the outputs against the plain model's, then paired rounds (a warm-up round dropped) of one prefill of ``--prompt``
tokens and ``--new`` decode steps, with the layer files cold (evicted from the page cache before each timed part)
and warm (read into it first); the storage's own direct-read bandwidth of the same files (O_DIRECT, the tier's
threads and piece size) is measured in the same process. Host memory (VmRSS) is sampled every 5 ms after the load;
the device's used memory by NVML in the parent.

Goals (issue 21): cold decode and prefill >= 0.85 of the direct-read bound (bandwidth / bytes read per forward);
warm decode >= 0.8x the cpu tier's (the disk tier lends its cached files to CUDA where they fit the host budget: pass
one at least their size); outputs equal to the plain model's; the device peak within the card; resident
host memory after the load within the host budget. Writes DIR/disk-tier-<model>-<card>-host<HOST>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import card  # noqa: E402 - the card benchmark's ballast, sampler, checkpoint and step runner

GiB = 2**30
HERE = Path(__file__).resolve()
COLD_GOAL, WARM_GOAL = 0.85, 0.8


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b-shape")
    ap.add_argument("--card", default="6GiB")
    ap.add_argument("--host-memory", default="4GiB", help="max_memory['cpu'] of the disk tier's load")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (the prefill timed)")
    ap.add_argument("--new", type=int, default=2, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=2, help="paired rounds after a warm-up (default: %(default)s)")
    ap.add_argument("--ckpt-dir", default=".", help="where the shape and the layer files go: a real disk")
    ap.add_argument("--work-dir", help="step specs, results, logs (default: a temporary folder)")
    ap.add_argument("--no-cpu-tier", action="store_true", help="skip the cpu tier's run")
    ap.add_argument("--out", help="folder for the report (required)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ in the steps
class RssSampler:
    """This process's resident host memory (VmRSS) every 5 ms, in a thread: the peak since :meth:`reset`."""

    def __init__(self):
        self.peak, self._stop, self._lock = 0, threading.Event(), threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        return (card.host_memory() or {}).get("rss", 0)

    def _run(self):
        while not self._stop.is_set():
            with self._lock:  # (a reset between reading and writing the peak would be undone)
                self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def reset(self) -> int:
        with self._lock:
            self.peak = self.now()
            return self.peak

    def stop(self):
        self._stop.set()


def _files(folder: str) -> list:
    return sorted(str(p) for p in Path(folder).glob("*.safetensors"))


def _warm(paths: list) -> None:
    """Read every file once through the page cache (what a just-written or recently read file looks like)."""
    buf = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _evict(paths: list) -> None:
    from lp_plugin.tools.bench.storage import evict

    for path in paths:
        evict(path)


def direct_read_gbps(paths: list, threads: int, piece: int) -> dict:
    """The storage's own bandwidth for these files: O_DIRECT reads of ``piece`` bytes from ``threads`` threads
    into aligned buffers, the files evicted first (GB/s, 1e9 bytes/s)."""
    from lp_plugin.tools.bench.storage import read_files

    _evict(paths)
    total, seconds = read_files(paths, threads, piece)
    return {"gbps": total / seconds / 1e9, "bytes": total, "seconds": seconds, "threads": threads, "piece": piece}


def step_reference(spec: dict) -> dict:
    import torch

    from lp_plugin.tools.shapes import load_checkpoint

    model = load_checkpoint(spec["folder"], "bf16", "cuda")
    ids = card._prompt(model.config.vocab_size, spec["prompt"], spec["seed"]).to("cuda")
    with torch.no_grad():
        last = model(ids).logits[0, -1].float().cpu()
    tokens, _ = card._generate(model, ids, spec["new"])
    torch.save({"last": last, "tokens": tokens}, spec["reference_file"])
    return {"tokens": tokens}


def _bytes_read(handle) -> tuple:
    tiers = {id(u.tier): u.tier for u in handle.units}.values()
    read = [t.bytes_read() for t in tiers]
    return sum(r for r, _ in read), sum(d for _, d in read)


def step_workload(spec: dict) -> dict:
    import torch

    import lp_plugin
    from lp_plugin.tools.bench.measure import bare_decode, prefill_run

    rss = RssSampler()
    dev = torch.device("cuda", 0)
    torch.cuda.mem_get_info()
    options = {"offload": "auto", "tier": spec["tier"], "dtype": torch.bfloat16,
               "max_context": spec["prompt"] + spec["new"] + card.DECODE_PROMPT}
    if spec["tier"] == "disk":
        options["offload_folder"] = spec["offload_folder"]
    options["max_memory"] = {0: spec["card_bytes"]}  # the card, as its owner writes it
    if spec.get("host_bytes"):
        options["max_memory"]["cpu"] = spec["host_bytes"]
    t0 = time.perf_counter()
    model = lp_plugin.from_pretrained(spec["folder"], **options)
    out = {"load_s": time.perf_counter() - t0}
    gc.collect()
    out["host_after_load"] = card.host_memory()
    out["rss_peak_during_load"] = rss.peak
    handle = lp_plugin.get_handle(model)
    info = handle.info()
    out["plan"] = {k: info.get(k) for k in ("mode", "tier", "prefetch", "offloaded_layers", "bytes_per_forward",
                                            "ring_slots", "budget")}
    out["bypasses_cache"] = getattr(handle.units[0].tier, "bypasses_cache", lambda: None)()
    out["pins"] = getattr(handle.units[0].tier, "pins", lambda: None)()
    files = _files(spec["offload_folder"]) if spec["tier"] == "disk" else []
    rss.reset()
    ref = torch.load(spec["reference_file"])
    ids = card._prompt(model.config.vocab_size, spec["prompt"], spec["seed"]).to(dev)
    with torch.no_grad():
        last = model(ids).logits[0, -1].float().cpu()
    tokens, _ = card._generate(model, ids, spec["new"])
    out["last_logits_equal"] = bool(torch.equal(last, ref["last"]))
    out["tokens_equal"] = tokens == ref["tokens"]
    phases = ["warm", "cold"] if files else ["warm"]
    rounds = [{} for _ in range(spec["rounds"] + 1)]
    tier = handle.units[0].tier if files else None
    # every warm round first: a cold one takes back the cached pages the tier lent to CUDA, for good (DiskTier.pins)
    for phase in phases:
        for r, row in enumerate(rounds):
            for part in ("prefill", "decode"):
                if phase == "cold":
                    tier.drop_page_cache()
                    _evict(files)
                elif files:
                    _warm(files)
                before = _bytes_read(handle)
                with lp_plugin.session(model):
                    if part == "prefill":
                        tok_s = prefill_run(model, ids, dev)
                        forwards = 1
                    else:
                        short = ids[:, : card.DECODE_PROMPT]
                        tok_s = bare_decode(model, short, spec["new"], dev, warm_steps=0)["tok_s"]
                        forwards = spec["new"] + 1  # (the short prompt's forward reads the layers too)
                after = _bytes_read(handle)
                row[f"{phase}_{part}_tok_s"] = tok_s
                row[f"{phase}_{part}_bytes_read"] = after[0] - before[0]
                row[f"{phase}_{part}_direct_bytes"] = after[1] - before[1]
                row[f"{phase}_{part}_forwards"] = forwards
            if phase == "warm" and tier is not None and r == 0:
                out["pinned_cache_bytes"] = tier.pinned_cache_bytes()
    out["rounds"] = rounds[1:]  # (the first round of each phase warms up)
    out["rss_peak_after_load"] = rss.peak
    out["host_at_end"] = card.host_memory()
    if files:
        from lp_plugin.core.tiers.disk import DiskTier
        from lp_plugin.core.tiers.mapped import READ_CHUNK

        try:
            out["direct_read"] = direct_read_gbps(files, DiskTier.readers, READ_CHUNK)
        except OSError as exc:  # (DirectIORefused where the file system has no direct I/O)
            out["direct_read"] = {"error": f"{type(exc).__name__}: {exc}"}
        out["files_bytes"] = sum(os.path.getsize(p) for p in files)
    out["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["peak_mapped_bytes"] = handle.peak_mapped_bytes
    rss.stop()
    return out


STEPS = {"reference": step_reference, "workload": step_workload}


# ------------------------------------------------------------------------------------------------ the parent
def _median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def _child(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    try:
        result = STEPS[args.step](spec)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the parent reads the failure from the result file
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    card._write_json(args.result, result)
    return 0 if result["ok"] else 1


def verdict(report: dict) -> list:
    """``[(check, value, goal, met)]`` of the goals this run can judge."""
    disk, cpu = report.get("disk") or {}, report.get("cpu") or {}
    checks = []
    rounds = disk.get("rounds") or []
    bw = (disk.get("direct_read") or {}).get("gbps")
    if rounds and bw:
        for part, goal in (("decode", COLD_GOAL), ("prefill", COLD_GOAL)):
            ratios = []
            for r in rounds:
                per_forward = r[f"cold_{part}_bytes_read"] / r[f"cold_{part}_forwards"]
                tokens = report["prompt"] if part == "prefill" else 1
                bound = tokens * bw * 1e9 / per_forward if per_forward else None
                if bound:
                    ratios.append(r[f"cold_{part}_tok_s"] / bound)
            direct = min(r[f"cold_{part}_direct_bytes"] / max(r[f"cold_{part}_bytes_read"], 1) for r in rounds)
            if ratios:
                v = statistics.median(ratios)
                checks.append((f"cold {part} vs direct-read bound", round(v, 3), f">= {goal}", v >= goal))
                checks.append((f"cold {part}: share of bytes read past the page cache", round(direct, 3), ">= 0.99",
                               direct >= 0.99))
    if rounds and cpu.get("rounds"):
        ratios = [d["warm_decode_tok_s"] / c["warm_decode_tok_s"] for d, c in zip(rounds, cpu["rounds"])]
        v = statistics.median(ratios)
        checks.append(("warm decode vs cpu tier", round(v, 3), f">= {WARM_GOAL}", v >= WARM_GOAL))
    for name, w in (("disk", disk), ("cpu", cpu)):
        if w:
            checks.append((f"{name}: outputs equal", bool(w.get("tokens_equal") and w.get("last_logits_equal")),
                           "tokens and last logits equal", bool(w.get("tokens_equal") and w.get("last_logits_equal"))))
            if w.get("device_peak_bytes") is not None:
                peak = w["device_peak_bytes"]  # the device's used memory over the ballast's: the CUDA context included
                checks.append((f"{name}: device peak GiB", round(peak / GiB, 3),
                               f"<= {report['card']}", peak <= report["card_bytes"]))
    if disk.get("rss_peak_after_load"):
        v = disk["rss_peak_after_load"]
        checks.append(("disk: resident host memory after load GiB", round(v / GiB, 3), f"<= {report['host_memory']}",
                       v <= report["host_bytes"]))
    return checks


def main(argv=None) -> int:
    args = _parse(argv)
    if args.step:
        return _child(args)
    if not args.out:
        print("disk_tier.py: --out DIR is required", file=sys.stderr)
        return 2
    from lp_plugin.planning.config import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lp-disk-tier-"))
    work.mkdir(parents=True, exist_ok=True)
    card_bytes, host_bytes = parse_size(args.card), parse_size(args.host_memory)
    report = {"model": args.model, "card": args.card, "card_bytes": card_bytes, "host_memory": args.host_memory,
              "host_bytes": host_bytes, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
              "gpu": card._driver_version()}
    name = f"disk-tier-{args.model}-{args.card}-host{args.host_memory}.json"
    ckpt = card.run_step("checkpoint", work, "checkpoint", {"model": args.model, "seed": 0,
                                                             "dirs": [os.path.abspath(args.ckpt_dir)]}, 900)
    if not ckpt.get("ok"):
        report["error"] = "checkpoint"
        card._write_json(out / name, report)
        return 1
    folder = ckpt["folder"]
    spec = {"folder": folder, "card_bytes": card_bytes, "prompt": args.prompt, "new": args.new, "seed": 0,
            "rounds": args.rounds, "reference_file": str(work / "reference.pt")}
    report["reference"] = card.run_step("reference", work, "reference", spec, 600, script=HERE)
    offload_folder = os.path.join(os.path.abspath(args.ckpt_dir), "lp-disk-tier-files")
    sampler = card.Sampler({}, work)
    ballast = None
    try:
        ballast, report["ballast"] = card.start_ballast(work, card_bytes)
        runs = [("disk", {"tier": "disk", "host_bytes": host_bytes, "offload_folder": offload_folder})]
        if not args.no_cpu_tier:
            runs.append(("cpu", {"tier": "cpu", "host_bytes": None, "offload_folder": None}))
        for label, extra in runs:
            report[label] = card.sampled_step(sampler, "workload", work, label, {**spec, **extra}, 1200, script=HERE)
            card._write_json(out / name, report)
    finally:
        if ballast is not None:
            card._stop(ballast)
        sampler.close()
    for label in ("disk", "cpu"):
        w = report.get(label)
        if w and w.get("rounds"):
            w["summary"] = {k: _median(w["rounds"], k) for k in w["rounds"][0]}
    report["verdict"] = [dict(zip(("check", "value", "goal", "met"), c)) for c in verdict(report)]
    card._write_json(out / name, report)
    for c in report["verdict"]:
        print(f"  [{'ok' if c['met'] else 'MISS'}] {c['check']}: {c['value']} (goal {c['goal']})")
    return 0 if all(c["met"] for c in report["verdict"]) else 1


if __name__ == "__main__":
    sys.exit(main())
