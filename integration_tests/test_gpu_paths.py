"""CUDA-only checks of the fast paths: address-stable session buffers, compiled static-cache decoding
(transformers' CUDA-graph path) in session and stream mode staying exact across sessions with other
allocations in between, and prefill chunks equal to the whole window. Skipped without a GPU (CI); run on
the GPU machine."""

from __future__ import annotations

import pytest
import torch

import lp_plugin

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 7, 128, 64, 1, 33]])


def test_stable_buffer_keeps_its_address_and_frees_its_memory():
    from lp_plugin.core.vmm import StableBuffer, vmm_supported

    device = torch.device("cuda", torch.cuda.current_device())
    assert vmm_supported(device)
    buf = StableBuffer(512 << 20, device)
    free0 = torch.cuda.mem_get_info(device)[0]
    ptrs = []
    for i in range(3):
        t = buf.map()
        t.fill_(i)
        assert int(t[-1]) == i and buf.mapped_bytes >= 512 << 20
        assert torch.cuda.mem_get_info(device)[0] <= free0 - (500 << 20)
        ptrs.append(t.data_ptr())
        buf.unmap()
        junk = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # other allocations in between
        del junk
        torch.cuda.empty_cache()
        assert torch.cuda.mem_get_info(device)[0] >= free0 - (192 << 20)  # the 512 MiB went back
    assert len(set(ptrs)) == 1
    buf.close()


def test_stable_buffer_maps_into_memory_the_caching_allocator_holds_unused():
    from lp_plugin.core.vmm import StableBuffer

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    buf = StableBuffer(512 << 20, device)
    free = torch.cuda.mem_get_info(device)[0]
    junk = torch.empty(free - (256 << 20), dtype=torch.uint8, device=device)
    del junk  # freed, but kept by the caching allocator: the driver has under 512 MiB left
    assert torch.cuda.memory_reserved(device) >= free - (256 << 20)
    try:
        t = buf.map()
        t.fill_(7)
        assert int(t[0]) == 7 and buf.reclaims == 1
    finally:
        buf.close()
        torch.cuda.empty_cache()


def _generate_static(model, ids):
    out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, cache_implementation="static",
                         pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_compiled_static_decode_is_exact_across_sessions(mode):
    from shapes import build_tiny

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_tiny("llama", num_layers=8).to(device=device, dtype=torch.bfloat16)
    ids = PROMPT.to(device)
    ref = _generate_static(model, ids)  # the plain compiled model
    plain_compiled = hasattr(model, "_compiled_call")
    del model._compiled_call
    handle = lp_plugin.attach(model, offload="even", tier="cpu", mode=mode)
    addresses = []
    for i in range(3):
        junk = [torch.empty((i + 1) << 20, dtype=torch.uint8, device=device) for _ in range(4)]
        assert _generate_static(model, ids) == ref
        del junk
        addresses.append(handle.movers[0].buffer.tensor.data_ptr())  # the session buffer or the ring's
        assert not handle.in_session and handle.mapped_bytes == 0  # standby again: the memory is given back
    assert plain_compiled and hasattr(model, "_compiled_call")  # transformers compiled the offloaded model too
    assert len(set(addresses)) == 1
    handle.detach()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_two_gpu_base_map_is_exact(tmp_path, mode):
    """device_map="auto" across two GPUs kept as the base placement: the chosen layers move to the tier
    and each is brought back to the GPU that runs it; logits and generate() equal the plain model
    dispatched with the same base map."""
    from shapes import save_tiny
    from transformers import AutoConfig, AutoModelForCausalLM

    from lp_plugin.planning.plan import auto_base_map

    path = save_tiny("llama", tmp_path / "ckpt", dtype=torch.bfloat16, num_layers=12)
    base = auto_base_map(AutoConfig.from_pretrained(path), max_memory={0: "500KiB", 1: "2GiB"}, dtype=torch.bfloat16)
    assert {v for v in base.values()} == {0, 1}
    ids = PROMPT.cuda(0)
    plain = AutoModelForCausalLM.from_pretrained(path, device_map=base, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = plain(ids).logits
    ref_gen = plain.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = lp_plugin.from_pretrained(path, device_map=base, offload="even", mode=mode, dtype=torch.bfloat16)
    handle = lp_plugin.get_handle(model)
    assert {str(l.device) for l in handle.layers} == {"cuda:0", "cuda:1"}  # layers 2, 4 on GPU 0; 6, 8 on GPU 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref_gen)
    handle.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_scoring_without_full_logits_equals_lm_evals_full_logits(dtype, mode):
    """lp_plugin's lm-eval scoring (head chunk by chunk, more positions than one chunk) against lm-eval's
    own: log_softmax over the full logits of the same forward, bit for bit."""
    import torch.nn.functional as F
    from shapes import build_tiny

    from lp_plugin.core import logprobs

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_tiny("qwen2", num_layers=6, vocab_size=32000, max_positions=2048).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (2, 1500), generator=g).to(device)
    rows = torch.arange(2 * 1500 - 1, device=device)
    targets = torch.randint(0, 32000, (rows.shape[0], 3), generator=g).to(device)
    with torch.no_grad():
        full = F.log_softmax(model(ids).logits, dim=-1).reshape(-1, 32000)[rows]
        lp_plugin.attach(model, offload="even", tier="cpu", mode=mode)
        assert rows.shape[0] > logprobs.head_rows(32000, 2, 2)  # several head chunks
        values, greedy = logprobs.score_window(model, ids, rows, targets)
    assert torch.equal(values, full.gather(1, targets)) and torch.equal(greedy, full.argmax(dim=-1))
    lp_plugin.get_handle(model).detach()


