"""SentencePiece tokenizer with LLaMA semantics (BOS 1, EOS 2, UNK 0, no pad piece: -1)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from ibllm_lab.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["Tokenizer", "train_tokenizer"]


class Tokenizer:
    """Wraps a SentencePiece model file (Meta's ``tokenizer.model`` or one we trained)."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no tokenizer model at {self.model_path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()
        if self.sp.get_piece_size() != self.n_words:
            raise ValueError(f"{self.model_path}: inconsistent vocabulary size")
        log.debug(
            "tokenizer %s: %d words, bos %d, eos %d",
            model_path,
            self.n_words,
            self.bos_id,
            self.eos_id,
        )

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``s``, with BOS / EOS added on request."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        ids = self.sp.encode(s)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (control tokens such as BOS / EOS decode to nothing)."""
        return self.sp.decode(list(map(int, ids)))

    def __len__(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, n_words={self.n_words})"


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
) -> Path:
    """Train a LLaMA-style SentencePiece model on ``sentences``; writes ``<prefix>.model``
    atomically and returns its path.

    Settings as LLaMA's: unk 0, bos 1, eos 2, no pad piece; byte fallback (every string
    encodes), digits split, identity normalisation and whitespace kept (decode is lossless).
    ``model_type="bpe"`` avoids unigram's "vocabulary size too high" on small corpora; for
    unigram the limit is made soft.
    """
    prefix = Path(model_prefix)
    model = io.BytesIO()
    options = {
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "byte_fallback": True,
        "split_digits": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "character_coverage": 1.0,
        "minloglevel": 2,
    }
    if model_type == "unigram":
        options["hard_vocab_limit"] = False
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    path = prefix.with_name(prefix.name + ".model")
    atomic_write_bytes(path, model.getvalue())
    return path
