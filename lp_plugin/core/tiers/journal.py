"""The offload folder's record of what lp_plugin wrote there (``.lp_plugin-owned.jsonl``): the proof of
ownership behind every rewrite and deletion. Its records and their rules: docs/architecture.md."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field

from ...errors import OffloadFileError

NAME = ".lp_plugin-owned.jsonl"
COMPACT_AT = 64 * 1024
_MAX_SIZE = 16 * 1024 * 1024
_HEAD = {"lp_plugin": "owned-files/1"}
_TEMP = re.compile(r"\.lp_plugin\.[A-Za-z0-9_]{1,64}\.[0-9a-f]{16}\.tmp")
_FILE = re.compile(r"[A-Za-z0-9_]{1,64}\.safetensors")
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def temp_name(stem: str) -> str:
    """A fresh temporary entry name lp_plugin may reserve (``stem``: letters, digits, ``_``)."""
    return f".lp_plugin.{stem}.{secrets.token_hex(8)}.tmp"


@dataclass
class Owned:
    """What the journal proves: layer file name -> (st_dev, st_ino), and reserved temporary names."""

    files: dict = field(default_factory=dict)
    temps: set = field(default_factory=set)
    size: int = 0

    def apply(self, record) -> None:
        if not isinstance(record, dict):
            return
        if record.keys() == {"reserve"} and _is_temp(record["reserve"]):
            self.temps.add(record["reserve"])
        elif record.keys() == {"release"} and _is_temp(record["release"]):
            self.temps.discard(record["release"])
        elif (
            record.keys() == {"file", "dev", "ino"}
            and isinstance(record["file"], str)
            and _FILE.fullmatch(record["file"])
            and all(type(record[k]) is int and record[k] >= 0 for k in ("dev", "ino"))
        ):
            self.files[record["file"]] = (record["dev"], record["ino"])

    def owns(self, name: str, st: os.stat_result) -> bool:
        return self.files.get(name) == (st.st_dev, st.st_ino)


def _is_temp(value) -> bool:
    return isinstance(value, str) and _TEMP.fullmatch(value) is not None


def _lines(records) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":"), sort_keys=True).encode() + b"\n" for r in records)


def _not_ours(folder: str, what: str) -> OffloadFileError:
    return OffloadFileError(
        f"offload_folder {folder!r} holds {NAME}, {what}; lp_plugin keeps its record of the files it wrote "
        "under that name and will not read or replace this one: move it away, or pass another offload_folder"
    )


class Journal:
    """The journal of the folder open as ``dir_fd`` (``folder``: its path, for messages)."""

    def __init__(self, dir_fd: int, folder: str):
        self.dir_fd, self.folder = dir_fd, folder

    def _open(self, flags: int, mode: int = 0o644) -> int:
        """Open the journal: looked at first (a link or a special file is refused without being
        opened), then opened without following links and checked again through the handle."""
        try:
            st = os.stat(NAME, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise _not_ours(self.folder, "a symbolic link")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _not_ours(self.folder, "which is not a regular file")
        try:
            fd = os.open(NAME, flags | _OPEN, mode, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link put there meanwhile
                raise _not_ours(self.folder, "a symbolic link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_ours(self.folder, "which is not a regular file")
        return fd

    def load(self) -> Owned:
        owned = Owned()
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return owned
        try:
            owned.size = os.fstat(fd).st_size
            if owned.size > _MAX_SIZE:
                raise _not_ours(self.folder, "which is far larger than lp_plugin's record")
            raw = os.pread(fd, owned.size, 0)
        finally:
            os.close(fd)
        lines = raw.split(b"\n")
        if raw and _parse(lines[0]) != _HEAD:
            raise _not_ours(self.folder, "which is not lp_plugin's record of the files it wrote")
        for line in lines[1:]:
            owned.apply(_parse(line))
        return owned

    def append(self, *records) -> None:
        """Append ``records`` durably (creating the journal if needed)."""
        fd = self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            data = _lines(records)
            if size == 0:
                data = _lines([_HEAD]) + data
            elif os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a writer died mid-line: start a fresh one
            _write_all(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def rewrite(self, owned: Owned) -> None:
        """Replace the journal by one holding just ``owned`` (through a reserved temporary file)."""
        tmp = temp_name("journal")
        self.append({"reserve": tmp})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, 0o644, dir_fd=self.dir_fd)
        try:
            records = [_HEAD] + [{"file": n, "dev": d, "ino": i} for n, (d, i) in sorted(owned.files.items())]
            _write_all(fd, _lines(records + [{"reserve": t} for t in sorted(owned.temps)]))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, NAME, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)


def _parse(line: bytes):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
