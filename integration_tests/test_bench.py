"""lp-bench on CPU with a tiny saved checkpoint: the JSON, the table, the plot, the config grammar
and the command's exit statuses.

One real run (module fixture: every config kind, attach and from_pretrained, the static cache on)
feeds the schema tests. No timed assertions: speed goals live in the benchmark JSON, never here.
The gate's evidence (self-gate, injected slowdown, one-ulp change, nondeterminism) is in
test_gate.py.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stderr

import pytest
from bench_helpers import SMALL, bench, config

from lp_plugin import OffloadConfig, OffloadSpecError
from lp_plugin.tools.bench.configs import TWIN, ConfigError, parse_config, parse_configs, split_configs

CONFIGS = ("baseline,session:even:cpu,session:even:cpu:load=pretrained,stream:even:cpu,stream:even:disk,"
           "stream:2,4:cpu:alpha=0.5:prefetch=2,accelerate_cpu:even,session:even:cpu:skip=3,5")
NAMES = ["baseline", "session:even:cpu", "session:even:cpu:load=pretrained", "stream:even:cpu", "stream:even:disk",
         "stream:2,4:cpu:alpha=0.5:prefetch=2", "accelerate_cpu:even", "session:even:cpu:skip=3,5", TWIN]
EXACT = ["baseline", "session:even:cpu", "session:even:cpu:load=pretrained", "stream:even:cpu", "stream:even:disk", TWIN]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from shapes import save_tiny

    return save_tiny("qwen2", tmp_path_factory.mktemp("bench") / "tiny-qwen2")


@pytest.fixture(scope="module")
def bench_run(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-run")
    out, png = d / "results.json", d / "frontier.png"
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stderr(err):
        warnings.simplefilter("always")
        rc, stdout = bench(["--model", ckpt, *SMALL, "--configs", CONFIGS, "--static", "on", "--repeats", "1",
                            "--out", out, "--plot", png])
    return {"rc": rc, "stdout": stdout, "stderr": err.getvalue(), "json": out, "png": png,
            "data": json.loads(out.read_text()), "warnings": caught}


def test_no_progress_still_says_each_round_is_done(bench_run):
    # --no-progress (as in CI) draws no bar, but a log line ends the warm-up and each timed round
    done = [line for line in bench_run["stderr"].splitlines() if line.startswith("lp-bench: ") and " done (" in line]
    assert len(done) == 2, bench_run["stderr"]


# ----------------------------------------------------------------------------- the run
def test_run_succeeds_and_prints_table(bench_run):
    assert bench_run["rc"] == 0, bench_run["stdout"]
    lines = bench_run["stdout"].splitlines()
    header = next(line for line in lines if line.startswith("config "))
    # the default view: what matters, memory computed on the CPU (and marked so), no column that is all '-'
    for col in ("on device MiB*", "decode tok/s", "dec/base", "logit diff", "ppl"):
        assert col in header
    assert "standby GiB" not in header and "bound tok/s" not in header
    assert any(line.startswith("* computed, not measured") for line in lines)
    assert lines[-1].startswith("verdict: exact (4 of 4 configs equal the plain model); no gate (--compare REF)")
    for name in NAMES:
        assert any(line.startswith(name + " ") for line in lines), name
    assert any(line.startswith(TWIN + " (noise)") for line in lines)
    assert any(line.startswith("goals ") for line in lines) and not any("issue" in line for line in lines)
    assert any(line.startswith("noise (the plain model against itself") for line in lines)
    # Accelerate's cpu offload on a CPU-only machine moves nothing: marked, not shown as the peer
    acc = next(line for line in lines if line.startswith("accelerate_cpu:even "))
    assert "n/a: no CUDA device" in acc


def test_table_fits_120_columns_and_wide_shows_every_figure(bench_run):
    from lp_plugin.tools.bench.report import WIDTH, format_table

    assert WIDTH == 120
    compact = format_table(bench_run["data"]).splitlines()
    assert compact == bench_run["stdout"].splitlines()[:len(compact)]
    assert max(len(line) for line in compact) <= 120, max(compact, key=len)
    wide = format_table(bench_run["data"], wide=True)
    header = next(line for line in wide.splitlines() if line.startswith("config "))
    for col in ("standby GiB", "peak GiB", "prefill tok/s", "decode tok/s", "generate tok/s", "static tok/s",
                "logit diff", "dec logit", "argmax", "ppl", "bound tok/s", "dec/base", "gen/base", "static/base", "dec/bound",
                "dec/accel", "peak/budget", "disk/cpu"):
        assert col in header


def test_goals_inside_the_noise_say_so():
    """A speed goal whose value is closer to its target than the run's own noise is marked [~], not
    ok/MISS; one far from it keeps its verdict."""
    from lp_plugin.tools.bench.derive import noise_band, within_noise
    from lp_plugin.tools.bench.report import verdict

    nz = {"speed": {"decode": {"sigma": 0.05, "runs": [0.94, 1.0, 1.02]}}}
    band = noise_band(nz, "decode", 3)
    assert band >= abs(__import__("math").log(1.0))  # the median self-ratio is 1.0 here: the t band decides
    assert within_noise(0.955, ">= 0.98", band) and not within_noise(0.5, ">= 0.98", band)
    assert noise_band({"speed": {}}, "decode", 3) is None and not within_noise(0.97, ">= 0.98", None)
    goals = [{"config": "s", "goal": "logits vs the plain model: max abs diff", "met": True, "within_noise": False},
             {"config": "s", "goal": "decode-step logits: max abs diff", "met": True, "within_noise": False},
             {"config": "s", "goal": "session decode", "met": False, "within_noise": True},
             {"config": "s", "goal": "stream decode", "met": False, "within_noise": False}]
    line = verdict({"goals": goals, "configs": []}, None)
    assert "exact (1 of 1" in line and "speed goals: 0 met, 1 missed, 1 in noise" in line and len(line) <= 120
    goals[1]["met"] = False  # equal in one forward, not through the decode steps
    line = verdict({"goals": goals, "configs": []}, None)
    assert "NOT EXACT (1 of 1 configs differ from the plain model, 1 in the decode steps only)" in line
    assert "speed goals: 0 met, 1 missed, 1 in noise" in line  # the exactness goals are not counted among the goals


def test_decode_loop_emits_no_warning(bench_run):
    """The bare decode loop passes its cache under the keyword this transformers reads (no
    FutureWarning each round), and nothing else in a run warns either."""
    assert [str(w.message) for w in bench_run["warnings"] if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "transformers" in w.filename] == []


def test_json_schema(bench_run):
    data = bench_run["data"]
    assert data["schema"] == "lp-bench/3"
    for key in ("created", "wall_s", "settings", "env", "model", "inputs", "reference", "bandwidth", "configs",
                "goals", "noise"):
        assert key in data, key
    s = data["settings"]
    assert (s["dtype"], s["repeats"], s["prompt"], s["new"], s["prefill"], s["threads"]) == ("fp32", 1, 12, 8, 24, 1)
    assert s["configs"] == NAMES and s["warmup_rounds"] == 1 and s["interleaved"] is True
    assert "teacher forcing" in s["decode_check"] and "first 8 greedy tokens" in s["decode_check"]
    # the static cache on the CPU: measured on request, uncompiled, and said so
    assert s["static"]["measured"] is True and s["static"]["compiled_by_transformers"] is False
    assert "uncompiled" in s["static"]["note"]
    assert data["env"]["gpu_name"] is None and data["env"]["device"] == "cpu" and data["env"]["torch_threads"] == 1
    assert data["bandwidth"]["pinned_h2d_gbps"] is None and data["bandwidth"]["note"]
    assert data["model"]["num_layers"] == 8 and data["model"]["kind"] == "pretrained"
    assert data["inputs"]["tokenizer"]["note"]
    assert set(data["noise"]["speed"]) == {"prefill", "decode", "decode_step", "generate", "static"}
    # strict JSON (no NaN/Infinity)
    json.loads(bench_run["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_every_measured_config_has_its_figures(bench_run):
    for c in bench_run["data"]["configs"]:
        assert c["error"] is None, c["traceback"]
        if c["name"] == "accelerate_cpu:even":
            assert c["not_applicable"] and c["decode_tok_s"] is None
            continue
        for key in ("prefill_tok_s", "decode_tok_s", "decode_step_tok_s", "generate_tok_s", "static_tok_s"):
            assert c[key]["median"] > 0 and len(c[key]["runs"]) == 1, (c["name"], key)
        assert c["standby_vram_bytes"] is None and c["peak_vram_bytes"] is None  # no CUDA: no VRAM figures
        assert c["static_compiled"] is False
        for key in ("decode_vs_baseline", "decode_step_vs_baseline", "generate_vs_baseline", "static_vs_baseline"):
            assert c["ratios"][key]["runs"], (c["name"], key)
    assert config(bench_run["data"], "baseline")["ratios"]["decode_vs_baseline"]["median"] == pytest.approx(1.0)


def test_exactness_figures(bench_run):
    data = bench_run["data"]
    for name in EXACT:
        c = config(data, name)
        assert c["max_abs_logit_diff"] == 0.0 and c["logits_equal"] is True, name
        assert c["max_abs_decode_logit_diff"] == 0.0 and c["decode_logits_equal"] is True, name
        assert c["argmax_agreement"] == 1.0 and c["perplexity"] == data["reference"]["perplexity"], name
        assert c["decode_tokens_agree"] == c["generate_tokens_agree"] == c["static_tokens_agree"] == 1.0, name
    half = config(data, "stream:2,4:cpu:alpha=0.5:prefetch=2")
    assert half["max_abs_logit_diff"] > 0.0  # alpha < 1 changes the model, and the bench sees it
    assert half["max_abs_decode_logit_diff"] > 0.0 and half["decode_logits_equal"] is False
    assert not [g for g in data["goals"] if g["config"] == half["name"]]  # nor is alpha < 1 held to it
    skipped = config(data, "session:even:cpu:skip=3,5")
    assert skipped["max_abs_logit_diff"] > 0.0 and skipped["info"]["skipped_layers"] == [3, 5]
    assert skipped["info"]["offloaded_layers"] == [2, 4]
    assert data["noise"]["logit"] == 0.0 and data["noise"]["perplexity_runs"] == [0.0, 0.0]
    assert data["noise"]["decode_logit"] == 0.0
    met = {(g["config"], g["goal"]): g["met"] for g in data["goals"]}
    for name in EXACT[1:-1]:
        assert met[(name, "logits vs the plain model: max abs diff")] is True, name
        assert met[(name, "decode-step logits: max abs diff")] is True, name
    # skipping is not held to exactness; it is held to its speed-up over the same config without skipping
    goals = [g for g in data["goals"] if g["config"] == "session:even:cpu:skip=3,5"]
    assert [g["goal"].split(" (")[0] for g in goals] == ["decode vs session:even:cpu"]
    assert goals[0]["target"] == ">= 1.25"  # 2 of 8 layers skipped
    assert skipped["ratios"]["decode_vs_unskipped"]["runs"] and skipped["ratios"]["standby_saved_bytes"] is None
    assert config(data, "session:even:cpu")["ratios"]["decode_vs_unskipped"] is None


def _measured(decode, standby=None, **extra):
    return {"decode_tok_s": {"median": decode[1], "runs": list(decode)}, "standby_vram_bytes": standby, **extra}


def test_skipping_is_compared_with_the_same_config_without_it():
    """dec/noskip and the VRAM saved are taken against the config that differs by its skip alone (its
    load too), and the goals follow the share skipped (a fifth: 1.2x) and the layers the other keeps."""
    from lp_plugin.tools.bench.derive import derive
    from lp_plugin.tools.bench.report import format_table

    gib = 2**30

    def lp(name, load="pretrained", offloaded=(2, 4, 6, 8), **measured):
        cfg = parse_config(name).to_dict()
        return {"name": name, "config": cfg, "info": {"skipped_layers": [], "offloaded_layers": list(offloaded)},
                **measured}

    base = {"name": "baseline", "config": parse_config("baseline").to_dict(), **_measured((50.0, 50.0, 50.0))}
    plain = lp("stream:even:cpu:load=pretrained", **_measured((10.0, 10.0, 11.0), 4 * gib))
    attach = lp("stream:even:cpu", **_measured((30.0, 30.0, 30.0), 5 * gib))
    skip = lp("stream:even:cpu:load=pretrained:skip=1,2", offloaded=(4, 6, 8),
              **_measured((13.0, 12.5, 13.0), 4 * gib - int(0.95 * gib)))
    skip["info"]["skipped_layers"] = [1, 2]
    out = {"configs": [base, plain, attach, skip], "settings": {"repeats": 3, "dtype": "bf16"},
           "model": {"name": "m", "architecture": "Qwen2ForCausalLM", "num_layers": 10, "layer_bytes": gib},
           "env": {"device": "cuda:0", "gpu_name": "G", "torch": "t", "transformers": "t", "accelerate": "a"},
           "bandwidth": {}}
    derive(out)
    r = skip["ratios"]
    assert r["decode_vs_unskipped"]["runs"] == [1.3, 1.25, 13.0 / 11.0]  # against the pretrained one, not attach
    assert r["standby_saved_bytes"] == int(0.95 * gib)
    goals = {g["goal"].split(" (")[0]: g for g in out["goals"] if g["config"] == skip["name"]}
    assert goals["decode vs stream:even:cpu:load=pretrained"]["target"] == ">= 1.20"
    assert goals["decode vs stream:even:cpu:load=pretrained"]["met"] is True
    saved = goals["standby VRAM saved vs stream:even:cpu:load=pretrained"]
    assert saved["met"] is True and saved["target"] == ">= 0.900"  # layer 1 was resident there, 2 not
    assert "dec/noskip" in format_table(out) and "saved GiB" in format_table(out)
    skip["standby_vram_bytes"] = 4 * gib - int(0.5 * gib)  # layer 1 still on the device
    skip["decode_tok_s"] = {"median": 11.0, "runs": [11.0, 11.0, 11.0]}
    derive(out)
    assert not [g for g in out["goals"] if g["config"] == skip["name"] and g["met"]]


def test_pretrained_config_loads_through_from_pretrained(bench_run):
    c = config(bench_run["data"], "session:even:cpu:load=pretrained")
    assert c["info"]["load"] == "lp_plugin.from_pretrained" and c["layers"] == [2, 4]
    assert c["config"]["load"] == "pretrained" and config(bench_run["data"], "session:even:cpu")["config"]["load"] == "attach"


def test_plot_written(bench_run):
    assert bench_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the command's exit statuses
@pytest.mark.parametrize("args,message", [
    (["--configs", "stream:even"], "names no tier"),
    (["--configs", "baseline,stream:even:cpu:stand_in=bogus"], "stand_in=bogus"),  # OffloadConfig's refusal
    (["--configs", "baseline", "--device", "cuda"], "torch sees no CUDA device"),
    (["--configs", "baseline", "--device", "tpu:0"], "not a device name"),
    (["--configs", "baseline", "--device", "meta"], "lp-bench measures on cpu or cuda"),
    (["--tolerance", "bogus=1"], "unknown tolerance"),
    (["--tolerance", "speed=0.5"], "factor >= 1"),
    (["--repeats", "0"], "at least 1"),
    (["--model", "/no/such/folder"], "neither a shape"),
    (["--model", "nothing-like-a-model"], "neither a shape"),
    (["--model", "qwen2.5-3b"], "did you mean 'qwen2.5-3b-shape'"),
    (["--new", "10000000000000000"], "positions"),  # a run that could never end, refused before loading
    (["--configs", "baseline,stream:even:cpu:new=100000"], "positions"),
])
def test_bad_arguments_exit_2(ckpt, capsys, args, message):
    rc, _ = bench(["--model", ckpt, *SMALL, *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1  # argparse's one line, no traceback


def test_unreadable_results_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something-else"}')
    for args in (["--results", bad], ["--results", tmp_path / "missing.json"]):
        assert bench(args)[0] == 2
    assert "not an lp-bench results file" in capsys.readouterr().err


def test_failed_config_exits_3(ckpt, tmp_path):
    """A config that fails when applied (text calibration needs the tokenizer this checkpoint lacks) fails;
    the others still run. (Options lp_plugin refuses for this model are refused before any work: exit 2.)"""
    out = tmp_path / "r.json"
    bad = "stream:even:cpu:skip=bi:2:calib=pydoc"
    rc, stdout = bench(["--model", ckpt, *SMALL, "--configs", f"baseline,{bad}", "--repeats", "1", "--out", out])
    assert rc == 3
    data = json.loads(out.read_text())
    assert config(data, bad)["error"] and config(data, "baseline")["error"] is None


# ----------------------------------------------------------------------------- config grammar
def test_config_grammar():
    c = parse_config("stream:even:disk:alpha=0.5:prefetch=2:new=8:cold:load=pretrained")
    assert (c.kind, c.options.mode, c.spec, c.tier, c.options.alpha, c.options.prefetch, c.new, c.cold, c.load) == (
        "lp", "stream", "even", "disk", 0.5, 2, 8, True, "pretrained")
    c = parse_config("session:2-32:2:cpu")  # a range with a step keeps its colon
    assert (c.options.mode, c.spec, c.tier, c.load) == ("session", "2-32:2", "cpu", "attach")
    assert parse_config("accelerate_cpu").spec == "even"
    assert parse_config("accelerate_cpu:odd:new=4").spec == "odd"
    assert parse_config(TWIN).twin is True and parse_config(TWIN).options is None
    assert split_configs("baseline,stream:2,4,6:cpu,session:even:disk") == ["baseline", "stream:2,4,6:cpu", "session:even:disk"]
    assert split_configs("stream:2,-1:cpu,sesion:even:cpu") == ["stream:2,-1:cpu", "sesion:even:cpu"]  # a typo stands alone
    with pytest.raises(ConfigError) as exc:
        parse_configs("baseline,sesion:even:cpu")
    assert exc.value.config == "sesion:even:cpu"
    assert [c.spec for c in parse_configs("stream:2,4,6:cpu,accelerate_cpu:2,4")[1:-1]] == ["2,4,6", "2,4"]
    c = parse_config("stream:2-32:2:cpu:skip=greedy:20%:stand_in=linear:64:calib=pydoc:32768:new=8")
    assert (c.spec, c.options.skip, c.options.stand_in, c.options.calib, c.new, c.exact) == (
        "2-32:2", "greedy:20%", "linear:64", "pydoc:32768", 8, False)
    assert parse_config("session:even:cpu").exact and not parse_config("session:even:cpu:alpha=0.5").exact
    assert [c.options.skip for c in parse_configs("session:even:cpu:skip=3,5,stream:even:cpu")[1:-1]] == ["3,5", None]
    # options that apply to others go with them in any written order
    late = parse_config("stream:even:cpu:stand_in=linear:calib=pydoc:512:skip=bi:2")
    assert (late.options.skip, late.options.stand_in, late.options.calib) == ("bi:2", "linear", "pydoc:512")


def test_lp_config_holds_the_offload_config_attach_gets():
    """An lp config's options are built and put in normal form by OffloadConfig itself; results JSON records
    them under lp-bench's keys (``spec`` for ``offload``), and lp-bench's own settings beside them."""
    c = parse_config("stream:2-32:2:disk:alpha=1:prefetch=2:protect_first=0:skip=greedy:20%:stand_in=linear:64:"
                     "calib=pydoc:512:cold")
    assert c.options == OffloadConfig(mode="stream", offload="2-32:2", tier="disk", alpha=1.0, prefetch=2,
                                      protect_first=0, skip="greedy:20%", stand_in="linear:64", calib="pydoc:512")
    assert parse_config("session:even:cpu").options == OffloadConfig(offload="even", tier="cpu", mode="session")
    assert c.to_dict() == {
        "name": c.name, "kind": "lp", "mode": "stream", "spec": "2-32:2", "tier": "disk", "alpha": 1.0, "prefetch": 2,
        "new": None, "cold": True, "load": "attach", "twin": False, "skip": "greedy:20%", "stand_in": "linear:64",
        "calib": "pydoc:512", "protect_first": 0, "protect_last": OffloadConfig().protect_last, "decode": "eager"}
    assert parse_config("stream:all:cpu:decode=graph").options == OffloadConfig(offload="all", mode="stream",
                                                                                 decode="graph")
    # a peer holds its layers and tier only; the plain model none; both record the lp-only keys as before
    peer = parse_config("accelerate_disk:2,4")
    assert peer.options == OffloadConfig(offload="2,4", tier="disk")
    plain = parse_config("baseline").to_dict()
    assert {k: v for k, v in peer.to_dict().items() if k not in ("name", "kind", "spec", "tier")} == {
        k: v for k, v in plain.items() if k not in ("name", "kind", "spec", "tier")}
    assert (plain["mode"], plain["spec"], plain["tier"], plain["protect_first"]) == (None, None, None, None)


@pytest.mark.parametrize("text,option,options", [
    ("stream:even:cpu:alpha=2", "alpha", {"alpha": 2.0}),
    ("stream:even:cpu:alpha=nan", "alpha", {"alpha": float("nan")}),
    ("stream:even:cpu:prefetch=-1", "prefetch", {"prefetch": -1}),
    ("stream:even:cpu:protect_last=-1", "protect_last", {"protect_last": -1}),
    ("stream:even:cpu:stand_in=bogus", "stand_in", {"stand_in": "bogus"}),
    ("stream:even:cpu:stand_in=linear:0", "stand_in", {"stand_in": "linear:0"}),
    ("stream:even:cpu:skip=bi:x", "skip", {"skip": "bi:x"}),
    ("stream:even:cpu:calib=no-such-corpus", "calib", {"calib": "no-such-corpus"}),
    ("stream:auto:cpu:alpha=0", "alpha", {"offload": "auto", "alpha": 0.0}),
    ("stream:even:cpu:decode=graphs", "decode", {"decode": "graphs"}),
])
def test_offload_option_refused_as_offload_config_refuses_it(text, option, options):
    """A value OffloadConfig refuses is a ConfigError naming the config and the option, caused by the very
    error attach would raise for it."""
    with pytest.raises(OffloadSpecError) as direct:
        OffloadConfig(**options)
    with pytest.raises(ConfigError) as info:
        parse_configs(text)
    assert (info.value.config, info.value.option) == (text, option)
    assert type(info.value.__cause__) is type(direct.value)


@pytest.mark.parametrize("text,names", [
    ("stream:even:cpu", ["baseline", "stream:even:cpu", TWIN]),
    (f"{TWIN},stream:even:cpu,baseline:new=4", ["baseline:new=4", "stream:even:cpu", TWIN]),
])
def test_plain_model_first_and_its_twin_last(text, names):
    configs = parse_configs(text)
    assert [c.name for c in configs] == names
    assert configs[-1].new == configs[0].new  # the twin repeats the baseline exactly


@pytest.mark.parametrize("bad", ["stream:even", "turbo:even:cpu", "stream::cpu", "stream:even:cpu:alpha=2",
                                 "stream:even:cpu:prefetch=-1", "stream:even:cpu:speed=3", "baseline:alpha=0.5",
                                 "baseline,baseline", "stream:even:cpu:load=disk", "baseline:load=pretrained",
                                 "baseline:twin:new=4", "baseline:cold", "baseline:skip=3", "stream:even:cpu:skip=",
                                 "accelerate_cpu:even:stand_in=linear", "stream:even:cpu:new=0",
                                 "stream:even:cpu:stand_in=", "accelerate_disk:odd:alpha=1", "airllm:load=attach"])
def test_bad_configs_rejected(bad):
    with pytest.raises(ConfigError):
        parse_configs(bad)


# ----------------------------------------------------------------------------- pieces
def test_shapes_real_values():
    from lp_plugin.tools.shapes import shape_config, shape_names

    # (tiny test shapes live in integration_tests)
    assert shape_names() == ["llama-3-8b-shape", "qwen2.5-3b-shape", "smollm2-135m-shape"]
    q = shape_config("qwen2.5-3b-shape")
    assert (q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads,
            q.vocab_size, q.tie_word_embeddings, q.rms_norm_eps, q.max_position_embeddings) == (
        2048, 11008, 36, 16, 2, 151936, True, 1e-6, 32768)
    s = shape_config("smollm2-135m-shape")
    assert (s.model_type, s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads,
            s.num_key_value_heads, s.vocab_size, s.tie_word_embeddings) == ("llama", 576, 1536, 30, 9, 3, 49152, True)
    ll = shape_config("llama-3-8b-shape")
    assert (ll.model_type, ll.hidden_size, ll.intermediate_size, ll.num_hidden_layers, ll.num_attention_heads,
            ll.num_key_value_heads, ll.head_dim, ll.vocab_size, ll.tie_word_embeddings,
            ll.rope_parameters["rope_theta"], ll.rms_norm_eps, ll.max_position_embeddings, ll.hidden_act,
            ll.attention_bias, ll.mlp_bias, ll.bos_token_id, ll.eos_token_id) == ("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 500000.0, 1e-5, 8192, "silu",
                                 False, False, 128000, 128001)


def test_forced_decode_logits_follow_the_greedy_loop(ckpt):
    """The decode-step check feeds the plain model's greedy tokens: its logits predict exactly those
    tokens, and they come out the same on a second call (the plain model on the CPU repeats)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lp_plugin.tools.bench import measure

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    prompt = torch.arange(3, 15).unsqueeze(0)
    tokens = measure.bare_decode(model, prompt, 4, torch.device("cpu"))["tokens"][:8]
    logits = measure.forced_decode_logits(model, prompt, tokens)
    assert logits.shape == (8, model.config.vocab_size) and logits.dtype == torch.float32
    assert logits.argmax(-1).tolist() == tokens
    assert torch.equal(logits, measure.forced_decode_logits(model, prompt, tokens))
    other = measure.forced_decode_logits(model, prompt, [tokens[0], (tokens[1] + 1) % model.config.vocab_size, *tokens[2:]])
    assert torch.equal(other[:2], logits[:2]) and measure.max_abs_diff(other, logits) > 0


