"""Skipped layers are neither loaded nor kept: ``from_pretrained`` with an explicit skip never reads
their tensors (a checkpoint without them loads to the same logits, and layer 1 never takes layers 10
and 11 with it), a skip chosen on the loaded model frees them once chosen (device and host copies,
Accelerate's included), stand-ins keep working, and a model without those weights refuses to run
them. Tiny hand-built models saved as real safetensors checkpoints."""

from __future__ import annotations

import gc
import logging
import re
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import lp_plugin
from lp_plugin.core import absent, accel
from lp_plugin.errors import AttachError
from lp_plugin.hookspecs import hookimpl
from lp_plugin.integrations.skipped_load import _skipping_class, release
from lp_plugin.planning import plugins
from lp_plugin.planning.arch import find_decoder_layers

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 31, 8, 64, 120, 2]])

pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")


@pytest.fixture(scope="module")
def checkpoint(skip_checkpoint):
    return skip_checkpoint


def _without_layers(src: str, dst: Path, layers) -> str:
    """A copy of checkpoint ``src`` whose safetensors file holds no tensor of decoder ``layers``."""
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    drop = tuple(f"model.layers.{i}." for i in layers)
    with safe_open(str(Path(src) / "model.safetensors"), framework="pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(drop)}
        meta = fh.metadata()
    assert len(kept) < len(list(safe_open(str(Path(src) / "model.safetensors"), framework="pt").keys()))
    save_file(kept, str(dst / "model.safetensors"), metadata=meta)
    return str(dst)


def _plain_with_skip(path, skip, device, **options):
    """The plain model loaded by transformers, every layer read, then attached with ``skip``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    lp_plugin.attach(model, offload="none", skip=skip, **options)
    return model


def _param_names(model) -> set:
    return {n for n, _ in model.named_parameters()}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("options", [dict(offload="none"), dict(offload="2,10,11", mode="stream")], ids=["none", "stream"])
def test_an_explicit_skip_never_reads_the_skipped_layers(checkpoint, tmp_path, device, options):
    """Layer 1's tensors are deleted from the file: transformers alone reports them missing; from_pretrained
    with skip=[1] loads the same logits as the full checkpoint with layer 1 skipped, layers 10 and 11 loaded."""
    partial = _without_layers(checkpoint, tmp_path / "no-layer-1", [1])
    _, info = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32, output_loading_info=True)
    assert {k for k in info["missing_keys"] if k.startswith("model.layers.1.")}, "the file still holds layer 1"

    ref = _plain_with_skip(checkpoint, [1], device)
    model = lp_plugin.from_pretrained(partial, dtype=torch.float32, main_device=device, skip=[1], **options)
    handle = lp_plugin.get_handle(model)
    assert handle.info()["skipped_layers"] == [1] and handle.info()["skipped_without_weights"] == [1]
    names = _param_names(model)
    assert not {n for n in names if n.startswith("model.layers.1.")}
    assert {n for n in names if n.startswith("model.layers.10.")} and {n for n in names if n.startswith("model.layers.11.")}
    x = IDS.to(device)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    _, full = find_decoder_layers(ref)
    _, ours = find_decoder_layers(model)
    with lp_plugin.session(model):
        for i in (10, 11):
            for (name, p), (_, q) in zip(full[i].state_dict().items(), ours[i].state_dict().items()):
                assert torch.equal(p.to(device), q.to(device)), (i, name)


def test_the_full_checkpoint_with_a_skip_reports_nothing_missing_or_unused(checkpoint, device):
    """The skipped layers' tensors sit in the file unread, and transformers says nothing about them."""
    logger = logging.getLogger("transformers")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        model = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device=device, skip="1,3")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert not [m for m in records.messages if "UNEXPECTED" in m or "MISSING" in m], records.messages
    assert type(model) is type(AutoModelForCausalLM.from_config(model.config))  # the model's own class again
    ignored = re.compile("|".join(_skipping_class(type(model), "model.layers", (1,))._keys_to_ignore_on_load_unexpected))
    assert ignored.search("model.layers.1.mlp.up_proj.weight")
    assert not ignored.search("model.layers.10.mlp.up_proj.weight") and not ignored.search("model.layers.11.bias")
    assert [i for i, layer in enumerate(find_decoder_layers(model)[1]) if absent.is_absent(layer)] == [1, 3]


def test_the_device_holds_no_skipped_weights(checkpoint, device):
    """The model's parameters exclude the skipped layers: their bytes are missing from the total (and
    from the device's allocated memory on a GPU)."""
    gc.collect()
    before = torch.cuda.memory_allocated(device) if device.startswith("cuda") else None
    plain = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device=device, offload="none")
    full_alloc = torch.cuda.memory_allocated(device) - before if before is not None else None
    _, layers = find_decoder_layers(plain)
    layer_bytes = {i: sum(p.numel() * p.element_size() for p in layers[i].parameters()) for i in (2, 7)}
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    del plain, layers
    gc.collect()
    skipped = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device=device, offload="none", skip=[2, 7])
    params = list(skipped.parameters())
    assert {p.device.type for p in params} == {torch.device(device).type}
    assert sum(p.numel() * p.element_size() for p in params) == total - sum(layer_bytes.values())
    if before is not None:
        assert torch.cuda.memory_allocated(device) - before <= full_alloc - sum(layer_bytes.values())


