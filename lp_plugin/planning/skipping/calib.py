"""Calibration and held-out text for layer skipping: which tokens fitted quantities may see.

The pydoc stream is ``pydoc_data.topics`` (shipped with CPython): every topic's text, topics sorted
by name, joined by blank lines, tokenized once with the model's tokenizer (no special tokens).

* calibration: ``calib="mix"`` (the default) takes 12288 tokens dealt 512 at a time from the
  ``pydoc``, ``news`` and ``code`` domains (:mod:`.domains`), ``calib="mix:N"`` ``N`` of them;
  ``calib="pydoc"`` tokens ``[0, 4096)`` of the pydoc stream;
  ``calib="pydoc:N"`` takes ``N`` tokens from the stream outside the held-out range (``[0, 4096)``,
  then ``[12288, ...)``); ``calib=PATH`` takes the first 4096 tokens of a UTF-8 text file (read in
  growing pieces until they hold those tokens, not whole); ``calib=[ids...]`` takes token ids as
  given (ints, or an integer tensor; no tokenizer needed).
* held-out (the sweep and the lm-eval task ``lp_pydoc_heldout``): tokens ``[4096, 8192)`` cut
  into 512-token windows, each decoded back to text: one document per window; ``[8192, 12288)`` is
  held out too (slice ``pydoc-b``), and :mod:`.domains` names the other slices the sweep reports.

Every window, calibration or held-out, is scored as a document on its own, the way lm-eval's ``hf``
model scores a ``loglikelihood_rolling`` document: the model reads the document-start token (the
tokenizer's beginning-of-text token, else its end-of-text token) followed by the window and predicts
every token of the window. A held-out document's tokens are the tokenizer's default encoding of its
text (:func:`document_ids`), as lm-eval encodes it. The tokenizer is loaded from the model's
``config.name_or_path``; a model built in memory has none, and then text calibration is refused
with an error that says to pass token ids or load the model from a folder holding its tokenizer.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace

from ...errors import OffloadSpecError

CALIB_TOKENS = 4096
FIRST_READ = 64 * 1024  # bytes of a calibration file read first; each further read doubles
TOKEN_SLACK = 64  # tokens past the ones used that must be read, so the cut cannot change the last used ones
HELDOUT = (4096, 8192)  # the held-out documents of lp_pydoc_heldout (slice pydoc-a)
HELD_OUT_POOL = (4096, 12288)  # pydoc tokens calibration never reads (slices pydoc-a and pydoc-b)
MIX = "mix"
MIX_TOKENS = 12288  # the default calibration: this many tokens of the mixed domains
WINDOW = 512
PYDOC = "pydoc"


def pydoc_text() -> str:
    """Every pydoc topic's text, topics sorted by name, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def encode(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_for(model, why: str):
    """The tokenizer saved with ``model`` (``config.name_or_path``)."""
    from transformers import AutoTokenizer

    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not path:
        raise OffloadSpecError(
            f"{why} needs the model's tokenizer, which lp_plugin loads from model.config.name_or_path; this model has "
            "none (it was built in memory). Pass calib as token ids (calib=[int, ...]), or save the model with its "
            "tokenizer and load it from that folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise OffloadSpecError(
            f"{why} needs the model's tokenizer, but none loads from {path!r} ({exc}); save the tokenizer next to the "
            "model, or pass calib as token ids (calib=[int, ...])"
        ) from None
    if not encode(tokenizer, "calibration text"):  # a folder without tokenizer files can give an empty one
        raise OffloadSpecError(
            f"{why} needs the model's tokenizer, but the one loaded from {path!r} is empty (no tokenizer files "
            "there); save the tokenizer next to the model, or pass calib as token ids (calib=[int, ...])"
        )
    return tokenizer


def document_ids(tokenizer, text: str) -> list:
    """The tokens of a document as lm-eval's ``hf`` model encodes it (the tokenizer's defaults)."""
    return list(tokenizer(text)["input_ids"])


