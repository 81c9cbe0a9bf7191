"""Plugin discovery: the example package in entry_points/ is pip-installed for real (into a
target folder) and used by name from a fresh process; registrations that clash are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lp_plugin
from lp_plugin.errors import OffloadSpecError
from lp_plugin.hookspecs import hookimpl
from lp_plugin.planning import plugins
from lp_plugin.planning.policies import OffloadPolicy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "entry_points" / "lp-plugin-every-third"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(EXAMPLE)],
                   check=True)
    return target


def _run(code, extra_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(extra_path), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_installed_plugin_policy_is_used_by_name(installed_example):
    code = (
        "import json, sys, torch, lp_plugin\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import build_tiny\n"
        "m = build_tiny('llama', num_layers=12)\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        "ref = m(ids).logits\n"
        "h = lp_plugin.attach(m, offload='every-third')\n"
        "print(json.dumps({'layers': h.info()['layers'], 'exact': bool(torch.equal(m(ids).logits, ref)),"
        " 'policies': sorted(lp_plugin.planning.plugins.policies())}))\n"
    )
    proc = _run(code, installed_example)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layers"] == [2, 5, 8]  # 12 layers, protect 2/3: 2..8 step 3
    assert out["exact"] is True
    assert {"even", "odd", "all", "none", "every-third"} <= set(out["policies"])


def test_without_the_plugin_the_name_is_unknown_and_the_error_lists_choices():
    proc = _run("import lp_plugin; lp_plugin.resolve_layers('every-third', 36)", "")
    assert proc.returncode != 0
    assert "unknown offload policy 'every-third'" in proc.stderr and "'even'" in proc.stderr


def test_builtins_are_registered_through_the_hooks():
    assert sorted(plugins.policies()) >= ["all", "even", "none", "odd"]
    assert plugins.tier_names() == sorted(set(plugins.tier_names()) | {"cpu", "disk"})
    assert plugins.pm.get_plugin("builtins") is not None or any(
        getattr(p, "__name__", "") == "lp_plugin.planning.builtins" for p in plugins.pm.get_plugins())


class _Clash:
    class Even(OffloadPolicy):
        name = "even"

        def select(self, num_layers, lo, hi):
            return [lo]

    @hookimpl
    def register_policies(self, register):
        register(self.Even())


class _BadObject:
    @hookimpl
    def register_policies(self, register):
        register("not a policy")


@pytest.mark.parametrize("plugin,error,match", [
    (_Clash(), OffloadSpecError, "offload policy 'even' is registered twice"),
    (_BadObject(), TypeError, "register an instance of lp_plugin.OffloadPolicy"),
])
def test_bad_registrations_are_refused(plugin, error, match):
    plugins.reset_for_tests()
    try:
        plugins.load()
        plugins.pm.register(plugin, name="bad-plugin")  # registries are built from every registered plugin
        with pytest.raises(error, match=match):
            plugins.policies()
    finally:
        plugins.reset_for_tests()
    assert "even" in plugins.policies()  # a clean reload works again


def test_policy_subclass_must_name_itself():
    with pytest.raises(TypeError, match="must set a non-empty class attribute 'name'"):
        class Nameless(OffloadPolicy):
            def select(self, num_layers, lo, hi):
                return []


def test_import_is_cheap():
    proc = _run("import sys, lp_plugin; print('torch' in sys.modules, 'transformers' in sys.modules)", "")
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "False"]
    assert lp_plugin.__version__
