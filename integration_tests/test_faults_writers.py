"""Writers of one offload folder: a writer killed (kill -9) at random points leaves only valid files,
and two processes sharing a folder both get exact models. Children are forked from the test process
(``multiprocessing`` "fork" context), so they start in milliseconds."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import signal
import time

import pytest
import torch
from fault_parts import layer_file, logits, temp_files, verify_layer_file

import lp_plugin
from lp_plugin.core.tiers.journal import NAME as JOURNAL


def _big_model(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()  # ~12.6 MB per layer file


ALL = dict(offload="all", protect_first=0, protect_last=0, tier="disk")


def _bump(model, amount):
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(amount)


def _writer_child(model, folder, point, bump, ready):
    """Forked writer: perturbs its copy of the weights (so every file is stale and gets rewritten)
    and attaches; at ``point`` it signals the parent and waits to be killed. ``random`` keeps
    rewriting every layer in a loop."""
    torch.set_num_threads(1)

    def stop(*_, **__):
        ready.set()
        time.sleep(600)

    if point.startswith("partial-payload"):  # "partial-payload:0.37": die with 37% of the file written
        import lp_plugin.core.tiers.layerfile as layerfile

        fraction = float(point.partition(":")[2])
        real_write = layerfile.write

        def write_part(path, flat, metadata):
            real_write(path, flat, metadata)
            os.truncate(path, int(os.path.getsize(path) * fraction))
            stop()

        layerfile.write = write_part
    elif point == "before-fsync":
        os.fsync = stop
    elif point == "before-rename":
        os.replace = stop
    elif point == "after-rename":
        real_replace = os.replace

        def replace_then_stop(*a, **k):
            real_replace(*a, **k)
            stop()

        os.replace = replace_then_stop
    else:
        ready.set()
    step = 0
    while True:
        step += 1
        _bump(model, bump * step)
        lp_plugin.attach(model, offload_folder=folder, **ALL).detach()


def _check_folder_invariant(folder, n_layers, clean_sha):
    """Only complete, valid layer files (old or new); returns {layer: "clean" | "other" | "missing"}."""
    state = {}
    for i in range(n_layers):
        path = layer_file(folder, i)
        if not path.exists():
            state[i] = "missing"
            continue
        meta = verify_layer_file(path)
        assert meta["layer"] == f"layer_{i:05d}"
        state[i] = "clean" if meta["source_sha256"] == clean_sha[i] else "other"
    stray = [p.name for p in pathlib.Path(folder).iterdir()
             if not (p.name.startswith("layer_") and p.name.endswith(".safetensors"))
             and p.name != JOURNAL and not p.name.endswith(".tmp")]
    assert stray == []
    return state


def test_kill9_writer_at_random_points_leaves_only_valid_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    model = _big_model()
    ref = logits(model)
    folder = tmp_path / "off"
    h = lp_plugin.attach(model, offload_folder=folder, **ALL)
    assert set(h.tier.report.values()) == {"written"}
    h.detach()
    clean_sha = {i: verify_layer_file(layer_file(folder, i))["source_sha256"] for i in range(8)}

    rng = random.Random(1234)
    points = [f"partial-payload:{rng.uniform(0.01, 0.99):.3f}" for _ in range(3)]
    points += ["before-fsync", "before-rename", "after-rename"] + ["random"] * 10
    mid_write_kills, seen = 0, set()
    for k, point in enumerate(points):
        ready = ctx.Event()
        proc = ctx.Process(target=_writer_child, args=(model, folder, point, 1e-3 * (k + 1), ready), daemon=True)
        proc.start()
        assert ready.wait(60), f"writer never reached {point}"
        if point == "random":
            time.sleep(rng.uniform(0.0, 0.8))  # the child rewrites all 8 layers in ~0.4 s, ~40% of it writing
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        leftovers = temp_files(folder)
        new = set(leftovers) - seen
        seen |= new
        mid_write_kills += bool(new)  # this writer died with a half-made temp file
        if point != "random" and point != "after-rename":
            # exactly the killed writer's temp file (an earlier one was removed by this writer)
            assert len(leftovers) == 1 and new, leftovers
        state = _check_folder_invariant(folder, 8, clean_sha)
        print(f"kill {k} at {point}: temp files {leftovers}, layer files {state}")  # visible with -s
    assert mid_write_kills >= 5

    # a fresh attach: reuses the files that match, rebuilds the others, removes the dead writers' temp files
    state = _check_folder_invariant(folder, 8, clean_sha)
    h = lp_plugin.attach(model, offload_folder=folder, **ALL)
    for i, s in state.items():
        expected = {"clean": "reused", "missing": "written", "other": "rebuilt: stale"}[s]
        assert h.tier.report[f"layer_{i:05d}"].startswith(expected), (i, s, h.tier.report[f"layer_{i:05d}"])
    assert temp_files(folder) == []
    assert torch.equal(logits(model), ref)
    h.detach()
    assert torch.equal(logits(model), ref)


def _concurrent_child(model, folder, bump, barrier, results):
    torch.set_num_threads(1)
    _bump(model, bump)
    ref = logits(model)
    barrier.wait(60)
    try:
        h = lp_plugin.attach(model, offload_folder=folder, **ALL)
        out = {"report": dict(h.tier.report), "equal": bool(torch.equal(logits(model), ref))}
        h.detach()
        out["equal_after_detach"] = bool(torch.equal(logits(model), ref))
    except Exception as exc:  # reported to the parent
        out = {"error": repr(exc)}
    results.put(out)


@pytest.mark.parametrize("same_model", [True, False], ids=["same-model", "different-models"])
def test_two_processes_share_one_folder(tmp_path, same_model):
    ctx = multiprocessing.get_context("fork")
    model = _big_model()
    folder = tmp_path / "off"
    barrier, results = ctx.Barrier(2), ctx.SimpleQueue()
    procs = [ctx.Process(target=_concurrent_child, args=(model, folder, 0.0 if same_model else 1e-3 * j, barrier, results),
                         daemon=True) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outs = [results.get() for _ in procs]
    for out in outs:
        assert "error" not in out, out
        assert out["equal"] and out["equal_after_detach"]
    if same_model:
        # the folder lock serializes check+write per layer: each layer written once, reused once
        for i in range(8):
            assert sorted(o["report"][f"layer_{i:05d}"] for o in outs) == ["reused", "written"], i
    for i in range(8):
        verify_layer_file(layer_file(folder, i))
    assert temp_files(folder) == []
