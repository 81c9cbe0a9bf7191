"""Bad options to attach() and from_pretrained(): one error of lp_plugin's own type, raised before any
work, naming the option and the value at fault; the model is left as it was (same state dict, same
logits, no handle, no hooks, and it can be attached again)."""

from __future__ import annotations

import copy
import math
import pathlib
import tracemalloc

import pytest
import torch
from fault_parts import Tiny, assert_unchanged

import lp_plugin
from lp_plugin.errors import AttachError, OffloadFileError, OffloadSpecError
from lp_plugin.planning.plan import OffloadPlan


@pytest.fixture
def tiny():
    return Tiny()


def _a_file(tmp):
    p = tmp / "not_a_folder"
    p.write_text("x")
    return p


def _under_a_file(tmp):
    return _a_file(tmp) / "sub"


# (case id, attach kwargs (callables get tmp_path), exception type, what the message must quote: the option
# or the value at fault, and the alternative it offers where there is one)
BAD_INPUTS = [
    ("unknown-spec", dict(offload="evne"), OffloadSpecError, ["'evne'", "'even'"]),
    ("layer-out-of-range", dict(offload="2,8"), OffloadSpecError, ["[8]", "0..7"]),
    ("negative-layer", dict(offload="-1,2"), OffloadSpecError, ["[-1]"]),
    ("range-past-end", dict(offload="4-20"), OffloadSpecError, ["'4-20'"]),
    ("huge-range-no-hang", dict(offload="0-99999999999"), OffloadSpecError, ["'0-99999999999'"]),
    ("duplicate-layers", dict(offload="2,4,2"), OffloadSpecError, ["[2]", "'2,4,2'"]),
    ("overlapping-ranges", dict(offload="2-4,3"), OffloadSpecError, ["[3]"]),
    ("duplicate-in-list", dict(offload=[3, 3]), OffloadSpecError, ["[3]"]),
    ("empty-string", dict(offload=""), OffloadSpecError, ["offload='none'"]),
    ("blank-string", dict(offload="   "), OffloadSpecError, ["offload='none'"]),
    ("empty-list", dict(offload=[]), OffloadSpecError, ["offload='none'"]),
    ("empty-item", dict(offload="2,,4"), OffloadSpecError, ["'2,,4'"]),
    ("range-step-0", dict(offload="2-6:0"), OffloadSpecError, ["'2-6:0'", "START-END[:STEP]"]),
    ("range-reversed", dict(offload="6-2"), OffloadSpecError, ["'6-2'"]),
    ("unparsable-item", dict(offload="2;4"), OffloadSpecError, ["'2;4'"]),
    ("double-minus", dict(offload="--2"), OffloadSpecError, ["'--2'"]),
    ("non-ascii-digit", dict(offload="\u00b2"), OffloadSpecError, ["'\u00b2'"]),
    ("spec-none", dict(offload=None), OffloadSpecError, ["None", "'even'"]),
    ("spec-float", dict(offload=2.5), OffloadSpecError, ["float"]),
    ("list-of-str", dict(offload=["2"]), OffloadSpecError, ["'2'"]),
    ("list-of-bool", dict(offload=[True]), OffloadSpecError, ["True"]),
    ("protect-sum-too-large", dict(offload="even", protect_first=5, protect_last=4), OffloadSpecError,
     ["protect_first (5)", "protect_last (4)"]),
    ("protect-negative", dict(offload="even", protect_first=-1), OffloadSpecError, ["protect_first", "-1"]),
    ("named-selects-nothing", dict(offload="even", protect_first=4, protect_last=4), OffloadSpecError,
     ["offload='even'", "protect_first=4", "protect_last=4"]),
    ("odd-selects-nothing", dict(offload="odd", protect_first=2, protect_last=5), OffloadSpecError, ["offload='odd'"]),
    ("alpha>1", dict(alpha=1.5), OffloadSpecError, ["alpha", "1.5"]),
    ("alpha<0", dict(alpha=-0.1), OffloadSpecError, ["alpha", "-0.1"]),
    ("alpha-nan", dict(alpha=float("nan")), OffloadSpecError, ["alpha", "nan"]),
    ("alpha-inf", dict(alpha=math.inf), OffloadSpecError, ["alpha", "inf"]),
    ("alpha-string", dict(alpha="abc"), OffloadSpecError, ["alpha", "'abc'"]),
    ("alpha-none", dict(alpha=None), OffloadSpecError, ["alpha", "None"]),
    ("prefetch<0", dict(mode="stream", prefetch=-1), OffloadSpecError, ["prefetch", "-1"]),
    ("prefetch-float", dict(mode="stream", prefetch=1.5), OffloadSpecError, ["prefetch", "1.5"]),
    ("prefetch-string", dict(prefetch="two"), OffloadSpecError, ["prefetch", "'two'"]),
    ("unknown-tier", dict(tier="ram"), OffloadSpecError, ["'ram'", "'cpu'", "'disk'"]),
    ("tier-not-a-str", dict(tier=3), OffloadSpecError, ["tier", "3"]),
    ("unknown-mode", dict(mode="fast"), OffloadSpecError, ["'fast'", "'session'", "'stream'"]),
    ("folder-is-a-file", dict(tier="disk", offload_folder=_a_file), OffloadFileError, ["not_a_folder"]),
    ("folder-under-a-file", dict(tier="disk", offload_folder=_under_a_file), OffloadFileError, ["not_a_folder/sub"]),
    ("folder-without-disk-tier", dict(offload_folder=lambda tmp: tmp / "layers"), OffloadSpecError,
     ["offload_folder", "tier='cpu'", "tier='disk'"]),
    ("layers-as-bytes", dict(offload=b"\x02\x04"), OffloadSpecError, ["bytes"]),
    ("stand-in-without-skip", dict(stand_in="linear"), OffloadSpecError, ["stand_in='linear'", "skip="]),
    ("calib-without-skip", dict(calib="pydoc"), OffloadSpecError, ["calib='pydoc'", "skip="]),
    ("main-device-meta", dict(main_device="meta"), OffloadSpecError, ["'meta'", "'cpu'"]),
    ("main-device-unseen-gpu", dict(main_device="cuda:99"), OffloadSpecError, ["cuda:99", "GPU"]),
]


