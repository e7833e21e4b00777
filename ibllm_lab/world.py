"""A generated multimodal world: the embedded default's scenes, media and instruction data.

Every scene is a small set of identical objects with compositional attributes (shape, colour,
size, position, count, and a motion). Each scene is rendered in every modality the ImageBind
family reads, from one seed, with numpy only:

* image: small RGB PNG (objects over a noisy, tinted background with grey clutter lines); a
  moving group leaves a fading motion trail behind it, as a photograph's exposure blurs a
  moving object, so a still shows which way the objects move (``Difficulty.motion_trail``);
* video: a short ``(T, H, W, 3)`` uint8 ``.npy`` clip of the objects moving (each frame with
  its own exposure's trail);
* audio: 16 kHz mono WAV; shape is timbre, colour is pitch, size is loudness, count is the
  number of notes; sounds have no position and no motion (mono, stationary sources);
* point cloud: ``(P, 6)`` float32 ``.npy`` (xyz, rgb) sampled from 3-D solids matching the shapes;
* depth: ``(H, W)`` float32 ``.npy`` of the image's scene, which has no colour.

What each modality carries is data (``CARRIES``, ``carries()``, and ``CARRIES.md`` in the world
folder). What a modality does not carry, no binding can recover; the alignment tables show it.

Difficulty is data too (``DIFFICULTY_PRESETS``): noise levels, clutter, grey distractor objects,
and ``strength[modality][attribute]``, the probability that a modality renders a scene's true
attribute value rather than a random one (1.0 = always faithful).

On disk (``generate_world(cfg, out_dir)``)::

    world.json          the WorldConfig
    scenes.jsonl        one Scene per line
    CARRIES.md          which attributes each modality carries
    images/ audio/ video/ points/ depth/   raw media, one file per scene
    pretrain.csv        tab-separated ``url``, ``caption`` (train split, image-caption pairs)
    instructions.json   LLaVA-style image instructions (train split)
    instructions_video.json  the same with a ``video`` path (train split)
    alpaca.json         text-only instructions (``instruction``, ``input``, ``output``)

Splits: held-out (shape, colour) combinations appear only in the test split (``heldout=True``);
the other scenes are split train/val/test by ``WorldConfig.split_fractions``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import re
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ibllm_lab.io import atomic_write_text
from ibllm_lab.modality import Modality

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Vocabulary and the carrying matrix (data)

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond", "cross", "ring"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange"],
    "size": ["small", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right"],
    "count": ["one", "two", "three"],
    "motion": ["static", "left", "right", "up", "down"],
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "ring": "rings",
}

# Which attributes each modality's raw signal carries, and why not the others.
CARRIES: dict[Modality, frozenset[str]] = {
    Modality.IMAGE: frozenset({"shape", "color", "size", "position", "count", "motion"}),
    Modality.VIDEO: frozenset({"shape", "color", "size", "position", "count", "motion"}),
    Modality.AUDIO: frozenset({"shape", "color", "size", "count"}),
    Modality.POINT: frozenset({"shape", "color", "size", "position", "count"}),
    Modality.DEPTH: frozenset({"shape", "size", "position", "count"}),
    Modality.TEXT: frozenset({"shape", "color", "size", "position", "count", "motion"}),
}
CARRIES_WHY: dict[Modality, str] = {
    Modality.IMAGE: "everything: a moving group leaves a fading trail behind it (motion blur)",
    Modality.VIDEO: "everything: the objects move across the frames",
    Modality.AUDIO: (
        "mono, stationary sources: shape = timbre, colour = pitch, size = loudness, "
        "count = number of notes; no position (no stereo), no motion"
    ),
    Modality.POINT: "xyz + rgb of a static scene: no motion",
    Modality.DEPTH: "distance only: no colour, no motion",
    Modality.TEXT: "the captions name every attribute, motion included",
}

MEDIA_MODALITIES: tuple[Modality, ...] = (
    Modality.IMAGE,
    Modality.VIDEO,
    Modality.AUDIO,
    Modality.POINT,
    Modality.DEPTH,
)
MEDIA_DIRS = {
    Modality.IMAGE: ("images", ".png"),
    Modality.VIDEO: ("video", ".npy"),
    Modality.AUDIO: ("audio", ".wav"),
    Modality.POINT: ("points", ".npy"),
    Modality.DEPTH: ("depth", ".npy"),
}


def carries(modality: Modality | str) -> frozenset[str]:
    """The attributes the raw signal of ``modality`` carries (see ``CARRIES_WHY``)."""
    return CARRIES[Modality.parse(modality)]


def carries_markdown() -> str:
    """The carrying matrix as a Markdown table (written to ``CARRIES.md``)."""
    head = "| modality | " + " | ".join(ATTRIBUTE_NAMES) + " | why |"
    rule = "|" + " --- |" * (len(ATTRIBUTE_NAMES) + 2)
    rows = [
        f"| {m.value} | "
        + " | ".join("yes" if a in CARRIES[m] else "no" for a in ATTRIBUTE_NAMES)
        + f" | {CARRIES_WHY[m]} |"
        for m in CARRIES
    ]
    intro = (
        "# What each modality carries\n\n"
        "An attribute a modality does not carry cannot be recovered by any binding: its\n"
        "emergent zero-shot accuracy must stay at chance. Images carry motion only through\n"
        "the motion trail (``Difficulty.motion_trail``; 0 gives true stills, and then\n"
        "image-paired binding, ImageBind's recipe, cannot teach video's motion).\n\n"
    )
    return intro + "\n".join([head, rule, *rows]) + "\n"


# ----------------------------------------------------------------------------------------------
# Configuration (presets are data)

_FAITHFUL = {m.value: {a: 1.0 for a in ATTRIBUTE_NAMES} for m in MEDIA_MODALITIES}


def _strength(**overrides: dict[str, float]) -> dict[str, dict[str, float]]:
    out = {m: dict(v) for m, v in _FAITHFUL.items()}
    for modality, attrs in overrides.items():
        out[modality].update(attrs)
    return out


DIFFICULTY_PRESETS: dict[str, dict] = {
    "easy": dict(
        image_noise=0.02,
        color_jitter=0.03,
        clutter_lines=0,
        distractor_prob=0.0,
        position_jitter=0.02,
        audio_noise=0.01,
        pitch_jitter_semitones=0.1,
        point_jitter=0.01,
        point_noise_fraction=0.0,
        depth_noise=0.005,
        motion_trail=0.8,
        strength=_strength(),
    ),
    "default": dict(
        image_noise=0.05,
        color_jitter=0.06,
        clutter_lines=2,
        distractor_prob=0.25,
        position_jitter=0.04,
        audio_noise=0.04,
        pitch_jitter_semitones=0.4,
        point_jitter=0.02,
        point_noise_fraction=0.1,
        depth_noise=0.02,
        motion_trail=0.6,
        strength=_strength(
            Audio={"size": 0.93, "count": 0.95},
            Point={"count": 0.95},
            Depth={"shape": 0.95},
            Video={"size": 0.97},
        ),
    ),
    "hard": dict(
        image_noise=0.1,
        color_jitter=0.1,
        clutter_lines=4,
        distractor_prob=0.6,
        position_jitter=0.06,
        audio_noise=0.1,
        pitch_jitter_semitones=0.8,
        point_jitter=0.04,
        point_noise_fraction=0.25,
        depth_noise=0.05,
        motion_trail=0.45,
        strength=_strength(
            Audio={"shape": 0.85, "color": 0.85, "size": 0.8, "count": 0.85},
            Point={"color": 0.85, "count": 0.85},
            Depth={"shape": 0.85, "size": 0.9},
            Video={"size": 0.9, "motion": 0.9},
        ),
    ),
}


@dataclass
class Difficulty:
    """How hard the world is: noise, clutter, distractors and per-modality attribute strength.

    ``strength[modality][attribute]`` is the probability that ``modality`` renders the scene's
    true value of ``attribute`` (otherwise a uniformly random value): 1.0 = faithful.
    The image is the binding anchor and its captions describe the truth, so it stays faithful.
    ``motion_trail``: opacity of the nearest of the three fading copies a moving group leaves
    behind it in images and video frames (motion blur); 0 renders true stills, which carry no
    motion, so that nothing image-paired can teach video's motion.
    """

    image_noise: float = 0.05
    color_jitter: float = 0.06
    clutter_lines: int = 2
    distractor_prob: float = 0.25
    position_jitter: float = 0.04
    audio_noise: float = 0.04
    pitch_jitter_semitones: float = 0.4
    point_jitter: float = 0.02
    point_noise_fraction: float = 0.1
    depth_noise: float = 0.02
    motion_trail: float = 0.6
    strength: dict[str, dict[str, float]] = field(default_factory=lambda: _strength())

    def __post_init__(self) -> None:
        for name in ("image_noise", "color_jitter", "audio_noise", "point_jitter", "depth_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"Difficulty.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.motion_trail <= 1.0:
            raise ValueError(f"motion_trail must be in [0, 1], got {self.motion_trail}")
        if not 0.0 <= self.distractor_prob <= 1.0:
            raise ValueError(f"distractor_prob must be in [0, 1], got {self.distractor_prob}")
        if not 0.0 <= self.point_noise_fraction < 1.0:
            raise ValueError(
                f"point_noise_fraction must be in [0, 1), got {self.point_noise_fraction}"
            )
        full = _strength()
        for modality, attrs in self.strength.items():
            Modality.parse(modality)
            for attr, s in attrs.items():
                if attr not in ATTRIBUTES:
                    raise ValueError(f"strength[{modality!r}]: unknown attribute {attr!r}")
                if not 0.0 <= s <= 1.0:
                    raise ValueError(f"strength[{modality!r}][{attr!r}]={s} not in [0, 1]")
            full[Modality.parse(modality).value].update(attrs)
        if any(s != 1.0 for s in full["Image"].values()):
            raise ValueError("the image is the binding anchor: its strengths must all be 1.0")
        self.strength = full

    @classmethod
    def from_name(cls, name: str) -> Difficulty:
        if name not in DIFFICULTY_PRESETS:
            raise ValueError(
                f"unknown difficulty {name!r}; choose from {sorted(DIFFICULTY_PRESETS)}"
            )
        return cls(**json.loads(json.dumps(DIFFICULTY_PRESETS[name])))


DEFAULT_HELDOUT: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "green"),
    ("ring", "red"),
)

_FULL_WORLD = dict(
    n_scenes=3000,
    image_size=48,
    video_size=48,
    instructions_per_scene=4,
    question_weights=(0.55, 0.1, 0.1, 0.25),
)
WORLD_PRESETS: dict[str, dict] = {
    # instructions_per_scene=4: twice the fine-tuning questions of the dataclass default, for
    # the same fine-tuning compute (3 epochs instead of 6, training preset "default"). On the
    # default world's 445 test scenes (linear bind network, adapter preset "tiny"), the
    # LLaMA's image answers on held-out shape-colour combinations rose 0.86 -> 0.91-0.94
    # (2 seeds each, the same base LM), all image answers 0.939-0.945 -> 0.963-0.974, audio
    # 0.896-0.900 -> 0.901-0.908 (no cache): more questions per scene show each attribute
    # with more of the others, which is what a held-out combination asks.
    # question_weights (attribute, yesno, choice, describe) 0.55 / 0.1 / 0.1 / 0.25 instead of
    # equal: yes/no answers stay at chance for every input however many are asked (README),
    # and once images carried motion the LLaMA's image answers needed more attribute
    # questions. The same base LM, pre-training and 4 fine-tuning epochs (445 test scenes, no
    # cache; image / video / audio / point / depth): equal weights 0.909 / 0.903 / 0.913 /
    # 0.904 / 0.919; 0.45 / 0.1 / 0.15 / 0.3: 0.954 / 0.937 / 0.933 / 0.930 / 0.941; these:
    # 0.949 / 0.942 / 0.949 / 0.934 / 0.954 (equal weights and 6 epochs: 0.937 / 0.929 /
    # 0.937 / 0.919 / 0.931). Only the instruction files change; the media are the same
    "default": dict(_FULL_WORLD, difficulty="default"),
    "quick": dict(n_scenes=360, image_size=32, video_size=32, difficulty="default"),
    "hard": dict(_FULL_WORLD, difficulty="hard"),
}


@dataclass
class WorldConfig:
    """Everything that determines a world; the same config gives byte-identical files."""

    name: str = "default"
    seed: int = 0
    n_scenes: int = 3000
    image_size: int = 48
    video_size: int = 48
    video_frames: int = 8
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    n_points: int = 256
    difficulty: Difficulty | str = "default"
    heldout: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT
    heldout_fraction: float = 0.05
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    instructions_per_scene: int = 2
    # how often each of QUESTION_KINDS (attribute, yesno, choice, describe) is asked
    question_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    n_alpaca: int = 600

    def __post_init__(self) -> None:
        if isinstance(self.difficulty, str):
            self.difficulty = Difficulty.from_name(self.difficulty)
        elif isinstance(self.difficulty, dict):
            self.difficulty = Difficulty(**self.difficulty)
        if self.n_scenes < 10:
            raise ValueError(f"n_scenes must be >= 10, got {self.n_scenes}")
        if self.image_size < 16 or self.video_size < 16:
            raise ValueError("image_size and video_size must be >= 16 pixels")
        if self.video_frames < 2:
            raise ValueError("video_frames must be >= 2 (motion needs two frames)")
        if self.n_points < 32:
            raise ValueError(f"n_points must be >= 32, got {self.n_points}")
        self.heldout = tuple((str(s), str(c)) for s, c in self.heldout)
        for shape, color in self.heldout:
            if shape not in ATTRIBUTES["shape"] or color not in ATTRIBUTES["color"]:
                raise ValueError(
                    f"held-out combination ({shape!r}, {color!r}) is not in ATTRIBUTES"
                )
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6 or min(fr) < 0:
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1: {fr}")
        self.split_fractions = fr
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        qw = tuple(float(w) for w in self.question_weights)
        if len(qw) != len(QUESTION_KINDS) or min(qw) < 0 or sum(qw) <= 0:
            raise ValueError(
                f"question_weights: {len(QUESTION_KINDS)} non-negative weights, one per kind of "
                f"{QUESTION_KINDS}, not all 0; got {self.question_weights}"
            )
        self.question_weights = qw

    @classmethod
    def from_name(cls, name: str, **overrides) -> WorldConfig:
        """Presets "default" (the embedded default), "quick" (tests, < 15 s) and "hard"."""
        if name not in WORLD_PRESETS:
            raise ValueError(f"unknown world preset {name!r}; choose from {sorted(WORLD_PRESETS)}")
        return cls(**{"name": name, **WORLD_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["heldout"] = [list(p) for p in self.heldout]
        d["split_fractions"] = list(self.split_fractions)
        d["question_weights"] = list(self.question_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Scenes and text


@dataclass
class Scene:
    """One scene: its attributes, its media files (relative to the world dir) and captions."""

    id: str
    split: str
    heldout: bool
    attributes: dict[str, str]
    files: dict[Modality, str]
    captions: list[str]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["files"] = {Modality.parse(m).value: p for m, p in self.files.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Scene:
        d = json.loads(line)
        d["files"] = {Modality.parse(m): p for m, p in d["files"].items()}
        return cls(**d)

    def key(self, attrs: Sequence[str]) -> tuple[str, ...]:
        """The attribute tuple restricted to ``attrs`` (for per-combination retrieval)."""
        return tuple(self.attributes[a] for a in attrs)


def _objects(attrs: dict[str, str]) -> str:
    shape = attrs["shape"] if attrs["count"] == "one" else PLURALS[attrs["shape"]]
    return shape


def describe(attrs: dict[str, str], modality: Modality | str = Modality.IMAGE) -> str:
    """The canonical description (the answer to "describe" requests), e.g.
    "There are two small red circles in the top left, moving up." The motion is named for
    modalities that carry it (image, video, text)."""
    verb = "is" if attrs["count"] == "one" else "are"
    text = (
        f"There {verb} {attrs['count']} {attrs['size']} {attrs['color']} {_objects(attrs)} "
        f"in the {attrs['position']}"
    )
    if "motion" in CARRIES[Modality.parse(modality)]:
        text += ", " + motion_phrase(attrs["motion"])
    return text + "."


def motion_phrase(motion: str) -> str:
    return "standing still" if motion == "static" else f"moving {motion}"


_CAPTION_TEMPLATES = (
    "{count} {size} {color} {objects} in the {position}.",
    "A picture of {count} {size} {color} {objects} at the {position}.",
    "In the {position} there {verb} {count} {size} {color} {objects}.",
    "{count} {color} {objects}, {size}, in the {position} of the frame.",
    "The {position} of the scene shows {count} {size} {color} {objects}.",
)


def captions_for(attrs: dict[str, str], modality: Modality | str = Modality.IMAGE) -> list[str]:
    """All caption paraphrases of a scene (the canonical description first); the motion is
    named for modalities that carry it."""
    fill = dict(attrs, objects=_objects(attrs), verb="is" if attrs["count"] == "one" else "are")
    caps = [describe(attrs, modality)]
    for t in _CAPTION_TEMPLATES:
        c = t.format(**fill)
        if "motion" in CARRIES[Modality.parse(modality)]:
            c = c[:-1] + ", " + motion_phrase(attrs["motion"]) + "."
        caps.append(c[0].upper() + c[1:])
    return caps


def answer_normalise(s: str) -> str:
    """Normalise a short attribute answer: lower case, no punctuation or articles, canonical
    synonyms (``"colour"``-free: "Big." -> "large", "2" -> "two", "top-left" -> "top left")."""
    s = s.strip().lower()
    s = re.sub(r"[^a-z0-9 \-]", " ", s).replace("-", " ")
    words = [w for w in s.split() if w not in {"a", "an", "the"}]
    synonyms = {
        "big": "large",
        "little": "small",
        "tiny": "small",
        "1": "one",
        "2": "two",
        "3": "three",
        "still": "static",
        "grey": "gray",
        "colour": "color",
    }
    words = [synonyms.get(w, w) for w in words]
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# Attribute sampling


def _sample_attributes(cfg: WorldConfig, rng: np.random.Generator) -> tuple[dict, list, list]:
    """Attribute indices per scene ``{attr: (N,) int}``, the split names and held-out flags."""
    n = cfg.n_scenes
    k = {a: len(v) for a, v in ATTRIBUTES.items()}
    held = {(ATTRIBUTES["shape"].index(s), ATTRIBUTES["color"].index(c)) for s, c in cfg.heldout}
    n_held = int(round(n * cfg.heldout_fraction)) if held else 0
    idx = {a: rng.integers(0, k[a], size=n) for a in ATTRIBUTE_NAMES}
    # Regular scenes: resample (shape, colour) until no held-out pair remains.
    allowed = np.array(
        [(s, c) for s in range(k["shape"]) for c in range(k["color"]) if (s, c) not in held]
    )
    pick = allowed[rng.integers(0, len(allowed), size=n)]
    idx["shape"], idx["color"] = pick[:, 0].copy(), pick[:, 1].copy()
    heldout = np.zeros(n, dtype=bool)
    if n_held:
        where = rng.choice(n, size=n_held, replace=False)
        hp = np.array(sorted(held))[rng.integers(0, len(held), size=n_held)]
        idx["shape"][where], idx["color"][where] = hp[:, 0], hp[:, 1]
        heldout[where] = True
    u = rng.random(n)
    f_train, f_val, _ = cfg.split_fractions
    split = np.where(u < f_train, "train", np.where(u < f_train + f_val, "val", "test"))
    split[heldout] = "test"
    return idx, split.tolist(), heldout.tolist()


def _modality_view(
    idx: dict[str, np.ndarray], strength: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The attribute indices a modality renders: the truth, or a random value with
    probability ``1 - strength[attribute]``."""
    out = {}
    for a, v in idx.items():
        s = strength.get(a, 1.0)
        flip = rng.random(len(v)) >= s
        rand = rng.integers(0, len(ATTRIBUTES[a]), size=len(v))
        out[a] = np.where(flip, rand, v)
    return out