def test_prefill_chunks_equal_the_whole_window_bit_for_bit():
    """Chunks of 1024 tokens through the KV cache attend through ``chunk_attention`` (the flash kernel,
    lower-right causal, keys and values as cached) and give the whole 4096-token window's final hidden
    states bit for bit where the whole window runs the flash kernel too: bf16, GQA (16 query heads, 2 KV
    heads of 128 dims); batch 2 x 16 heads x 1024 rows keep the GPU busy, so no chunk is split over its keys.
    (SDPA's default choice for a whole window may be another kernel, cuDNN's on an H200: then the
    chunks' values differ from it by bf16 rounding, as those of the masked SDPA path do.)"""
    from shapes import build_tiny
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lp_plugin.core import chunk_attention, logprobs

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_tiny("qwen2", num_layers=4, hidden_size=512, intermediate_size=1024, num_attention_heads=16,
                       num_key_value_heads=2, head_dim=128, vocab_size=1000, max_positions=4096)
    model = model.to(device=device, dtype=torch.bfloat16)
    decoder = logprobs.decoder_of(model)
    assert model.config._attn_implementation == "sdpa" and chunk_attention.applies(decoder, device)
    ids = torch.randint(0, 1000, (2, 4096), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        whole = torch.cat([h for _, h in logprobs.hidden_chunks(decoder, ids)], dim=1)
        chunks = list(logprobs.hidden_chunks(decoder, ids, 1024))
    assert [start for start, _ in chunks] == [0, 1024, 2048, 3072] and model.config._attn_implementation == "sdpa"
    chunked = torch.cat([h for _, h in chunks], dim=1)
    assert torch.equal(chunked, whole), f"max |diff| {(chunked.float() - whole.float()).abs().max().item()}"


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_no_recompile_between_per_call_and_nested_sessions(mode):
    """transformers' compiled static-cache decode guards on what the hooks read: switching between
    `with lp_plugin.session(model):` and per-call sessions must not recompile."""
    from shapes import build_tiny

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_tiny("llama", num_layers=8).to(device=device, dtype=torch.bfloat16)
    ids = PROMPT.to(device)
    handle = lp_plugin.attach(model, offload="even", tier="cpu", mode=mode)
    ref = _generate_static(model, ids)  # compiles, inside generate's own session
    assert _generate_static(model, ids) == ref
    with torch._dynamo.config.patch(error_on_recompile=True):
        with lp_plugin.session(model):
            assert _generate_static(model, ids) == ref
        assert _generate_static(model, ids) == ref
    handle.detach()


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_generate_with_host_embeddings_equals_the_plain_model(tiny_checkpoints, mode):
    """embeddings="host" on CUDA through generate(): transformers moves each step's inputs to ``model.device``,
    which must be the main device (not the host, where the input embeddings' weight is)."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints["llama"]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model = lp_plugin.from_pretrained(path, offload="even", mode=mode, embeddings="host", dtype=torch.float32,
                                      main_device=device)
    assert model.device == device and model.get_input_embeddings().weight.device.type == "cpu"
    ids = PROMPT.to(device)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    want, got = plain.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(want.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(want.logits, got.logits))
    handle = lp_plugin.get_handle(model)
    info = handle.info()
    # one copy of the lm_head per step; the 7 decode steps' copies started at their input embeddings, carried by
    # the ring in stream mode
    assert (info["lm_head_copies"], info["lm_head_copies_ahead"]) == (8, 7)
    assert sum(getattr(m, "carried", 0) for m in handle.gate.movers) == (7 if mode == "stream" else 0)
    # a decode step whose head never runs (the base model alone) leaves its copy behind: the next forward drops it
    # and copies the head at its call
    step = got.sequences[:, -1:]
    with torch.no_grad():
        model.model(input_ids=step)
        assert torch.equal(model(input_ids=got.sequences).logits, plain(input_ids=got.sequences).logits)
        # ... and a copy left behind is not used once the lm_head was edited in place since it started
        hidden = model.model(input_ids=step).last_hidden_state
        for m in (model, plain):
            m.lm_head.weight[0] += 1
        want = plain.lm_head(plain.model(input_ids=step).last_hidden_state)
        assert torch.equal(model.lm_head(hidden), want)
    assert handle.info()["lm_head_copies_ahead"] == 7
    handle.detach()
    assert type(model) is type(plain)
