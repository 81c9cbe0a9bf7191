"""Host buffers shared by the processes of one host: data-parallel ranks (``accelerate launch``,
``torchrun``) keep one copy of each offloaded layer in host memory instead of one each.

A layer's bytes live in a file in ``/dev/shm`` named by their SHA-256. The first rank to take the
file's lock writes it; every rank maps it and checks the mapping against its own fingerprint (a file
left by a dead run or put there by someone else is rewritten, never trusted), and pins its mapping
for DMA with ``cudaHostRegister`` (read-only, so no page is copied). The mapping is private
(copy-on-write): a rank that writes to a layer's weights changes its own pages only (the engine
refuses such edits in this mode, since the pinned pages would not follow them). When the last local
rank has mapped a file it is unlinked: the memory lives as long as a rank maps it, and nothing is
left in ``/dev/shm`` after the run. A rank killed before mapping leaves its file behind; the next run
with the same weights reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os

import torch

from . import pinning

SHM = "/dev/shm"


def local_ranks() -> int:
    """Processes of this run on this host (1 outside a launcher)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def sharing() -> bool:
    """Whether this process shares its host copy with the other local ranks: under a launcher with
    several local ranks, unless ``LP_PLUGIN_SHARE_HOST_COPY=0`` (one private pinned copy per rank)."""
    if os.environ.get("LP_PLUGIN_SHARE_HOST_COPY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return local_ranks() > 1 and os.path.isdir(SHM) and os.access(SHM, os.W_OK)


@contextlib.contextmanager
def _locked(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


class SharedBuffer:
    """``nbytes`` of host memory with the content ``flat`` (whose fingerprint is ``sha256``), shared by
    the local ranks that ask for the same fingerprint."""

    def __init__(self, flat: torch.Tensor, sha256: str, pin: bool):
        self.nbytes = flat.numel()
        path = os.path.join(SHM, f"lp_plugin-{sha256}")
        with _locked(path + ".lock") as lock_fd:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_size != self.nbytes or not _matches(fd, self.nbytes, sha256):
                    os.ftruncate(fd, self.nbytes)
                    shared = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED)
                    view = torch.frombuffer(shared, dtype=torch.uint8)
                    view.copy_(flat)
                    del view
                    shared.close()
                self.map = mmap.mmap(fd, self.nbytes, mmap.MAP_PRIVATE)
            finally:
                os.close(fd)
            users = _count_user(lock_fd)
            if users >= local_ranks():
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    os.unlink(path + ".lock")
        lent = pinning.Lent(self.map) if pin and self.nbytes else None
        self._lent = lent if lent is not None and lent.ok else None  # given back when closed or collected
        self.pinned = self._lent is not None
        self.tensor: torch.Tensor | None = (
            self._lent.tensor if self._lent is not None else torch.frombuffer(self.map, dtype=torch.uint8)
        )

    def close(self) -> None:
        self.tensor = None
        if self._lent is not None:
            self._lent.release()
        self.pinned = False
        with contextlib.suppress(BufferError):
            self.map.close()


def _matches(fd, nbytes, sha256) -> bool:
    with mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return hashlib.sha256(m).hexdigest() == sha256


def _count_user(lock_fd) -> int:
    """Add this process to the lock file's count of ranks that mapped the buffer; return the count."""
    raw = os.pread(lock_fd, 16, 0).strip(b"\0 \n") or b"0"
    users = (int(raw) if raw.isdigit() else 0) + 1
    os.pwrite(lock_fd, str(users).encode().ljust(16), 0)
    return users
