"""The ``disk`` tier: one safetensors layer file per offloaded layer in ``offload_folder``, verified at attach
(reused, written, or rebuilt when lp_plugin can prove the file is its own), mapped copy-on-write, checked
with one ``fstat`` before each transfer, read in parallel pieces (from the page cache what it holds, the
rest with direct I/O); where the files stay in the page cache and there is a GPU, their cached pages are lent
to CUDA once and transfers copy from them directly. How and why: docs/architecture.md, docs/disk.md."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from ...errors import OffloadFileError, OffloadSpecError
from .. import pinning
from . import layerfile
from .base import Tier, available_host_memory, describe
from .folder import OffloadFolder
from .layerfile import Malformed
from .mapped import MappedFile

log = logging.getLogger("lp_plugin")

_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


class DiskTier(Tier):
    name = "disk"
    needs_folder = True
    readers = min(8, os.cpu_count() or 1)  # threads reading one unit's pieces
    direct_reads: bool | None = None  # True/False: always/never bypass the page cache; None: see bypasses_cache
    pin_cached: bool | None = None  # True/False: always/never lend cached files to CUDA (with a GPU); None: see pins
    checks_files = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self._temporary = None  # the finalizer removing a temporary folder (made when none was given)
        if self.offload_folder is None:
            path = tempfile.mkdtemp(prefix="lp_plugin-offload-")
            self._temporary = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)  # also at exit
            log.debug("lp_plugin: disk tier without offload_folder: using the temporary folder %s", path)
            self.offload_folder = path
        self.folder = OffloadFolder(self.offload_folder)
        self.offload_folder = self.folder.path
        self._files: dict = {}  # key -> MappedFile
        self._pool: ThreadPoolExecutor | None = None  # the reads of one unit's pieces, in parallel
        self._pool_pid = 0  # the process that made it
        self._pool_lock = threading.Lock()
        self._written: set = set()  # units whose mapping holds writes (edits kept in standby): read from it
        self._read = self._direct = 0  # bytes read (and directly) from files no longer held
        self._bypass: bool | None = None  # see bypasses_cache
        self._pins: bool | None = None  # see pins
        self._pins_off = False  # drop_page_cache took the pages back for good

    def bypasses_cache(self) -> bool:
        """Whether reads take what the page cache lacks with direct I/O, leaving the cache as it was: forced by
        ``direct_reads``, else when this tier's files do not fit (:meth:`files_fit`: they could not stay cached,
        so reading them through the cache would only evict other files, and each forward would read them from the
        disk anyway). Decided at the first read."""
        if self._bypass is None:
            self._bypass = bool(self.direct_reads) if self.direct_reads is not None else not self.files_fit()
            log.debug(
                "lp_plugin: disk tier reads %s", "past the page cache" if self._bypass else "through the page cache"
            )
        return self._bypass

    def files_fit(self) -> bool:
        """Whether this tier's files fit in ``host_budget`` and in half the memory the host has available now."""
        total = sum(e.nbytes for e in self._files.values())
        available = available_host_memory()
        limits = [x for x in (self.host_budget, available // 2 if available else None) if x is not None]
        return not limits or total <= min(limits)

    def pins(self) -> bool:
        """Whether transfers copy straight from the files' cached pages, lent to CUDA (``cudaHostRegister``) once
        for the tier's life: forced by ``pin_cached``, else where there is a GPU, reads go through the page cache
        and the files fit (:meth:`files_fit`). Lent pages stay in host memory, as the cpu tier's copy would (shared
        with the page cache, not a second copy). Decided, and the files pinned, at the first ask after the units
        were put; a file CUDA refuses is read as before. Never again after :meth:`drop_page_cache`."""
        if self._pins is None:
            auto = not self.bypasses_cache() and self.files_fit()
            wanted = self.pin and not self._pins_off and (self.pin_cached if self.pin_cached is not None else auto)
            self._pins = bool(wanted) and self._pin_files()
            if not self._pins:
                self._unpin(self._files.values())
        return self._pins

    def _pin_files(self) -> bool:
        entries = [(k, e) for k, e in self._files.items() if k not in self._written and e.pinned is None]
        for _, entry in entries:  # the kernel reads what is not cached in the background while the first pins
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(entry.fd, 0, 0, os.POSIX_FADV_WILLNEED)
        for key, entry in entries:
            entry.check()
            if not entry.pin():
                log.info("lp_plugin: %s: transfers read %s (CUDA did not take its pages)", describe(key), entry.path)
        pinned = [e for e in self._files.values() if e.pinned is not None]
        log.debug(
            "lp_plugin: disk tier lends %d of %d files (%d bytes of cached pages) to CUDA",
            len(pinned),
            len(self._files),
            sum(e.nbytes for e in pinned),
        )
        return bool(pinned)

    @staticmethod
    def _unpin(entries) -> None:
        """Take pages back from CUDA once no copy from them can be in flight on any GPU."""
        entries = [e for e in entries if e.pinned is not None]
        if entries:
            pinning.synchronize_devices()
            for entry in entries:
                entry.unpin()

    def direct(self, key):
        return key not in self._written and self.pins() and self._entry(key).pinned is not None

    def transfer_view(self, key):
        entry = self._entry(key)
        if entry.pinned is None or key in self._written:
            raise OffloadFileError(f"{describe(key)} is not lent to CUDA: read it with read_into")
        return entry.pinned

    def pinned_cache_bytes(self) -> int:
        """Bytes of the files' cached pages lent to CUDA (held in host memory while the tier lives)."""
        return sum(e.nbytes for e in self._files.values() if e.pinned is not None)

    def _readers(self) -> ThreadPoolExecutor | None:
        """The pool reading a unit's pieces (made at the first read, and again in a forked child, where the
        parent's threads do not exist)."""
        if self.readers <= 1:
            return None
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="lp_plugin-disk")
                self._pool_pid = os.getpid()
            return self._pool

    def put(self, key, flat, layout, sha256):
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise OffloadSpecError(
                f"disk tier unit keys name files: use letters, digits and '_' (e.g. 'layer_00004'), got {key!r}"
            )
        name, what, nbytes = f"{key}.safetensors", describe(key), flat.numel()
        path = self.folder.entry_path(name)
        self._forget(key)
        self._written.discard(key)
        self._bypass = self._pins = None  # decided again, for all the files, at the next read
        with self.folder.locked():
            owned = self.folder.owned()
            found = self._inspect(name, what, key, layout, sha256, nbytes)
            if isinstance(found, MappedFile):
                self._files[key], self.report[key] = found, "reused"
                return
            why = None
            if found is not None:
                why, ours, st = found
                if not (ours or owned.owns(name, st)):
                    raise self.folder.refuse(name, what, f"is not a file lp_plugin wrote ({why})")
                log.log(
                    logging.INFO if why.startswith(layerfile.REALIGNED) else logging.WARNING,
                    "lp_plugin: %s: offload file %s is %s; rebuilding it from the source weights",
                    what,
                    path,
                    why,
                )
            meta = layerfile.metadata_for(key, self.model_tag, layout, sha256)
            fd = self.folder.replace(name, key, what, nbytes, lambda target: layerfile.write(target, flat, meta))
            try:
                self._files[key] = self._verify(fd, os.fstat(fd), path, what, key, layout, sha256, nbytes)
            except Malformed as exc:
                os.close(fd)
                raise OffloadFileError(
                    f"{what}: the file lp_plugin just wrote at {path} is {exc} when read back; another program is "
                    "changing files in offload_folder: stop it, or pass another offload_folder"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            self.report[key] = "written" if why is None else f"rebuilt: {why}"

    @staticmethod
    def _verify(fd, st, path, what, key, layout, sha256, nbytes) -> MappedFile:
        """The open file ``fd`` (``st``: its ``fstat`` now) as unit ``key``, verified and mapped;
        :class:`Malformed` says why not."""
        header = layerfile.read_header(fd, st.st_size)
        why = layerfile.mismatch(header, key, layout, sha256, nbytes)
        if why is not None:
            raise Malformed(why)
        return MappedFile.verify(fd, path, what, header.start, nbytes, sha256, since=st)

    def _inspect(self, name, what, key, layout, sha256, nbytes):
        """What is at the layer's path now: None (nothing), the verified :class:`MappedFile`, or
        ``(why, ours, st)``: why it cannot be used, whether its content proves it lp_plugin's (a
        complete file bearing lp_plugin's format mark), and its identity."""
        opened = self.folder.open_regular(name, what)
        if opened is None:
            return None
        if opened.fd is None:
            return opened.error, False, opened.st
        fd, st, header = opened.fd, opened.st, None
        try:
            header = layerfile.read_header(fd, st.st_size)
            why = layerfile.mismatch(header, key, layout, sha256, nbytes, self.model_tag)
            if why is None:
                return MappedFile.verify(fd, self.folder.entry_path(name), what, header.start, nbytes, sha256, since=st)
        except Malformed as exc:
            why = str(exc)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return why, header is not None and header.is_lp_plugin, st

    def _entry(self, key) -> MappedFile:
        entry = self._files.get(key)
        if entry is None:
            raise OffloadFileError(f"{describe(key)} is not in this disk tier (put it first)")
        return entry

    def _forget(self, key) -> None:
        entry = self._files.pop(key, None)
        if entry is not None:
            self._close(entry)

    def _close(self, entry: MappedFile) -> None:
        self._unpin([entry])
        self._read += entry.read_bytes
        self._direct += entry.direct_bytes
        entry.close()

    def bytes_read(self) -> tuple[int, int]:
        files = list(self._files.values())
        return self._read + sum(e.read_bytes for e in files), self._direct + sum(e.direct_bytes for e in files)

    def host_view(self, key):
        """The mapped payload, after :meth:`check`: whoever reads the file through the mapping (a
        copy the engine makes itself, a write-back into it) never touches pages of a truncated file
        (SIGBUS) nor bytes changed since verification."""
        entry = self._entry(key)
        entry.check()
        return entry.data

    def check(self, key):
        self._entry(key).check()

    def mark_written(self, key):
        entry = self._entry(key)
        self._written.add(key)
        self._unpin([entry])  # the edits are in the copy-on-write mapping: transfers read that from now on

    def read_into(self, key, dst):
        """Copy the unit into ``dst`` between two looks at the file: a change while the bytes are
        copied (which the check before cannot see) makes the copy start over, twice at most."""
        entry = self._entry(key)
        if dst.numel() != entry.nbytes:
            raise OffloadFileError(
                f"{describe(key)}: destination holds {dst.numel()} bytes, the tier {entry.nbytes}; "
                "pass a buffer of exactly the unit's size"
            )
        for _ in range(3):
            entry.check()
            seen = entry.stamp
            if key in self._written:
                dst.copy_(entry.data)  # (the mapping: the file's bytes where nobody wrote, the edits elsewhere)
            else:
                entry.read(dst, self._readers(), self.bypasses_cache())
            if entry.unchanged_since(seen):
                return
        raise OffloadFileError(
            f"{describe(key)}: {entry.path} kept changing while it was read; another program is writing to "
            "the offload folder: stop it, then reload the model (lp_plugin.from_pretrained, or attach a freshly "
            "loaded model)"
        )

    def drop_page_cache(self) -> None:
        """Unmap this tier's file pages and evict them from the page cache, so that the next read
        of each layer comes from the disk (cold-cache benchmarks). Discards edits written back into
        the mapping, and lent pages go back for good (transfers read the files from then on): for benchmarks
        only."""
        self._unpin(self._files.values())
        self._pins, self._pins_off = False, True
        for entry in self._files.values():
            entry.drop_page_cache()

    @property
    def temporary(self) -> bool:
        """True when the folder is a temporary one lp_plugin made (removed at :meth:`close` or exit)."""
        return self._temporary is not None

    def remove_files(self) -> list:
        """Delete this tier's layer files, but only those the folder's journal proves lp_plugin wrote
        (see :mod:`lp_plugin.core.tiers.journal`); then the journal once it records nothing left, and the
        folder if lp_plugin created it and it is empty. Returns the paths removed."""
        names = [f"{key}.safetensors" for key in self._files]
        self._close_files()
        if self.folder.fd is None:
            return []
        with self.folder.locked():
            removed = self.folder.remove_owned(names)
        self.folder.close()
        self.folder.remove_if_created_and_empty()
        return removed

    def _close_files(self) -> None:
        self._unpin(self._files.values())
        for entry in self._files.values():
            self._close(entry)
        self._files.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def close(self):
        self._close_files()
        self.folder.close()
        if self._temporary is not None:
            self._temporary()  # nobody can reuse a temporary folder: it goes now