# ----------------------------------------------------------------------------------------------
# Geometry shared by the renderers (normalised coordinates: x right, y down, in [-1, 1])

_QUADRANTS = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])  # position order
_MOTION_DIRS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=float)  # motion order
_RADIUS = np.array([0.19, 0.28])  # small, large: 4.6 and 6.7 px at 48 px
_OFFSET = 0.30  # distance of each object from the group centre (objects never merge)
_PATTERNS = np.array(  # (count, slot, xy) unit offsets for 1, 2, 3 objects
    [
        [[0, 0], [0, 0], [0, 0]],
        [[-1, 0], [1, 0], [0, 0]],
        [[0, -1], [-0.866, 0.5], [0.866, 0.5]],
    ]
)
_COLORS = np.array(
    [
        [0.86, 0.14, 0.14],
        [0.15, 0.70, 0.22],
        [0.20, 0.32, 0.92],
        [0.92, 0.86, 0.15],
        [0.62, 0.22, 0.78],
        [0.96, 0.55, 0.10],
    ]
)
_MOTION_SPAN = 0.5  # distance travelled over a clip


def _layout(view: dict[str, np.ndarray], cfg: WorldConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    """Object centres ``(N, 3, 2)`` and activity mask ``(N, 3)`` for one modality view."""
    n = len(view["shape"])
    theta = rng.uniform(0, 2 * np.pi, size=n)
    rot = np.stack([np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)], -1)
    rot = rot.reshape(n, 2, 2)
    offsets = _PATTERNS[view["count"]] * _OFFSET  # (N, 3, 2)
    offsets = np.einsum("nij,nkj->nki", rot, offsets)
    jitter = rng.normal(0, cfg.difficulty.position_jitter, size=(n, 3, 2))
    centres = _QUADRANTS[view["position"]][:, None, :] + offsets + jitter
    active = np.arange(3)[None, :] <= view["count"][:, None]
    return centres, active


