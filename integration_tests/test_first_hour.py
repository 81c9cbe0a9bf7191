"""What a new user meets first: the ``lp-plugin`` command and its subcommands, bad input refused
before any loading, the disk tier's files (a temporary folder, ``detach(remove_files=True)``), what
``print(handle)`` and the attach log line say."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

import lp_plugin
from lp_plugin.__main__ import build_parser, main, plain_text
from lp_plugin.errors import OffloadSpecError

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_HUB_OFFLINE", None)  # a typo must be refused without the Hub's retries, online or not
    return subprocess.run([sys.executable, "-m", "lp_plugin", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ROOT))


# ---------------------------------------------------------------------------------------- the command
def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lp-plugin"] == "lp_plugin.__main__:main"
    assert {"lp-bench", "lp-prune"} <= set(scripts)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lp_plugin {lp_plugin.__version__}"


def _helps(parser):
    """Every description and option help text of ``parser`` and its subcommands."""
    yield parser.description or ""
    for action in parser._actions:
        yield action.help or ""
        for sub in getattr(action, "choices", None).values() if isinstance(getattr(action, "choices", None), dict) else ():
            yield from _helps(sub)


def test_help_is_plain_text_and_every_option_is_described():
    from lp_plugin.tools.bench.cli import build_parser as bench_parser
    from lp_plugin.tools.prune.cli import build_parser as prune_parser

    for parser in (build_parser(), bench_parser(), prune_parser()):
        for text in _helps(parser):
            assert "``" not in text and ":func:" not in text, text
        undescribed = [a.dest for p in [parser] for a in p._actions if not a.help and a.dest != "help"]
        assert undescribed == [], (parser.prog, undescribed)
    assert plain_text("``a`` :func:`lp_plugin.attach`") == "a lp_plugin.attach"


@pytest.mark.parametrize("tool,prog", [("bench", "lp-plugin bench"), ("prune", "lp-plugin prune")])
def test_bench_and_prune_are_subcommands(tool, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main([tool, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: {prog} ")
    if tool == "prune":
        assert "time: on the CPU" in out and "minutes" in out  # how long the sweep takes, before it starts


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def test_an_option_is_never_taken_for_a_longer_one_it_begins():
    # '--offload auto' must be refused as unknown, not read as '--offload-folder auto'
    from lp_plugin.tools.bench.cli import build_parser as bench_parser
    from lp_plugin.tools.prune.cli import build_parser as prune_parser

    parsers = [build_parser(), bench_parser(), prune_parser()]
    for parser in [*parsers, *_subparsers(parsers[0])]:
        assert parser.allow_abbrev is False, parser.prog
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "qwen2.5-3b-shape", "--offload", "fast"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bench_parser().parse_args(["--offload", "/tmp/x"])  # (--offload-dir)
    assert exc.value.code == 2


def test_an_unknown_option_gets_its_commands_usage_and_the_option_it_was_likely_meant_to_be(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "qwen2.5-3b-shape", "--max_memory", "6GiB"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: lp-plugin plan") and "did you mean --max-memory?" in err


@pytest.mark.parametrize(
    "module,argv,hint",
    [
        ("lp_plugin.tools.bench.cli", ["--repeat", "3"], "did you mean --repeats?"),
        ("lp_plugin.tools.prune.cli", ["--model", "m", "--out", "o", "--stand_ins", "linear"], "did you mean --stand-ins?"),
    ],
)
def test_lp_bench_and_lp_prune_name_the_option_an_unknown_one_was_meant_to_be(module, argv, hint, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert exc.value.code == 2 and hint in capsys.readouterr().err


def test_subcommands_run(capsys):
    assert main(["tasks-path"]) == 0
    assert Path(capsys.readouterr().out.strip(), "lp_pydoc_ppl").is_dir()


# ---------------------------------------------------------------------------------------- fail fast
def test_plan_refuses_a_typo_at_once_and_suggests_the_shape():
    t0 = time.perf_counter()
    proc = _cli("plan", "--model", "qwen2.5-3b", "--max-memory", "6GiB")
    assert proc.returncode == 2 and "did you mean 'qwen2.5-3b-shape'" in proc.stderr, proc.stderr
    assert time.perf_counter() - t0 < 20  # no Hub retries (those alone take ~23 s without network)


@pytest.mark.parametrize("name,ok", [("qwen2.5-3b-shape", True), ("Qwen/Qwen2.5-3B", True), ("qwen2.5-3b", False),
                                     ("./no/such/folder", False), ("two words", False), ("/", True)])
def test_model_name_problem(name, ok):
    from lp_plugin.tools.shapes import model_name_problem

    assert (model_name_problem(name) is None) == ok


@pytest.mark.parametrize("calib", ["pydoc:abc", "pydoc:1", "/no/such/calibration.txt"])
def test_bad_calib_is_refused_by_the_config(calib):
    with pytest.raises(OffloadSpecError):
        lp_plugin.OffloadConfig(skip="bi:2", calib=calib)


def test_prune_refuses_a_bad_calib_before_loading(tiny_checkpoints, tmp_path, capsys):
    from lp_plugin.tools.prune import cli

    loaded = []
    real = cli._engine
    cli._engine = lambda args: loaded.append(args) or real(args)
    try:
        rc = cli.main(["--model", tiny_checkpoints["llama"], "--calib", "pydoc:abc", "--out", str(tmp_path / "x"),
                       "--no-plot"])
    finally:
        cli._engine = real
    assert rc == 2 and loaded == [] and "calib='pydoc:abc'" in capsys.readouterr().err


def test_unknown_policy_names_auto():
    with pytest.raises(OffloadSpecError, match="'auto'"):
        lp_plugin.attach(build_tiny("qwen2"), offload="evne")


# ---------------------------------------------------------------------------------------- files
def _x():
    return torch.tensor([[1, 2, 3, 4]])


def test_disk_tier_without_a_folder_uses_a_temporary_one_removed_at_detach():
    model = build_tiny("qwen2")
    ref = model(_x()).logits
    handle = lp_plugin.attach(model, offload="even", tier="disk", mode="stream")
    folder = handle.tier.offload_folder
    assert handle.tier.temporary and sorted(os.listdir(folder))[1:] == ["layer_00002.safetensors", "layer_00004.safetensors"]
    assert handle.info()["offload_folder"] == folder
    assert torch.equal(model(_x()).logits, ref)
    handle.detach()
    assert not os.path.exists(folder) and torch.equal(model(_x()).logits, ref)


def test_temporary_folder_is_removed_at_exit(tmp_path):
    code = ("import os, sys, lp_plugin; sys.path.insert(0, sys.argv[1]); from shapes import build_tiny; "
            "h = lp_plugin.attach(build_tiny('llama'), offload='even', tier='disk'); print(h.tier.offload_folder)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "integration_tests")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip().splitlines()[-1]
    assert folder and not os.path.exists(folder)


def test_detach_remove_files_removes_only_what_lp_plugin_wrote(tmp_path):
    model = build_tiny("llama")
    ref = model(_x()).logits
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("the user's")
    handle = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=shared)
    handle.detach(remove_files=True)
    assert sorted(os.listdir(shared)) == ["notes.txt"]  # layer files and the journal gone, the user's file kept
    assert torch.equal(model(_x()).logits, ref)
    new = tmp_path / "offload" / "new"
    handle = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=new)
    handle.detach(remove_files=True)
    assert not new.exists()  # lp_plugin created it and left it empty: removed
    kept = tmp_path / "kept"
    handle = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=kept)
    handle.detach()
    assert len(list(kept.glob("layer_*.safetensors"))) == 2  # the default keeps them for the next attach


def test_remove_files_leaves_a_file_it_cannot_prove_its_own(tmp_path, caplog):
    model = build_tiny("llama")
    handle = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=tmp_path)
    # a user's file moved in at a layer's name after attach: not the file lp_plugin wrote there
    path = tmp_path / "layer_00002.safetensors"
    os.rename(path, tmp_path / "moved")
    path.write_bytes(b"the user's")
    with caplog.at_level(logging.WARNING, logger="lp_plugin"):
        handle.tier.remove_files()
    assert path.read_bytes() == b"the user's" and not (tmp_path / "layer_00004.safetensors").exists()
    assert "not provably a file lp_plugin wrote" in caplog.text
    handle.tier.close()


# ---------------------------------------------------------------------------------------- output
def test_print_handle_is_a_readable_summary(tmp_path):
    model = build_tiny("qwen2")
    handle = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=tmp_path, mode="stream")
    text = str(handle)
    assert text.splitlines()[0] == "lp_plugin: 2 of 8 layers offloaded to the disk tier, stream mode (exact)"
    assert "layers 2,4:" in text and "KiB" in text and str(tmp_path) in text and "remove_files=True" in text
    assert "offloaded='" in repr(handle) and "layers=[2, 4]" in repr(handle)
    handle.detach()
    assert "detached" in str(handle) and "detached" in repr(handle)


def test_attach_and_from_pretrained_log_one_line(tiny_checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="lp_plugin"):
        model = lp_plugin.from_pretrained(tiny_checkpoints["llama"], offload="even", dtype=torch.float32, tier="disk")
    lines = [r.getMessage() for r in caplog.records if r.name == "lp_plugin" and r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].startswith("lp_plugin: offloaded 2 of 8 layers (")
    assert "KiB) to the disk tier in " in lines[0] and "(temporary), session mode, alpha 1" in lines[0]
    # nor does Accelerate's note that offloaded parameters are on the meta device show: attach moved them
    assert not [r for r in caplog.records if "meta device" in r.getMessage()]
    lp_plugin.get_handle(model).detach()


def test_layers_text():
    from lp_plugin.core.report import layers_text

    assert [layers_text(x) for x in ([], [3], [2, 4], [2, 4, 6, 8], [0, 1, 3, 4, 5, 9])] == \
        ["none", "3", "2,4", "2-8:2", "0-1,3-5,9"]


@pytest.mark.slow
def test_demo_shows_lm_eval_progress_as_it_runs_and_ends_with_one_comparison():
    """``make demo``'s script: lm_eval's progress bars reach the user (stderr, live) instead of being
    swallowed for a minute a run; the comparison (perplexities, memory saved, one speed) is on stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--limit", "1"], capture_output=True,
                          text=True, env=env, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "100%|" in proc.stderr  # tqdm bars (loading weights, lm-eval's requests) were passed through
    assert "100%|" not in proc.stdout and "saved " in proc.stdout


