"""Probe (GPU): (A) are SDPA calls without expanded keys/values bit-equal to transformers' repeat_kv path?
(B) the memory timeline of the NF4 2 GiB graph plan at 8192 tokens (no ballast): per forward and per module."""
import json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from decode_exactness import _card
from transformers.integrations.sdpa_attention import repeat_kv
out = {"A": {}, "B": {}}
dev = torch.device("cuda", 0)
MiB = 2**20
g = torch.Generator(device=dev).manual_seed(0)
def rnd(*s): return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
# ---------------- A
for b, L, filled in ((1, 8224, 8193), (2, 8224, 5000), (1, 2064, 2049)):
    H, KVH, d = 16, 2, 128
    q, K, V = rnd(b, H, 1, d), rnd(b, KVH, L, d), rnd(b, KVH, L, d)
    mask = torch.zeros(b, 1, 1, L, dtype=torch.bool, device=dev); mask[..., :filled] = True
    ref = F.scaled_dot_product_attention(q, repeat_kv(K, 8), repeat_kv(V, 8), attn_mask=mask)
    packed = F.scaled_dot_product_attention(q.reshape(b, KVH, 8, d), K, V, attn_mask=mask).reshape(b, H, 1, d)
    per = torch.cat([F.scaled_dot_product_attention(q[:, h:h+1], K[:, h//8:h//8+1], V[:, h//8:h//8+1], attn_mask=mask) for h in range(H)], 1)
    out["A"][f"decode b{b} L{L}"] = {"packed_equal": bool(torch.equal(packed, ref)), "packed_diff": float((packed-ref).abs().max()),
                                     "perhead_equal": bool(torch.equal(per, ref)), "perhead_diff": float((per-ref).abs().max())}
    # prefill with a materialized mask (left padding in a batch): causal over the first T of L keys
    T = min(L - 16, 4096)
    q2 = rnd(b, H, T, d)
    m2 = (torch.arange(L, device=dev)[None, :] <= torch.arange(T, device=dev)[:, None])[None, None].expand(b, 1, T, L).clone()
    m2[0, :, :, :3] = False; m2[0, :, :3, :] = False; m2[0, :, :3, 0] = True
    ref2 = F.scaled_dot_product_attention(q2, repeat_kv(K, 8), repeat_kv(V, 8), attn_mask=m2).transpose(1, 2).contiguous()
    from lp_plugin.core import static_attention as sa
    class M: num_key_value_groups = 8
    got2, _ = sa.attention_forward(M(), q2, K, V, m2)
    out["A"][f"prefill-masked b{b} T{T} L{L}"] = {"equal": bool(torch.equal(got2, ref2)), "diff": float((got2.float()-ref2.float()).abs().max())}
    print(out["A"], flush=True)
# ---------------- B
import lp_plugin
card = _card()
folder = card.shape_folder("qwen2.5-3b-shape", 0, "/dev/shm")
for ctx, mm in ((8192, sys.argv[2] if len(sys.argv) > 2 else "2GiB"),):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = lp_plugin.from_pretrained(folder, offload="auto", max_memory={0: mm}, max_context=ctx, decode="graph", **card._load_kwargs("nf4"))
    handle = lp_plugin.get_handle(model)
    plan = handle.plan.budget
    rec = {"plan": plan.summary()}
    events = []
    def pre(name):
        def f(mod, args, kwargs=None):
            torch.cuda.synchronize(); events.append((name, "in", torch.cuda.memory_allocated()/MiB)); torch.cuda.reset_peak_memory_stats()
        return f
    def post(name):
        def f(mod, args, output):
            events.append((name, "peak", torch.cuda.max_memory_allocated()/MiB, torch.cuda.memory_allocated()/MiB))
        return f
    inner = model.model
    last = inner.layers[-1]
    for name, m in (("attn35", last.self_attn), ("mlp35", last.mlp), ("attn0", inner.layers[0].self_attn), ("norm", inner.norm), ("lm_head", model.lm_head)):
        m.register_forward_pre_hook(pre(name)); m.register_forward_hook(post(name))
    ids = torch.randint(0, model.config.vocab_size, (1, ctx - 16), generator=torch.Generator().manual_seed(1)).to(dev)
    torch.cuda.synchronize(); base_alloc = torch.cuda.memory_allocated() / MiB
    free0, total = torch.cuda.mem_get_info()
    with torch.no_grad():
        o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    rec["base_alloc_mib"] = base_alloc
    rec["device_used_before_generate_mib"] = (total - free0) / MiB
    rec["after_generate"] = {"alloc": torch.cuda.memory_allocated()/MiB, "reserved": torch.cuda.memory_reserved()/MiB, "max_reserved": torch.cuda.max_memory_reserved()/MiB}
    rec["events"] = events[:40] + [("...",)] + events[-30:]
    rec["decode"] = handle.info().get("decode")
    try:
        from lp_plugin.planning.budget import describe
        rec["describe"] = describe(plan)
    except Exception as e:
        rec["describe"] = repr(e)
    out["B"][f"{ctx}:{mm}"] = rec
    print(json.dumps(rec, indent=0, default=str)[:6000], flush=True)
    del model; torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