def _distractors(n: int, view: dict, cfg: WorldConfig, rng) -> dict[str, np.ndarray]:
    """At most one small grey distractor per scene, in another quadrant (not counted)."""
    present = rng.random(n) < cfg.difficulty.distractor_prob
    quad = (view["position"] + rng.integers(1, 4, size=n)) % 4
    centre = _QUADRANTS[quad] + rng.normal(0, 0.05, size=(n, 2))
    grey = rng.uniform(0.45, 0.75, size=n)
    shape = rng.integers(0, len(ATTRIBUTES["shape"]), size=n)
    return dict(present=present, centre=centre, grey=grey, shape=shape)


def _abs_max(u, v):
    return np.maximum(np.abs(u), np.abs(v))


# Inside-tests and depth-map height profiles of the unit shapes, in ATTRIBUTES["shape"] order,
# as functions of object coordinates (u, v) and rho = sqrt(u^2 + v^2).
_MASKS = (
    lambda u, v, rho: rho <= 1.0,
    lambda u, v, rho: _abs_max(u, v) <= 0.82,
    lambda u, v, rho: (v >= -0.95) & (v <= 0.8) & (np.abs(u) <= (v + 0.95) / 1.75 * 1.05),
    lambda u, v, rho: np.abs(u) + np.abs(v) <= 1.05,
    lambda u, v, rho: (_abs_max(u, v) <= 1.0) & (np.minimum(np.abs(u), np.abs(v)) <= 0.34),
    lambda u, v, rho: (rho <= 1.0) & (rho >= 0.5),
)
_HEIGHTS = (
    lambda u, v, rho: np.sqrt(np.clip(1 - rho * rho, 0, 1)),  # sphere
    lambda u, v, rho: np.full_like(u, 0.8),  # cube top
    lambda u, v, rho: np.clip((v + 0.95) / 1.75, 0, 1),  # wedge rising towards the base
    lambda u, v, rho: np.clip(1.0 - np.abs(u) - np.abs(v), 0, 1) + 0.2,  # octahedron
    lambda u, v, rho: np.full_like(u, 0.4),  # flat cross
    lambda u, v, rho: np.sqrt(np.clip(1 - ((rho - 0.75) / 0.25) ** 2, 0, 1)) * 0.5,  # torus
)