@pytest.mark.parametrize("setup,env,drawn", [
    ("", {}, False),  # stderr a pipe: a log, no bars
    ("import sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel')", {}, True),  # a Jupyter kernel
    ("", {"LP_PLUGIN_PROGRESS": "1"}, True),
    ("import sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel')", {"LP_PLUGIN_PROGRESS": "0"}, False),
])
def test_progress_bars_are_drawn_in_a_terminal_or_a_notebook(setup, env, drawn):
    code = f"{setup}\nfrom lp_plugin.core.progress import enabled\nprint(enabled())"
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    full.pop("LP_PLUGIN_PROGRESS", None) if "LP_PLUGIN_PROGRESS" not in env else None
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(drawn)


def test_a_tools_output_path_is_checked_before_its_run(tmp_path):
    from lp_plugin.tools import check_writable

    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile / "out.json", tmp_path):  # a file where the folder goes; a folder where the file goes
        with pytest.raises(ValueError, match="--out"):
            check_writable("--out", str(bad))
    check_writable("--out", str(tmp_path / "new" / "deeper" / "out.json"))  # a missing folder is made
    assert (tmp_path / "new" / "deeper").is_dir() and afile.read_text() == "x"


def test_command_line_errors_name_the_flag_not_the_python_option(tiny_checkpoints, tmp_path, capsys):
    for size in ("6", "0=6"):  # a size without its unit: bytes, as Accelerate reads it, but never what was meant
        with pytest.raises(SystemExit) as exc:
            main(["plan", "--model", "qwen2.5-3b-shape", "--max-memory", size])
        assert exc.value.code == 2 and f"{size}GiB" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-3b-shape", "--max-memory", "6GiB", "--context", "0"]) == 2
    assert "--context" in capsys.readouterr().err
    if not torch.cuda.is_available():
        from lp_plugin.tools.prune import cli

        rc = cli.main(["--model", tiny_checkpoints["llama"], "--device", "cuda", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and "--device cpu" in err and "main_device" not in err
