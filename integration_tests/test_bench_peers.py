"""lp-bench's peers, what users would run instead of lp_plugin: Accelerate's disk offload and AirLLM,
measured in the same run as lp_plugin's disk tier on a tiny real checkpoint (CPU), each checked for
exactness like every config and paired cold against cold, warm against warm."""

from __future__ import annotations

import pytest
from bench_helpers import SMALL, bench, config, read

from lp_plugin.tools.bench.configs import ConfigError, parse_config, parse_configs

# AirLLM reads every module's file for every forward (seconds a token even here): one new token
AIR = ["airllm:new=1", "airllm:new=1:cold"]
PEERS = f"accelerate_disk:even,accelerate_disk:even:cold,{','.join(AIR)},stream:even:disk,stream:even:disk:cold"


def test_peer_grammar():
    c = parse_config("accelerate_disk")
    assert (c.kind, c.spec, c.tier, c.cold) == ("accelerate_disk", "even", "disk", False)
    c = parse_config("accelerate_disk:2,4:cold:new=3")
    assert (c.spec, c.cold, c.new) == ("2,4", True, 3)
    c = parse_config("airllm:new=2:cold")
    assert (c.kind, c.spec, c.tier, c.new, c.cold, c.exact) == ("airllm", "all", "disk", 2, True, True)
    c = parse_config("stream:all:disk:protect_first=0:protect_last=0:cold")
    assert (c.spec, c.options.protect_first, c.options.protect_last, c.cold) == ("all", 0, 0, True)
    names = [c.name for c in parse_configs("stream:even:disk,airllm,accelerate_disk:odd")]
    assert names == ["baseline", "stream:even:disk", "airllm", "accelerate_disk:odd", "baseline:twin"]


@pytest.mark.parametrize("bad", ["airllm:even", "airllm:alpha=0.5", "airllm:load=pretrained", "accelerate_cpu:cold",
                                 "accelerate_disk:even:prefetch=2", "airllm:skip=3", "airllm:protect_first=0",
                                 "stream:all:disk:protect_last=-1", "stream:all:disk:protect_first=x"])
def test_bad_peer_configs_rejected(bad):
    with pytest.raises(ConfigError):
        parse_configs(bad)


@pytest.fixture(scope="module")
def peers_run(tmp_path_factory):
    pytest.importorskip("airllm")  # installed by the test extra; a bare install of lp_plugin may lack it
    from lm_eval_fixtures import tokenizer_dir
    from shapes import save_tiny

    tmp = tmp_path_factory.mktemp("peers")
    ckpt = save_tiny("llama", tmp / "tiny-llama", tokenizer_dir=tokenizer_dir())  # AirLLM loads the folder's tokenizer
    out = tmp / "peers.json"
    args = ["--model", ckpt, *SMALL, "--repeats", "1", "--configs", PEERS, "--offload-dir", tmp / "offload",
            "--out", out]
    rc, stdout = bench(args)
    assert rc == 0, stdout
    return {"data": read(out), "stdout": stdout, "ckpt": ckpt}


def test_peers_are_measured_and_exact(peers_run):
    data = peers_run["data"]
    for name in ("accelerate_disk:even", "accelerate_disk:even:cold", *AIR):
        c = config(data, name)
        assert c["error"] is None and c["not_applicable"] is None, (name, c["traceback"])
        assert c["logits_equal"] is True and c["decode_tokens_agree"] == 1.0, name
        if not c["decode_logits_equal"]:
            # both peers read the weights from files of their own (Accelerate's offload folder, AirLLM's layer
            # shards), aligned unlike the checkpoint's mapped tensors: where MKL rounds a matrix-vector product by
            # alignment (AVX-512), their decode steps differ from the plain model's by rounding (lp_plugin keeps
            # the checkpoint's alignment: lp_plugin.core.flat)
            assert 0 < c["max_abs_decode_logit_diff"] < 1e-4, name
        else:
            assert c["decode_logits_equal"] is True and c["max_abs_decode_logit_diff"] == 0.0, name  # decode steps too
        assert c["decode_tok_s"]["median"] > 0 and len(c["decode_tok_s"]["runs"]) == 1, name
        timed_generate = c["generate_tokens_agree"] is not None
        assert timed_generate == (not name.startswith("airllm")), name  # AirLLM: prefill and bare decode only
    air = config(data, AIR[0])
    assert air["info"]["load"] == "airllm.AutoModel.from_pretrained" and air["info"]["airllm_version"]
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(peers_run["ckpt"]).parameters()
    assert air["bytes_per_forward"] == sum(p.numel() * p.element_size() for p in params)  # AirLLM streams every weight
    acc = config(data, "accelerate_disk:even")
    assert acc["layers"] == config(data, "stream:even:disk")["layers"]