def _per_shape(fns, shape: np.ndarray, u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """Apply ``fns[shape[n]]`` to scene n's coordinates: shape (N,), u, v (N, ...)."""
    out = np.zeros(u.shape, dtype=dtype)
    for k, fn in enumerate(fns):
        idx = np.flatnonzero(shape == k)
        if idx.size:
            uk, vk = u[idx], v[idx]
            out[idx] = fn(uk, vk, np.sqrt(uk * uk + vk * vk))
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")  # X (H, W) along columns, Y along rows


def _backgrounds(n: int, size: int, cfg: WorldConfig, rng) -> np.ndarray:
    """Tinted, shaded backgrounds with faint grey clutter lines: (N, H, W, 3) float32."""
    X, Y = (g.astype(np.float32) for g in _grid(size))  # float32: several times faster
    base = rng.uniform(0.12, 0.38, size=(n, 1, 1, 1)).astype(np.float32)
    tint = rng.normal(0, 0.03, size=(n, 1, 1, 3)).astype(np.float32)
    grad = rng.normal(0, 0.06, size=(n, 2)).astype(np.float32)
    bg = base + tint + (grad[:, 0, None, None] * X + grad[:, 1, None, None] * Y)[..., None]
    for _ in range(cfg.difficulty.clutter_lines):
        p = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
        ang = rng.uniform(0, np.pi, size=n)
        sin, cos = np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)
        dist = np.abs(
            (X[None] - p[:, 0, None, None]) * sin[:, None, None]
            - (Y[None] - p[:, 1, None, None]) * cos[:, None, None]
        )
        level = rng.uniform(-0.1, 0.12, size=(n, 1, 1)).astype(np.float32)
        bg += ((dist < 1.2 / size) * level)[..., None]
    return bg


def _paint(
    canvas: np.ndarray,
    centres: np.ndarray,
    active: np.ndarray,
    radius: np.ndarray,
    shape: np.ndarray,
    rgb: np.ndarray,
) -> np.ndarray:
    """Paint up to K objects per scene. canvas (N,H,W,3), centres (N,K,2), active (N,K),
    radius (N,), shape (N,), rgb (N,3). Returns the painted mask (N,H,W)."""
    n, size, k = canvas.shape[0], canvas.shape[1], centres.shape[1]
    coords = _grid(size)[0][0].astype(np.float32)  # pixel centres, as _grid's X and Y
    c = centres.astype(np.float32)
    r = radius.astype(np.float32)[:, None, None]
    # Only a window of (2 * half + 1)^2 pixels around each object can be inside it (every
    # shape lies within 1.05 radii of its centre): the tests run there, not on the canvas.
    half = int(np.ceil(1.1 * float(radius.max()) * size / 2)) + 1
    steps = np.arange(-half, half + 1)
    pix = np.floor((centres + 1) / 2 * size).astype(np.int64)  # (N, K, 2) centre pixel
    cols = np.clip(pix[..., 0, None] + steps, 0, size - 1)  # (N, K, P); edges repeat a pixel
    rows = np.clip(pix[..., 1, None] + steps, 0, size - 1)
    p = len(steps)
    u = np.broadcast_to(((coords[cols] - c[..., 0, None]) / r)[:, :, None, :], (n, k, p, p))
    v = np.broadcast_to(((coords[rows] - c[..., 1, None]) / r)[:, :, :, None], (n, k, p, p))
    # (N, K, P, P) inside-tests, then any object
    inside = _per_shape(_MASKS, shape, u, v, bool) & active[:, :, None, None]
    mask = np.zeros((n, size, size), dtype=bool)
    at = np.arange(n)[:, None, None]
    for j in range(k):
        win = (at, rows[:, j, :, None], cols[:, j, None, :])
        mask[win] = mask[win] | inside[:, j]
    np.copyto(canvas, rgb[:, None, None, :].astype(np.float32), where=mask[..., None])
    return mask


def _object_rgb(view: dict, cfg: WorldConfig, rng) -> np.ndarray:
    n = len(view["color"])
    rgb = _COLORS[view["color"]] + rng.normal(0, cfg.difficulty.color_jitter, size=(n, 3))
    return np.clip(rgb, 0, 1)


