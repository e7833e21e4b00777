"""ImageBind-LLM: encoders -> fusion -> visual cache -> bind network -> gated LLaMA.

``ImageBindLLM`` is the trainable network of ``adapter.py`` plus the plumbing around it: the
tokenizer, an optional frozen ``Encoder`` (with none attached, inputs are encoder
embeddings), an optional ``VisualCache``, the training loss and batched generation with the
reference's call signature. Generation runs on ``fast.FastGenerator`` by default
(``fast=False``: the model's own modules); both go through ``generation.py``'s one loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ibllm_lab.adapter import ImageBindAdapter
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.fast import FastGenerator
from ibllm_lab.generation import Decoder, generate_ids, generate_text, iter_text
from ibllm_lab.llama import DerivedCache, Device, KVCache
from ibllm_lab.modality import Encoder, Inputs, VisualCache, fuse, split_inputs
from ibllm_lab.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["ImageBindLLM", "format_prompt", "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT"]

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def format_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002
    """The Alpaca template the released model was trained with (``input`` is optional)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if input is None or input == "":
        return PROMPT_NO_INPUT.format(instruction=instruction)
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)


Prompts = Sequence[str] | Sequence[Sequence[int]]


def _shifted(stream: Callable[[int, str], None], offset: int, index: int, piece: str) -> None:
    """Report a chunk's sample ``index`` as its index in the whole batch."""
    stream(offset + index, piece)


