"""The zero-shot transfer experiment: train on image-text only, ask about other modalities.

The paper's central claim (METHOD.md): because every encoder maps into the image-aligned
joint space, an LLM tuned on image-text data alone answers about sounds, videos, depth maps
and point clouds, and a training-free cache of image features narrows what remains of the
gap. :func:`run_transfer` measures it on a generated world's held-out test scenes:

- conditions: each modality alone (Image, Video, Audio, Point, Depth), each with and
  without the visual cache (``FaissCache`` over the *train* scenes' image features);
  mixtures (one scene's image fused with another scene's audio at several audio weights);
  a text-only baseline (all-zero features: no perceptual input);
- probes per scene, in the training data's wording (``ibllm_lab.world``): one attribute
  question per attribute, one yes/no question per image-carried attribute, "Describe the
  image." and the pre-training caption prompt; greedy decoding;
- metrics: attribute accuracy on normalised answers (``world.answer_normalise``) with the
  world's ``carries`` per modality, yes/no accuracy, which attributes a description names
  correctly, caption CIDEr-D / BLEU-4 (``ibllm_lab.metrics.caption_scores``), chance levels;
  for mixtures, how often the answer follows the image's scene or the audio's scene;
- weaker alignment: embeddings of some modalities with added noise (simulated), with and
  without the cache, where the cache's pull towards the image distribution should show;
- a step-0 check: with zero gates the model's logits equal the base LLaMA's exactly.

The result is one long table (a row per condition, probe kind, attribute and metric),
saved as CSV; :func:`summary` pivots it for reading.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ibllm_lab.modality import Modality, fuse

logger = logging.getLogger(__name__)

MODALITIES = ("Image", "Video", "Audio", "Point", "Depth")
RESULTS = "transfer.csv"


@dataclass
class TransferConfig:
    """Settings of the transfer experiment.

    ``n_scenes``: at most this many test scenes (None: all). ``mix``: the two modalities of
    the mixture condition (the first from scene A, the second from scene B), fused with the
    second's weight in ``mix_weights``. Cache options are the method's (size 10, t 20,
    weight 0.5); ``cache_gate_quantile`` and ``cache_gate_ramp`` add the gated cache's rows
    (``ibllm_lab.cache.calibrate_gate``). ``max_gen_len``: tokens generated per probe kind.
    """

    modalities: tuple[str, ...] = MODALITIES
    split: str = "test"
    n_scenes: int | None = None
    mix: tuple[str, str] = ("Image", "Audio")
    mix_weights: tuple[float, ...] = (0.25, 0.5, 0.75)
    # weaker alignment, simulated: (modality, noise) adds a random direction of norm
    # ``noise`` to each unit embedding and re-normalises (then with and without the cache)
    degraded: tuple[tuple[str, float], ...] = (("Audio", 1.0), ("Point", 1.0))
    # weaker alignment, real: ``weak_modalities`` re-aligned to the same image tower with
    # ``weak_stage2_epochs`` stage-2 epochs (``encoders.realign``; BindLite encoders only;
    # 0 = off), then evaluated with and without the cache as "<modality> (weak encoder)"
    weak_modalities: tuple[str, ...] = ("Audio", "Point")
    weak_stage2_epochs: int = 1
    cache_size: int = 10
    cache_t: float = 20.0
    cache_weight: float = 0.5
    # the gated cache (``ibllm_lab.cache.CacheGate``, not the method's): every condition is
    # also evaluated "+ gated cache", the threshold at this quantile of the bank's own
    # nearest-neighbour similarity (``calibrate_gate``; None: no gated rows)
    cache_gate_quantile: float | None = 0.01
    cache_gate_ramp: float = 0.1
    max_gen_len: dict[str, int] = field(
        default_factory=lambda: {"attribute": 6, "yesno": 3, "describe": 32, "caption": 32}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        self.modalities = tuple(Modality.parse(m).value for m in self.modalities)
        self.mix = tuple(Modality.parse(m).value for m in self.mix)
        if len(self.mix) != 2:
            raise ValueError(f"mix needs two modalities, got {self.mix}")
        if any(not 0 < w < 1 for w in self.mix_weights):
            raise ValueError(f"mix_weights must lie in (0, 1): {self.mix_weights}")
        if self.n_scenes is not None and self.n_scenes < 2:
            raise ValueError("n_scenes must be >= 2 (mixtures pair scenes)")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split {self.split!r}: expected train, val or test")
        self.degraded = tuple((Modality.parse(m).value, float(n)) for m, n in self.degraded)
        self.weak_modalities = tuple(Modality.parse(m).value for m in self.weak_modalities)
        if self.weak_stage2_epochs < 0:
            raise ValueError(f"weak_stage2_epochs must be >= 0: {self.weak_stage2_epochs}")
        if self.cache_gate_quantile is not None and not 0 < self.cache_gate_quantile < 1:
            raise ValueError(f"cache_gate_quantile must lie in (0, 1): {self.cache_gate_quantile}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TransferConfig:
        presets = {
            "default": {"n_scenes": 200},
            "quick": {"n_scenes": 24, "mix_weights": (0.25, 0.75)},
        }
        if name not in presets:
            raise ValueError(f"unknown transfer preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# ---------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class Probe:
    """One question about one scene: ``kind`` is attribute / yesno / describe / caption."""

    scene: int  # index into the evaluated scene list
    kind: str
    attribute: str | None
    prompt: str
    answer: str


def build_probes(scenes: Sequence[Any], seed: int = 0) -> list[Probe]:
    """The probe set, identical for every condition: per scene one attribute question per
    attribute (motion included), one yes/no question per image-carried attribute (asking the
    true value or another with equal odds), a description and a caption request."""
    from ibllm_lab.data import CAPTION_INSTRUCTION
    from ibllm_lab.model import format_prompt
    from ibllm_lab.world import ATTRIBUTE_QUESTIONS, ATTRIBUTES, CARRIES, yesno_question

    rng = np.random.default_rng(seed)
    image_attrs = [a for a in ATTRIBUTES if a in CARRIES[Modality.IMAGE]]
    probes = []
    for i, scene in enumerate(scenes):
        truth = scene.attributes
        for attr in ATTRIBUTES:
            q = ATTRIBUTE_QUESTIONS[attr].format(medium="image")
            probes.append(Probe(i, "attribute", attr, format_prompt(q), truth[attr]))
        for attr in image_attrs:
            others = [v for v in ATTRIBUTES[attr] if v != truth[attr]]
            ask = truth[attr] if rng.random() < 0.5 else str(rng.choice(others))
            q = yesno_question(attr, ask, "image")
            answer = "yes" if ask == truth[attr] else "no"
            probes.append(Probe(i, "yesno", attr, format_prompt(q), answer))
        probes.append(Probe(i, "describe", None, format_prompt("Describe the image."), ""))
        probes.append(Probe(i, "caption", None, format_prompt(CAPTION_INSTRUCTION), ""))
    return probes


def answer(
    model: Any, feats: torch.Tensor | None, probes: Sequence[Probe], max_gen_len: Mapping[str, int]
) -> list[str]:
    """Greedy answers to ``probes``; ``feats (n_scenes, D)`` or None (text-only)."""
    out: list[str] = [""] * len(probes)
    for kind, n_tokens in max_gen_len.items():
        idx = [k for k, p in enumerate(probes) if p.kind == kind]
        if not idx:
            continue
        rows = None
        if feats is not None:
            rows = feats[torch.tensor([probes[k].scene for k in idx])].to(model.device)
        texts = model.generate_from_feats(
            rows, [probes[k].prompt for k in idx], max_gen_len=n_tokens, temperature=0.0
        )
        for k, text in zip(idx, texts, strict=True):
            out[k] = text.strip()
    return out


# ---------------------------------------------------------------------------------- scoring
def _mentions(text: str) -> dict[str, set[str]]:
    """Which value of each attribute a description mentions (shapes also in plural)."""
    from ibllm_lab.world import ATTRIBUTES, PLURALS

    text = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for attr, values in ATTRIBUTES.items():
        for v in values:
            forms = [v, PLURALS.get(v, v)]
            if attr == "motion":
                forms = ["standing still"] if v == "static" else [f"moving {v}"]
            if any(f" {f} " in text for f in forms):
                found[attr].add(v)
    # "top left" also contains "left": a position mention is not a motion mention
    return found


def describe_correct(text: str, truth: Mapping[str, str]) -> dict[str, bool]:
    """Per attribute: the description names the true value and no other value."""
    found = _mentions(text)
    return {a: found[a] == {v} for a, v in truth.items()}


def _chance(attr: str) -> float:
    from ibllm_lab.world import ATTRIBUTES

    return 1.0 / len(ATTRIBUTES[attr])


def score(
    probes: Sequence[Probe], answers: Sequence[str], scenes: Sequence[Any], condition: dict
) -> list[dict[str, Any]]:
    """Rows of metrics for one condition (``condition``: columns shared by its rows)."""
    from ibllm_lab.metrics import extract_yes_no
    from ibllm_lab.world import ATTRIBUTES, answer_normalise, carries

    modality = condition.get("modality")
    carried = carries(modality) if modality in MODALITIES else frozenset()
    rows = []

    def row(kind, attr, metric, values, chance):
        rows.append(
            {
                **condition,
                "kind": kind,
                "attribute": attr,
                "carried": attr in carried if attr else None,
                "metric": metric,
                "value": float(np.mean(values)),
                "chance": chance,
                "n": len(values),
            }
        )

    for attr in ATTRIBUTES:
        judged = [
            (scenes[p.scene].heldout, answer_normalise(a) == p.answer)
            for p, a in zip(probes, answers, strict=True)
            if p.kind == "attribute" and p.attribute == attr
        ]
        row("attribute", attr, "accuracy", [ok for _, ok in judged], _chance(attr))
        # test scenes whose (shape, colour) combination training saw, and the held-out
        # combinations no training data shows (a compositional test)
        for metric, novel in (
            ("accuracy seen combinations", False),
            ("accuracy novel combinations", True),
        ):
            hits = [ok for heldout, ok in judged if bool(heldout) == novel]
            if hits:
                row("attribute", attr, metric, hits, _chance(attr))
        yes = [
            extract_yes_no(a) == p.answer
            for p, a in zip(probes, answers, strict=True)
            if p.kind == "yesno" and p.attribute == attr
        ]
        if yes:
            row("yesno", attr, "accuracy", yes, 0.5)
        desc = [
            describe_correct(a, scenes[p.scene].attributes)[attr]
            for p, a in zip(probes, answers, strict=True)
            if p.kind == "describe"
        ]
        row("describe", attr, "named_correctly", desc, _chance(attr))
    rows += _caption_rows(probes, answers, scenes, condition)
    return rows


def _caption_rows(probes, answers, scenes, condition) -> list[dict[str, Any]]:
    from ibllm_lab.metrics import caption_scores

    preds = {str(p.scene): a for p, a in zip(probes, answers, strict=True) if p.kind == "caption"}
    refs = {str(p.scene): list(scenes[p.scene].captions) for p in probes if p.kind == "caption"}
    scores = caption_scores(preds, refs)
    return [
        {
            **condition,
            "kind": "caption",
            "attribute": None,
            "carried": None,
            "metric": name,
            "value": float(value),
            "chance": float("nan"),
            "n": len(preds),
        }
        for name, value in scores.items()
    ]


# ------------------------------------------------------------------------------ conditions
def step0_check(
    llama_dir: str | Path, adapter_cfg: Any, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, Any]:
    """Build the multimodal model with a fresh adapter (zero gates, random bind network)
    and compare its logits on random tokens and random features with the base LLaMA's."""
    from ibllm_lab.checkpoint import load, load_base_weights, load_llama
    from ibllm_lab.llama import Llama

    torch.manual_seed(seed)
    model = load(llama_dir, None, adapter_cfg=adapter_cfg, device=device)
    state, cfg = load_llama(llama_dir)
    base = Llama(cfg, device=device)
    load_base_weights(base, state)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.vocab_size, (4, 24), generator=g).to(device)
    feats = torch.randn(4, adapter_cfg.encoder_dim, generator=g).to(device)
    with torch.no_grad():
        ours, ref = model.logits(tokens, feats), base(tokens).float()
    return {"equal": bool(torch.equal(ours, ref)), "max_abs_diff": float((ours - ref).abs().max())}