_TRAIL_STEP = 0.045  # spacing of the motion trail's copies, as a fraction of the frame
_TRAIL_FADE = (1.0, 0.6, 0.3)  # opacity of the copies, nearest first (times motion_trail)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``mask`` (N, H, W) moved by (dx, dy) pixels, with False shifted in."""
    out = np.zeros_like(mask)
    h, w = mask.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _paint_trail(canvas, mask, motion, rgb, opacity: float) -> None:
    """Blend fading copies of the objects' ``mask`` (N, H, W) behind each moving group
    (``motion`` (N,) indices into ``_MOTION_DIRS``), under the objects themselves. The copies
    share the objects' colour, so layering them is one blend with the transmittance ``keep``
    (the product of ``1 - opacity`` of every copy over a pixel)."""
    size = canvas.shape[1]
    keep = np.ones(mask.shape, dtype=np.float32)
    for k, fade in enumerate(_TRAIL_FADE, start=1):
        step = max(1, int(round(k * _TRAIL_STEP * size)))
        ghost = np.zeros_like(mask)
        for d in range(1, len(_MOTION_DIRS)):
            moving = (motion == d)[:, None, None]
            if moving.any():
                dx, dy = (-_MOTION_DIRS[d] * step).astype(int)
                ghost |= _shift(mask, int(dx), int(dy)) & moving
        keep[ghost & ~mask] *= np.float32(1 - opacity * fade)
    colour = rgb[:, None, None, :].astype(np.float32)
    canvas -= colour  # canvas = colour + keep * (canvas - colour), in place
    canvas *= keep[..., None]
    canvas += colour


def _render_frames(view, centres, active, dis, rgb, bg, cfg, rng) -> np.ndarray:
    """One frame per scene: (N, H, W, 3) uint8. A moving group leaves a trail of fading
    copies behind it (the exposure's motion blur, ``Difficulty.motion_trail``)."""
    canvas = bg.copy()
    n = len(view["shape"])
    if dis["present"].any():
        d_active = dis["present"][:, None]
        _paint(
            canvas,
            dis["centre"][:, None, :],
            d_active,
            np.full(n, _RADIUS[0]),
            dis["shape"],
            np.repeat(dis["grey"][:, None], 3, axis=1),
        )
    mask = _paint(canvas, centres, active, _RADIUS[view["size"]], view["shape"], rgb)
    if cfg.difficulty.motion_trail > 0:
        _paint_trail(canvas, mask, view["motion"], rgb, cfg.difficulty.motion_trail)
    noise = rng.standard_normal(size=canvas.shape, dtype=np.float32)
    canvas += np.float32(cfg.difficulty.image_noise) * noise
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)


def _render_depth(view, centres, active, dis, cfg, rng) -> np.ndarray:
    """Depth of the image's scene: (N, H, W) float32 in [0, 1] (1 = far)."""
    n, size = len(view["shape"]), cfg.image_size
    X, Y = _grid(size)
    tilt = rng.uniform(0.05, 0.15, size=n)
    depth = 0.9 + tilt[:, None, None] * Y[None] * 0.5 + np.zeros((n, 1, 1))

    def place(c, act, radius, shape, z0):
        u = (X[None, None] - c[:, :, 0, None, None]) / radius[:, None, None, None]
        v = (Y[None, None] - c[:, :, 1, None, None]) / radius[:, None, None, None]
        inside = _per_shape(_MASKS, shape, u, v, bool) & act[:, :, None, None]
        h = _per_shape(_HEIGHTS, shape, u, v, np.float64) * radius[:, None, None, None]
        d = np.where(inside, z0 - h, np.inf).min(axis=1)
        return np.minimum(depth, d)

    depth = place(
        dis["centre"][:, None, :],
        dis["present"][:, None],
        np.full(n, _RADIUS[0]),
        dis["shape"],
        0.7,
    )
    depth = place(centres, active, _RADIUS[view["size"]], view["shape"], 0.7)
    depth = depth + rng.normal(0, cfg.difficulty.depth_noise, size=depth.shape)
    return np.clip(depth, 0, 1).astype(np.float32)


def _unit_solid(shape: np.ndarray, rng) -> np.ndarray:
    """Points on unit 3-D solids matching the 2-D shapes: (M,) shape ids -> (M, 3) xyz,
    with x, y in the image plane and z towards the camera."""
    m = len(shape)
    g = rng.normal(size=(m, 3))
    sphere = g / np.linalg.norm(g, axis=1, keepdims=True)
    # cube surface: push one random axis to +-1
    cube = rng.uniform(-1, 1, size=(m, 3))
    ax = rng.integers(0, 3, size=m)
    cube[np.arange(m), ax] = np.sign(rng.uniform(-1, 1, size=m))
    cube *= 0.82
    # cone standing on its base, apex up (-y), axis along y
    h = 1 - np.sqrt(rng.uniform(0, 1, size=m))  # denser near the base
    ang = rng.uniform(0, 2 * np.pi, size=m)
    cone = np.stack([h * np.cos(ang), 0.8 - 1.75 * (1 - h), h * np.sin(ang)], 1)
    # octahedron surface |x|+|y|+|z| = 1
    w = rng.dirichlet([1, 1, 1], size=m) * np.sign(rng.uniform(-1, 1, size=(m, 3)))
    octa = w * 1.05
    # cross: two orthogonal bars in the image plane
    bar = rng.uniform(-1, 1, size=(m, 3)) * np.array([1.0, 0.34, 0.34])
    flip = rng.random(m) < 0.5
    cross = np.where(flip[:, None], bar[:, [1, 0, 2]], bar)
    # torus in the image plane
    a, b = rng.uniform(0, 2 * np.pi, size=(2, m))
    rr = 0.75 + 0.25 * np.cos(b)
    torus = np.stack([rr * np.cos(a), rr * np.sin(a), 0.25 * np.sin(b)], 1)
    solids = np.stack([sphere, cube, cone, octa, cross, torus])  # (6, M, 3)
    return solids[shape, np.arange(m)]


