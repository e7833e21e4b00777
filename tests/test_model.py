"""ImageBind-LLM model: parity with an independent naive implementation, zero-init
identity, trainable key sets per phase, gradients, loss semantics and input fusion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ibllm_lab import llama as llama_module
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.llama import Llama, meta_keys
from ibllm_lab.model import ImageBindLLM, format_prompt
from ibllm_lab.peft import adapter_keys, cast_frozen, mark_trainable, trainable_keys


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded; two threads on a shared 2-core machine
    spin-wait (measured: test_generation 5 s with one thread, 69 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LLAMA = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=61, multiple_of=16, max_seq_len=32)
ENC = 12


def adapter_cfg(**kw) -> AdapterConfig:
    values = dict(encoder_dim=ENC, query_layer=2, lora_rank=4, w_bias=True) | kw
    return AdapterConfig(**values)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (gates, LoRA up-projections and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or "norm_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("gate"):
                p.copy_(noise)
            else:
                p.copy_(0.15 * noise)


# -- an independent, naive implementation (reference-style numerics) ---------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_logits(sd, lc: LlamaConfig, ac: AdapterConfig | None, tokens, feats):
    """Complex-number rotary, explicit masked softmax, per-head loop for the adapter term."""

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def lora(x, module, proj):
        key = f"{module}.lora_{proj}_l1.weight"
        if key not in sd:
            return 0
        return x @ sd[key].T @ sd[f"{module}.lora_{proj}_l2.weight"].T

    pre = "llama." if ac is not None else ""
    B, T = tokens.shape
    H, hd, eps = lc.n_heads, lc.head_dim, lc.norm_eps
    h = sd[pre + "tok_embeddings.weight"][tokens]
    v = None
    if ac is not None:
        v = lin(feats, "image_bind_proj")
        for k in range(1, ac.bind_blocks + 1):
            n = _rms(v, sd[f"image_bind_norm_{k}.weight"], ac.bind_eps)
            up = F.silu(lin(n, f"image_bind_f1_{k}")) * lin(n, f"image_bind_f3_{k}")
            v = v + lin(up, f"image_bind_f2_{k}")
        if ac.injection == "input_token":
            h = torch.cat([v[:, None], h], 1)
            T += 1
    freqs = 1.0 / (lc.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    mask = torch.full((T, T), float("-inf")).triu(1)

    def rotate(x):  # (B, T, H, hd)
        xc = torch.view_as_complex(x.float().reshape(B, T, H, hd // 2, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    first = lc.n_layers - (ac.query_layer if ac is not None and ac.uses_prefix else 0)
    for layer in range(lc.n_layers):
        a, f = f"{pre}layers.{layer}.attention", f"{pre}layers.{layer}.feed_forward"
        x = _rms(h, sd[f"{pre}layers.{layer}.attention_norm.weight"], eps)
        q = (lin(x, a + ".wq") + lora(x, a, "wq")).view(B, T, H, hd)
        k = (lin(x, a + ".wk") + lora(x, a, "wk")).view(B, T, H, hd)
        val = (lin(x, a + ".wv") + lora(x, a, "wv")).view(B, T, H, hd)
        q, k = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2)
        val = val.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        out = torch.softmax(scores.float(), dim=-1) @ val  # (B, H, T, hd)
        if layer >= first:
            prefix = sd["prefix_query.weight"].view(ac.query_layer, ac.query_len, -1)
            tokens_a = prefix[layer - first][None] + v[:, None, :]  # (B, Q, dim)
            av_all = tokens_a @ sd[a + ".wv.weight"].T
            ak_all = tokens_a @ sd[a + ".wk.weight"].T
            heads = []
            for head in range(H):
                sl = slice(head * hd, (head + 1) * hd)
                av, ak = av_all[..., sl], ak_all[..., sl]  # (B, Q, hd)
                if ac.injection == "prefix_attention":
                    s = torch.softmax(q[:, head] @ ak.transpose(1, 2) / math.sqrt(hd), dim=-1)
                    term = torch.tanh(sd[a + ".gate"][0, head, 0, 0]) * s @ av
                elif ac.injection == "gated":
                    term = torch.tanh(sd[a + ".gate"][0, head, 0, 0]) * av
                else:
                    term = av
                heads.append(out[:, head] + term)
            out = torch.stack(heads, 1)
        out = out.transpose(1, 2).reshape(B, T, H * hd)
        h = h + lin(out, a + ".wo") + lora(out, a, "wo")
        x = _rms(h, sd[f"{pre}layers.{layer}.ffn_norm.weight"], eps)
        gated = F.silu(lin(x, f + ".w1") + lora(x, f, "w1")) * (
            lin(x, f + ".w3") + lora(x, f, "w3")
        )
        h = h + lin(gated, f + ".w2") + lora(gated, f, "w2")
    logits = _rms(h, sd[pre + "norm.weight"], eps) @ sd[pre + "output.weight"].T
    if ac is not None and ac.injection == "input_token":
        logits = logits[:, 1:]
    return logits


@pytest.mark.parametrize(
    "injection,query_len",
    [("gated", 1), ("prefix_attention", 3), ("ungated", 1), ("input_token", 1)],
)
def test_logits_match_naive_implementation(injection, query_len):
    torch.manual_seed(0)
    ac = adapter_cfg(injection=injection, query_len=query_len, query_layer=1)
    model = ImageBindLLM(LLAMA, ac)
    randomise(model)
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 9))
    feats = F.normalize(torch.randn(2, ENC), dim=-1)
    got = model.logits(tokens, feats)
    want = naive_logits(model.state_dict(), LLAMA, ac, tokens, feats)
    assert got.shape == (2, 9, LLAMA.vocab_size)
    assert (got - want).abs().max() < 1e-5


@pytest.fixture
def small_query_blocks(monkeypatch):
    """CPU causal attention in blocks of 3 queries, so that short test sequences take the
    block-by-block path that long ones take."""
    monkeypatch.setattr(llama_module, "CPU_QUERY_BLOCK", 3)


@pytest.mark.parametrize("phase", ["pretrain", "finetune", "none"])
@pytest.mark.parametrize("injection,query_len", [("gated", 1), ("prefix_attention", 2)])
def test_every_optimised_path_matches_naive_implementation(
    phase, injection, query_len, small_query_blocks
):
    """Frozen parameters switch on merged LoRA weights (pretrain, none); all layers injected
    (batched adapter terms); 13 tokens in blocks of 3 (block-by-block causal attention)."""
    torch.manual_seed(0)
    ac = adapter_cfg(injection=injection, query_len=query_len)
    model = ImageBindLLM(LLAMA, ac)
    randomise(model)
    mark_trainable(model, phase)
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 13))
    feats = F.normalize(torch.randn(2, ENC), dim=-1)
    want = naive_logits(model.state_dict(), LLAMA, ac, tokens, feats)
    assert (model.logits(tokens, feats) - want).abs().max() < 1e-5
    # a changed frozen weight (in place, as load_state_dict writes) is seen on the next call
    with torch.no_grad():
        model.llama.layers[1].attention.lora_wv_l2.weight.mul_(-2)
        model.llama.layers[0].feed_forward.w2.weight.add_(0.05)
    want = naive_logits(model.state_dict(), LLAMA, ac, tokens, feats)
    assert (model.logits(tokens, feats) - want).abs().max() < 1e-5


def _plain_loss(model: ImageBindLLM, tokens, labels, feats) -> torch.Tensor:
    """The straightforward loss: every logit, then cross-entropy ignoring label 0."""
    logits = model.logits(tokens, feats)[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=0
    )


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_optimised_training_step_equals_the_plain_loss_and_gradients(phase, small_query_blocks):
    """``forward`` skips unlabelled tail positions and runs the head only where labels are;
    loss and every trainable gradient equal the plain computation's."""
    torch.manual_seed(0)
    model = ImageBindLLM(LLAMA, adapter_cfg())
    randomise(model)
    names = mark_trainable(model, phase)
    tokens = torch.randint(3, LLAMA.vocab_size, (3, 14))
    labels = tokens.clone()
    labels[:, :4] = 0  # prompts
    labels[0, 10:] = 0  # padding: the tail after position 11 feeds no label at all
    labels[1, 9:] = 0
    labels[2, 12:] = 0
    labels[2, 6] = 0
    feats = F.normalize(torch.randn(3, ENC), dim=-1)
    params = dict(model.named_parameters())
    fast = model(tokens, labels, feats)
    fast_grads = torch.autograd.grad(fast, [params[n] for n in names])
    plain = _plain_loss(model, tokens, labels, feats)
    plain_grads = torch.autograd.grad(plain, [params[n] for n in names])
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)
    for name, got, want in zip(names, fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_base_llama_matches_naive_implementation():
    torch.manual_seed(1)
    llama = Llama(LLAMA)
    randomise(llama)
    tokens = torch.randint(0, LLAMA.vocab_size, (3, 11))
    want = naive_logits(llama.state_dict(), LLAMA, None, tokens, None)
    assert (llama(tokens) - want).abs().max() < 1e-5


def _base_and_model(ac: AdapterConfig, seed: int = 0) -> tuple[Llama, ImageBindLLM]:
    torch.manual_seed(seed)
    base = Llama(LLAMA)
    randomise(base, seed)
    model = ImageBindLLM(LLAMA, ac)
    model.llama.load_state_dict(base.state_dict(), strict=False)
    return base, model


@pytest.mark.parametrize("phase", ["all", "pretrain"])
@pytest.mark.parametrize("injection,query_len", [("gated", 1), ("prefix_attention", 2)])
def test_zero_init_equals_base_llama_for_any_input(injection, query_len, phase):
    ac = adapter_cfg(injection=injection, query_len=query_len)
    base, model = _base_and_model(ac)
    if phase != "all":
        mark_trainable(model, phase)  # frozen LoRA: the merged-weight path
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 7))
    want = base(tokens)
    for seed in range(3):
        feats = torch.randn(2, ENC, generator=torch.Generator().manual_seed(seed)) * 5
        assert torch.allclose(model.logits(tokens, feats), want, atol=1e-6, rtol=0)
    assert torch.allclose(model.logits(tokens, None), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("injection", ["ungated", "input_token"])
def test_modes_without_zero_gate_change_the_output(injection):
    base, model = _base_and_model(adapter_cfg(injection=injection))
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 7))
    assert (model.logits(tokens, torch.randn(2, ENC)) - base(tokens)).abs().max() > 1e-3


