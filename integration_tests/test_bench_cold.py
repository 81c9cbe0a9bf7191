"""lp-bench's cold-cache figures and what they are judged against: the storage's own read speed under the
offload folder (lp_plugin.tools.bench.storage), a page-cache drop before every timed decode step, the goals
of a cold config, the refusal of a folder in memory, and the results written after every round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_helpers import ROOT, SMALL, bench, config, read

from lp_plugin.tools.bench import storage
from lp_plugin.tools.bench.configs import parse_config

MIB = 2**20


@pytest.fixture
def disk_dir(tmp_path):
    """A folder on a disk (the cold figures need one): the test's own folder unless that is in memory."""
    if storage.fs_type(str(tmp_path)) not in storage.IN_MEMORY:
        return tmp_path
    pytest.skip(f"{tmp_path} is in memory ({storage.fs_type(str(tmp_path))}) and no disk folder was given")


# ----------------------------------------------------------------------------- the storage's read speed
def test_storage_read_measures_the_folder_and_leaves_nothing_behind(disk_dir):
    got = storage.storage_read(str(disk_dir), 20 * MIB, iters=2, threads=2)
    assert got["bytes"] == 2 * storage.CHUNK  # whole chunks, rounded up
    assert 0 < got["min"] <= got["gbps"] <= got["max"] and got["threads"] == 2
    assert got["fs"] == storage.fs_type(str(disk_dir))
    assert got["note"] is None if got["direct"] else "O_DIRECT" in got["note"]
    assert list(disk_dir.iterdir()) == []  # the scratch file is gone


def test_without_direct_io_the_read_is_buffered_after_an_eviction(disk_dir, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    got = storage.storage_read(str(disk_dir), MIB, iters=1, threads=1)
    assert got["direct"] is False and got["gbps"] > 0 and "O_DIRECT" in got["note"]
    assert list(disk_dir.iterdir()) == []


def test_a_folder_in_memory_has_no_storage_to_measure(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "fs_type", lambda folder: "tmpfs")
    got = storage.storage_read(str(tmp_path), MIB)
    assert got["gbps"] is None and got["fs"] == "tmpfs" and "tmpfs" in got["note"]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("direct", [True, False])
def test_read_files_reads_every_file_whole_and_closes_what_it_opened(disk_dir, direct):
    sizes = [3 * MIB + 4096, 5 * 4096, 4096 + 100]  # several pieces, one piece, a tail short of a block
    paths = []
    for i, size in enumerate(sizes):
        (disk_dir / f"f{i}").write_bytes(os.urandom(size))
        paths.append(str(disk_dir / f"f{i}"))
    open_before = len(os.listdir("/proc/self/fd"))
    try:
        got, seconds = storage.read_files(paths, threads=3, piece=MIB, direct=direct)
    except storage.DirectIORefused:
        pytest.skip(f"{disk_dir} refuses O_DIRECT")
    assert got == (sum(s // 4096 * 4096 for s in sizes) if direct else sum(sizes)) and seconds > 0
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_read_files_opens_each_file_once_whatever_the_threads(tmp_path, monkeypatch):
    import resource

    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(b"x" * 3 * 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 48, hard))  # 40 files on 8 threads: not 320 descriptors
    try:
        got, _ = storage.read_files(sorted(str(p) for p in tmp_path.iterdir()), 8, piece=4096, direct=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got == 40 * 3 * 4096


def test_only_a_refusal_of_direct_io_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    import errno

    (tmp_path / "f").write_bytes(b"x" * 8192)
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    assert storage._timed_reads(str(tmp_path / "f"), 1, 1, direct=True) is None

    def failing(path, flags, *args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", failing)
    with pytest.raises(OSError) as caught:  # not mistaken for a file system without direct I/O
        storage.read_files([str(tmp_path / "f")], 1, direct=True)
    assert not isinstance(caught.value, storage.DirectIORefused)


def test_read_files_refuses_nothing_to_read(tmp_path):
    (tmp_path / "small").write_bytes(b"x" * 100)
    with pytest.raises(ValueError):
        storage.read_files([str(tmp_path / "small")], 1, direct=True)


def test_a_read_that_comes_back_short_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"x" * 8192)
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, pos: 10)
    with pytest.raises(OSError):
        storage.read_files([str(tmp_path / "f")], threads=1, piece=4096, direct=False)


def test_evict_flushes_then_drops_the_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(("fadvise", off, n, advice)))
    (tmp_path / "f").write_bytes(b"x")
    storage.evict(str(tmp_path / "f"))
    assert calls == ["fsync", ("fadvise", 0, 0, os.POSIX_FADV_DONTNEED)]


def test_nearest_existing_walks_up_to_what_is_there(tmp_path):
    from lp_plugin.core.tiers.folder import nearest_existing

    assert nearest_existing(str(tmp_path / "a" / "b")) == str(tmp_path)
    assert nearest_existing(str(tmp_path)) == str(tmp_path)
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    assert nearest_existing(str(tmp_path / "dangling" / "c")) == str(tmp_path / "dangling")  # a link is something


def test_fs_type_takes_the_innermost_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/a / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n/dev/b /data xfs rw 0 0\n"
                      "/dev/c /data/my\\040disk btrfs rw 0 0\ntmpfs /run/a\\011b\\134c tmpfs rw 0 0\n")
    assert storage.fs_type("/dev/shm/x/y", str(mounts)) == "tmpfs"
    assert storage.fs_type("/data/my disk/f", str(mounts)) == "btrfs"
    assert storage.fs_type("/database", str(mounts)) == "ext4"  # /data is no prefix of /database's parts
    assert storage.fs_type("/data", str(mounts)) == "xfs"
    assert storage.fs_type("/run/a\tb\\c/x", str(mounts)) == "tmpfs"  # a tab and a backslash, escaped in the table
    assert storage.fs_type("/x", str(tmp_path / "missing")) is None


