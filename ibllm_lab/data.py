"""Training data: the method's three formats, tokenisation, and datasets over cached features.

Formats (METHOD.md "Parameter-efficient tuning and phases"):

- pre-training CSV: tab-separated ``url`` / ``caption`` columns; every row becomes the prompt
  "Generate caption of this image" (Alpaca template) with the caption as the answer;
- LLaVA conversations (JSON list of ``{id, image, conversations: [{from, value}, ...]}``): the
  first human / gpt turn, with the ``<image>`` placeholder removed from the question;
- Alpaca records (JSON list of ``{instruction, input, output}``): text-only; an empty ``input``
  selects the template without "### Input:". (The reference's text-only branch had a trailing
  comma that turned the instruction into a tuple, so its prompts read "('...',)"; here the
  instruction stays a string, and a test checks it.)

The encoders are frozen, so training reads features computed once
(``ibllm_lab.encoders.compute_features``) instead of raw media: a :class:`FeatureDataset` yields
``(tokens, labels, feats)`` with the feature row of the example's media file, or zeros for
text-only examples (the model treats an all-zero row as "no perceptual input").
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset

CAPTION_INSTRUCTION = "Generate caption of this image"
IGNORE = 0  # label of prompt and padding positions (the model ignores label 0)
PAD = 0  # token id used for padding (SentencePiece's pad_id is -1, so padding needs its own id)
MAX_WORDS = {"pretrain": 96, "finetune": 512}  # the method's maximum sequence lengths

_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")


class TextTokenizer(Protocol):
    """What tokenisation needs from ``ibllm_lab.tokenizer.Tokenizer``."""

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One training example before tokenisation.

    ``media``: the key of the example's perceptual input (the image path as written in the
    data file), or ``None`` for text-only examples. ``input``: Alpaca's optional text input.
    """

    instruction: str
    output: str
    input: str | None = None
    media: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        for name in ("instruction", "output"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Example.{name} must be a str, got {type(getattr(self, name))}")

    def prompt(self) -> str:
        """The Alpaca-template prompt (ends with "### Response:")."""
        from ibllm_lab.model import format_prompt

        return format_prompt(self.instruction, self.input or None)


# ---------------------------------------------------------------------------------- readers
def read_pretrain_csv(path: str | Path) -> list[Example]:
    """Read a tab-separated ``url``/``caption`` file into caption examples."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"url", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {sorted(missing)}; header {reader.fieldnames}"
            )
        rows = list(reader)
    examples = []
    for line, row in enumerate(rows, start=2):
        if not row["url"] or not row["caption"]:
            raise ValueError(f"{path}:{line}: empty url or caption")
        examples.append(Example(CAPTION_INSTRUCTION, row["caption"].strip(), media=row["url"]))
    return examples


def _load_json_list(path: Path) -> list[dict]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def read_llava_json(path: str | Path) -> list[Example]:
    """Read LLaVA-style conversations; keeps the first human/gpt turn of each record."""
    path = Path(path)
    examples = []
    for i, rec in enumerate(_load_json_list(path)):
        turns = rec.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            raise ValueError(f"{path}: record {i} ({rec.get('id')}) lacks a human/gpt first turn")
        question = _IMAGE_PLACEHOLDER.sub(" ", turns[0]["value"]).strip()
        examples.append(
            Example(question, turns[1]["value"].strip(), media=rec.get("image"), id=rec.get("id"))
        )
    return examples


def read_alpaca_json(path: str | Path) -> list[Example]:
    """Read Alpaca records ``{instruction, input, output}`` into text-only examples."""
    path = Path(path)
    examples = []
    for i, rec in enumerate(_load_json_list(path)):
        if "instruction" not in rec or "output" not in rec:
            raise ValueError(f"{path}: record {i} needs 'instruction' and 'output'")
        examples.append(Example(rec["instruction"], rec["output"], input=rec.get("input") or None))
    return examples


# ------------------------------------------------------------------------------ tokenisation
def encode_example(
    tokenizer: TextTokenizer, prompt: str, answer: str, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``prompt + answer`` the reference's way.

    Returns ``(tokens, labels)``, both ``(max_len,)`` long: BOS + prompt + answer + EOS,
    truncated or padded with ``PAD``; labels equal the tokens except prompt and padding
    positions, which are ``IGNORE`` (0).
    """
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    full = tokenizer.encode(prompt + answer, bos=True, eos=True)
    tokens = torch.full((max_len,), PAD, dtype=torch.long)
    n = min(len(full), max_len)
    tokens[:n] = torch.tensor(full[:n], dtype=torch.long)
    labels = tokens.clone()
    labels[: min(len(prompt_ids), max_len)] = IGNORE
    labels[n:] = IGNORE
    return tokens, labels


def token_lengths(tokens: torch.Tensor) -> tuple[int, ...]:
    """Each row's token count before padding (``tokens (N, T)``), what length grouping sorts
    by (:class:`ShardedOrder`)."""
    return tuple((tokens != PAD).sum(dim=1).tolist())


def collate(batch: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack ``(tokens, labels, feats)`` items and drop trailing all-padding columns.

    Dropping columns that are padding in every row changes no loss (they are ignored and, the
    model being causal, never attended to by earlier positions) but saves compute.
    """
    tokens, labels, feats = (torch.stack(x) for x in zip(*batch, strict=True))
    used = (tokens != PAD).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return tokens[:, :width], labels[:, :width], feats


# ---------------------------------------------------------------------------------- datasets
def media_key(path: str) -> str:
    """Normalise a media reference (``images/s001.png``, ``./images/s001.png``) for lookup."""
    return Path(path).as_posix().lstrip("./")


class FeatureDataset(Dataset):
    """Tokenised examples with their cached perceptual features.

    ``features`` maps ``media_key(media)`` to a ``(feature_dim,)`` tensor; text-only examples
    (``media is None``) get zeros. Items: ``(tokens (max_len,), labels (max_len,),
    feats (feature_dim,))``. Tokenisation happens once, here.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: TextTokenizer,
        max_len: int,
        features: Mapping[str, torch.Tensor],
        feature_dim: int,
    ) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.examples = list(examples)
        self.feature_dim = feature_dim
        rows = []
        for ex in self.examples:
            rows.append(self._feature(ex, features))
        self.feats = torch.stack(rows) if rows else torch.zeros(0, feature_dim)
        encoded = [encode_example(tokenizer, ex.prompt(), ex.output, max_len) for ex in examples]
        self.tokens = torch.stack([t for t, _ in encoded]) if encoded else torch.zeros(0, max_len)
        self.labels = torch.stack([lab for _, lab in encoded]) if encoded else self.tokens.clone()

    lengths = property(lambda self: token_lengths(self.tokens))

    def _feature(self, ex: Example, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if ex.media is None:
            return torch.zeros(self.feature_dim)
        key = media_key(ex.media)
        if key not in features:
            raise KeyError(f"no cached feature for media {ex.media!r} (example {ex.id})")
        feat = features[key].float().reshape(-1)
        if feat.numel() != self.feature_dim:
            raise ValueError(
                f"feature of {ex.media!r} has {feat.numel()} values, not {self.feature_dim}"
            )
        return feat

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens[i], self.labels[i], self.feats[i]


class TokenDataset(Dataset):
    """Plain language-model documents: ``(tokens, labels, feats)`` with labels on every token
    (after BOS) and no perceptual input. Used to train the base LM."""

    def __init__(self, documents: Sequence[str], tokenizer: TextTokenizer, max_len: int) -> None:
        self.tokens = torch.full((len(documents), max_len), PAD, dtype=torch.long)
        for i, doc in enumerate(documents):
            ids = tokenizer.encode(doc, bos=True, eos=True)[:max_len]
            self.tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.labels = self.tokens.clone()
        self.labels[:, 0] = IGNORE  # BOS is never predicted

    lengths = property(lambda self: token_lengths(self.tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        return self.tokens[i], self.labels[i], torch.zeros(0)


def features_by_media(
    ids: Sequence[str], feats: torch.Tensor, files: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Join ``compute_features`` output ``(ids, feats (N, D))`` to media paths.

    ``files`` maps a scene id to its media path (``scene.files[modality]``). The result maps
    ``media_key(path)`` to the scene's ``(D,)`` feature row.
    """
    if len(ids) != len(feats):
        raise ValueError(f"{len(ids)} ids but {len(feats)} feature rows")
    return {media_key(files[i]): feats[k] for k, i in enumerate(ids) if i in files}


# ------------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class ShardedOrder:
    """Deterministic per-epoch example order, sharded over ranks like ``DistributedSampler``.

    Epoch ``e`` shuffles with a generator seeded ``seed + e``, pads by repeating the head so
    every rank gets the same count, and gives rank ``r`` the positions ``r, r + W, ...``.
    The order is a pure function of ``(seed, epoch)``, so a checkpoint only records those and
    the step to resume the exact data stream.

    Length grouping (``group > 0`` with ``lengths``, the examples' token counts): each run of
    ``group`` consecutive batches of a rank is re-cut from its examples sorted by length, and
    those batches are then shuffled among themselves. A batch is padded to its longest
    example (:func:`collate`), so batches of similar lengths waste less compute; the batches
    still hold the same examples per epoch, and their order stays a pure function of
    ``(seed, epoch)``.
    """

    n: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    group: int = 0
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("cannot shard an empty dataset")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.group < 0:
            raise ValueError(f"group must be >= 0, got {self.group}")
        if self.group and (self.lengths is None or len(self.lengths) != self.n):
            got = None if self.lengths is None else len(self.lengths)
            raise ValueError(f"group {self.group} needs lengths for {self.n} examples, got {got}")

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[list[int]]:
        """Full batches of this rank's indices for ``epoch``, from batch number ``start``."""
        idx = self.indices(epoch)
        count = len(idx) // batch_size
        batches = [idx[b * batch_size : (b + 1) * batch_size] for b in range(count)]
        if self.group and self.lengths is not None:
            batches = self._grouped(batches, batch_size, epoch)
        yield from batches[start:]

    def _grouped(self, batches: list[list[int]], batch_size: int, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + 7919 * epoch + self.rank)
        out: list[list[int]] = []
        for s in range(0, len(batches), self.group):
            run = sorted(sum(batches[s : s + self.group], []), key=self.lengths.__getitem__)
            cut = [run[k : k + batch_size] for k in range(0, len(run), batch_size)]
            out += [cut[i] for i in torch.randperm(len(cut), generator=g).tolist()]
        return out

    def n_batches(self, batch_size: int) -> int:
        return self.per_rank // batch_size