def doc_start_token(model, tokenizer=None) -> int:
    """The token a document is scored after, as lm-eval's ``hf`` model chooses it: the tokenizer's
    beginning-of-text token, else its end-of-text token; without a tokenizer the model config's."""
    source = tokenizer if tokenizer is not None else model.config
    for value in (getattr(source, "bos_token_id", None), getattr(source, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    raise OffloadSpecError(
        "the model has no beginning- or end-of-text token id (config.bos_token_id, eos_token_id); "
        "set model.config.bos_token_id to the token that starts a document"
    )


@dataclass(frozen=True)
class CalibData:
    """Calibration tokens, cut into windows, and how each window is scored."""

    windows: tuple  # tuple of tuples of token ids
    prefix: int  # document-start token read before each window
    source: str  # what they came from, for reports

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([self.prefix, [list(w) for w in self.windows]], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def split_windows(ids, window: int = WINDOW) -> tuple:
    """``ids`` cut into consecutive windows of ``window`` tokens (the last may be shorter)."""
    ids = list(ids)
    return tuple(tuple(ids[i : i + window]) for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1)


def pydoc_calibration_ids(tokenizer, tokens: int = CALIB_TOKENS) -> list:
    """``tokens`` tokens of the pydoc stream that are not held out: ``[0, 4096)``, then ``[12288, ...)``."""
    ids = encode(tokenizer, pydoc_text())
    pool = ids[: HELD_OUT_POOL[0]] + ids[HELD_OUT_POOL[1] :]
    if tokens > len(pool):
        raise OffloadSpecError(
            f"calib='pydoc:{tokens}' asks for more tokens than the pydoc text has outside the "
            f"held-out range ({len(pool)}); ask for fewer"
        )
    return pool[:tokens]


def heldout_documents(tokenizer, start: int = HELDOUT[0], end: int = HELDOUT[1], window: int = WINDOW) -> list:
    """The held-out documents: tokens ``[start, end)`` of the pydoc stream in ``window``-token pieces,
    each decoded back to text."""
    if not HELD_OUT_POOL[0] <= start < end <= HELD_OUT_POOL[1]:
        raise OffloadSpecError(
            f"held-out tokens [{start}, {end}) must lie inside [{HELD_OUT_POOL[0]}, {HELD_OUT_POOL[1]}), "
            "the range calibration never reads; pick a range inside it"
        )
    if window < 2:
        raise OffloadSpecError(f"held-out window {window} is too short; use at least 2 tokens (default {WINDOW})")
    ids = encode(tokenizer, pydoc_text())
    if end > len(ids):
        raise OffloadSpecError(f"the pydoc text has {len(ids)} tokens, fewer than the held-out end {end}")
    return [tokenizer.decode(list(w)) for w in split_windows(ids[start:end], window)]


def calibration(model, calib=None, window: int = WINDOW) -> CalibData:
    """The calibration data ``calib`` names for ``model`` (see the module docstring for the forms),
    in windows of ``window`` tokens (fewer for a model with a shorter context)."""
    window = min(window, getattr(model.config, "max_position_embeddings", None) or window)
    if _is_ids(calib):
        ids = _checked_ids(calib, getattr(model.config, "vocab_size", None))
        return CalibData(split_windows(ids, window), doc_start_token(model), f"{len(ids)} token ids")
    text, name, tokens = _checked_text(calib)
    if name == PYDOC:
        tokenizer = tokenizer_for(model, f"calib={text!r}")
        ids = pydoc_calibration_ids(tokenizer, tokens)
        return CalibData(split_windows(ids, window), doc_start_token(model, tokenizer), f"pydoc, {len(ids)} tokens")
    if name == MIX:
        from .domains import MIX_DOMAINS, mix_ids

        tokenizer = tokenizer_for(model, f"calib={text!r}")
        ids = mix_ids(tokenizer, tokens, window)
        return CalibData(
            split_windows(ids, window),
            doc_start_token(model, tokenizer),
            f"mix of {', '.join(MIX_DOMAINS)}, {len(ids)} tokens",
        )
    path = os.path.expanduser(text)
    tokenizer = tokenizer_for(model, f"calib={text!r}")
    ids = file_ids(tokenizer, path)
    if len(ids) < 2:
        raise OffloadSpecError(f"calib file {path!r} holds fewer than 2 tokens; give a file with text to calibrate on")
    return CalibData(split_windows(ids, window), doc_start_token(model, tokenizer), f"{path}, {len(ids)} tokens")


def check_before_loading(hf_config, calib) -> None:
    """Refuse what :func:`calibration` would refuse, from the model's config alone (before a weight is read):
    token ids outside the vocabulary, a form it does not know, a text form whose tokenizer does not load
    from ``hf_config.name_or_path``."""
    if _is_ids(calib):
        _checked_ids(calib, getattr(hf_config, "vocab_size", None))
        return
    text, _, _ = _checked_text(calib)
    tokenizer_for(SimpleNamespace(config=hf_config), f"calib={text!r}")


def _is_ids(calib) -> bool:
    return isinstance(calib, (list, tuple)) or type(calib).__name__ == "Tensor"


def _checked_ids(calib, vocab) -> list:
    ids = _token_ids(calib)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if len(ids) < 2 or bad:
        raise OffloadSpecError(
            f"calib token ids must be at least 2 ids in [0, vocab_size); got {len(ids)} ids, out of range: {bad[:5]}"
        )
    return ids


def _checked_text(calib) -> tuple[str, str, int]:
    """``calib`` as one of the text forms (the default: 'mix'): ``(text, name, tokens)``, ``name`` 'pydoc' or
    'mix' with the tokens it asks for, or '' (and 0) for a text file; or an error naming the forms."""
    if calib is None:
        return MIX, MIX, MIX_TOKENS
    if not isinstance(calib, (str, os.PathLike)):
        raise OffloadSpecError(
            "calib must be 'mix', 'mix:TOKENS', 'pydoc', 'pydoc:TOKENS', a text file path or a list of token ids, "
            f"got {calib!r}"
        )
    text = os.fspath(calib)
    name, _, count = text.partition(":")
    if name in (PYDOC, MIX) and (not count or re.fullmatch(r"[0-9]{1,12}", count, flags=re.ASCII)):
        default, example = (CALIB_TOKENS, "pydoc:4096") if name == PYDOC else (MIX_TOKENS, "mix:12288")
        tokens = int(count) if count else default
        if tokens < 2:
            raise OffloadSpecError(f"calib={text!r} asks for {tokens} tokens; ask for at least 2 (e.g. '{example}')")
        return text, name, tokens
    if not os.path.isfile(os.path.expanduser(text)):
        raise OffloadSpecError(
            f"calib={text!r} is neither 'mix', 'mix:TOKENS', 'pydoc', 'pydoc:TOKENS' nor an existing "
            "text file; pass one of those or a list of token ids"
        )
    return text, "", 0


def _token_ids(calib) -> list:
    """Token ids given as a sequence of ints or an integer tensor (floats are refused, not truncated)."""
    if type(calib).__name__ == "Tensor":
        if calib.dtype.is_floating_point or calib.dtype.is_complex or str(calib.dtype) == "torch.bool":
            raise OffloadSpecError(
                f"calib token ids must be an integer tensor, got {calib.dtype}; pass ids as "
                "torch.long (e.g. tokenizer(...)['input_ids'])"
            )
        return [int(i) for i in calib.flatten().tolist()]
    bad = [i for i in calib if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise OffloadSpecError(f"calib token ids must be ints, got {bad[0]!r}; pass a list of ints")
    return list(calib)


def check_file(path: str) -> None:
    """Refuse a calibration file that cannot be read or whose first piece is not UTF-8 text, before
    any model is loaded (a bad byte further on is refused when the text is read, if it is used)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(FIRST_READ)
    except OSError as exc:
        raise OffloadSpecError(
            f"calib file {path!r} cannot be read ({exc.strerror or exc}); pass a readable text file"
        ) from None
    try:
        codecs.getincrementaldecoder("utf-8")(errors="strict").decode(head, final=len(head) < FIRST_READ)
    except UnicodeDecodeError as exc:
        raise OffloadSpecError(
            f"calib file {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to "
            "UTF-8 or pass another file"
        ) from None


def file_ids(tokenizer, path: str, tokens: int = CALIB_TOKENS) -> list:
    """The first ``tokens`` tokens of UTF-8 text file ``path``: read in pieces (64 KiB, then doubling)
    until the text read holds :data:`TOKEN_SLACK` tokens more than that (a cut inside a word cannot
    change tokens that far before it), never whole unless it is short."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    text, size, offset = "", FIRST_READ, 0
    try:
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(size)
                try:
                    text += decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    raise OffloadSpecError(
                        f"calib file {path!r} is not UTF-8 text (byte {offset + exc.start}: "
                        f"{exc.reason}); convert it to UTF-8 or pass another file"
                    ) from None
                offset += len(chunk)
                ids = encode(tokenizer, text)
                if not chunk or len(ids) >= tokens + TOKEN_SLACK:
                    return ids[:tokens]
                size *= 2
    except OSError as exc:
        raise OffloadSpecError(
            f"calib file {path!r} cannot be read ({exc.strerror or exc}); pass a readable text file"
        ) from None
