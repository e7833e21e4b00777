"""Fast decoding for ``ImageBindLLM``: static shapes, fewer operations, CUDA graphs.

The plain decoder (``model.py``) runs the model's modules with Python-int positions and a
growing key/value slice, so every step has new shapes and launches every small operation
from Python. ``FastGenerator`` computes the same function with shapes fixed per
``(batch, length)``:

- a preallocated KV cache written with ``index_copy_`` at a position *tensor*, and
  attention over the whole cache with a mask ``key_pos <= pos`` (one SDPA call);
- rotary tables gathered by that position tensor;
- the adapter term ``tanh(gate_l) * W_v(a_l)`` of each injected layer computed once per
  generation, not in every layer at every step (``prefix_attention`` still needs the query);
- ``pack=True``: ``wq|wk|wv`` and ``w1|w3`` concatenated into one matrix each with LoRA
  merged in (a copy of the weights: the default on CPU, where it halves the operations);
  ``pack=False`` uses the model's own weights, and LoRA pairs that are exactly zero (as
  before fine-tuning) are skipped;
- on CUDA the one-token step is captured once per ``(batch, length)`` as a CUDA graph and
  replayed (``cuda_graph=True``); optionally ``torch.compile`` of that step.

Decoding itself is ``generation.iter_tokens``, the one loop for every decoder (the engine is
a ``generation.Decoder``); ``ImageBindLLM.generate`` uses this engine by default.
``tests/test_bench.py`` checks that it gives the plain decoder's tokens (greedy, sampled,
EOS, unequal prompts) and its logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ibllm_lab.generation import generate_ids
from ibllm_lab.llama import KVCache, apply_rotary, repeat_kv, rms_norm

__all__ = ["FastGenerator"]

# static (batch, length) slots kept at once: each holds a KV cache (at 7B, batch 16 x 512
# positions: 4 GiB) and a captured graph; generations of other shapes evict the oldest
MAX_SLOTS = 2


def _lora_delta(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``l2 @ l1`` (fp32) of projection ``name``'s LoRA pair, or None without (or all-zero)."""
    if not getattr(module, "lora_rank", 0):
        return None
    up = getattr(module, f"lora_{name}_l2").weight
    if not bool(up.any()):
        return None
    return up.float() @ getattr(module, f"lora_{name}_l1").weight.float()


@dataclass
class _Proj:
    """One projection, possibly several packed into one matrix: ``x W^T + b`` (+ LoRA),
    split into ``splits`` output widths."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    splits: list[int]
    lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (down, up) weights

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            y = y + F.linear(F.linear(x, self.lora[0]), self.lora[1])
        return y.split(self.splits, dim=-1) if len(self.splits) > 1 else (y,)


def _packed(module: torch.nn.Module, names: Sequence[str]) -> _Proj:
    """``names``' weights concatenated, LoRA merged in, missing biases as zeros."""
    weights, biases = [], []
    for name in names:
        linear = getattr(module, name)
        delta = _lora_delta(module, name)
        w = (
            linear.weight
            if delta is None
            else (linear.weight.float() + delta).to(linear.weight.dtype)
        )
        weights.append(w)
        biases.append(linear.bias)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                torch.zeros_like(w[:, 0]) if b is None else b
                for w, b in zip(weights, biases, strict=True)
            ]
        )
    return _Proj(
        torch.cat(weights).detach(),
        None if bias is None else bias.detach(),
        [w.shape[0] for w in weights],
    )


def _separate(module: torch.nn.Module, name: str) -> _Proj:
    """The module's own weights; its LoRA pair only when not exactly zero."""
    linear = getattr(module, name)
    lora = None
    if _lora_delta(module, name) is not None:
        lora = (
            getattr(module, f"lora_{name}_l1").weight,
            getattr(module, f"lora_{name}_l2").weight,
        )
    bias = None if linear.bias is None else linear.bias.detach()
    return _Proj(linear.weight.detach(), bias, [linear.weight.shape[0]], lora)


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: list[_Proj]
    wo: _Proj
    w13: list[_Proj]
    w2: _Proj
    attention: torch.nn.Module  # for the adapter term (its own frozen wv / wk, no LoRA)
    injected: bool