@pytest.mark.parametrize("name,peer_cold", [("stream:even:disk", False), ("stream:even:disk:cold", True)])
def test_lp_configs_are_paired_with_peers_in_the_same_cache_state(peers_run, name, peer_cold):
    data = peers_run["data"]
    c = config(data, name)
    air = config(data, AIR[1] if peer_cold else AIR[0])
    acc = config(data, "accelerate_disk:even:cold" if peer_cold else "accelerate_disk:even")
    r = c["ratios"]
    expect = [a / b for a, b in zip(c["decode_tok_s"]["runs"], air["decode_tok_s"]["runs"])]
    assert r["decode_vs_airllm"]["runs"] == pytest.approx(expect)
    expect = [a / b for a, b in zip(c["decode_tok_s"]["runs"], acc["decode_tok_s"]["runs"])]
    assert r["decode_vs_accelerate_disk"]["runs"] == pytest.approx(expect)
    assert r["prefill_vs_airllm"]["median"] > 0
    goals = [g for g in data["goals"] if g["config"] == name and "airllm" in g["goal"]]
    state = "cold vs cold" if peer_cold else "warm vs warm"
    assert {g["target"] for g in goals} == {">= 50", ">= 5"} and all(state in g["goal"] for g in goals)
    assert all(g["met"] == (g["value"] >= float(g["target"].split()[-1])) for g in goals)


def test_table_shows_the_airllm_ratio(peers_run):
    lines = peers_run["stdout"].splitlines()
    header = next(line for line in lines if line.startswith("config "))
    at = header.index("dec/air")
    row = next(line for line in lines if line.startswith("stream:even:disk "))
    assert row[at:].split()[0].endswith("x")


def test_peers_not_applicable_for_nf4_or_when_missing(monkeypatch, tmp_path):
    import importlib.util

    from lp_plugin.tools.bench import apply
    from lp_plugin.tools.bench.apply import Placement

    class Base:  # what Placement reads of the plain model before anything is put on
        device = __import__("torch").device("cpu")
        model = None
        checkpoint = None

    place = Placement(Base(), parse_config("airllm"), str(tmp_path), "nf4")  # nf4: refused before anything is read
    assert place.not_applicable() == apply.AIRLLM_NF4
    for peer in ("accelerate_cpu", "accelerate_disk"):
        assert Placement(Base(), parse_config(peer), str(tmp_path), "nf4").not_applicable() == apply.ACCELERATE_NF4
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airllm" else real(name, *a))
    assert Placement(Base(), parse_config("airllm"), str(tmp_path), "bf16").not_applicable() == apply.AIRLLM_MISSING


def test_airllm_not_applicable_without_a_tokenizer_in_the_checkpoint(tmp_path):
    pytest.importorskip("airllm")
    from shapes import save_tiny

    ckpt = save_tiny("llama", tmp_path / "no-tokenizer")
    rc, stdout = bench(["--model", ckpt, *SMALL, "--repeats", "1", "--configs", "airllm", "--out", tmp_path / "r.json"])
    assert rc == 0, stdout
    from lp_plugin.tools.bench.apply import AIRLLM_NO_TOKENIZER

    assert config(read(tmp_path / "r.json"), "airllm")["not_applicable"] == AIRLLM_NO_TOKENIZER


def test_evict_folder_flushes_and_asks_for_every_file(tmp_path):
    from lp_plugin.tools.bench.apply import evict_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"x" * 4096)
    (tmp_path / "y.bin").write_bytes(b"y" * 4096)
    assert evict_folder(str(tmp_path)) == 2
    assert (tmp_path / "y.bin").read_bytes() == b"y" * 4096  # nothing is lost