# ----------------------------------------------------------------------------- the decode loop
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from shapes import save_tiny

    return save_tiny("qwen2", tmp_path_factory.mktemp("cold") / "tiny-qwen2")


def test_the_step_preparation_runs_before_every_step_outside_the_time(ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    from lp_plugin.tools.bench import measure

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    prompt = torch.arange(3, 15).unsqueeze(0)
    calls = []

    def prepare():
        calls.append(len(calls))
        time.sleep(0.25)

    got = measure.bare_decode(model, prompt, 3, torch.device("cpu"), 0, before_step=prepare)
    plain = measure.bare_decode(model, prompt, 3, torch.device("cpu"), 0)
    assert calls == [0, 1, 2] and got["tokens"] == plain["tokens"]
    assert got["tok_s"] > 3 / 0.75  # the 0.75 s of preparation is not in the time (3 tiny steps are milliseconds)


# ----------------------------------------------------------------------------- goals of a cold config
def _speeds(prefill, decode):
    return {"prefill_tok_s": {"median": prefill, "runs": [prefill] * 3},
            "decode_tok_s": {"median": decode, "runs": [decode] * 3}}


def _cold_out(storage_bound):
    def cfg(name, **extra):
        return {"name": name, "config": parse_config(name).to_dict(), "info": {}, **extra}

    lp = cfg("stream:all:disk:protect_first=0:protect_last=0:cold", **_speeds(150.0, 0.29), bytes_per_forward=5e9,
             transfer_bound_tok_s=10.0, prefill_transfer_bound_tok_s=5120.0, storage_bound_tok_s=storage_bound,
             prefill_storage_bound_tok_s=storage_bound and 512 * storage_bound, max_abs_logit_diff=0.0)
    air = cfg("airllm:new=1:cold", **_speeds(40.0, 0.08))
    base = cfg("baseline", **_speeds(18000.0, 44.0))
    return {"configs": [base, lp, air], "settings": {"repeats": 3, "dtype": "bf16"}, "bandwidth": {},
            "model": {"num_layers": 36}}


def test_a_cold_config_is_judged_against_the_storage_not_the_pcie_bound():
    from lp_plugin.tools.bench.derive import COLD_GOAL, derive

    out = derive(_cold_out(storage_bound=0.32))  # 1.6 GB/s for 5 GB a forward
    name = out["configs"][1]["name"]
    goals = {g["goal"].split(" (")[0].split(" vs ")[0]: g for g in out["goals"] if g["config"] == name}
    assert not [g for g in out["goals"] if g["config"] == name and "transfer bound" in g["goal"]]  # no PCIe goals
    dec, pre = goals["cold decode"], goals["cold prefill"]
    assert dec["value"] == pytest.approx(0.29 / 0.32) and dec["met"] is (0.29 / 0.32 >= COLD_GOAL)
    assert pre["value"] == pytest.approx(150.0 / (512 * 0.32)) and pre["met"] is True
    air = next(g for g in out["goals"] if g["config"] == name and g["goal"].startswith("stream decode vs airllm (cold"))
    r = out["configs"][1]["ratios"]
    assert r["decode_vs_airllm_ceiling"] == pytest.approx(0.32 / 0.08)  # the storage allows no more than this
    assert "at most 4x" in air["goal"] and air["value"] == pytest.approx(0.29 / 0.08) and air["met"] is False


def test_where_compute_is_slower_than_the_storage_the_plain_model_bounds_a_cold_config():
    from lp_plugin.tools.bench.derive import derive

    out = derive(_cold_out(storage_bound=400.0))  # a storage far faster than the plain model's 44 tok/s
    name = out["configs"][1]["name"]
    dec = next(g for g in out["goals"] if g["config"] == name and g["goal"].startswith("cold decode"))
    assert dec["value"] == pytest.approx(0.29 / 44.0)  # against the plain model, as a warm stream config is
    r = out["configs"][1]["ratios"]
    assert r["decode_vs_airllm_ceiling"] == pytest.approx(44.0 / 0.08)  # nothing decodes faster than the plain model


def test_a_cold_goal_without_the_storage_speed_misses():
    from lp_plugin.tools.bench.derive import derive

    out = derive(_cold_out(storage_bound=None))
    cold = [g for g in out["goals"] if g["goal"].startswith("cold ")]
    assert len(cold) == 2 and all(g["met"] is False and g["value"] is None for g in cold)
    assert all("not measured" in g["target"] for g in cold)


def test_cold_applies_to_tiers_that_read_files():
    from lp_plugin.tools.bench.configs import ConfigError, parse_configs

    assert parse_config("stream:even:disk:cold").cold
    with pytest.raises(ConfigError):
        parse_configs("stream:even:cpu:cold")


# ----------------------------------------------------------------------------- a real cold run
def test_a_cold_run_measures_the_storage_and_drops_the_cache_before_every_step(ckpt, disk_dir, monkeypatch):
    from lp_plugin.core.tiers.disk import DiskTier

    drops = []
    real = DiskTier.drop_page_cache
    monkeypatch.setattr(DiskTier, "drop_page_cache", lambda self: (drops.append(1), real(self))[1])
    out = disk_dir / "r.json"
    rc, stdout = bench(["--model", ckpt, *SMALL, "--repeats", "2", "--bandwidth-mib", "16", "--configs",
                        "stream:even:disk:cold", "--offload-dir", disk_dir / "offload", "--out", out])
    assert rc == 0, stdout
    data = read(out)
    assert data["complete"] is True and data["rounds_done"] == 2
    measured = data["bandwidth"]["storage_read"]
    assert measured["gbps"] > 0 and measured["bytes"] == storage.CHUNK
    c = config(data, "stream:even:disk:cold")
    assert c["storage_bound_tok_s"] == pytest.approx(measured["gbps"] * 1e9 / c["bytes_per_forward"])
    new = int(SMALL[SMALL.index("--new") + 1])
    static = int(data["settings"]["static"]["measured"])
    # warm-up and 2 rounds: before the prefill, every decode step, generate (and the static-cache generate)
    assert len(drops) == 3 * (1 + new + 1 + static)
    assert "storage read under the offload folder" in stdout
    assert [f for f in os.listdir(disk_dir / "offload") if f.startswith(".lp-bench-read-")] == []
    from lp_plugin.tools.bench.gate import DEFAULT_TOLERANCE, compare

    older = dict(read(out), schema="lp-bench/2")  # cold decode steps then read the page cache the prompt filled
    verdict = compare(read(out), older, DEFAULT_TOLERANCE)
    assert [line for line in verdict.incomparable if line.startswith("stream:even:disk:cold: cold figures")]
    assert not compare(read(out), read(out), DEFAULT_TOLERANCE).incomparable


def test_cold_configs_are_refused_on_a_folder_in_memory(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(storage, "fs_type", lambda folder: "tmpfs")
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:disk:cold", "--offload-dir", tmp_path / "off",
                   "--out", tmp_path / "r.json"])
    assert rc == 2 and "--offload-dir" in capsys.readouterr().err
    assert not (tmp_path / "off").exists() and not (tmp_path / "r.json").exists()  # refused before anything ran
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:disk", "--offload-dir", tmp_path / "off",
                   "--repeats", "1"])
    assert rc == 0  # warm configs may read from memory


