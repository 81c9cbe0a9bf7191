"""Fault tests of the skipping cache (importance scores and fitted stand-ins): it uses nothing it did
not verify as its own.

* Folders and files: a ``skipping`` folder that is a link, belongs to another user or is writable by
  others is not read (results go to a private folder, with a warning); a cache file that is a link,
  a special file, another user's or writable by others is recomputed with a warning.
* Content: a file whose SHA-256 was recomputed after an edit (what a hash cannot stop) is still
  checked for structure: NaN tensors, wrong shapes or dtypes, extra or renamed tensors, fit details
  that are not a table, an importance order out of range or not that of its scores, missing
  params: each recomputed with a warning, never used, never a crash.

Tiny Llama, token-id calibration; tests run as root, so "another user" is a chown.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from shapes import build_tiny

import lp_plugin
from lp_plugin.planning.skipping import cache, metrics

OTHER_UID = 54321


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_private", {})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.fixture(scope="module")
def model():
    return build_tiny("llama", initializer_range=0.2)


def _ids(n=384):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture
def calls(monkeypatch):
    seen = []
    for name, fn in list(metrics._COMPUTE.items()):
        monkeypatch.setitem(metrics._COMPUTE, name,
                            lambda ctx, _fn=fn, _name=name, **kw: seen.append(_name) or _fn(ctx, **kw))
    return seen


def _stand_ins(model):
    """Attach with two skipped layers and linear:4 stand-ins: (weights per layer, fit info)."""
    handle = lp_plugin.attach(model, offload="none", skip="bi:2", stand_in="linear:4", calib=_ids())
    skips = handle.plan.skips
    weights = {i: {k: v.clone() for k, v in skips.stand_ins[i].state_dict().items()} for i in skips.layers}
    info = skips.info["stand_in_fit"]
    handle.detach()
    return weights, info


def _standin_file() -> Path:
    (path,) = cache.folder().glob("standins-*.safetensors")
    return path


def _importance_file() -> Path:
    (path,) = cache.folder().glob("importance-*.json")
    return path


def _rewrite_standins(path, change):
    """Rewrite the stand-in file with ``change(tensors, info)`` applied and its SHA-256 recomputed
    (what someone who can write as this user can do)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors, info = load_file(str(path)), json.loads(meta["info"])
    tensors, info = change(tensors, info)
    assert cache.save_tensors("standins", json.loads(meta["key"]), tensors, info) == path


def _rewrite_importance(path, change):
    doc = json.loads(path.read_text())
    assert cache.save_json("importance", doc["key"], change(doc["payload"])) == path


def _same(a, b) -> bool:
    return all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]) and a.keys() == b.keys()


# --------------------------------------------------------------------------------- folders and files
def _fill_then(model, calls, damage):
    """Score once (cached), ``damage`` the cache, score again: the second is computed again, with a warning."""
    first = lp_plugin.importance(model, _ids(), "bi")
    damage(cache.cache_root() / "skipping")
    with pytest.warns(UserWarning):
        again = lp_plugin.importance(model, _ids(), "bi")
    assert again == first and calls == ["bi", "bi"]


def test_folder_of_another_user_writable_by_all_is_not_used(model, calls):
    def damage(folder):
        os.chown(folder, OTHER_UID, OTHER_UID)
        os.chmod(folder, 0o777)

    _fill_then(model, calls, damage)
    private = cache.folder()
    assert private != cache.cache_root() / "skipping"
    st = os.stat(private)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_folder_of_another_user_is_not_used(model, calls):
    _fill_then(model, calls, lambda folder: os.chown(folder, OTHER_UID, OTHER_UID))


def test_own_folder_writable_by_others_is_not_used(model, calls):
    _fill_then(model, calls, lambda folder: os.chmod(folder, 0o777))


def test_own_folder_writable_by_group_is_not_used(model, calls):
    _fill_then(model, calls, lambda folder: os.chmod(folder, 0o775))


def test_skipping_folder_that_is_a_link_is_not_followed(model, calls):
    def damage(folder):
        real = folder.with_name("elsewhere")
        folder.rename(real)
        folder.symlink_to(real, target_is_directory=True)

    _fill_then(model, calls, damage)
    assert cache.folder() != cache.cache_root() / "skipping"


def test_private_folder_warns_once_and_caches_within_the_process(model, calls):
    lp_plugin.importance(model, _ids(), "bi")
    os.chmod(cache.cache_root() / "skipping", 0o777)
    with pytest.warns(UserWarning):
        lp_plugin.importance(model, _ids(), "bi")
    lp_plugin.importance(model, _ids(), "bi")  # from the private folder now
    assert calls == ["bi", "bi"]


