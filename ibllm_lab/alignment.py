"""Measurements of a joint embedding space on a world's held-out scenes.

* ``retrieval_table``: recall@1 and @5 for every ordered modality pair. A hit "per attribute
  combination" is a retrieved scene with the query's attribute tuple, restricted to the
  attributes both modalities carry (scenes with identical attributes cannot be told apart);
  the raw recall counts only the paired scene itself.
* ``zero_shot_table``: emergent zero-shot attribute classification of every modality through
  text prompts. A class is the mean text embedding of prompts naming the value (every caption
  paraphrase of every attribute combination with that value: prompt ensembling). Reported
  next to chance, with whether the modality carries the attribute and whether the attribute is
  *bindable* (carried by the modality, the image and the text, the only route ImageBind-style
  training has). An attribute a modality does not carry must stay at chance.
* ``modality_gap_table``: how far each modality sits from the image embeddings of the same
  scenes (centroid distance, mean cosine to the paired image, mean cosine to other images).

``measure_all(encoder, world)`` runs all three and writes them as CSV.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ibllm_lab.io import atomic_write_text
from ibllm_lab.modality import Modality
from ibllm_lab.world import ATTRIBUTE_NAMES, ATTRIBUTES, CARRIES, Scene, World, captions_for

log = logging.getLogger(__name__)


def embed_scenes(
    encoder, world: World, scenes: Sequence[Scene], modalities: Sequence[Modality]
) -> dict[Modality, torch.Tensor]:
    """``{modality: (N, D)}`` unit-norm embeddings of ``scenes``. Text embeds a paraphrase
    (caption ``1 + i % 5``) so that retrieval is not tested on one template only."""
    from ibllm_lab.encoders import PrecomputedEncoder, load_media

    out = {}
    for m in modalities:
        if isinstance(encoder, PrecomputedEncoder):
            out[m] = encoder.lookup(m, [s.id for s in scenes])
            continue
        if m == Modality.TEXT:
            raw = [s.captions[1 + i % (len(s.captions) - 1)] for i, s in enumerate(scenes)]
        else:
            raw = load_media(world, scenes, m, encoder.prep)
        out[m] = encoder.encode(m, raw)
    return out


def _keys(scenes: Sequence[Scene], attrs: Sequence[str]) -> np.ndarray:
    """Integer code per scene of its attribute tuple restricted to ``attrs``: (N,)."""
    tuples = [s.key(attrs) for s in scenes]
    codes = {t: i for i, t in enumerate(sorted(set(tuples)))}
    return np.array([codes[t] for t in tuples])


def retrieval_table(
    emb: dict[Modality, torch.Tensor], scenes: Sequence[Scene], ks: Sequence[int] = (1, 5)
) -> pd.DataFrame:
    """Recall@k for every ordered pair (query -> target) of the embedded modalities."""
    rows = []
    for q, t in itertools.permutations(emb, 2):
        shared = sorted(CARRIES[q] & CARRIES[t], key=ATTRIBUTE_NAMES.index)
        keys = _keys(scenes, shared)
        sims = emb[q] @ emb[t].T  # (N, N)
        top = sims.topk(max(ks), dim=1).indices.numpy()  # (N, kmax)
        row = {
            "query": q.value,
            "target": t.value,
            "attributes": "+".join(shared),
            "n": len(scenes),
        }
        for k in ks:
            same = keys[top[:, :k]] == keys[:, None]
            row[f"R@{k}"] = float(same.any(1).mean())
            row[f"raw_R@{k}"] = float((top[:, :k] == np.arange(len(scenes))[:, None]).any(1).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def prompt_bank() -> tuple[list[dict[str, str]], list[str]]:
    """Every attribute combination's caption paraphrases: ``(attributes per prompt, prompts)``."""
    attrs_out, prompts = [], []
    for combo in itertools.product(*(ATTRIBUTES[a] for a in ATTRIBUTE_NAMES)):
        attrs = dict(zip(ATTRIBUTE_NAMES, combo, strict=True))
        caps = captions_for(attrs, Modality.TEXT)
        attrs_out += [attrs] * len(caps)
        prompts += caps
    return attrs_out, prompts