def _render_points(view, centres, active, dis, rgb, cfg, rng) -> np.ndarray:
    """Point clouds (N, P, 6) float32: xyz (x right, y down, z towards the camera) + rgb."""
    n, p = len(view["shape"]), cfg.n_points
    n_noise = int(round(p * cfg.difficulty.point_noise_fraction))
    n_obj = p - n_noise
    n_obj_dis = np.where(dis["present"], n_obj // 8, 0)
    slot_u = rng.random((n, n_obj))
    k = view["count"] + 1
    slot = np.minimum((slot_u * k[:, None]).astype(int), 2)  # object slot of each point
    is_dis = np.arange(n_obj)[None, :] < n_obj_dis[:, None]
    radius = _RADIUS[view["size"]]
    shape = np.where(is_dis, dis["shape"][:, None], view["shape"][:, None])
    unit = _unit_solid(shape.ravel(), rng).reshape(n, n_obj, 3)
    r = np.where(is_dis, _RADIUS[0], radius[:, None])
    centre_xy = np.take_along_axis(centres, slot[..., None], axis=1)
    centre_xy = np.where(is_dis[..., None], dis["centre"][:, None, :], centre_xy)
    xyz = unit * r[..., None]
    xyz[..., :2] += centre_xy
    xyz[..., 2] += r  # resting on the ground plane z = 0
    col = np.where(is_dis[..., None], dis["grey"][:, None, None], rgb[:, None, :])
    col = np.broadcast_to(col, (n, n_obj, 3))
    noise_xyz = np.concatenate(
        [rng.uniform(-1, 1, size=(n, n_noise, 2)), rng.uniform(0, 0.05, size=(n, n_noise, 1))], -1
    )
    noise_col = rng.uniform(0.15, 0.4, size=(n, n_noise, 1)).repeat(3, -1)
    pts = np.concatenate(
        [np.concatenate([xyz, col], -1), np.concatenate([noise_xyz, noise_col], -1)], 1
    )
    pts[..., :3] += rng.normal(0, cfg.difficulty.point_jitter, size=(n, p, 3))
    order = np.argsort(rng.random((n, p)), axis=1)  # shuffle: point order carries nothing
    return np.take_along_axis(pts, order[..., None], axis=1).astype(np.float32)


# Audio: timbre per shape (harmonic amplitudes of partial ratios), pitch per colour.
_PITCHES = 220.0 * 2 ** (np.arange(6) * 4 / 12)  # major thirds over two octaves
_PARTIAL_RATIOS = np.array(
    [
        [1, 2, 3, 4, 5, 6, 7, 8],  # circle: pure sine
        [1, 2, 3, 4, 5, 6, 7, 8],  # square: odd harmonics
        [1, 2, 3, 4, 5, 6, 7, 8],  # triangle: sawtooth
        [1, 2, 3, 4, 5, 6, 7, 8],  # diamond: bright, sparse
        [1, 2.76, 5.40, 8.93, 1, 1, 1, 1],  # cross: bell (inharmonic)
        [1, 2, 3, 4, 5, 6, 7, 8],  # ring: flat spectrum with tremolo
    ],
    dtype=float,
)
_PARTIAL_AMPS = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1 / 3, 0, 1 / 5, 0, 1 / 7, 0],
        [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 1 / 7, 1 / 8],
        [1, 0, 0, 0.8, 0, 0, 0, 0.6],
        [1, 0.6, 0.4, 0.25, 0, 0, 0, 0],
        [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
    ]
)
_DECAY = np.array([4.0, 3.0, 3.0, 3.0, 12.0, 3.0])  # per-shape note decay (1/s)
_TREMOLO = np.array([0, 0, 0, 0, 0, 1.0])
_LOUDNESS = np.array([0.22, 0.6])  # small, large
_NOTE_SLOTS = np.array([0.04, 0.36, 0.68])  # onset slots (s)
_NOTE_SECONDS = 0.26  # how long a note sounds


def _render_audio(view: dict, cfg: WorldConfig, rng) -> np.ndarray:
    """Mono waveforms (N, S) float32 in [-1, 1]."""
    n = len(view["shape"])
    sr, s = cfg.sample_rate, int(round(cfg.sample_rate * cfg.audio_seconds))
    t = (np.arange(s) / sr).astype(np.float32)
    f0 = _PITCHES[view["color"]] * 2 ** (
        rng.normal(0, cfg.difficulty.pitch_jitter_semitones, size=n) / 12
    )
    amp = _LOUDNESS[view["size"]] * rng.uniform(0.85, 1.15, size=n)
    # which slots sound: the first `count` of a random permutation of the three slots
    perm = np.argsort(rng.random((n, 3)), axis=1)
    on = np.zeros((n, 3), dtype=bool)
    np.put_along_axis(on, perm, np.arange(3)[None, :] <= view["count"][:, None], axis=1)
    onsets = _NOTE_SLOTS[None, :] * cfg.audio_seconds + rng.uniform(0, 0.03, size=(n, 3))
    trem_wave = (1 + np.sin(2 * np.pi * 12 * t)).astype(np.float32)
    # each note sounds for _NOTE_SECONDS from its onset: synthesise only inside its slot's
    # window (onset jitter included), for the scenes whose note is on
    windows = [
        (int(a * sr), min(s, int(np.ceil((a + 0.03 + _NOTE_SECONDS) * sr)) + 1))
        for a in _NOTE_SLOTS * cfg.audio_seconds
    ]
    out = np.zeros((n, s), dtype=np.float32)
    for lo in range(0, n, 128):
        sl = slice(lo, lo + 128)
        sh = view["shape"][sl]
        freqs = f0[sl, None] * _PARTIAL_RATIOS[sh]  # (b, 8)
        amps = _PARTIAL_AMPS[sh] * (freqs < sr / 2 - 200)
        amps = (amps / np.abs(amps).sum(1, keepdims=True)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=freqs.shape).astype(np.float32)
        omega = (2 * np.pi * freqs).astype(np.float32)
        for j, (a, b) in enumerate(windows):
            rows = np.flatnonzero(on[sl, j])
            if not rows.size:
                continue
            tj, shj = t[a:b], sh[rows]
            # float32 throughout: numpy's vectorised float32 sin is several times faster
            arg = omega[rows, :, None] * tj + phase[rows, :, None]  # (r, 8, window)
            tone = np.einsum("bh,bht->bt", amps[rows], np.sin(arg))
            trem = 1 - (0.5 * _TREMOLO[shj, None]).astype(np.float32) * trem_wave[None, a:b]
            dt = tj[None] - onsets[lo + rows, j, None].astype(np.float32)  # (r, window)
            decay = _DECAY[shj, None].astype(np.float32)
            env = np.minimum(dt / 0.01, 1) * np.exp(-decay * np.maximum(dt, 0))
            env = np.where((dt >= 0) & (dt < _NOTE_SECONDS), env, 0)
            out[lo + rows, a:b] += amp[lo + rows, None].astype(np.float32) * tone * trem * env
    out += cfg.difficulty.audio_noise * rng.standard_normal(size=out.shape, dtype=np.float32)
    return np.clip(out, -1, 1)


def _render_video(view, centres, active, dis, rgb, cfg, rng) -> np.ndarray:
    """Clips (N, T, H, W, 3) uint8: the scene's objects translate along the motion direction;
    the ``position`` attribute is where the group is in the middle of the clip."""
    n, frames = len(view["shape"]), cfg.video_frames
    bg = _backgrounds(n, cfg.video_size, cfg, rng)
    direction = _MOTION_DIRS[view["motion"]]  # (N, 2)
    out = np.empty((n, frames, cfg.video_size, cfg.video_size, 3), dtype=np.uint8)
    for f in range(frames):
        shift = (f / (frames - 1) - 0.5) * _MOTION_SPAN
        c = centres + direction[:, None, :] * shift
        out[:, f] = _render_frames(view, c, active, dis, rgb, bg, cfg, rng)
    return out


# ----------------------------------------------------------------------------------------------
# Questions and text-only instructions


