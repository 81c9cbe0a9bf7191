"""Fault tests of inputs: every public entry point (the Python API, lm-eval ``model_args``, the
``plan``, ``compare-lm-eval``, ``lp-bench`` and ``lp-prune`` command lines) answers bad input with one
clear error of lp_plugin's own type (or exit status 2 with an ``error:`` line), before loading a
model where it can; never a raw ``ValueError``/``TypeError``/``RuntimeError``, a traceback or a hang.

Explicit cases for each defect found (``plan --context 1e24``, ``--device banana``, Unicode digits,
``stand_in=none`` from lm-eval, non-UTF-8 and missing calibration files, float token ids,
``importance(steps="2")``, ...), then hypothesis property tests over the option grammar and the
command lines, each example under a time limit (SIGALRM).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapes import build_tiny

import lp_plugin
from lp_plugin.core.report import size_text
from lp_plugin.errors import OffloadSpecError
from lp_plugin.planning.config import OffloadConfig, parse_max_memory, parse_size
from lp_plugin.planning.plan import fit_budget
from lp_plugin.planning.skipping import calib as calib_mod
from lp_plugin.planning.skipping.spec import check_calib, parse_policy, parse_stand_in
from lp_plugin.tools.shapes import shape_config

ROOT = Path(__file__).resolve().parent.parent


class Hang(Exception):
    """An example ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))


def _main(argv) -> tuple:
    """``python -m lp_plugin ARGV`` in this process: (exit status, stdout, stderr)."""
    from lp_plugin.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("nbytes", [1, 1023, 2**30, 10**24, 3 * 10**40 + 7, 2**200 + 1])
def test_size_text_up_is_exact_and_quick(nbytes):
    with time_limit(5):
        text = size_text(nbytes, up=True)
    number, unit = text.split()
    factor = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[unit]
    hundredths = int(number.replace(".", ""))
    assert hundredths * factor >= nbytes * 100 > (hundredths - 1) * factor  # exact, rounded up to the next 0.01
    if nbytes < 2**50:
        assert parse_size(text.replace(" ", "")) >= nbytes  # what the budget reads back


def test_plan_huge_context_returns(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lp_plugin", "plan", "--model", "smollm2-135m-shape", "--max-memory",
                           "1GiB", "--context", str(10**24)],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tier", ["disk", "cpu"])
def test_plan_refuses_an_offload_folder_from_pretrained_would_refuse(tmp_path, tier):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    argv = ["plan", "--model", "smollm2-135m-shape", "--max-memory", "2GiB", "--tier", tier, "--offload-folder", afile]
    rc, out, err = _main(argv)
    assert rc == 2 and out == "" and sum("error:" in line for line in err.splitlines()) == 1
    assert afile.read_text() == "mine"
    assert _main([*argv[:-1], tmp_path / "new"])[0] == (0 if tier == "disk" else 2)
    assert not (tmp_path / "new").exists()  # a plan writes nothing


@pytest.mark.parametrize("device", ["banana", "cuda:x", "", "cuda:-1", "0:1"])
def test_plan_bad_device_exit_2(device):
    rc, _, err = _main(["plan", "--model", "smollm2-135m-shape", "--max-memory", "1GiB", "--device", device])
    assert rc == 2
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1


def test_plan_offload_folder_for_a_tier_without_files_exit_2(tmp_path):
    """The folder would be ignored (the cpu tier keeps no files): refused as from_pretrained refuses it; with the
    disk tier the same folder plans."""
    argv = ["plan", "--model", "smollm2-135m-shape", "--max-memory", "2GiB", "--offload-folder", str(tmp_path)]
    rc, _, err = _main([*argv, "--tier", "cpu"])
    assert rc == 2 and "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
    assert _main([*argv, "--tier", "disk"])[0] == 0
    with pytest.raises(OffloadSpecError):
        fit_budget(shape_config("smollm2-135m-shape"), max_memory="2GiB", offload_folder=str(tmp_path), tier="cpu")


@pytest.mark.parametrize("device", ["banana", "cuda:x", -1, 1.5])
def test_main_device_refused_at_config(device):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(main_device=device)