def test_cold_configs_are_refused_where_the_scratch_file_cannot_fit(ckpt, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * MIB, 9 * MIB, MIB))
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:disk:cold", "--offload-dir", tmp_path / "off",
                   "--bandwidth-mib", "64"])
    assert rc == 2 and "--bandwidth-mib" in capsys.readouterr().err and not (tmp_path / "off").exists()


# ----------------------------------------------------------------------------- a run stopped early
def test_cold_configs_are_refused_where_the_offload_folder_is_a_link_to_nothing(ckpt, tmp_path, capsys):
    os.symlink(tmp_path / "gone", tmp_path / "off")
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:disk:cold", "--offload-dir", tmp_path / "off"])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err  # a usage error, before anything ran
    assert not (tmp_path / "gone").exists()


def test_a_run_stopped_early_keeps_its_rounds_and_cannot_be_gated_against(ckpt, tmp_path):
    out, tmp = tmp_path / "r.json", tmp_path / "tmp"
    tmp.mkdir()
    args = ["--model", ckpt, *SMALL, "--repeats", "500", "--configs", "stream:even:disk", "--out", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "lp_plugin.tools.bench.cli", *map(str, args)], cwd=str(ROOT),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out.exists() and read(out)["rounds_done"] >= 1) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # (the file is replaced whole: a read never sees half of one)
        assert out.exists(), proc.stderr.read() if proc.poll() is not None else "no round written after 240 s"
    finally:
        proc.send_signal(signal.SIGTERM)  # what `timeout` sends
        rc = proc.wait(60)
    assert rc == 128 + signal.SIGTERM
    assert str(out) in proc.stderr.read()  # where the rounds done are
    assert list(tmp.iterdir()) == []  # the temporary offload folder went with the run
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("r.json")] == ["r.json"]  # no half-written copy
    data = read(out)
    assert data["complete"] is False and 1 <= data["rounds_done"] < 500
    c = config(data, "stream:even:disk")
    assert len(c["decode_tok_s"]["runs"]) == data["rounds_done"] and c["logits_equal"] is True
    rc, stdout = bench(["--results", out])
    assert rc == 0 and f"verdict: STOPPED after {data['rounds_done']} of 500 rounds" in stdout
    assert f"median [min-max] of {data['rounds_done']} of 500 rounds" in stdout
    rc, stdout = bench(["--results", out, "--compare", out])
    assert rc == 2 and "CANNOT COMPARE" in stdout and "stopped after" in stdout