class _Remembering:
    """A skip policy (through the plugin hook) that chooses layers 3 and 8 and keeps weak references to
    every tensor of them (on a GPU, layer 8 is offloaded: Accelerate holds it in host memory while the
    policy runs): once from_pretrained returns, nothing may hold them."""

    refs: list = []

    class Policy(lp_plugin.SkipPolicy):
        name = "remember"

        def select(self, ctx, count):
            _, layers = find_decoder_layers(ctx.model)
            chosen = [3, 8][:count]
            for i in chosen:
                hooks = accel.offload_hooks(layers[i])  # a layer Accelerate offloaded: its host copies too
                held = list(accel.hooked_values(layers[i], hooks)[0].values()) if hooks else []
                tensors = [*layers[i].parameters(), *layers[i].buffers(), *held]
                _Remembering.refs += [weakref.ref(t) for t in tensors]
            return chosen

    @hookimpl
    def register_skip_policies(self, register):
        register("remember", self.Policy)


@pytest.fixture
def remembering():
    plugins.reset_for_tests()
    plugins.load()
    plugins.pm.register(_Remembering(), name="remember-plugin")
    _Remembering.refs = []
    yield _Remembering
    plugins.reset_for_tests()


@pytest.mark.parametrize("stand_in", ["none", "linear"])
def test_a_skip_chosen_on_the_loaded_model_is_freed_once_chosen(checkpoint, device, remembering, stand_in):
    ids = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    model = lp_plugin.from_pretrained(
        checkpoint, dtype=torch.float32, main_device=device, offload="even", skip="remember:2", stand_in=stand_in, calib=ids
    )
    gc.collect()
    assert remembering.refs and all(r() is None for r in remembering.refs), "a skipped layer's tensor is still alive"
    handle = lp_plugin.get_handle(model)
    assert handle.info()["skipped_layers"] == [3, 8] and handle.info()["skipped_without_weights"] == [3, 8]
    if stand_in == "linear":
        assert handle.info()["stand_ins"] == {"3": "LinearStandIn", "8": "LinearStandIn"}
    ref = _plain_with_skip(checkpoint, [3, 8], device, stand_in=stand_in, calib=ids)  # the cached stand-ins
    x = IDS.to(device)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_explicit_layers_with_stand_ins_are_fitted_then_freed(checkpoint, device):
    """A stand-in is fitted to its layer's own output: the layer is loaded for the fit, then freed."""
    ids = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    model = lp_plugin.from_pretrained(
        checkpoint, dtype=torch.float32, main_device=device, skip=[1, 10], stand_in="mean", calib=ids
    )
    handle = lp_plugin.get_handle(model)
    assert handle.info()["skipped_without_weights"] == [1, 10]
    assert "released" in str(handle) and {n for n in _param_names(model) if n.startswith("model.layers.11.")}
    ref = _plain_with_skip(checkpoint, [1, 10], device, stand_in="mean", calib=ids)
    x = IDS.to(device)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


@pytest.mark.parametrize("store", ["dict", "loader"])
def test_accelerate_host_copies_are_freed_too(checkpoint, store):
    """A layer Accelerate offloaded keeps its values in the hook's weights map (a dict, or the state dict of
    the OffloadedWeightsLoader that dispatch_model makes); freeing the layer frees them."""
    from accelerate import cpu_offload
    from accelerate.utils import OffloadedWeightsLoader

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    _, layers = find_decoder_layers(model)
    state = {k: v.clone() for k, v in layers[4].state_dict().items()}
    refs = [weakref.ref(v) for v in state.values()]
    weights = state if store == "dict" else OffloadedWeightsLoader(state_dict=state)
    cpu_offload(layers[4], execution_device=torch.device("cpu"), state_dict=weights)
    del state, weights
    gc.collect()
    assert all(r() is not None for r in refs)  # held by the hook
    assert release(model, [4]) == [4]
    gc.collect()
    assert all(r() is None for r in refs)
    assert absent.is_absent(layers[4]) and not list(layers[4].parameters())
    assert release(model, [4]) == []


def test_a_model_without_some_weights_runs_only_with_them_skipped(checkpoint, device):
    model = lp_plugin.from_pretrained(checkpoint, dtype=torch.float32, main_device=device, skip=[1, 10])
    x = IDS.to(device)
    with torch.no_grad():
        expected = model(x).logits
    lp_plugin.get_handle(model).detach()
    with pytest.raises(AttachError), torch.no_grad():
        model(x)
    ids = list(range(256)) * 2
    for options in (dict(skip=[1]), dict(skip="bi:2", calib=ids), dict(skip=[1, 10], stand_in="mean", calib=ids)):
        with pytest.raises(AttachError):
            lp_plugin.attach(model, offload="none", **options)
        assert lp_plugin.get_handle(model) is None
    handle = lp_plugin.attach(model, offload="even", skip="1,10")
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    handle.detach()



def test_a_4bit_load_skips_the_same_way(checkpoint, device):
    """NF4 (quantized on the device on a GPU, offloaded layers by lp_plugin itself): layer 1 is never read,
    layers 10 and 11 (10 offloaded) quantized as a plain 4-bit load quantizes them."""
    pytest.importorskip("bitsandbytes")
    from lp_plugin.integrations.quant import nf4_config

    kwargs = dict(dtype=torch.bfloat16, quantization_config=nf4_config(torch.bfloat16))
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device, **kwargs).eval()
    lp_plugin.attach(ref, offload="none", skip=[1])
    model = lp_plugin.from_pretrained(checkpoint, main_device=device, offload="2,10", mode="stream", skip=[1], **kwargs)
    assert lp_plugin.get_handle(model).info()["skipped_without_weights"] == [1]
    assert not {n for n in _param_names(model) if n.startswith("model.layers.1.")}
    x = IDS.to(device)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