def _layer(block: torch.nn.Module, pack: bool) -> _Layer:
    attn, ffn = block.attention, block.feed_forward
    if pack:
        qkv, w13 = [_packed(attn, ("wq", "wk", "wv"))], [_packed(ffn, ("w1", "w3"))]
        qkv[0].splits = [sum(qkv[0].splits[:2]), qkv[0].splits[2]]  # rotate q|k in one go
        wo, w2 = _packed(attn, ("wo",)), _packed(ffn, ("w2",))
    else:
        qkv = [_separate(attn, n) for n in ("wq", "wk", "wv")]
        w13 = [_separate(ffn, n) for n in ("w1", "w3")]
        wo, w2 = _separate(attn, "wo"), _separate(ffn, "w2")
    return _Layer(
        block.attention_norm.weight.detach(),
        block.ffn_norm.weight.detach(),
        qkv,
        wo,
        w13,
        w2,
        attn,
        bool(getattr(block, "injected", False)),
    )


@dataclass
class _Slot:
    """Static state for one ``(batch, length)``: the KV cache and the captured step."""

    cache: KVCache
    token: torch.Tensor  # (B, 1) long
    pos: torch.Tensor  # (1,) long
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


@dataclass
class _Adapters:
    """Per-batch-size static buffers: the adapter tokens and precomputed gated terms."""

    tokens: torch.Tensor  # (query_layer, B, query_len, dim)
    terms: list[torch.Tensor] = field(default_factory=list)  # per injected layer (B, H, 1, hd)