class _FeatureDecoder:
    """Generation's ``Decoder`` for one batch: the model conditioned on bound features."""

    def __init__(self, model: ImageBindLLM, v: torch.Tensor):
        self.model, self.v = model, v  # v: (B, dim)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.llama.new_cache(batch_size, max_len + self.model.extra_positions)

    def decode_step(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        h = self.model.hidden(tokens, self.v, start_pos, cache)  # (B, T, dim)
        return self.model.llama.head(h[:, -1:]).float()[:, 0]  # (B, V)


class ImageBindLLM(ImageBindAdapter):
    """The multimodal model. Parameters: bind network (``image_bind_*``), ``prefix_query``
    and ``llama.*`` (Meta keys plus gates, biases, LoRA).

    ``encoder`` and ``cache`` are attached, not owned: they are not submodules, so they are
    neither saved with the adapter nor moved by ``.to()``; give them the model's device.
    """

    def __init__(
        self,
        llama_cfg: LlamaConfig,
        adapter_cfg: AdapterConfig,
        tokenizer: Tokenizer | None = None,
        encoder: Encoder | None = None,
        cache: VisualCache | None = None,
        device: Device = None,
        dtype=None,
    ):
        super().__init__(llama_cfg, adapter_cfg, device, dtype)
        self.tokenizer = tokenizer
        # a plain dict keeps the frozen encoder / cache out of the module tree and state dict
        self._attached: dict[str, Any] = {"encoder": encoder, "cache": cache}
        self._fast = DerivedCache()  # the FastGenerator of the current weights
        if tokenizer is not None and tokenizer.n_words != llama_cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.n_words} words, the LLaMA's vocab_size is "
                f"{llama_cfg.vocab_size}"
            )

    def __setattr__(self, name: str, value) -> None:
        # nn.Module would register an nn.Module encoder as a submodule and bypass the
        # property; the encoder and cache are attached, not owned (not saved, not moved).
        if name in ("encoder", "cache"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def encoder(self) -> Encoder | None:
        return self._attached["encoder"]

    @encoder.setter
    def encoder(self, value: Encoder | None) -> None:
        self._attached["encoder"] = value

    @property
    def cache(self) -> VisualCache | None:
        return self._attached["cache"]

    @cache.setter
    def cache(self, value: VisualCache | None) -> None:
        self._attached["cache"] = value

    @property
    def device(self) -> torch.device:
        return self.llama.tok_embeddings.weight.device

    # -- inputs -> features -----------------------------------------------------------------
    def encode_inputs(
        self,
        inputs: Inputs,
        cache_size: int = 10,
        cache_t: float = 20,
        cache_weight: float = 0.5,
        use_cache: bool = True,
        cache_gate: Any = None,
    ) -> torch.Tensor:
        """``{'Image': [tensor, weight], ...}`` -> fused feature ``(B, encoder_dim)``.

        Each modality is encoded (by the attached encoder; with none, the tensors are
        embeddings ``(B, encoder_dim)``), L2-normalised and fused with weights
        ``w / (sum(w) + 1e-6)``; then the visual cache, if attached and ``use_cache``
        (``cache_gate``: an ``ibllm_lab.cache.CacheGate`` for per-query weights; None is
        the method's fixed ``cache_weight``).
        """
        tensors, weights = split_inputs(inputs)
        if self.encoder is not None:
            encoded = self.encoder(tensors)
            embeddings = [encoded[m] for m in tensors]
        else:
            embeddings = list(tensors.values())
        for modality, emb in zip(tensors, embeddings, strict=True):
            if emb.dim() != 2 or emb.shape[1] != self.adapter_cfg.encoder_dim:
                source = "the encoder's output" if self.encoder is not None else "inputs"
                raise ValueError(
                    f"{source} for {modality.value} has shape {tuple(emb.shape)}; expected "
                    f"(B, {self.adapter_cfg.encoder_dim}) (attach an encoder for raw media)"
                )
        normed = [F.normalize(e.to(self.device).float(), dim=-1) for e in embeddings]
        feats = fuse(normed, weights)  # (B, encoder_dim), not re-normalised
        if use_cache and self.cache is not None:
            gate = {} if cache_gate is None else {"gate": cache_gate}
            feats = self.cache(feats, cache_size, cache_t, cache_weight, **gate)
        return feats

    def _features(self, feats: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Validate / default the features: None -> zeros (text-only), one row -> broadcast."""
        width = self.adapter_cfg.encoder_dim
        if feats is None:
            return torch.zeros(batch_size, width, device=self.device)
        if feats.dim() != 2 or feats.shape[1] != width:
            raise ValueError(f"feats has shape {tuple(feats.shape)}; expected (B, {width})")
        if feats.shape[0] == 1 and batch_size > 1:
            feats = feats.expand(batch_size, width)
        if feats.shape[0] != batch_size:
            raise ValueError(f"{feats.shape[0]} feature rows for a batch of {batch_size}")
        return feats.to(self.device)

    # -- training ---------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``(B, T, vocab)`` of ``tokens (B, T)`` conditioned on ``feats
        (B, encoder_dim)`` (None or zero rows: text-only, the image replaced by zeros)."""
        v = self.bind(self._features(feats, tokens.shape[0]))  # (B, dim)
        return self.llama.head(self.hidden(tokens, v)).float()

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy; label 0 marks prompt / padding positions (ignored).
        ``tokens, labels (B, T)``; returns a scalar (0 with a graph if nothing is labelled).

        Equal to ``cross_entropy(logits(tokens, feats)[:, :-1], labels[:, 1:],
        ignore_index=0)`` (``tests/test_model.py`` checks loss and gradients), computed with
        less work: positions after the last labelled one feed no prediction (attention is
        causal) and are not run, and the output head and softmax run only where there is a
        label.
        """
        if tokens.shape != labels.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)}")
        targets = labels[:, 1:]  # position t predicts token t + 1
        labelled = targets != 0  # (B, T - 1)
        columns = labelled.any(0).nonzero()
        if len(columns) == 0:
            return self.logits(tokens[:, :1], feats).mean() * 0
        end = int(columns[-1]) + 1  # positions 0 .. end - 1 predict a label
        v = self.bind(self._features(feats, tokens.shape[0]))  # (B, dim)
        h = self.hidden(tokens[:, :end], v)  # (B, end, dim)
        picked = labelled[:, :end]
        logits = self.llama.head(h[picked]).float()  # (n_labels, vocab)
        return F.cross_entropy(logits, targets[:, :end][picked])

    # -- generation -------------------------------------------------------------------------
    def _prompt_ids(self, prompts: Prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings (or of token-id lists)")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token ids instead")
                out.append(self.tokenizer.encode(p, bos=True, eos=False))
            else:
                out.append([int(t) for t in p])
        return out

    def fast_generator(self) -> FastGenerator | None:
        """The ``FastGenerator`` of the current weights (rebuilt after they change; None for
        ``input_token``, which it does not support)."""
        if self.adapter_cfg.injection == "input_token":
            return None
        return self._fast.get(list(self.parameters()), lambda: FastGenerator(self))

    def decoder(self, v: torch.Tensor, fast: bool = True) -> Decoder:
        """The ``generation.Decoder`` of one batch conditioned on bound features ``v (B,
        dim)``: ``FastGenerator``'s where ``fast`` and supported, else the model's modules."""
        engine = self.fast_generator() if fast else None
        return _FeatureDecoder(self, v) if engine is None else engine.decoder(v)

    def _batches(
        self, feats: torch.Tensor | None, prompts: Prompts, fast: bool
    ) -> Iterator[tuple[int, Decoder, list[list[int]]]]:
        """Split into chunks of ``max_batch_size``: ``(offset, decoder, prompt_ids)``."""
        ids = self._prompt_ids(prompts)
        feats = self._features(feats, len(ids))
        step = self.llama_cfg.max_batch_size
        for start in range(0, len(ids), step):
            with torch.no_grad():
                v = self.bind(feats[start : start + step])
            yield start, self.decoder(v, fast), ids[start : start + step]

    def _options(
        self,
        max_gen_len: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        eos_id: int | None = None,
    ) -> dict[str, Any]:
        if eos_id is None:
            if self.tokenizer is None:
                raise ValueError("generation needs a tokenizer (or eos_id)")
            eos_id = self.tokenizer.eos_id
        return {
            "eos_id": eos_id,
            "max_seq_len": self.llama_cfg.max_seq_len,
            "max_gen_len": max_gen_len,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }

    def generate_from_feats(
        self,
        feats: torch.Tensor | None,
        prompts: Prompts,
        max_gen_len: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        stream: Callable[[int, str], None] | None = None,
        seed: int | None = None,
        fast: bool = True,
    ) -> list[str]:
        """Generate from features ``(B, encoder_dim)`` (one row is broadcast; None:
        text-only). ``prompts``: formatted strings (BOS is added) or token-id lists.
        ``stream(sample_index, text_piece)`` receives text as it is generated. ``fast``:
        decode with ``FastGenerator`` (False: the model's own modules; same tokens)."""
        if self.tokenizer is None:
            raise ValueError("text generation needs a tokenizer")
        options = self._options(max_gen_len, temperature, top_p, seed)
        out: list[str] = []
        for offset, decoder, ids in self._batches(feats, prompts, fast):
            chunk_stream = None if stream is None else partial(_shifted, stream, offset)
            out += generate_text(decoder, self.tokenizer, ids, chunk_stream, **options)
        return out

    def generate(
        self,
        inputs: Inputs | None,
        prompts: Prompts,
        max_gen_len: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        cache_size: int = 10,
        cache_t: float = 20,
        cache_weight: float = 0.5,
        stream: Callable[[int, str], None] | None = None,
        seed: int | None = None,
        fast: bool = True,
        cache_gate: Any = None,
    ) -> list[str]:
        """The reference's call: ``inputs`` ``{'Image': [tensor, weight], ...}`` (None:
        text-only), ``prompts`` already formatted. Batched, KV-cached; temperature 0 is
        greedy. Returns the generated text of each prompt, up to EOS. ``fast=False``
        decodes with the model's own modules instead of ``FastGenerator``; ``cache_gate``:
        see :meth:`encode_inputs`."""
        feats = None
        if inputs is not None:
            with torch.no_grad():
                feats = self.encode_inputs(
                    inputs, cache_size, cache_t, cache_weight, cache_gate=cache_gate
                )
        return self.generate_from_feats(
            feats, prompts, max_gen_len, temperature, top_p, stream=stream, seed=seed, fast=fast
        )

    def stream_from_feats(
        self,
        feats: torch.Tensor | None,
        prompts: Prompts,
        max_gen_len: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        seed: int | None = None,
        fast: bool = True,
    ) -> Iterator[tuple[int, str]]:
        """Iterator form of ``generate_from_feats``: yields ``(sample_index, text_piece)``."""
        if self.tokenizer is None:
            raise ValueError("text generation needs a tokenizer")
        options = self._options(max_gen_len, temperature, top_p, seed)
        for offset, decoder, ids in self._batches(feats, prompts, fast):
            for i, piece in iter_text(decoder, self.tokenizer, ids, **options):
                yield offset + i, piece

    def generate_ids_from_feats(
        self,
        feats: torch.Tensor | None,
        prompts: Prompts,
        max_gen_len: int = 256,
        temperature: float = 0.1,
        top_p: float = 0.75,
        seed: int | None = None,
        eos_id: int | None = None,
        fast: bool = True,
    ) -> list[list[int]]:
        """Generated token ids per prompt (EOS excluded); works without a tokenizer when
        prompts are token ids and ``eos_id`` is given. ``fast`` as ``generate_from_feats``."""
        options = self._options(max_gen_len, temperature, top_p, seed, eos_id)
        out: list[list[int]] = []
        for _, decoder, ids in self._batches(feats, prompts, fast):
            out += generate_ids(decoder, ids, **options)
        return out