def test_the_results_file_is_this_runs_from_the_start_and_after_every_round(ckpt, tmp_path, monkeypatch):
    from lp_plugin.tools.bench import cli

    written = []
    monkeypatch.setattr(cli, "write_json", lambda out, path: written.append((out["complete"], out["rounds_done"])))
    rc, stdout = bench(["--model", ckpt, *SMALL, "--repeats", "2", "--configs", "stream:even:cpu",
                        "--out", tmp_path / "r.json"])
    assert rc == 0, stdout
    # a stub once the run is set up (an older file at --out never passes for this run's), round 1, the end
    assert written == [(False, 0), (False, 1), (True, 2)]


def test_a_results_file_that_cannot_be_written_is_said_and_the_run_goes_on(ckpt, tmp_path, monkeypatch, capsys):
    from lp_plugin.tools.bench import cli

    def refuse(out, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_json", refuse)
    rc, stdout = bench(["--model", ckpt, *SMALL, "--repeats", "2", "--configs", "stream:even:cpu",
                        "--out", tmp_path / "r.json"])
    err = capsys.readouterr().err
    assert rc == 3 and "stream:even:cpu" in stdout and "verdict:" in stdout  # every round ran; the table is printed
    assert err.count("cannot write the results so far") == 1 and "cannot write the results to" in err


def test_ctrl_c_exits_130_through_the_clean_ups(ckpt, tmp_path, monkeypatch, capsys):
    from lp_plugin.tools.bench import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_bench", interrupted)
    (tmp_path / "r.json").write_text("{}")  # an older run's file: not offered as this run's rounds
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:cpu", "--out", tmp_path / "r.json"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "--results" not in err

    def one_round_then_interrupted(settings, configs, on_round=None):
        on_round({"rounds_done": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_bench", one_round_then_interrupted)
    rc, _ = bench(["--model", ckpt, *SMALL, "--configs", "stream:even:cpu", "--out", tmp_path / "r.json"])
    assert rc == 130 and f"--results {tmp_path / 'r.json'}" in capsys.readouterr().err


def test_a_shape_checkpoint_is_removed_when_its_saving_is_interrupted(tmp_path, monkeypatch):
    import torch

    from lp_plugin.tools import shapes
    from lp_plugin.tools.bench.setup import BaseModel, BenchSettings

    def save(name, folder, *args):
        (Path(folder) / "model.safetensors").write_bytes(b"x" * 1024)  # half a checkpoint, then SIGTERM or Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "scratch_dir", lambda: str(tmp_path))
    monkeypatch.setattr(shapes, "save_shape_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        BaseModel(BenchSettings(model="smollm2-135m-shape", dtype="fp32"), torch.device("cpu"), need_checkpoint=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit", [{"complete": "false"}, {"complete": None}, {"rounds_done": 99},
                                  {"rounds_done": -1}, {"rounds_done": "x"}, {"complete": True, "rounds_done": 1}])
def test_a_results_file_whose_rounds_do_not_add_up_is_refused(ckpt, tmp_path, edit):
    out = tmp_path / "r.json"
    rc, stdout = bench(["--model", ckpt, *SMALL, "--repeats", "2", "--configs", "stream:even:cpu", "--out", out])
    assert rc == 0, stdout
    data = read(out)
    assert (data["complete"], data["rounds_done"]) == (True, 2)
    data.update(edit)
    out.write_text(__import__("json").dumps(data))
    rc, _ = bench(["--results", out])
    assert rc == 2
