"""Ways to move warm page-cache bytes of layer files to the GPU, measured side by side (the disk tier's warm path).

    python benchmarks/page_cache_paths.py /dev/shm/probe     (RND=4: a warm-up round and 3 measured; NL=16 files)

16 files of 154 MiB (a Qwen2.5-3B bf16 layer) in the folder given, cached; every pass moves all of them to the
GPU through two device buffers, with and without another thread busy in Python (as the main thread is while it
launches kernels; switch interval 0.5 ms, as lp_plugin sets it while a disk ring is open). GB/s of the whole pass:

* h2d: pinned host buffers to the GPU alone (the bound);
* pread N: N threads read each file into a pinned staging buffer (lp_plugin's disk tier today), then H2D;
* mmapcopy_keep / mmapcopy / mmapcopy_pop N: one Tensor.copy_ from the file's mapping on N intra-op threads into
  pinned staging (pages left mapped / unmapped after each file / populated first with MADV_POPULATE_READ);
* pageable, pageable2 N: H2D straight from the mapping (pageable memory; N threads on N streams);
* register: cudaHostRegister (read-only) of each file's mapping, H2D from it, unregister after its copy;
* proc N: a helper process (its own GIL) reads with N threads into shared pinned staging; one pipe message a file;
* register all: every mapping registered once (its time), then H2D straight from the page cache.

Results: benchmarks/results/h200-page-cache-paths.{txt,json}; what they mean: docs/disk.md.
"""
# exploratory: ways to move warm page-cache bytes to the GPU
import mmap, os, sys, time, threading, statistics, ctypes
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch
N = int(os.environ.get("NL", 16)); NB = 154 << 20
d = sys.argv[1] if len(sys.argv) > 1 else "/dev/shm/probe"
os.makedirs(d, exist_ok=True)
paths = []
g = torch.Generator().manual_seed(0)
buf = torch.empty(NB, dtype=torch.uint8)
for i in range(N):
    p = f"{d}/l{i}.bin"; paths.append(p)
    if not os.path.exists(p) or os.path.getsize(p) != NB:
        buf.random_(0, 256, generator=g); buf.numpy().tofile(p)
