"""Batched autoregressive generation with a KV cache (Meta's LLaMA v1 loop, extended).

Prompts are left-aligned in a ``(B, total_len)`` buffer with
``total_len = min(max_seq_len, max_gen_len + longest prompt)``. Decoding starts at the
shortest prompt's length; positions still inside a longer prompt are teacher-forced, so
every sample sees exactly its own prompt and batched greedy decoding equals one-by-one
decoding. Each sample stops at its own EOS or after ``max_gen_len`` tokens; the loop ends
when all have. ``temperature == 0`` is greedy; otherwise softmax(logits / temperature) and
nucleus (top-p) sampling with a seeded ``torch.Generator``.

There is one loop, ``iter_tokens``. Tokens stay on the device; every ``sync_every`` steps one
transfer brings the new ones to the host, which decides what they mean (prompt, generated,
EOS, limit) and whether every sample is done, so on a GPU the host can queue steps ahead.
Streaming uses ``sync_every=1``; ``generate_ids`` and non-streaming text use ``SYNC_EVERY``:
the few steps run after the last sample finished change no output.

The model side is any ``Decoder``: ``Llama`` itself, ``ImageBindLLM``'s feature-conditioned
decoder or ``fast.FastGenerator``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from ibllm_lab.llama import KVCache

__all__ = [
    "SYNC_EVERY",
    "Decoder",
    "sample_top_p",
    "next_tokens",
    "iter_tokens",
    "generate_ids",
    "iter_text",
    "generate_text",
]

StreamCallback = Callable[[int, str], None]
SYNC_EVERY = 8  # decoding steps between host transfers when nothing streams


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
    sync_every: int = 1,
) -> Iterator[tuple[int, int]]:
    """Yield ``(sample_index, token_id)`` for each generated token (EOS excluded), in
    decoding order (step by step, samples in order within a step), ``sync_every`` steps at
    a time. Model calls run under ``torch.no_grad``.

    Only the tokens live on the device; which of them count (after the sample's prompt,
    before its EOS, at most ``max_gen_len``) is decided on the host as they are read back.
    """
    _check_options(prompts, max_seq_len, max_gen_len, temperature, top_p)
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    lengths = [len(p) for p in prompts]
    longest, first = max(lengths), min(lengths)
    total_len = min(max_seq_len, max_gen_len + longest)
    finished = [n >= total_len or max_gen_len == 0 for n in lengths]
    if all(finished):
        return
    cache = decoder.new_cache(len(prompts), total_len)
    device = cache.layers[0].k.device
    tokens = torch.zeros((len(prompts), total_len), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    in_prompt = torch.arange(total_len, device=device)[None, :] < lengths_t[:, None]  # (B, L)
    generator = _generator(device, seed) if temperature > 0 else None
    prev, synced = 0, first
    for cur in range(first, total_len):
        with torch.no_grad():
            logits = decoder.decode_step(tokens[:, prev:cur], prev, cache)  # (B, V)
            chosen = next_tokens(logits, temperature, top_p, generator)
        if cur < longest:  # teacher forcing inside longer prompts
            chosen = torch.where(in_prompt[:, cur], tokens[:, cur], chosen)
        tokens[:, cur] = chosen
        prev = cur
        if cur + 1 - synced == sync_every or cur + 1 == total_len:
            block = tokens[:, synced : cur + 1].tolist()  # one device-to-host transfer
            yield from _accept(block, synced, lengths, finished, eos_id, max_gen_len)
            if all(finished):
                return
            synced = cur + 1


def _accept(
    block: list[list[int]],
    start: int,
    lengths: list[int],
    finished: list[bool],
    eos_id: int,
    max_gen_len: int,
) -> Iterator[tuple[int, int]]:
    """Yield the generated tokens of positions ``start ..`` (``block``: one row per sample),
    step by step, marking samples ``finished`` at EOS or ``max_gen_len``."""
    for t in range(len(block[0])):
        position = start + t
        for i, row in enumerate(block):
            if finished[i] or position < lengths[i]:
                continue
            if row[t] == eos_id:
                finished[i] = True
                continue
            yield i, row[t]
            finished[i] = position + 1 - lengths[i] >= max_gen_len


def generate_ids(
    decoder: Decoder, prompts: Sequence[Sequence[int]], *, sync_every: int = SYNC_EVERY, **options
) -> list[list[int]]:
    """Generated token ids per prompt (EOS excluded). Options as ``iter_tokens``."""
    out: list[list[int]] = [[] for _ in prompts]
    for i, token in iter_tokens(decoder, prompts, sync_every=sync_every, **options):
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
    options.setdefault("sync_every", 1 if stream is not None else SYNC_EVERY)
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
