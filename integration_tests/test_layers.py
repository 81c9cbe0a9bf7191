"""The package's layers, read from the source (no imports, no model): every import of an lp_plugin module
names a module or attribute that exists, and imports point down the stack only:

    errors, hookspecs  <  core  <  planning  <  integrations, lp_plugin (the public API)  <  tools, __main__

Entry points (pyproject.toml, the lm-eval .pth hook), the public API's lazy table and the built-in plugin's
``"module:Class"`` strings must name something that exists too.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lp_plugin"
MAX_TOP_ENTRIES = 8
# rank of each top-level entry of lp_plugin/; an import may name its own rank or a lower one
RANKS = {"errors": 0, "hookspecs": 0, "core": 1, "planning": 2, "integrations": 3, "": 3, "tools": 4, "__main__": 4}


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "lp_plugin.core.flat"
    path: Path
    is_package: bool
    tree: ast.Module


def modules(root: Path) -> dict[str, Module]:
    """Every Python module under ``root`` (an ``lp_plugin`` folder), by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = Module(".".join(parts), path, is_package, ast.parse(path.read_text(), str(path)))
    return out


def defined_names(module: Module) -> set[str]:
    """Names bound at a module's top level, plus the keys of a lazy ``_LAZY`` table."""
    names: set[str] = set()
    for node in module.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) and isinstance(node.value, ast.Dict):
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def rank(name: str) -> int:
    parts = name.split(".")
    return RANKS[parts[1] if len(parts) > 1 else ""]


@dataclass(frozen=True)
class Problem:
    where: str  # "path:line"
    kind: str  # "unresolved" or "upward"
    target: str

    def __str__(self):
        return f"{self.where}: {self.kind} import of {self.target}"


def imports_of(module: Module, known: dict[str, Module]):
    """(line, imported module, attribute or None) for each lp_plugin import in ``module``, at any depth."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lp_plugin" or alias.name.startswith("lp_plugin."):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                if not module.is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "lp_plugin" or node.module.startswith("lp_plugin.")):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, target, alias.name


def unresolved(target: str, attr: str | None, known: dict[str, Module]) -> bool:
    """Whether an import of ``target`` (``attr`` from it) names no module or top-level name that exists."""
    return target not in known or (attr is not None and attr not in defined_names(known[target]))


def problems(root: Path) -> list[Problem]:
    """Unresolved and upward imports in the ``lp_plugin`` package at ``root``."""
    known = modules(root)
    out = []
    for module in known.values():
        path = module.path.relative_to(root.parent)
        for line, target, attr in imports_of(module, known):
            if unresolved(target, attr, known):
                out.append(Problem(f"{path}:{line}", "unresolved", target + (f".{attr}" if attr else "")))
            elif rank(target) > rank(module.name):
                out.append(Problem(f"{path}:{line}", "upward", target))
    return out


def resolves(spec: str, known: dict[str, Module]) -> bool:
    """Whether ``"package.module:attr"`` (or a bare module name) names something that exists."""
    name, _, attr = spec.partition(":")
    return name in known and (not attr or attr in defined_names(known[name]))


def test_every_import_resolves_and_points_down():
    found = problems(PACKAGE)
    assert not found, "\n".join(map(str, found))


def script_problems(folder: Path, known: dict[str, Module]) -> list[Problem]:
    """Unresolved lp_plugin imports in the scripts of ``folder`` (benchmarks run on a GPU host import the
    package lazily, inside functions: a stale name there fails only in the middle of a device run)."""
    out = []
    for path in sorted(folder.glob("*.py")):
        script = Module(f"{folder.name}.{path.stem}", path, False, ast.parse(path.read_text(), str(path)))
        for line, target, attr in imports_of(script, known):
            if attr is not None and attr.startswith("__"):  # a module's own dunder (__file__, __version__)
                continue
            if unresolved(target, attr, known):
                out.append(Problem(f"{folder.name}/{path.name}:{line}", "unresolved", target + (f".{attr}" if attr else "")))
    return out


def test_benchmark_scripts_import_what_exists():
    found = script_problems(REPO / "benchmarks", modules(PACKAGE))
    assert not found, "\n".join(map(str, found))


def top_problems(root: Path) -> list[str]:
    """What is wrong with the top of the package: more than 8 entries, or one the layer ranks do not place."""
    entries = sorted(p.name for p in root.iterdir() if p.name != "__pycache__")
    out = [f"{len(entries)} entries at the top (at most {MAX_TOP_ENTRIES}): {entries}"] if len(entries) > MAX_TOP_ENTRIES else []
    return out + [f"{e} has no layer rank" for e in entries if Path(e).stem not in set(RANKS) | {"__init__"}]


def test_at_most_eight_entries_at_the_top():
    assert top_problems(PACKAGE) == []


def test_entry_points_and_lazy_names_resolve():
    known = modules(PACKAGE)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["scripts"].values()]
    for group in project["entry-points"].values():
        specs += group.values()
    pth = (REPO / "entry_points" / "lp_plugin_lm_eval.pth").read_text()
    specs += [f"{m}:{a}" for m, a in re.findall(r"from (lp_plugin[\w.]*) import (\w+)", pth)]
    lazy = ast.literal_eval(next(n.value for n in known["lp_plugin"].tree.body if isinstance(n, ast.Assign)
                                 and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in n.targets)))
    specs += [f"{m}:{name}" for name, m in lazy.items()]
    builtins = known["lp_plugin.planning.builtins"].path.read_text()
    specs += re.findall(r'"(lp_plugin[\w.]*:\w+)"', builtins)
    specs += [f"lp_plugin.planning.skipping.policies:{c}" for c in re.findall(r'"(\w+Policy)"', builtins)]
    assert len(specs) > 20
    missing = [s for s in specs if not resolves(s, known)]
    assert not missing, missing


@pytest.fixture
def package_copy(tmp_path):
    copy = tmp_path / "lp_plugin"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_the_check_finds_an_upward_import_inside_a_function(package_copy):
    assert problems(package_copy) == []
    _append(package_copy / "core" / "flat.py", "def _late():\n    from ..planning.plan import OffloadPlan\n")
    found = problems(package_copy)
    assert [(p.kind, p.target) for p in found] == [("upward", "lp_plugin.planning.plan")]
    assert found[0].where.startswith("lp_plugin/core/flat.py:")


def test_the_check_finds_a_stale_module_and_a_missing_name(package_copy):
    _append(package_copy / "planning" / "plan.py", "from ..core import flat, nowhere\nfrom lp_plugin.core.flat import Nope")
    found = problems(package_copy)
    assert sorted((p.kind, p.target) for p in found) == [("unresolved", "lp_plugin.core.flat.Nope"),
                                                         ("unresolved", "lp_plugin.core.nowhere")]


def test_the_check_counts_top_entries(package_copy):
    (package_copy / "extra.py").write_text('"""x"""\n')
    found = top_problems(package_copy)  # the package has 8 entries: a ninth is one too many
    assert len(found) == 2 and found[0].startswith("9 entries") and found[1] == "extra.py has no layer rank"


def test_the_script_check_finds_a_stale_import(tmp_path):
    (tmp_path / "bench.py").write_text("def main():\n    from lp_plugin.bundled import bundled_model_path\n")
    found = script_problems(tmp_path, modules(PACKAGE))
    assert [(p.kind, p.target) for p in found] == [("unresolved", "lp_plugin.bundled.bundled_model_path")]