class FastGenerator:
    """Static-shape decoding engine bound to one ``ImageBindLLM`` (weights snapshotted at
    construction; rebuild it after changing the model's weights, as
    ``ImageBindLLM.fast_generator`` does). With static shapes the engine holds one KV cache
    and adapter buffers per batch size: one generation at a time.

    ``pack``: concatenated, LoRA-merged weight copies (default: on CPU only, since at 7B
    the copy costs the model's size again). ``static``: one-token steps attend to the whole
    cache under a mask, so every step has the same shapes (default: with ``cuda_graph``).
    ``cuda_graph``: capture that step (default: on CUDA). ``compile``: ``torch.compile`` it.
    """

    def __init__(
        self,
        model,
        pack: bool | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
        static: bool | None = None,
    ):
        acfg = model.adapter_cfg
        if acfg.injection == "input_token":
            raise ValueError("FastGenerator supports the prefix injections, not 'input_token'")
        device = model.device
        self.model, self.cfg = model, model.llama_cfg
        self.pack = device.type == "cpu" if pack is None else pack
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.static = self.cuda_graph or compile if static is None else static
        if self.cuda_graph and not self.static:
            raise ValueError("cuda_graph=True captures the static step: static must be True")
        if compile and not self.static:
            raise ValueError("compile=True compiles the static one-token step: static=False")
        llama = model.llama
        self.layers = [_layer(block, self.pack) for block in llama.layers]
        self.embedding, self.output = llama.tok_embeddings.weight, llama.output.weight
        self.norm = llama.norm.weight
        self.freqs = llama.rope.freqs  # (positions, hd / 2) complex
        self.eps = self.cfg.norm_eps
        self.heads = (self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim)
        self._slots: dict[tuple[int, int], _Slot] = {}
        self._adapters: dict[int, _Adapters] = {}
        self._step = torch.compile(self._forward, dynamic=False) if compile else self._forward

    # -- the step ------------------------------------------------------------------------------
    def _forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        adapters: _Adapters,
        end: int | None = None,
    ) -> torch.Tensor:
        """``tokens (B, T)`` at positions ``pos (T,)`` -> fp32 logits of the last ``(B, V)``.

        ``end``: attend to the first ``end`` cache entries (eager; shapes vary per step).
        None: attend to the whole static cache under a mask (one shape: graph-capturable).
        """
        B, T = tokens.shape
        h = F.embedding(tokens.reshape(B * T), self.embedding)  # (B * T, dim): 2-D matmuls
        freqs = self.freqs.index_select(0, pos)  # (T, hd / 2) complex
        n_keys = cache.max_len if end is None else end
        mask = None  # eager, one new token: it sees every key so far
        if end is None or tokens.shape[1] > 1:
            mask = torch.arange(n_keys, device=pos.device)[None, :] <= pos[:, None]  # (T, keys)
        j = 0
        for i, layer in enumerate(self.layers):
            term = prefix = None
            if layer.injected:  # gated / ungated: the precomputed term; else the adapter tokens
                term, prefix = (
                    (adapters.terms[j], None) if adapters.terms else (None, adapters.tokens[j])
                )
                j += 1
            h = self._block(layer, h, (B, T), freqs, mask, pos, cache[i], term, prefix, n_keys)
        h = h.view(B, T, -1)[:, -1] if T > 1 else h  # (B, dim)
        return F.linear(rms_norm(h, self.norm, self.eps), self.output).float()

    def _block(self, layer: _Layer, h, shape, freqs, mask, pos, kv, term, prefix, n_keys):
        """One layer on ``h (B * T, dim)``; ``kv`` the layer's static cache; ``term (B, H, 1,
        hd)`` the precomputed adapter term, or ``prefix (B, query_len, dim)`` adapter tokens."""
        B, T = shape
        n_heads, kv_heads, head_dim = self.heads
        x = rms_norm(h, layer.attn_norm, self.eps)
        if len(layer.qkv) == 1:  # packed: one matmul gives q|k and v
            qk, v = layer.qkv[0](x)
        else:
            q, k, v = (proj(x)[0] for proj in layer.qkv)
            qk = torch.cat([q, k], dim=-1)
        qk = apply_rotary(qk.view(B, T, n_heads + kv_heads, head_dim), freqs)
        q, k = qk.split([n_heads, kv_heads], dim=2)
        kv.k.index_copy_(2, pos, k.transpose(1, 2))  # (B, Hkv, L, hd)
        kv.v.index_copy_(2, pos, v.view(B, T, kv_heads, head_dim).transpose(1, 2))
        keys = repeat_kv(kv.k[:, :, :n_keys], n_heads // kv_heads)  # (B, H, n_keys, hd)
        values = repeat_kv(kv.v[:, :, :n_keys], n_heads // kv_heads)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, hd)
        if term is not None:
            out = out + term
        elif prefix is not None:
            out = out + layer.attention.adapter_output(q, prefix)
        h = h + layer.wo(out.transpose(1, 2).reshape(B * T, -1))[0]
        x = rms_norm(h, layer.ffn_norm, self.eps)
        a, b = layer.w13[0](x) if len(layer.w13) == 1 else (p(x)[0] for p in layer.w13)
        return h + layer.w2(F.silu(a) * b)[0]

    # -- per-generation state ------------------------------------------------------------------
    @torch.inference_mode()
    def set_features(self, v: torch.Tensor) -> _Adapters:
        """Bound features ``v (B, dim)`` -> the adapter buffers for batch size B (with static
        shapes the same buffers every time, which a captured graph reads)."""
        tokens = self.model.adapter_tokens(v)  # (query_layer, B, query_len, dim)
        gated_terms = self.model.adapter_cfg.injection in ("gated", "ungated")
        terms = list(self.model.llama.adapter_terms(tokens)) if gated_terms else []
        if not self.static:  # fresh buffers: decoders of one engine may run side by side
            return _Adapters(tokens, terms)
        slot = self._adapters.get(v.shape[0])
        if slot is None or slot.tokens.shape != tokens.shape:
            slot = self._adapters[v.shape[0]] = _Adapters(
                tokens.clone(), [t.clone() for t in terms]
            )
        else:  # same buffers: a captured graph keeps reading them
            slot.tokens.copy_(tokens)
            for buf, t in zip(slot.terms, terms, strict=True):
                buf.copy_(t)
        return slot

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache; with static shapes the one of the ``(batch_size, max_len)`` slot."""
        if not self.static:
            return self.model.llama.new_cache(batch_size, max_len)
        key = (batch_size, max_len)
        if key not in self._slots:
            while len(self._slots) >= MAX_SLOTS:  # the oldest slot's cache and graph go
                del self._slots[next(iter(self._slots))]
            cache = self.model.llama.new_cache(batch_size, max_len)
            device = cache.layers[0].k.device
            self._slots[key] = _Slot(
                cache,
                torch.zeros(batch_size, 1, dtype=torch.long, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
            )
        return self._slots[key].cache

    @torch.inference_mode()
    def decode_step(
        self, tokens: torch.Tensor, start_pos: int, cache: KVCache, adapters: _Adapters
    ) -> torch.Tensor:
        """Feed ``tokens (B, T)`` at ``start_pos``; fp32 logits of the last position ``(B, V)``."""
        if tokens.shape[1] > 1 or not self.static:
            end = start_pos + tokens.shape[1]
            pos = torch.arange(start_pos, end, device=tokens.device)
            return self._forward(tokens, pos, cache, adapters, end)
        slot = self._slots[(tokens.shape[0], cache.max_len)]
        slot.token.copy_(tokens)
        slot.pos.fill_(start_pos)
        if not self.cuda_graph:
            return self._step(slot.token, slot.pos, cache, adapters)
        if slot.graph is None:
            self._capture(slot, adapters)
        slot.graph.replay()
        return slot.logits.clone()

    def _capture(self, slot: _Slot, adapters: _Adapters) -> None:
        """Capture the one-token step; warm-up runs rewrite the same cache entry (idempotent)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(slot.token, slot.pos, slot.cache, adapters)
        torch.cuda.current_stream().wait_stream(stream)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph):
            slot.logits = self._step(slot.token, slot.pos, slot.cache, adapters)

    # -- generation ----------------------------------------------------------------------------
    def decoder(self, v: torch.Tensor) -> _BoundDecoder:
        """A ``generation.Decoder`` for one batch conditioned on bound features ``v (B, dim)``."""
        return _BoundDecoder(self, self.set_features(v))

    @torch.inference_mode()
    def generate_ids(
        self,
        feats: torch.Tensor | None,
        prompts: Sequence[Sequence[int]],
        max_gen_len: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        seed: int | None = None,
        eos_id: int | None = None,
    ) -> list[list[int]]:
        """As ``ImageBindLLM.generate_ids_from_feats``: token ids per prompt (EOS excluded)."""
        model = self.model
        if eos_id is None:
            if model.tokenizer is None:
                raise ValueError("generation needs a tokenizer (or eos_id)")
            eos_id = model.tokenizer.eos_id
        width, step = model.adapter_cfg.encoder_dim, self.cfg.max_batch_size
        if feats is None:
            feats = torch.zeros(len(prompts), width, device=model.device)
        elif feats.shape[0] == 1 and len(prompts) > 1:
            feats = feats.expand(len(prompts), width)
        if feats.shape != (len(prompts), width):
            raise ValueError(
                f"feats {tuple(feats.shape)} for {len(prompts)} prompts of width {width}"
            )
        options = {
            "eos_id": eos_id,
            "max_seq_len": self.cfg.max_seq_len,
            "max_gen_len": max_gen_len,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        out: list[list[int]] = []
        for start in range(0, len(prompts), step):
            v = model.bind(feats[start : start + step].to(model.device))
            out += generate_ids(self.decoder(v), prompts[start : start + step], **options)
        return out


class _BoundDecoder:
    """``generation.Decoder`` view of a ``FastGenerator`` with one batch's adapter buffers."""

    def __init__(self, engine: FastGenerator, adapters: _Adapters):
        self.engine, self.adapters = engine, adapters

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.engine.new_cache(batch_size, max_len)

    def decode_step(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        return self.engine.decode_step(tokens, start_pos, cache, self.adapters)
