"""The ImageBind-LLM parts that sit beside LLaMA (METHOD.md, data-flow steps 4-5).

- The bind network: ``image_bind_proj`` (encoder_dim -> dim, the only bias), then
  ``bind_blocks`` residual SwiGLU blocks ``x = x + f2(silu(f1(n)) * f3(n))``, ``n = norm(x)``.
- Injection into the last ``query_layer`` layers, selected by ``AdapterConfig.injection``:
  ``gated`` (attention-free, per-head ``tanh(gate)``, zero-initialised), ``prefix_attention``
  (``query_len`` adapter tokens with a gated softmax over them), ``ungated`` (the same
  addition with no gate) and ``input_token`` (one projected token prepended to the input).

These extend ``peft.py`` / ``llama.py`` by subclassing; parameter names equal the released
checkpoint's (``image_bind_*``, ``prefix_query``, ``llama.layers.N.attention.gate``).

For ``gated`` / ``ungated`` the term does not depend on the token, so ``AdapterLlama`` computes
it for every injected layer at once (one batched matmul through the stacked frozen ``wv``)
before running the layers, instead of a handful of small operations inside each layer.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.llama import DerivedCache, Device, KVCache, LayerKV, Llama, RMSNorm, repeat_kv
from ibllm_lab.peft import PEFTAttention, PEFTBlock

__all__ = ["AdapterAttention", "AdapterBlock", "AdapterLlama", "ImageBindAdapter"]

_LORA_UP = re.compile(r"\.lora_w\w+_l2\.weight$")
TOKEN_FREE = ("gated", "ungated")  # injections whose term is the same for every token


class AdapterAttention(PEFTAttention):
    """Attention of an injected layer: adds the adapter term to every token's per-head
    attention output before ``wo``.

    The adapter tokens go through the layer's own frozen ``wv`` (and ``wk`` for
    ``prefix_attention``) without LoRA, bias or rotary, exactly as the reference.
    """

    def __init__(self, cfg: LlamaConfig, adapter: AdapterConfig, device: Device = None, dtype=None):
        super().__init__(cfg, adapter.lora_rank, adapter.w_bias, device, dtype)
        self.injection = adapter.injection
        if adapter.gated:
            # zero gate: at initialisation the layer is exactly the base LLaMA layer
            self.gate = nn.Parameter(torch.zeros(1, cfg.n_heads, 1, 1, device=device, dtype=dtype))

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, L, n_kv_heads * hd) -> (B, n_heads, L, hd)``."""
        B, L, _ = y.shape
        y = y.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        return repeat_kv(y, self.n_heads // self.n_kv_heads)

    def adapter_output(self, q: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        """The term added to the attention output: ``q (B, H, T, hd)``, ``adapter (B, L, dim)``
        -> ``(B, H, T, hd)`` (or ``(B, H, 1, hd)``, broadcast over tokens)."""
        adapter = adapter.to(self.wv.weight.dtype)
        value = self._heads(self.wv(adapter))  # (B, H, L, hd)
        if self.injection == "prefix_attention":
            key = self._heads(self.wk(adapter))  # (B, H, L, hd)
            scores = q @ key.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, H, T, L)
            weights = self.gate.tanh() * F.softmax(scores.float(), dim=-1).type_as(q)
            return weights @ value  # (B, H, T, hd)
        if self.injection == "gated":
            return self.gate.tanh() * value  # one adapter token: its softmax weight is 1
        return value  # "ungated"

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        start_pos: int = 0,
        cache: LayerKV | None = None,
        adapter: torch.Tensor | None = None,
        term: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, T, dim)`` -> ``(B, T, dim)``, given either the adapter tokens ``adapter
        (B, query_len, dim)`` or, for token-free injections, the precomputed ``term
        (B, H, 1, hd)`` (``AdapterLlama.adapter_terms``); neither: no injection."""
        q, k, v = self.qkv(x, rope)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        out = self.attend(q, k, v, start_pos)  # (B, H, T, hd)
        if term is None and adapter is not None:
            term = self.adapter_output(q, adapter)
        if term is not None:
            out = out + term
        return self.merge(out)


class AdapterBlock(PEFTBlock):
    """A PEFT block; in the last ``query_layer`` layers its attention takes adapter tokens."""

    def __init__(
        self,
        layer_id: int,
        cfg: LlamaConfig,
        device: Device = None,
        dtype=None,
        *,
        adapter: AdapterConfig,
    ):
        injected = adapter.uses_prefix and layer_id >= cfg.n_layers - adapter.query_layer
        attention = AdapterAttention(cfg, adapter, device, dtype) if injected else None
        super().__init__(layer_id, cfg, device, dtype, adapter.lora_rank, adapter.w_bias, attention)
        self.injected = injected

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        start_pos: int = 0,
        cache: LayerKV | None = None,
        adapter: torch.Tensor | None = None,
        term: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.attention_norm(x)
        if self.injected:
            h = x + self.attention(normed, rope, start_pos, cache, adapter, term)
        else:
            h = x + self.attention(normed, rope, start_pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class AdapterLlama(Llama):
    """LLaMA whose layers carry PEFT parameters and whose last ``query_layer`` layers take
    adapter tokens. State-dict keys: Meta's plus bias / LoRA / gate keys."""

    def __init__(self, cfg: LlamaConfig, adapter: AdapterConfig, device: Device = None, dtype=None):
        extra = 1 if adapter.injection == "input_token" else 0
        block = partial(AdapterBlock, adapter=adapter)
        super().__init__(cfg, device, dtype, make_block=block, extra_positions=extra)
        self.adapter_cfg = adapter
        self.first_injected = cfg.n_layers - adapter.query_layer if adapter.uses_prefix else None
        self._stacked_wv = DerivedCache()

    def injected_attention(self) -> list[AdapterAttention]:
        return [layer.attention for layer in self.layers if layer.injected]

    def adapter_terms(self, adapters: torch.Tensor) -> torch.Tensor:
        """Token-free injections: ``adapters (query_layer, B, 1, dim)`` -> every injected
        layer's term ``(query_layer, B, H, 1, hd)``, ``tanh(gate_l) * W_v,l(a_l)`` split into
        heads (``gated``; ``ungated`` without the gate), in one batched matmul."""
        attn = self.injected_attention()
        weights = [a.wv.weight for a in attn]  # each (Hkv * hd, dim)
        if any(w.requires_grad for w in weights):
            stacked = torch.stack(weights)
        else:  # frozen (as the method trains): stacked once
            stacked = self._stacked_wv.get(weights, lambda: torch.stack(weights))
        Lq, B = adapters.shape[:2]
        tokens = adapters.to(stacked.dtype).view(Lq, B, -1)  # (Lq, B, dim)
        values = torch.bmm(tokens, stacked.transpose(1, 2))  # (Lq, B, Hkv * hd)
        a = attn[0]
        values = values.view(Lq * B, 1, -1)
        heads = a._heads(values).view(Lq, B, a.n_heads, 1, a.head_dim)  # (Lq, B, H, 1, hd)
        if self.adapter_cfg.injection == "ungated":
            return heads
        return torch.stack([a.gate for a in attn]).tanh() * heads  # gates: (Lq, 1, H, 1, 1)

    def run(
        self,
        h: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``h (B, T, dim)``; ``adapters (query_layer, B, query_len, dim)`` for the injected
        layers, in order, or None (plain LLaMA with PEFT)."""
        rope = self.rope(start_pos, h.shape[1])
        terms = None
        if adapters is not None and self.adapter_cfg.injection in TOKEN_FREE:
            terms = self.adapter_terms(adapters)  # (Lq, B, H, 1, hd)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache[i]
            if adapters is None or not layer.injected:
                h = layer(h, rope, start_pos, kv)
            elif terms is not None:
                h = layer(h, rope, start_pos, kv, term=terms[i - self.first_injected])
            else:
                h = layer(h, rope, start_pos, kv, adapters[i - self.first_injected])
        return h


class ImageBindAdapter(nn.Module):
    """Bind network + prefix query + the adapted LLaMA (``.llama``): the trainable network
    of ImageBind-LLM without the tokenizer / encoder / cache plumbing (``model.py``)."""

    def __init__(
        self,
        llama_cfg: LlamaConfig,
        adapter_cfg: AdapterConfig,
        device: Device = None,
        dtype=None,
    ):
        super().__init__()
        adapter_cfg.check_against(llama_cfg)
        self.llama_cfg, self.adapter_cfg = llama_cfg, adapter_cfg
        self._build_bind_network(device, dtype)
        if adapter_cfg.feature_norm:
            d = adapter_cfg.encoder_dim
            self.register_buffer("feature_mean", torch.zeros(d, device=device))
            self.register_buffer("feature_std", torch.ones(d, device=device))
        if adapter_cfg.uses_prefix:
            n_tokens = adapter_cfg.query_layer * adapter_cfg.query_len
            self.prefix_query = nn.Embedding(n_tokens, llama_cfg.dim, device=device, dtype=dtype)
        self.llama = AdapterLlama(llama_cfg, adapter_cfg, device, dtype)

    def _build_bind_network(self, device: Device, dtype) -> None:
        """``image_bind_proj`` and ``image_bind_{norm,f1,f2,f3}_{k}``, k = 1..bind_blocks
        (names equal to the released checkpoint's)."""
        cfg, dim = self.adapter_cfg, self.llama_cfg.dim
        hidden = cfg.bind_hidden_ratio * dim
        legacy = cfg.bind_norm == "layer"  # legacy variant: LayerNorm and biases
        kw = {"device": device, "dtype": dtype}
        self.image_bind_proj = nn.Linear(cfg.encoder_dim, dim, **kw)
        for k in range(1, cfg.bind_blocks + 1):
            norm = (
                nn.LayerNorm(dim, cfg.bind_eps, **kw)
                if legacy
                else RMSNorm(dim, cfg.bind_eps, **kw)
            )
            setattr(self, f"image_bind_norm_{k}", norm)
            setattr(self, f"image_bind_f1_{k}", nn.Linear(dim, hidden, bias=legacy, **kw))
            setattr(self, f"image_bind_f2_{k}", nn.Linear(hidden, dim, bias=legacy, **kw))
            setattr(self, f"image_bind_f3_{k}", nn.Linear(dim, hidden, bias=legacy, **kw))

    def set_feature_stats(self, feats: torch.Tensor) -> None:
        """``feature_norm``'s statistics from ``feats (N, encoder_dim)`` (the pre-training
        features; all-zero rows, text-only examples, are left out)."""
        if not self.adapter_cfg.feature_norm:
            raise ValueError("set_feature_stats needs AdapterConfig.feature_norm=True")
        feats = feats.detach().float()
        feats = feats[feats.norm(dim=-1) > 0]
        if len(feats) < 2:
            raise ValueError(f"need at least 2 non-zero features, got {len(feats)}")
        with torch.no_grad():
            self.feature_mean.copy_(feats.mean(0))
            self.feature_std.copy_(feats.std(0).clamp(min=1e-6))

    def normalise_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``feature_norm`` (identity when off): ``(B, encoder_dim)`` standardised with the
        stored statistics and L2-normalised; all-zero rows stay zero."""
        if not self.adapter_cfg.feature_norm:
            return feats
        x = feats.float()
        z = F.normalize((x - self.feature_mean) / self.feature_std, dim=-1)
        return torch.where(x.norm(dim=-1, keepdim=True) > 0, z, torch.zeros_like(z))

    def bind(self, feats: torch.Tensor) -> torch.Tensor:
        """The bind network: ``(B, encoder_dim) -> (B, dim)`` (after ``feature_norm``)."""
        feats = self.normalise_features(feats)
        x = self.image_bind_proj(feats.to(self.image_bind_proj.weight.dtype))
        for k in range(1, self.adapter_cfg.bind_blocks + 1):
            norm, f1, f2, f3 = (
                getattr(self, f"image_bind_{p}_{k}") for p in ("norm", "f1", "f2", "f3")
            )
            n = norm(x)
            x = x + f2(F.silu(f1(n)) * f3(n))
        return x

    def adapter_tokens(self, v: torch.Tensor) -> torch.Tensor:
        """``a_l = v + prefix_query[l]``: ``v (B, dim)`` -> ``(query_layer, B, query_len, dim)``."""
        cfg = self.adapter_cfg
        prefix = self.prefix_query.weight.view(cfg.query_layer, cfg.query_len, -1)  # (Lq, Q, dim)
        return prefix[:, None] + v[None, :, None, :]

    def hidden(
        self,
        tokens: torch.Tensor,
        v: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states ``(B, T, dim)`` of ``tokens (B, T)`` at ``start_pos`` conditioned on
        the bound feature ``v (B, dim)``, aligned with ``tokens`` in every mode."""
        h = self.llama.tok_embeddings(tokens)  # (B, T, dim)
        if self.adapter_cfg.injection != "input_token":
            return self.llama.run(h, start_pos, cache, self.adapter_tokens(v))
        # input_token: the projected token occupies position 0, text positions shift by one
        if start_pos > 0:
            return self.llama.run(h, start_pos + 1, cache)
        h = torch.cat([v[:, None, :].to(h.dtype), h], dim=1)  # (B, 1 + T, dim)
        return self.llama.run(h, 0, cache)[:, 1:]

    def reset_adapter_parameters(self) -> None:
        """Initialise every adapter parameter as construction does: bind network, prefix query
        and LoRA down-projections with PyTorch's defaults, norms to one, gates, LLaMA biases
        and LoRA up-projections to zero (so the model equals the base LLaMA), and
        ``feature_norm``'s statistics to mean 0, std 1. Used
        after building on the meta device, where nothing is initialised."""
        with torch.no_grad():
            for name, module in self.named_modules():
                if name.startswith("image_bind_") or name == "prefix_query" or ".lora_" in name:
                    if isinstance(module, RMSNorm):
                        module.weight.fill_(1.0)
                    else:
                        module.reset_parameters()
            for name, param in self.llama.named_parameters():
                if name.endswith((".gate", ".bias")) or _LORA_UP.search(name):
                    param.zero_()
            if self.adapter_cfg.feature_norm:  # identity statistics until set_feature_stats
                self.feature_mean.zero_()
                self.feature_std.fill_(1.0)

    @property
    def extra_positions(self) -> int:
        """Positions the injection adds to the sequence (KV cache length)."""
        return 1 if self.adapter_cfg.injection == "input_token" else 0