def test_feature_norm_standardises_then_normalises_and_keeps_zero_rows():
    """``feature_norm``: (x - mean) / std per dimension, L2-normalised, before the bind
    network; statistics from the non-zero rows; all-zero features (no perceptual input) stay
    zero, so zero gates still equal the base LLaMA and text-only stays text-only."""
    base, model = _base_and_model(adapter_cfg(feature_norm=True))
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, ENC, generator=g) * torch.linspace(0.1, 3, ENC) + 2
    model.set_feature_stats(torch.cat([train, torch.zeros(5, ENC)]))
    torch.testing.assert_close(model.feature_mean, train.mean(0))
    torch.testing.assert_close(model.feature_std, train.std(0))
    x = torch.cat([torch.randn(3, ENC, generator=g), torch.zeros(1, ENC)])
    want = torch.nn.functional.normalize((x[:3] - train.mean(0)) / train.std(0), dim=-1)
    got = model.normalise_features(x)
    torch.testing.assert_close(got[:3], want)
    assert torch.equal(got[3], torch.zeros(ENC))
    plain = ImageBindLLM(LLAMA, adapter_cfg())
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("feature_")}
    )
    torch.testing.assert_close(model.bind(x), plain.bind(got))
    tokens = torch.randint(0, LLAMA.vocab_size, (4, 5))
    torch.testing.assert_close(model.logits(tokens, x), base(tokens), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="feature_norm"):
        plain.set_feature_stats(train)


