"""Helpers for the lp-bench tests: running ``lp-bench`` in this process or in a fresh one (with code
injected at interpreter start through a ``sitecustomize`` module on PYTHONPATH), and small
settings that keep a run on a tiny checkpoint to a few seconds."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def benchmark_module(filename: str, name: str):
    """``benchmarks/FILENAME`` imported as module ``name`` (registered in ``sys.modules``: dataclasses look their
    module up there), with ``benchmarks/`` on ``sys.path`` as when it runs as a script (benchmarks import each
    other by name)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

# a tiny run: one thread (steadier on a shared machine), no tokenizer, no progress bars
SMALL = ["--prompt", "12", "--new", "8", "--prefill", "24", "--ppl-tokens", "24", "--repeats", "3",
         "--tokenizer", "none", "--no-progress", "--threads", "1", "--dtype", "fp32"]


def bench(args) -> tuple:
    """``lp-bench ARGS`` in this process: ``(exit status, stdout)``."""
    from lp_plugin.tools.bench import cli

    buf = io.StringIO()
    with redirect_stdout(buf):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, buf.getvalue()


def bench_process(args, site_code: str | None = None, tmp_dir=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m lp_plugin.tools.bench.cli ARGS`` in a fresh interpreter; ``site_code`` becomes a
    ``sitecustomize`` module that runs before lp-bench does (a test build of the engine)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if site_code is not None:
        site = Path(tmp_dir) / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(site_code)
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "lp_plugin.tools.bench.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=str(ROOT))


def config(data: dict, name: str) -> dict:
    return next(c for c in data["configs"] if c["name"] == name)


def read(path) -> dict:
    return json.loads(Path(path).read_text())
