"""The read bandwidth of the storage under lp-bench's offload folder, the bound a cold-cache config is judged
against: a scratch file written there, evicted from the page cache, and read back past it (``O_DIRECT``) in
large aligned chunks on as many threads as the disk tier reads with. Where the file system refuses direct
I/O the read is buffered after an eviction; a folder in memory (tmpfs) has no storage below it and gives no
bound."""

from __future__ import annotations

import errno
import mmap
import os
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CHUNK = 16 * 1024 * 1024  # bytes a read asks for (aligned for O_DIRECT)
IN_MEMORY = ("tmpfs", "ramfs")  # file systems whose pages are the only copy: eviction reads nothing from a disk


def fs_type(folder: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system ``folder`` lives on (the longest mount point holding it, from the table
    ``mounts``; None without one)."""
    try:
        with open(mounts) as f:
            table = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path, best = os.path.realpath(folder), None
    for point, kind in table:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # the table escapes " \t\n\\"
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, kind)
    return best[1] if best else None


def scratch_bytes(nbytes: int) -> int:
    """The size of the scratch file :func:`storage_read` writes for ``nbytes``: whole chunks, at least one."""
    return max(CHUNK, -(-nbytes // CHUNK) * CHUNK)


def _write_scratch(folder: str, nbytes: int) -> str:
    fd, path = tempfile.mkstemp(prefix=".lp-bench-read-", dir=folder)
    try:
        block = os.urandom(min(CHUNK, nbytes))  # incompressible, in case the storage compresses
        done = 0
        while done < nbytes:
            done += os.write(fd, block[: nbytes - done])
        os.fsync(fd)  # on the disk, so that eviction drops every page
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def evict(path: str) -> None:
    """Ask the kernel to drop ``path``'s pages from the page cache: flushed first (written pages are dropped only
    once they are on the disk), then ``posix_fadvise`` DONTNEED. Pages a live mapping holds stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class DirectIORefused(OSError):
    """The file system refuses direct I/O (``O_DIRECT``) on this file."""


_REFUSALS = (errno.EINVAL, errno.EOPNOTSUPP)  # what open or read answer where O_DIRECT is not supported


def read_files(paths: list, threads: int, piece: int = CHUNK, direct: bool = True) -> tuple[int, float]:
    """Read every file in ``paths`` whole, in ``piece``-byte reads spread over ``threads`` threads, each into its
    own page-aligned buffer; with ``direct``, past the page cache (``O_DIRECT``: a file's tail short of a 4 KiB
    block is left out). Each file is opened once, before the clock starts, and read at positions by every thread.
    Returns (bytes read, seconds). Raises :class:`DirectIORefused` where the file system refuses direct I/O,
    ValueError when there is nothing to read."""
    sizes = [os.path.getsize(p) // 4096 * 4096 if direct else os.path.getsize(p) for p in paths]
    if not any(sizes):
        raise ValueError(f"nothing to read in {len(paths)} file(s)" + (" of a 4 KiB block or more" if direct else ""))
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds: list[int] = []
    local = threading.local()

    def work(job: tuple) -> int:
        fd, pos, n = job
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
        try:
            got = os.preadv(fd, [memoryview(local.buf)[:n]], pos)
        except OSError as exc:
            if direct and exc.errno in _REFUSALS:
                raise DirectIORefused(exc.errno, f"direct reads refused: {exc.strerror}") from exc
            raise
        if got < n:
            raise OSError(f"short read at {pos}: {got} of {n} bytes")
        return got

    try:
        for path in paths:
            try:
                fds.append(os.open(path, flags))
            except OSError as exc:
                if direct and exc.errno in _REFUSALS:
                    raise DirectIORefused(exc.errno, f"direct I/O refused on {path}: {exc.strerror}") from exc
                raise
        jobs = [(fd, pos, min(piece, size - pos)) for fd, size in zip(fds, sizes) for pos in range(0, size, piece)]
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            total = sum(pool.map(work, jobs))
            return total, time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)


def _timed_reads(path: str, iters: int, threads: int, direct: bool) -> list | None:
    """GB/s of ``iters`` reads of the file, each after an eviction; None where direct I/O is refused."""
    rates: list[float] = []
    for _ in range(iters):
        evict(path)
        try:
            nbytes, seconds = read_files([path], threads, direct=direct)
        except DirectIORefused:
            return None
        rates.append(nbytes / seconds / 1e9)
    return rates


def storage_read(folder: str, nbytes: int, iters: int = 3, threads: int | None = None) -> dict:
    """GB/s (1e9 bytes/s) reading ``nbytes`` (rounded up to whole chunks) of a file in ``folder`` from the storage
    itself, median of ``iters`` reads, each from a cold page cache. Keys: ``gbps`` (None for a folder in memory),
    ``min``, ``max``, ``bytes``, ``threads``, ``direct`` (read with O_DIRECT), ``fs`` and ``note``."""
    from lp_plugin.core.tiers.disk import DiskTier

    if not hasattr(os, "posix_fadvise"):
        raise RuntimeError("measuring the storage's read speed needs posix_fadvise (Linux)")
    threads = threads or DiskTier.readers
    nbytes = scratch_bytes(nbytes)
    kind = fs_type(folder)
    out = {"gbps": None, "min": None, "max": None, "bytes": nbytes, "threads": threads, "direct": False, "fs": kind}
    if kind in IN_MEMORY:
        out["note"] = f"{folder} is on {kind}: its pages are the only copy, there is no storage to read from"
        return out
    path = _write_scratch(folder, nbytes)
    try:
        rates = _timed_reads(path, iters, threads, direct=True) if hasattr(os, "O_DIRECT") else None
        out["direct"] = rates is not None
        if rates is None:  # a file system without direct I/O: buffered reads after an eviction
            rates = _timed_reads(path, iters, threads, direct=False) or []
    finally:
        os.unlink(path)
    out.update(gbps=statistics.median(rates), min=min(rates), max=max(rates))
    out["note"] = None if out["direct"] else "the file system refuses O_DIRECT: buffered reads after an eviction"
    return out
