"""The generated world: deterministic files, splits, formats and attributes that render."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ibllm_lab import media
from ibllm_lab.modality import Modality
from ibllm_lab.world import (
    ATTRIBUTES,
    CARRIES,
    QUESTION_KINDS,
    Difficulty,
    World,
    WorldConfig,
    answer_normalise,
    carries,
    describe,
    generate_world,
    make_question,
    render_media,
    yesno_question,
)

TINY = dict(n_scenes=60, image_size=32, video_size=24, video_frames=4, n_points=64, n_alpaca=20)


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return generate_world(WorldConfig.from_name("quick", **TINY), tmp_path_factory.mktemp("w"))


def test_same_seed_identical_files_other_seed_differs(world, tmp_path):
    again = generate_world(WorldConfig.from_name("quick", **TINY), tmp_path / "a")
    assert _tree_hash(again.root) == _tree_hash(world.root)
    other = generate_world(WorldConfig.from_name("quick", **TINY, seed=1), tmp_path / "b")
    assert _tree_hash(other.root) != _tree_hash(world.root)


def test_load_round_trips_scenes_and_config(world):
    loaded = World.load(world.root)
    assert loaded.scenes == world.scenes
    assert loaded.config.to_dict() == world.config.to_dict()
    assert loaded.fingerprint() == world.fingerprint()


def test_attribute_vocabulary():
    assert len(ATTRIBUTES["shape"]) >= 6 and len(ATTRIBUTES["color"]) >= 6
    assert ATTRIBUTES["size"] == ["small", "large"] and len(ATTRIBUTES["position"]) >= 4
    assert ATTRIBUTES["count"] == ["one", "two", "three"]
    assert "static" in ATTRIBUTES["motion"] and len(ATTRIBUTES["motion"]) >= 5


def test_carrying_matrix():
    assert "position" not in carries("audio") and "motion" not in carries(Modality.AUDIO)
    assert "color" not in carries("Depth") and "motion" in carries("Video")
    # motion reaches text only through images (their motion trails): bindable for video
    assert "motion" in carries("Image") and "motion" in carries("Text")
    assert {m for m in CARRIES if "motion" not in CARRIES[m]} == {
        Modality.AUDIO,
        Modality.POINT,
        Modality.DEPTH,
    }


@pytest.mark.parametrize("motion, behind", [("left", (1, 0)), ("down", (0, -1))])
def test_a_moving_group_leaves_a_trail_behind_it_in_the_image(motion, behind):
    """The same draws with another motion change only pixels on the side the objects come
    from; with ``motion_trail`` 0 the image is a true still that shows no motion."""
    cfg = WorldConfig.from_name("quick", **TINY)
    attrs = [dict(shape="square", color="red", size="large", position=p, count="one")
             for p in ATTRIBUTES["position"]]  # fmt: skip

    def render(m, trail):
        cfg.difficulty.motion_trail = trail
        return render_media(
            [{**a, "motion": m} for a in attrs], "Image", cfg, np.random.default_rng(3)
        ).astype(int)

    still, moving = render("static", 0.6), render(motion, 0.6)
    for img_still, img_moving in zip(still, moving, strict=True):
        sat = img_still.max(-1) - img_still.min(-1)
        oy, ox = np.nonzero(sat > 120)  # the red square
        dy, dx = np.nonzero((img_still != img_moving).any(-1))  # the trail
        assert len(dx) > 10, "no trail"
        # pixel coordinates: x to the right, y down
        assert np.sign(round(dx.mean() - ox.mean())) == behind[0]
        assert np.sign(round(dy.mean() - oy.mean())) == behind[1]
    assert (render("static", 0.0) == render(motion, 0.0)).all()


def test_heldout_combinations_only_in_test(world):
    held = set(world.config.heldout)
    for s in world.scenes:
        combo = (s.attributes["shape"], s.attributes["color"])
        assert s.heldout == (combo in held)
        if s.heldout:
            assert s.split == "test"
    assert any(s.heldout for s in world.scenes)
    assert {s.split for s in world.scenes} == {"train", "val", "test"}


def test_every_file_reads_with_the_expected_shape(world):
    c = world.config
    s = world.scenes[0]
    assert media.read_image(world.path(s, "Image")).shape == (c.image_size, c.image_size, 3)
    assert media.read_audio(world.path(s, "Audio"), c.sample_rate).shape == (c.sample_rate,)
    clip = media.read_video(world.path(s, "Video"))
    assert clip.shape == (c.video_frames, c.video_size, c.video_size, 3)
    assert media.read_points(world.path(s, "Point")).shape == (c.n_points, 6)
    assert media.read_depth(world.path(s, "Depth")).shape == (c.image_size, c.image_size)


def test_image_colour_shows_the_colour_attribute(world):
    """The most saturated pixels of an easy image have the scene's colour."""
    cfg = WorldConfig.from_name("quick", **{**TINY, "n_scenes": 30}, difficulty="easy")
    w = generate_world(cfg, world.root.parent / "easy")
    refs = {"red": 0, "green": 1, "blue": 2}
    for s in w.scenes:
        if s.attributes["color"] in refs:
            img = media.read_image(w.path(s, "Image")).astype(int).reshape(-1, 3)
            sat = img.max(1) - img.min(1)
            top = img[sat >= np.percentile(sat, 99)].mean(0)
            assert int(np.argmax(top)) == refs[s.attributes["color"]], s