fds = [os.open(p, os.O_RDONLY) for p in paths]
maps = [mmap.mmap(fd, NB, access=mmap.ACCESS_READ) for fd in fds]
for m in maps: m.madvise(mmap.MADV_WILLNEED)
import warnings; warnings.filterwarnings("ignore")
mts = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
for t in mts: t.sum()  # warm
dev = torch.empty(2, NB, dtype=torch.uint8, device="cuda")
stag = [torch.empty(NB, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
side = torch.cuda.Stream(); done = [torch.cuda.Event() for _ in range(2)]
cud = torch.cuda.cudart()
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes=[ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
pool = ThreadPoolExecutor(16)
def pread_into(i, dst, n):
    mv = memoryview(dst.numpy()); step = -(-NB // n)
    def piece(off):
        return os.preadv(fds[i], [mv[off:off + min(step, NB - off)]], off)
    list(pool.map(piece, range(0, NB, step)))
import subprocess
memfd = os.memfd_create("stag"); os.ftruncate(memfd, 2 * NB)
shm = mmap.mmap(memfd, 2 * NB); shmt = torch.frombuffer(shm, dtype=torch.uint8)
print("register shm", int(cud.cudaHostRegister(shmt.data_ptr(), 2 * NB, 0)))
stagP = [shmt[:NB], shmt[NB:]]
CHILD = r"""
import os, sys, mmap
from concurrent.futures import ThreadPoolExecutor
memfd, NB, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); paths = sys.argv[4:]
m = mmap.mmap(memfd, 2 * NB); mv = memoryview(m); fds = [os.open(p, os.O_RDONLY) for p in paths]
pool = ThreadPoolExecutor(n); step = -(-NB // n)
f = os.fdopen(0, "rb", buffering=0)
while True:
    line = f.readline()
    if not line: break
    i, s = map(int, line.split())
    def piece(off):
        return os.preadv(fds[i], [mv[s * NB + off: s * NB + off + min(step, NB - off)]], off)
    list(pool.map(piece, range(0, NB, step)))
    os.write(1, b"k\n")
"""
children = {}
def child(n):
    if n not in children:
        children[n] = subprocess.Popen([sys.executable, "-c", CHILD, str(memfd), str(NB), str(n), *paths], pass_fds=[memfd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    return children[n]
def run(kind, busy=False, n=8):
    stop = []
    if busy:
        def spin():
            x = 0
            while not stop: x += 1
        th = threading.Thread(target=spin); th.start()
    torch.cuda.synchronize(); t0 = time.perf_counter(); extra = 0.0
    if kind == "h2d":
        for i in range(N):
            with torch.cuda.stream(side): dev[i % 2].copy_(stag[i % 2], non_blocking=True)
    elif kind == "pread":
        for i in range(N):
            s = i % 2
            if i >= 2: done[s].synchronize()
            pread_into(i, stag[s], n)
            with torch.cuda.stream(side):
                dev[s].copy_(stag[s], non_blocking=True); done[s].record(side)
    elif kind.startswith("mmapcopy"):
        torch.set_num_threads(n)
        for i in range(N):
            s = i % 2
            if i >= 2: done[s].synchronize()
            if kind == "mmapcopy_pop":
                libc.madvise(ctypes.c_void_p(mts[i].data_ptr()), ctypes.c_size_t(NB), 22)  # MADV_POPULATE_READ
            stag[s].copy_(mts[i])
            if kind != "mmapcopy_keep":
                libc.madvise(ctypes.c_void_p(mts[i].data_ptr()), ctypes.c_size_t(NB), 4)  # MADV_DONTNEED
            with torch.cuda.stream(side):
                dev[s].copy_(stag[s], non_blocking=True); done[s].record(side)
        torch.set_num_threads(16)
    elif kind == "proc":
        ch = child(n)
        for i in range(N):
            s = i % 2
            if i >= 2: done[s].synchronize()
            os.write(ch.stdin.fileno(), f"{i} {s}\n".encode())
            assert os.read(ch.stdout.fileno(), 2) == b"k\n"
            with torch.cuda.stream(side):
                dev[s].copy_(stagP[s], non_blocking=True); done[s].record(side)
    elif kind == "pageable":
        for i in range(N):
            with torch.cuda.stream(side): dev[i % 2].copy_(mts[i], non_blocking=True)
    elif kind == "pageable2":
        streams = [torch.cuda.Stream() for _ in range(n)]
        def one(i):
            with torch.cuda.stream(streams[i % n]): dev[i % 2].copy_(mts[i], non_blocking=True)
            streams[i % n].synchronize()
        with ThreadPoolExecutor(n) as ex: list(ex.map(one, range(N)))
    elif kind == "register":
        regd = []
        for i in range(N):
            s = i % 2
            if i >= 2:
                done[s].synchronize(); r = cud.cudaHostUnregister(mts[i - 2].data_ptr()); regd.append(int(r))
            a = time.perf_counter()
            r = cud.cudaHostRegister(mts[i].data_ptr(), NB, 8)
            extra += time.perf_counter() - a
            if int(r) != 0: raise RuntimeError(f"register {r}")
            with torch.cuda.stream(side):
                dev[s].copy_(mts[i], non_blocking=True); done[s].record(side)
        torch.cuda.synchronize()
        for i in range(max(0, N - 2), N): cud.cudaHostUnregister(mts[i].data_ptr())
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    stop.append(1)
    if busy: th.join()
    return N * NB / dt / 1e9, extra
sys.setswitchinterval(0.0005)
res = {}
cases = [("h2d", False, 0), ("pread", False, 8), ("pread", True, 8), ("pread", False, 16), ("pread", True, 16),
         ("mmapcopy_keep", False, 8), ("mmapcopy_keep", True, 8), ("mmapcopy", False, 8), ("mmapcopy", True, 8),
         ("mmapcopy", False, 16), ("mmapcopy", True, 16), ("mmapcopy_pop", False, 16), ("mmapcopy_pop", True, 16), ("mmapcopy_pop", True, 8),
         ("pageable", False, 0), ("pageable", True, 0), ("pageable2", False, 2), ("pageable2", False, 4), ("pageable2", True, 4),
         ("register", False, 0), ("register", True, 0), ("proc", False, 8), ("proc", True, 8), ("proc", False, 16), ("proc", True, 16)]
for rnd in range(int(os.environ.get('RND', 4))):
    for c in cases:
        try:
            v, ex = run(*c)
        except Exception as e:
            v, ex = float("nan"), str(e)
        if rnd: res.setdefault(c, []).append((v, ex))
for c, vs in res.items():
    print(c, "GB/s median %.1f" % statistics.median(v for v, _ in vs), [round(v, 1) for v, _ in vs], "reg s:", [e if isinstance(e, str) else round(e, 3) for _, e in vs][:2], flush=True)
# permanent registration of all maps
t = time.perf_counter(); rs = [int(cud.cudaHostRegister(m.data_ptr(), NB, 8)) for m in mts]; t = time.perf_counter() - t
print("register all", rs[:3], "s", round(t, 3), "GB/s-equiv", round(N * NB / t / 1e9, 1))
torch.cuda.synchronize(); t0 = time.perf_counter()
for i in range(N):
    with torch.cuda.stream(side): dev[i % 2].copy_(mts[i], non_blocking=True)
torch.cuda.synchronize(); print("registered H2D GB/s", round(N * NB / (time.perf_counter() - t0) / 1e9, 1))