def make_question(
    attrs: dict[str, str], kind: str, rng: np.random.Generator, modality=Modality.IMAGE
) -> tuple[str, str, str]:
    """One question about a scene: returns (attribute, question, answer).

    ``kind``: "attribute" (short answer), "yesno", "choice" (answer = option letter) or
    "describe". Only attributes the modality and the captions carry are asked about.
    """
    modality = Modality.parse(modality)
    medium = "video" if modality == Modality.VIDEO else "image"
    names = [a for a in ATTRIBUTE_NAMES if a in CARRIES[modality] and a in CARRIES[Modality.TEXT]]
    if kind == "describe":
        q = str(rng.choice([f"Describe the {medium}.", f"What do you see in this {medium}?"]))
        return "describe", q, describe(attrs, modality)
    attr = str(rng.choice(names))
    value = attrs[attr]
    if kind == "attribute":
        return attr, ATTRIBUTE_QUESTIONS[attr].format(medium=medium), value
    if kind == "yesno":
        ask = (
            value
            if rng.random() < 0.5
            else str(rng.choice([v for v in ATTRIBUTES[attr] if v != value]))
        )
        return attr, yesno_question(attr, ask, medium), "yes" if ask == value else "no"
    if kind == "choice":
        others = [v for v in ATTRIBUTES[attr] if v != value]
        opts = list(rng.choice(others, size=min(3, len(others)), replace=False)) + [value]
        opts = [str(o) for o in rng.permutation(opts)]
        letters = "ABCD"[: len(opts)]
        lines = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, opts, strict=True))
        stem = ATTRIBUTE_QUESTIONS[attr].format(medium=medium)
        q = f"{stem}\n{lines}\nAnswer with the option's letter."
        return attr, q, letters[opts.index(value)]
    raise ValueError(f"unknown question kind {kind!r}")


QUESTION_KINDS = ("attribute", "yesno", "choice", "describe")
ATTRIBUTE_QUESTIONS = {
    "shape": "What shape are the objects in the {medium}?",
    "color": "What colour are the objects in the {medium}?",
    "size": "Are the objects small or large?",
    "position": "Where in the {medium} are the objects?",
    "count": "How many objects are there?",
    "motion": "In which direction are the objects moving?",
}
_YESNO = {
    "shape": "Are the objects in the {medium} {v}?",  # v in the plural (yesno_question)
    "color": "Are the objects {v}?",
    "size": "Are the objects {v}?",
    "position": "Are the objects in the {v} of the {medium}?",
    "count": "Are there {v} objects?",
    "motion": "Are the objects {v}?",
}


def yesno_question(attr: str, ask: str, medium: str = "image") -> str:
    """The yes/no question whether ``attr`` is ``ask``, in English ("Are the objects in the
    image crosses?", "Is there one object?")."""
    if attr == "count" and ask == "one":
        return "Is there one object?"
    if attr == "shape":
        ask = PLURALS.get(ask, ask)
    return _YESNO[attr].format(v=ask, medium=medium)


def _alpaca_item(rng: np.random.Generator) -> dict[str, str]:
    """One text-only instruction about the world's vocabulary and facts."""
    kind = int(rng.integers(0, 6))
    if kind == 0:
        attr = str(rng.choice(["shape", "color", "size", "position"]))
        word = {"color": "colour"}.get(attr, attr)
        return dict(
            instruction=f"Name a {word}.", input="", output=str(rng.choice(ATTRIBUTES[attr]))
        )
    if kind == 1:
        return dict(instruction="Which is bigger, large or small?", input="", output="large")
    if kind == 2:
        counts = ATTRIBUTES["count"]
        i = int(rng.integers(0, 2))
        return dict(
            instruction=f"What number comes after {counts[i]}?", input="", output=counts[i + 1]
        )
    if kind == 3:
        opp = {
            "left": "right",
            "right": "left",
            "up": "down",
            "down": "up",
            "top": "bottom",
            "bottom": "top",
        }
        w = str(rng.choice(list(opp)))
        return dict(instruction=f"What is the opposite of {w}?", input="", output=opp[w])
    attrs = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
    caption = captions_for(attrs)[int(rng.integers(1, 6))]
    if kind == 4:
        attr = str(rng.choice(["shape", "color", "size", "position", "count", "motion"]))
        q = (
            ATTRIBUTE_QUESTIONS[attr]
            .format(medium="description")
            .replace(" in the description", "")
        )
        return dict(
            instruction=f"Read the description and answer: {q}", input=caption, output=attrs[attr]
        )
    return dict(
        instruction="Rewrite the description as one plain sentence.",
        input=caption,
        output=describe(attrs),
    )


# ----------------------------------------------------------------------------------------------
# Writing


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB" if img.ndim == 3 else "L").save(
        buf, format="PNG", optimize=False
    )
    return buf.getvalue()


def _wav_bytes(x: np.ndarray, sample_rate: int) -> bytes:
    pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


@dataclass
class World:
    """A generated world on disk: its root folder, config and scenes."""

    root: Path
    config: WorldConfig
    scenes: list[Scene]

    @classmethod
    def load(cls, out_dir: str | Path) -> World:
        """Read ``world.json`` and ``scenes.jsonl`` from ``out_dir``."""
        root = Path(out_dir)
        if not (root / "scenes.jsonl").exists():
            raise FileNotFoundError(f"{root}: no scenes.jsonl; generate the world first")
        cfg = WorldConfig.from_dict(json.loads((root / "world.json").read_text()))
        lines = (root / "scenes.jsonl").read_text().splitlines()
        return cls(root=root, config=cfg, scenes=[Scene.from_json(x) for x in lines if x])

    def split(self, name: str) -> list[Scene]:
        """Scenes of one split ("train", "val", "test")."""
        return [s for s in self.scenes if s.split == name]

    def path(self, scene: Scene, modality: Modality | str) -> Path:
        return self.root / scene.files[Modality.parse(modality)]

    def fingerprint(self) -> str:
        """A hash of the world's config and scene list (not of the media bytes)."""
        h = hashlib.sha256((self.root / "world.json").read_bytes())
        h.update((self.root / "scenes.jsonl").read_bytes())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[Scene]:
        return iter(self.scenes)

    def __len__(self) -> int:
        return len(self.scenes)


def _render_image_view(view, centres, active, dis, rgb, cfg, rng) -> np.ndarray:
    """Images (N, H, W, 3) uint8 of one view on fresh backgrounds."""
    bg = _backgrounds(len(view["shape"]), cfg.image_size, cfg, rng)
    return _render_frames(view, centres, active, dis, rgb, bg, cfg, rng)


def _render_view(
    modality: Modality, idx: dict[str, np.ndarray], cfg: WorldConfig, rng: np.random.Generator
) -> np.ndarray:
    """Render one modality of scenes given as attribute index arrays (``idx``)."""
    view = _modality_view(idx, cfg.difficulty.strength[modality.value], rng)
    centres, active = _layout(view, cfg, rng)
    dis = _distractors(len(view["shape"]), view, cfg, rng)
    rgb = _object_rgb(view, cfg, rng)
    if modality == Modality.IMAGE:
        return _render_image_view(view, centres, active, dis, rgb, cfg, rng)
    if modality == Modality.VIDEO:
        return _render_video(view, centres, active, dis, rgb, cfg, rng)
    if modality == Modality.AUDIO:
        return _render_audio(view, cfg, rng)
    if modality == Modality.POINT:
        return _render_points(view, centres, active, dis, rgb, cfg, rng)
    return _render_depth(view, centres, active, dis, cfg, rng)


