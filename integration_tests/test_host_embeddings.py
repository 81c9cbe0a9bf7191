"""``embeddings="host"`` (``lp_plugin.core.host_embeddings``): the input embeddings and the lm_head in host memory give
the plain model's logits bit for bit (forward, and generate's scores at every step), with offloaded layers
in both modes; the lm_head is copied once per call, once per scoring pass, once per decode step; detach
puts the weights back as they were (a tied pair still one tensor); what cannot apply is refused before
anything changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from shapes import build_tiny

import lp_plugin
from lp_plugin.core import logprobs
from lp_plugin.core.accel import offload_hooks
from lp_plugin.errors import AttachError, OffloadSpecError
from lp_plugin.planning.config import OffloadConfig

STEPS = 4


def _untied_llama(seed=0):
    """A tiny Llama built from a LlamaConfig, lm_head untied from the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=8, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _smollm2():
    from transformers import AutoModelForCausalLM

    from lp_plugin.tools.bundled import bundled_model_path

    return AutoModelForCausalLM.from_pretrained(bundled_model_path()).eval()


MODELS = {"smollm2": _smollm2, "llama-untied": _untied_llama}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def pairs():
    """name -> (model to attach, the plain model), built once each."""
    return {name: (build(), build()) for name, build in MODELS.items()}


