"""The disk tier's layer file: one safetensors file per offloaded layer, written and parsed by the
``safetensors`` library.

The file holds a single ``uint8`` tensor ``flat`` (the layer's packed bytes) and string metadata:
``format`` (:data:`FORMAT`, the mark that the file is lp_plugin's), ``layer`` (the unit key),
``model`` (a tag naming the model), ``layout`` (JSON of the layer's tensor layout) and
``source_sha256`` (the SHA-256 of the payload). lp_plugin writes the header padded with spaces (which the
format allows) so that the payload starts at a multiple of :data:`ALIGN` bytes: the disk tier can then read
it with direct I/O into aligned buffers. ``safetensors`` validates the framing and the
header's shape and types (a JSON object of tensor entries, string metadata, offsets that cover the
file exactly, bounded nesting); :func:`mismatch` then checks every field lp_plugin relies on. Any
problem is a :class:`Malformed` whose reason is a fixed phrase: nothing read from the file (header
values, lengths, bytes) ever appears in a reason, a warning or an error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import safetensors

from .base import ALIGN

FORMAT = "lp_plugin.layer/1"
TENSOR = "flat"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# safetensors' error texts quote header values; only these fixed phrases are passed on. Keys are the
# error kinds as safetensors names them, lowercased without spaces ("header too large" in 0.8 is
# "HeaderTooLarge" in 0.4); the first key found in the normalized text wins
_TRUNCATED = "unreadable (its header runs past the end of the file: truncated)"
_BAD_JSON = "unreadable (its header is not a safetensors header: malformed JSON or fields of the wrong type)"
_BAD_ENTRY = "unreadable (its tensor entry's shape, type and offsets disagree)"
_LIBRARY_REASONS = (
    ("headertoosmall", "unreadable (shorter than a safetensors header: truncated or empty)"),
    ("headertoolarge", "unreadable (its header length is implausible: not a safetensors file)"),
    ("invalidheaderlength", _TRUNCATED),
    ("invalidutf-8", "unreadable (its header is not UTF-8 text)"),
    ("invalidheaderstart", _BAD_JSON),
    ("invalidjson", _BAD_JSON),
    ("invalidheader", _BAD_JSON),
    ("incompletemetadata", "truncated or extended (its size does not match its header)"),
    ("metadataincompletebuffer", "truncated or extended (its size does not match its header)"),
    ("invalidshape", _BAD_ENTRY),
    ("invalidoffset", _BAD_ENTRY),
    ("tensorinvalidinfo", _BAD_ENTRY),
    ("overflow", _BAD_ENTRY),
)


def _library_reason(exc: Exception) -> str:
    text = re.split(r"[`\"']", str(exc), maxsplit=1)[0]  # up to the first quoted value from the file
    text = re.sub(r"[\s_]", "", text.lower())
    return next((why for key, why in _LIBRARY_REASONS if key in text), "unreadable (not a safetensors file)")


class Malformed(Exception):
    """A layer file that cannot be used as it is; ``str(exc)`` is the reason (a fixed phrase)."""


@dataclass(frozen=True)
class Header:
    """What the header of an open layer file says: its metadata (str -> str), the payload size and
    where the payload starts in the file."""

    metadata: dict
    nbytes: int
    start: int

    @property
    def is_lp_plugin(self) -> bool:
        """The file carries lp_plugin's format mark (it is a complete, parseable lp_plugin file)."""
        return self.metadata.get("format") == FORMAT


def metadata_for(key: str, model_tag: str, layout: list, sha256: str) -> dict:
    return {
        "format": FORMAT,
        "layer": key,
        "model": str(model_tag),
        "layout": json.dumps(layout, separators=(",", ":"), sort_keys=True),
        "source_sha256": sha256,
    }