def _mixture_rows(model, probes, scenes, feats_a, feats_b, partner, cfg) -> list[dict]:
    """Attribute questions on fused features: does the answer follow scene A (first
    modality) or scene B (second)? Only attributes both modalities carry and on which the
    two scenes differ are counted."""
    from ibllm_lab.world import answer_normalise, carries

    first, second = (Modality.parse(m) for m in cfg.mix)
    shared = carries(first) & carries(second)
    attr_probes = [p for p in probes if p.kind == "attribute" and p.attribute in shared]
    rows = []
    for w in cfg.mix_weights:
        fused = fuse([feats_a, feats_b], [1.0 - w, w])
        answers = answer(model, fused, attr_probes, cfg.max_gen_len)
        for attr in sorted(shared):
            pairs = [
                (
                    answer_normalise(a),
                    scenes[p.scene].attributes[attr],
                    scenes[partner[p.scene]].attributes[attr],
                )
                for p, a in zip(attr_probes, answers, strict=True)
                if p.attribute == attr
            ]
            pairs = [(a, ta, tb) for a, ta, tb in pairs if ta != tb]
            if not pairs:
                continue
            cond = {
                "condition": f"{first.value}+{second.value} w={w:g}",
                "modality": f"{first.value}+{second.value}",
                "cache": False,
                "weight": w,
            }
            for metric, k in (("follows_first", 1), ("follows_second", 2)):
                rows.append(
                    {
                        **cond,
                        "kind": "mixture",
                        "attribute": attr,
                        "carried": True,
                        "metric": metric,
                        "value": float(np.mean([p[0] == p[k] for p in pairs])),
                        "chance": _chance(attr),
                        "n": len(pairs),
                    }
                )
    return rows


