"""LLaMA v1/v2, ordered from parts to whole, with Meta's state-dict key names.

Nothing here knows about modalities: ``peft.py`` and ``adapter.py`` extend these classes.
Numerics follow Meta's reference: RMSNorm computed in fp32, rotary embeddings on adjacent
dimension pairs as complex products in fp32, SwiGLU feed-forward, untied output head.
Grouped-query attention (LLaMA 2) repeats key/value heads. The KV cache is an object the
caller allocates (``Llama.new_cache``) and passes to ``forward`` with a start position.

Speed (issue 7) without changing the function or the state dict: RMSNorm as one
``F.rms_norm`` call in fp32, rotary as one complex product, causal SDPA (on CPU long
sequences attend block by block, skipping the masked upper triangle), and ``DerivedCache``
for weights derived from parameters (``peft.py`` keeps frozen LoRA merged in one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ibllm_lab.config import LlamaConfig

__all__ = [
    "DerivedCache",
    "rms_norm",
    "RMSNorm",
    "rope_tables",
    "Rotary",
    "apply_rotary",
    "repeat_kv",
    "causal_attention",
    "LayerKV",
    "KVCache",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "Llama",
    "meta_keys",
    "is_meta_weight",
]

Device = torch.device | str | None


class DerivedCache:
    """A value derived from parameters (a merged or stacked weight, a decoding engine), kept
    between calls and rebuilt when any source changes: in-place updates (optimiser steps,
    ``load_state_dict``, ``copy_`` under ``no_grad``) bump its version counter, and ``.to()``
    or ``param.data = ...`` give it new storage. (Writes through ``param.data.<op>_`` bypass
    version counters: use ``param.copy_`` under ``torch.no_grad`` instead.) Not a buffer:
    it is never saved, and state-dict keys stay Meta's."""

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def get(self, sources: Sequence[torch.Tensor], build: Callable[[], Any]) -> Any:
        """The value ``build()`` made from ``sources`` (built without autograd)."""
        try:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        except RuntimeError:  # inference tensors carry no version counter: do not cache
            key = None
        if key is None or key != self._key:
            # normal tensors even when first built under inference_mode (later training
            # may save them for backward)
            with torch.no_grad(), torch.inference_mode(False):
                value = build()
            if key is None:
                return value
            self._key, self._value = key, value
        return self._value


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Meta's RMSNorm: ``x / rms(x)`` in fp32, cast back to ``x``'s dtype, times ``weight``
    (one fused call when everything is fp32)."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32 and cast back before the weight (Meta)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: Device = None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(
    head_dim: int, n_positions: int, theta: float, device: Device = None
) -> torch.Tensor:
    """Meta's ``freqs_cis``: complex64 ``exp(i * position * theta^(-2j / head_dim))``,
    ``(n_positions, head_dim // 2)``, computed in fp32."""
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (theta**exponents)  # (head_dim / 2,)
    positions = torch.arange(n_positions, device=device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # (n_positions, head_dim / 2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` as complex numbers, in fp32 (Meta's
    ``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``).

    ``x``: ``(B, T, H, head_dim)``, last dimension contiguous; ``freqs``: complex
    ``(T, head_dim // 2)``. Returns ``x``'s shape and dtype.
    """
    x32 = x.float()
    pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))  # (B, T, H, head_dim / 2)
    rotated = torch.view_as_real(pairs * freqs[:, None, :]).flatten(-2)  # (B, T, H, head_dim)
    return rotated.type_as(x)


class Rotary(nn.Module):
    """Holds Meta's ``freqs_cis`` as a non-persistent fp32 buffer ``table`` of
    ``(cos, sin)`` pairs, ``(n_positions, head_dim // 2, 2)`` (real, so that dtype casts of
    the model never see a complex tensor; state-dict keys stay Meta's). Casting the model to
    half must not round it, and moving it must not leave it uninitialised (``to_empty``), so
    every ``_apply`` recomputes it on the new device."""

    def __init__(self, head_dim: int, n_positions: int, theta: float, device: Device = None):
        super().__init__()
        self.head_dim, self.n_positions, self.theta = head_dim, n_positions, theta
        self.register_buffer("table", self._table(device), persistent=False)

    def _table(self, device: Device) -> torch.Tensor:
        freqs = rope_tables(self.head_dim, self.n_positions, self.theta, device)
        return torch.view_as_real(freqs)  # (n_positions, head_dim / 2, 2)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.table = self._table(self.table.device)
        return self

    @property
    def freqs(self) -> torch.Tensor:
        """The whole complex64 table ``(n_positions, head_dim // 2)`` (a view)."""
        return torch.view_as_complex(self.table)

    def forward(self, start_pos: int, length: int) -> torch.Tensor:
        """Complex ``(length, head_dim // 2)`` table of positions ``start_pos ..``."""
        end = start_pos + length
        if end > self.n_positions:
            raise ValueError(f"position {end - 1} beyond the rotary table ({self.n_positions})")
        return self.freqs[start_pos:end]


@dataclass
class LayerKV:
    """One layer's preallocated keys and values, each ``(B, n_kv_heads, max_len, head_dim)``."""

    k: torch.Tensor
    v: torch.Tensor

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ``(B, n_kv_heads, T, head_dim)`` at ``start_pos``; return all keys and
        values so far, ``(B, n_kv_heads, start_pos + T, head_dim)``."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked for {end}")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache batch {self.k.shape[0]} != input batch {k.shape[0]}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Per-layer ``LayerKV`` buffers, owned by the decoding loop (not by the model)."""

    def __init__(self, layers: list[LayerKV]):
        self.layers = layers

    @classmethod
    def allocate(
        cls, cfg: LlamaConfig, batch_size: int, max_len: int, device: Device = None, dtype=None
    ) -> KVCache:
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(
            [
                LayerKV(
                    torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(shape, device=device, dtype=dtype),
                )
                for _ in range(cfg.n_layers)
            ]
        )

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    def __getitem__(self, index: int) -> LayerKV:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)


def _linear(n_in: int, n_out: int, bias: bool, device: Device, dtype) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype)
    if bias:
        nn.init.zeros_(layer.bias)  # biases start at zero: the layer equals the bias-free one
    return layer


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, n_kv_heads, S, hd) -> (B, n_kv_heads * n_rep, S, hd)``, each head repeated."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _causal_mask(length: int, n_keys: int, start_pos: int, device: Device) -> torch.Tensor:
    """Boolean ``(length, n_keys)``: query ``i`` (position ``start_pos + i``) sees key ``j``."""
    rows = torch.arange(length, device=device)[:, None] + start_pos
    return torch.arange(n_keys, device=device)[None, :] <= rows


CPU_QUERY_BLOCK = 128  # query block of the CPU causal attention (see causal_attention)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``q, k, v (B, H, T, hd)``, all at positions ``0 .. T-1``.

    On CPU, sequences longer than two blocks go block by block: queries
    ``[s, s + CPU_QUERY_BLOCK)`` attend to keys ``[0, s + CPU_QUERY_BLOCK)`` only. PyTorch's
    CPU kernel spends time on the masked upper triangle; skipping it makes forward and
    backward at T = 512 about a quarter faster. Elsewhere one ``is_causal`` SDPA call.
    """
    T = q.shape[2]
    if q.device.type != "cpu" or T <= 2 * CPU_QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    blocks = []
    for start in range(0, T, CPU_QUERY_BLOCK):
        end = min(start + CPU_QUERY_BLOCK, T)
        mask = _causal_mask(end - start, end, start, q.device)  # (block, end)
        keys, values = k[:, :, :end], v[:, :, :end]
        blocks.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values, mask))
    return torch.cat(blocks, dim=2)  # (B, H, T, hd)


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with rotary embeddings.

    ``biased`` names the projections (``"wq"``, ``"wk"``, ``"wv"``, ``"wo"``) that carry a
    zero-initialised bias. Subclasses change a projection by overriding ``project``.
    """

    def __init__(
        self, cfg: LlamaConfig, biased: Collection[str] = (), device: Device = None, dtype=None
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.wq = _linear(cfg.dim, q_width, "wq" in biased, device, dtype)
        self.wk = _linear(cfg.dim, kv_width, "wk" in biased, device, dtype)
        self.wv = _linear(cfg.dim, kv_width, "wv" in biased, device, dtype)
        self.wo = _linear(q_width, cfg.dim, "wo" in biased, device, dtype)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x)

    def qkv(
        self, x: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, dim)``, ``rope (T, hd / 2)`` complex -> rotated ``q (B, H, T, hd)``,
        ``k (B, Hkv, T, hd)``, ``v (B, Hkv, T, hd)``."""
        B, T, _ = x.shape
        q = self.project("wq", x).view(B, T, self.n_heads, self.head_dim)
        k = self.project("wk", x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.project("wv", x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        """Causal attention of ``q (B, H, T, hd)`` over ``k, v (B, Hkv, S, hd)`` where the
        queries sit at positions ``start_pos ..``; returns ``(B, H, T, hd)``."""
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, hd)
        T, S = q.shape[2], k.shape[2]
        if T == 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v)
        if start_pos == 0 and S == T:
            return causal_attention(q, k, v)
        mask = _causal_mask(T, S, start_pos, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, hd) -> (B, T, dim)`` through ``wo``."""
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.project("wo", out)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        start_pos: int = 0,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """``x (B, T, dim)`` at positions ``start_pos ..`` -> ``(B, T, dim)``."""
        q, k, v = self.qkv(x, rope)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        return self.merge(self.attend(q, k, v, start_pos))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``. Subclasses change a projection via ``project``."""

    def __init__(
        self, dim: int, hidden: int, biased: Collection[str] = (), device: Device = None, dtype=None
    ):
        super().__init__()
        self.w1 = _linear(dim, hidden, "w1" in biased, device, dtype)
        self.w2 = _linear(hidden, dim, "w2" in biased, device, dtype)
        self.w3 = _linear(dim, hidden, "w3" in biased, device, dtype)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project("w2", F.silu(self.project("w1", x)) * self.project("w3", x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``.

    ``attention`` and ``feed_forward`` may be given (PEFT / adapter variants); by default the
    plain LLaMA modules are built.
    """

    def __init__(
        self,
        layer_id: int,
        cfg: LlamaConfig,
        device: Device = None,
        dtype=None,
        attention: nn.Module | None = None,
        feed_forward: nn.Module | None = None,
    ):
        super().__init__()
        self.layer_id = layer_id
        if attention is None:
            attention = Attention(cfg, device=device, dtype=dtype)
        if feed_forward is None:
            feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim, device=device, dtype=dtype)
        self.attention, self.feed_forward = attention, feed_forward
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        start_pos: int = 0,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))


BlockFactory = Callable[..., nn.Module]  # (layer_id, cfg, device=, dtype=) -> block


class Llama(nn.Module):
    """The LLaMA decoder. ``make_block(layer_id, cfg, device=, dtype=)`` builds each layer
    (``TransformerBlock`` by default; ``peft.py`` / ``adapter.py`` pass their variants)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        device: Device = None,
        dtype=None,
        make_block: BlockFactory = TransformerBlock,
        extra_positions: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            make_block(i, cfg, device=device, dtype=dtype) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        # Meta precomputes 2 * max_seq_len positions; extra_positions for prepended tokens.
        n_positions = 2 * cfg.max_seq_len + extra_positions
        self.rope = Rotary(cfg.head_dim, n_positions, cfg.rope_theta, device)

    def run(
        self, h: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Run the layers on embeddings ``h (B, T, dim)`` at positions ``start_pos ..``."""
        rope = self.rope(start_pos, h.shape[1])
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, start_pos, None if cache is None else cache[i])
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: ``(B, T, dim) -> (B, T, vocab)``."""
        return self.output(self.norm(h))

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        start_pos: int = 0,
        cache: KVCache | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for ``tokens (B, T)`` or input ``embeddings (B, T, dim)``."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens or embeddings")
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings
        return self.head(self.run(h, start_pos, cache))

    # -- decoding interface used by ibllm_lab.generation --------------------------------------
    def new_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """A zeroed KV cache on this model's device (dtype of ``wk`` unless given)."""
        wk = self.layers[0].attention.wk.weight
        return KVCache.allocate(self.cfg, batch_size, max_len, wk.device, dtype or wk.dtype)

    def decode_step(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        """Feed ``tokens (B, T)`` at ``start_pos``; fp32 logits of the last position ``(B, V)``."""
        h = self.run(self.tok_embeddings(tokens), start_pos, cache)
        return self.head(h[:, -1:]).float()[:, 0]

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Re-initialise the Meta-layout weights for training from scratch: normal(0, std)
        matrices and embeddings, unit norms. Other (PEFT / adapter) parameters are untouched."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not is_meta_weight(name):
                    continue
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)


_META_LAYER_KEYS = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)
_META_KEY_RE = re.compile(
    r"(tok_embeddings|norm|output)\.weight"
    r"|layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight"
)


def meta_keys(cfg: LlamaConfig) -> list[str]:
    """Meta's consolidated-checkpoint keys for ``cfg``, in Meta's order."""
    keys = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        keys += [f"layers.{i}.{k}" for k in _META_LAYER_KEYS]
    return keys + ["norm.weight", "output.weight"]


def is_meta_weight(name: str) -> bool:
    """Whether ``name`` (relative to the Llama module) is one of Meta's base weights."""
    return _META_KEY_RE.fullmatch(name) is not None
