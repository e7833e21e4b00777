"""Batched autoregressive generation with a KV cache (Meta's LLaMA v1 loop, extended).

Prompts are left-aligned in a ``(B, total_len)`` buffer with
``total_len = min(max_seq_len, max_gen_len + longest prompt)``. Decoding starts at the
shortest prompt's length; positions still inside a longer prompt are teacher-forced, so
every sample sees exactly its own prompt and batched greedy decoding equals one-by-one
decoding. Each sample stops at its own EOS or after ``max_gen_len`` tokens; the loop ends
when all have. ``temperature == 0`` is greedy; otherwise softmax(logits / temperature) and
nucleus (top-p) sampling with a seeded ``torch.Generator``.

The model side is any ``Decoder``: ``Llama`` itself, or the feature-conditioned decoder that
``ImageBindLLM`` builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from ibllm_lab.llama import KVCache

__all__ = [
    "Decoder",
    "sample_top_p",
    "next_tokens",
    "iter_tokens",
    "generate_ids",
    "iter_text",
    "generate_text",
]

StreamCallback = Callable[[int, str], None]


class Decoder(Protocol):
    """What the generation loop needs from a model."""

    def new_cache(self, batch_size: int, max_len: int) -> KVCache: ...

    def decode_step(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        """Feed ``tokens (B, T)`` at ``start_pos``; fp32 logits of the last position ``(B, V)``."""
        ...


def sample_top_p(
    probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Nucleus sampling: ``probs (B, V)`` -> token ids ``(B,)``. Keeps the most likely tokens
    whose preceding cumulative mass is at most ``top_p``, renormalises, samples."""
    probs_sorted, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(probs_sorted, dim=-1)
    probs_sorted = probs_sorted.masked_fill(cumulative - probs_sorted > top_p, 0.0)
    probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)  # (B, 1)
    return torch.gather(order, -1, choice)[:, 0]


def next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + top-p sampling: ``(B, V) -> (B,)``."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if generator is not None and generator.device != probs.device:
        return sample_top_p(probs.cpu(), top_p, generator).to(probs.device)
    return sample_top_p(probs, top_p, generator)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on ``device`` (CPU where the backend has none), seeded from ``seed``."""
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _check_options(
    prompts: Sequence[Sequence[int]],
    max_seq_len: int,
    max_gen_len: int,
    temperature: float,
    top_p: float,
) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token (BOS)")
    longest = max(len(p) for p in prompts)
    if longest >= max_seq_len:
        raise ValueError(f"a prompt has {longest} tokens; max_seq_len is {max_seq_len}")
    if max_gen_len < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_gen_len >= 0, temperature >= 0, 0 < top_p <= 1; got "
            f"{max_gen_len}, {temperature}, {top_p}"
        )


def iter_tokens(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    max_seq_len: int,
    max_gen_len: int = 256,
    temperature: float = 0.1,
    top_p: float = 0.75,
    seed: int | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield ``(sample_index, token_id)`` for each generated token (EOS excluded), in
    decoding order. Model calls run under ``torch.no_grad``."""
    _check_options(prompts, max_seq_len, max_gen_len, temperature, top_p)
    lengths = [len(p) for p in prompts]
    total_len = min(max_seq_len, max_gen_len + max(lengths))
    cache = decoder.new_cache(len(prompts), total_len)
    device = cache.layers[0].k.device
    tokens = torch.zeros((len(prompts), total_len), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    in_prompt = torch.arange(total_len, device=device)[None, :] < lengths_t[:, None]  # (B, L)
    done = lengths_t >= total_len  # no room left to generate
    n_generated = torch.zeros_like(lengths_t)
    generator = _generator(device, seed) if temperature > 0 else None
    prev = 0
    if max_gen_len == 0 or bool(done.all()):
        return
    for cur in range(min(lengths), total_len):
        with torch.no_grad():
            logits = decoder.decode_step(tokens[:, prev:cur], prev, cache)  # (B, V)
            chosen = next_tokens(logits, temperature, top_p, generator)
        chosen = torch.where(in_prompt[:, cur], tokens[:, cur], chosen)  # teacher forcing
        tokens[:, cur] = chosen
        generated = ~in_prompt[:, cur] & ~done
        is_eos = generated & (chosen == eos_id)
        n_generated += generated.long()
        done |= is_eos | (n_generated >= max_gen_len)
        # one device-to-host transfer per step: tokens, which to emit, which are done
        values, emit, finished = torch.stack((chosen, generated & ~is_eos, done)).tolist()
        for i, (token, flag) in enumerate(zip(values, emit, strict=True)):
            if flag:
                yield i, token
        if all(finished):
            return
        prev = cur


def generate_ids(decoder: Decoder, prompts: Sequence[Sequence[int]], **options) -> list[list[int]]:
    """Generated token ids per prompt (EOS excluded). Options as ``iter_tokens``."""
    out: list[list[int]] = [[] for _ in prompts]
    for i, token in iter_tokens(decoder, prompts, **options):
        out[i].append(token)
    return out


class _TextStream:
    """Turns one sample's growing token list into text pieces whose concatenation is the
    final decoded text (SentencePiece spacing and byte-fallback need whole-prefix decodes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # an unfinished UTF-8 sequence: wait for its remaining bytes
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


def iter_text(
    decoder: Decoder, tokenizer, prompts: Sequence[Sequence[int]], **options
) -> Iterator[tuple[int, str]]:
    """Yield ``(sample_index, text_piece)`` as tokens are generated; per sample the pieces
    concatenate to that sample's final text. Options as ``iter_tokens`` (``eos_id`` defaults
    to the tokenizer's)."""
    options.setdefault("eos_id", tokenizer.eos_id)
    streams = [_TextStream(tokenizer) for _ in prompts]
    for i, token in iter_tokens(decoder, prompts, **options):
        piece = streams[i].push(token)
        if piece:
            yield i, piece
    for i, text_stream in enumerate(streams):
        piece = text_stream.finish()
        if piece:
            yield i, piece


def generate_text(
    decoder: Decoder,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    stream: StreamCallback | None = None,
    **options,
) -> list[str]:
    """Decoded generations (up to, excluding, EOS), one per prompt. ``stream(sample_index,
    text_piece)`` is called as text arrives. Options as ``iter_tokens``."""
    options.setdefault("eos_id", tokenizer.eos_id)
    streams = [_TextStream(tokenizer) for _ in prompts]
    for i, token in iter_tokens(decoder, prompts, **options):
        piece = streams[i].push(token)
        if piece and stream is not None:
            stream(i, piece)
    if stream is not None:
        for i, text_stream in enumerate(streams):
            piece = text_stream.finish()
            if piece:
                stream(i, piece)
    return [tokenizer.decode(text_stream.ids) for text_stream in streams]