def degrade(feats: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    """``normalize(f + noise * u)`` with ``u`` a random unit direction per row: a simulated,
    weaker alignment (the embedding keeps its direction only partly)."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(feats.shape, generator=g), dim=-1)
    return F.normalize(F.normalize(feats.float(), dim=-1) + noise * u, dim=-1)


def _scene_features(
    encoder: Any, world: Any, scenes: Sequence[Any], modalities: Sequence[str], feature_dir
) -> dict[str, torch.Tensor]:
    """``{modality: (len(scenes), D)}`` features through the on-disk cache in ``feature_dir``."""
    from ibllm_lab.encoders import compute_features

    out = {}
    for m in dict.fromkeys(modalities):
        ids, all_feats = compute_features(encoder, world, m, feature_dir)
        row = {sid: k for k, sid in enumerate(ids)}
        out[m] = all_feats[torch.tensor([row[s.id] for s in scenes])].float()
    return out


def evaluate_transfer(
    model: Any,
    world: Any,
    encoder: Any,
    feature_dir: str | Path,
    cfg: TransferConfig | None = None,
    cache: Any = None,
    weak_encoder: Any = None,
) -> pd.DataFrame:
    """Every condition of the experiment for a trained ``model`` (an ``ImageBindLLM``).

    ``encoder``'s features of every scene are read through the on-disk cache in
    ``feature_dir`` (``compute_features``); ``cache`` (a ``VisualCache``, e.g. a
    ``FaissCache`` over the train scenes' image features) adds the "with cache" rows, and
    with ``cfg.cache_gate_quantile`` (a ``FaissCache`` or ``TorchCache``) the "with gated
    cache" rows (column ``cache_gate``);
    ``weak_encoder`` (same image tower, weaker alignment of ``cfg.weak_modalities``, see
    ``encoders.realign``) adds "<modality> (weak encoder)" rows (features cached in
    ``feature_dir/weak``).
    """
    cfg = cfg or TransferConfig()
    scenes = world.split(cfg.split)[: cfg.n_scenes]
    if len(scenes) < 2:
        raise ValueError(f"split {cfg.split!r} has {len(scenes)} scenes; need >= 2")
    probes = build_probes(scenes, cfg.seed)
    feats = _scene_features(encoder, world, scenes, [*cfg.modalities, *cfg.mix], feature_dir)
    rows = []
    t0 = time.perf_counter()
    conditions = [(m, "", feats[m], 0.0) for m in cfg.modalities]
    conditions += [
        (m, f" (noise {noise:g})", degrade(feats[m], noise, cfg.seed), noise)
        for m, noise in cfg.degraded
    ]
    if weak_encoder is not None:
        weak = _scene_features(
            weak_encoder, world, scenes, cfg.weak_modalities, Path(feature_dir) / "weak"
        )
        conditions += [(m, " (weak encoder)", weak[m], 0.0) for m in cfg.weak_modalities]
    # (label suffix, uses the cache, gate)
    modes: list[tuple[str, bool, Any]] = [("", False, None)]
    if cache is not None:
        modes.append((" + cache", True, None))
        if cfg.cache_gate_quantile is not None:
            from ibllm_lab.cache import calibrate_gate

            gate = calibrate_gate(cache, cfg.cache_gate_quantile, cfg.cache_gate_ramp)
            logger.info("gated cache: %s", gate)
            modes.append((" + gated cache", True, gate))
    for m, label, f_m, noise in conditions:
        for suffix, use_cache, gate in modes:
            gated = {} if gate is None else {"gate": gate}
            f = (
                cache(f_m, cfg.cache_size, cfg.cache_t, cfg.cache_weight, **gated)
                if use_cache
                else f_m
            )
            name = m + label + suffix
            cond = {
                "condition": name,
                "modality": m,
                "cache": use_cache,
                "cache_gate": gate is not None,
                "weight": 1.0,
                "noise": noise,
            }
            rows += score(probes, answer(model, f, probes, cfg.max_gen_len), scenes, cond)
            logger.info("%s done (%.0f s)", name, time.perf_counter() - t0)
    cond = {
        "condition": "text-only",
        "modality": "none",
        "cache": False,
        "cache_gate": False,
        "weight": 0.0,
    }
    rows += score(probes, answer(model, None, probes, cfg.max_gen_len), scenes, cond)
    partner = [(i + 1) % len(scenes) for i in range(len(scenes))]
    rows += _mixture_rows(
        model,
        probes,
        scenes,
        feats[cfg.mix[0]],
        feats[cfg.mix[1]][torch.tensor(partner)],
        partner,
        cfg,
    )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ top level
def train_cache(world: Any, encoder: Any, feature_dir: str | Path, kind: str = "flat") -> Any:
    """The visual cache: a ``FaissCache`` over the image features of the *train* scenes."""
    from ibllm_lab.cache import FaissCache
    from ibllm_lab.encoders import compute_features

    ids, feats = compute_features(encoder, world, Modality.IMAGE, feature_dir)
    train = {s.id for s in world.split("train")}
    rows = torch.tensor([k for k, i in enumerate(ids) if i in train])
    return FaissCache.build(feats[rows].float(), kind=kind)


def weak_encoder(world: Any, encoder: Any, cfg: TransferConfig, device="cpu") -> Any:
    """The weaker-alignment encoder of ``cfg`` (``encoders.realign`` of
    ``cfg.weak_modalities`` with ``cfg.weak_stage2_epochs``: the same image tower), or None
    when off or ``encoder`` is not a BindLite."""
    from ibllm_lab.encoders import BindLite, realign

    if not cfg.weak_stage2_epochs or not isinstance(encoder, BindLite):
        return None
    return realign(
        encoder,
        world,
        cfg.weak_modalities,
        device,
        stage2_epochs=cfg.weak_stage2_epochs,
        stage2_rerender_every={},
    )


def run_transfer(
    world: Any,
    encoder: Any,
    out_dir: str | Path,
    *,
    preset: str = "default",
    cfg: TransferConfig | None = None,
    train_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    train_overrides: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """The whole experiment in one call; returns the table and saves ``out_dir/transfer.csv``.

    Trains (or reuses) base LM, pre-training and fine-tuning on image-text data only
    (``ibllm_lab.train.train_pipeline`` with ``preset``, under ``train_dir``, default
    ``out_dir/train``), builds the cache from the train scenes' image features, evaluates
    every condition on the held-out split (:func:`evaluate_transfer`) and adds the step-0
    check (``kind == "check"``: zero-gate logits equal the base LM's). ``train_overrides``
    (TrainConfig fields) apply to all three training stages.
    """
    from ibllm_lab.checkpoint import load
    from ibllm_lab.io import atomic_write_text
    from ibllm_lab.train import train_pipeline

    out_dir = Path(out_dir)
    cfg = cfg or TransferConfig.from_name(preset if preset in ("default", "quick") else "default")
    trained = train_pipeline(
        world,
        encoder,
        train_dir or out_dir / "train",
        preset=preset,
        device=device,
        progress=progress,
        **(train_overrides or {}),
    )
    feature_dir = Path(train_dir or out_dir / "train") / "features"
    model = load(trained.llama_dir, trained.finetune, device=device, max_batch_size=128)
    cache = train_cache(world, encoder, feature_dir)
    weak = weak_encoder(world, encoder, cfg, device)
    df = evaluate_transfer(model, world, encoder, feature_dir, cfg, cache, weak)
    check = step0_check(trained.llama_dir, model.adapter_cfg, device)
    df = pd.concat(
        [
            df,
            pd.DataFrame(
                [
                    {
                        "condition": "step 0",
                        "modality": "none",
                        "cache": False,
                        "weight": 0.0,
                        "kind": "check",
                        "attribute": None,
                        "carried": None,
                        "metric": metric,
                        "value": float(check[key]),
                        "chance": float("nan"),
                        "n": 1,
                    }
                    for metric, key in (
                        ("logits_equal_base", "equal"),
                        ("max_abs_diff", "max_abs_diff"),
                    )
                ]
            ),
        ],
        ignore_index=True,
    )
    df.attrs["train_seconds"] = trained.seconds
    atomic_write_text(out_dir / RESULTS, df.to_csv(index=False))
    return df


def _mean(rows: pd.DataFrame, metric: str, carried: bool, column: str = "value") -> float:
    """Mean ``column`` of the attribute ``rows`` with ``metric`` on (not) carried attributes."""
    return rows[(rows.metric == metric) & (rows.carried == carried)][column].mean()


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: attribute accuracy on carried and uncarried attributes (and on
    carried ones split into test scenes of seen and of novel (held-out) shape-colour
    combinations), on the bindable ones (carried by the modality and by images, which is
    all that image-text training can teach; with ``Difficulty.motion_trail`` 0 images are
    true stills and video's motion is carried, not bindable; split the same way), yes/no
    accuracy, attributes a description names correctly, caption CIDEr-D and BLEU-4."""
    from ibllm_lab.world import carries

    single = df[df.kind.isin(["attribute", "yesno", "describe", "caption"])]
    image_attrs = carries(Modality.IMAGE)
    out = {}
    for cond, g in single.groupby("condition", sort=False):
        att = g[g.kind == "attribute"]
        bindable = att[(att.carried == True) & att.attribute.isin(image_attrs)]  # noqa: E712
        out[cond] = {
            "attr_carried": _mean(att, "accuracy", True),
            "attr_bindable": _mean(bindable, "accuracy", True),
            "attr_carried_seen": _mean(att, "accuracy seen combinations", True),
            "attr_carried_novel": _mean(att, "accuracy novel combinations", True),
            "attr_bindable_seen": _mean(bindable, "accuracy seen combinations", True),
            "attr_bindable_novel": _mean(bindable, "accuracy novel combinations", True),
            "attr_uncarried": _mean(att, "accuracy", False),
            "chance_uncarried": _mean(att, "accuracy", False, "chance"),
            "yesno": g[g.kind == "yesno"]["value"].mean(),
            "describe": g[g.kind == "describe"]["value"].mean(),
            "CIDEr": g[(g.kind == "caption") & (g.metric == "CIDEr")]["value"].mean(),
            "BLEU-4": g[(g.kind == "caption") & (g.metric == "BLEU-4")]["value"].mean(),
        }
    return pd.DataFrame(out).T


def cli(argv: list[str]) -> int:
    """``ibllm-lab transfer --world W --out O [--encoder E] [--preset default|quick]``"""
    from ibllm_lab.encoders import BindLite, load_default_encoders
    from ibllm_lab.runtime import default_device
    from ibllm_lab.world import World

    p = argparse.ArgumentParser(prog="ibllm-lab transfer", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, required=True, help="a generated world folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (transfer.csv)")
    p.add_argument("--encoder", type=Path, help="bindlite.pt (default: the world's default)")
    p.add_argument("--train-dir", type=Path, help="training run folder (default OUT/train)")
    p.add_argument("--preset", default="default", help="training preset (default, quick)")
    p.add_argument("--n-scenes", type=int, help="evaluate at most this many test scenes")
    p.add_argument(
        "--weak-stage2-epochs",
        type=int,
        help="stage-2 epochs of the weaker-alignment encoder (0: no weak-encoder rows)",
    )
    p.add_argument(
        "--cache-gate-quantile",
        type=float,
        help="gated-cache threshold: this quantile of the bank's own top-1 similarity "
        "(default 0.01; 0: no gated-cache rows)",
    )
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    args = p.parse_args(argv)
    if args.cache_gate_quantile is not None and not 0 <= args.cache_gate_quantile < 1:
        p.error(f"--cache-gate-quantile must lie in [0, 1), got {args.cache_gate_quantile}")
    device = torch.device(args.device) if args.device else default_device()
    encoder = (
        BindLite.load(args.encoder, device)
        if args.encoder
        else load_default_encoders(args.world, device)
    )
    cfg = TransferConfig.from_name(
        "quick" if args.preset == "quick" else "default",
        **({"n_scenes": args.n_scenes} if args.n_scenes else {}),
        **(
            {"weak_stage2_epochs": args.weak_stage2_epochs}
            if args.weak_stage2_epochs is not None
            else {}
        ),
        **(
            {"cache_gate_quantile": args.cache_gate_quantile or None}
            if args.cache_gate_quantile is not None
            else {}
        ),
    )
    df = run_transfer(
        World.load(args.world),
        encoder,
        args.out,
        preset=args.preset,
        cfg=cfg,
        train_dir=args.train_dir,
        device=device,
    )
    logger.info(
        "transfer table written to %s\n%s", args.out / RESULTS, summary(df).round(3).to_string()
    )
    return 0