@pytest.mark.parametrize("kwargs,exc,quoted", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS])
def test_bad_input_is_rejected_and_model_unchanged(tiny, tmp_path, kwargs, exc, quoted):
    kwargs = {k: (v(tmp_path) if callable(v) else v) for k, v in kwargs.items()}
    tracemalloc.start()
    try:
        with pytest.raises(exc) as refused:
            lp_plugin.attach(tiny.model, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [q for q in quoted if q not in str(refused.value)] == []
    assert peak < 16 * 2**20, peak  # rejected up front: no range expanded into a list, nothing packed
    assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)



def test_from_pretrained_refuses_bad_options_before_loading(tiny_checkpoints, tmp_path):
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], device_map="cpu")
    assert "device_map='cpu'" in str(refused.value) and "'auto'" in str(refused.value)
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], alpha=2)
    assert "alpha" in str(refused.value)


@pytest.mark.parametrize("thing", [None, "Qwen/Qwen2.5-3B", torch.zeros(2)])
def test_attach_refuses_what_is_not_a_model(thing):
    with pytest.raises(AttachError) as refused:
        lp_plugin.attach(thing)
    assert "from_pretrained" in str(refused.value)


def test_a_plan_runs_on_a_model_of_its_own_shape_and_with_its_own_options(tiny, tmp_path):
    config = copy.deepcopy(tiny.model.config)
    config.num_hidden_layers = 6
    other = OffloadPlan.for_config(config, lp_plugin.OffloadConfig(offload="2,4", main_device="cpu"))
    with pytest.raises(AttachError) as refused:
        lp_plugin.attach(tiny.model, plan=other)
    assert "6 decoder layers" in str(refused.value) and "has 8" in str(refused.value)
    own = OffloadPlan.for_config(tiny.model.config, lp_plugin.OffloadConfig(offload="2,4", main_device="cpu"))
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.attach(tiny.model, plan=own, offload="6")
    assert "not both" in str(refused.value)
    assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)
    lp_plugin.attach(tiny.model, plan=own).detach()  # the plan alone runs


@pytest.mark.parametrize(
    "kwargs,quoted",
    [
        pytest.param(dict(protect_frist=0), ["protect_frist", "protect_first"], id="typo"),
        pytest.param(dict(offload_foldr="x", tier="disk"), ["offload_foldr", "offload_folder"], id="typo-folder"),
        pytest.param(dict(stand_ins="linear", skip="3"), ["stand_ins", "stand_in"], id="typo-stand-in"),
    ],
)
def test_from_pretrained_names_the_option_a_misspelt_keyword_meant(tiny_checkpoints, kwargs, quoted):
    """A keyword transformers would pass to the model's constructor, spelt nearly like an lp_plugin option: refused
    naming the option, after reading the config (its attributes are keywords too) and before the weights."""
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", **kwargs)
    assert [q for q in quoted if q not in str(refused.value)] == []
    model = lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", num_hidden_layers=6)  # a config attribute
    assert len(model.model.layers) == 6


