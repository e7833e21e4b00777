"""The deliberately straightforward baseline every speed figure is reported against.

Written the way the reference implementation is (OpenGVLab/LLaMA-Adapter, imagebind_LLM),
with no attention to speed: rotary embeddings through ``torch.view_as_complex``, attention as
an explicit softmax over a materialised score matrix with an additive ``-inf`` mask, a KV
cache grown by ``torch.cat`` every step, the adapter value ``wv(a_l)`` recomputed in every
layer at every step, LoRA as separate matmuls, and a Python loop over layers that splits
the plain and the injected layers. It loads the SAME state dict as
``ibllm_lab.model.ImageBindLLM`` (``tests/test_bench.py`` checks that both compute the same
logits), so the two are timed on identical weights.

Supported: the released architecture (``injection="gated"``, RMS bind norm, multi-head
attention). ``reference_cache`` is the reference's visual cache: a flat faiss search with
faiss's default settings, then one ``index.reconstruct`` per neighbour in Python.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibllm_lab.cache import FAISS_DEFAULT_BLAS_THRESHOLD
from ibllm_lab.config import AdapterConfig, LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device).float()
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def lora_pair(module: nn.Module, name: str, n_in: int, n_out: int, rank: int) -> None:
    setattr(module, f"lora_{name}_l1", nn.Linear(n_in, rank, bias=False))
    setattr(module, f"lora_{name}_l2", nn.Linear(rank, n_out, bias=False))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, injected: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rank = cfg.n_heads, cfg.head_dim, acfg.lora_rank
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=acfg.w_bias)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=acfg.w_bias)
        if self.rank:
            for name in ("wq", "wk", "wv", "wo"):
                lora_pair(self, name, cfg.dim, cfg.dim, self.rank)
        if injected:
            self.gate = nn.Parameter(torch.zeros(1, cfg.n_heads, 1, 1))
        self.cache_k = None
        self.cache_v = None

    def proj(self, name, x):
        out = getattr(self, name)(x)
        if self.rank:
            out = out + getattr(self, f"lora_{name}_l2")(getattr(self, f"lora_{name}_l1")(x))
        return out

    def forward(self, x, start_pos, freqs_cis, mask, adapter=None, use_cache=False):
        bsz, seqlen, _ = x.shape
        xq = self.proj("wq", x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.proj("wk", x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xv = self.proj("wv", x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if use_cache:
            if start_pos == 0:
                self.cache_k, self.cache_v = xk, xv
            else:
                self.cache_k = torch.cat([self.cache_k, xk], dim=1)
                self.cache_v = torch.cat([self.cache_v, xv], dim=1)
            keys, values = self.cache_k, self.cache_v
        else:
            keys, values = xk, xv
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        if adapter is not None:
            adapter_v = self.wv(adapter).view(bsz, 1, self.n_heads, self.head_dim)
            output = output + self.gate.tanh() * adapter_v.transpose(1, 2)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.proj("wo", output)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig):
        super().__init__()
        hidden, self.rank = cfg.ffn_hidden_dim, acfg.lora_rank
        self.w1 = nn.Linear(cfg.dim, hidden, bias=acfg.w_bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=acfg.w_bias)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=acfg.w_bias)
        if self.rank:
            lora_pair(self, "w1", cfg.dim, hidden, self.rank)
            lora_pair(self, "w2", hidden, cfg.dim, self.rank)
            lora_pair(self, "w3", cfg.dim, hidden, self.rank)

    def proj(self, name, x):
        out = getattr(self, name)(x)
        if self.rank:
            out = out + getattr(self, f"lora_{name}_l2")(getattr(self, f"lora_{name}_l1")(x))
        return out

    def forward(self, x):
        return self.proj("w2", F.silu(self.proj("w1", x)) * self.proj("w3", x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, injected: bool):
        super().__init__()
        self.attention = Attention(cfg, acfg, injected)
        self.feed_forward = FeedForward(cfg, acfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, start_pos, freqs_cis, mask, adapter=None, use_cache=False):
        h = x + self.attention(
            self.attention_norm(x), start_pos, freqs_cis, mask, adapter, use_cache
        )
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig):
        super().__init__()
        first = cfg.n_layers - acfg.query_layer
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, acfg, i >= first) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis(cfg.head_dim, cfg.max_seq_len * 2, cfg.rope_theta),
            persistent=False,
        )


class BaselineImageBindLLM(nn.Module):
    """Reference-style ImageBind-LLM; ``load_state_dict(ImageBindLLM(...).state_dict())``."""

    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig):
        super().__init__()
        if acfg.injection != "gated" or acfg.bind_norm != "rms" or cfg.kv_heads != cfg.n_heads:
            raise ValueError("the baseline implements the released architecture only")
        self.cfg, self.acfg = cfg, acfg
        self.query_layer = acfg.query_layer
        dim, hidden = cfg.dim, getattr(acfg, "bind_hidden_ratio", 4) * cfg.dim
        self.image_bind_proj = nn.Linear(acfg.encoder_dim, dim)
        for k in range(1, acfg.bind_blocks + 1):
            setattr(self, f"image_bind_norm_{k}", RMSNorm(dim, acfg.bind_eps))
            setattr(self, f"image_bind_f1_{k}", nn.Linear(dim, hidden, bias=False))
            setattr(self, f"image_bind_f2_{k}", nn.Linear(hidden, dim, bias=False))
            setattr(self, f"image_bind_f3_{k}", nn.Linear(dim, hidden, bias=False))
        self.prefix_query = nn.Embedding(acfg.query_layer * acfg.query_len, dim)
        self.feature_norm = getattr(acfg, "feature_norm", False)
        if self.feature_norm:  # our option (not in the released model): standardise features
            self.register_buffer("feature_mean", torch.zeros(acfg.encoder_dim))
            self.register_buffer("feature_std", torch.ones(acfg.encoder_dim))
        self.llama = Transformer(cfg, acfg)
        self.criterion = nn.CrossEntropyLoss(ignore_index=0)

    @classmethod
    def from_model(cls, model: nn.Module) -> BaselineImageBindLLM:
        """A baseline sharing ``model``'s weight tensors (no copy), on its device and dtype."""
        with torch.device("meta"):
            baseline = cls(model.llama_cfg, model.adapter_cfg)
        baseline.load_state_dict(model.state_dict(), strict=True, assign=True)
        cfg, device = model.llama_cfg, model.llama.tok_embeddings.weight.device
        freqs = precompute_freqs_cis(cfg.head_dim, cfg.max_seq_len * 2, cfg.rope_theta)
        baseline.llama.freqs_cis = freqs.to(device)
        return baseline

    def forward_visual(self, feats):
        if self.feature_norm:
            z = (feats.float() - self.feature_mean) / self.feature_std
            z = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            feats = z * (feats.float().norm(dim=-1, keepdim=True) > 0)
        x = self.image_bind_proj(feats.to(self.image_bind_proj.weight.dtype))
        for k in range(1, self.acfg.bind_blocks + 1):
            n = getattr(self, f"image_bind_norm_{k}")(x)
            f1, f2, f3 = (getattr(self, f"image_bind_f{j}_{k}") for j in (1, 2, 3))
            x = x + f2(F.silu(f1(n)) * f3(n))
        return x.unsqueeze(1)  # (B, 1, dim)

    def run_layers(self, h, visual, start_pos, use_cache):
        seqlen = h.shape[1]
        freqs_cis = self.llama.freqs_cis.to(h.device)[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((1, 1, seqlen, seqlen), float("-inf"), device=h.device)
            mask = torch.triu(mask, diagonal=start_pos + 1).type_as(h)
            if start_pos > 0:
                mask = torch.cat(
                    [torch.zeros(1, 1, seqlen, start_pos, device=h.device).type_as(h), mask], -1
                )
        for layer in self.llama.layers[: -1 * self.query_layer]:
            h = layer(h, start_pos, freqs_cis, mask, None, use_cache)
        adapter = self.prefix_query.weight.reshape(self.query_layer, 1, -1).unsqueeze(1)
        for i, layer in enumerate(self.llama.layers[-1 * self.query_layer :]):
            h = layer(h, start_pos, freqs_cis, mask, visual + adapter[i], use_cache)
        return self.llama.norm(h)

    def logits(self, tokens, feats):
        """(B, T, vocab) logits; ``feats`` None = text only (the image replaced by zeros)."""
        if feats is None:
            feats = torch.zeros(tokens.shape[0], self.acfg.encoder_dim, device=tokens.device)
        visual = self.forward_visual(feats)
        h = self.run_layers(self.llama.tok_embeddings(tokens), visual, 0, False)
        return self.llama.output(h)

    def forward(self, tokens, labels, feats):
        output = self.logits(tokens, feats)[:, :-1, :]
        labels = labels[:, 1:]
        return self.criterion(output.reshape(-1, output.shape[-1]).float(), labels.flatten())

    @torch.inference_mode()
    def forward_inference(self, visual, tokens, start_pos):
        h = self.run_layers(self.llama.tok_embeddings(tokens), visual, start_pos, True)
        return self.llama.output(h[:, -1, :]).float()

    @torch.inference_mode()
    def generate(
        self, feats, prompt_tokens: torch.Tensor, max_gen_len: int, eos_id: int = -1
    ) -> torch.Tensor:
        """The reference's decoding loop, greedy, for prompts ``(B, T)`` of equal length:
        returns ``(B, T + max_gen_len)`` (EOS stops only batch 1, as in the reference)."""
        device = prompt_tokens.device
        half = self.llama.output.weight.dtype  # the reference: fp16 weights under autocast
        autocast = torch.autocast(
            "cuda", dtype=half, enabled=device.type == "cuda" and half != torch.float32
        )
        if feats is None:
            feats = torch.zeros(len(prompt_tokens), self.acfg.encoder_dim, device=device)
        with autocast:
            visual_query = self.forward_visual(feats)
        bsz, prompt_len = prompt_tokens.shape
        total_len = prompt_len + max_gen_len
        tokens = torch.full((bsz, total_len), 0, device=device).long()
        tokens[:, :prompt_len] = prompt_tokens
        input_text_mask = tokens != 0
        prev_pos = 0
        for cur_pos in range(prompt_len, total_len):
            with autocast:
                logits = self.forward_inference(visual_query, tokens[:, prev_pos:cur_pos], prev_pos)
            next_token = torch.argmax(logits, dim=-1).reshape(-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if bsz == 1 and next_token[0] == eos_id:
                break
            prev_pos = cur_pos
        return tokens


def reference_cache(
    index: faiss.Index, query: torch.Tensor, cache_size: int, cache_t: float, cache_weight: float
) -> torch.Tensor:
    """The reference's cache: flat search with faiss defaults, one ``reconstruct`` per
    neighbour, then the formula (per sample, as the method means it)."""
    previous = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = FAISS_DEFAULT_BLAS_THRESHOLD
    try:
        sims, indices = index.search(query.cpu().numpy(), int(cache_size))
    finally:
        faiss.cvar.distance_compute_blas_threshold = previous
    B = sims.shape[0]
    prototypes = [index.reconstruct(x) for x in indices.reshape(-1).tolist()]
    prototypes = np.vstack(prototypes).reshape(B, int(cache_size), -1)
    sims = torch.tensor(sims, device=query.device)
    prototypes = torch.tensor(prototypes, device=query.device)
    sims = (sims * cache_t).softmax(dim=-1)
    feats = torch.einsum("bk,bkd->bd", sims, prototypes)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    feats = (1 - cache_weight) * query + cache_weight * feats
    return feats / feats.norm(dim=-1, keepdim=True)
