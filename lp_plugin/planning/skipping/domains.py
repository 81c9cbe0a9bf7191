"""Named offline text sources (domains) for calibration and held-out evaluation of layer skipping.

Every domain is text of CPython, read without importing anything it describes, so the same Python
version gives the same text on every machine; a domain whose files this Python lacks raises
:class:`MissingDomain` naming the file and the fix. Two texts that Linux distributions often leave out
of their Python (Debian and Ubuntu ship ``idlelib`` in a separate package and drop ``LICENSE.txt``)
ship with lp_plugin instead, copied from CPython 3.11.7 (``texts/``, under the PSF license that is one
of them), so the default calibration runs on any Python and reads the same text on every machine. Domains:

* ``pydoc``: ``pydoc_data.topics`` (every topic, sorted by name, joined by blank lines).
* ``news``: IDLE's change logs (``idlelib/NEWS.txt`` then ``idlelib/NEWS2x.txt``; ``texts/idle_news.txt``):
  English prose.
* ``code``: the source of the standard library's ``email``, ``json``, ``logging`` and ``http``
  packages (files sorted by path).
* ``license``: CPython's ``LICENSE.txt`` (``texts/cpython_license.txt``): legal English.
* ``docstrings``: the docstrings of the standard library's top-level modules (files sorted by
  name; module, class and function docstrings in source order, read with :mod:`ast`).

The default calibration (``calib="mix"``) reads ``pydoc``, ``news`` and ``code``; ``license`` and
``docstrings`` are never calibrated on, so they measure text of another kind (see
:data:`EVAL_SLICES`).
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from dataclasses import dataclass

from ...errors import OffloadSpecError

WINDOW = 512
SLICE_TOKENS = 4096  # tokens of one evaluation slice
CODE_PACKAGES = ("email", "json", "logging", "http")
MIX_DOMAINS = ("pydoc", "news", "code")  # the default calibration's sources, dealt window by window
_TEXT_CHARS = 400_000  # characters of a long domain read at most (far more than the tokens used)


class MissingDomain(OffloadSpecError):
    """A text domain whose files this Python installation does not have."""


def _stdlib() -> str:
    return sysconfig.get_path("stdlib")


def _read(path: str, domain: str, fix: str = "install a CPython that ships it") -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise MissingDomain(
            f"text domain {domain!r} reads {path}, which cannot be read on this machine "
            f"({exc.strerror or exc}); {fix}, or leave {domain!r} out (lp-prune --domains)"
        ) from None


_SHIPPED_FIX = "reinstall lp_plugin (the file ships with it)"


def _pydoc() -> str:
    from .calib import pydoc_text

    return pydoc_text()


_TEXTS = os.path.join(os.path.dirname(__file__), "texts")


def _news() -> str:
    return _read(os.path.join(_TEXTS, "idle_news.txt"), "news", _SHIPPED_FIX)


def _license() -> str:
    return _read(os.path.join(_TEXTS, "cpython_license.txt"), "license", _SHIPPED_FIX)


def _py_files(folder: str) -> list:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "__pycache__"))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def _code() -> str:
    parts, size = [], 0
    for package in CODE_PACKAGES:
        folder = os.path.join(_stdlib(), package)
        if not os.path.isdir(folder):
            raise MissingDomain(
                f"text domain 'code' reads the standard library package {folder}, which this Python "
                "does not have; install a full CPython, or leave 'code' out (lp-prune --domains)"
            )
        for path in _py_files(folder):
            parts.append(_read(path, "code"))
            size += len(parts[-1])
            if size > _TEXT_CHARS:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def _docstrings() -> str:
    folder = _stdlib()
    names = (
        sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
        if os.path.isdir(folder)
        else []
    )
    parts, size = [], 0
    for name in names:
        try:
            tree = ast.parse(_read(os.path.join(folder, name), "docstrings"))
        except (SyntaxError, ValueError):
            continue
        for node in [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]:
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
                size += len(doc)
        if size > _TEXT_CHARS:
            break
    if not parts:
        raise MissingDomain(
            f"text domain 'docstrings' found no documented module in {folder}; install a full CPython, "
            "or leave 'docstrings' out (lp-prune --domains)"
        )
    return "\n\n".join(parts)


DOMAINS = {"pydoc": _pydoc, "news": _news, "code": _code, "license": _license, "docstrings": _docstrings}


def check(name: str) -> None:
    """Refuse an unknown domain name with the list of known ones."""
    if name not in DOMAINS:
        raise OffloadSpecError(f"unknown text domain {name!r}; choose from {sorted(DOMAINS)}")


@functools.cache
def text(name: str) -> str:
    """The text of domain ``name`` (MissingDomain when this Python lacks its files)."""
    check(name)
    return DOMAINS[name]()


def ids(tokenizer, name: str) -> list:
    """Domain ``name``'s tokens (no special tokens)."""
    from .calib import encode

    return encode(tokenizer, text(name))