def _generate(model, ids):
    out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, out.scores


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_host_embeddings_are_exact(pairs, name, mode):
    model, plain = pairs[name]
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain(ids).logits
    ref_seq, ref_scores = _generate(plain, ids[:1])
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed.weight is head.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    handle = lp_plugin.attach(model, offload="even", mode=mode, embeddings="host")
    owner = handle.host_embeddings
    assert model.device == handle.plan.main_device and type(model).__name__ == type(plain).__name__
    assert handle.layer_indices and owner.tied == tied and (embed.weight is head.weight) == tied
    assert embed.weight.data_ptr() == head.weight.data_ptr() if tied else embed.weight.data_ptr() != head.weight.data_ptr()
    info = handle.info()
    assert info["embeddings"] == "host" and info["embeddings_tied"] == tied
    weight_bytes = embed.weight.numel() * embed.weight.element_size()
    assert info["embeddings_host_bytes"] == weight_bytes * (1 if tied else 2) == owner.host_bytes
    assert info["lm_head_bytes_per_call"] == weight_bytes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert owner.head_copies == 1
    seq, scores = _generate(model, ids[:1])
    assert torch.equal(seq, ref_seq) and len(scores) == STEPS
    for step, (got, want) in enumerate(zip(scores, ref_scores)):
        assert torch.equal(got, want), step
    assert owner.head_copies == 1 + STEPS  # one copy per decode step
    assert not owner._bound and owner._depth == 0  # no device copy outlives its call

    handle.detach()
    assert type(model) is type(plain)
    assert (embed.weight.data_ptr() == head.weight.data_ptr()) == tied and (embed.weight is head.weight) == tied
    assert not embed._forward_hooks and not head._forward_pre_hooks and "_lp_host_embeddings" not in head.__dict__
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_score_copies_the_head_once_per_pass(pairs):
    """score() runs the head once per chunk of positions; a head in host memory is copied once for all."""
    model, plain = pairs["llama-untied"]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    cap = 64 * 256 * 8  # 64 rows a chunk (float32 logits and log_softmax)
    with torch.no_grad():
        hidden = torch.cat([plain.model(ids).last_hidden_state.reshape(40, -1)] * 4)  # 160 positions: 3 chunks
    rows = torch.arange(160)
    targets = torch.randint(0, 256, (160, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = logprobs.score(logprobs.head_of(plain), hidden, rows, targets, cap=cap)
    handle = lp_plugin.attach(model, offload="none", embeddings="host")
    try:
        with torch.no_grad():
            got = logprobs.score(logprobs.head_of(model), hidden, rows, targets, cap=cap)
        assert handle.host_embeddings.head_copies == 1
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        handle.detach()


def test_compiled_forward_calls_the_head_copy_eagerly_and_never_recompiles(pairs):
    """A compiled forward (dynamo, eager backend) with the head in host memory gives the plain model's
    logits and does not recompile when a scoring block keeps the head resident (nested copies) and when it
    does not: the copy in and out runs outside the graph, so nothing it counts becomes a guard."""
    from lp_plugin.core.host_embeddings import resident

    model, plain = pairs["llama-untied"]
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    handle = lp_plugin.attach(model, offload="none", embeddings="host")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            want = plain(ids).logits
            assert torch.equal(compiled(ids).logits, want)
            with torch._dynamo.config.patch(error_on_recompile=True):
                with resident(model.lm_head):
                    assert torch.equal(compiled(ids).logits, want)
                assert torch.equal(compiled(ids).logits, want)
        assert handle.host_embeddings.head_copies == 3
    finally:
        handle.detach()
        torch._dynamo.reset()


def test_gemma3_scaled_embedding_keeps_its_own_forward():
    """Gemma 3 scales the lookup inside its embedding module: the module's forward runs on the host whole."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def build():
        torch.manual_seed(0)
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, num_hidden_layers=8, vocab_size=256, max_position_embeddings=256)
        return Gemma3ForCausalLM(config).eval()

    model, plain = build(), build()
    assert hasattr(model.get_input_embeddings(), "embed_scale")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    handle = lp_plugin.attach(model, offload="even", embeddings="host")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    handle.detach()


def test_accelerate_offloaded_embeddings_are_taken_over(tmp_path):
    """A model Accelerate dispatched with its embeddings and lm_head on the disk: attach takes their offload over (its hooks
    would move them back to the device on every call) and detach gives it back."""
    from accelerate import dispatch_model

    model = build_tiny("llama")
    dmap = lp_plugin.residual_offload_device_map(model, offload="none", main_device="cpu")
    dmap["model.embed_tokens"] = dmap["lm_head"] = "disk"
    dispatch_model(model, dmap, offload_dir=str(tmp_path / "accel"))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert offload_hooks(embed) and offload_hooks(head) and embed.weight.device.type == "meta"
    handle = lp_plugin.attach(model, offload="even", embeddings="host")
    assert not offload_hooks(embed) and not offload_hooks(head) and embed.weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    handle.detach()
    assert offload_hooks(embed) and offload_hooks(head) and embed.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_conversions_while_attached():
    model = _untied_llama()
    handle = lp_plugin.attach(model, offload="none", embeddings="host")
    model.to("cpu")  # the main device: nothing moves
    with pytest.raises(AttachError):
        model.half()
    assert model.get_input_embeddings().weight.dtype == torch.float32
    handle.detach()


class _ScaledHead(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("breakage", ["head_not_linear", "no_head"])
def test_what_cannot_apply_is_refused(breakage):
    model = _untied_llama()
    if breakage == "head_not_linear":
        old = model.lm_head
        model.lm_head = _ScaledHead(old.in_features, old.out_features, bias=False)
    else:
        model.get_output_embeddings = lambda: None
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(OffloadSpecError):
        lp_plugin.attach(model, offload="even", embeddings="host")
    assert lp_plugin.get_handle(model) is None
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params


@pytest.mark.parametrize("value", ["cpu", "offload", None, 1])
def test_bad_embeddings_option(value):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(embeddings=value)


# ---------------------------------------------------------------------------------------- planning
GIB = 2**30


def _shape_plan(name, memory, **options):
    from lp_plugin.tools.shapes import shape_config

    return lp_plugin.fit_budget(shape_config(name), weights="nf4", max_memory=memory, max_context=8192,
                                main_device="cuda", bandwidth=25, **options)


def _shape_footprint(name):
    from lp_plugin.planning import footprint
    from lp_plugin.tools.shapes import shape_config

    return footprint.from_config(shape_config(name), "nf4")


@pytest.mark.parametrize("name,memory", [("llama-3-8b-shape", "4GiB"), ("qwen2.5-3b-shape", "2GiB")])
def test_planner_moves_the_embeddings_only_when_nothing_else_fits(name, memory):
    from lp_plugin.planning.budget import _pinned

    fp = _shape_footprint(name)
    hf_bytes = fp.embed_bytes  # vocab x hidden in bf16, left unquantized by NF4
    assert fp.head_bytes == hf_bytes and fp.host_embedding_bytes == hf_bytes * (1 if fp.tied_head else 2)
    assert fp.tied_head == (name == "qwen2.5-3b-shape")
    plan = _shape_plan(name, memory)
    assert plan.embeddings == "host" and plan.peak_bytes <= plan.budget_bytes
    assert any(n.startswith("embeddings and lm_head stream from host memory") for n in plan.notes)
    assert plan.resolved(OffloadConfig(offload="auto")).embeddings == "host"
    # the weights on the device: everything but the embeddings, the lm_head and the offloaded layers
    resident = sum(b for i, b in enumerate(fp.layer_bytes) if i not in plan.offloaded)
    assert plan.breakdown["weights"] == plan.standby_bytes == fp.base_bytes - fp.host_embedding_bytes + resident
    assert sum(plan.breakdown.values()) == plan.peak_bytes
    head = plan.breakdown["head_buffer"]
    assert head == (fp.head_bytes if plan.phase == "lm_head" else 0)
    layers = sum(_pinned(fp.packed_bytes[i]) for i in plan.offloaded)
    assert plan.host_bytes == layers + _pinned(fp.embed_bytes) + (0 if fp.tied_head else _pinned(fp.head_bytes))
    # with room to spare the embeddings and lm_head stay on the device, and the card shows no lm_head copy
    roomy = _shape_plan(name, "24GiB")
    assert roomy.embeddings == "device" and "head_buffer" not in roomy.breakdown
    assert not any("embeddings and lm_head" in n for n in roomy.notes)
    # embeddings="host" asks for them there
    asked = _shape_plan(name, "24GiB", embeddings="host")
    assert asked.embeddings == "host" and asked.standby_bytes == roomy.standby_bytes - fp.host_embedding_bytes


def test_lm_head_phase_holds_the_head_copy():
    from lp_plugin.planning.footprint import Work, work_phases

    fp = _shape_footprint("llama-3-8b-shape")
    for work in (Work("generate", 8192, 1), Work("loglikelihood", 2048, 2)):
        on_device, on_host = work_phases(fp, work), work_phases(fp.on_host(), work)
        assert on_host["lm_head"] == {**on_device["lm_head"], "head_buffer": fp.head_bytes}
        assert on_host["prefill"] == {**on_device["prefill"], "head_buffer": 0}


def test_a_decode_step_holds_the_head_copy_and_on_a_static_cache_the_expanded_keys(monkeypatch):
    """The lm_head's copy is made as a decode step starts, so the step's attention runs beside it: where transformers
    expands a static cache's masked keys and values (2 x 16 heads x 8192 x 128 x 2 bytes for the Qwen2.5-3B shape),
    the step holds them too. The 2 GiB NF4 decode="graph" plan at 8192 tokens keeps no layer on the device (the
    eager one keeps three) and runs the prefill's MLPs in chunks, whose smaller blocks are what the graph's pool
    cannot reuse."""
    from lp_plugin.planning import footprint

    fp = _shape_footprint("qwen2.5-3b-shape").on_host()
    work = footprint.Work("generate", 8192, 1, static_cache=True)
    phases = {}
    for expands in (True, False):
        monkeypatch.setattr(footprint, "sdpa_expands_masked_decode", lambda expands=expands: expands)
        phases[expands] = footprint.work_phases(fp, work)["decode"]
    assert phases[True]["head_buffer"] == fp.head_bytes
    expanded = 2 * 16 * 8192 * 128 * 2 + 8192 * 3 - 2 * 2 * 8192 * 128 * 2  # the mask, less a layer's growth
    assert phases[True]["activations"] - phases[False]["activations"] == expanded
    monkeypatch.setattr(footprint, "sdpa_expands_masked_decode", lambda: True)
    graph, eager = (_shape_plan("qwen2.5-3b-shape", "2GiB", decode=d) for d in ("graph", "eager"))
    assert graph.phase == "decode" and len(graph.offloaded) == 36 and graph.mlp_chunk
    assert len(eager.offloaded) == 33 and eager.mlp_chunk is None


def test_planning_maps_the_host_embeddings_to_cpu():
    from lp_plugin.planning.plan import OffloadPlan
    from lp_plugin.tools.shapes import shape_config

    config = OffloadConfig(offload="auto", max_memory="4GiB", max_context=8192, main_device="cuda")
    plan = OffloadPlan.for_config(shape_config("llama-3-8b-shape"), config, weights="nf4")
    dmap = plan.device_map("cpu")
    assert plan.config.embeddings == "host" and plan.end_keys == ("model.embed_tokens", "lm_head")
    assert dmap["model.embed_tokens"] == dmap["lm_head"] == "cpu" and dmap["model.norm"] == 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_from_pretrained_auto_moves_the_embeddings_when_needed(tiny_checkpoints, arch):
    """On the CPU the budget is host memory: a max_memory just below the least the model needs with its
    embeddings on the device makes the planner move them, and the loaded model is the plain one, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lp_plugin.planning import budget, footprint

    path = tiny_checkpoints[arch]
    fp = footprint.from_config(AutoConfig.from_pretrained(path), "bf16")
    config = OffloadConfig(offload="auto", max_memory="1GiB", max_context=32, main_device="cpu")
    work = budget.work_of(config, fp)[0]
    card = budget.card_of(config.max_memory, torch.device("cpu"))[0]
    least = {where: min(o.peak for o in budget._options(fp, work, card, config) if o.embeddings == where)
             for where in ("device", "host")}
    assert least["host"] < least["device"]
    model = lp_plugin.from_pretrained(path, offload="auto", max_memory=least["device"] - 1, max_context=32)
    handle = lp_plugin.get_handle(model)
    assert handle.plan.budget.embeddings == handle.config.embeddings == "host" and handle.host_embeddings is not None
    assert handle.info()["budget"]["embeddings"] == "host"
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    handle.detach()
    fits = lp_plugin.from_pretrained(path, offload="auto", max_memory=least["device"], max_context=32)
    assert lp_plugin.get_handle(fits).host_embeddings is None and lp_plugin.get_handle(fits).config.embeddings == "device"


def test_report_device_makes_model_device_the_main_device():
    """transformers' ``model.device`` is the first parameter's (the input embeddings', in host memory with
    embeddings="host"); generate() moves each step's inputs there. While attached it reports the main device."""
    from lp_plugin.core.host_embeddings import report_device

    model = build_tiny("llama")
    cls = type(model)
    undo = report_device(model, torch.device("meta"))  # any device other than the parameters' own
    assert model.device == torch.device("meta") and isinstance(model, cls) and type(model) is not cls
    assert type(model).__name__ == cls.__name__ and type(model).__qualname__ == cls.__qualname__
    again = build_tiny("llama")
    undo_again = report_device(again, torch.device("meta"))
    assert type(again) is type(model)  # one subclass per (class, device)
    undo()
    undo_again()
    assert type(model) is cls and model.device == torch.device("cpu")
    plain = torch.nn.Linear(2, 2)
    report_device(plain, torch.device("meta"))()  # a module without a device property: left alone
    assert type(plain) is torch.nn.Linear