def test_audio_count_and_loudness(world):
    """Louder for large objects; as many note onsets as the count (easy world)."""
    cfg = WorldConfig.from_name("quick", **{**TINY, "n_scenes": 40}, difficulty="easy")
    w = generate_world(cfg, world.root.parent / "easy_audio")
    rms = {"small": [], "large": []}
    for s in w.scenes:
        x = media.read_audio(w.path(s, "Audio"), 16000)
        rms[s.attributes["size"]].append(np.sqrt((x**2).mean()))
        if s.attributes["shape"] == "ring":  # the ring's timbre is a 12 Hz tremolo
            continue
        frames = np.sqrt((x[: len(x) // 160 * 160].reshape(-1, 160) ** 2).mean(1))
        loud = frames > 0.3 * frames.max()
        onsets = int((loud[1:] & ~loud[:-1]).sum() + loud[0])
        assert onsets == ATTRIBUTES["count"].index(s.attributes["count"]) + 1, s
    assert np.mean(rms["large"]) > 2 * np.mean(rms["small"])


def test_video_moves_in_the_motion_direction(world):
    for s in world.scenes[:20]:
        clip = media.read_video(world.path(s, "Video")).astype(float)
        sat = clip.max(-1) - clip.min(-1)  # (T, H, W): coloured objects
        first, last = sat[0] > 100, sat[-1] > 100
        if not first.any() or not last.any():
            continue
        ys, xs = np.nonzero(first)
        y2, x2 = np.nonzero(last)
        dx, dy = x2.mean() - xs.mean(), y2.mean() - ys.mean()
        want = {"static": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
        ex, ey = want[s.attributes["motion"]]
        assert np.sign(round(dx / 3)) == ex and np.sign(round(dy / 3)) == ey, (s, dx, dy)


def test_text_formats(world):
    root = world.root
    with open(root / "pretrain.csv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["url", "caption"] and len(rows) == 1 + len(world.split("train"))
    assert all((root / url).exists() for url, _ in rows[1:])
    llava = json.loads((root / "instructions.json").read_text())
    assert {x["kind"] for x in llava} == set(QUESTION_KINDS)
    for x in llava:
        assert (root / x["image"]).exists()
        human, gpt = x["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
    video = json.loads((root / "instructions_video.json").read_text())
    assert all((root / x["video"]).exists() for x in video)
    alpaca = json.loads((root / "alpaca.json").read_text())
    assert len(alpaca) == 20 and all(set(x) == {"instruction", "input", "output"} for x in alpaca)
    assert (root / "CARRIES.md").read_text().count("|") > 20


def test_questions_answer_the_scene():
    rng = np.random.default_rng(0)
    attrs = dict(shape="ring", color="red", size="small", position="top left", count="two")
    attrs["motion"] = "up"
    asked = set()
    for _ in range(50):
        attr, q, a = make_question(attrs, "attribute", rng, Modality.VIDEO)
        assert a == attrs[attr]
        attr, q, a = make_question(attrs, "yesno", rng)
        assert a == ("yes" if f" {attrs[attr]}" in q else "no")
        attr, q, a = make_question(attrs, "choice", rng)
        letter = next(ln[0] for ln in q.splitlines() if ln.endswith(attrs[attr]))
        assert a == letter
        asked.add(make_question(attrs, "attribute", rng, Modality.DEPTH)[0])
    assert "motion" not in asked and "color" not in asked  # depth carries neither
    assert describe(attrs) == "There are two small red rings in the top left, moving up."
    assert describe(attrs, "Point") == "There are two small red rings in the top left."
    assert yesno_question("shape", "cross") == "Are the objects in the image crosses?"
    assert yesno_question("count", "one") == "Is there one object?"
    assert yesno_question("count", "three", "video") == "Are there three objects?"
    assert answer_normalise(" The Top-Left. ") == "top left" and answer_normalise("Big") == "large"


def test_question_weights_set_the_mix_of_kinds_and_leave_the_media(world, tmp_path):
    cfg = WorldConfig.from_name("quick", **TINY, question_weights=(1, 0, 0, 1))
    other = generate_world(cfg, tmp_path / "w")
    for name in ("instructions.json", "instructions_video.json"):
        items = json.loads((other.root / name).read_text())
        assert {x["kind"] for x in items} == {"attribute", "describe"}
    for sub in ("images", "video", "audio", "points", "depth"):
        assert any((world.root / sub).iterdir())
        assert _tree_hash(other.root / sub) == _tree_hash(world.root / sub)
    assert (other.root / "pretrain.csv").read_bytes() == (world.root / "pretrain.csv").read_bytes()
    assert World.load(other.root).config.question_weights == (1.0, 0.0, 0.0, 1.0)
    assert other.fingerprint() != world.fingerprint()
    for bad in ((1, 1, 1), (0, 0, 0, 0), (1, -1, 1, 1)):
        with pytest.raises(ValueError, match="question_weights: 4 non-negative weights"):
            WorldConfig(question_weights=bad)


def test_config_validation():
    with pytest.raises(ValueError, match="held-out"):
        WorldConfig(heldout=(("hexagon", "red"),))
    with pytest.raises(ValueError, match="anchor"):
        Difficulty(strength={"Image": {"color": 0.5}})
    with pytest.raises(ValueError, match="unknown difficulty"):
        WorldConfig(difficulty="impossible")
    assert Difficulty.from_name("hard").strength["Audio"]["size"] < 1.0


def test_render_media_fresh_image_views_of_the_same_scenes(world):
    """Re-renders (training's fresh views) have the world's image format, follow the seed,
    change the nuisances and keep the attributes: the scene's colour dominates."""
    easy = WorldConfig.from_name("quick", **TINY, difficulty="easy")
    attrs = [dict(s.attributes, color="red") for s in world.scenes[:8]]
    a = render_media(attrs, Modality.IMAGE, easy, np.random.default_rng(1))
    b = render_media(attrs, Modality.IMAGE, easy, np.random.default_rng(1))
    c = render_media(attrs, Modality.IMAGE, easy, np.random.default_rng(2))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    flat = a.astype(int).reshape(8, -1, 3)
    sat = flat.max(-1) - flat.min(-1)
    for img, s in zip(flat, sat, strict=True):
        assert int(np.argmax(img[s >= np.percentile(s, 97)].mean(0))) == 0


def test_render_media_fresh_samples_in_file_layout(world):
    """``render_media`` renders any media modality in the layout of the world's files, fresh
    per seed and reproducible for the same seed."""
    from ibllm_lab.world import MEDIA_MODALITIES

    w = world
    attrs = [s.attributes for s in w.scenes[:5]]
    for m in MEDIA_MODALITIES:
        a = render_media(attrs, m, w.config, np.random.default_rng(3))
        b = render_media(attrs, m, w.config, np.random.default_rng(3))
        c = render_media(attrs, m, w.config, np.random.default_rng(4))
        assert len(a) == 5 and np.array_equal(a, b) and not np.array_equal(a, c), m
        if m not in (Modality.IMAGE, Modality.AUDIO):  # .npy files: same shape and dtype
            on_disk = np.load(w.path(w.scenes[0], m))
            assert a[0].shape == on_disk.shape and a.dtype == on_disk.dtype, m
    with pytest.raises(ValueError, match="not rendered"):
        render_media(attrs, Modality.TEXT, w.config, np.random.default_rng(0))