def test_max_abs_diff_is_inf_where_finiteness_differs():
    import torch

    from lp_plugin.tools.bench.measure import max_abs_diff

    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[1.0, -inf, 3.0]])
    assert max_abs_diff(a, a.clone()) == 0.0  # -inf at the same place on both sides: equal
    assert max_abs_diff(a, torch.tensor([[1.5, -inf, 2.0]])) == 1.0
    for other in ([1.0, 2.0, 3.0], [1.0, inf, 3.0], [1.0, -inf, nan]):
        assert max_abs_diff(a, torch.tensor([other])) == inf, other
    b = torch.tensor([[nan, 1.0]])
    assert max_abs_diff(b, b.clone()) == inf  # NaN never equals NaN


@pytest.mark.parametrize("points,front", [
    ([(10, 5), (20, 3), (30, 4)], [(20, 3), (30, 4)]),
    ([(10, 5), (20, 5)], [(20, 5)]),
    ([(10, 1), (20, 2), (30, 3)], [(10, 1), (20, 2), (30, 3)]),
])
def test_frontier_keeps_what_nothing_beats(points, front):
    from lp_plugin.tools.bench.plot import frontier

    got = frontier([{"x": x, "y": y} for x, y in points])
    assert [(p["x"], p["y"]) for p in got] == front


