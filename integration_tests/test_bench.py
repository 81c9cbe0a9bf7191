"""lp-bench on CPU with a tiny model: JSON schema, table, plot, config grammar and --compare.

One real run (module fixture, every config kind, one timed round) feeds the schema tests; the
--compare tests doctor copies of its JSON. No timed assertions: speed goals live in the benchmark
JSON, never here.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from lp_plugin.bench import cli
from lp_plugin.bench.configs import ConfigError, parse_config, parse_configs, split_configs
from lp_plugin.bench.report import compare, parse_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = "baseline,session:even:cpu,stream:even:cpu,stream:even:disk,stream:2,4:cpu:alpha=0.5:prefetch=2,accelerate_cpu:even"
SMALL = ["--prompt", "12", "--new", "4", "--prefill", "24", "--ppl-tokens", "24", "--repeats", "1",
         "--tokenizer", "none", "--no-progress"]
STAT_KEYS = ("setup_s", "standby_vram_bytes", "peak_vram_bytes", "prefill_tok_s", "decode_tok_s", "generate_tok_s")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out, png = d / "results.json", d / "frontier.png"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["--model", "tiny-qwen2", "--dtype", "fp32", "--configs", CONFIGS,
                       "--out", str(out), "--plot", str(png), *SMALL])
    return {"rc": rc, "stdout": buf.getvalue(), "json": out, "png": png, "data": json.loads(out.read_text())}


# ----------------------------------------------------------------------------- the run
def test_run_succeeds_and_prints_table(bench_run):
    assert bench_run["rc"] == 0, bench_run["stdout"]
    text = bench_run["stdout"]
    header = next(line for line in text.splitlines() if line.startswith("config "))
    for col in ("standby GiB", "peak GiB", "prefill tok/s", "decode tok/s", "generate tok/s", "logit diff",
                "argmax", "ppl", "bound tok/s", "dec/base", "dec/bound", "dec/accel", "peak/budget", "disk/cpu"):
        assert col in header
    for name in ("baseline", "session:even:cpu", "stream:even:cpu", "stream:even:disk", "accelerate_cpu:even"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "goals (issue 5):" in text


def test_json_schema(bench_run):
    data = bench_run["data"]
    assert data["schema"] == "lp-bench/1"
    for key in ("created", "wall_s", "settings", "env", "model", "inputs", "reference", "bandwidth", "configs", "goals"):
        assert key in data, key
    s = data["settings"]
    assert (s["model"], s["dtype"], s["repeats"], s["prompt"], s["new"], s["prefill"]) == ("tiny-qwen2", "fp32", 1, 12, 4, 24)
    assert s["warmup_rounds"] == 1 and s["interleaved"] is True
    env = data["env"]
    for key in ("torch", "transformers", "accelerate", "gpu_name", "python", "device"):
        assert key in env
    assert env["gpu_name"] is None and env["device"] == "cpu"
    # no CUDA: bandwidth skipped, said so
    assert data["bandwidth"]["pinned_h2d_gbps"] is None and data["bandwidth"]["pageable_h2d_gbps"] is None
    assert data["bandwidth"]["note"]
    assert data["model"]["num_layers"] == 8 and data["model"]["kind"] == "shape"
    assert data["inputs"]["tokenizer"]["note"]  # random/bytes ids are said so
    names = [c["name"] for c in data["configs"]]
    assert names == ["baseline", "session:even:cpu", "stream:even:cpu", "stream:even:disk",
                     "stream:2,4:cpu:alpha=0.5:prefetch=2", "accelerate_cpu:even"]
    for c in data["configs"]:
        assert c["error"] is None, c["traceback"]
        for key in STAT_KEYS:
            st = c[key]
            if key.endswith("vram_bytes"):
                assert st is None, (c["name"], key)  # no CUDA: no VRAM figures (null)
                continue
            assert set(st) >= {"median", "min", "max", "runs"}, (c["name"], key)
            assert len(st["runs"]) == 1
        for key in ("prefill_tok_s", "decode_tok_s", "generate_tok_s"):
            assert c[key]["median"] > 0
        for key in ("max_abs_logit_diff", "argmax_agreement", "perplexity", "bytes_per_forward", "ratios",
                    "transfer_bound_tok_s", "decode_tokens_agree", "layers", "config"):
            assert key in c, (c["name"], key)
        for key in ("decode_vs_baseline", "decode_vs_transfer_bound", "decode_vs_accelerate_cpu", "peak_vs_budget",
                    "decode_vs_cpu_tier", "prefill_vs_bound"):
            assert key in c["ratios"]
    by = {c["name"]: c for c in data["configs"]}
    assert by["baseline"]["ratios"]["decode_vs_baseline"] == pytest.approx(1.0)
    assert by["stream:even:cpu"]["layers"] == [2, 4]
    assert by["accelerate_cpu:even"]["layers"] == [2, 4]
    assert by["stream:even:disk"]["ratios"]["decode_vs_cpu_tier"] is not None
    assert by["stream:2,4:cpu:alpha=0.5:prefetch=2"]["config"]["prefetch"] == 2
    # the whole file is strict JSON (no NaN/Infinity)
    json.loads(bench_run["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_exactness_figures(bench_run):
    by = {c["name"]: c for c in bench_run["data"]["configs"]}
    ref_ppl = bench_run["data"]["reference"]["perplexity"]
    for name in ("baseline", "session:even:cpu", "stream:even:cpu", "stream:even:disk", "accelerate_cpu:even"):
        c = by[name]
        assert c["max_abs_logit_diff"] == 0.0 and c["logits_equal"] is True, name
        assert c["argmax_agreement"] == 1.0
        assert c["perplexity"] == ref_ppl
        assert c["decode_tokens_agree"] == 1.0
    half = by["stream:2,4:cpu:alpha=0.5:prefetch=2"]
    assert half["max_abs_logit_diff"] > 0.0  # alpha < 1 changes the model, and the bench sees it


def test_plot_written(bench_run):
    png = bench_run["png"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- --compare
def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def _run_compare(tmp_path, new, old, tolerance=None, capsys=None):
    args = ["--results", _write(tmp_path, "new.json", new), "--compare", _write(tmp_path, "old.json", old)]
    if tolerance:
        args += ["--tolerance", tolerance]
    return cli.main(args)


def test_compare_identical_passes(bench_run, tmp_path, capsys):
    data = bench_run["data"]
    assert _run_compare(tmp_path, data, data) == 0
    assert "no regression" in capsys.readouterr().out


def test_compare_speed_regression_fails_and_names_figure(bench_run, tmp_path, capsys):
    old = copy.deepcopy(bench_run["data"])
    c = old["configs"][2]
    c["decode_tok_s"]["median"] *= 10  # the old run was 10x faster: the new one regressed
    assert _run_compare(tmp_path, bench_run["data"], old) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and f"{c['name']}: decode_tok_s regressed" in out


def test_compare_speed_within_band_passes(bench_run, tmp_path, capsys):
    old = copy.deepcopy(bench_run["data"])
    for c in old["configs"]:
        c["decode_tok_s"]["median"] *= 1.1  # new is 0.91x of old: inside speed=0.8
    assert _run_compare(tmp_path, bench_run["data"], old, "speed=0.8") == 0
    # ... and outside a band of 0.95
    assert _run_compare(tmp_path, bench_run["data"], old, "speed=0.95") == 1


def test_compare_ppl_and_logit_are_tight(bench_run, tmp_path, capsys):
    new = copy.deepcopy(bench_run["data"])
    new["configs"][1]["perplexity"] *= 1 + 1e-4
    assert _run_compare(tmp_path, new, bench_run["data"], "ppl=1e-6") == 1
    assert "perplexity changed" in capsys.readouterr().out
    assert _run_compare(tmp_path, new, bench_run["data"], "ppl=1e-3") == 0
    capsys.readouterr()
    new = copy.deepcopy(bench_run["data"])
    new["configs"][2]["max_abs_logit_diff"] = 1e-3
    assert _run_compare(tmp_path, new, bench_run["data"], "logit=0") == 1
    assert "max_abs_logit_diff regressed" in capsys.readouterr().out
    assert _run_compare(tmp_path, new, bench_run["data"], "logit=0.01") == 0


def test_compare_vram_missing_and_failed_configs(bench_run, tmp_path, capsys):
    old = copy.deepcopy(bench_run["data"])
    new = copy.deepcopy(bench_run["data"])
    old["configs"][1]["peak_vram_bytes"] = {"median": 1000, "min": 1000, "max": 1000, "runs": [1000]}
    new["configs"][1]["peak_vram_bytes"] = {"median": 2000, "min": 2000, "max": 2000, "runs": [2000]}
    assert _run_compare(tmp_path, new, old) == 1
    assert "peak_vram_bytes regressed" in capsys.readouterr().out
    new = copy.deepcopy(bench_run["data"])
    del new["configs"][3]
    new["configs"][0]["error"] = "RuntimeError: boom"
    assert _run_compare(tmp_path, new, bench_run["data"]) == 1
    out = capsys.readouterr().out
    assert "missing from the new results" in out and "baseline: failed: RuntimeError: boom" in out


def test_compare_subprocess_exit_codes(bench_run, tmp_path):
    """The installed entry point's module, as CI calls it: exit status is the gate."""
    old = copy.deepcopy(bench_run["data"])
    old["configs"][0]["prefill_tok_s"]["median"] *= 100
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "lp_plugin.bench.cli", "--results", str(bench_run["json"])]
    bad = subprocess.run(cmd + ["--compare", _write(tmp_path, "old.json", old)], capture_output=True, text=True, env=env)
    assert bad.returncode == 1, bad.stderr
    assert "baseline: prefill_tok_s regressed" in bad.stdout
    good = subprocess.run(cmd + ["--compare", str(bench_run["json"]), "--tolerance", "speed=0.8,ppl=1e-6,logit=0"],
                          capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "config " in good.stdout  # the table is printed from the results file too


def test_tolerance_parsing():
    t = parse_tolerance("speed=0.9, ppl=1e-5")
    assert t["speed"] == 0.9 and t["ppl"] == 1e-5 and t["logit"] == 0.0
    for bad in ("speed", "speed=x", "bogus=1", "speed=-1"):
        with pytest.raises(ValueError):
            parse_tolerance(bad)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--results", "x.json", "--tolerance", "bogus=1"])
    assert exc.value.code == 2


def test_compare_function_directly(bench_run):
    regs, _notes = compare(bench_run["data"], bench_run["data"], parse_tolerance(""))
    assert regs == []


# ----------------------------------------------------------------------------- config grammar
def test_config_grammar():
    c = parse_config("stream:even:disk:alpha=0.5:prefetch=2:new=8:cold")
    assert (c.kind, c.mode, c.spec, c.tier, c.alpha, c.prefetch, c.new, c.cold) == ("lp", "stream", "even", "disk", 0.5, 2, 8, True)
    c = parse_config("session:2-32:2:cpu")  # a range with a step keeps its colon
    assert (c.mode, c.spec, c.tier) == ("session", "2-32:2", "cpu")
    assert parse_config("accelerate_cpu").spec == "even"
    assert parse_config("accelerate_cpu:odd:new=4").spec == "odd"
    assert parse_config("baseline").kind == "baseline"
    assert split_configs("baseline,stream:2,4,6:cpu,session:even:disk") == ["baseline", "stream:2,4,6:cpu", "session:even:disk"]
    assert [c.spec for c in parse_configs("stream:2,4,6:cpu,accelerate_cpu:2,4")] == ["2,4,6", "2,4"]


@pytest.mark.parametrize("bad", ["stream:even", "turbo:even:cpu", "stream::cpu", "stream:even:cpu:alpha=2",
                                 "stream:even:cpu:prefetch=-1", "stream:even:cpu:speed=3", "baseline:alpha=0.5",
                                 "baseline,baseline"])
def test_bad_configs_rejected(bad):
    with pytest.raises(ConfigError):
        parse_configs(bad)


def test_cli_rejects_bad_config_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", "tiny-qwen2", "--configs", "stream:even"])
    assert exc.value.code == 2
    assert "names no tier" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shapes
def test_shapes_real_values_and_seeded():
    import torch

    from lp_plugin.shapes import build_shape_model, shape_config

    q = shape_config("qwen2.5-3b-shape")
    assert (q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads,
            q.vocab_size, q.tie_word_embeddings, q.rms_norm_eps, q.max_position_embeddings) == (
        2048, 11008, 36, 16, 2, 151936, True, 1e-6, 32768)
    s = shape_config("smollm2-135m-shape")
    assert (s.model_type, s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads,
            s.num_key_value_heads, s.vocab_size, s.tie_word_embeddings) == ("llama", 576, 1536, 30, 9, 3, 49152, True)
    for cfg, theta in ((q, 1e6), (s, 1e5)):
        rp = getattr(cfg, "rope_parameters", None) or {}
        assert rp.get("rope_theta", getattr(cfg, "rope_theta", None)) == theta
    a = build_shape_model("tiny-llama", "bf16", "cpu", seed=3)
    b = build_shape_model("tiny-llama", "bf16", "cpu", seed=3)
    c = build_shape_model("tiny-llama", "bf16", "cpu", seed=4)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_nf4_shape_runs_on_cpu(tmp_path, capsys):
    """--dtype nf4 quantizes the shape through bitsandbytes (CPU backend here) and every config runs exactly."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4.json"
    rc = cli.main(["--model", "tiny-llama", "--dtype", "nf4", "--configs", "baseline,stream:even:cpu",
                   "--out", str(out), *SMALL])
    data = json.loads(out.read_text())
    assert rc == 0, [c["traceback"] for c in data["configs"] if c["error"]]
    assert data["settings"]["dtype"] == "nf4"
    for c in data["configs"]:
        assert c["max_abs_logit_diff"] == 0.0, c["name"]
    by = {c["name"]: c for c in data["configs"]}
    # a 4-bit layer moves far fewer bytes than its bf16 size (hidden 64, intermediate 128)
    bf16_layer = 2 * (4 * 64 * 64 // 2 + 64 * 64 + 3 * 64 * 128)
    assert 0 < by["stream:even:cpu"]["layer_bytes"] < bf16_layer


@pytest.mark.parametrize("a,b,expected", [
    ([10.0, 20.0, 30.0], [10.0, 40.0, 30.0], {"median": 1.0, "min": 0.5, "max": 1.0}),
    ([30.0, 40.0], [40.0, 40.0], {"median": 0.875, "min": 0.75, "max": 1.0}),
    ([10.0, 20.0], [10.0, 20.0, 30.0], None),  # a config missing a round: no pairing
    ([10.0], [0.0], None),
])
def test_paired_ratios_are_taken_round_by_round(a, b, expected):
    """A drift between rounds cancels in the per-round ratio; the session goal uses it."""
    from lp_plugin.bench.report import _paired, derive

    got = _paired({"decode_tok_s": {"runs": a}}, {"decode_tok_s": {"runs": b}}, "decode_tok_s")
    if expected is None:
        assert got is None
    else:
        assert {k: got[k] for k in expected} == pytest.approx(expected)
    if expected is not None and len(a) == 3:
        # the session goal is judged on the per-round ratios (3, 0.5, 0.67), not on the ratio of medians
        out = {"settings": {"dtype": "bf16"}, "configs": [
            {"name": "baseline", "error": None, "config": {"kind": "baseline"},
             "decode_tok_s": {"median": 20.0, "runs": [10.0, 20.0, 30.0]}},
            {"name": "session:even:cpu", "error": None, "max_abs_logit_diff": 0.0,
             "config": {"kind": "lp", "mode": "session", "tier": "cpu", "alpha": 1.0, "spec": "even", "prefetch": 1, "cold": False},
             "decode_tok_s": {"median": 20.0 * 0.9, "runs": [30.0, 10.0, 20.0]}},
        ]}
        goal = [g for g in derive(out)["goals"] if g["goal"].startswith("session decode")][0]
        assert goal["goal"] == "session decode vs baseline (median of per-round ratios)"
        assert goal["value"] == pytest.approx(2 / 3) and goal["met"] is False
