"""The offload folder as shared ground: the directory handle every file operation goes through, its lock
(``flock`` on that handle), and the rules for touching entries in it. How and why: docs/architecture.md."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import weakref
from typing import NamedTuple

import safetensors

from ...errors import OffloadFileError, OffloadResourceError
from ..report import GIB
from .journal import COMPACT_AT, Journal, Owned, temp_name
from .journal import NAME as JOURNAL
from .layerfile import fd_path

log = logging.getLogger("lp_plugin")

_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class Opened(NamedTuple):
    """An entry opened for reading: ``fd`` (None when it could not be opened, ``error`` says why)
    and its ``st`` (from the open handle when there is one)."""

    fd: int | None
    st: os.stat_result
    error: str | None


_NO_LINKS = "lp_plugin opens no links in offload_folder (they could lead outside it)"
_REGULAR_ONLY = "lp_plugin opens only regular files there"
_NOT_OURS = "lp_plugin replaces only files it can prove it wrote"


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def nearest_existing(path: str) -> str:
    """``path`` itself if something is there (a dangling link counts), else its closest ancestor that exists."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_usable(path, checkpoint=None) -> None:
    """Refuse ``path`` as an offload folder before anything is loaded: a file, a folder this process cannot create,
    the folder of the checkpoint being loaded (``checkpoint``, a local folder or None), or a folder
    lp_plugin manages (the bundled model's conversion and the layer-skipping cache: both are rebuilt there)."""
    from ..paths import managed_folders

    path = os.path.realpath(os.fsdecode(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OffloadFileError(f"offload_folder {path!r} is a file, not a folder; pass a folder path")
    for folder in managed_folders():
        folder_path = os.path.realpath(folder)
        if os.path.commonpath([path, folder_path]) == folder_path:
            raise OffloadFileError(
                f"offload_folder {path!r} is inside {folder_path}, which lp_plugin manages (it rebuilds what is "
                "there); pass a folder outside it"
            )
    if checkpoint is not None and os.path.isdir(checkpoint) and os.path.realpath(checkpoint) == path:
        raise OffloadFileError(
            f"offload_folder {path!r} is the folder of the checkpoint being loaded; lp_plugin's layer files do not "
            "belong beside the model's own: pass another folder (a subfolder of it will do)"
        )
    if os.path.lexists(path):
        return  # (a read-only folder of valid layer files is reused; attach says so when it must write one)
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise OffloadFileError(f"cannot create offload_folder {path!r}: {existing!r} is a file; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OffloadFileError(
            f"cannot create offload_folder {path!r}: this user cannot write in {existing!r}; pass a writable folder"
        )


class OffloadFolder:
    """The folder at ``path`` (created if missing), open for the life of a disk tier."""

    def __init__(self, path):
        path = os.path.abspath(os.fsdecode(os.fspath(path)))
        if os.path.exists(path) and not os.path.isdir(path):
            raise OffloadFileError(f"offload_folder {path!r} is a file, not a folder; pass a folder path")
        self.created = not os.path.lexists(path)  # lp_plugin made it: it may remove it once empty
        try:
            os.makedirs(path, exist_ok=True)
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OffloadFileError(
                f"cannot create offload_folder {path!r}: {exc.strerror}; pass a writable folder"
            ) from exc
        self.path = path
        self.journal = Journal(self.fd, path)
        self._close_fd = weakref.finalize(self, os.close, self.fd)  # also when collected unclosed
        self._close_fd.atexit = False

    def close(self) -> None:
        if self.fd is not None:
            self._close_fd()
            self.fd = None

    def entry_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    @contextlib.contextmanager
    def locked(self):
        """Exclusive use of the folder (other processes and tiers wait) while entries are checked,
        written or removed."""
        assert self.fd is not None, "the folder was closed"
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise OffloadFileError(
                f"cannot lock offload_folder {self.path!r} ({exc.strerror}): lp_plugin locks the folder itself "
                "(flock on the directory), which this filesystem does not support; pass a folder on a local disk"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading entries
    def refuse(self, name: str, what: str, why: str, rule: str = _NOT_OURS) -> OffloadFileError:
        return OffloadFileError(
            f"{what}: {self.entry_path(name)} {why}; {rule}: move it out of the folder, or pass another offload_folder"
        )

    def open_regular(self, name: str, what: str):
        """The regular file ``name`` opened read-only: an :class:`Opened`, or None when there is none.
        A symbolic link or a special file there is refused (nothing is opened through it); a file
        that cannot be opened (permissions) comes back with ``fd`` None and the reason."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise self.refuse(name, what, "is a symbolic link", _NO_LINKS)
        if not stat.S_ISREG(st.st_mode):
            raise self.refuse(name, what, f"is {_kind(st.st_mode)}, not a regular file", _REGULAR_ONLY)
        try:
            fd = os.open(name, os.O_RDONLY | _OPEN, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.refuse(name, what, "is a symbolic link", _NO_LINKS) from None
            return Opened(None, st, f"unreadable ({exc.strerror})")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self.refuse(name, what, f"is {_kind(st.st_mode)}, not a regular file", _REGULAR_ONLY)
        return Opened(fd, st, None)

    # ------------------------------------------------------------------ ownership
    def owned(self) -> Owned:
        """Load the journal and remove what dead writers left (call under :meth:`locked`)."""
        owned = self.journal.load()
        gone = [name for name in sorted(owned.temps) if self._remove_temp(name)]
        if gone:
            with contextlib.suppress(OSError):  # a read-only folder keeps its record as it is
                self.journal.append(*({"release": name} for name in gone))
                owned.temps.difference_update(gone)
        if owned.size > COMPACT_AT:
            self._compact(owned)
        return owned

    def _remove_temp(self, name: str) -> bool:
        """Remove a reserved temporary entry (a file, or a work folder of regular files); True when
        it is gone. Anything else found at a reserved name is left where it is."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                os.unlink(name, dir_fd=self.fd)
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _OPEN, dir_fd=self.fd)
                try:
                    for child in os.listdir(sub):
                        if stat.S_ISREG(os.stat(child, dir_fd=sub, follow_symlinks=False).st_mode):
                            os.unlink(child, dir_fd=sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=self.fd)
            else:
                log.warning(
                    "lp_plugin: %s is %s at a name lp_plugin reserved; left as it is",
                    self.entry_path(name),
                    _kind(st.st_mode),
                )
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning(
                "lp_plugin: cannot remove %s left by an interrupted write (%s)", self.entry_path(name), exc.strerror
            )
            return False

    def _compact(self, owned: Owned) -> None:
        for name, ident in list(owned.files.items()):
            try:
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != ident:
                del owned.files[name]
        with contextlib.suppress(OSError):
            self.journal.rewrite(owned)

    def remove_owned(self, names) -> list:
        """Delete the layer files ``names`` that the journal proves lp_plugin wrote (call under
        :meth:`locked`); anything else is left with a warning. Then the journal goes too when it no
        longer records a file that is still there. Returns the paths removed."""
        owned, removed = self.owned(), []
        for name in names:
            try:
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not (stat.S_ISREG(st.st_mode) and owned.owns(name, st)):
                log.warning(
                    "lp_plugin: %s is not provably a file lp_plugin wrote; left where it is", self.entry_path(name)
                )
                continue
            try:
                os.unlink(name, dir_fd=self.fd)
            except OSError as exc:  # a read-only folder: the files stay, usable by the next attach
                log.warning("lp_plugin: cannot remove %s (%s)", self.entry_path(name), exc.strerror)
                continue
            removed.append(self.entry_path(name))
        still = [n for n in owned.files if self._exists_as(n, owned)]
        if not still and not owned.temps:
            with contextlib.suppress(OSError):
                os.unlink(JOURNAL, dir_fd=self.fd)
        return removed

    def _exists_as(self, name: str, owned: Owned) -> bool:
        try:
            return owned.owns(name, os.stat(name, dir_fd=self.fd, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def remove_if_created_and_empty(self) -> None:
        """Remove the folder itself when lp_plugin created it and nothing is left in it."""
        if self.created:
            with contextlib.suppress(OSError):  # not empty (someone else's files), or gone: left as it is
                os.rmdir(self.path)

    # ------------------------------------------------------------------ writing entries
    def replace(self, name: str, stem: str, what: str, nbytes: int, produce):
        """Create ``name`` anew: ``produce(path)`` writes the file at ``path`` inside a private work
        folder reserved in the journal; it is fsynced, renamed over ``name`` atomically, the folder
        fsynced, and recorded as lp_plugin's. Returns a read-only handle of the new file: the one
        later reads go through. Call under :meth:`locked`."""
        work = temp_name(stem)
        fd = wfd = None
        try:
            self.journal.append({"reserve": work})
            os.mkdir(work, 0o700, dir_fd=self.fd)
            wfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | _OPEN, dir_fd=self.fd)
            produce(os.path.join(fd_path(wfd, fallback=os.path.join(self.path, work)), name))
            fd = os.open(name, os.O_RDONLY | _OPEN, dir_fd=wfd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OffloadFileError(f"writing {what} to {self.path!r} failed: the new file is not a regular file")
            os.fsync(fd)
            os.replace(name, name, src_dir_fd=wfd, dst_dir_fd=self.fd)
            assert self.fd is not None, "the folder was closed"
            os.fsync(self.fd)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if wfd is not None:
                os.close(wfd)
            if self._remove_temp(work):
                with contextlib.suppress(OSError):
                    self.journal.append({"release": work})
            error = self._write_error(exc, what, nbytes)
            if error is exc:
                raise
            raise error from exc
        os.close(wfd)
        try:
            self.journal.append(
                {"file": name, "dev": st.st_dev, "ino": st.st_ino},
                *([{"release": work}] if self._remove_temp(work) else []),
            )
        except OSError as exc:  # the file is complete and bears lp_plugin's mark: usable, and provably ours
            log.warning("lp_plugin: cannot record %s in %s (%s)", name, self.path, exc.strerror)
        return fd

    def _write_error(self, exc: BaseException, what: str, nbytes: int) -> BaseException:
        """The error a failed write is reported as: disk full and read-only folders name the fix."""
        code = getattr(exc, "errno", None)
        if isinstance(exc, safetensors.SafetensorError):
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else None
        elif not isinstance(exc, OSError):
            return exc
        if code in (errno.ENOSPC, errno.EDQUOT):
            return OffloadResourceError(
                f"out of disk space in {self.path!r} while writing {what} ({nbytes / GIB:.2f} GiB); "
                "free space there or pass another offload_folder"
            )
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            return OffloadFileError(
                f"offload_folder {self.path!r} is not writable; pass a writable folder ({os.strerror(code)})"
            )
        return OffloadFileError(f"writing {what} to {self.path!r} failed: {exc}")
