"""On-disk cache of importance scores and fitted stand-ins, keyed by what they were computed from.

A key is a dict (the model's fingerprint: its weights and the config values that change its
forward; the calibration tokens' fingerprint; the metric or stand-in kind and its parameters; the
fitting algorithm's version and settings; the cache format); its SHA-256 names the file under
``lp_plugin.bundled.cache_root() / "skipping"``. Every file also records its full key and a SHA-256
over the key and everything that changes a result (scores and order; tensors with their names,
shapes and dtypes, and the fit details), and is checked against both before use, like the disk
tier's layer files; the caller then checks the content's structure (``check``: layer indices in
range, tensor names, shapes, finite values). A foreign, truncated, edited or malformed file is
recomputed with a warning that names it and the reason, never silently reused.

Trust stops where the operating system puts it: the ``skipping`` folder must be a real folder (not a
link) owned by the current user and writable by no one else, and each file a regular file (opened
without following links) owned by the current user and writable by no one else. Otherwise the
cache is not read; results go to a private temporary folder for this process, with a warning. A
SHA-256 cannot stop someone who can write as the current user (they can recompute it).

Files are written atomically (temporary file, then rename), readable by everyone (a shared cache);
a cache that cannot be written is warned about once per file and the computed result is used
anyway. No pickle: JSON for scores, safetensors for tensors.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ...core import accel
from ...core.paths import SKIPPING, cache_root
from ...errors import outside_stacklevel
from ..arch import find_decoder_layers

FORMAT = "lp_plugin.skipping/1"


_private: dict[Path, Path] = {}  # unsafe cache folder -> this process's private replacement
_private_lock = threading.Lock()


def _unsafe(st, what: str) -> str | None:
    """Why a file or folder with stat ``st`` cannot be trusted, or None."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and st.st_uid != uid:
        return f"{what} belongs to user id {st.st_uid}, not to the current user ({uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def folder() -> Path:
    """The cache folder: ``cache_root() / "skipping"`` when it is a real folder owned by the current
    user and writable by no one else (created so when missing), else a private temporary folder for
    this process (with a warning naming the reason)."""
    path = cache_root() / SKIPPING
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o755)
        st = os.lstat(path)
    except OSError:
        return path  # not creatable: writes warn and the results are used uncached
    reason: str | None
    if stat.S_ISLNK(st.st_mode):
        reason = f"{path} is a symbolic link (lp_plugin follows none in its cache)"
    elif not stat.S_ISDIR(st.st_mode):
        reason = f"{path} is not a folder"
    else:
        reason = _unsafe(st, str(path))
    if reason is None:
        return path
    with _private_lock:
        if path not in _private:
            _private[path] = Path(tempfile.mkdtemp(prefix="lp_plugin-skipping-"))  # mode 0700, this user's
            atexit.register(shutil.rmtree, _private[path], ignore_errors=True)  # for this process only
            warnings.warn(
                f"lp_plugin: the skipping cache is not used: {reason}; results are cached in "
                f"{_private[path]} for this process only: fix the folder or point LP_PLUGIN_CACHE at a "
                "folder of your own",
                stacklevel=outside_stacklevel(),
            )
        return _private[path]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


_CONFIG_IGNORED = (
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "transformers_version",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
)


def _config_digest(model) -> str:
    """The config values that can change the forward (rope, norms, attention implementation, ...),
    without the ones that only say where the model came from."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    try:
        values = config.to_dict()
    except Exception:  # noqa: BLE001 - a config that cannot be listed: its repr
        values = {"repr": repr(config)}
    values = {k: v for k, v in values.items() if k not in _CONFIG_IGNORED}
    values["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(values, sort_keys=True, default=str)


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names, dtypes, shapes and bytes; the
    values Accelerate holds for layers it offloaded, where the module has placeholders) and over the
    config values that change its forward."""
    held = {}
    _, layers = find_decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        hooks = accel.offload_hooks(layer)
        if hooks:
            values, _ = accel.hooked_values(layer, hooks)
            held.update({f"{names[id(layer)]}.{k}": v for k, v in values.items()})
    digest = hashlib.sha256(_config_digest(model).encode())
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        tensor = held.get(name, tensor)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type != "meta":
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def canonical(key: dict) -> dict:
    """``key`` as it reads back from JSON (tuples become lists), so stored and asked keys compare equal."""
    return json.loads(json.dumps(key, sort_keys=True))