@dataclass(frozen=True)
class Slice:
    """Tokens ``[start, end)`` of a domain, evaluated in windows; ``kind`` says how it relates to
    the default calibration: ``heldout`` (its domain, tokens it never reads) or ``other`` (a domain
    it never reads)."""

    name: str
    domain: str
    start: int
    end: int
    kind: str


# the slices lp-prune and the held-out lm-eval tasks report (the calibration slice is added per run)
EVAL_SLICES = (
    Slice("pydoc-a", "pydoc", 4096, 8192, "heldout"),
    Slice("pydoc-b", "pydoc", 8192, 12288, "heldout"),
    Slice("license", "license", 0, SLICE_TOKENS, "other"),
    Slice("docstrings", "docstrings", 0, SLICE_TOKENS, "other"),
)
SLICES = {s.name: s for s in EVAL_SLICES}
# tokens of each calibration domain that calibration never reads (held out for evaluation)
RESERVED = {"pydoc": (4096, 12288)}


def slice_ids(tokenizer, piece: Slice) -> list:
    """The tokens of ``piece`` (all the domain has when it is shorter than ``end``; an error when it
    has fewer than two windows' worth past ``start``)."""
    tokens = ids(tokenizer, piece.domain)[piece.start : piece.end]
    if len(tokens) < 2 * 2:
        raise MissingDomain(
            f"text domain {piece.domain!r} has only {len(tokens)} tokens in [{piece.start}, {piece.end}) "
            f"for slice {piece.name!r}; leave it out (lp-prune --domains)"
        )
    return tokens


def calibration_pool(tokenizer, name: str) -> list:
    """Domain ``name``'s tokens that calibration may read (outside :data:`RESERVED`)."""
    tokens = ids(tokenizer, name)
    lo, hi = RESERVED.get(name, (len(tokens), len(tokens)))
    return tokens[:lo] + tokens[hi:]


def mix_ids(tokenizer, tokens: int, window: int = WINDOW) -> list:
    """``tokens`` calibration tokens from :data:`MIX_DOMAINS`, dealt one ``window`` at a time in turn
    (pydoc, news, code, pydoc, ...), each domain read from its start outside :data:`RESERVED`;
    a domain that runs out leaves its turns to the others."""
    pools = {name: calibration_pool(tokenizer, name) for name in MIX_DOMAINS}
    offsets = dict.fromkeys(MIX_DOMAINS, 0)
    out: list[int] = []
    while len(out) < tokens:
        progressed = False
        for name in MIX_DOMAINS:
            take = min(window, tokens - len(out), len(pools[name]) - offsets[name])
            if take <= 0:
                continue
            out += pools[name][offsets[name] : offsets[name] + take]
            offsets[name] += take
            progressed = True
            if len(out) >= tokens:
                break
        if not progressed:
            raise OffloadSpecError(
                f"calib='mix:{tokens}' asks for more tokens than its domains hold outside the "
                f"held-out ranges ({len(out)}); ask for fewer"
            )
    return out


def slice_documents(
    tokenizer, piece: Slice, window: int = WINDOW, start: int | None = None, end: int | None = None
) -> list:
    """``piece``'s tokens (``start``/``end`` override its range) in ``window``-token pieces, each
    decoded back to text: one document per piece, as the held-out lm-eval tasks read them."""
    from .calib import split_windows

    if window < 2:
        raise OffloadSpecError(f"held-out window {window} is too short; use at least 2 tokens (default {WINDOW})")
    piece = Slice(
        piece.name, piece.domain, piece.start if start is None else start, piece.end if end is None else end, piece.kind
    )
    if piece.domain in RESERVED:
        lo, hi = RESERVED[piece.domain]
        if not lo <= piece.start < piece.end <= hi:
            raise OffloadSpecError(
                f"held-out tokens [{piece.start}, {piece.end}) of {piece.domain!r} must lie inside "
                f"[{lo}, {hi}), the range calibration never reads; pick a range inside it"
            )
    return [tokenizer.decode(list(w)) for w in split_windows(slice_ids(tokenizer, piece), window)]