def test_nf4_checkpoint_runs_on_cpu(tmp_path):
    """--dtype nf4 loads the checkpoint in 4-bit (bitsandbytes CPU backend) for the plain model and
    for from_pretrained configs, and every config is exact."""
    pytest.importorskip("bitsandbytes")
    import torch
    from shapes import save_tiny

    ckpt = save_tiny("llama", tmp_path / "tiny-llama-bf16", dtype=torch.bfloat16)
    out = tmp_path / "nf4.json"
    args = ["--model", ckpt, *SMALL, "--configs", "baseline,stream:even:cpu,stream:even:cpu:load=pretrained",
            "--repeats", "1", "--out", out, "--dtype", "nf4"]
    rc, stdout = bench(args)
    data = json.loads(out.read_text())
    assert rc == 0, [c["traceback"] for c in data["configs"] if c["error"]]
    for c in data["configs"]:
        assert c["max_abs_logit_diff"] == 0.0, c["name"]
    # a 4-bit layer moves far fewer bytes than its bf16 size (hidden 64, intermediate 128)
    bf16_layer = 2 * (4 * 64 * 64 // 2 + 64 * 64 + 3 * 64 * 128)
    assert 0 < config(data, "stream:even:cpu")["layer_bytes"] < bf16_layer


def test_what_the_run_writes_is_checked_before_it_runs(ckpt, tmp_path, capsys):
    """A results file (or plot) that is a folder or cannot be made, or the reference it is compared with (which the run would overwrite), an
    offload folder that is a file, a tokenizer path that is no folder, --out with --results (nothing runs to write):
    exit 2 before any model loads."""
    reference = tmp_path / "ref.json"
    reference.write_text("{}")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(afile / "run.json")], "--out"),  # a file where its folder would go
        (["--plot", str(afile / "run.png")], "--plot"),
        (["--out", str(reference), "--compare", str(reference)], "would overwrite it"),
        (["--offload-dir", str(afile)], "is a file"),
        (["--tokenizer", str(tmp_path / "no-such-tokenizer")], "--tokenizer"),
        (["--tokenizer", str(afile)], "--tokenizer"),
    ]
    for extra, message in cases:
        rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "baseline,stream:even:disk", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
    assert reference.read_text() == "{}"
    rc, _ = bench(["--results", str(reference), "--out", str(tmp_path / "new.json")])
    assert rc == 2 and "drop --out" in capsys.readouterr().err


