"""The bundled model's cache folders: fingerprints, checks, conversion locks and leftovers.

Fingerprint: the marker ``lp_plugin_bundled.json`` records the size and SHA-256 of every file a
conversion wrote and of the source (GGUF) file, plus a digest of the marker's own contents.
:func:`check` runs three checks, cheapest first:

1. Structure (every use, a few stat calls): the marker parses, matches its digest and this format;
   the folder holds exactly the recorded files, each a regular file of the recorded size; the
   source file has the recorded size. Catches deleted, added, renamed or symlinked files, truncated
   or extended files, an edited or half-written marker, an unfinished conversion, a resized source.
2. Identity (every use): device, inode, size, mtime and ctime of every file, of the marker and of
   the source file equal those recorded in ``.lp_plugin_checked.json`` by the last full check.
   Catches every change made through the file system: a write updates mtime and ctime, and ctime
   cannot be set back (restoring mtime with ``touch``/``os.utime`` does not hide an edit); a
   replaced, copied or moved file has a new inode. It cannot see changes that bypass the file
   system (bit rot on the medium, writes to the raw device): ask for a full check for those.
3. Full (when the identity check fails, on the first use of a new or copied cache, or on request):
   SHA-256 of every file and of the source file against the marker. Catches any change of
   contents, down to one flipped bit. Identities are recorded only after a full check passes and
   only for files last changed over a second before it, so a second change within one timestamp
   tick of the first cannot hide behind an unchanged ctime. A read-only cache keeps no record and
   gets the full check on every use (about half a second for the model).

Conversions hold ``.<name>.lock`` in the cache root, so concurrent ones wait for the first instead
of converting twice. Each writes into its own ``.<name>.convert-*`` folder holding
``.lp_plugin_convert.lock``, locked (``flock``) for the conversion's lifetime and released by the
kernel when the process dies, even by SIGKILL: :func:`remove_dead_conversions` removes such folders
whose lock is free and leaves anything else in the cache root alone. The marker and the checks
guard against accidents (crashes, full disks, stray edits, bit flips), not against an adversary
who can rewrite both the files and their marker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import LPPluginError

MARKER = "lp_plugin_bundled.json"
CHECKED = ".lp_plugin_checked.json"  # identities at the last full check (its temp files share the prefix)
CONVERT_LOCK = ".lp_plugin_convert.lock"
FORMAT = 2  # bump to invalidate caches written by an older conversion
REQUIRED = {"model": ("config.json", "model.safetensors", "tokenizer.json"), "tokenizer": ("tokenizer.json",)}
NEEDS_MIB = {"model": 560, "tokenizer": 8}  # free space a conversion needs
_SETTLE_NS = 1_000_000_000  # identities of files changed more recently than this are not recorded
_SHA256 = re.compile(r"[0-9a-f]{64}")

logger = logging.getLogger("lp_plugin")


class BundledModelError(LPPluginError, RuntimeError):
    """The bundled model package is missing, its cache cannot be used, or its conversion failed."""


def say(log, msg: str, warn: bool = False) -> None:
    if log is not None:
        log(msg)
    else:
        logger.log(logging.WARNING if warn else logging.INFO, msg)


# ---------------------------------------------------------------------------- fingerprints
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()  # read in chunks: hashlib.file_digest needs Python 3.11
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _identity(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _valid_entry(rec: object, name: object) -> TypeGuard[dict[str, Any]]:
    """Whether ``rec`` is a sound fingerprint record of the file ``name``."""
    return (
        isinstance(name, str)
        and name == os.path.basename(name)
        and name not in ("", ".", "..", MARKER)
        and not name.startswith(CHECKED)
        and isinstance(rec, dict)
        and type(rec.get("size")) is int
        and rec["size"] >= 0
        and isinstance(rec.get("sha256"), str)
        and bool(_SHA256.fullmatch(rec["sha256"]))
    )


def _source_changed(source: Path) -> str:
    return f"{source.name}: the source changed since the conversion (its package was upgraded or reinstalled)"


def _read_marker(folder: Path, kind: str, source: Path):
    """(marker, None) when ``folder``'s marker is sound, else (None, why)."""
    try:
        marker = json.loads((folder / MARKER).read_bytes())
    except FileNotFoundError:
        return None, f"{MARKER}: missing (an unfinished conversion, or a folder lp_plugin did not write)"
    except OSError as exc:
        return None, f"{MARKER}: unreadable ({exc.strerror})"
    except ValueError:
        return None, f"{MARKER}: not valid JSON"
    if not isinstance(marker, dict):
        return None, f"{MARKER}: malformed (not a JSON object)"
    if marker.get("format") != FORMAT:
        return (
            None,
            f"{MARKER}: written by another lp_plugin version (format {marker.get('format')!r}, "
            f"this one reads {FORMAT})",
        )
    body = {k: v for k, v in marker.items() if k != "digest"}
    if marker.get("digest") != _digest(body):
        return None, f"{MARKER}: edited or damaged (its digest does not match its contents)"
    files, src = marker.get("files"), marker.get("source")
    if (
        marker.get("kind") != kind
        or not isinstance(files, dict)
        or not all(_valid_entry(r, n) for n, r in files.items())
    ):
        return None, f"{MARKER}: malformed (not a {kind} cache)"
    if not _valid_entry(src, source.name) or src.get("file") != source.name:
        return None, f"{MARKER}: malformed (no fingerprint of {source.name})"
    missing = [n for n in REQUIRED[kind] if n not in files]
    if missing:
        return None, f"{MARKER}: malformed (records no {missing[0]})"
    return marker, None


