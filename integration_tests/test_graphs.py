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
    stats = handle.info()["decode"]
    assert stats["captured"] == 0 and sum(n for why, n in stats["not_graphed"].items() if "session" in why) == 3
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


# ---------------------------------------------------------------------------------- what a step reads (any machine)
def _cache_kw(model, cache):
    import inspect

    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}


def _prefilled(arch="llama", **config):
    from shapes import build_tiny
    from transformers import StaticCache

    model = build_tiny(arch, **config)
    cache = StaticCache(config=model.config, max_cache_len=32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        model(input_ids=ids, **_cache_kw(model, cache))
    return model, cache, ids


def test_a_decode_step_with_a_static_cache_is_read_into_leaves():
    from lp_plugin.core.graphs import step_inputs

    model, cache, ids = _prefilled()
    cpu = torch.device("cpu")
    for name in ("past_key_values", "cache"):  # (transformers renamed the keyword)
        kwargs = {"input_ids": ids[:, -1:], name: cache, "attention_mask": torch.ones(1, 13, dtype=torch.long),
                  "position_ids": torch.tensor([[12]]), "use_cache": True, "logits_to_keep": 1}
        signature, leaves, rest = step_inputs((), kwargs, cpu, embed_ids=False)
        assert set(leaves) == {("input_ids",), ("attention_mask",), ("position_ids",)}
        mask = leaves[("attention_mask",)]
        assert mask.shape == (1, 32) and mask[0, :13].eq(1).all() and mask[0, 13:].eq(0).all()  # padded as transformers pads
        assert rest["attention_mask"] is mask and rest[name] is cache
        again, _, _ = step_inputs((ids[:, :1],), {k: v for k, v in kwargs.items() if k != "input_ids"}, cpu, False)
        assert again == signature  # positional ids, the same shapes: the same graph
    # with host embeddings the ids are looked up outside the graph: not a leaf
    _, leaves, _ = step_inputs((), {"input_ids": ids[:, -1:], "past_key_values": cache}, cpu, embed_ids=True)
    assert ("input_ids",) not in leaves
    # a prefill is not a decode step
    assert step_inputs((), {"input_ids": ids, "past_key_values": cache}, cpu, False) is None


def test_decode_steps_no_graph_can_replay_say_why():
    from transformers import DynamicCache, StaticCache

    from lp_plugin.core.graphs import static_layers, step_inputs

    model, cache, ids = _prefilled()
    cpu, step = torch.device("cpu"), ids[:, -1:]
    reasons = [
        step_inputs((), {"input_ids": step}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": DynamicCache(config=model.config)}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": cache, "output_hidden_states": True}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": cache, "labels": step}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": cache, "return_dict": False}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": cache, "extra": object()}, cpu, False),
        step_inputs((), {"input_ids": step, "past_key_values": cache}, torch.device("meta"), False),
    ]
    assert all(isinstance(r, str) and r for r in reasons), reasons
    # a sliding-window layer keeps its position in a Python int, which a replay would not advance
    sliding, _, _ = _prefilled("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    windowed = StaticCache(config=sliding.config, max_cache_len=32)
    assert static_layers(windowed) is None and static_layers(cache) is not None
    assert isinstance(step_inputs((), {"input_ids": step, "past_key_values": windowed}, cpu, False), str)


def test_a_reordered_cache_is_another_graph():
    """Beam search replaces the cache's tensors each step: a graph captured on the old ones must not replay."""
    from lp_plugin.core.graphs import step_inputs

    model, cache, ids = _prefilled()
    kwargs = {"input_ids": ids[:, -1:], "past_key_values": cache}
    before = step_inputs((), kwargs, torch.device("cpu"), False)[0]
    cache.reorder_cache(torch.tensor([0]))
    assert step_inputs((), kwargs, torch.device("cpu"), False)[0] != before


def _graphs(model):
    from lp_plugin.core.gate import SessionGate
    from lp_plugin.core.graphs import DecodeGraphs

    return DecodeGraphs(SessionGate([], {"forwards": 0}), model, "cuda:0")


def test_generate_gets_a_static_cache_where_nothing_else_was_asked_for():
    from shapes import build_tiny
    from transformers import GenerationConfig

    model = build_tiny("llama")
    graphs = _graphs(model)
    assert graphs.generate_options((PROMPT,), {}) == ((PROMPT,), {"cache_implementation": "static",
                                                                  "disable_compile": True})
    # what the caller chose stays: a cache, another implementation, no cache, decoding that reorders or
    # replaces the cache, compilation
    for kwargs in ({"past_key_values": object()}, {"cache": object()}, {"cache_implementation": "dynamic"},
                   {"use_cache": False}, {"num_beams": 3}, {"assistant_model": object()},
                   {"prompt_lookup_num_tokens": 3}, {"penalty_alpha": 0.6}):
        assert "cache_implementation" not in graphs.generate_options((), kwargs)[1] or kwargs.get(
            "cache_implementation") == "dynamic", kwargs
    assert graphs.generate_options((), {"disable_compile": False})[1]["disable_compile"] is False
    # a generation config passed in (positionally or by name) is copied and changed, never the caller's own
    for position in (True, False):
        config = GenerationConfig(cache_implementation="dynamic", max_new_tokens=4)
        args, kwargs = graphs.generate_options((PROMPT, config) if position else (PROMPT,),
                                               {} if position else {"generation_config": config})
        got = args[1] if position else kwargs["generation_config"]
        assert got is not config and got.cache_implementation == "dynamic" and got.disable_compile is True
        assert config.disable_compile is not True and set(kwargs) <= {"generation_config"}
    # a model with sliding-window layers keeps its cache: a static sliding window cannot be replayed
    sliding = build_tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "cache_implementation" not in _graphs(sliding).generate_options((), {})[1]
