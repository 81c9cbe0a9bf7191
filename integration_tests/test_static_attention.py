"""lp_plugin.core.static_attention: attention by query head and row block gives transformers' SDPA values."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lp_plugin.core import static_attention as sa


class _Attn(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _inputs(batch=2, heads=4, kv_heads=2, q=20, length=24, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q, dim, generator=g)
    key = torch.randn(batch, kv_heads, length, dim, generator=g)
    value = torch.randn(batch, kv_heads, length, dim, generator=g)
    mask = (torch.arange(length)[None, :] <= torch.arange(q)[:, None])[None, None].expand(batch, 1, q, length).clone()
    mask[0, :, :, :3] = False  # the first sequence is left-padded by 3
    mask[0, :, :3, 0] = True  # (its padded rows see something, as transformers' masks make them)
    return query, key, value, mask


@pytest.mark.parametrize("rows", [4, 7, 8])
def test_row_blocks_and_heads_give_sdpas_values(monkeypatch, rows):
    monkeypatch.setattr(sa, "QUERY_ROWS", rows)
    query, key, value, mask = _inputs()
    assert sa.covers(query, key, mask, 0.0, {})
    got, _ = sa.attention_forward(_Attn(), query, key, value, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(_Attn(), query, key, value, mask, scaling=0.3)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_calls_it_does_not_cover_run_transformers_sdpa(monkeypatch):
    monkeypatch.setattr(sa, "QUERY_ROWS", 4)
    query, key, value, mask = _inputs()
    step = query[:, :, -1:], mask[:, :, -1:]
    assert not sa.covers(step[0], key, step[1], 0.0, {})  # one position
    assert not sa.covers(query, key, None, 0.0, {})  # no mask (transformers' is_causal path)
    assert not sa.covers(query, key, mask, 0.1, {})  # dropout
    assert not sa.covers(query, key, mask, 0.0, {"position_bias": torch.zeros(1)})
    got, _ = sa.attention_forward(_Attn(), step[0], key, value, step[1])
    want, _ = sdpa_attention_forward(_Attn(), step[0], key, value, step[1])
    assert torch.equal(got, want)


def test_the_switch_is_restored_after_an_exception():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(cfg)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError):
        with sa.static_prefill_attention(model):
            assert model.config._attn_implementation == sa.NAME
            raise RuntimeError("inside")
    assert model.config._attn_implementation == before
    assert not sa.applies(model, torch.device("cpu"))
