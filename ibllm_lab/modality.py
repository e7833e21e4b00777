"""Modalities, the encoder and visual-cache contracts, and embedding fusion.

This is the small shared vocabulary that the encoders, the visual cache and the
ImageBind-LLM model agree on. It depends on torch only.

The modality API is a dict in, dict out (as ImageBind's ``model({Modality.AUDIO: x})``):
an encoder maps ``{modality: batch}`` to ``{modality: (B, embed_dim) unit-norm embeddings}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


class Modality(str, Enum):
    """Modality keys. The values are the reference implementation's input names."""

    IMAGE = "Image"
    VIDEO = "Video"
    AUDIO = "Audio"
    POINT = "Point"
    DEPTH = "Depth"
    TEXT = "Text"
    THERMAL = "Thermal"
    IMU = "IMU"

    @classmethod
    def parse(cls, name: str | Modality) -> Modality:
        """Accept ``Modality``, its value (``"Audio"``) or its name in any case (``"audio"``)."""
        if isinstance(name, Modality):
            return name
        for m in cls:
            if name == m.value or str(name).upper() == m.name:
                return m
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown modality {name!r}; expected one of: {valid}")


@runtime_checkable
class Encoder(Protocol):
    """A frozen joint-embedding encoder (ImageBind, BindLite, or precomputed features).

    ``embed_dim``: width of the shared space. ``modalities``: the modalities it accepts.
    Calling it with ``{modality: batch}`` returns ``{modality: (B, embed_dim)}`` embeddings,
    each row L2-normalised.
    """

    embed_dim: int

    @property
    def modalities(self) -> Sequence[Modality]: ...

    def __call__(self, inputs: Mapping[Modality, torch.Tensor]) -> dict[Modality, torch.Tensor]: ...


@runtime_checkable
class VisualCache(Protocol):
    """The training-free visual cache hook (METHOD.md, data flow step 3).

    ``__call__(query (B, D), cache_size, cache_t, cache_weight) -> (B, D)``: retrieves the
    ``cache_size`` nearest image embeddings of each query, mixes them with
    ``softmax(sim * cache_t)``, re-normalises the prototype, and returns
    ``normalize((1 - cache_weight) * query + cache_weight * prototype)`` on the query's
    device and dtype. ``FaissCache`` and ``TorchCache`` also take a keyword ``gate``
    (``ibllm_lab.cache.CacheGate``: per-query weights), passed only when one is asked for.
    """

    def __call__(
        self, query: torch.Tensor, cache_size: int, cache_t: float, cache_weight: float
    ) -> torch.Tensor: ...


Inputs = Mapping["Modality | str", "tuple[torch.Tensor, float] | list"]


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """The method's weight normalisation ``w / (sum(w) + 1e-6)``."""
    total = float(sum(weights))
    return [float(w) / (total + 1e-6) for w in weights]


def fuse(embeddings: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Embedding arithmetic: weighted sum of L2-normalised embeddings.

    Each embedding is ``(B, D)``; the result is ``(B, D)`` and is *not* re-normalised
    (the reference feeds it to the cache / bind network as is).
    """
    if len(embeddings) == 0:
        raise ValueError("fuse() needs at least one embedding")
    if len(embeddings) != len(weights):
        raise ValueError(f"{len(embeddings)} embeddings but {len(weights)} weights")
    shapes = {tuple(e.shape) for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"embeddings to fuse must share one shape, got {sorted(shapes)}")
    ws = normalise_weights(weights)
    out = torch.zeros_like(embeddings[0], dtype=torch.float32)
    for emb, w in zip(embeddings, ws, strict=True):
        out = out + F.normalize(emb.float(), dim=-1) * w
    return out.to(embeddings[0].dtype)


def split_inputs(inputs: Inputs) -> tuple[dict[Modality, torch.Tensor], list[float]]:
    """Parse the reference's ``{'Image': [tensor, weight], ...}`` convention.

    Returns ``({Modality: tensor}, [weight, ...])`` in the dict's order. A weight may be any
    non-negative number; a bare tensor means weight 1.
    """
    if not inputs:
        raise ValueError("inputs is empty: pass e.g. {'Image': [tensor, 1]}")
    tensors: dict[Modality, torch.Tensor] = {}
    weights: list[float] = []
    for key, value in inputs.items():
        modality = Modality.parse(key)
        if isinstance(value, torch.Tensor):
            tensor, weight = value, 1.0
        else:
            try:
                tensor, weight = value
            except (TypeError, ValueError):
                raise ValueError(
                    f"inputs[{key!r}] must be [tensor, weight] or a tensor, got {type(value)}"
                ) from None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"inputs[{key!r}][0] must be a torch.Tensor, got {type(tensor)}")
        if float(weight) < 0:
            raise ValueError(f"inputs[{key!r}] has a negative weight {weight}")
        tensors[modality] = tensor
        weights.append(float(weight))
    return tensors, weights
