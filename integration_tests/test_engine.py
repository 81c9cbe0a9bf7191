"""The exactness table of the offload engine: (tiny Qwen2, tiny Llama) x (session, stream) x
(cpu, disk) x (fp32, bf16, nf4), each loaded through ``lp_plugin.from_pretrained`` and compared
with the plain model through ``generate()`` and its KV cache, plus alpha scaling, dropping,
attach/detach round trips and Accelerate interplay."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
from shapes import on_tier

import lp_plugin

DTYPES = {
    "fp32": lambda: {"dtype": torch.float32},
    "bf16": lambda: {"dtype": torch.bfloat16},
    "nf4": lambda: {"quantization_config": _nf4()},
}


def _nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _load_plain(path, dtype, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map=device, **DTYPES[dtype]()).eval()


def _generate(model, ids):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 7, 128, 64, 1, 33]])

TABLE = list(itertools.product(["qwen2", "llama"], ["session", "stream"], ["cpu", "disk"], ["fp32", "bf16", "nf4"]))


@pytest.mark.parametrize("arch,mode,tier,dtype", TABLE, ids=["-".join(c) for c in TABLE])
def test_alpha1_is_bit_identical_through_generate(tiny_checkpoints, tmp_path, device, arch, mode, tier, dtype):
    path = tiny_checkpoints[arch]
    ids = PROMPT.to(device)
    plain = _load_plain(path, dtype, device)
    with torch.no_grad():
        ref_logits = plain(ids).logits
    ref_seq, ref_gen = _generate(plain, ids)
    del plain

    model = lp_plugin.from_pretrained(path, offload="even", mode=mode, **on_tier(tier, tmp_path / "off"),
                                      main_device=device, **DTYPES[dtype]())
    handle = lp_plugin.get_handle(model)
    assert handle.info()["offloaded_layers"] == [2, 4]
    with torch.no_grad():
        logits = model(ids).logits
    seq, gen = _generate(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(gen, ref_gen)
    if tier == "disk":
        assert sorted(p.name for p in (tmp_path / "off").glob("layer_*.safetensors")) == [
            "layer_00002.safetensors", "layer_00004.safetensors"]
    # standby: no offloaded weight on the main device between sessions
    layer = model.model.layers[2]
    for p in layer.parameters():
        assert p.untyped_storage().nbytes() <= p.element_size() * 1 or p.device.type == "cpu"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_alpha_scales_the_residual(tiny_checkpoints, device, arch, mode):
    """alpha=0.5 gives x + 0.5 (L(x) - x) for each offloaded layer: checked against a hand-computed forward."""
    path = tiny_checkpoints[arch]
    plain = _load_plain(path, "fp32", device)
    ids = PROMPT.to(device)
    expected = _manual_forward(plain, ids, {2: 0.5, 4: 0.5})
    model = lp_plugin.from_pretrained(path, offload="2,4", mode=mode, alpha=0.5, main_device=device, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, plain(ids).logits, atol=1e-3)


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_alpha0_drops_layers_and_moves_nothing(tiny_checkpoints, tmp_path, device, mode):
    path = tiny_checkpoints["qwen2"]
    plain = _load_plain(path, "fp32", device)
    ids = PROMPT.to(device)
    expected = _manual_forward(plain, ids, {2: 0.0, 4: 0.0})
    model = lp_plugin.from_pretrained(path, offload="even", mode=mode, tier="disk", alpha=0, offload_folder=tmp_path,
                                      main_device=device, dtype=torch.float32)
    info = lp_plugin.get_handle(model).info()
    assert info["dropped_layers"] == [2, 4] and info["offloaded_layers"] == [] and info["offloaded_bytes"] == 0
    assert not list(tmp_path.glob("layer_*"))  # nothing written
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def _manual_forward(model, ids, alphas):
    """Reference forward that applies x + a (L(x) - x) by hand, layer by layer (no cache)."""
    base = model.model
    with torch.no_grad():
        h = base.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        pe = base.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), device=ids.device).triu(1)[None, None]
        for i, layer in enumerate(base.layers):
            out = layer(h, attention_mask=mask.to(h.dtype), position_ids=pos, position_embeddings=pe)
            out = out[0] if isinstance(out, tuple) else out
            a = alphas.get(i)
            h = out if a is None else h + a * (out - h)
        return model.lm_head(base.norm(h))


@pytest.mark.parametrize("tier,mode", list(itertools.product(["cpu", "disk"], ["session", "stream"])))
def test_attach_detach_round_trip(tmp_path, device, tier, mode):
    from conftest import build_tiny

    model = build_tiny("llama").to(device)
    ids = PROMPT.to(device)
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = lp_plugin.attach(model, offload="3-5", mode=mode, **on_tier(tier, tmp_path))
    assert lp_plugin.get_handle(model) is handle
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    handle.detach()
    assert lp_plugin.get_handle(model) is None
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) and after[k].device == before[k].device, k
    # detached weights are independent tensors again (save_pretrained refuses shared storage)
    ptrs = [p.data_ptr() for p in model.model.layers[4].parameters()]
    assert len(set(ptrs)) == len(ptrs)
    model.save_pretrained(tmp_path / "saved")
    assert not hasattr(model.model.layers[4], "_hf_hook")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_session_keeps_layers_resident_and_releases_on_error(device):
    from conftest import build_tiny

    model = build_tiny("qwen2").to(device)
    handle = lp_plugin.attach(model, offload="even", mode="session")
    w = model.model.layers[2].mlp.up_proj.weight
    standby_ptr = w.data_ptr()
    with lp_plugin.session(model):
        assert handle.in_session and w.data_ptr() != standby_ptr and w.device == torch.device(device)
        with lp_plugin.session(model):  # re-entrant
            model(PROMPT.to(device))
        assert handle.in_session
    assert not handle.in_session and w.data_ptr() == standby_ptr
    with pytest.raises(RuntimeError, match="boom"):
        with lp_plugin.session(model):
            raise RuntimeError("boom")
    assert not handle.in_session and w.data_ptr() == standby_ptr
    # a layer called directly outside a session is refused, not run on placeholder weights
    with pytest.raises(lp_plugin.AttachError, match="outside a session"):
        model.model.layers[2](torch.zeros(1, 3, 64, device=device))


@pytest.mark.parametrize("accel_tier", ["cpu", "disk"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_accelerate_dispatched_model_is_upgraded_and_restored(tmp_path, device, accel_tier, mode):
    """A model dispatched by Accelerate with our device map: attach takes its offload hooks over
    (they sit on the weight-owning submodules) and detach gives them back exactly.

    The untied tiny Llama: with tied embeddings on CUDA, Accelerate's own dispatched forward (before
    any attach) now and then computed with another module's weight on the H100 (its tied-parameter
    map is keyed by host data pointers, which get reused), failing this test in either mode."""
    from accelerate import dispatch_model
    from conftest import build_tiny

    from lp_plugin.core.accel import offload_hooks as accelerate_offload_hooks

    if accel_tier == "cpu" and not device.startswith("cuda"):
        pytest.skip("Accelerate adds no cpu-offload hooks when the main device is the cpu itself")
    model = build_tiny("llama")
    main = 0 if device.startswith("cuda") else "cpu"
    dmap = lp_plugin.residual_offload_device_map(model, offload="even", tier=accel_tier, main_device=main)
    dispatch_model(model, dmap, offload_dir=str(tmp_path / "accel"))
    with torch.no_grad():
        ref = model(PROMPT.to(device)).logits.cpu()  # the dispatched model's own logits
    n_hooks = len(accelerate_offload_hooks(model.model.layers[2]))
    assert n_hooks > 0

    def hook_state():
        return {(i, name): (id(h), dict(h.original_devices), set(h.tied_params_names))
                for i in (2, 4) for name, _, h in accelerate_offload_hooks(model.model.layers[i])}

    before = hook_state()
    handle = lp_plugin.attach(model, offload="even", mode=mode)
    assert not accelerate_offload_hooks(model.model.layers[2])
    with torch.no_grad():
        assert torch.equal(model(PROMPT.to(device)).logits.cpu(), ref)
    handle.detach()
    assert len(accelerate_offload_hooks(model.model.layers[2])) == n_hooks
    assert hook_state() == before  # the same hooks, in the same state
    assert {p.device.type for p in model.model.layers[2].parameters()} == {"meta"}
    with torch.no_grad():
        assert torch.equal(model(PROMPT.to(device)).logits.cpu(), ref)


def test_attach_takes_over_what_accelerate_offloads(tmp_path):
    """A model dispatched by Accelerate with other layers on the disk than the spec names: attach takes
    those over too (each computing where Accelerate ran it), exactly, and detach gives them back."""
    from accelerate import dispatch_model
    from conftest import build_tiny

    from lp_plugin.core.accel import offload_hooks

    model = build_tiny("llama")
    dispatch_model(model, lp_plugin.residual_offload_device_map(model, offload="odd", tier="disk", main_device="cpu"),
                   offload_dir=str(tmp_path / "accel"))
    with torch.no_grad():
        ref = model(PROMPT).logits
    handle = lp_plugin.attach(model, offload="even")
    assert handle.info()["offloaded_layers"] == [2, 3, 4]
    assert not any(offload_hooks(model.model.layers[i]) for i in (2, 3, 4))
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)
    handle.detach()
    assert offload_hooks(model.model.layers[3]) and not offload_hooks(model.model.layers[2])
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)


def test_info_describes_the_layout(tmp_path, device):
    from conftest import build_tiny

    model = build_tiny("qwen2", num_layers=12).to(device)
    handle = lp_plugin.attach(model, offload="odd", tier="disk", mode="stream", prefetch=2, offload_folder=tmp_path)
    info = handle.info()
    assert info["layers"] == [3, 5, 7] and info["tier"] == "disk" and info["mode"] == "stream"
    assert info["ring_slots"] == 3 and info["bytes_per_forward"] == info["offloaded_bytes"] > 0
    assert "layers=[3, 5, 7]" in repr(handle)
    handle.detach()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_disk_stream_lowers_the_gil_switch_interval_only_while_open(tmp_path, device, tier):
    """A disk-tier ring's reader thread must get the GIL back quickly: the switch interval is 0.5 ms
    while such a ring is open (nested and concurrent sessions too), restored after, and left alone
    by the cpu tier or when the user set a shorter one. (On a GPU the disk tier would lend its cached
    files to CUDA and need no reader thread: told not to here.)"""
    import sys

    from conftest import build_tiny

    model = build_tiny("qwen2").to(device)
    handle = lp_plugin.attach(model, offload="even", mode="stream", **on_tier(tier, tmp_path))
    handle.tier.pin_cached = False
    orig = sys.getswitchinterval()
    try:
        with lp_plugin.session(model):
            inside = sys.getswitchinterval()
            with lp_plugin.session(model), torch.no_grad():
                model(PROMPT.to(device))
                assert sys.getswitchinterval() == inside
        assert inside == pytest.approx(0.0005 if tier == "disk" else orig)
        assert sys.getswitchinterval() == orig
        sys.setswitchinterval(0.0001)
        with lp_plugin.session(model):
            assert sys.getswitchinterval() == pytest.approx(0.0001)
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(orig)
        handle.detach()


RING_CASES = [  # (offload spec, prefetch): k offloaded layers through prefetch+1 slots
    ("2", 0), ("2,4", 1), ("1,3,5", 1), ("1,2,3,4,5", 1), ("1,2,3,4,5", 2), ("1-6", 3), ("1,3,5", 5),
]


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("spec,prefetch", RING_CASES, ids=[f"{s}-p{p}" for s, p in RING_CASES])
def test_stream_ring_exact_for_any_layer_count_and_prefetch(tmp_path, device, tier, spec, prefetch):
    """Whether a layer keeps one ring slot (k % slots == 0) or moves between slots from one forward
    to the next, generate() equals the plain model's, inside one long session and across sessions,
    and leaving the session puts every offloaded tensor back on standby."""
    from conftest import build_tiny

    model = build_tiny("llama").to(device)
    ids = PROMPT.to(device)
    ref = _generate(model, ids)
    handle = lp_plugin.attach(model, offload=spec, mode="stream", prefetch=prefetch,
                              **on_tier(tier, tmp_path), protect_first=0, protect_last=0)
    with lp_plugin.session(model):
        for _ in range(2):
            got = _generate(model, ids)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    got = _generate(model, ids)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for layer in handle.layers:
        for p in layer.module.parameters():  # standby (host memory, or a placeholder owning no memory), not a ring slot
            assert p.device.type == "cpu" or p.untyped_storage().nbytes() <= p.element_size()
    handle.detach()
    assert torch.equal(_generate(model, ids)[1], ref[1])


def _qs_tensors(qs):
    from lp_plugin.core.flat import quant_state_tensors

    return [t for _, t in quant_state_tensors(qs)]


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_nf4_standby_holds_no_tensor_outside_the_tier(tiny_checkpoints, mode):
    """In standby every tensor an offloaded 4-bit layer reaches (weights, norms, the quant states'
    absmax/code/offset, nested too) is a view of its pinned host buffer, and the templates kept for
    rebinding hold meta tensors only. (The original quant-state tensors used to stay on the GPU:
    ~0.02 GiB of standby for Qwen2.5-3B.)"""
    model = lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", tier="cpu", mode=mode,
                                      main_device="cpu", quantization_config=_nf4())
    handle = lp_plugin.get_handle(model)
    for layer in handle.layers:
        host = handle.tier.host_view(layer.key)
        lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
        reached = []
        for module in layer.module.modules():
            for p in module.parameters(recurse=False):
                reached.append(p)
                if getattr(p, "quant_state", None) is not None:
                    reached += _qs_tensors(p.quant_state)
            if module.__dict__.get("quant_state") is not None:
                reached += _qs_tensors(module.__dict__["quant_state"])
        assert len(reached) > 20
        for t in reached:
            assert lo <= t.data_ptr() < hi, t.shape
        for qs in layer.layout._orig_qs.values():
            assert {t.device.type for t in _qs_tensors(qs)} == {"meta"}
    ids = PROMPT
    with torch.no_grad():
        model(ids)  # still runs from the templates
    handle.detach()


@pytest.mark.parametrize("store", ["dict", "loader"])
def test_attach_frees_the_host_copies_accelerate_held(store):
    """Accelerate keeps an offloaded module's values in host memory: in a dict (``cpu_offload``) or in the
    state dict of an ``OffloadedWeightsLoader`` (``dispatch_model`` with modules mapped to "cpu", as
    ``from_pretrained`` loads them). Attach takes those values over into its tier and drops Accelerate's
    copies; detach puts them back."""
    import weakref

    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict
    from conftest import build_tiny

    model = build_tiny("llama")
    with torch.no_grad():
        ref = model(PROMPT).logits
    names = ["model.layers.2", "model.layers.4"]
    state = extract_submodules_state_dict(model.state_dict(), names)
    weights = state if store == "dict" else OffloadedWeightsLoader(state_dict=state)
    for name in names:  # what dispatch_model does for these modules (their weights go to the meta device)
        attach_align_device_hook_on_blocks(
            model.get_submodule(name), execution_device="cpu", offload=True, weights_map=weights, module_name=name
        )
    assert {p.device.type for p in model.model.layers[2].parameters()} == {"meta"}
    refs = {k: weakref.ref(v) for k, v in state.items()}
    handle = lp_plugin.attach(model, offload="2,4")
    gc.collect()
    assert not state and all(r() is None for r in refs.values())  # the tier holds the only copy
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)
    handle.detach()
    assert set(state) == set(refs)  # Accelerate's copies are back, and its hooks run the layers again
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_model_dropped_while_attached_is_freed(tmp_path, device, tier, mode):
    """A user who drops an attached model (``del model``, no detach) gets its memory back: nothing global
    (the ring's op registry, the disk tier's reader thread) keeps the model, its ring or its tier alive."""
    import weakref

    from conftest import build_tiny

    from lp_plugin.core import ops

    model = build_tiny("qwen2").to(device)
    handle = lp_plugin.attach(model, offload="even", mode=mode, **on_tier(tier, tmp_path))
    with torch.no_grad():
        model(PROMPT.to(device))
    refs = [weakref.ref(model), weakref.ref(handle)]
    ring_id = handle.ring.id if mode == "stream" else None
    assert ring_id is None or ring_id in ops._rings
    del model, handle
    gc.collect()
    assert all(r() is None for r in refs)
    assert ring_id not in ops._rings