def test_a_tokenizer_that_cannot_load_is_refused_before_the_model_is_built(ckpt, capsys):
    """A --tokenizer that looks like a Hub id (no such folder here, nothing in the Hub cache) exits 2 naming the
    flag; the plain model was never built and the caller's thread count is as it was."""
    import torch

    threads = torch.get_num_threads()
    args = ["--model", ckpt, *SMALL, "--threads", str(threads + 1), "--configs", "stream:even:cpu"]
    rc, _ = bench([*args, "--tokenizer", "no-such-org/no-such-tok"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer" in err, err
    assert "building" not in err, err
    assert torch.get_num_threads() == threads


def test_a_model_folder_without_tokenizer_files_falls_back_to_bytes(tmp_path):
    from shapes import save_tiny

    from lp_plugin.tools.bench.setup import SetupError, make_inputs, make_tokenizer

    folder = save_tiny("qwen2", tmp_path / "tiny")  # config and weights only: transformers loads an empty tokenizer
    tok, info = make_tokenizer("auto", str(folder), is_shape=False)
    assert tok is None and info["note"]
    assert make_inputs(tok, 256, 12, 24, 24)["prompt"]
    with pytest.raises(SetupError):  # named explicitly, the same folder is an error
        make_tokenizer(str(folder), str(folder), is_shape=False)
