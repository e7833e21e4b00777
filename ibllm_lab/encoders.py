"""BindLite: small ImageBind-style encoders into one shared, L2-normalised space.

Training follows ImageBind:

* stage 1: image <-> text contrastive training (symmetric InfoNCE, learnable temperature).
  Each epoch sees fresh renders of the training scenes (``world.render_media``: new layout,
  background, clutter and noise), so the small CNN cannot memorise a few thousand pictures;
  the first ``partial_warmup_epochs`` pair images with short partial captions ("circles",
  "red") naming mostly the shape, which full captions leave without gradient (position and
  colour already tell a batch's captions apart), then full captions follow;
* stage 2: image and text frozen; every other modality (audio, video, point, depth) is
  aligned to the *image* embeddings of the same scene, with its own learnable temperature.
  No audio-text, video-text, point-text or depth-text pairs are used, so classifying a sound
  with a text prompt is emergent.

Towers (all end in a linear map to ``embed_dim``; the output is L2-normalised):

* image, depth: a 3-layer strided CNN over the picture, flattened (position survives);
  ``image_colour="additive"`` (the default preset's) gives the image tower a brightness-only
  CNN plus an added colour stream (``ConvTower``), so shape and colour compose; ``"joint"`` is
  one CNN over RGB;
* text: mean of word and word-bigram embeddings (a vocabulary built from the world's
  captions; bigrams keep "top left" apart from "moving left"), then an MLP;
* audio: a 1-D CNN over the log-mel spectrogram's frames (mel bins as channels); the default
  preset adds a timbre branch whose filters slide along frequency, shared by every pitch
  (``AudioTower``, ``audio_timbre_blur``);
* video: the image tower run on every frame (ImageBind encodes video with its vision encoder;
  stage 2 starts it from the trained image tower and keeps it frozen), then an MLP over the
  frames' mean, max and last-minus-first difference. Trained with image pairs only, it learns
  motion from the images' motion trails (each frame shows its own), the one route image-paired
  binding has; with ``Difficulty.motion_trail`` 0 nothing asks it to carry motion;
* point: PointNet with nearest-neighbour offsets (``PointTower``) or, in the default preset,
  one level of set abstraction with colour added to the geometry (``PointGroupTower``).

The artefact (``BindLite.save``) holds the weights, the text vocabulary and every modality's
preprocessing settings, so ``BindLite.load(path)`` alone can embed raw files.

``PrecomputedEncoder`` implements the same ``Encoder`` protocol from features on disk (e.g.
real ImageBind embeddings computed elsewhere): its inputs are row indices into those features.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ibllm_lab.io import atomic_save_torch, safe_torch_load
from ibllm_lab.media import (
    AUDIO_SCALES,
    AudioPreprocess,
    DepthPreprocess,
    ImagePreprocess,
    PointPreprocess,
    VideoPreprocess,
    config_to_dict,
    read_audio,
    read_depth,
    read_image,
    read_points,
    read_video,
)
from ibllm_lab.modality import Modality
from ibllm_lab.world import (
    ATTRIBUTES,
    MEDIA_MODALITIES,
    PLURALS,
    World,
    motion_phrase,
    render_media,
)

log = logging.getLogger(__name__)

ENCODER_MODALITIES: tuple[Modality, ...] = (Modality.IMAGE, Modality.TEXT, *MEDIA_MODALITIES[1:])
STAGE2_MODALITIES: tuple[Modality, ...] = MEDIA_MODALITIES[1:]  # video, audio, point, depth
HARD_NEGATIVE_ATTRIBUTES = ("shape", "color", "size", "count", "position")
_CAPTION_ORDER = ("count", "size", "color", "shape", "position", "motion")  # partial captions

# ----------------------------------------------------------------------------------------------
# Configuration

ENCODER_PRESETS: dict[str, dict] = {
    # default: partial captions in half the stage-1 texts after the warm-up (image shape
    # zero-shot 0.69 -> 0.95 on the default world; in the 360-scene quick world they cost
    # more than they give, so quick has none); stage 2 on fresh renders (video and point
    # memorised their fixed samples)
    "default": dict(
        embed_dim=128,
        width=8,
        stage1_epochs=46,
        stage2_epochs=15,
        batch_size=128,
        lr=3e-3,
        video_frames=4,
        hard_negative_fraction=0.4,
        rerender_every=1,
        partial_warmup_epochs=8,
        partial_caption_weights=(0.1, 0.1, 0.1, 0.8, 0.1, 0.1),
        partial_caption_prob=0.5,
        stage2_rerender_every={"Video": 3, "Audio": 3, "Point": 2, "Depth": 2},
        # set-abstraction point tower (bench_world_encoders.py, two threads): 32 groups of 32
        # points lifted point -> image R@5 0.94 -> 0.97, zero-shot point shape 0.42 -> 0.50
        # and count 0.63 -> 0.70. Then 24 groups of 24 points aligned for 30 epochs instead
        # of 15, video for 8 (R@5 and zero-shot unchanged, half the time) and stage 1 for 40
        # instead of 30: point shape 0.50 -> 0.61, count 0.70 -> 0.73, image -> text R@1
        # 0.933 -> 0.944, video shape 0.89 -> 0.95; world + encoders 165 s -> 169 s. Colour
        # added to the geometry instead of mixed into it (point_colour, same seed): point
        # shape 0.62 -> 0.71 (held-out combinations 0.42 -> 0.57), colour 0.99 -> 0.98. Point
        # clouds re-rendered every 2 epochs instead of every epoch pay for 36 epochs instead
        # of 30 in the same time: shape 0.70 -> 0.74 and 0.71 -> 0.76 (two seeds)
        point_groups=24,
        point_group_size=24,
        point_colour="additive",
        stage2_epochs_by_modality={"Video": 8, "Point": 36},
        # a pitch-shared timbre branch (AudioTower, same seed, three realignments): zero-shot
        # audio shape 0.75 -> 0.83-0.84 (held-out combinations 0.27 -> 0.50-0.53), colour
        # 0.95 -> 0.88-0.94. All of it (benchmarks/results/world_encoders.json): world +
        # encoders 177 s of the 180 s budget; audio shape 0.86, point shape 0.73
        # Then a log-frequency front end (audio_scale="log" from 100 Hz; mel below 1 kHz is
        # nearly linear, so a timbre's partials spread differently at every pitch) with the
        # CNN's average widened to 17 bins, audio realigned alone on the same image tower:
        # zero-shot audio shape 0.85 -> 0.94 (held-out combinations 0.55 -> 0.82), colour
        # 0.94 -> 0.95; log-mel with 17 bins: shape 0.82; log with 5, 9, 13, 25 bins: 0.83,
        # 0.92, 0.94, 0.96 (colour 0.94, 0.95, 0.94, 0.92). All of it: zero-shot audio shape
        # 0.87 -> 0.94, colour 0.95 -> 0.93, audio -> image R@5 0.91 -> 0.91; the LLaMA's audio
        # answers (no retraining) 0.862 -> 0.872 with the cache, 0.835 -> 0.826 without
        # (benchmarks/results/transfer.csv). World + encoders 171 s after two speed-ups that
        # leave every weight bit-identical (audio synthesised only inside its notes, shapes
        # painted in a window around each object, the point tower's grouping once per set of
        # clouds); the same machine measured 186-196 s before them that day
        audio_timbre_blur=17,
        audio_scale="log",
        audio_f_min=100.0,
        # the point tower's D2 branch (a 24-bin histogram of the distances between 128 of
        # each cloud's points, through an MLP added to its output), point stage realigned
        # alone on the same image tower: zero-shot point shape 0.74 -> 0.86 and 0.88 (two
        # seeds), count 0.73 -> 0.93 and 0.94, point -> image R@5 0.98 -> 0.98-0.99, for 2%
        # more point-stage time (all 256 points: shape 0.87, count 0.93, 43% more; 64
        # points: 0.82, 0.91). The LLaMA trained on image features then answers point clouds
        # 0.80 -> 0.86 (0.84 -> 0.89 with the cache; no retraining: the image tower is the
        # same)
        point_d2_bins=24,
        # locked-image text tuning after stage 1 (text_epochs; the image tower and every
        # image feature unchanged, so the LLaMA's answers are too): image -> text R@1
        # 0.944 -> 0.978, zero-shot audio shape 0.86 -> 0.87, point shape 0.85 -> 0.87, for
        # 0.5 s (benchmarks/results/world_encoders.json). On the trained encoder, with other
        # batches: 4 epochs 0.991, 2 epochs 0.982, learning rate 3e-3 0.987
        text_epochs=8,
        text_lr=1e-3,
        # Images show motion (Difficulty.motion_trail) and captions name it. What teaches it
        # is partial captions naming the motion alone: with motion's weight 0 the image's
        # zero-shot motion stayed at 0.34 (video 0.40), with 0.05 0.69 (0.85), with 0.1 0.83
        # (0.93); a trail of opacity 0.35 instead of 0.6 was not learned (0.37, video 0.49).
        # Learning motion cost shape: zero-shot point shape 0.86 -> 0.79-0.82, audio shape
        # 0.94 -> 0.76-0.83 (two seeds), image -> text R@1 0.978 -> 0.94-0.96. Stage 1 for 46
        # epochs instead of 40, text tuning for 8 instead of 4, and shape named in 0.8 of the
        # partial captions instead of 0.6 (seed 0): R@1 0.957, zero-shot video motion 0.926,
        # shape: video 0.874, audio 0.816, point 0.832, depth 0.856 (bench_world_encoders.py
        # runs with one thread, on the same world; the seed-1 run of 0.6 read audio 0.757)
        # image_colour="additive" (ConvTower) was measured and, before images showed motion,
        # left out of the default
        # (bench_world_encoders.py, two threads). With stage-1 renders reused for 2 epochs
        # (rerender_every=2: rendering is half of stage 1's time), video 6 and depth 10
        # epochs: world + encoders 161 s, image -> text R@1 0.944 -> 0.987, zero-shot point
        # shape 0.73 -> 0.81, point count 0.73 -> 0.74, audio -> image R@5 0.91 -> 0.87,
        # depth shape 0.85 -> 0.80 (0.86 with 12 depth epochs, 2.5 s more). A linear probe
        # trained on seen shape-colour combinations reads held-out ones far better (stage 1
        # alone: shape 0.85 -> 0.93, colour 0.81 -> 0.93). But the tiny LLaMA trained on its
        # features (training preset "default", 300 test scenes) answers colour worse: seen
        # combinations 0.77-0.95 over 7 runs (3 encoder variants, 3 seeds, 2 learning rates)
        # against 0.96-0.97 (4 seeds) with this preset, held-out ones 0.37-0.73 against 0.67,
        # while its held-out shape answers rise 0.71 -> 0.74-0.85.
        # The same holds without it: stage-1 renders reused for 2 epochs, 50 stage-1 epochs,
        # video 6 and depth 12 (176 s): image -> text R@1 0.964, audio -> image R@5 0.92,
        # point shape 0.76, depth shape 0.80, but the LLaMA's colour answers 0.79-0.80
        # (2 seeds; held-out combinations 0.49-0.53). Its colour answers depend on which image
        # tower it reads, more than on its own seed. With the adapter's feature_norm (now in
        # the "tiny" preset) that tower's seen-combination colour recovers (0.98-0.99, 2
        # seeds) but held-out combinations stay worse than with this preset's tower: shape
        # 0.67-0.72 against 0.82-0.85, colour 0.47-0.66 against 0.67-0.71. The additive
        # tower (renders reused for 2 epochs, video 6, depth 12 epochs: image -> text R@1
        # 0.987, point shape 0.81, count 0.74, audio -> image R@5 0.87) with feature_norm:
        # the LLaMA's image answers 0.942 against 0.958 with this preset (445 test scenes;
        # colour 0.81 against 0.87, held-out combinations 0.57 against 0.69), its point
        # answers 0.806 against 0.800, audio 0.822 against 0.835.
        # Then images came to show motion (Difficulty.motion_trail) and the joint tower paid
        # for it with composition: a linear probe trained on its train-scene image features
        # read held-out shape-colour combinations' shape 0.79 -> 0.61 and colour 0.79 -> 0.54,
        # and the LLaMA's image answers fell 0.981 -> 0.839 (held-out combinations 0.965 ->
        # 0.750). The additive tower on the same world: probe shape 0.96, colour 0.94, motion
        # 0.97 on held-out combinations; image -> text R@1 0.957 -> 0.987; zero-shot video
        # motion 0.926 -> 0.960, audio shape 0.820 -> 0.996, point shape 0.832 -> 0.933 (a
        # wider joint tower, width 12: R@1 0.973, audio shape 0.829, point shape 0.849)
        image_colour="additive",
    ),
    "quick": dict(
        embed_dim=64,
        width=8,
        stage1_epochs=25,
        stage2_epochs=15,
        batch_size=64,
        lr=3e-3,
        hard_negative_fraction=0.4,
        rerender_every=1,
        partial_warmup_epochs=6,
        partial_caption_weights=(0.1, 0.1, 0.1, 0.6, 0.1, 0.1),
        stage2_rerender_every={"Video": 3, "Audio": 3, "Point": 1, "Depth": 2},
    ),
}


POINT_D2_RANGE = 1.5  # PointGroupTower's distance histogram covers [0, 1.5) in world units
POINT_COLOUR = ("local", "additive")
IMAGE_COLOUR = ("joint", "additive")


@dataclass
class EncoderConfig:
    """Architecture and training settings of BindLite (presets: "default", "quick").

    ``embed_dim``: width of the shared space. ``width``: base channel count of the CNNs
    (doubles per layer). ``hidden``: MLP width. Epoch counts are per stage; stage 2 trains
    each non-image modality for ``stage2_epochs``. ``temperature``: initial InfoNCE temperature
    (learned, as ImageBind/CLIP, clamped at ``1 / max_logit_scale``)."""

    embed_dim: int = 128
    width: int = 16
    hidden: int = 256
    stage1_epochs: int = 30
    stage2_epochs: int = 20
    # locked-image text tuning after stage 1 (LiT-style): the text tower alone for this many
    # epochs, with learning rate text_lr, against the final image embeddings of the train
    # files (the image tower, and so every image feature, stays as stage 1 left it)
    text_epochs: int = 0
    text_lr: float = 1e-3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    seed: int = 0
    min_bigram_count: int = 2
    video_frames: int | None = None  # frames the video tower sees (None: all of the world's)
    hard_negative_fraction: float = 0.0  # stage-1 epochs with hard-negative batches (option)
    hard_negative_attributes: tuple[str, ...] = HARD_NEGATIVE_ATTRIBUTES  # cycled by epoch
    partial_warmup_epochs: int = 0  # first stage-1 epochs with partial captions only
    # how often a partial caption names each attribute, in _CAPTION_ORDER (count, size, color,
    # shape, position, motion): shape is the slowest to learn, so it is named most (5 weights,
    # as written before motion was captioned, give motion 0)
    partial_caption_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    partial_caption_prob: float = 0.0  # stage-1 texts naming a random subset of attributes
    rerender_every: int = 1  # stage 1 re-renders the train images every k epochs (0 = files)
    # stage 2 re-renders each modality's train samples every k epochs ({modality: k}; missing
    # or 0 = the files only): towers aligned to fixed samples memorise them (video, point)
    stage2_rerender_every: dict[str, int] = field(default_factory=dict)
    # stage-2 epochs per modality ({modality: epochs}; missing = stage2_epochs)
    stage2_epochs_by_modality: dict[str, int] = field(default_factory=dict)
    stage2: tuple[str, ...] = tuple(m.value for m in STAGE2_MODALITIES)
    # stage 2 starts the video tower's frame CNN from the trained image tower and keeps it
    # frozen (ImageBind encodes video with its image encoder); only temporal pooling trains
    video_from_image: bool = True
    # k of the point tower's nearest-neighbour offsets (0 = none); on the default world k = 8
    # lifted point -> image R@5 from 0.89 to 0.94 for a third more point-stage time
    point_neighbours: int = 8
    # the point tower: 0 = one PointNet over all points (PointTower, with point_neighbours);
    # G > 0 = set abstraction over G groups of point_group_size points within
    # point_group_radius (PointGroupTower)
    point_groups: int = 0
    point_group_size: int = 32
    point_group_radius: float = 0.35
    # how PointGroupTower takes colour: "local" (rgb in every MLP) or "additive" (groups see
    # geometry only; an MLP on the mean rgb is added to the output)
    point_colour: str = "local"
    # PointGroupTower's distance histogram (0 = none; k = a k-bin histogram of all pairwise
    # point distances up to POINT_D2_RANGE, the D2 shape distribution, through an MLP added
    # to the output: object sizes, shapes and how many objects are apart)
    point_d2_bins: int = 0
    point_d2_points: int = 128  # the histogram's points: an evenly strided subset (cost ~P^2)
    # how the image tower (and the video tower's frame CNN) takes colour: "joint" (one CNN
    # over rgb) or "additive" (the CNN sees brightness; a colour stream is added; ConvTower)
    image_colour: str = "joint"
    # AudioTower's timbre branch (0 = none; k = its 1-D CNN sees the log-mel map averaged
    # over k mel bins, and a pitch-shared timbre branch is added; see AudioTower)
    audio_timbre_blur: int = 0
    # the audio front end (AudioPreprocess.scale): "mel" (log-mel, as ImageBind) or "log"
    # (filters evenly spaced in log-frequency: a change of pitch shifts a timbre's pattern
    # along the bins unchanged, which the timbre branch's shared filters need), from
    # audio_f_min Hz
    audio_scale: str = "mel"
    audio_f_min: float = 50.0

    def __post_init__(self) -> None:
        if self.embed_dim < 2 or self.width < 1 or self.hidden < 1:
            raise ValueError("embed_dim >= 2, width >= 1 and hidden >= 1 are required")
        if self.point_groups < 0 or self.point_group_size < 1 or self.point_group_radius <= 0:
            raise ValueError(
                "point_groups >= 0, point_group_size >= 1 and point_group_radius > 0 are "
                f"required, got {self.point_groups}, {self.point_group_size}, "
                f"{self.point_group_radius}"
            )
        if self.audio_timbre_blur < 0:
            raise ValueError(f"audio_timbre_blur must be >= 0, got {self.audio_timbre_blur}")
        if self.audio_scale not in AUDIO_SCALES:
            raise ValueError(f"audio_scale must be one of {AUDIO_SCALES}, got {self.audio_scale!r}")
        if self.text_epochs < 0 or self.text_lr <= 0:
            raise ValueError(
                f"text_epochs >= 0 and text_lr > 0 are required, got {self.text_epochs}, "
                f"{self.text_lr}"
            )
        if self.point_d2_bins < 0 or self.point_d2_points < 2:
            raise ValueError(
                "point_d2_bins >= 0 and point_d2_points >= 2 are required, got "
                f"{self.point_d2_bins}, {self.point_d2_points}"
            )
        if self.point_colour not in POINT_COLOUR:
            raise ValueError(
                f"point_colour must be one of {POINT_COLOUR}, got {self.point_colour!r}"
            )
        if self.image_colour not in IMAGE_COLOUR:
            raise ValueError(
                f"image_colour must be one of {IMAGE_COLOUR}, got {self.image_colour!r}"
            )
        if self.batch_size < 2:
            raise ValueError(f"InfoNCE needs batch_size >= 2, got {self.batch_size}")
        if min(self.stage1_epochs, self.stage2_epochs) < 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0 and lr > 0")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ValueError(
                f"hard_negative_fraction must be in [0, 1]: {self.hard_negative_fraction}"
            )
        if not 0.0 <= self.partial_caption_prob <= 1.0:
            raise ValueError(f"partial_caption_prob must be in [0, 1]: {self.partial_caption_prob}")
        weights = tuple(float(w) for w in self.partial_caption_weights)
        if len(weights) == len(_CAPTION_ORDER) - 1:  # written before motion was captioned
            weights += (0.0,)
        if len(weights) != len(_CAPTION_ORDER) or min(weights) < 0:
            raise ValueError(
                f"partial_caption_weights: {len(_CAPTION_ORDER)} non-negative weights, one per "
                f"attribute of {_CAPTION_ORDER}, got {self.partial_caption_weights}"
            )
        self.partial_caption_weights = weights
        if self.partial_warmup_epochs < 0:
            raise ValueError(f"partial_warmup_epochs must be >= 0: {self.partial_warmup_epochs}")
        if self.rerender_every < 0:
            raise ValueError(f"rerender_every must be >= 0, got {self.rerender_every}")
        if not 0 < self.temperature < 1:
            raise ValueError(f"temperature must be in (0, 1), got {self.temperature}")
        self.hard_negative_attributes = tuple(self.hard_negative_attributes)
        if not set(self.hard_negative_attributes) <= set(HARD_NEGATIVE_ATTRIBUTES):
            raise ValueError(
                f"hard_negative_attributes must be among {HARD_NEGATIVE_ATTRIBUTES}: "
                f"{self.hard_negative_attributes}"
            )
        self.stage2 = tuple(Modality.parse(m).value for m in self.stage2)
        every = {Modality.parse(m).value: int(k) for m, k in self.stage2_rerender_every.items()}
        if any(k < 0 for k in every.values()) or not set(every) <= {
            m.value for m in STAGE2_MODALITIES
        }:
            raise ValueError(
                "stage2_rerender_every maps stage-2 modalities to epochs >= 0: "
                f"{self.stage2_rerender_every}"
            )
        self.stage2_rerender_every = every
        by = {Modality.parse(m).value: int(k) for m, k in self.stage2_epochs_by_modality.items()}
        if any(k < 0 for k in by.values()) or not set(by) <= {m.value for m in STAGE2_MODALITIES}:
            raise ValueError(
                "stage2_epochs_by_modality maps stage-2 modalities to epochs >= 0: "
                f"{self.stage2_epochs_by_modality}"
            )
        self.stage2_epochs_by_modality = by
        bad = set(self.stage2) - {m.value for m in STAGE2_MODALITIES}
        if bad:
            raise ValueError(f"stage 2 aligns only {[m.value for m in STAGE2_MODALITIES]}: {bad}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> EncoderConfig:
        if name not in ENCODER_PRESETS:
            raise ValueError(
                f"unknown encoder preset {name!r}; choose from {sorted(ENCODER_PRESETS)}"
            )
        return cls(**{**ENCODER_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage2"] = list(self.stage2)
        d["hard_negative_attributes"] = list(self.hard_negative_attributes)
        d["partial_caption_weights"] = list(self.partial_caption_weights)
        d["stage2_rerender_every"] = dict(self.stage2_rerender_every)
        d["stage2_epochs_by_modality"] = dict(self.stage2_epochs_by_modality)
        return d


@dataclass
class Preprocessing:
    """Every modality's preprocessing settings; saved inside the encoder artefact."""

    image: ImagePreprocess = field(default_factory=ImagePreprocess)
    video: VideoPreprocess = field(default_factory=VideoPreprocess)
    audio: AudioPreprocess = field(default_factory=AudioPreprocess)
    point: PointPreprocess = field(default_factory=PointPreprocess)
    depth: DepthPreprocess = field(default_factory=DepthPreprocess)

    @classmethod
    def for_world(
        cls, world: World, video_frames: int | None = None, **audio: float | str
    ) -> Preprocessing:
        """The world's media sizes; ``audio``: further ``AudioPreprocess`` fields (``scale``,
        ``f_min``, ...)."""
        c = world.config
        return cls(
            image=ImagePreprocess(size=c.image_size),
            video=VideoPreprocess(n_frames=video_frames or c.video_frames, size=c.video_size),
            audio=AudioPreprocess(sample_rate=c.sample_rate, seconds=c.audio_seconds, **audio),
            point=PointPreprocess(n_points=c.n_points),
            depth=DepthPreprocess(size=c.image_size),
        )

    def to_dict(self) -> dict:
        return {
            k: config_to_dict(getattr(self, k))
            for k in ("image", "video", "audio", "point", "depth")
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            image=ImagePreprocess(**d["image"]),
            video=VideoPreprocess(**d["video"]),
            audio=AudioPreprocess(**d["audio"]),
            point=PointPreprocess(**d["point"]),
            depth=DepthPreprocess(**d["depth"]),
        )