def fingerprint(folder: Path, source: Path, kind: str) -> None:
    """Write the marker of a freshly converted ``folder``."""
    files = {}
    for path in sorted(folder.iterdir()):
        os.chmod(path, 0o644)  # safetensors writes 0600; a shared cache must be readable by all
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    body = {
        "format": FORMAT,
        "kind": kind,
        "files": files,
        "source": {"file": source.name, "size": source.stat().st_size, "sha256": _sha256_file(source)},
    }
    (folder / MARKER).write_text(json.dumps(dict(body, digest=_digest(body)), indent=1))


# ---------------------------------------------------------------------------- checks
def _structure(folder: Path, marker: dict, source: Path):
    """(identities, None) when the folder holds exactly the recorded files at their sizes, else (None, why)."""
    files = marker["files"]
    try:
        present = {n for n in os.listdir(folder) if n != MARKER and not n.startswith(CHECKED)}
        for name in sorted(files):
            if name not in present:
                return None, f"{name}: missing"
        for name in sorted(present - set(files)):
            return None, f"{name}: not written by the conversion"
        ids = {MARKER: _identity(os.lstat(folder / MARKER))}
        for name in sorted(files):
            st, want = os.lstat(folder / name), files[name]["size"]
            if not stat.S_ISREG(st.st_mode):
                return None, f"{name}: not a regular file"
            if st.st_size != want:
                return (
                    None,
                    f"{name}: truncated ({st.st_size} of {want} bytes)"
                    if st.st_size < want
                    else f"{name}: {st.st_size} bytes, {want} expected",
                )
            ids[name] = _identity(st)
        src = _identity(os.stat(source))
    except OSError as exc:
        return None, f"{Path(exc.filename or folder).name}: unreadable ({exc.strerror})"
    if src[2] != marker["source"]["size"]:
        return None, _source_changed(source)
    return {"marker": marker["digest"], "files": ids, "source": [str(source), src]}, None


def _current(folder: Path, ids: dict):
    """``ids`` as the files are now (None if one vanished)."""
    try:
        return dict(
            ids,
            files={n: _identity(os.lstat(folder / n)) for n in ids["files"]},
            source=[ids["source"][0], _identity(os.stat(ids["source"][0]))],
        )
    except OSError:
        return None


def _changed_since_last_check(folder: Path, ids: dict):
    """None when every identity equals the one recorded by the last full check, else what differs."""
    try:
        rec = json.loads((folder / CHECKED).read_bytes())
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict) or rec.get("marker") != ids["marker"] or not isinstance(rec.get("files"), dict):
        return "no record of an earlier full check"
    if rec.get("source") != ids["source"]:
        return f"{Path(ids['source'][0]).name} is not the copy checked last time (reinstalled or touched)"
    for name, ident in ids["files"].items():
        if rec["files"].get(name) != ident:
            return f"{name} changed since the last full check"
    return None


def _full_check(folder: Path, marker: dict, source: Path):
    for name, rec in sorted(marker["files"].items()):
        if _sha256_file(folder / name) != rec["sha256"]:
            return f"{name}: contents differ from its fingerprint (sha256)"
    if _sha256_file(source) != marker["source"]["sha256"]:
        return _source_changed(source)
    return None


