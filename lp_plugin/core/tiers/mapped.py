"""A verified layer file: opened once, its payload hashed as read, mapped copy-on-write (what the model's
tensors point at between uses), its identity and times recorded so that every later use can tell with one
``fstat`` whether the file is still what was verified. Transfers read the file (never the mapping, whose
pages would count as the process's memory): what the page cache holds is copied from it, the rest read
with direct I/O where the file system allows it, so a model larger than host memory streams without
filling the page cache. Where the files stay cached, a second, read-only mapping can be lent to CUDA
(:meth:`MappedFile.pin`): the GPU then copies the cached pages themselves. What is and is not caught:
docs/architecture.md; the reads: docs/disk.md."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import sys
import threading
import time
import weakref
from concurrent.futures import wait

import numpy as np
import torch

from ...errors import OffloadFileError
from .. import pinning
from .layerfile import ALIGN, Malformed, fd_path

log = logging.getLogger("lp_plugin")

_CHUNK = 8 << 20  # bytes per hashing read
READ_CHUNK = 16 << 20  # bytes per transfer read: the unit of parallel reads (a multiple of ALIGN)
_PAGE = mmap.PAGESIZE


def _load_mincore():
    """libc's ``mincore`` (which pages of a mapped range the page cache holds), or None where there is none or
    lp_plugin's blocks are not whole pages. (A read with ``RWF_NOWAIT`` would say it too, but a miss starts the
    page cache's readahead of the range, which the direct read then reads a second time.)"""
    if ALIGN % _PAGE or not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


_MINCORE = _load_mincore()


def _tick_ns() -> int:
    """Granularity of file times on Linux: the coarse clock the kernel stamps them with."""
    try:
        return max(int(time.clock_getres(5) * 1e9), 1_000_000)  # 5: CLOCK_REALTIME_COARSE
    except (OSError, AttributeError):
        return 10_000_000


_RECENT_NS = 2 * _tick_ns()


def stamp(st: os.stat_result) -> tuple:
    """Identity and times of a file: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256_read(fd: int, start: int, nbytes: int) -> str:
    """SHA-256 of the file's bytes ``[start, start + nbytes)``, read (not mapped); raises
    :class:`Malformed` if the file ends first."""
    h, buf = hashlib.sha256(), bytearray(min(_CHUNK, max(nbytes, 1)))
    pos, end = start, start + nbytes
    while pos < end:
        got = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
        if got <= 0:
            raise Malformed("truncated or extended (its size does not match its header)")
        h.update(memoryview(buf)[:got])
        pos += got
    return h.hexdigest()


def _open_direct(fd: int) -> int | None:
    """A read-only descriptor of the file behind ``fd`` that bypasses the page cache (``O_DIRECT``), or
    None where the platform or the file system has none."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(fd_path(fd), os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _close_fds(fds: list) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):  # (each one, whatever became of another)
                os.close(fd)


