"""The README and docs/ run as written: every ``bash`` and ``python`` block is run in a fresh folder,
offline, on the bundled model, as a new user would paste it. A block preceded by
``<!-- not run: REASON -->`` (hours of CPU time, a GPU, installing packages) is only parsed, and
the lp-bench / lp-prune / lp-plugin commands in it must be accepted by their parsers. Also: the
README stays short, keeps its "Fit your card" section, and every link to a file resolves.

Where the environment's ``lp-plugin`` console script predates this checkout (an editable install
made before the script was declared), the blocks get one that runs ``python -m lp_plugin``: the
same entry point the declared script calls (test_first_hour.py checks the declaration)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.S | re.M)


def blocks():
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] in ("bash", "python"):
                line = text[:m.start("body")].count("\n") + 1
                yield pytest.param(page, m["lang"], m["body"], m["why"], id=f"{page.relative_to(ROOT)}:{line}")


BLOCKS = list(blocks())
RUN = [b for b in BLOCKS if b.values[3] is None]
NOT_RUN = [b for b in BLOCKS if b.values[3] is not None]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bindir = Path(sys.executable).parent
    path = [str(bindir)]
    if not (bindir / "lp-plugin").exists():
        shim = tmp_path_factory.mktemp("bin")
        (shim / "lp-plugin").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m lp_plugin "$@"\n')
        (shim / "lp-plugin").chmod(0o755)
        path.insert(0, str(shim))
    return dict(os.environ, PATH=os.pathsep.join(path + [os.environ.get("PATH", "")]), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
@pytest.mark.parametrize("page,lang,body,why", RUN)
def test_block_runs_as_written(page, lang, body, why, env, tmp_path):
    cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{page.name} block failed:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert not list(tmp_path.glob("**/layer_*.safetensors")), "a block left offload files behind"


def _commands(script: str, names):
    for line in script.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        words = shlex.split(line)
        for name in names:
            head = name.split()
            for i in range(len(words) - len(head) + 1):
                if words[i:i + len(head)] == head:
                    yield name, words[i + len(head):]


@pytest.mark.parametrize("page,lang,body,why", NOT_RUN)
def test_blocks_not_run_still_parse(page, lang, body, why):
    from lp_plugin.tools.bench.cli import build_parser as bench_parser
    from lp_plugin.tools.prune.cli import build_parser as prune_parser

    assert why.strip(), "say why a block is not run"
    if lang == "python":
        compile(body, str(page), "exec")
        return
    proc = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    parsers = {"lp-bench": bench_parser, "lp-plugin bench": bench_parser, "lp-prune": prune_parser,
               "lp-plugin prune": prune_parser}
    arrays = dict(re.findall(r"^(\w+)=\((.*?)\)$", body.replace("\\\n", " "), re.S | re.M))
    for name, words in _commands(body, parsers):
        words = [w for word in words for w in (shlex.split(arrays[word[2:-4]]) if re.fullmatch(r"\$\{\w+\[@\]\}", word)
                                               else [word])]
        words = [re.sub(r"\$\(.*?\)|\$\{?\w+\}?", "MODEL", w) for w in words]
        parsers[name]().parse_args(words)


def test_readme_is_short_and_keeps_its_budget_section():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "\n## Fit your card\n" in text
    for page in ["options", "budgets", "skipping", "files", "gate", "results"]:
        assert f"(docs/{page}.md" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_there_are_blocks_to_run():
    assert len(RUN) >= 8 and {b.values[1] for b in RUN} == {"bash", "python"}