@pytest.mark.parametrize(
    "kwargs,exc,quoted",
    [
        pytest.param(dict(main_device="cuda:99"), OffloadSpecError, ["cuda:99"], id="unseen-gpu"),
        pytest.param(dict(offload_folder="layers"), OffloadSpecError, ["tier='disk'"], id="folder-without-disk"),
        pytest.param(dict(tier="disk", offload_folder=_a_file), OffloadFileError, ["not_a_folder"], id="folder-a-file"),
    ],
)
def test_from_pretrained_refuses_before_reading_the_checkpoint(tiny_checkpoints, tmp_path, kwargs, exc, quoted):
    """Refused before a file of the checkpoint is read: the same error for a folder that holds no checkpoint."""
    kwargs = {k: (v(tmp_path) if callable(v) else v) for k, v in kwargs.items()}
    for where in (tiny_checkpoints["qwen2"], tmp_path / "no-model-here"):
        with pytest.raises(exc) as refused:
            lp_plugin.from_pretrained(where, offload="even", **kwargs)
        assert [q for q in quoted if q not in str(refused.value)] == []


def test_the_offload_folder_is_not_the_checkpoints_nor_lp_plugins_own(tiny_checkpoints, tmp_path, monkeypatch):
    ckpt = pathlib.Path(tiny_checkpoints["qwen2"])
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(OffloadFileError) as refused:
        lp_plugin.from_pretrained(ckpt, offload="even", tier="disk", offload_folder=ckpt)
    assert "checkpoint" in str(refused.value)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    model = lp_plugin.from_pretrained(ckpt, offload="even", tier="disk", offload_folder=ckpt / "layers")
    lp_plugin.get_handle(model).detach(remove_files=True)  # a folder inside the checkpoint's is the user's choice
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))
    for managed in ("smollm2-135m-instruct", "skipping/sub"):
        with pytest.raises(OffloadFileError) as refused:
            lp_plugin.from_pretrained(ckpt, offload="even", tier="disk", offload_folder=tmp_path / "cache" / managed)
        assert "rebuilds" in str(refused.value)


@pytest.mark.parametrize("how", ["str", "path", "relative"])
def test_a_local_folder_that_does_not_exist_is_named(tmp_path, how):
    where = {"str": str(tmp_path / "nope"), "path": tmp_path / "nope", "relative": "./no-such-model-here"}[how]
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(where, offload="even")
    assert "no such folder" in str(refused.value)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_auto_with_prefetch_plans_session_mode_where_it_fits(prefetch):
    """prefetch is stream mode's; offload='auto' may still plan session mode, where it does not apply."""
    from lp_plugin.tools.shapes import shape_config

    plan = OffloadPlan.for_config(
        shape_config("smollm2-135m-shape"),
        lp_plugin.OffloadConfig(offload="auto", max_memory="200GiB", prefetch=prefetch, main_device="cuda:0"),
    )
    assert plan.config.mode == "session" and plan.offloaded == ()


def test_a_checkpoint_inside_lp_plugins_cache_gets_one_fix_that_works(tiny_checkpoints, tmp_path, monkeypatch):
    """The bundled model lives in a folder lp_plugin manages: neither it nor a subfolder may hold layer files, and
    the refusal says to pass a folder outside it (not a subfolder)."""
    import shutil

    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "cache"))
    ckpt = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "cache" / "smollm2-135m-instruct")
    for folder in (ckpt, ckpt / "offload"):
        with pytest.raises(OffloadFileError) as refused:
            lp_plugin.from_pretrained(ckpt, offload="even", tier="disk", offload_folder=folder)
        assert "outside it" in str(refused.value)
    model = lp_plugin.from_pretrained(ckpt, offload="even", tier="disk", offload_folder=tmp_path / "elsewhere")
    lp_plugin.get_handle(model).detach()


def test_a_path_object_with_a_tilde_is_expanded(tiny_checkpoints, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    model = lp_plugin.from_pretrained(pathlib.Path("~/model"), offload="even")
    lp_plugin.get_handle(model).detach()


def test_attach_compares_no_folder_with_a_checkpoint_named_relatively(tiny, tmp_path, monkeypatch):
    """A model loaded from a relative path may be attached from another working directory: a folder of the same
    relative name there is not the checkpoint's."""
    tiny.model.config._name_or_path = "copy"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "copy").mkdir()
    lp_plugin.attach(tiny.model, offload="even", tier="disk", offload_folder="copy").detach(remove_files=True)