def _name(kind: str, key: dict, suffix: str) -> Path:
    blob = json.dumps({"format": FORMAT, **key}, sort_keys=True, separators=(",", ":")).encode()
    return folder() / f"{kind}-{hashlib.sha256(blob).hexdigest()[:32]}{suffix}"


def _atomic_write(path: Path, write) -> Path | None:
    """Write ``path`` through a temporary file; on a file-system error warn (naming the folder and
    ``LP_PLUGIN_CACHE``) and return None: the result is still used, only not cached."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path
    except OSError as exc:
        warnings.warn(
            f"lp_plugin: cannot write the skipping cache in {path.parent} ({exc}); the result is used but "
            "not cached: point LP_PLUGIN_CACHE at a writable folder",
            stacklevel=outside_stacklevel(),
        )
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _stale(what: str, path: Path, reason: str) -> None:
    warnings.warn(
        f"lp_plugin: cached {what} {path} is not usable ({reason}); computing it again", stacklevel=outside_stacklevel()
    )


_NOT_USABLE = (
    OSError,
    ValueError,
    AttributeError,
    KeyError,
    TypeError,
    IndexError,
    OverflowError,
    RecursionError,
    SafetensorError,
)


def _read_own(path: Path) -> bytes:
    """The bytes of cache file ``path``: opened without following a link, and only a regular file
    owned by the current user and writable by no one else (ValueError otherwise)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError("it is a symbolic link (lp_plugin follows none in its cache)") from None
        raise exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        reason = _unsafe(st, "it")
        if reason:
            raise ValueError(reason)
        return fh.read()


def _load(kind: str, key: dict, suffix: str, what: str, read, check=None):
    """``read(data, key)`` of the file cached under ``key`` (it raises ValueError, OSError or
    SafetensorError when the file is not what was asked for), passed through ``check`` (which raises
    ValueError for content of the wrong structure), or None: missing, or unusable (with a warning
    naming the file and the reason)."""
    key = canonical(key)
    path = _name(kind, key, suffix)
    if not os.path.lexists(path):
        return None
    try:
        result = read(_read_own(path), key)
        if check is not None:
            check(result)
        return result
    except _NOT_USABLE as exc:
        _stale(what, path, str(exc) or type(exc).__name__)
        return None


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ JSON
def load_json(kind: str, key: dict, what: str, check=None):
    """The payload cached under ``key``, or None (missing; unusable or failing ``check``: with a warning)."""
    return _load(kind, key, ".json", what, _read_json, check)


def _read_json(data: bytes, key: dict):
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != key:
        raise ValueError("written for other inputs")
    if doc.get("sha256") != _digest({"key": key, "payload": doc.get("payload")}):
        raise ValueError("its content does not match its SHA-256")
    return doc["payload"]


def save_json(kind: str, key: dict, payload) -> Path | None:
    key = canonical(key)
    path = _name(kind, key, ".json")
    payload = canonical(payload)
    doc = {"format": FORMAT, "key": key, "sha256": _digest({"key": key, "payload": payload}), "payload": payload}
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, sort_keys=True)))


# ------------------------------------------------------------------------------------ tensors
def _tensors_digest(key: dict, tensors: dict, info) -> str:
    """SHA-256 over the key, the fit details and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({"key": key, "info": info}, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def load_tensors(kind: str, key: dict, what: str, check=None):
    """``(tensors, info)`` cached under ``key``, or None (missing; unusable or failing ``check``:
    with a warning). ``info`` is a dict."""
    return _load(kind, key, ".safetensors", what, _read_tensors, check)


def _safetensors_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise ValueError("truncated")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("truncated header")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("no metadata")
    return meta


def _read_tensors(data: bytes, key: dict):
    meta = _safetensors_metadata(data)
    if meta.get("format") != FORMAT or json.loads(meta.get("key", "null")) != key:
        raise ValueError("written for other inputs")
    tensors = load_safetensors(data)
    info = json.loads(meta.get("info", "null"))
    if meta.get("sha256") != _tensors_digest(key, tensors, info):
        raise ValueError("its tensors do not match their SHA-256")
    if not isinstance(info, dict):
        raise ValueError("its fit details are not a table")
    return tensors, info


def save_tensors(kind: str, key: dict, tensors: dict, info: dict) -> Path | None:
    key = canonical(key)
    info = canonical(info)
    path = _name(kind, key, ".safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "key": json.dumps(key, sort_keys=True),
        "sha256": _tensors_digest(key, tensors, info),
        "info": json.dumps(info, sort_keys=True),
    }
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