def _record_identities(folder: Path, ids: dict, started_ns: int) -> None:
    """Save ``ids`` as checked, unless a file changed during the check or too shortly before it
    (best effort: a read-only cache keeps no record and is hashed on every use)."""
    every = [*ids["files"].values(), ids["source"][1]]
    if _current(folder, ids) != ids or any(ident[4] > started_ns - _SETTLE_NS for ident in every):
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=CHECKED + ".", dir=folder)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as fh:
            json.dump(ids, fh)
        os.replace(tmp, folder / CHECKED)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def check(folder: Path, source: Path, kind: str, verify: bool, log) -> str | None:
    """None when ``folder`` is an intact ``kind`` cache converted from ``source``, else the reason."""
    if not os.path.lexists(folder):
        return "missing"
    if not folder.is_dir():
        return f"{folder.name}: not a folder"
    marker, why = _read_marker(folder, kind, source)
    if why:
        return why
    started = time.time_ns()
    ids, why = _structure(folder, marker, source)
    if why:
        return why
    stale = "a full check was requested" if verify else _changed_since_last_check(folder, ids)
    if stale is None:
        return None
    say(log, f"checking {folder} in full (sha256 of every file): {stale}")
    try:
        why = _full_check(folder, marker, source)
    except OSError as exc:
        return f"{Path(exc.filename or folder).name}: unreadable ({exc.strerror})"
    if why is None:
        _record_identities(folder, ids, started)
    return why


# ---------------------------------------------------------------------------- the cache root
def errno_of(exc: BaseException) -> int | None:
    """The OS error number behind ``exc`` (safetensors reports it only in its message)."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
        found = re.search(r"os error (\d+)", str(cur))
        if found:
            return int(found.group(1))
        cur = cur.__cause__ or cur.__context__
    return None


def where(root: Path) -> str:
    """How to name the cache root in a message: by the variable that chose it, if one did."""
    env = os.environ.get("LP_PLUGIN_CACHE")
    return f"LP_PLUGIN_CACHE={env}" if env else f"the cache folder {root}"


def cache_error(exc: BaseException, root: Path, kind: str = "model") -> BundledModelError:
    """A clear error for an OS failure in the cache ``root``, naming the fix."""
    code = errno_of(exc)
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else os.strerror(code) if code else str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return BundledModelError(
            f"no room for the bundled {kind} in {root} ({what}); the conversion writes about "
            f"{NEEDS_MIB[kind]} MiB: free space there or set LP_PLUGIN_CACHE to a folder with room"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BundledModelError(
            f"{where(root)} is not writable ({what}); make it writable or set LP_PLUGIN_CACHE to a writable folder"
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        return BundledModelError(
            f"{where(root)} lies inside a file ({what}); set LP_PLUGIN_CACHE to a folder (or unset it)"
        )
    if code == errno.ELOOP:
        return BundledModelError(
            f"{getattr(exc, 'filename', None) or root} is a symbolic link lp_plugin did not make; remove it"
        )
    return BundledModelError(f"cannot use {where(root)}: {what}; check it or set LP_PLUGIN_CACHE to another folder")


def refuse_file(root: Path) -> None:
    if os.path.lexists(root) and not root.is_dir():
        raise BundledModelError(f"{where(root)} is a file, not a folder; set LP_PLUGIN_CACHE to a folder (or unset it)")


def prepare_root(root: Path) -> bool:
    """Create the cache root; True when this process may write into it."""
    refuse_file(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_error(exc, root) from exc
    return os.access(root, os.W_OK | os.X_OK)


def remove_dead_conversions(root: Path, names, log) -> None:
    """Remove the ``.<name>.convert-*`` folders (for each of ``names``) whose owner died (their lock
    is free); a live conversion's folder, and anything without our claim in it, is left alone."""
    prefixes = tuple(f".{name}.convert-" for name in names)
    for entry in os.scandir(root):
        if not entry.name.startswith(prefixes) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, CONVERT_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if os.read(fd, 16).startswith(b"lp_plugin "):  # empty: its owner has not written its claim yet
                say(log, f"removing {entry.path}: left by a conversion that did not finish", warn=True)
                shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def conversion_lock(root: Path, name: str, log):
    """Serialize conversions into ``root / name`` across processes."""
    fd = os.open(root / f".{name}.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(log, f"waiting for another process converting into {root / name} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def conversion_folder(root: Path, name: str):
    """A private ``.<name>.convert-*`` folder, locked while this process lives, removed on exit."""
    work = Path(tempfile.mkdtemp(prefix=f".{name}.convert-", dir=root))
    fd = None
    try:
        fd = os.open(work / CONVERT_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"lp_plugin {socket.gethostname()} {os.getpid()}\n".encode())
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            os.close(fd)