# ----------------------------------------------------------------------------------------------
# Text vocabulary

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lower-case word tokens of a caption or prompt."""
    return _WORD.findall(text.lower())


def grams(text: str) -> list[str]:
    """Words and adjacent word pairs ("top left")."""
    w = words(text)
    return w + [f"{a} {b}" for a, b in zip(w, w[1:], strict=False)]


def build_vocab(texts: Sequence[str], min_bigram_count: int = 2) -> list[str]:
    """Sorted vocabulary of words and frequent bigrams; index 0 is padding / unknown."""
    from collections import Counter

    counts = Counter(g for t in texts for g in grams(t))
    keep = sorted(g for g, c in counts.items() if " " not in g or c >= min_bigram_count)
    return ["<pad>", *keep]


# ----------------------------------------------------------------------------------------------
# Towers (from parts to whole)


class ConvTower(nn.Module):
    """Three stride-2 convolutions (5x5, then 3x3; widths 2w, 4w, 8w), then an MLP over the
    flattened map (where things are) and its global max and mean (what things are, wherever
    they are): (B, C, S, S) -> (B, D). The 5x5 first layer sees every pixel despite its stride.

    ``colour="additive"`` (3-channel input only): the CNN sees each pixel's brightest channel
    (one channel: the layout and outlines, nearly without hue), and a colour stream is added
    to its output: a per-pixel MLP (1x1 convolutions) on the image average-pooled over
    ``colour_pool`` x ``colour_pool`` blocks, its max and mean over the picture, then an MLP.
    Shape and colour then reach the embedding as a sum, so a shape-colour pair that training
    never showed still lands near its own caption: on the default world's held-out
    combinations (stage 1, same seed) zero-shot image colour rose from 0.89 to 0.96 and a
    linear probe trained on the seen combinations from 0.81 to 0.93 (``"joint"``, one CNN over
    rgb, is the original design)."""

    def __init__(
        self,
        in_ch: int,
        size: int,
        width: int,
        hidden: int,
        embed_dim: int,
        colour: str = "joint",
        colour_pool: int = 4,
    ):
        super().__init__()
        if colour not in IMAGE_COLOUR:
            raise ValueError(f"colour must be one of {IMAGE_COLOUR}, got {colour!r}")
        self.additive = colour == "additive"
        if self.additive and in_ch != 3:
            raise ValueError(f'colour="additive" needs 3 input channels, got {in_ch}')
        if colour_pool < 1:
            raise ValueError(f"colour_pool must be >= 1, got {colour_pool}")
        self.colour_pool = colour_pool
        self.conv = nn.Sequential(
            nn.Conv2d(1 if self.additive else in_ch, 2 * width, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(4 * width, 8 * width, 3, stride=2, padding=1),
            nn.GELU(),
        )
        side = size
        for _ in range(3):
            side = (side + 1) // 2
        c = 8 * width
        self.head = nn.Sequential(
            nn.Linear(c * side * side + 2 * c, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )
        if self.additive:
            c = 2 * width
            self.pixel = nn.Sequential(nn.Conv2d(3, c, 1), nn.GELU(), nn.Conv2d(c, c, 1), nn.GELU())
            self.colour = nn.Sequential(
                nn.Linear(2 * c, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
            )

    def colour_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The additive colour term: (B, 3, S, S) -> (B, D)."""
        p = self.pixel(F.avg_pool2d(x, self.colour_pool, ceil_mode=True))
        return self.colour(torch.cat([p.amax(dim=(2, 3)), p.mean(dim=(2, 3))], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x.amax(dim=1, keepdim=True) if self.additive else x)  # (B, 8w, side, side)
        pooled = torch.cat([f.flatten(1), f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1)
        out = self.head(pooled)
        return out + self.colour_stream(x) if self.additive else out


class VideoTower(nn.Module):
    """Frames plus temporal pooling: an image CNN shared by every frame (``frames``; ImageBind
    encodes video with its image encoder, and ``train_encoders`` starts it from the trained
    image tower), then the mean of the unit-norm frame embeddings plus an MLP (``temporal``)
    over their mean, max and last-minus-first difference (motion): (B, T, 3, S, S) -> (B, D).
    The MLP's last layer starts at zero, so an untrained head returns the mean frame."""

    def __init__(self, size: int, width: int, hidden: int, embed_dim: int, colour: str = "joint"):
        super().__init__()
        self.size = size
        self.frames = ConvTower(3, size, width, hidden, embed_dim, colour)
        self.temporal = nn.Sequential(
            nn.Linear(3 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )
        nn.init.zeros_(self.temporal[-1].weight)
        nn.init.zeros_(self.temporal[-1].bias)

    def frame_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> (B, T, D) unit-norm embeddings of each frame."""
        b, t = x.shape[:2]
        x = x.flatten(0, 1)
        if x.shape[-1] != self.size:  # frames at the image tower's size (video_from_image)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return F.normalize(self.frames(x), dim=-1).view(b, t, -1)

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        """Frame embeddings (B, T, D) -> (B, D) (not normalised)."""
        mean = f.mean(1)
        return mean + self.temporal(torch.cat([mean, f.amax(1), f[:, -1] - f[:, 0]], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.frame_embeddings(x))


class AudioTower(nn.Module):
    """1-D CNN over log-filterbank frames, filter bins as channels: (B, 1, M, T) -> (B, D).

    ``timbre_blur`` k > 0 adds a timbre branch and splits the work between the two paths. The
    1-D CNN sees the map averaged over k neighbouring bins: the pitch region, the
    loudness and the notes in time, but not the fine pattern of partials. The timbre branch
    runs convolutions *along frequency* over the loudest frame of every bin, then takes the
    max over frequency. Its filters are shared by every pitch, so a timbre is recognised at
    a pitch it was never heard at, and the branch's output is added to the CNN's. On the
    default world's held-out shape-colour combinations, zero-shot audio shape rose from 0.27
    to 0.53 with k = 5 (same seed). With k = 0 the 1-D CNN learns each (pitch, timbre)
    pattern separately. Filters evenly spaced in log-frequency (``AudioPreprocess.scale``
    "log") make a pitch change a pure shift along the bins, so the shared filters see the same
    pattern at every pitch: held-out shape 0.55 -> 0.82 with k = 17 (see the default preset)."""

    def __init__(
        self,
        n_mels: int,
        n_frames: int,
        width: int,
        hidden: int,
        embed_dim: int,
        timbre_blur: int = 0,
    ):
        super().__init__()
        if timbre_blur < 0:
            raise ValueError(f"timbre_blur must be >= 0, got {timbre_blur}")
        c1, c2 = 4 * width, 8 * width
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, c1, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(c1, c2, 3, stride=2, padding=1),
            nn.GELU(),
        )
        t = (((n_frames + 1) // 2) + 1) // 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * t, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )
        self.blur = timbre_blur
        if timbre_blur:
            self.timbre = nn.Sequential(
                nn.Conv1d(1, c1, 7, padding=3),
                nn.GELU(),
                nn.Conv1d(c1, c2, 5, padding=2),
                nn.GELU(),
            )
            self.timbre_head = nn.Sequential(
                nn.Linear(c2, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blur:
            return self.head(self.conv(x[:, 0]))  # (B, M, T) -> (B, c2, T/4) -> (B, D)
        k = self.blur
        coarse = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0))[:, :, : x.shape[2]]
        out = self.head(self.conv(coarse[:, 0]))
        spectrum = x.amax(dim=-1)  # (B, 1, M): each bin's loudest frame
        return out + self.timbre_head(self.timbre(spectrum).amax(dim=-1))


class PointTower(nn.Module):
    """PointNet (segmentation-style) with local geometry: a shared per-point MLP on (xyz, rgb,
    xyz - centroid) and the offsets to the point's ``k`` nearest neighbours (sorted by
    distance; the local surface, which tells a sphere from a cube a global max-pool cannot);
    its max-pooled global feature is appended to every point for a second shared MLP, so each
    point is described relative to the whole scene (spread: how many objects); then max and
    mean pooling and an MLP: (B, P, 6) -> (B, D)."""

    def __init__(self, width: int, hidden: int, embed_dim: int, k: int = 8):
        super().__init__()
        c1, c2 = 4 * width, 8 * width
        self.k = k
        n_in = 9 + 3 * k
        self.local = nn.Sequential(nn.Linear(n_in, c1), nn.GELU(), nn.Linear(c1, c2), nn.GELU())
        self.context = nn.Sequential(nn.Linear(2 * c2 + n_in, c2), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(2 * c2, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

    def neighbour_offsets(self, xyz: torch.Tensor) -> torch.Tensor:
        """(B, P, 3) -> (B, P, 3k): offsets to the k nearest other points, nearest first."""
        b, p, _ = xyz.shape
        k = min(self.k, p - 1)
        with torch.no_grad():
            idx = torch.cdist(xyz, xyz).topk(k + 1, dim=-1, largest=False).indices[..., 1:]
        rows = torch.arange(b, device=xyz.device)[:, None, None]
        rel = xyz[rows, idx] - xyz[:, :, None, :]  # (B, P, k, 3)
        if k < self.k:
            rel = F.pad(rel, (0, 0, 0, self.k - k))
        return rel.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xyz = x[..., :3]
        centred = xyz - xyz.mean(dim=1, keepdim=True)  # (B, P, 3)
        parts = [x, centred, self.neighbour_offsets(xyz)] if self.k else [x, centred]
        p = torch.cat(parts, dim=-1)  # (B, P, 9 + 3k)
        f = self.local(p)  # (B, P, c2)
        g = f.amax(dim=1, keepdim=True).expand_as(f)  # (B, P, c2) global context
        f = self.context(torch.cat([p, f, g], dim=-1))  # (B, P, c2)
        return self.head(torch.cat([f.amax(dim=1), f.mean(dim=1)], dim=-1))


class PointGroupTower(nn.Module):
    """Set abstraction (PointNet++-style, one level): ``groups`` centroids (an evenly strided
    subset of the points: the world's clouds are shuffled, and a scan-ordered cloud is still
    covered), each with its ``group_size`` nearest points inside ``radius`` (the others
    replaced by the centroid, so a group never reaches past ``radius``); a shared MLP on each
    member's (offset / radius, rgb), max over the group, describes the local solid; then an
    MLP per group on that, the centroid's xyz (absolute and relative to the cloud's centre),
    rgb and the share of the group inside the ball, and max + mean pooling over groups:
    (B, P, 6) -> (B, D). Trained supervised on the default world's point shape (15 epochs of
    fresh renders) it reaches 0.85 on held-out scenes, where ``PointTower`` reaches 0.72.

    ``colour="additive"``: the groups see geometry only (no rgb), and an MLP on the cloud's
    mean rgb is added to the output, so shape and colour reach the embedding as a sum. A
    shape-colour pair that training never showed then still lands near its own image
    embedding: on the default world's held-out combinations zero-shot point shape rose from
    0.42 to 0.59 (``colour="local"``, rgb in every MLP, is the original design)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        embed_dim: int,
        groups: int,
        group_size: int,
        radius: float,
        colour: str = "local",
        d2_bins: int = 0,
        d2_points: int = 128,
    ):
        super().__init__()
        if colour not in POINT_COLOUR:
            raise ValueError(f"colour must be one of {POINT_COLOUR}, got {colour!r}")
        self.d2_bins, self.d2_points = d2_bins, d2_points
        c1, c2 = 4 * width, 8 * width
        self.groups, self.group_size, self.radius = groups, group_size, radius
        self.additive = colour == "additive"
        rgb = 0 if self.additive else 3
        self.local = nn.Sequential(
            nn.Linear(3 + rgb, c1), nn.GELU(), nn.Linear(c1, c2), nn.GELU(), nn.Linear(c2, c2)
        )
        self.group = nn.Sequential(
            nn.Linear(c2 + 7 + rgb, c2), nn.GELU(), nn.Linear(c2, c2), nn.GELU()
        )
        self.head = nn.Sequential(
            nn.Linear(2 * c2, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )
        if self.additive:
            self.colour = nn.Sequential(nn.Linear(3, c2), nn.GELU(), nn.Linear(c2, embed_dim))
        if d2_bins:
            self.d2 = nn.Sequential(nn.Linear(d2_bins, c2), nn.GELU(), nn.Linear(c2, embed_dim))

    def distance_histogram(self, xyz: torch.Tensor) -> torch.Tensor:
        """(B, P, 3) -> (B, d2_bins): the share of point pairs per distance bin over
        [0, POINT_D2_RANGE) (farther pairs in the last bin), times d2_bins (mean 1), over an
        evenly strided subset of ``d2_points`` points (all when fewer)."""
        if xyz.shape[1] > self.d2_points:
            idx = torch.arange(self.d2_points, device=xyz.device) * xyz.shape[1]
            xyz = xyz[:, torch.div(idx, self.d2_points, rounding_mode="floor")]
        b, p, _ = xyz.shape
        with torch.no_grad():
            dist = torch.cdist(xyz, xyz).flatten(1)  # (B, P * P)
            bins = (dist * (self.d2_bins / POINT_D2_RANGE)).long().clamp_(max=self.d2_bins - 1)
            hist = torch.zeros(b, self.d2_bins, dtype=xyz.dtype, device=xyz.device)
            hist.scatter_add_(1, bins, torch.ones_like(dist))
        return hist * (self.d2_bins / (p * p))

    def _centre_idx(self, p: int, device) -> torch.Tensor:
        return torch.div(
            torch.arange(min(self.groups, p), device=device) * p,
            self.groups,
            rounding_mode="floor",
        )

    @torch.no_grad()
    def geometry(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter-free part of ``forward`` for clouds ``x (B, P, 6)``: each group's
        member indices ``idx (B, G, K)`` and ``inside`` mask, and the D2 histogram ``d2``
        when the branch is on. Row b depends on cloud b alone, so stage 2 computes it once
        per set of clouds and passes rows of it to ``forward``."""
        p = x.shape[1]
        centres = x[:, self._centre_idx(p, x.device), :3]
        dist, idx = torch.cdist(centres, x[..., :3]).topk(
            min(self.group_size, p), dim=-1, largest=False
        )  # (B, G, K), nearest first: the centroid itself is idx[..., 0]
        inside = dist <= self.radius
        geo = {"idx": torch.where(inside, idx, idx[..., :1]), "inside": inside}
        if self.d2_bins:
            geo["d2"] = self.distance_histogram(x[..., :3])
        return geo

    def forward(
        self, x: torch.Tensor, geometry: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``x (B, P, 6)`` -> ``(B, D)``; ``geometry``: :meth:`geometry` of ``x`` if known."""
        b, p, _ = x.shape
        geo = self.geometry(x) if geometry is None else geometry
        idx, inside = geo["idx"], geo["inside"]
        xyz = x[..., :3]
        centres = x[:, self._centre_idx(p, x.device)]  # (B, G, 6)
        rows = torch.arange(b, device=x.device)[:, None, None]
        members = x[rows, idx]  # (B, G, K, 6)
        offset = (members[..., :3] - centres[:, :, None, :3]) / self.radius
        centred = centres[..., :3] - xyz.mean(dim=1, keepdim=True)
        share = inside.to(x.dtype).mean(dim=-1, keepdim=True)
        # rgb of the members and of the centroid enter the MLPs unless colour is additive
        member_rgb, centre_rgb = (
            ((), ()) if self.additive else ((members[..., 3:],), (centres[..., 3:],))
        )
        f = self.local(torch.cat([offset, *member_rgb], dim=-1)).amax(dim=2)  # (B, G, c2)
        f = self.group(torch.cat([f, centres[..., :3], centred, *centre_rgb, share], dim=-1))
        out = self.head(torch.cat([f.amax(dim=1), f.mean(dim=1)], dim=-1))
        if self.d2_bins:
            out = out + self.d2(geo["d2"])
        return out + self.colour(x[..., 3:].mean(dim=1)) if self.additive else out


class TextTower(nn.Module):
    """Mean of word + bigram embeddings, then an MLP: (B, L) ids (0 = pad) -> (B, D)."""

    def __init__(self, vocab_size: int, hidden: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.head = nn.Sequential(
            nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(-1).to(self.embed.weight.dtype)  # (B, L, 1)
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


# ----------------------------------------------------------------------------------------------
# The encoder


class BindLite(nn.Module):
    """Small joint-embedding encoders implementing the ``Encoder`` protocol.

    ``BindLite(cfg, vocab, preprocessing)``; call with ``{Modality: batch}`` where the batch is
    the preprocessed tensor of that modality (``preprocess``), or for text a list of strings
    or ``(B, L)`` token ids. Returns ``{Modality: (B, embed_dim)}`` unit-norm embeddings.
    """

    def __init__(self, cfg: EncoderConfig, vocab: Sequence[str], preprocessing: Preprocessing):
        super().__init__()
        self.cfg, self.vocab, self.prep = cfg, list(vocab), preprocessing
        self._index = {g: i for i, g in enumerate(self.vocab)}
        d, w, h, p = cfg.embed_dim, cfg.width, cfg.hidden, preprocessing
        self.towers = nn.ModuleDict(
            {
                Modality.IMAGE.value: ConvTower(3, p.image.size, w, h, d, cfg.image_colour),
                Modality.TEXT.value: TextTower(len(self.vocab), h, d),
                Modality.VIDEO.value: VideoTower(
                    p.image.size if cfg.video_from_image else p.video.size,
                    w,
                    h,
                    d,
                    cfg.image_colour,
                ),
                Modality.AUDIO.value: AudioTower(
                    p.audio.n_mels, p.audio.n_frames, w, h, d, cfg.audio_timbre_blur
                ),
                Modality.POINT.value: (
                    PointGroupTower(
                        w,
                        h,
                        d,
                        cfg.point_groups,
                        cfg.point_group_size,
                        cfg.point_group_radius,
                        cfg.point_colour,
                        cfg.point_d2_bins,
                        cfg.point_d2_points,
                    )
                    if cfg.point_groups
                    else PointTower(w, h, d, cfg.point_neighbours)
                ),
                Modality.DEPTH.value: ConvTower(1, p.depth.size, w, h, d),
            }
        )
        # One learnable temperature per pairing: Text (stage 1) and each stage-2 modality.
        init = math.log(1.0 / cfg.temperature)
        self.logit_scale = nn.ParameterDict(
            {
                m.value: nn.Parameter(torch.tensor(init))
                for m in ENCODER_MODALITIES
                if m != Modality.IMAGE
            }
        )
        self.source_hash: str | None = None  # sha256 of the file it was loaded from

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def modalities(self) -> Sequence[Modality]:
        return ENCODER_MODALITIES

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> ``(B, L)`` long ids of words and bigrams (0 pads; unknown grams dropped)."""
        rows = [[self._index[g] for g in grams(t) if g in self._index] for t in texts]
        out = torch.zeros(
            len(rows), max(1, max((len(r) for r in rows), default=1)), dtype=torch.long
        )
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def preprocess(self, modality: Modality | str, raw) -> torch.Tensor:
        """Raw arrays (as the ``media`` readers return them, stacked or listed) -> the tensor
        batch the modality's tower takes (on the CPU)."""
        m = Modality.parse(modality)
        if m == Modality.TEXT:
            return self.tokenize(raw)
        if m == Modality.IMAGE:
            return self.prep.image(np.stack(raw))
        if m == Modality.VIDEO:
            return self.prep.video(np.stack(raw))
        if m == Modality.AUDIO:
            return self.prep.audio(_pad_stack(raw, self.prep.audio.n_samples))
        if m == Modality.POINT:
            return self.prep.point(raw)
        if m == Modality.DEPTH:
            return self.prep.depth(np.stack(raw))
        raise ValueError(f"BindLite has no {m.value} encoder")

    def embed(self, modality: Modality, batch) -> torch.Tensor:
        """One modality's ``(B, embed_dim)`` unit-norm embeddings (gradients allowed)."""
        m = Modality.parse(modality)
        if m.value not in self.towers:
            raise ValueError(f"BindLite has no {m.value} encoder; it has {list(self.towers)}")
        if m == Modality.TEXT and not isinstance(batch, torch.Tensor):
            batch = self.tokenize(batch)
        x = batch.to(self.device)
        if x.is_floating_point():
            x = x.to(next(self.parameters()).dtype)
        return F.normalize(self.towers[m.value](x), dim=-1)

    def forward(self, inputs: Mapping[Modality, torch.Tensor]) -> dict[Modality, torch.Tensor]:
        return {Modality.parse(m): self.embed(m, x) for m, x in inputs.items()}

    @torch.no_grad()
    def encode(self, modality: Modality | str, raw, batch_size: int = 256) -> torch.Tensor:
        """Raw inputs -> ``(N, embed_dim)`` float32 embeddings on the CPU, in batches."""
        m = Modality.parse(modality)
        was_training = self.training
        self.eval()
        out = [
            self.embed(m, self.preprocess(m, raw[i : i + batch_size])).float().cpu()
            for i in range(0, len(raw), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    # -- artefact ---------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Weights, vocabulary and preprocessing as one torch file (plain data only)."""
        obj = {
            "format": "bindlite-v1",
            "config": self.cfg.to_dict(),
            "preprocessing": self.prep.to_dict(),
            "vocab": self.vocab,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "extra": extra or {},
        }
        path = atomic_save_torch(obj, path)
        self.source_hash = _file_hash(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> BindLite:
        """Read a ``save``d artefact; missing or unexpected weights are named in the error."""
        obj = safe_torch_load(path)
        if not isinstance(obj, dict) or obj.get("format") != "bindlite-v1":
            raise ValueError(f"{path}: not a BindLite artefact (format bindlite-v1)")
        model = cls(
            EncoderConfig(**obj["config"]),
            obj["vocab"],
            Preprocessing.from_dict(obj["preprocessing"]),
        )
        own = model.state_dict()
        reshaped = [
            f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
            for k, v in obj["state_dict"].items()
            if k in own and v.shape != own[k].shape
        ]
        if reshaped:
            raise ValueError(f"{path}: weights of another architecture: {reshaped[:4]}")
        missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
        model.extra = obj.get("extra", {})
        model.source_hash = _file_hash(Path(path))
        return model.to(device or "cpu").eval()

    def fingerprint(self) -> str:
        """sha256 of the artefact file when loaded/saved, else of the weights."""
        if self.source_hash:
            return self.source_hash
        h = hashlib.sha256(json.dumps(self.cfg.to_dict()).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _pad_stack(waves: Sequence[np.ndarray], n: int) -> np.ndarray:
    out = np.zeros((len(waves), n), dtype=np.float32)
    for i, w in enumerate(waves):
        out[i, : min(n, len(w))] = w[:n]
    return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reading a world's media

_READERS = {
    Modality.IMAGE: lambda p, prep: read_image(p),
    Modality.VIDEO: lambda p, prep: read_video(p),
    Modality.AUDIO: lambda p, prep: read_audio(p, prep.audio.sample_rate),
    Modality.POINT: lambda p, prep: read_points(p),
    Modality.DEPTH: lambda p, prep: read_depth(p),
}


def load_media(
    world: World, scenes: Sequence, modality: Modality | str, prep: Preprocessing
) -> list:
    """Raw arrays of ``modality`` for ``scenes`` through the ``media`` readers; for text,
    each scene's first caption."""
    m = Modality.parse(modality)
    if m == Modality.TEXT:
        return [s.captions[0] for s in scenes]
    return [_READERS[m](world.path(s, m), prep) for s in scenes]


# ----------------------------------------------------------------------------------------------
# Training


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    max_scale: float,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of ``a`` and ``b`` (both (B, D), unit norm).

    ``same`` (B, B) bool, optional: ``same[i, j]`` when row j of ``b`` also describes row i
    of ``a`` (identical or partial captions); matches share the target probability instead
    of counting as negatives. The diagonal must be True."""
    scale = logit_scale.exp().clamp(max=max_scale)
    logits = scale * a @ b.t()  # (B, B)
    if same is None:
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    t = same.to(logits.dtype)  # (B, B): row i of a matches column j of b
    ta, tb = t / t.sum(1, keepdim=True), t.t() / t.t().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, ta) + F.cross_entropy(logits.t(), tb))


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [
        perm[i : i + batch_size]
        for i in range(0, n - 1, batch_size)
        if len(perm[i : i + batch_size]) > 1
    ]


def _optimiser(params, cfg: EncoderConfig, steps: int):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.1
    )
    return opt, sched


def hard_negative_groups(canonical: Sequence[str]) -> list[list[list[int]]]:
    """Per attribute, groups of scenes whose canonical captions are equal once that
    attribute's words are removed (they differ in that attribute only). Mined from the
    caption text with the world's vocabulary; no media or labels are read."""
    singular = {p: s for s, p in PLURALS.items()}
    tokens = [[singular.get(w, w) for w in words(c)] for c in canonical]
    out = []
    for attr in HARD_NEGATIVE_ATTRIBUTES:
        vocab = set(words(" ".join(ATTRIBUTES[attr])))
        if attr == "count":
            vocab |= {"is", "are"}  # "there is one" / "there are two"
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, t in enumerate(tokens):
            groups.setdefault(tuple(w for w in t if w not in vocab), []).append(i)
        out.append([g for g in groups.values() if len(g) > 1])
    return out


def _hard_batches(groups: list[list[int]], n: int, batch_size: int, gen) -> list[torch.Tensor]:
    """Batches made of whole groups (at most ``group_cap`` members each), in random order."""
    group_cap = max(2, batch_size // 8)
    order = torch.randperm(len(groups), generator=gen).tolist()
    flat: list[int] = []
    for g in order:
        members = torch.tensor(groups[g])[torch.randperm(len(groups[g]), generator=gen)]
        flat += members[:group_cap].tolist()
    flat = flat[: n - n % batch_size] if len(flat) > batch_size else flat
    idx = torch.tensor(flat, dtype=torch.long)
    return [idx[i : i + batch_size] for i in range(0, len(idx) - 1, batch_size)]


def _partial_caption(attrs: dict[str, str], keep: Sequence[str]) -> str:
    """A short text naming only the ``keep`` attributes of a scene, e.g. "red circles"."""
    words_ = []
    for a in _CAPTION_ORDER:
        if a not in keep:
            continue
        if a == "shape" and "count" in keep and attrs["count"] != "one":
            words_.append(PLURALS[attrs["shape"]])
        elif a == "position":
            words_.append(f"in the {attrs['position']}")
        elif a == "motion":
            words_.append(motion_phrase(attrs["motion"]))
        else:
            words_.append(attrs[a])
    return " ".join(words_)


def _stage1_texts(captions, attributes, idx: torch.Tensor, cfg, gen, prob: float | None = None):
    """Texts for a batch and their match matrix (B, B): a random paraphrase of each caption,
    or with ``cfg.partial_caption_prob`` a short text naming one attribute ("circles").
    Text j matches image i when i has every attribute j names. Why: with full captions
    alone, a batch almost never holds two scenes differing only in shape, the easy
    attributes (position, colour) drive the loss down and shape gets no gradient; a text
    naming one attribute asks every image in the batch about it."""
    rows = idx.tolist()
    n_attr = len(_CAPTION_ORDER)
    prob = cfg.partial_caption_prob if prob is None else prob
    partial = torch.rand(len(rows), generator=gen) < prob
    weights = torch.tensor(cfg.partial_caption_weights)
    which = torch.multinomial(weights, len(rows), replacement=True, generator=gen)
    keep = torch.ones(len(rows), n_attr, dtype=torch.bool)  # (B, A) attributes text j names
    keep[partial] = F.one_hot(which[partial], n_attr).bool()
    pick = torch.randint(0, 10**6, (len(rows),), generator=gen)
    texts = [
        _partial_caption(attributes[i], [_CAPTION_ORDER[int(which[j])]])
        if partial[j]
        else captions[i][int(pick[j]) % len(captions[i])]
        for j, i in enumerate(rows)
    ]
    codes = torch.tensor(
        [[ATTRIBUTES[a].index(attributes[i][a]) for a in _CAPTION_ORDER] for i in rows]
    )
    equal = codes[:, None, :] == codes[None, :, :]  # (B, B, A) image i vs text j
    same = (equal | ~keep[None, :, :]).all(-1)  # (B, B)
    return texts, same


def _caption_keys(captions: list[list[str]]) -> torch.Tensor:
    """(N,) code of each scene's canonical caption (``captions[i][0]``): equal codes are
    scenes that no caption can tell apart."""
    canonical = [c[0] for c in captions]
    codes = {c: i for i, c in enumerate(sorted(set(canonical)))}
    return torch.tensor([codes[c] for c in canonical])


def _paraphrases(
    captions: list[list[str]], key: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """A random paraphrase of each scene ``idx`` and the (B, B) shared-positive mask of
    equal canonical captions (``key`` from :func:`_caption_keys`)."""
    pick = torch.randint(0, 10**6, (len(idx),), generator=gen).tolist()
    texts = [captions[i][k % len(captions[i])] for i, k in zip(idx.tolist(), pick, strict=True)]
    return texts, key[idx][:, None] == key[idx][None, :]


def _train_stage1(
    model: BindLite,
    images: torch.Tensor,
    captions: list[list[str]],
    cfg,
    gen,
    render=None,
    attributes: list[dict[str, str]] | None = None,
) -> list[float]:
    """Image <-> text InfoNCE; a random paraphrase of each scene's caption per step.

    A fraction ``cfg.hard_negative_fraction`` of the epochs uses hard-negative batches
    (``hard_negative_groups``): with random batches of a few thousand scenes, two captions
    rarely differ in one word only, so rare distinctions (shape) get almost no gradient.
    Scenes with identical canonical captions are treated as shared positives.
    ``render(epoch)``, if given, returns fresh (N, H, W, 3) uint8 renders of the same scenes;
    it is called every ``cfg.rerender_every`` epochs, so the CNN cannot memorise pictures."""
    params = [
        *model.towers[Modality.IMAGE.value].parameters(),
        *model.towers[Modality.TEXT.value].parameters(),
        model.logit_scale[Modality.TEXT.value],
    ]
    n = len(images)
    per_epoch = len(_batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
    opt, sched = _optimiser(params, cfg, cfg.stage1_epochs * per_epoch + 8)
    canonical = [c[0] for c in captions]
    key = _caption_keys(captions)
    groups = hard_negative_groups(canonical)
    losses = []
    for epoch in tqdm(range(cfg.stage1_epochs), desc="stage 1 (image-text)", leave=False):
        if render is not None and cfg.rerender_every and epoch % cfg.rerender_every == 0:
            images = torch.from_numpy(render(epoch))
        hard = torch.rand(1, generator=gen).item() < cfg.hard_negative_fraction
        hard = hard and epoch >= cfg.partial_warmup_epochs
        if hard:
            attr = cfg.hard_negative_attributes[epoch % len(cfg.hard_negative_attributes)]
            group = groups[HARD_NEGATIVE_ATTRIBUTES.index(attr)]
            batches = _hard_batches(group, n, cfg.batch_size, gen)
        else:
            batches = _batches(n, cfg.batch_size, gen)
        for idx in batches[: per_epoch + 8]:
            prob = 1.0 if epoch < cfg.partial_warmup_epochs else cfg.partial_caption_prob
            if attributes is not None and prob > 0:
                texts, same = _stage1_texts(captions, attributes, idx, cfg, gen, prob)
            else:
                texts, same = _paraphrases(captions, key, idx, gen)
            zi = model.embed(Modality.IMAGE, model.prep.image(images[idx]))
            zt = model.embed(Modality.TEXT, model.tokenize(texts))
            same = same.to(zi.device)
            scale = model.logit_scale[Modality.TEXT.value]
            loss = info_nce(zi, zt, scale, cfg.max_logit_scale, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(loss.item())
    return losses


def _train_stage2(
    model: BindLite, m: Modality, inputs, targets: torch.Tensor, cfg, gen, render=None
) -> list[float]:
    """Align one modality's tower to frozen image embeddings ``targets`` (N, D).

    ``render(epoch)``, if given, returns fresh raw samples of the same scenes; it is called
    every ``cfg.stage2_rerender_every[m]`` epochs (epoch 0 uses ``inputs``, the files)."""
    tower, scale = model.towers[m.value], model.logit_scale[m.value]
    n = len(targets)
    epochs = cfg.stage2_epochs_by_modality.get(m.value, cfg.stage2_epochs)
    steps = epochs * len(_batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
    opt, sched = _optimiser([*tower.parameters(), scale], cfg, steps)
    every = cfg.stage2_rerender_every.get(m.value, 0)
    losses = []
    for epoch in tqdm(range(epochs), desc=f"stage 2 ({m.value}-image)", leave=False):
        if render is not None and every and epoch and epoch % every == 0:
            inputs = _stage2_inputs(model, m, render(epoch))
        for idx in _batches(n, cfg.batch_size, gen):
            zm = inputs(idx)
            loss = info_nce(zm, targets[idx].to(zm.device), scale, cfg.max_logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def _stage2_inputs(model: BindLite, m: Modality, raw: list):
    """A function from batch indices to the batch's (B, D) unit-norm embeddings (with
    gradients to the trainable part of the tower). Inputs are preprocessed once; video with a
    frozen frame CNN is embedded frame by frame once, and only its temporal head runs per
    step; video with a trainable frame CNN stays uint8 and is preprocessed per batch."""
    if m == Modality.VIDEO:
        tower = model.towers[m.value]
        clips = np.stack(raw)
        if any(p.requires_grad for p in tower.frames.parameters()):
            return lambda idx: model.embed(m, model.prep.video(clips[idx.numpy()]))
        with torch.no_grad():
            frames = torch.cat(
                [
                    tower.frame_embeddings(model.prep.video(clips[i : i + 128]).to(model.device))
                    for i in range(0, len(clips), 128)
                ]
            )  # (N, T, D)
        return lambda idx: F.normalize(tower.pool(frames[idx.to(frames.device)]), dim=-1)
    full = torch.cat([model.preprocess(m, raw[i : i + 512]) for i in range(0, len(raw), 512)])
    tower = model.towers[m.value]
    if not isinstance(tower, PointGroupTower):
        return lambda idx: model.embed(m, full[idx])
    # the point tower's grouping and distance histogram depend on the clouds only: once per
    # set of clouds instead of once per step
    full = full.to(model.device)
    parts = [tower.geometry(full[i : i + 512]) for i in range(0, len(full), 512)]
    geo = {k: torch.cat([g[k] for g in parts]) for k in parts[0]}
    return lambda idx: F.normalize(tower(full[idx], {k: v[idx] for k, v in geo.items()}), dim=-1)


def _media_renderer(world: World, scenes: Sequence, m: Modality, cfg: EncoderConfig):
    """``epoch -> list`` of fresh raw ``m`` samples of ``scenes`` (``world.render_media``,
    the layout the ``media`` readers return; preprocessing then treats them as files)."""
    attrs = [s.attributes for s in scenes]
    salt = STAGE2_MODALITIES.index(m) + 1

    def render(epoch: int) -> list:
        return list(
            render_media(attrs, m, world.config, np.random.default_rng([cfg.seed, salt, epoch]))
        )

    return render


def _renderer(world: World, scenes: Sequence, files: np.ndarray, cfg: EncoderConfig):
    """``epoch -> (N, H, W, 3)`` uint8 fresh renders of ``scenes`` (None when off); epoch 0
    keeps the files, so a world's own images are always part of training."""
    if not cfg.rerender_every:
        return None
    attrs = [s.attributes for s in scenes]

    def render(epoch: int) -> np.ndarray:
        if epoch == 0:
            return files
        return render_media(
            attrs, Modality.IMAGE, world.config, np.random.default_rng([cfg.seed, epoch])
        )

    return render


def train_encoders(
    world: World,
    cfg: EncoderConfig | None = None,
    device: torch.device | str = "cpu",
    history: dict | None = None,
) -> BindLite:
    """Train BindLite on the world's train split: stage 1 (image-text), then stage 2 (each
    other modality to frozen images). ``history``, if given, receives per-stage losses and
    seconds. Deterministic for a given seed, device and thread count."""
    cfg = cfg or EncoderConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = world.split("train")
    captions = [s.captions for s in world.scenes]
    prep = Preprocessing.for_world(
        world, cfg.video_frames, scale=cfg.audio_scale, f_min=cfg.audio_f_min
    )
    # Audio normalisation constants are measured on the training sounds (ImageBind's are fixed).
    t0 = time.perf_counter()
    model = BindLite(
        cfg, build_vocab([c for caps in captions for c in caps], cfg.min_bigram_count), prep
    )
    model.to(device).train()
    images = torch.from_numpy(np.stack(load_media(world, train, Modality.IMAGE, prep)))
    history = history if history is not None else {}
    history["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    history["stage1"] = _train_stage1(
        model,
        images,
        [s.captions for s in train],
        cfg,
        gen,
        render=_renderer(world, train, images.numpy(), cfg),
        attributes=[s.attributes for s in train],
    )
    history["stage1_s"] = time.perf_counter() - t0
    model.towers[Modality.IMAGE.value].requires_grad_(False)
    model.towers[Modality.TEXT.value].requires_grad_(False)
    model.eval()
    targets = model.encode(Modality.IMAGE, list(images.numpy()))
    if cfg.text_epochs:
        t0 = time.perf_counter()
        history["text"] = _train_text_locked(model, targets, [s.captions for s in train], cfg)
        history["text_s"] = time.perf_counter() - t0
    _align_stage2(model, world, train, targets, cfg, gen, history, cfg.stage2)
    model.requires_grad_(False)
    return model.eval()


def _train_text_locked(
    model: BindLite, targets: torch.Tensor, captions: list[list[str]], cfg
) -> list[float]:
    """Locked-image text tuning: the text tower (and its temperature) against the frozen
    image embeddings ``targets`` (N, D) of the scenes whose ``captions`` these are, for
    ``cfg.text_epochs`` epochs of InfoNCE (a random paraphrase per step; scenes with
    identical canonical captions are shared positives). At the end of joint training the
    text tower lags the image tower it chased; this lets it catch up without moving any
    image feature. Its own generator: stage 2 draws the same batches with or without it."""
    text, scale = model.towers[Modality.TEXT.value], model.logit_scale[Modality.TEXT.value]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    key = _caption_keys(captions)
    n = len(targets)
    per_epoch = len(_batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
    opt, sched = _optimiser(
        [*text.parameters(), scale],
        dataclasses.replace(cfg, lr=cfg.text_lr),
        cfg.text_epochs * per_epoch,
    )
    text.requires_grad_(True)
    scale.requires_grad_(True)
    model.train()
    losses = []
    for _ in tqdm(range(cfg.text_epochs), desc="text (locked image)", leave=False):
        for idx in _batches(n, cfg.batch_size, gen):
            texts, same = _paraphrases(captions, key, idx, gen)
            zt = model.embed(Modality.TEXT, model.tokenize(texts))
            same = same.to(zt.device)
            loss = info_nce(targets[idx].to(zt.device), zt, scale, cfg.max_logit_scale, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    text.requires_grad_(False)
    scale.requires_grad_(False)
    model.eval()
    return losses


def _align_stage2(model, world, train, targets, cfg, gen, history, modalities) -> None:
    """Stage 2 for ``modalities``: each tower aligned to the frozen image ``targets``."""
    prep = model.prep
    model.train()
    for name in modalities:
        m = Modality(name)
        t0 = time.perf_counter()
        if m == Modality.VIDEO and cfg.video_from_image:
            video = model.towers[m.value]
            video.frames.load_state_dict(model.towers[Modality.IMAGE.value].state_dict())
            video.frames.requires_grad_(False)
        raw = load_media(world, train, m, prep)
        if m == Modality.AUDIO:
            mel = prep.audio.log_mel(_pad_stack(raw, prep.audio.n_samples))
            prep.audio.mean, prep.audio.std = float(mel.mean()), float(mel.std())
        inputs = _stage2_inputs(model, m, raw)
        render = _media_renderer(world, train, m, cfg)
        history[m.value] = _train_stage2(model, m, inputs, targets, cfg, gen, render)
        history[f"{m.value}_s"] = time.perf_counter() - t0
        model.towers[m.value].requires_grad_(False)


def realign(
    encoder: BindLite,
    world: World,
    modalities: Sequence[Modality | str],
    device: torch.device | str = "cpu",
    history: dict | None = None,
    **overrides,
) -> BindLite:
    """A copy of ``encoder`` whose ``modalities`` towers are re-initialised and aligned again
    (stage 2 only) with ``overrides`` of its configuration, e.g. ``stage2_epochs=1``: the
    same image and text towers with weaker (or stronger) alignment of the other modalities,
    the comparison the visual cache is about. A ``stage2_epochs`` override applies to every
    modality (it replaces ``stage2_epochs_by_modality`` unless that is overridden too).
    Deterministic for a given seed."""
    base = encoder.cfg.to_dict()
    if "stage2_epochs" in overrides:
        base["stage2_epochs_by_modality"] = {}
    cfg = EncoderConfig(**{**base, **overrides})
    names = [Modality.parse(m).value for m in modalities]
    torch.manual_seed(cfg.seed + 1)
    model = BindLite(cfg, encoder.vocab, copy.deepcopy(encoder.prep)).to(device)

    def realigned(key: str) -> bool:
        return any(key.startswith(f"towers.{n}.") or key == f"logit_scale.{n}" for n in names)

    state = model.state_dict()  # fresh towers for ``modalities``, the encoder's elsewhere
    state |= {k: v for k, v in encoder.state_dict().items() if not realigned(k)}
    model.load_state_dict(state)
    model.requires_grad_(False)
    for n in names:
        model.towers[n].requires_grad_(True)
        model.logit_scale[n].requires_grad_(True)
    train = world.split("train")
    model.eval()
    targets = model.encode(Modality.IMAGE, load_media(world, train, Modality.IMAGE, model.prep))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    _align_stage2(
        model, world, train, targets, cfg, gen, history if history is not None else {}, names
    )
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Precomputed features


class PrecomputedEncoder:
    """Embeddings read from files, behind the ``Encoder`` protocol.

    ``features``: ``{Modality: (ids, (N, D) tensor)}``. Calling it with
    ``{modality: (B,) long row indices}`` returns those rows, L2-normalised; ``lookup`` takes
    scene ids instead. Use it for real ImageBind features computed elsewhere."""

    def __init__(self, features: Mapping[Modality | str, tuple[Sequence[str], torch.Tensor]]):
        self.features = {}
        dims = set()
        for m, (ids, feats) in features.items():
            feats = torch.as_tensor(feats).float()
            if feats.ndim != 2 or feats.shape[0] != len(ids):
                raise ValueError(f"{m}: {len(ids)} ids but features of shape {tuple(feats.shape)}")
            self.features[Modality.parse(m)] = (list(ids), F.normalize(feats, dim=-1))
            dims.add(feats.shape[1])
        if len(dims) != 1:
            raise ValueError(f"all modalities must share one width, got {sorted(dims)}")
        self.embed_dim = dims.pop()
        self._rows = {m: {i: k for k, i in enumerate(ids)} for m, (ids, _) in self.features.items()}
        self.source_hash = hashlib.sha256(
            b"".join(f.numpy().tobytes() for _, f in self.features.values())
        ).hexdigest()[:16]

    @classmethod
    def from_dir(cls, folder: str | Path) -> PrecomputedEncoder:
        """Load ``<Modality>.pt`` files (``{"ids": [...], "feats": (N, D)}``) from ``folder``
        (the format ``compute_features`` writes)."""
        feats = {}
        for path in sorted(Path(folder).glob("*.pt")):
            obj = safe_torch_load(path)
            if not isinstance(obj, dict) or not {"ids", "feats"} <= set(obj):
                raise ValueError(f"{path}: expected a dict with 'ids' and 'feats'")
            feats[Modality.parse(path.stem)] = (obj["ids"], obj["feats"])
        if not feats:
            raise FileNotFoundError(f"{folder}: no <Modality>.pt feature files")
        return cls(feats)

    @property
    def modalities(self) -> Sequence[Modality]:
        return tuple(self.features)

    def __call__(self, inputs: Mapping[Modality, torch.Tensor]) -> dict[Modality, torch.Tensor]:
        return {
            Modality.parse(m): self.features[Modality.parse(m)][1][idx.long().cpu()]
            for m, idx in inputs.items()
        }

    def lookup(self, modality: Modality | str, ids: Sequence[str]) -> torch.Tensor:
        """``(len(ids), D)`` features of the given scene ids; unknown ids raise KeyError."""
        m = Modality.parse(modality)
        rows = self._rows[m]
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{m.value}: {len(missing)} ids have no features, e.g. {missing[:3]}")
        return self.features[m][1][torch.tensor([rows[i] for i in ids], dtype=torch.long)]

    def fingerprint(self) -> str:
        return self.source_hash


def compute_features(
    encoder,
    world: World,
    modality: Modality | str,
    cache_dir: str | Path,
    batch_size: int = 256,
) -> tuple[list[str], torch.Tensor]:
    """``(scene ids, (N, D) features)`` of every scene of ``world``, cached as
    ``cache_dir/<Modality>.pt``. The cache is reused when its fingerprint (encoder + world)
    matches, recomputed otherwise. Text features embed each scene's canonical caption."""
    m = Modality.parse(modality)
    path = Path(cache_dir) / f"{m.value}.pt"
    fp = f"{encoder.fingerprint()}-{world.fingerprint()}"
    ids = [s.id for s in world.scenes]
    if path.exists():
        obj = safe_torch_load(path)
        if obj.get("fingerprint") == fp and obj.get("ids") == ids:
            return obj["ids"], obj["feats"]
        log.info("%s: stale feature cache (fingerprint changed); recomputing", path)
    if isinstance(encoder, PrecomputedEncoder):
        feats = encoder.lookup(m, ids)
    else:
        raw = load_media(world, world.scenes, m, encoder.prep)
        feats = encoder.encode(m, raw, batch_size)
    atomic_save_torch(
        {"ids": ids, "feats": feats.contiguous(), "fingerprint": fp, "modality": m.value}, path
    )
    return ids, feats


def default_encoder_path(world_dir: str | Path) -> Path:
    """``data/encoders/<world name>/bindlite.pt``."""
    from ibllm_lab.runtime import data_dir

    return data_dir() / "encoders" / Path(world_dir).name / "bindlite.pt"


def load_default_encoders(world_dir: str | Path, device: torch.device | str = "cpu") -> BindLite:
    """The BindLite trained on the world at ``world_dir``: loaded from
    ``default_encoder_path`` when it was trained on this world, trained and saved otherwise
    (preset "quick" for a world named "quick", else "default")."""
    world = World.load(world_dir)
    path = default_encoder_path(world_dir)
    preset = "quick" if Path(world_dir).name == "quick" else "default"
    cfg = EncoderConfig.from_name(preset)
    if path.exists():
        try:
            enc = BindLite.load(path, device)
        except ValueError as e:  # an artefact of an older architecture
            log.info("%s; retraining", e)
        else:
            if enc.extra.get("world_fingerprint") == world.fingerprint() and enc.cfg == cfg:
                return enc
            log.info("%s was trained on another world or config; retraining", path)
    enc = train_encoders(world, cfg, device=device)
    save_default_encoders(enc, world, preset)
    return enc


def save_default_encoders(encoder: BindLite, world: World, preset: str) -> Path:
    """Save ``encoder`` as ``world``'s default (``default_encoder_path``), marked with the
    world's fingerprint and the preset, so that :func:`load_default_encoders` loads it."""
    path = default_encoder_path(world.root)
    encoder.save(path, extra={"world_fingerprint": world.fingerprint(), "preset": preset})
    return path


def cli(argv: list[str]) -> int:
    """``ibllm-lab encoders --world data/world/default --out data/encoders/default``: train,
    save ``bindlite.pt`` and write the alignment tables (CSV) beside it."""
    from ibllm_lab.alignment import measure_all
    from ibllm_lab.runtime import default_device

    p = argparse.ArgumentParser(prog="ibllm-lab encoders", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, required=True, help="a generated world folder")
    p.add_argument("--out", type=Path, default=None, help="default data/encoders/<world name>")
    p.add_argument("--preset", default="default", choices=sorted(ENCODER_PRESETS))
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--overrides",
        default="{}",
        help='JSON EncoderConfig fields over the preset, e.g. \'{"image_colour": "additive"}\'',
    )
    args = p.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as e:
        p.error(f"--overrides is not valid JSON ({e}): {args.overrides!r}")
    known = {f.name for f in dataclasses.fields(EncoderConfig)}
    if not isinstance(overrides, dict):
        p.error(f"--overrides must be a JSON object, got {args.overrides!r}")
    if set(overrides) - known:
        p.error(f"--overrides: unknown EncoderConfig fields {sorted(set(overrides) - known)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    world = World.load(args.world)
    out = args.out or default_encoder_path(args.world).parent
    history: dict = {}
    cfg = EncoderConfig.from_name(args.preset, **overrides)
    enc = train_encoders(world, cfg, device=device, history=history)
    enc.save(
        out / "bindlite.pt", extra={"world_fingerprint": world.fingerprint(), "preset": args.preset}
    )
    tables = measure_all(enc, world, out_dir=out)
    for name, df in tables.items():
        log.info("%s:\n%s", name, df.to_string(max_rows=40))
    return 0