def test_feature_norm_statistics_travel_with_the_adapter_file(tmp_path):
    from ibllm_lab.checkpoint import (
        CheckpointError,
        infer_adapter_config,
        load_adapter,
        read_adapter_file,
        save_trainable,
    )

    _, model = _base_and_model(adapter_cfg(feature_norm=True))
    model.set_feature_stats(torch.randn(20, ENC) + 1)
    path = save_trainable(model, tmp_path / "adapter.pth")
    state, _ = read_adapter_file(path)
    assert infer_adapter_config(state, LLAMA).feature_norm is True
    fresh = ImageBindLLM(LLAMA, adapter_cfg(feature_norm=True))
    load_adapter(fresh, path)
    assert torch.equal(fresh.feature_mean, model.feature_mean)
    assert torch.equal(fresh.feature_std, model.feature_std)
    with pytest.raises(CheckpointError, match="unexpected keys: feature_mean, feature_std"):
        load_adapter(ImageBindLLM(LLAMA, adapter_cfg()), path)


def test_every_parameter_is_a_meta_weight_or_an_adapter_key():
    model = ImageBindLLM(LLAMA, adapter_cfg())
    base = {"llama." + k for k in meta_keys(LLAMA)}
    keys = set(model.state_dict())
    assert keys == base | adapter_keys(model)
    assert not {k for k in base if not k.endswith("norm.weight")} & adapter_keys(model)