def render_media(
    attributes: Sequence[dict[str, str]],
    modality: Modality | str,
    cfg: WorldConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Fresh renders of scenes in one modality: ``attributes`` (N dicts) -> (N, ...) arrays
    in the modality's file layout (image (N, H, W, 3) uint8, video (N, T, H, W, 3) uint8,
    audio (N, S) float32, point (N, P, 6) float32, depth (N, H, W) float32).

    The same renderer as ``generate_world`` with new draws of every nuisance (layout, jitter,
    background, clutter, distractor, noise, and the modality's strength flips): training
    re-renders its scenes so that small encoders learn the attributes instead of memorising a
    few thousand samples."""
    m = Modality.parse(modality)
    if m not in MEDIA_MODALITIES:
        raise ValueError(f"{m.value} is not rendered; media modalities: {MEDIA_MODALITIES}")
    idx = {
        a: np.array([ATTRIBUTES[a].index(d[a]) for d in attributes], dtype=np.int64)
        for a in ATTRIBUTE_NAMES
    }
    return _render_view(m, idx, cfg, rng)


def _render_chunk(
    idx: dict, cfg: WorldConfig, rng: np.random.Generator
) -> dict[Modality, np.ndarray]:
    """Render every modality for one chunk of scenes (attribute index arrays)."""
    return {m: _render_view(m, idx, cfg, rng) for m in MEDIA_MODALITIES}


def _encode(modality: Modality, x: np.ndarray, cfg: WorldConfig) -> bytes:
    if modality == Modality.IMAGE:
        return _png_bytes(x)
    if modality == Modality.AUDIO:
        return _wav_bytes(x, cfg.sample_rate)
    return _npy_bytes(x)


def generate_world(cfg: WorldConfig, out_dir: str | Path, chunk: int = 250) -> World:
    """Generate the world described by ``cfg`` into ``out_dir`` and return it.

    Deterministic: the same config gives byte-identical files. Renders in chunks of ``chunk``
    scenes (vectorised numpy). ``scenes.jsonl`` is the commit marker: it is removed first and
    written (atomically, like every metadata file) last, so a world is either complete or has
    no scene list. Media files are written in place (an atomic rename per file costs more than
    rendering on slow file systems); ``World.load`` refuses a folder without a scene list.
    """
    from tqdm.auto import tqdm

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "scenes.jsonl").unlink(missing_ok=True)
    rng = np.random.default_rng(cfg.seed)
    idx, split, heldout = _sample_attributes(cfg, rng)
    scenes: list[Scene] = []
    for i in range(cfg.n_scenes):
        attrs = {a: ATTRIBUTES[a][int(idx[a][i])] for a in ATTRIBUTE_NAMES}
        sid = f"s{i:05d}"
        files = {m: f"{MEDIA_DIRS[m][0]}/{sid}{MEDIA_DIRS[m][1]}" for m in MEDIA_MODALITIES}
        scenes.append(Scene(sid, split[i], heldout[i], attrs, files, captions_for(attrs)))
    for m in MEDIA_MODALITIES:
        (root / MEDIA_DIRS[m][0]).mkdir(exist_ok=True)
    for lo in tqdm(range(0, cfg.n_scenes, chunk), desc=f"world {cfg.name}", leave=False):
        sl = {a: v[lo : lo + chunk] for a, v in idx.items()}
        media = _render_chunk(sl, cfg, np.random.default_rng([cfg.seed, lo]))
        for m, arr in media.items():
            for j, x in enumerate(arr):
                (root / scenes[lo + j].files[m]).write_bytes(_encode(m, x, cfg))
    _write_text_data(scenes, cfg, root, np.random.default_rng([cfg.seed, 1_000_003]))
    atomic_write_text(root / "CARRIES.md", carries_markdown())
    atomic_write_text(root / "world.json", json.dumps(cfg.to_dict(), indent=1))
    atomic_write_text(root / "scenes.jsonl", "".join(s.to_json() + "\n" for s in scenes))
    log.info("world %s: %d scenes written to %s", cfg.name, len(scenes), root)
    return World(root=root, config=cfg, scenes=scenes)


def _question_kind(weights: tuple[float, ...], rng) -> str:
    """A question kind drawn with ``weights`` (equal weights draw as worlds always did)."""
    if len(set(weights)) == 1:
        return QUESTION_KINDS[int(rng.integers(0, len(QUESTION_KINDS)))]
    p = np.asarray(weights) / sum(weights)
    return QUESTION_KINDS[int(rng.choice(len(QUESTION_KINDS), p=p))]


def _write_text_data(scenes: list[Scene], cfg: WorldConfig, root: Path, rng) -> None:
    """pretrain.csv, instructions.json, instructions_video.json and alpaca.json."""
    train = [s for s in scenes if s.split == "train"]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["url", "caption"])
    for s in train:
        w.writerow([s.files[Modality.IMAGE], s.captions[int(rng.integers(0, len(s.captions)))]])
    atomic_write_text(root / "pretrain.csv", buf.getvalue())
    for modality, name, key in (
        (Modality.IMAGE, "instructions.json", "image"),
        (Modality.VIDEO, "instructions_video.json", "video"),
    ):
        items = []
        for s in train:
            for j in range(cfg.instructions_per_scene):
                kind = _question_kind(cfg.question_weights, rng)
                attr, q, a = make_question(s.attributes, kind, rng, modality)
                items.append(
                    {
                        "id": f"{s.id}-{j}",
                        key: s.files[modality],
                        "kind": kind,
                        "attribute": attr,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{q}"},
                            {"from": "gpt", "value": a},
                        ],
                    }
                )
        atomic_write_text(root / name, json.dumps(items, indent=1))
    alpaca = [_alpaca_item(rng) for _ in range(cfg.n_alpaca)]
    atomic_write_text(root / "alpaca.json", json.dumps(alpaca, indent=1))


def default_world_dir(name: str | None = None) -> Path:
    """``data/world/<name>``; name defaults to the run-time profile ("quick" or "default")."""
    from ibllm_lab.runtime import data_dir, is_quick

    return data_dir() / "world" / (name or ("quick" if is_quick() else "default"))


def ensure_world(name: str | None = None, out_dir: str | Path | None = None) -> World:
    """Load the named preset's world from ``out_dir`` (default ``default_world_dir(name)``),
    generating it first if it is missing or was generated from another config."""
    from ibllm_lab.runtime import is_quick

    name = name or ("quick" if is_quick() else "default")
    root = Path(out_dir) if out_dir is not None else default_world_dir(name)
    cfg = WorldConfig.from_name(name)
    if (root / "scenes.jsonl").exists():
        world = World.load(root)
        if world.config.to_dict() == cfg.to_dict():
            return world
        log.info("world at %s has another config; regenerating", root)
    return generate_world(cfg, root)


def cli(argv: list[str]) -> int:
    """``ibllm-lab world --preset default --out data/world/default [--seed S] [--n-scenes N]``"""
    p = argparse.ArgumentParser(prog="ibllm-lab world", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(WORLD_PRESETS))
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default data/world/<preset>)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-scenes", type=int, default=None)
    args = p.parse_args(argv)
    overrides = {
        k: v for k, v in (("seed", args.seed), ("n_scenes", args.n_scenes)) if v is not None
    }
    cfg = WorldConfig.from_name(args.preset, **overrides)
    out = args.out or default_world_dir(args.preset)
    world = generate_world(cfg, out)
    counts = {sp: len(world.split(sp)) for sp in ("train", "val", "test")}
    log.info("wrote %s: %s", out, counts)
    return 0