def write(path: str, flat, metadata: dict) -> None:
    """Write ``flat`` (a host uint8 tensor) and ``metadata`` to ``path`` as a safetensors file whose
    payload starts at a multiple of :data:`ALIGN` (the JSON header is padded with spaces)."""
    nbytes = flat.numel()
    entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}
    header = json.dumps({"__metadata__": metadata, TENSOR: entry}, separators=(",", ":")).encode()
    length = -(-(8 + len(header)) // ALIGN) * ALIGN - 8
    with open(path, "xb") as f:
        f.write(length.to_bytes(8, "little") + header.ljust(length, b" "))
        if nbytes:
            f.write(memoryview(flat.contiguous().numpy()))


def fd_path(fd: int, fallback: str | None = None) -> str:
    """A path that opens the file (or folder) behind ``fd`` itself, never a name someone else can
    change: ``/proc/self/fd/N`` where there is a ``/proc``, else ``fallback`` (default ``/dev/fd/N``)."""
    if os.path.isdir("/proc/self/fd"):
        return f"/proc/self/fd/{fd}"
    return fallback if fallback is not None else f"/dev/fd/{fd}"


def read_header(fd: int, size: int) -> Header:
    """Parse the header of the open regular file ``fd`` (``size`` bytes) through ``safetensors``."""
    try:
        with safetensors.safe_open(fd_path(fd), framework="pt") as f:
            metadata = f.metadata()
            keys = list(f.keys())
            if keys != [TENSOR]:
                raise Malformed("unreadable (not an lp_plugin layer file: it holds other tensors)")
            view = f.get_slice(TENSOR)
            dtype, shape = view.get_dtype(), view.get_shape()
    except safetensors.SafetensorError as exc:
        raise Malformed(_library_reason(exc)) from None
    except OSError as exc:
        raise Malformed(f"unreadable ({exc.strerror or 'cannot be opened'})") from None
    if not isinstance(metadata, dict):
        raise Malformed("unreadable (not an lp_plugin layer file: its header has no metadata)")
    if dtype != "U8" or not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
        raise Malformed("unreadable (not an lp_plugin layer file: its tensor is not a flat uint8 buffer)")
    return Header(metadata, shape[0], size - shape[0])


REALIGNED = "laid out for the same tensors at other memory alignments"


def _without_offsets(layout) -> list | None:
    """A layout's tensors (key, dtype, shape, size) without where each one starts; None if it is not a layout."""
    if not isinstance(layout, list) or not all(isinstance(e, dict) for e in layout):
        return None
    return [{k: v for k, v in e.items() if k != "offset"} for e in layout]


def mismatch(header: Header, key: str, layout: list, sha256: str, nbytes: int, model_tag=None) -> str | None:
    """Why the file described by ``header`` is not unit ``key`` with this layout and fingerprint
    (None when it is, as far as its header says; its payload is verified separately)."""
    meta = header.metadata
    if not header.is_lp_plugin:
        return "unreadable (not an lp_plugin layer file: its format mark is missing)"
    if meta.get("layer") != key:
        return "foreign (made from a different model or layer)"
    try:
        recorded = json.loads(meta.get("layout", ""))
    except (ValueError, RecursionError):
        return "unreadable (its recorded layout is not valid JSON)"
    wanted = json.loads(json.dumps(layout))  # compared as JSON (tuples read back as lists)
    if recorded != wanted:
        same_model = model_tag is None or meta.get("model") == str(model_tag)
        if same_model and _without_offsets(recorded) == _without_offsets(wanted):
            return (
                f"{REALIGNED} (this layer's weights sit elsewhere in memory than when it was written; the file "
                "keeps each tensor's alignment, for exact results)"
            )
        return "foreign (made from a different model or layer)"
    recorded_sha = meta.get("source_sha256")
    if not (isinstance(recorded_sha, str) and _SHA256.fullmatch(recorded_sha)):
        return "corrupt (its recorded fingerprint is not a SHA-256)"
    if recorded_sha != sha256:
        return "stale (the source weights changed since it was written)"
    if header.nbytes != nbytes:
        return "corrupt (its header's size does not match its layout)"
    return None