def _expected_keys(phase: str) -> set[str]:
    if phase == "pretrain":
        keys = {"image_bind_proj.weight", "image_bind_proj.bias", "prefix_query.weight"}
        for k in (1, 2, 3):
            keys |= {f"image_bind_norm_{k}.weight"}
            keys |= {f"image_bind_f{i}_{k}.weight" for i in (1, 2, 3)}
        keys |= {f"llama.layers.{n}.attention.gate" for n in (0, 1)}
        return keys
    keys = {"llama.norm.weight"}
    for n in (0, 1):
        layer = f"llama.layers.{n}"
        keys |= {f"{layer}.attention_norm.weight", f"{layer}.ffn_norm.weight"}
        keys |= {f"{layer}.attention.wq.bias", f"{layer}.attention.wo.bias"}
        keys |= {f"{layer}.feed_forward.w{i}.bias" for i in (1, 2, 3)}
        for proj in ("wq", "wk", "wv", "wo"):
            keys |= {f"{layer}.attention.lora_{proj}_l{j}.weight" for j in (1, 2)}
        for proj in ("w1", "w2", "w3"):
            keys |= {f"{layer}.feed_forward.lora_{proj}_l{j}.weight" for j in (1, 2)}
    return keys


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_trainable_key_sets_are_exact(phase):
    model = ImageBindLLM(LLAMA, adapter_cfg())
    expected = _expected_keys(phase)
    assert trainable_keys(model, phase) == expected
    assert set(mark_trainable(model, phase)) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert mark_trainable(model, "none") == []
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown phase"):
        trainable_keys(model, "everything")


