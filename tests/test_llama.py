"""LLaMA backbone: configuration, rotary parity with Meta's complex form, KV-cache decoding,
Meta key names, dtype handling."""

from __future__ import annotations

import json

import pytest
import torch

import ibllm_lab.llama as llama_module
from ibllm_lab.config import LlamaConfig
from ibllm_lab.llama import (
    KVCache,
    Llama,
    RMSNorm,
    apply_rotary,
    causal_attention,
    is_meta_weight,
    meta_keys,
    rope_tables,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded; two threads on a shared 2-core machine
    spin-wait (measured: test_generation 5 s with one thread, 69 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=24)


def test_presets_and_derived_values():
    seven = LlamaConfig.from_name("7B")
    assert (seven.dim, seven.n_layers, seven.n_heads, seven.vocab_size) == (4096, 32, 32, 32000)
    assert seven.ffn_hidden_dim == 11008 and seven.head_dim == 128 and seven.norm_eps == 1e-6
    tiny = LlamaConfig.from_name("tiny", n_layers=2)
    assert tiny.n_layers == 2
    with pytest.raises(ValueError, match="unknown llama preset"):
        LlamaConfig.from_name("13T")
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_name("tiny", width=3)
    assert (
        LlamaConfig(
            dim=64, n_layers=1, n_heads=4, vocab_size=9, multiple_of=32, ffn_dim_multiplier=1.3
        ).ffn_hidden_dim
        == 224
    )


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"dim": 30}, "divisible"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"dim": 24, "n_heads": 8}, "even"),
    ],
)
def test_config_validation(changes, match):
    values = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 50} | changes
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**values)


def test_params_json_round_trip_and_vocab_minus_one(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(CFG.to_params_json()))
    assert LlamaConfig.from_params_json(path, max_seq_len=24) == CFG
    meta = {
        "dim": 32,
        "multiple_of": 16,
        "n_heads": 4,
        "n_layers": 2,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    }
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_params_json(path)
    cfg = LlamaConfig.from_params_json(path, vocab_size=50)
    assert cfg.norm_eps == 1e-5 and cfg.vocab_size == 50


def test_rotary_equals_metas_complex_form():
    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 16
    x = torch.randn(B, T, H, hd)
    table = rope_tables(hd, 20, 10000.0)
    start = 5
    got = apply_rotary(x, table[start : start + T])
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(20, hd // 2), torch.outer(torch.arange(20), freqs).float())
    assert (table - freqs_cis).abs().max() < 1e-6
    # the pairwise rotation written out with cos / sin, independently of complex numbers
    cos, sin = freqs_cis.real[start : start + T, None], freqs_cis.imag[start : start + T, None]
    re, im = x[..., 0::2], x[..., 1::2]
    want = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(3)
    assert (got - want).abs().max() < 1e-6
    half = apply_rotary(x.half(), table[:T])
    assert half.dtype == torch.float16


def test_rmsnorm_normalises_in_fp32():
    norm = RMSNorm(8, eps=1e-6)
    x = (torch.randn(3, 8) * 300).half()
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    assert torch.equal(norm(x), want * norm.weight.half())


def test_state_dict_keys_are_metas():
    llama = Llama(CFG)
    assert list(llama.state_dict()) == meta_keys(CFG)
    assert all(is_meta_weight(k) for k in meta_keys(CFG))
    assert not is_meta_weight("layers.0.attention.wq.bias")
    assert not is_meta_weight("layers.0.attention.lora_wq_l1.weight")


def test_block_causal_attention_equals_one_causal_sdpa_call():
    """The CPU path for long sequences (query blocks attending only up to their end)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 8, requires_grad=True) for _ in range(3))
    got = causal_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_incremental_kv_cache_decoding_equals_full_forward(n_kv_heads, block, monkeypatch):
    if block is not None:  # the full forward attends block by block, as long inputs do
        monkeypatch.setattr(llama_module, "CPU_QUERY_BLOCK", block)
    torch.manual_seed(0)
    cfg = CFG.replace(n_kv_heads=n_kv_heads)
    llama = Llama(cfg)
    llama.init_weights(std=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    full = llama(tokens)
    cache = llama.new_cache(batch_size=2, max_len=12)
    assert cache[0].k.shape == (2, cfg.kv_heads, 12, cfg.head_dim)
    pieces = [llama(tokens[:, :5], 0, cache)]  # prefill
    pieces.append(llama(tokens[:, 5:8], 5, cache))  # a chunk with an explicit mask
    pieces += [llama(tokens[:, t : t + 1], t, cache) for t in range(8, 12)]  # one at a time
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5
    step = llama.decode_step(tokens[:, :3], 0, llama.new_cache(2, 12))
    assert step.shape == (2, cfg.vocab_size) and step.dtype == torch.float32
    assert (step - full[:, 2]).abs().max() < 1e-5


def test_kv_cache_overflow_and_batch_errors():
    llama = Llama(CFG)
    cache = KVCache.allocate(CFG, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        llama(torch.zeros(1, 5, dtype=torch.long), 0, cache)
    with pytest.raises(ValueError, match="batch"):
        llama(torch.zeros(2, 2, dtype=torch.long), 0, cache)


def test_embeddings_input_equals_token_input():
    llama = Llama(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, 6))
    assert torch.equal(llama(tokens), llama(embeddings=llama.tok_embeddings(tokens)))
    with pytest.raises(ValueError, match="exactly one"):
        llama()


def test_rotary_tables_stay_fp32_after_casts_and_to_empty():
    llama = Llama(CFG).to(torch.bfloat16)
    assert llama.rope.table.dtype == torch.float32
    table = rope_tables(CFG.head_dim, 2 * CFG.max_seq_len, CFG.rope_theta)
    assert torch.equal(llama.rope.freqs, table)
    with torch.device("meta"):
        lazy = Llama(CFG)
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.rope.freqs, table)


def test_init_weights_touches_only_meta_weights():
    llama = Llama(CFG)
    g = torch.Generator().manual_seed(0)
    llama.init_weights(std=0.02, generator=g)
    assert llama.norm.weight.eq(1).all()
    assert 0.015 < llama.output.weight.std() < 0.025


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kv_cache_decoding_in_bf16():
    torch.manual_seed(0)
    llama = Llama(CFG, device="cuda", dtype=torch.bfloat16)
    llama.init_weights(std=0.1)
    tokens = torch.randint(0, CFG.vocab_size, (2, 10), device="cuda")
    full = llama(tokens).float()
    cache = llama.new_cache(2, 10)
    steps = [llama(tokens[:, :4], 0, cache)] + [
        llama(tokens[:, t : t + 1], t, cache) for t in range(4, 10)
    ]
    assert (torch.cat(steps, 1).float() - full).abs().max() < 0.1