def text_classifiers(encoder) -> dict[str, torch.Tensor]:
    """``{attribute: (K, D)}`` class embeddings from text prompts alone: the normalised mean
    embedding of every prompt naming the value."""
    attrs, prompts = prompt_bank()
    z = encoder.encode(Modality.TEXT, prompts)  # (P, D)
    out = {}
    for attribute in ATTRIBUTE_NAMES:
        values = np.array([ATTRIBUTES[attribute].index(a[attribute]) for a in attrs])
        rows = [z[torch.from_numpy(values == k)].mean(0) for k in range(len(ATTRIBUTES[attribute]))]
        out[attribute] = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    return out


def zero_shot_table(
    encoder, emb: dict[Modality, torch.Tensor], scenes: Sequence[Scene]
) -> pd.DataFrame:
    """Emergent zero-shot accuracy per (modality, attribute) with chance and carrying flags."""
    rows = []
    bindable_via = CARRIES[Modality.IMAGE] & CARRIES[Modality.TEXT]
    classifiers = text_classifiers(encoder)
    for attribute in ATTRIBUTE_NAMES:
        classes = classifiers[attribute]
        truth = np.array([ATTRIBUTES[attribute].index(s.attributes[attribute]) for s in scenes])
        counts = np.bincount(truth, minlength=len(ATTRIBUTES[attribute]))
        for m, z in emb.items():
            if m == Modality.TEXT:
                continue
            pred = (z @ classes.T).argmax(1).numpy()
            carried = attribute in CARRIES[m]
            rows.append(
                {
                    "modality": m.value,
                    "attribute": attribute,
                    "accuracy": float((pred == truth).mean()),
                    "chance": 1.0 / len(ATTRIBUTES[attribute]),
                    "majority": float(counts.max() / counts.sum()),
                    "carried": carried,
                    "bindable": carried and attribute in bindable_via,
                    "n": len(scenes),
                }
            )
    return pd.DataFrame(rows)


def modality_gap_table(emb: dict[Modality, torch.Tensor]) -> pd.DataFrame:
    """Distance of each modality's embeddings from the paired image embeddings."""
    img = emb[Modality.IMAGE]
    n = len(img)
    rows = []
    for m, z in emb.items():
        if m == Modality.IMAGE:
            continue
        cos = (z * img).sum(1)
        others = (z @ img.T).sum(1) - cos
        rows.append(
            {
                "modality": m.value,
                "centroid_distance": float((z.mean(0) - img.mean(0)).norm()),
                "mean_cosine_paired": float(cos.mean()),
                "mean_cosine_unpaired": float((others / max(1, n - 1)).mean()),
                "n": n,
            }
        )
    return pd.DataFrame(rows)


def measure_all(
    encoder, world: World, out_dir: str | Path | None = None, split: str = "test"
) -> dict[str, pd.DataFrame]:
    """Retrieval, zero-shot and modality-gap tables on ``split`` (default: the test split,
    held-out combinations included); written as ``<out_dir>/{name}.csv`` when given."""
    scenes = world.split(split)
    if len(scenes) < 5:
        raise ValueError(f"split {split!r} has {len(scenes)} scenes; need at least 5")
    modalities = [m for m in encoder.modalities if m in CARRIES]
    emb = embed_scenes(encoder, world, scenes, modalities)
    tables = {"retrieval": retrieval_table(emb, scenes), "modality_gap": modality_gap_table(emb)}
    if hasattr(encoder, "encode"):  # zero-shot prompts need a text encoder, not stored features
        tables["zero_shot"] = zero_shot_table(encoder, emb, scenes)
    heldout = [i for i, s in enumerate(scenes) if s.heldout]
    if len(heldout) >= 5:
        held = {m: z[heldout] for m, z in emb.items()}
        tables["retrieval_heldout"] = retrieval_table(held, [scenes[i] for i in heldout])
    if out_dir is not None:
        for name, df in tables.items():
            atomic_write_text(Path(out_dir) / f"{name}.csv", df.to_csv(index=False))
    return tables
