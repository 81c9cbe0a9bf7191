"""Where the disk tier's time goes: read throughput of offload files into pinned staging buffers,
alone and overlapped with the host-to-device copies the stream engine issues, against a plain
pinned host-to-device copy of the same bytes. Two readers, by thread count:

* ``mmap``: the real ``DiskTier.read_into`` (the file mapped copy-on-write, one ``Tensor.copy_`` on
  ``torch.set_num_threads(n)`` intra-op threads);
* ``pread``: ``os.preadv`` of ``n`` equal pieces from a pool of ``n`` Python threads (what the
  tier did before).

    python benchmarks/disk_read.py --layer-mib 147 --layers 16 --out results.json

Each figure is GB/s (1e9 bytes/s) over all layers, median [min-max] of ``--repeats`` passes, page
cache warm (the files were just written and read once), except ``cold`` which evicts the files
with ``posix_fadvise(DONTNEED)`` before each pass. The last two columns keep another thread busy in
Python meanwhile (as the main thread is while it launches kernels), with the interpreter's GIL
switch interval at its 5 ms default and at the 0.5 ms the stream engine sets for a disk ring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from concurrent.futures import ThreadPoolExecutor

from lp_plugin.core.tiers import DiskTier, sha256_of


def _key(i):
    return f"layer_{i:05d}"


def _stat(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer-mib", type=float, default=147.0, help="bytes per layer (Qwen2.5-3B bf16: ~147 MiB)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", default="1,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    nbytes = int(args.layer_mib * 1024**2) // 256 * 256
    total = nbytes * args.layers
    folder = args.folder or tempfile.mkdtemp(prefix="lp_disk_read_")
    tier = DiskTier(pin=cuda, offload_folder=folder, model_tag="disk_read")
    flat = torch.empty(nbytes, dtype=torch.uint8)
    layout = [{"key": "flat", "dtype": "uint8", "shape": [nbytes], "offset": 0, "nbytes": nbytes}]
    g = torch.Generator().manual_seed(0)
    for i in range(args.layers):
        flat.random_(0, 256, generator=g)
        tier.put(_key(i), flat, layout, sha256_of(flat))
    staging = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    out = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "layer_bytes": nbytes, "layers": args.layers,
        "read_gbps": {}, "h2d_pinned_gbps": None, "cold_read_gbps": None,
    }
    pools = {}

    def pread_into(i, dst, n):
        entry = tier._files[_key(i)]
        mv = memoryview(dst.numpy())
        step = -(-nbytes // n)
        start = entry.start
        pool = pools.setdefault(n, ThreadPoolExecutor(max_workers=n))

        def piece(off):
            size = min(step, nbytes - off)
            return os.preadv(entry.fd, [mv[off:off + size]], start + off)

        assert sum(pool.map(piece, range(0, nbytes, step))) == nbytes

    def mmap_into(i, dst, n):
        torch.set_num_threads(n)
        tier.read_into(_key(i), dst)

    def read_pass(method, n, with_h2d, busy=False, switch=None):
        read = mmap_into if method == "mmap" else pread_into
        dev = torch.empty(2, nbytes, dtype=torch.uint8, device="cuda") if (with_h2d and cuda) else None
        side = torch.cuda.Stream() if dev is not None else None
        done = [torch.cuda.Event() for _ in range(2)] if dev is not None else None
        stop = []
        spinner = None
        if switch is not None:
            sys.setswitchinterval(switch)
        if busy:  # the main thread's role during decode: pure Python, holding the GIL
            import threading

            def spin():
                x = 0
                while not stop:
                    x += 1

            spinner = threading.Thread(target=spin)
            spinner.start()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.layers):
            s = i % 2
            if done is not None and i >= 2:
                done[s].synchronize()  # the copy out of this staging buffer finished
            read(i, staging[s], n)
            if dev is not None:
                with torch.cuda.stream(side):
                    dev[s].copy_(staging[s], non_blocking=True)
                    done[s].record(side)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stop.append(1)
        if spinner is not None:
            spinner.join()
        sys.setswitchinterval(default_switch)
        return total / dt / 1e9

    default_threads = torch.get_num_threads()
    default_switch = sys.getswitchinterval()
    read_pass("mmap", default_threads, False)  # warm the page cache and the mappings
    threads = [int(r) for r in args.threads.split(",")]
    columns = [("read", False, False, None), ("read+H2D", True, False, None),
               ("+GIL busy, 5 ms", True, True, 0.005), ("+GIL busy, 0.5 ms", True, True, 0.0005)]
    for _ in range(args.repeats):  # interleaved
        for method in ("mmap", "pread"):
            for n in threads:
                for col, h2d, busy, switch in columns:
                    if h2d and not cuda:
                        continue
                    out["read_gbps"].setdefault(f"{method}/{n}/{col}", []).append(read_pass(method, n, h2d, busy, switch))
    out["read_gbps"] = {k: _stat(v) for k, v in out["read_gbps"].items()}
    torch.set_num_threads(default_threads)
    if cuda:
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        rates = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.layers):
                dev.copy_(staging[0], non_blocking=True)
            torch.cuda.synchronize()
            rates.append(total / (time.perf_counter() - t0) / 1e9)
        out["h2d_pinned_gbps"] = _stat(rates)
    cold = []
    for _ in range(args.repeats):
        tier.drop_page_cache()
        cold.append(read_pass("mmap", default_threads, False))
    out["cold_read_gbps"] = _stat(cold)
    tier.close()

    fmt = lambda s: f"{s['median']:6.1f} [{s['min']:.1f}-{s['max']:.1f}]" if s else "-"  # noqa: E731
    print(f"disk tier reads: {args.layers} x {nbytes / 1024**2:.0f} MiB, {out['cpus']} CPUs, GPU {out['gpu']}; GB/s")
    print(f"{'reader':>6} {'threads':>7}" + "".join(f"  {c[0]:>22}" for c in columns))
    for method in ("mmap", "pread"):
        for n in threads:
            print(f"{method:>6} {n:>7}" + "".join(f"  {fmt(out['read_gbps'].get(f'{method}/{n}/{c[0]}')):>22}" for c in columns))
    if out["h2d_pinned_gbps"]:
        print(f"pinned H2D alone: {fmt(out['h2d_pinned_gbps'])}")
    print(f"cold page cache, mmap, {default_threads} threads: {fmt(out['cold_read_gbps'])}")
    for pool in pools.values():
        pool.shutdown()
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
