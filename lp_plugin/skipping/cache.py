"""On-disk cache of importance scores and fitted stand-ins, keyed by what they were computed from.

A key is a dict (the model's fingerprint: its weights and the config values that change its
forward; the calibration tokens' fingerprint; the metric or stand-in kind and its parameters; the
fitting algorithm's version and settings; the cache format); its SHA-256 names the file under
``lp_plugin.bundled.cache_root() / "skipping"``. Every file also records its full key and a SHA-256
of its content, and is checked against both before use, like the disk tier's layer files: a
foreign, truncated or edited file is recomputed with a warning that names it and the reason, never
silently reused. Files are written atomically (temporary file, then rename), readable by everyone
(a shared cache); a cache that cannot be written is warned about once per file and the computed
result is used anyway. No pickle: JSON for scores, safetensors for tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import accel
from ..arch import find_decoder_layers
from ..bundled import cache_root

FORMAT = "lp_plugin.skipping/1"


def folder() -> Path:
    return cache_root() / "skipping"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


_CONFIG_IGNORED = ("_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures",
                   "torch_dtype", "dtype", "use_cache")


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
        warnings.warn(f"lp_plugin: cannot write the skipping cache in {path.parent} ({exc}); the result is used but "
                      "not cached: point LP_PLUGIN_CACHE at a writable folder", stacklevel=3)
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _stale(what: str, path: Path, reason: str) -> None:
    warnings.warn(f"lp_plugin: cached {what} {path} is not usable ({reason}); computing it again", stacklevel=4)


def _load(kind: str, key: dict, suffix: str, what: str, read):
    """``read(path, key)`` of the file cached under ``key`` (it raises ValueError, OSError or
    SafetensorError when the file is not what was asked for), or None: missing, or unusable (with a
    warning naming the file and the reason)."""
    key = canonical(key)
    path = _name(kind, key, suffix)
    if not path.is_file():
        return None
    try:
        return read(path, key)
    except (OSError, ValueError, AttributeError, SafetensorError) as exc:
        _stale(what, path, str(exc))
        return None


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ JSON
def load_json(kind: str, key: dict, what: str):
    """The payload cached under ``key``, or None (missing; unusable: with a warning)."""
    return _load(kind, key, ".json", what, _read_json)


def _read_json(path: Path, key: dict):
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT or doc.get("key") != key:
        raise ValueError("written for other inputs")
    if doc.get("sha256") != _digest(doc.get("payload")):
        raise ValueError("its content does not match its SHA-256")
    return doc["payload"]


def save_json(kind: str, key: dict, payload) -> Path | None:
    key = canonical(key)
    path = _name(kind, key, ".json")
    doc = {"format": FORMAT, "key": key, "sha256": _digest(payload), "payload": payload}
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, sort_keys=True)))


# ------------------------------------------------------------------------------------ tensors
def _tensors_digest(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def load_tensors(kind: str, key: dict, what: str):
    """``(tensors, info)`` cached under ``key``, or None (missing; unusable: with a warning)."""
    return _load(kind, key, ".safetensors", what, _read_tensors)


def _read_tensors(path: Path, key: dict):
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(path))
    if meta.get("format") != FORMAT or json.loads(meta.get("key", "null")) != key:
        raise ValueError("written for other inputs")
    if meta.get("sha256") != _tensors_digest(tensors):
        raise ValueError("its tensors do not match their SHA-256")
    return tensors, json.loads(meta.get("info", "{}"))


def save_tensors(kind: str, key: dict, tensors: dict, info: dict) -> Path | None:
    key = canonical(key)
    path = _name(kind, key, ".safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "key": json.dumps(key, sort_keys=True), "sha256": _tensors_digest(tensors),
            "info": json.dumps(info, sort_keys=True)}
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
