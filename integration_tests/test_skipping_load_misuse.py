"""``from_pretrained(..., skip=...)`` used wrongly: every bad skip is refused before a weight is read
(a folder that holds only config.json would fail with OSError once loading starts), and a model
loaded without some layers stays usable after refused calls: calibration is checked before loading,
saving a checkpoint that would lack the skipped layers is refused, a base-model checkpoint's skipped
keys go unreported, the model pickles, config overrides are planned for, output_loading_info is
refused. Tiny hand-built checkpoints."""

from __future__ import annotations

import copy
import io
import logging
import shutil

import pytest
import torch
from conftest import SKIP_LAYERS as LAYERS

import lp_plugin
from lp_plugin.core import absent
from lp_plugin.errors import AttachError, OffloadSpecError
from lp_plugin.planning.arch import find_decoder_layers

IDS = torch.tensor([[5, 17, 99, 3, 42, 7]])

pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")


@pytest.fixture(scope="module")
def checkpoint(skip_checkpoint):
    return skip_checkpoint


@pytest.fixture(scope="module")
def config_only(checkpoint, tmp_path_factory):
    """The checkpoint's config.json alone: loading its weights raises OSError."""
    folder = tmp_path_factory.mktemp("config-only")
    shutil.copy(f"{checkpoint}/config.json", folder / "config.json")
    return str(folder)


@pytest.mark.parametrize(
    "options",
    [
        dict(skip=[LAYERS]),
        dict(skip=[-1]),
        dict(skip=[1, 1]),
        dict(skip=[]),
        dict(skip=""),
        dict(skip="1,,3"),
        dict(skip="3-1"),
        dict(skip=list(range(LAYERS))),
        dict(skip=f"0-{LAYERS - 1}"),
        dict(skip=[1.0]),
        dict(skip=[True]),
        dict(skip="bi"),
        dict(skip=f"bi:{LAYERS}"),
        dict(skip="bi:100%"),
        dict(skip="nosuchpolicy:2"),
        dict(skip=[1, 3], offload="auto"),
        dict(skip=[1, 3], max_memory="1GiB"),
        dict(skip=[1, 3], stand_in="bogus"),
        dict(skip=[1, 3], stand_in="linear:0"),
        dict(stand_in="mean"),
        dict(skip="bi:2", calib="/no/such/file.txt"),
    ],
    ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()),
)
def test_a_bad_skip_is_refused_before_loading(config_only, options):
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(config_only, main_device="cpu", **options)


def test_refused_attaches_leave_the_model_usable(checkpoint):
    """A model loaded without layers 1 and 3: refused re-attaches change nothing, deepcopy and a wider
    skip work, and the same logits come back."""
    model = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device="cpu", offload="even", skip=[1, 3])
    with torch.no_grad():
        expected = model(IDS).logits
    lp_plugin.get_handle(model).detach()
    for options in (dict(), dict(skip=[1]), dict(skip="bi:2", calib=list(range(256)) * 2)):
        with pytest.raises(AttachError):
            lp_plugin.attach(model, offload="none", **options)
        assert lp_plugin.get_handle(model) is None
    twin = copy.deepcopy(model)
    assert absent.absent_layers(find_decoder_layers(twin)[1]) == [1, 3]
    handle = lp_plugin.attach(twin, offload="2,5", mode="stream", skip=[1, 3, 5])
    assert handle.info()["offloaded_layers"] == [2]
    handle.detach()
    lp_plugin.attach(model, offload="even", skip="1,3")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


@pytest.mark.parametrize("calib", [None, "pydoc:1", "mix:0", "no/such/file.txt"])
def test_calibration_text_is_checked_before_loading(config_only, calib):
    """No tokenizer beside the config (the default and pydoc need one), too few tokens, a file that is not there."""
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(config_only, main_device="cpu", skip="bi:2", calib=calib)


@pytest.mark.parametrize("calib", [[], [99999] * 600], ids=["empty", "out-of-vocab"])
def test_bad_calibration_ids_are_refused_before_loading(config_only, calib):
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(config_only, main_device="cpu", skip=[1, 3], stand_in="mean", calib=calib)


def test_saving_a_model_without_some_layers_is_refused(checkpoint, tmp_path):
    model = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device="cpu", offload="none", skip=[1, 3])
    with pytest.raises((AttachError, OffloadSpecError)):
        model.save_pretrained(str(tmp_path / "saved"))


def test_a_base_model_checkpoint_reports_nothing_unused(tmp_path):
    """openai-community/gpt2 stores its keys without the causal LM's prefix (``h.1.attn...``, not
    ``transformer.h.1.attn...``): the skipped layers' keys must stay unreported there too."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(tmp_path / "gpt2"))
    logger = logging.getLogger("transformers")
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        model = lp_plugin.from_pretrained(str(tmp_path / "gpt2"), dtype=torch.float32, main_device="cpu", skip=[1, 10])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lp_plugin.get_handle(model).info()["skipped_without_weights"] == [1, 10]
    assert not [m for m in records if "UNEXPECTED" in m]


def test_a_detached_model_without_some_layers_pickles(checkpoint):
    model = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device="cpu", offload="none", skip=[1, 3])
    lp_plugin.get_handle(model).detach()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert absent.absent_layers(find_decoder_layers(again)[1]) == [1, 3]


def test_a_config_override_is_planned_for(checkpoint):
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(checkpoint, main_device="cpu", offload="none", skip=[8], num_hidden_layers=6)


def test_output_loading_info_is_refused(config_only):
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(config_only, main_device="cpu", skip=[1, 3], output_loading_info=True)


def test_layer_numbers_of_other_integer_types_are_taken(checkpoint):
    """Layer lists built with numpy or torch (``np.arange``, a tensor's items) hold their own integer types."""
    import numpy as np

    model = lp_plugin.from_pretrained(
        checkpoint, dtype=torch.float32, main_device="cpu", offload=[np.int64(2)], skip=[np.int64(1), torch.tensor(3)]
    )
    info = lp_plugin.get_handle(model).info()
    assert info["skipped_without_weights"] == [1, 3] and info["offloaded_layers"] == [2]
    for bad in ([1.0], [np.float32(1)], [True]):
        with pytest.raises(OffloadSpecError):
            lp_plugin.from_pretrained(checkpoint, main_device="cpu", skip=bad)