def test_private_folder_goes_with_the_process_and_the_warning_names_the_callers_line(tmp_path):
    code = """
import os, warnings
from lp_plugin.planning.skipping import cache
(cache.cache_root() / "skipping").mkdir(parents=True)
os.chmod(cache.cache_root() / "skipping", 0o777)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    private = cache.folder()
(private / "kept-until-exit").write_text("x")
print(private)
print(caught[0].filename)
"""
    env = {**os.environ, "LP_PLUGIN_CACHE": str(tmp_path / "root")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    private, where = proc.stdout.split()
    assert where == "<string>"  # the caller's code, not lp_plugin's
    assert private != str(tmp_path / "root" / "skipping") and not os.path.exists(private)


def test_cache_file_that_is_a_link_is_not_followed(model, calls):
    def damage(folder):
        (path,) = folder.glob("importance-*.json")
        real = folder.parent / "outside.json"
        path.rename(real)
        path.symlink_to(real)

    _fill_then(model, calls, damage)


def test_cache_file_of_another_user_is_recomputed(model, calls):
    _fill_then(model, calls, lambda folder: os.chown(next(folder.glob("importance-*.json")), OTHER_UID, -1))


def test_cache_file_writable_by_others_is_recomputed(model, calls):
    _fill_then(model, calls, lambda folder: os.chmod(next(folder.glob("importance-*.json")), 0o666))


def test_cache_file_that_is_a_fifo_is_recomputed_without_blocking(model, calls):
    def damage(folder):
        path = next(folder.glob("importance-*.json"))
        path.unlink()
        os.mkfifo(path, 0o644)

    _fill_then(model, calls, damage)


def test_cache_file_that_is_a_folder_is_recomputed(model, calls):
    def damage(folder):
        path = next(folder.glob("importance-*.json"))
        path.unlink()
        path.mkdir(mode=0o755)

    first = lp_plugin.importance(model, _ids(), "bi")
    damage(cache.cache_root() / "skipping")
    with pytest.warns(UserWarning):
        assert lp_plugin.importance(model, _ids(), "bi") == first


def test_recomputed_file_is_written_back_and_verifies(model, calls):
    _fill_then(model, calls, lambda folder: os.chmod(next(folder.glob("importance-*.json")), 0o666))
    assert stat.S_IMODE(os.stat(_importance_file()).st_mode) == 0o644
    lp_plugin.importance(model, _ids(), "bi")
    assert calls == ["bi", "bi"]


# ------------------------------------------------------------------------------------ stand-ins
def _tamper_standins(model, change):
    weights, info = _stand_ins(model)
    assert info["cached"] is False
    _rewrite_standins(_standin_file(), change)
    with pytest.warns(UserWarning):
        refit, info = _stand_ins(model)
    assert info["cached"] is False and _same(weights, refit)
    assert _stand_ins(model)[1]["cached"] is True  # the refitted file verifies again


def _first(tensors, suffix=".bias"):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_standin_nan_tensor_with_recomputed_hash_is_refitted(model):
    def change(tensors, info):
        tensors[_first(tensors)] = torch.full_like(tensors[_first(tensors)], float("nan"))
        return tensors, info

    _tamper_standins(model, change)


def test_standin_bias_of_the_wrong_shape_is_refitted(model):
    def change(tensors, info):
        tensors[_first(tensors)] = tensors[_first(tensors)][:1].clone()  # would broadcast
        return tensors, info

    _tamper_standins(model, change)


def test_standin_wrong_dtype_is_refitted(model):
    def change(tensors, info):
        tensors[_first(tensors)] = tensors[_first(tensors)].double()
        return tensors, info

    _tamper_standins(model, change)


def test_standin_extra_tensor_is_refitted(model):
    def change(tensors, info):
        tensors["99.bias"] = tensors[_first(tensors)].clone()
        return tensors, info

    _tamper_standins(model, change)


def test_standin_renamed_layer_is_refitted(model):
    def change(tensors, info):
        name = _first(tensors)
        tensors["7" + name[name.index("."):]] = tensors.pop(name)
        return tensors, info

    _tamper_standins(model, change)


def test_standin_missing_tensor_is_refitted(model):
    def change(tensors, info):
        tensors.pop(_first(tensors, ".up"))
        return tensors, info

    _tamper_standins(model, change)


@pytest.mark.parametrize("info", [[1, 2], "fit", {"fit": [1]}, {"fit": {"0": {"explained": 0.5}}},
                                  {"fit": {}, "cached": True}])
def test_standin_forged_info_is_refitted(model, info):
    _tamper_standins(model, lambda tensors, _: (tensors, info))


def test_standin_info_edited_without_the_hash_is_refitted(model):
    weights, _ = _stand_ins(model)
    path = _standin_file()
    raw = path.read_bytes()
    at = raw.index(b'\\"explained\\": ') + len(b'\\"explained\\": ') + 4  # a digit of the first fit detail
    digit = raw[at: at + 1]
    assert digit.isdigit()
    path.write_bytes(raw[:at] + (b"1" if digit != b"1" else b"2") + raw[at + 1:])  # same length: a valid header
    with pytest.warns(UserWarning):
        refit, info = _stand_ins(model)
    assert info["cached"] is False and _same(weights, refit)


@pytest.mark.parametrize("damage", ["truncated", "huge-header", "garbage", "empty"])
def test_standin_damaged_file_is_refitted(model, damage):
    weights, _ = _stand_ins(model)
    path = _standin_file()
    raw = path.read_bytes()
    data = {"truncated": raw[: len(raw) // 2], "huge-header": (2**63).to_bytes(8, "little") + raw[8:],
            "garbage": os.urandom(200), "empty": b""}[damage]
    path.write_bytes(data)
    with pytest.warns(UserWarning):
        refit, info = _stand_ins(model)
    assert info["cached"] is False and _same(weights, refit)


# ----------------------------------------------------------------------------------- importance
def _tamper_importance(model, calls, change, metric="bi", **kw):
    first = lp_plugin.importance(model, _ids(), metric, **kw)
    _rewrite_importance(_importance_file(), change)
    with pytest.warns(UserWarning):
        again = lp_plugin.importance(model, _ids(), metric, **kw)
    assert again == first and calls == [metric, metric]


def test_importance_reordered_with_recomputed_hash_is_recomputed(model, calls):
    _tamper_importance(model, calls, lambda p: dict(p, order=list(reversed(p["order"]))))


def test_importance_order_out_of_range_is_recomputed(model, calls):
    _tamper_importance(model, calls, lambda p: dict(p, order=[99] + p["order"][1:]))


def test_importance_order_repeating_a_layer_is_recomputed(model, calls):
    _tamper_importance(model, calls, lambda p: dict(p, order=[p["order"][0]] * len(p["order"])))


def test_importance_missing_params_is_recomputed(model, calls):
    _tamper_importance(model, calls, lambda p: {k: v for k, v in p.items() if k != "params"})


@pytest.mark.parametrize("scores", [lambda s: [float("nan")] * len(s), lambda s: s[:-1], lambda s: ["x"] * len(s),
                                    lambda s: [True] * len(s)])
def test_importance_bad_scores_are_recomputed(model, calls, scores):
    _tamper_importance(model, calls, lambda p: dict(p, scores=scores(p["scores"])))


@pytest.mark.parametrize("payload", [[], "bi", None, {"metric": "angular"}])
def test_importance_payload_of_the_wrong_shape_is_recomputed(model, calls, payload):
    _tamper_importance(model, calls, lambda p: payload)


def test_importance_greedy_steps_forged_is_recomputed(model, calls):
    _tamper_importance(model, calls, lambda p: dict(p, params=dict(p["params"], steps=5)), metric="greedy", steps=2)


def test_importance_file_not_utf8_is_recomputed(model, calls):
    _fill_then(model, calls, lambda folder: next(folder.glob("importance-*.json")).write_bytes(b"\xff\xfe{"))


def test_importance_file_deeply_nested_is_recomputed(model, calls):
    _fill_then(model, calls, lambda folder: next(folder.glob("importance-*.json")).write_text("[" * 100000))


def test_policy_reads_a_verified_order_only(model, calls):
    """A forged out-of-range order reaching a skip policy would name the wrong culprit; it is recomputed
    before any policy sees it, and attach skips the layers the real scores choose."""
    handle = lp_plugin.attach(model, offload="none", skip="bi:2", calib=_ids())
    chosen = handle.info()["skipped_layers"]
    handle.detach()
    _rewrite_importance(_importance_file(), lambda p: dict(p, order=[-1, 40] + p["order"][2:]))
    with pytest.warns(UserWarning):
        handle = lp_plugin.attach(model, offload="none", skip="bi:2", calib=_ids())
    assert handle.info()["skipped_layers"] == chosen
    handle.detach()