def test_pretrain_gradients_reach_gates_and_frozen_params_stay_unchanged():
    torch.manual_seed(0)
    model = ImageBindLLM(LLAMA, adapter_cfg())
    names = set(mark_trainable(model, "pretrain"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(3, LLAMA.vocab_size, (2, 8))
    feats = F.normalize(torch.randn(2, ENC), dim=-1)
    for step in range(2):
        optimiser.zero_grad()
        model(tokens, tokens, feats).backward()
        for n in (0, 1):
            gate = model.llama.layers[n].attention.gate
            assert gate.grad is not None and gate.grad.abs().sum() > 0
        if step == 1:  # once the gates are open, the bind network receives gradient too
            assert model.image_bind_f2_3.weight.grad.abs().sum() > 0
        optimiser.step()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert not torch.equal(
        model.llama.layers[0].attention.gate, before["llama.layers.0.attention.gate"]
    )


def test_loss_ignores_label_zero_and_matches_cross_entropy():
    torch.manual_seed(0)
    model = ImageBindLLM(LLAMA, adapter_cfg())
    randomise(model)
    tokens = torch.randint(3, LLAMA.vocab_size, (2, 6))
    labels = tokens.clone()
    labels[:, :3] = 0  # prompt positions
    feats = torch.randn(2, ENC)
    logits = model.logits(tokens, feats)
    want = F.cross_entropy(logits[:, 2:-1].reshape(-1, LLAMA.vocab_size), labels[:, 3:].reshape(-1))
    assert torch.allclose(model(tokens, labels, feats), want, atol=1e-6)
    empty = model(tokens, torch.zeros_like(tokens), feats)
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="labels"):
        model(tokens, labels[:, :-1], feats)


def test_text_only_is_zero_features_and_one_row_broadcasts():
    model = ImageBindLLM(LLAMA, adapter_cfg())
    randomise(model)
    tokens = torch.randint(3, LLAMA.vocab_size, (2, 5))
    assert torch.equal(model.logits(tokens, None), model.logits(tokens, torch.zeros(2, ENC)))
    one = torch.randn(1, ENC)
    assert torch.allclose(model.logits(tokens, one), model.logits(tokens, one.expand(2, ENC)))
    with pytest.raises(ValueError, match="expected"):
        model.logits(tokens, torch.randn(2, ENC + 1))


class LinearEncoder:
    """A real (tiny) encoder implementing the Encoder protocol: one linear map per modality."""

    def __init__(self, in_dim: int, out_dim: int):
        g = torch.Generator().manual_seed(3)
        self.embed_dim = out_dim
        self.maps = {m: torch.randn(in_dim, out_dim, generator=g) for m in ("Image", "Audio")}
        self.calls = []

    @property
    def modalities(self):
        return list(self.maps)

    def __call__(self, inputs):
        self.calls.append(sorted(m.value for m in inputs))
        return {m: F.normalize(x @ self.maps[m.value], dim=-1) for m, x in inputs.items()}


class MixingCache:
    """The method's cache formula over a fixed bank (a real VisualCache, no faiss)."""

    def __init__(self, bank: torch.Tensor):
        self.bank = F.normalize(bank, dim=-1)
        self.seen = None

    def __call__(self, query, cache_size, cache_t, cache_weight):
        self.seen = (cache_size, cache_t, cache_weight)
        sims, idx = (query @ self.bank.T).topk(cache_size, dim=-1)
        proto = F.normalize(
            (sims * cache_t).softmax(-1)[..., None].mul(self.bank[idx]).sum(1), dim=-1
        )
        return F.normalize((1 - cache_weight) * query + cache_weight * proto, dim=-1)


def test_encode_inputs_fuses_normalised_embeddings_with_normalised_weights():
    model = ImageBindLLM(LLAMA, adapter_cfg())
    a, b = torch.randn(2, ENC), torch.randn(2, ENC)
    fused = model.encode_inputs({"Image": [a, 1], "Audio": [b, 3]})
    want = F.normalize(a, dim=-1) * (1 / (4 + 1e-6)) + F.normalize(b, dim=-1) * (3 / (4 + 1e-6))
    assert torch.allclose(fused, want, atol=1e-6)
    with pytest.raises(ValueError, match="Image"):
        model.encode_inputs({"Image": [torch.randn(2, 7), 1]})


def test_encode_inputs_uses_attached_encoder_and_cache():
    encoder = LinearEncoder(5, ENC)
    cache = MixingCache(torch.randn(20, ENC))
    model = ImageBindLLM(LLAMA, adapter_cfg(), encoder=encoder, cache=cache)
    raw = torch.randn(3, 5)
    out = model.encode_inputs({"Image": [raw, 1]}, cache_size=4, cache_t=10, cache_weight=0.3)
    assert encoder.calls == [["Image"]] and cache.seen == (4, 10, 0.3)
    direct = F.normalize(raw @ encoder.maps["Image"], dim=-1) * (1 / (1 + 1e-6))
    assert torch.allclose(out, cache(direct, 4, 10, 0.3), atol=1e-6)
    no_cache = model.encode_inputs({"Image": [raw, 1]}, use_cache=False)
    assert torch.allclose(no_cache, direct, atol=1e-6)
    assert "encoder" not in dict(model.named_children())


def test_encode_inputs_passes_a_cache_gate_to_the_cache():
    from ibllm_lab.cache import CacheGate, TorchCache

    bank = F.normalize(torch.randn(30, ENC), dim=-1)
    cache = TorchCache(bank)
    model = ImageBindLLM(LLAMA, adapter_cfg(), cache=cache)
    # rows 0-1: cached vectors themselves (top-1 similarity 1, above the gate: kept);
    # rows 2-3: random directions (far from the bank: pulled with the full weight)
    emb = torch.cat([bank[:2], torch.randn(2, ENC)])
    gate = CacheGate(threshold=0.99, ramp=0.0)
    # cache_t 1: the prototype blends all 10 neighbours, so the method moves every row
    opts = {"cache_size": 10, "cache_t": 1.0, "cache_weight": 0.5}
    gated = model.encode_inputs({"Image": [emb, 1]}, **opts, cache_gate=gate)
    direct = F.normalize(emb, dim=-1) * (1 / (1 + 1e-6))
    assert torch.allclose(gated, cache(direct, 10, 1.0, 0.5, gate=gate), atol=1e-6)
    assert torch.allclose(gated[:2], F.normalize(direct[:2], dim=-1), atol=1e-6)
    method = model.encode_inputs({"Image": [emb, 1]}, **opts)
    assert torch.allclose(gated[2:], method[2:], atol=1e-6)
    assert not torch.allclose(gated[:2], method[:2], atol=1e-3)


def test_cast_frozen_keeps_trainable_fp32_and_runs_under_autocast():
    model = ImageBindLLM(LLAMA, adapter_cfg())
    mark_trainable(model, "finetune")
    cast_frozen(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["llama.layers.0.attention.lora_wq_l1.weight"] == torch.float32
    assert dtypes["llama.layers.0.attention.wq.weight"] == torch.bfloat16
    assert model.llama.rope.table.dtype == torch.float32
    tokens = torch.randint(3, LLAMA.vocab_size, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, tokens, torch.randn(2, ENC))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.llama.layers[1].attention.lora_wq_l1.weight.grad is not None


def test_adapter_config_validation():
    with pytest.raises(ValueError, match="query_len"):
        AdapterConfig(injection="gated", query_len=2)
    with pytest.raises(ValueError, match="injection"):
        AdapterConfig(injection="cross")
    with pytest.raises(ValueError, match="query_layer"):
        ImageBindLLM(LLAMA, adapter_cfg(query_layer=3))
    assert AdapterConfig.from_name("reference").query_layer == 32
    legacy = ImageBindLLM(LLAMA, adapter_cfg(bind_norm="layer"))
    assert "image_bind_f1_1.bias" in legacy.state_dict()
    assert "image_bind_norm_1.bias" in trainable_keys(legacy, "pretrain")


def test_format_prompt_is_the_alpaca_template():
    assert format_prompt("Describe the image.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDescribe the image.\n\n### Response:"
    )
    assert format_prompt("Translate", "bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n### Response:"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_logits_close_to_fp32():
    torch.manual_seed(0)
    model = ImageBindLLM(LLAMA, adapter_cfg())
    randomise(model)
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 9))
    feats = torch.randn(2, ENC)
    want = model.logits(tokens, feats)
    gpu = model.to("cuda", torch.bfloat16)
    assert gpu.llama.rope.table.dtype == torch.float32
    got = gpu.logits(tokens.cuda(), feats.cuda()).cpu()
    assert (got - want).abs().max() < 0.15


def test_tiny_presets_fit_together():
    llama = LlamaConfig.from_name("tiny", n_layers=2, vocab_size=97)
    adapter = AdapterConfig.from_name("tiny", query_layer=2)
    model = ImageBindLLM(llama, adapter)
    tokens = torch.randint(0, 97, (1, 5))
    assert model.logits(tokens, torch.randn(1, adapter.encoder_dim)).shape == (1, 5, 97)


def test_attaching_a_module_encoder_goes_through_the_property():
    """``model.encoder = some_nn_module`` must attach it (not register a submodule)."""
    from ibllm_lab.config import AdapterConfig, LlamaConfig
    from ibllm_lab.model import ImageBindLLM

    lcfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16)
    acfg = AdapterConfig(encoder_dim=8, query_layer=2, lora_rank=0)
    model = ImageBindLLM(lcfg, acfg)
    keys = set(model.state_dict())
    enc = torch.nn.Linear(8, 8)
    model.encoder = enc
    assert model.encoder is enc
    assert set(model.state_dict()) == keys
    model.encoder = None
    assert model.encoder is None
