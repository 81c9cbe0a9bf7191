"""``decode="graph"`` (``lp_plugin/core/graphs.py``): decode steps captured once per session and replayed as CUDA
graphs. The option's refusals run everywhere; the replays are checked on a GPU against the plain model's own eager
static-cache decode, token for token and logit for logit, in every mode (bf16 and NF4), and a capture that fails
falls back to eager steps without changing a token."""

from __future__ import annotations

import pytest
import torch

import lp_plugin
from lp_plugin.errors import OffloadSpecError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64, 1, 33]
NEW = 12


# ---------------------------------------------------------------------------------- refusals (any machine)
def test_decode_takes_eager_or_graph_only():
    assert lp_plugin.OffloadConfig(decode="graph").decode == "graph"
    assert lp_plugin.OffloadConfig.from_strings({"decode": "graph"}).decode == "graph"
    for bad in ("graphs", "GRAPH", None, True, 1):
        with pytest.raises(OffloadSpecError):
            lp_plugin.OffloadConfig(decode=bad)


def test_graph_decode_off_cuda_is_refused_before_the_model_changes():
    from shapes import build_tiny

    model = build_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OffloadSpecError):
        lp_plugin.attach(model, offload="even", main_device="cpu", decode="graph")
    assert lp_plugin.get_handle(model) is None and "forward" not in model.__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_graph_decode_off_cuda_is_refused_before_loading(tiny_checkpoints, monkeypatch):
    import transformers

    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the option was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", main_device="cpu", decode="graph")


@cuda
def test_graph_decode_with_a_disk_ring_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(OffloadSpecError):
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], offload="even", tier="disk", mode="stream",
                                  offload_folder=str(tmp_path), main_device="cuda:0", decode="graph")


# ---------------------------------------------------------------------------------- replays (GPU)
def _generate(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _plain(path, device, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map={"": device.index}, **kw).eval()


def _nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _load_kwargs(dtype):
    if dtype == "nf4":
        pytest.importorskip("bitsandbytes")
        return {"quantization_config": _nf4(), "dtype": torch.bfloat16}
    return {"dtype": torch.bfloat16}


CONFIGS = [
    dict(offload="none"),
    dict(offload="even", mode="session"),
    dict(offload="all", protect_first=0, protect_last=0, mode="stream", prefetch=1),
    dict(offload="even", mode="stream", embeddings="host"),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["bf16", "nf4"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_replayed_decode_equals_the_plain_models_eager_decode(tiny_checkpoints, arch, dtype):
    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints[arch]
    kw = _load_kwargs(dtype)
    plain = _plain(path, device, **kw)
    ids = torch.tensor([PROMPT], device=device)
    want_seq, want_logits = _generate(plain, ids, cache_implementation="static", disable_compile=True)
    del plain
    for options in CONFIGS:
        model = lp_plugin.from_pretrained(path, main_device=device, decode="graph", **options, **kw)
        handle = lp_plugin.get_handle(model)
        for call in range(2):  # each generate() is a session of its own: captured again
            seq, logits = _generate(model, ids)  # (a static cache by default under decode="graph")
            assert torch.equal(seq, want_seq), (options, call)
            assert torch.equal(logits, want_logits), (options, call)
            stats = handle.info()["decode"]
            # NEW - 1 decode steps a call: the first eager, the second captured, every one after it replayed
            assert stats["captured"] == call + 1 and stats["failed"] == {}, (options, stats)
            assert stats["eager_steps"] == call + 1 and stats["replayed"] == (call + 1) * (NEW - 2), (options, stats)
        handle.detach()  # the model's own forward and generate again (Accelerate's, where it dispatched the model)
        assert not hasattr(model.forward, "decode_graphs") and not hasattr(model.generate, "decode_graphs")
        assert torch.equal(_generate(model, ids, cache_implementation="static", disable_compile=True)[0], want_seq)
        del model, handle
        torch.cuda.empty_cache()


@pytest.mark.gpu
@cuda
def test_batched_decode_with_left_padding_is_replayed_exactly(tiny_checkpoints):
    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints["llama"]
    plain = _plain(path, device, dtype=torch.bfloat16)
    ids = torch.tensor([PROMPT, [0, 0, 0, 0] + PROMPT[:8]], device=device)
    mask = torch.tensor([[1] * 12, [0] * 4 + [1] * 8], device=device)
    want = _generate(plain, ids, attention_mask=mask, cache_implementation="static", disable_compile=True)
    model = lp_plugin.from_pretrained(path, main_device=device, decode="graph", offload="even", mode="stream",
                                      dtype=torch.bfloat16)
    got = _generate(model, ids, attention_mask=mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert lp_plugin.get_handle(model).info()["decode"]["replayed"] == NEW - 2


@pytest.mark.gpu
@cuda
def test_a_step_that_cannot_be_captured_runs_eagerly_and_stays_exact(tiny_checkpoints):
    """A layer that reads a value back to the host (here: a no-op decided by ``.item()``) cannot be captured; the
    failure is counted, the ring forgets the loads issued inside the capture, and every step runs eagerly."""
    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints["qwen2"]
    plain = _plain(path, device, dtype=torch.bfloat16)
    ids = torch.tensor([PROMPT], device=device)
    want = _generate(plain, ids, cache_implementation="static", disable_compile=True)
    model = lp_plugin.from_pretrained(path, main_device=device, decode="graph", offload="all", protect_first=0,
                                      protect_last=0, mode="stream", dtype=torch.bfloat16)
    layer = model.model.layers[3]

    def syncing(module, args, output):
        return output if float(output[0].float().abs().sum().item()) >= 0 else None

    hook = layer.register_forward_hook(syncing)
    got = _generate(model, ids)
    hook.remove()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    stats = lp_plugin.get_handle(model).info()["decode"]
    assert stats["captured"] == 0 and stats["replayed"] == 0 and sum(stats["failed"].values()) == 1
    assert stats["eager_steps"] == NEW - 1


@pytest.mark.gpu
@cuda
def test_graphs_go_with_the_session_and_bare_forwards_stay_eager(tiny_checkpoints):
    from transformers import StaticCache

    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints["llama"]
    model = lp_plugin.from_pretrained(path, main_device=device, decode="graph", offload="even", mode="stream",
                                      dtype=torch.bfloat16)
    handle = lp_plugin.get_handle(model)
    ids = torch.tensor([PROMPT], device=device)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(input_ids=ids, past_key_values=cache)
        for _ in range(3):  # outside a session each forward is a session of its own: nothing to replay
            model(input_ids=ids[:, :1], past_key_values=cache)
    assert handle.info()["decode"]["captured"] == 0
    free = torch.cuda.mem_get_info(device)[0]
    with torch.no_grad(), lp_plugin.session(model):
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(input_ids=ids, past_key_values=cache)
        for _ in range(4):
            out = model(input_ids=ids[:, :1], past_key_values=cache)
        assert handle.graphs is not None and len(handle.graphs._steps) == 1
        assert out.logits.shape == (1, 1, model.config.vocab_size)
    assert handle.graphs._steps == {} and handle.info()["decode"]["replayed"] == 3
    assert torch.cuda.mem_get_info(device)[0] >= free - (64 << 20)  # the graph's memory went with the session