def test_attach_bad_device_leaves_the_model_alone():
    model = build_tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OffloadSpecError):
        lp_plugin.attach(model, offload="even", main_device="banana")
    assert lp_plugin.get_handle(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- option strings
@pytest.mark.parametrize("name,text", [
    ("prefetch", "--5"), ("prefetch", "²"), ("prefetch", "٣"), ("prefetch", "１"), ("prefetch", "1_0"),
    ("prefetch", "+"), ("prefetch", ""), ("protect_first", "9" * 40), ("max_context", "1e3"), ("batch_size", "0x10"),
    ("alpha", "½"), ("alpha", "１"), ("alpha", "nan"), ("alpha", "1e999"), ("alpha", "--1"),
    ("stand_in", "linear:²"), ("stand_in", "linear:٣"), ("stand_in", "linear:0"), ("stand_in", "linear:-1"),
    ("calib", "pydoc:²"), ("calib", "pydoc:١٠٠"), ("calib", "pydoc:-5"), ("calib", "pydoc: 4"),
    ("skip", "greedy:²"), ("max_memory", "1e400GiB"), ("max_memory", "²GiB"),
])
def test_option_strings_refused_with_one_error_type(name, text):
    with pytest.raises(OffloadSpecError):
        OffloadConfig.from_strings({name: text})


@pytest.mark.parametrize("spec", ["2;²", "²", "2-٤", "2-6:²"])
def test_offload_layer_list_unicode_digits_refused(spec):
    from lp_plugin.planning.plugins import policies
    from lp_plugin.planning.policies import select_layers

    config = OffloadConfig.from_strings({"offload": spec})
    with pytest.raises(OffloadSpecError):
        select_layers(config.offload, 8, policies=policies())


def test_lm_eval_stand_in_none_is_accepted():
    from lm_eval.utils import simple_parse_args_string

    values = simple_parse_args_string("skip=2;4,stand_in=none")
    assert values["stand_in"] is None  # what lm-eval makes of it
    assert OffloadConfig.from_strings(values).stand_in == "none"


def test_stand_in_parse_unicode_digit():
    with pytest.raises(OffloadSpecError):
        parse_stand_in("linear:²")


# --------------------------------------------------------------------------------- calibration
def test_calib_missing_file_refused_at_config(tmp_path):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(calib=str(tmp_path / "missing.txt"))


def test_calib_non_utf8_file_refused_at_config(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 10)
    with pytest.raises(OffloadSpecError):
        OffloadConfig(calib=str(path))


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_calib_special_file_refused(tmp_path, kind):
    path = tmp_path / "special"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with time_limit(10), pytest.raises(OffloadSpecError):
        check_calib(str(path))


@pytest.mark.parametrize("ids", [torch.tensor([1.5, 2.7, 3.2, 4.9]), torch.tensor([True, False, True]),
                                 torch.tensor([1.0, 2.0, 3.0]), [1.5, 2.5, 3.5], [1, 2, "3"], [True, False]])
def test_calib_float_or_bool_ids_refused(ids):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(calib=ids)
    model = build_tiny("llama")
    with pytest.raises(OffloadSpecError):
        calib_mod.calibration(model, ids)


def test_calib_integer_tensor_accepted():
    model = build_tiny("llama")
    data = calib_mod.calibration(model, torch.arange(2, 100, dtype=torch.int32))
    assert data.num_tokens == 98


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny model saved with the bundled tokenizer (text calibration needs one)."""
    from lm_eval_fixtures import tokenizer_dir
    from shapes import save_tiny
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path_factory.mktemp("text-model") / "m", tokenizer_dir=tokenizer_dir())
    return AutoModelForCausalLM.from_pretrained(folder)


def _pydoc_bytes() -> bytes:
    return calib_mod.pydoc_text().encode()


def test_calib_file_read_only_as_far_as_used(text_model, tmp_path, monkeypatch):
    """A 20 MB file: only a prefix is read and tokenized, and the tokens are those of the whole text."""
    data = _pydoc_bytes()
    path = tmp_path / "big.txt"
    path.write_bytes((data + b"\n") * (20_000_000 // len(data) + 1))
    longest = []
    encode = calib_mod.encode
    monkeypatch.setattr(calib_mod, "encode", lambda tok, text: longest.append(len(text)) or encode(tok, text))
    got = calib_mod.calibration(text_model, str(path))
    assert max(longest) < 2_000_000
    tokenizer = calib_mod.tokenizer_for(text_model, "test")
    want = encode(tokenizer, data.decode()[:400_000])[: calib_mod.CALIB_TOKENS]
    assert [i for w in got.windows for i in w] == want[: got.num_tokens] and got.num_tokens == calib_mod.CALIB_TOKENS


def test_calib_bad_byte_past_the_used_text_is_not_read(text_model, tmp_path):
    path = tmp_path / "tail.txt"
    path.write_bytes(_pydoc_bytes() * 3 + b"\xff\xfe")
    assert calib_mod.calibration(text_model, str(path)).num_tokens == calib_mod.CALIB_TOKENS


def test_calib_bad_byte_inside_the_used_text_is_refused(text_model, tmp_path, monkeypatch):
    """Past the first piece checked at config time, but inside what calibration reads (small pieces here)."""
    monkeypatch.setattr(calib_mod, "FIRST_READ", 1024)
    path = tmp_path / "middle.txt"
    path.write_bytes(b"word " * 400 + b"\xc3(" + b" more" * 100)
    check_calib(str(path))  # the first piece is clean
    with pytest.raises(OffloadSpecError):
        calib_mod.calibration(text_model, str(path))


def test_calib_multibyte_char_across_a_read_boundary(text_model, tmp_path):
    head = b"a" * (calib_mod.FIRST_READ - 1)
    path = tmp_path / "utf8.txt"
    path.write_bytes(head + "é naïve café ".encode() * 2000)
    assert calib_mod.calibration(text_model, str(path)).num_tokens > 2


@pytest.mark.parametrize("calib", ["pydoc", "mix:64", "file"])
def test_text_calib_without_a_saved_tokenizer_names_the_model_folder(tmp_path, calib):
    """transformers loads an empty tokenizer from a folder without tokenizer files: text calibration
    refuses it, naming the folder, instead of reporting a text too short."""
    from shapes import save_tiny
    from transformers import AutoModelForCausalLM

    folder = save_tiny("qwen2", tmp_path / "no-tokenizer")  # transformers makes an empty Qwen2 tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("word " * 2000)
    with pytest.raises(OffloadSpecError) as exc:
        calib_mod.calibration(model, str(text) if calib == "file" else calib)
    assert folder in str(exc.value)


@pytest.mark.parametrize("calib", ["missing", "latin1", "pydoc:²", "folder"])
def test_lp_prune_checks_calib_before_any_work(tmp_path, monkeypatch, calib):
    from shapes import save_tiny

    from lp_plugin.tools.prune import cli, sweep

    model = save_tiny("llama", tmp_path / "m")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 " * 100)
    value = {"missing": str(tmp_path / "nope.txt"), "latin1": str(latin1), "pydoc:²": "pydoc:²",
             "folder": str(tmp_path)}[calib]

    def no_work(*args, **kwargs):
        raise AssertionError("lp-prune started its sweep")

    monkeypatch.setattr(sweep, "run_sweep", no_work)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["--model", model, "--out", str(tmp_path / "out" / "o"), "--calib", value, "--no-plot"])
    assert rc == 2 and "Traceback" not in err.getvalue()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from shapes import save_tiny

    return save_tiny("qwen2", tmp_path_factory.mktemp("bench-model") / "tiny-qwen2")


def _bench_before_work(monkeypatch, argv) -> tuple:
    """lp-bench ``argv`` with measuring replaced by a marker: (exit status, whether it began measuring)."""
    from bench_helpers import bench

    from lp_plugin.tools.bench import runner

    started = []

    def no_work(settings, configs, **kwargs):
        started.append(configs)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_bench", no_work)
    with contextlib.redirect_stderr(io.StringIO()):
        rc, _ = bench(argv)
    return rc, bool(started)


@pytest.mark.parametrize("config", [
    "stream:²:cpu", "stream:2-٤:cpu", "session:2-99:cpu", "accelerate_cpu:²", "stream:even:cpu:prefetch=١",
    "stream:even:cpu:alpha=½", "stream:even:cpu:new=１", "stream:even:cpu:skip=bi:²",
    "stream:even:cpu:stand_in=linear:²", "stream:even:cpu:calib=pydoc:²", "session:even:disk:calib=/no/such/file",
    "stream:even:cpu:skip=40", "stream:even:cpu:skip=2-٤",
])
def test_lp_bench_checks_engine_options_before_any_work(tiny_checkpoint, monkeypatch, config):
    rc, started = _bench_before_work(monkeypatch, ["--model", tiny_checkpoint, "--configs", config])
    assert rc == 2 and not started


def test_lp_bench_good_engine_options_reach_the_run(tiny_checkpoint, monkeypatch):
    configs = ("stream:even:cpu:prefetch=2,session:2-6:2:disk,accelerate_cpu:odd,stream:even:cpu:skip=bi:2:stand_in=linear:4,"
               "session:even:cpu:skip=3,5")
    rc, started = _bench_before_work(monkeypatch, ["--model", tiny_checkpoint, "--configs", configs])
    assert rc == 0 and started


# ---------------------------------------------------------------------------------- importance
@pytest.mark.parametrize("metric,kw", [("greedy", {"steps": "2"}), ("greedy", {"steps": -1}), ("greedy", {"steps": 0}),
                                       ("greedy", {"steps": 2.0}), ("greedy", {"steps": True}),
                                       ("angular", {"n": 2.5}), ("angular", {"n": "2"}), ("angular", {"n": True}),
                                       ("angular", {"n": 0}), ("angular", {"n": 99}), ("nope", {})])
def test_importance_arguments_refused(metric, kw):
    model = build_tiny("llama")
    with pytest.raises(OffloadSpecError):
        lp_plugin.importance(model, list(range(2, 130)), metric, **kw)


# --------------------------------------------------------------------------- property: the grammar
_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["none", "even", "odd", "all", "auto", "2;4", "2-6:2", "linear:4", "mean", "pydoc:64", "bi:2",
                     "greedy:20%", "0:1GiB;cpu:2GiB", "session", "stream", "cpu", "disk", "--5", "²", "1e24", "nan",
                     "-1", "0", "1", "cuda:0", "banana", "generate", "loglikelihood", "1" * 30]),
)
_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                   st.floats(allow_nan=True, allow_infinity=True), _TEXT, st.lists(st.integers(-3, 40), max_size=4))
_NAMES = st.sampled_from(list(OffloadConfig.names()) + ["bogus", ""])

SLOW_AND_TMP = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
GRAMMAR = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@GRAMMAR
@given(values=st.dictionaries(_NAMES, _VALUE, max_size=4))
def test_from_strings_one_error_type(values):
    values.pop("offload_folder", None)  # a folder is created only at attach; kept out to leave no trace
    with time_limit(10):
        try:
            assert isinstance(OffloadConfig.from_strings(values), OffloadConfig)
        except OffloadSpecError:
            pass


@GRAMMAR
@given(values=st.dictionaries(_NAMES, _VALUE, max_size=4))
def test_options_one_error_type(values):
    values.pop("offload_folder", None)
    with time_limit(10):
        try:
            OffloadConfig.from_options(**values)
        except OffloadSpecError:
            pass


@GRAMMAR
@given(text=_VALUE)
def test_small_grammars_one_error_type(text):
    with time_limit(10):
        for fn in (parse_stand_in, parse_size, parse_max_memory, check_calib):
            try:
                fn(text)
            except OffloadSpecError:
                pass
        if isinstance(text, str):
            assert parse_policy(text) is None or parse_policy(text).amount >= 0


# ------------------------------------------------------------------------------ property: the CLIs
_PLAN_OPTIONS = st.lists(st.tuples(st.sampled_from(["--context", "--batch", "--dtype", "--work", "--mode", "--tier",
                                                    "--prefetch", "--protect-first", "--protect-last", "--device",
                                                    "--bandwidth", "--max-memory"]), _TEXT), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=_PLAN_OPTIONS, memory=_TEXT)
def test_plan_cli_answers_every_input(options, memory):
    argv = ["plan", "--model", "smollm2-135m-shape", "--max-memory", memory]
    for flag, value in options:
        argv += [flag, value]
    with time_limit(30):
        rc, _, err = _main(argv)
    assert rc in (0, 2), err
    assert "Traceback" not in err


_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**50, 10**50), st.floats(), st.text(max_size=6))
_JSON = st.recursive(_LEAF,
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3)), max_leaves=12)
_LM_RESULTS = st.fixed_dictionaries({"results": st.dictionaries(st.sampled_from(["t", "u"]), st.one_of(
    st.dictionaries(st.sampled_from(["acc,none", "alias", "acc_stderr,none", "ppl,none"]), _JSON, max_size=3), _JSON),
    max_size=2)}, optional={"n-samples": _JSON, "config": _JSON})


@settings(max_examples=120, deadline=None, suppress_health_check=SLOW_AND_TMP)
@given(base=st.one_of(_LM_RESULTS, _JSON), cand=st.one_of(_LM_RESULTS, _JSON),
       tolerance=st.sampled_from(["0", "0.5", "nan", "acc=0.1", "x"]),
       ratio=st.sampled_from([None, "0.9", "nan", "inf", "-1"]))
def test_compare_lm_eval_answers_every_input(tmp_path, base, cand, tolerance, ratio):
    paths = []
    for name, data in (("base.json", base), ("cand.json", cand)):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        paths.append(str(path))
    argv = ["compare-lm-eval", *paths, "--tolerance", tolerance] + (["--min-throughput-ratio", ratio] if ratio else [])
    with time_limit(10):
        rc, _, err = _main(argv)
    assert rc in (0, 1, 2)
    assert "Traceback" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_AND_TMP)
@given(data=st.one_of(_JSON, st.fixed_dictionaries({"schema": st.just("lp-bench/2"), "configs": st.one_of(
    _JSON, st.lists(st.one_of(_JSON, st.fixed_dictionaries({"name": _JSON, "config": _JSON})), max_size=3))})),
    tolerance=st.sampled_from(["", "logit=nan", "speed=0.5", "x=1", "ppl=1e999"]))
def test_lp_bench_results_answer_every_input(tmp_path, data, tolerance):
    from bench_helpers import bench

    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with time_limit(10), contextlib.redirect_stderr(io.StringIO()):
        rc, _ = bench(["--results", path, "--compare", path, "--tolerance", tolerance])
    assert rc in (0, 1, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_AND_TMP)
@given(options=st.lists(st.tuples(st.sampled_from(["--fractions", "--selections", "--stand-ins", "--greedy-stand-ins",
                                                   "--calib", "--offload", "--tier", "--targets", "--heldout-window"]),
                                  _TEXT), max_size=3))
def test_lp_prune_answers_every_input_before_work(tmp_path, monkeypatch, options):
    """Random options of lp-prune with a model folder that is not one: exit 2 every time, one error
    line, no sweep started."""
    from lp_plugin.tools.prune import cli, sweep

    def no_work(*args, **kwargs):
        raise AssertionError("lp-prune started its sweep")

    monkeypatch.setattr(sweep, "run_sweep", no_work)
    argv = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), "--no-plot"]
    for flag, value in options:
        argv += [flag, value]
    err = io.StringIO()
    with time_limit(10), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    assert rc == 2 and "Traceback" not in err.getvalue()


_BENCH_OPTION = st.tuples(
    st.sampled_from(["alpha", "prefetch", "new", "protect_first", "protect_last", "skip", "stand_in", "calib", "load"]),
    _TEXT,
).map(lambda kv: f"{kv[0]}={kv[1]}")
_BENCH_CONFIG = st.tuples(
    st.sampled_from(["session", "stream", "accelerate_cpu", "accelerate_disk", "baseline", "bogus"]),
    st.lists(st.one_of(_TEXT, _BENCH_OPTION, st.sampled_from(["cpu", "disk", "cold"])), max_size=4),
).map(lambda parts: ":".join([parts[0], *parts[1]]))


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_AND_TMP)
@given(configs=st.lists(_BENCH_CONFIG, min_size=1, max_size=3))
def test_lp_bench_configs_answer_every_input_before_work(tiny_checkpoint, monkeypatch, configs):
    """Random --configs of lp-bench: refused with exit 2 or handed to the run, never a traceback."""
    with time_limit(30):
        rc, _ = _bench_before_work(monkeypatch, ["--model", tiny_checkpoint, "--configs", ",".join(configs)])
    assert rc in (0, 2)