class MappedFile:
    """The open layer file ``fd`` (owned from here on), its copy-on-write mapping and ``data``: a
    uint8 tensor over the payload. Writes through ``data`` change memory only, never the file.
    Built by :meth:`verify`."""

    def __init__(self, fd, path, what, mapping, start, nbytes, sha256, st):
        self.fd, self.path, self.what = fd, path, what
        self.map, self.start, self.nbytes, self.sha256 = mapping, start, nbytes, sha256
        self.stamp = stamp(st)
        # a second descriptor reading past the page cache (None: the payload is not block-aligned in the
        # file, or the file system refuses direct I/O: tmpfs, some network file systems)
        self.direct_fd: int | None = _open_direct(fd) if start % ALIGN == 0 else None
        # mincore reports the page cache of a file only to its owner or a writer (to others: every page cached)
        self.probe_cache = st.st_uid == os.geteuid() or os.access(fd_path(fd), os.W_OK)
        self._lock = threading.Lock()
        self.read_bytes = 0  # bytes the transfers read from the file
        self.direct_bytes = 0  # of those, read with direct I/O (from the disk, past the page cache)
        self.data: torch.Tensor | None = (
            torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        # the payload in the file's pages, lent to CUDA (pin): a copy source for transfers, never written
        self.pinned: torch.Tensor | None = None
        self._lent: pinning.Lent | None = None  # the mapping registered with CUDA, while pinned
        # last (a failure before leaves ``fd`` to the caller): both descriptors close with close(), or when the
        # file is collected unclosed (a model dropped without detach), since an open descriptor would keep a
        # deleted file's disk space for the process's life
        self._close_fds = weakref.finalize(self, _close_fds, [fd, self.direct_fd])
        self._close_fds.atexit = False

    @classmethod
    def verify(cls, fd, path, what, start, nbytes, sha256, since) -> MappedFile:
        """Map ``fd`` and check that its payload ``[start, start + nbytes)`` hashes to ``sha256``
        while the file holds still since ``since`` (its ``fstat`` before the header was read).
        Raises :class:`Malformed` with the reason; the caller keeps ``fd`` then."""
        for attempt in range(2):
            before = since if attempt == 0 else os.fstat(fd)
            if before.st_size != start + nbytes:
                raise Malformed("truncated or extended (its size does not match its header)")
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise OffloadFileError(
                    f"{what}: cannot map {path} into memory ({exc.strerror}); pass an offload_folder on a local disk"
                ) from exc
            try:
                digest = _sha256_read(fd, start, nbytes)
                after = os.fstat(fd)
                if stamp(before) != stamp(after):
                    raise Malformed("changed while lp_plugin was verifying it (another program is writing to it)")
                if digest != sha256:
                    raise Malformed("corrupt (its bytes do not match its fingerprint)")
            except BaseException:
                mapping.close()
                raise
            age = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns)
            if attempt == 0 and age < _RECENT_NS:
                # a write in the same clock tick as the file's last change would not move its times:
                # hash again once that tick is over, so any later write shows in the stamp
                mapping.close()
                time.sleep((_RECENT_NS - max(age, 0)) / 1e9)
                continue
            return cls(fd, path, what, mapping, start, nbytes, sha256, after)
        raise AssertionError("unreachable")

    def read(self, dst: torch.Tensor, pool=None, direct: bool = True) -> None:
        """Copy the payload into the host uint8 tensor ``dst`` (exactly ``nbytes``), in pieces of
        :data:`READ_CHUNK` on ``pool`` (an executor) when given. With ``direct``, each piece copies what
        the page cache holds and reads the rest with direct I/O where ``dst`` is block-aligned; otherwise
        (and where direct I/O cannot be used) through the page cache, which then keeps the bytes."""
        view = dst.numpy().data if self.nbytes else memoryview(b"")
        aligned = direct and self.direct_fd is not None and dst.data_ptr() % ALIGN == 0
        pieces = [(off, min(READ_CHUNK, self.nbytes - off)) for off in range(0, self.nbytes, READ_CHUNK)]
        if pool is None or len(pieces) < 2:
            done = [self._read_piece(view, off, n, aligned) for off, n in pieces]
        else:
            futures = [pool.submit(self._read_piece, view, off, n, aligned) for off, n in pieces]
            wait(futures)  # every piece has stopped writing into dst before an error is raised
            done = [f.result() for f in futures]
        with self._lock:
            self.read_bytes += self.nbytes
            self.direct_bytes += sum(done)

    def _read_piece(self, view, off: int, n: int, aligned: bool) -> int:
        """Read payload bytes ``[off, off + n)`` into ``view[off:]``; returns how many came by direct I/O."""
        direct, pos, end = 0, off, off + n
        if aligned and self.direct_fd is not None:
            blocks_end = end - n % ALIGN  # whole blocks; the file's last, partial one goes through the cache
            for start, stop, cached in self._runs(off, blocks_end):
                dfd = None if cached else self.direct_fd
                k = 0
                if dfd is not None:
                    try:
                        k = self._pread(dfd, view, start, stop - start)
                        direct += k
                    except OSError as exc:  # refused after all (EINVAL: a block above ALIGN): the cache from now on
                        self._give_up_direct(exc)
                if k < stop - start:
                    k += self._pread(self.fd, view, start + k, stop - start - k)
                if k != stop - start:
                    raise self._ended_early()
            pos = blocks_end
        if pos < end and self._pread(self.fd, view, pos, end - pos) != end - pos:
            raise self._ended_early()
        return direct

    def _ended_early(self) -> OffloadFileError:
        return OffloadFileError(
            f"{self.what}: {self.path} ended early while it was read: the file was truncated after attach; "
            "reload the model (lp_plugin.from_pretrained, or attach a freshly loaded model), which rebuilds it"
        )

    def _runs(self, start: int, stop: int) -> list:
        """``[(start, stop, cached)]``: the payload range ``[start, stop)`` (whole pages) cut where the page cache
        starts or stops holding it, asked with ``mincore`` on the file's mapping (which reports the cache's pages
        of a file its owner maps, mapped or not); all of it uncached where that cannot be asked."""
        if stop <= start:
            return []
        if _MINCORE is None or self.data is None or not self.probe_cache:
            return [(start, stop, False)]
        pages = (stop - start) // _PAGE
        vec = ctypes.create_string_buffer(pages)
        if _MINCORE(self.data.data_ptr() + start, stop - start, vec) != 0:
            return [(start, stop, False)]
        resident = np.frombuffer(vec.raw, dtype=np.uint8) & 1
        cuts = [0, *(np.flatnonzero(np.diff(resident)) + 1).tolist(), pages]
        return [(start + a * _PAGE, start + b * _PAGE, bool(resident[a])) for a, b in zip(cuts, cuts[1:])]

    def _pread(self, fd: int, view, off: int, n: int) -> int:
        """Read up to ``n`` payload bytes at ``off`` into ``view[off:]`` (fewer only at the end of the file)."""
        got = 0
        while got < n:
            k = os.preadv(fd, [view[off + got : off + n]], self.start + off + got)
            if k <= 0:
                break
            got += k
        return got

    def _give_up_direct(self, exc: OSError) -> None:
        with self._lock:  # (the descriptor closes with the file: another piece may be reading through it now)
            dfd, self.direct_fd = self.direct_fd, None
        if dfd is not None:
            log.info(
                "lp_plugin: %s: direct reads of %s refused (%s); reading through the page cache",
                self.what,
                self.path,
                exc.strerror,
            )

    def check(self) -> None:
        """Raise :class:`OffloadFileError` unless the file still holds the verified payload."""
        st = os.fstat(self.fd)
        if stamp(st) == self.stamp:
            return
        if st.st_size < self.start + self.nbytes:
            raise OffloadFileError(
                f"{self.what}: {self.path} holds {max(0, st.st_size - self.start)} of its {self.nbytes} bytes: the "
                "file was truncated after attach, and it was the only copy of these weights; reload the model "
                "(lp_plugin.from_pretrained, or attach a freshly loaded model), which rebuilds the file"
            )
        if self._payload_matches(st):
            log.info("lp_plugin: %s: %s changed on disk but still holds the verified bytes", self.what, self.path)
            self.stamp = stamp(st)
            return
        raise OffloadFileError(
            f"{self.what}: {self.path} was changed after lp_plugin verified it (its bytes no longer match the weights "
            "it held), and it was the only copy of these weights, so they are not used; reload the model "
            "(lp_plugin.from_pretrained, or attach a freshly loaded model), which rebuilds the file, and keep other "
            "programs from writing to the offload folder"
        )

    def unchanged_since(self, seen: tuple) -> bool:
        """True when the file's stamp is still ``seen`` (one ``fstat``): nothing was written since."""
        return stamp(os.fstat(self.fd)) == seen

    def _payload_matches(self, st) -> bool:
        """Hash the payload as the file holds it now (read, not mapped: pages of the mapping the
        model wrote to are its own, the others show the file), while its stamp holds still."""
        try:
            digest = _sha256_read(self.fd, self.start, self.nbytes)
        except Malformed:
            return False
        return stamp(os.fstat(self.fd)) == stamp(st) and digest == self.sha256

    def pin(self) -> bool:
        """Map the file a second time, shared and read-only, and register that mapping with CUDA (read-only):
        :attr:`pinned`, its payload, is then the page cache's own pages, a copy source at the link's full speed,
        and they stay in host memory until :meth:`unpin`. Registering reads what the page cache lacks. Writes
        to the file show there (the engine :meth:`check`s the file before each copy); edits of :attr:`data`
        do not. False, holding nothing, where CUDA refuses (an empty payload needs nothing lent)."""
        if self.pinned is not None:
            return True
        if not self.nbytes:
            self.pinned = torch.empty(0, dtype=torch.uint8)
            return True
        try:
            mapping = mmap.mmap(self.fd, self.start + self.nbytes, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return False
        lent = pinning.Lent(mapping)
        if lent.tensor is None:  # refused
            mapping.close()
            return False
        del mapping
        self._lent = lent
        self.pinned = lent.tensor[self.start :]
        return True

    def unpin(self) -> None:
        """Give the pinned mapping back (its pages stay in the page cache, evictable again). The caller makes
        sure no copy from it is in flight; views of it handed out before are not to be used after (the mapping
        goes, so that its pages can leave the page cache)."""
        self.pinned = None
        lent, self._lent = self._lent, None
        if lent is not None:
            lent.release()

    def drop_page_cache(self) -> None:
        """Unmap the file's pages and evict them from the page cache (pages still mapped are never
        evicted by ``posix_fadvise`` alone)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.map.madvise(mmap.MADV_DONTNEED)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.unpin()
        self.data = None
        self.direct_fd = None
        with contextlib.suppress(BufferError):  # (only a buffer export refuses: torch views hold none, go first)
            self.map.close()
        self._close_fds()  # (once)
