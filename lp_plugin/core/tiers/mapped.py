"""A verified layer file: opened once, mapped copy-on-write, its payload hashed as mapped, its identity
and times recorded so that every later use can tell with one ``fstat`` whether the file is still what
was verified. What is and is not caught: docs/architecture.md."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import time

import torch

from ...errors import OffloadFileError
from .layerfile import Malformed

log = logging.getLogger("lp_plugin")

_CHUNK = 8 << 20


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


class MappedFile:
    """The open layer file ``fd`` (owned from here on), its copy-on-write mapping and ``data``: a
    uint8 tensor over the payload. Writes through ``data`` change memory only, never the file.
    Built by :meth:`verify`."""

    def __init__(self, fd, path, what, mapping, start, nbytes, sha256, st):
        self.fd, self.path, self.what = fd, path, what
        self.map, self.start, self.nbytes, self.sha256 = mapping, start, nbytes, sha256
        self.stamp = stamp(st)
        self.data: torch.Tensor | None = (
            torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )

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
                # hashing through the mapping also maps every page: the first forward takes no faults
                with memoryview(mapping) as whole, whole[start : start + nbytes] as payload:
                    digest = hashlib.sha256(payload).hexdigest()
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
        h, buf = hashlib.sha256(), bytearray(min(_CHUNK, max(self.nbytes, 1)))
        pos, end = self.start, self.start + self.nbytes
        while pos < end:
            got = os.preadv(self.fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if got <= 0:
                return False
            h.update(memoryview(buf)[:got])
            pos += got
        return stamp(os.fstat(self.fd)) == stamp(st) and h.hexdigest() == self.sha256

    def drop_page_cache(self) -> None:
        """Unmap the file's pages and evict them from the page cache (pages still mapped are never
        evicted by ``posix_fadvise`` alone)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.map.madvise(mmap.MADV_DONTNEED)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.data = None
        with contextlib.suppress(BufferError):  # a view still alive elsewhere: unmapped when it goes
            self.map.close()
        os.close(self.fd)
