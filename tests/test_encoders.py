"""BindLite: protocol, width and norm, a short training run that beats chance, the artefact,
the feature cache, precomputed features, and the alignment tables."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from ibllm_lab.alignment import measure_all, retrieval_table
from ibllm_lab.encoders import (
    BindLite,
    EncoderConfig,
    PrecomputedEncoder,
    _partial_caption,
    _stage1_texts,
    compute_features,
    load_media,
    train_encoders,
)
from ibllm_lab.modality import Encoder, Modality
from ibllm_lab.world import WorldConfig, generate_world

# One thread: these models are tiny, and two threads on a loaded 2-core machine spin-wait.
torch.set_num_threads(1)

TINY_WORLD = dict(n_scenes=240, image_size=32, video_size=24, video_frames=4, n_points=64)
TINY_ENC = dict(
    embed_dim=32,
    width=8,
    hidden=64,
    stage1_epochs=15,
    stage2_epochs=8,
    batch_size=48,
    partial_warmup_epochs=3,
    stage2_rerender_every={"Audio": 2, "Point": 2, "Depth": 2},
    point_groups=8,  # the set-abstraction point tower (the default preset's)
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = WorldConfig.from_name("quick", **TINY_WORLD, difficulty="easy")
    return generate_world(cfg, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def encoder(world):
    return train_encoders(world, EncoderConfig.from_name("quick", **TINY_ENC))


def test_protocol_width_and_unit_norm(encoder, world):
    assert isinstance(encoder, Encoder) and encoder.embed_dim == 32
    scenes = world.scenes[:5]
    batch = {
        m: encoder.preprocess(m, load_media(world, scenes, m, encoder.prep))
        for m in encoder.modalities
    }
    out = encoder(batch)
    assert set(out) == set(encoder.modalities)
    for m, z in out.items():
        assert z.shape == (5, 32), m
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    assert encoder({Modality.TEXT: ["two red circles"]})[Modality.TEXT].shape == (1, 32)


def test_training_beats_chance(encoder, world):
    """On held-out test scenes, image<->text and every other modality -> image retrieve the
    right attribute combination far above chance."""
    scenes = world.split("test")
    emb = {}
    for m in encoder.modalities:
        raw = load_media(world, scenes, m, encoder.prep)
        emb[m] = encoder.encode(m, raw)
    table = retrieval_table(emb, scenes).set_index(["query", "target"])
    n = len(scenes)
    # chance of a top-5 hit is at most 5 scenes' worth of matching combinations
    for q in ("Text", "Audio", "Point", "Depth", "Video"):
        keys = [s.key(table.loc[(q, "Image"), "attributes"].split("+")) for s in scenes]
        chance = np.mean([min(1.0, 5 * keys.count(k) / n) for k in keys])
        r5 = table.loc[(q, "Image"), "R@5"]
        assert r5 > chance + 0.25, (q, r5, chance)


def test_save_load_same_embeddings(encoder, world, tmp_path):
    path = encoder.save(tmp_path / "enc" / "bindlite.pt")
    again = BindLite.load(path)
    raw = load_media(world, world.scenes[:4], Modality.AUDIO, encoder.prep)
    torch.testing.assert_close(
        again.encode(Modality.AUDIO, raw), encoder.encode(Modality.AUDIO, raw)
    )
    assert again.prep == encoder.prep and again.vocab == encoder.vocab
    obj = torch.load(path, weights_only=True)
    del obj["state_dict"]["towers.Point.head.0.weight"]
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="towers.Point.head.0.weight"):
        BindLite.load(tmp_path / "broken.pt")
    obj = torch.load(path, weights_only=True)  # an older point tower: other input width
    obj["state_dict"]["towers.Point.local.0.weight"] = torch.zeros(32, 7)
    torch.save(obj, tmp_path / "older.pt")
    with pytest.raises(ValueError, match="another architecture.*towers.Point.local.0.weight"):
        BindLite.load(tmp_path / "older.pt")


def test_feature_cache_and_precomputed_encoder(encoder, world, tmp_path):
    encoder.save(tmp_path / "bindlite.pt")
    cache = tmp_path / "features"
    ids, feats = compute_features(encoder, world, Modality.DEPTH, cache)
    assert ids == [s.id for s in world.scenes] and feats.shape == (len(world), 32)
    stamp = os.stat(cache / "Depth.pt").st_mtime_ns
    ids2, feats2 = compute_features(encoder, world, "depth", cache)
    assert os.stat(cache / "Depth.pt").st_mtime_ns == stamp
    torch.testing.assert_close(feats2, feats)
    compute_features(encoder, world, Modality.IMAGE, cache)
    pre = PrecomputedEncoder.from_dir(cache)
    assert isinstance(pre, Encoder) and pre.embed_dim == 32
    assert set(pre.modalities) == {Modality.DEPTH, Modality.IMAGE}
    torch.testing.assert_close(pre.lookup("Depth", ids[3:5]), feats[3:5])
    out = pre({Modality.IMAGE: torch.tensor([0, 2])})[Modality.IMAGE]
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    with pytest.raises(KeyError, match="no features"):
        pre.lookup("Depth", ["nope"])
    # another encoder invalidates the cache
    other = BindLite(encoder.cfg, encoder.vocab, encoder.prep)
    compute_features(other, world, Modality.DEPTH, cache)
    assert os.stat(cache / "Depth.pt").st_mtime_ns != stamp


def test_measure_all_tables(encoder, world, tmp_path):
    tables = measure_all(encoder, world, out_dir=tmp_path)
    for name in ("retrieval", "zero_shot", "modality_gap"):
        assert (tmp_path / f"{name}.csv").exists()
    z = tables["zero_shot"].set_index(["modality", "attribute"])
    assert not z.loc[("Audio", "position"), "carried"] and z.loc[("Video", "motion"), "carried"]
    assert z.loc[("Video", "motion"), "bindable"]  # through the images' motion trails
    assert not z.loc[("Point", "motion"), "carried"] and not z.loc[("Depth", "color"), "bindable"]
    assert z.loc[("Image", "color"), "accuracy"] > 2 * z.loc[("Image", "color"), "chance"]
    assert set(tables["modality_gap"].modality) == {"Text", "Audio", "Video", "Point", "Depth"}


def test_config_validation():
    with pytest.raises(ValueError, match="stage 2"):
        EncoderConfig(stage2=("Text",))
    with pytest.raises(ValueError, match="batch_size"):
        EncoderConfig(batch_size=1)
    with pytest.raises(ValueError, match="hard_negative_attributes"):
        EncoderConfig(hard_negative_attributes=("motion",))
    with pytest.raises(ValueError, match="rerender_every"):
        EncoderConfig(rerender_every=-1)


def test_partial_caption_matches():
    """A text naming one attribute matches every image with that value, and only those; a
    full caption matches only images with every attribute equal, motion included."""
    base = dict(count="one", size="small", color="red", shape="circle", position="top left")
    attrs = [
        dict(base, motion="static"),
        dict(base, count="two", size="large", shape="square", motion="left"),
        dict(base, size="large", color="blue", position="top right", motion="left"),
        dict(base, motion="up"),  # differs from the first in motion only
    ]
    caps = [[f"caption {i}"] for i in range(len(attrs))]
    cfg = EncoderConfig(partial_caption_prob=1.0)
    gen = torch.Generator().manual_seed(0)
    named_any = set()
    for _ in range(40):
        texts, same = _stage1_texts(caps, attrs, torch.arange(len(attrs)), cfg, gen)
        assert same.diagonal().all()
        for j, text in enumerate(texts):
            (named,) = [a for a in attrs[j] if _partial_caption(attrs[j], [a]) == text]
            named_any.add(named)
            for i in range(len(attrs)):
                assert bool(same[i, j]) == (attrs[i][named] == attrs[j][named]), (text, i, j)
    assert "motion" in named_any
    texts, same = _stage1_texts(caps, attrs, torch.arange(len(attrs)), cfg, gen, prob=0.0)
    assert torch.equal(same, torch.eye(len(attrs), dtype=torch.bool))
    assert EncoderConfig(partial_caption_weights=(1, 1, 1, 1, 1)).partial_caption_weights[-1] == 0


def test_video_tower_starts_as_the_mean_frame_of_the_image_tower(encoder, world):
    """Stage 2 starts the video frame CNN from the image tower (frozen) and the temporal head
    at zero: an untrained head gives the normalised mean of the frames' image embeddings."""
    from ibllm_lab.encoders import VideoTower

    video = encoder.towers["Video"]
    image = encoder.towers["Image"]
    for (k, a), b in zip(
        video.frames.state_dict().items(), image.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    clips = encoder.preprocess(
        Modality.VIDEO, load_media(world, world.scenes[:6], "Video", encoder.prep)
    )
    size = encoder.prep.image.size  # frames are resized to the image tower's input size
    fresh = VideoTower(size, 8, 64, encoder.embed_dim)
    fresh.frames.load_state_dict(image.state_dict())

    def resized(x):
        return torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True
        )

    frames = torch.stack(
        [
            torch.nn.functional.normalize(image(resized(clips[:, t])), dim=-1)
            for t in range(clips.shape[1])
        ],
        1,
    )
    with torch.no_grad():
        assert torch.allclose(fresh(clips), frames.mean(1), atol=1e-6)


def test_stage2_rerender_and_realign(encoder, world):
    """``realign`` keeps the image and text towers (identical embeddings) and re-aligns only
    the named modalities, here with fresh renders every epoch; fewer epochs align worse."""
    from ibllm_lab.encoders import realign

    hist: dict = {}
    weak = realign(encoder, world, ["Audio"], stage2_epochs=1, history=hist)
    strong = realign(encoder, world, ["Audio"], stage2_epochs=8, stage2_rerender_every={"Audio": 1})
    assert len(hist["Audio"]) > 0 and "Point" not in hist
    scenes = world.split("test")
    for m in ("Image", "Text", "Point"):
        raw = load_media(world, scenes, m, encoder.prep)
        assert torch.equal(weak.encode(m, raw), encoder.encode(m, raw)), m
    raw = load_media(world, scenes, "Audio", encoder.prep)
    assert not torch.equal(weak.encode("Audio", raw), encoder.encode("Audio", raw))
    emb = {
        Modality.IMAGE: encoder.encode("Image", load_media(world, scenes, "Image", encoder.prep))
    }
    r5 = {}
    for name, enc in (("weak", weak), ("strong", strong)):
        emb[Modality.AUDIO] = enc.encode("Audio", raw)
        t = retrieval_table(emb, scenes).set_index(["query", "target"])
        r5[name] = t.loc[("Audio", "Image"), "R@5"]
    assert r5["strong"] > r5["weak"], r5
    with pytest.raises(ValueError, match="stage2_rerender_every"):
        EncoderConfig(stage2_rerender_every={"Image": 1})


def test_stage2_epochs_by_modality(encoder, world):
    """``stage2_epochs_by_modality`` sets one modality's stage-2 epochs; the others keep
    ``stage2_epochs``; a plain ``stage2_epochs`` override in ``realign`` applies to all."""
    from ibllm_lab.encoders import _batches, realign

    per_epoch = len(_batches(len(world.split("train")), encoder.cfg.batch_size, torch.Generator()))
    hist: dict = {}
    two = realign(
        encoder,
        world,
        ["Audio", "Depth"],
        stage2_epochs=3,
        stage2_epochs_by_modality={"audio": 2},
        history=hist,
    )
    assert two.cfg.stage2_epochs_by_modality == {"Audio": 2}
    assert (len(hist["Audio"]), len(hist["Depth"])) == (2 * per_epoch, 3 * per_epoch)
    hist = {}
    realign(two, world, ["Audio"], stage2_epochs=1, history=hist)
    assert len(hist["Audio"]) == per_epoch
    with pytest.raises(ValueError, match="stage2_epochs_by_modality"):
        EncoderConfig(stage2_epochs_by_modality={"Text": 1})
    with pytest.raises(ValueError, match="stage2_epochs_by_modality"):
        EncoderConfig(stage2_epochs_by_modality={"Point": -1})


def test_locked_image_text_tuning_moves_only_the_text_tower(encoder, world):
    """``text_epochs``: after stage 1 the text tower alone trains against the frozen image
    embeddings; every other tower (stage 2 included: its own generator) is identical to a
    run without it, and the text loss falls."""
    from ibllm_lab.encoders import _batches

    hist: dict = {}
    tuned = train_encoders(
        world, EncoderConfig.from_name("quick", **TINY_ENC, text_epochs=3), history=hist
    )
    per_epoch = len(_batches(len(world.split("train")), encoder.cfg.batch_size, torch.Generator()))
    assert len(hist["text"]) == 3 * per_epoch and hist["text_s"] > 0
    first, last = hist["text"][:per_epoch], hist["text"][-per_epoch:]
    assert sum(last) < sum(first), (first, last)
    scenes = world.split("test")
    for m in ("Image", "Video", "Audio", "Point", "Depth"):
        raw = load_media(world, scenes, m, encoder.prep)
        assert torch.equal(tuned.encode(m, raw), encoder.encode(m, raw)), m
    captions = [s.captions[0] for s in scenes]
    assert not torch.allclose(tuned.encode("Text", captions), encoder.encode("Text", captions))
    with pytest.raises(ValueError, match="text_epochs >= 0 and text_lr > 0"):
        EncoderConfig(text_lr=0.0)


def test_point_tower_neighbour_offsets():
    """With ``point_neighbours`` k > 0 each point also sees the offsets to its k nearest
    other points, nearest first; the output width is the embedding width either way."""
    from ibllm_lab.encoders import PointTower

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 20, 6, generator=g)
    tower = PointTower(4, 16, 8, k=3)
    off = tower.neighbour_offsets(x[..., :3]).view(2, 20, 3, 3)
    d = torch.cdist(x[..., :3], x[..., :3]) + torch.eye(20) * 10
    nearest = d.sort(dim=-1).values[..., :3]
    torch.testing.assert_close(off.norm(dim=-1), nearest)
    assert tower(x).shape == (2, 8) and PointTower(4, 16, 8, k=0)(x).shape == (2, 8)


def test_point_group_tower_groups_stay_inside_the_radius():
    """Set abstraction: a group is its centroid's nearest points within the radius (members
    outside are replaced by the centroid), so points outside every ball change no group; the
    tower ignores the order of the non-centroid points and has the configured width."""
    from ibllm_lab.encoders import PointGroupTower

    torch.manual_seed(0)
    # group_size = every point: only the radius keeps a group local
    tower = PointGroupTower(4, 16, 8, groups=4, group_size=40, radius=0.4).eval()
    x = torch.rand(2, 40, 6)
    x[:, :, :3] *= 0.2  # one cluster, inside the ball of every centroid (0, 10, 20, 30)
    assert tower(x).shape == (2, 8)
    near, far = x.clone(), x.clone()
    # two non-centroid points pushed out in opposite directions (the cloud's mean stays)
    near[:, 1, :3] += 0.8
    near[:, 11, :3] -= 0.8
    far[:, 1, :3] += 5.0
    far[:, 11, :3] -= 5.0
    with torch.no_grad():
        torch.testing.assert_close(tower(far), tower(near))
        assert not torch.allclose(tower(near), tower(x))
        keep = [0, 10, 20, 30]
        rest = torch.tensor([i for i in range(40) if i not in keep])
        shuffled = x.clone()
        shuffled[:, rest] = x[:, rest[torch.randperm(len(rest))]]
        torch.testing.assert_close(tower(shuffled), tower(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="point_groups"):
        EncoderConfig(point_groups=-1)


def test_audio_tower_timbre_branch_is_shared_across_pitches():
    """``timbre_blur`` k: the timbre branch's output does not change when the partials move
    along the mel axis (a new pitch), and the 1-D CNN sees the map averaged over k bins."""
    from ibllm_lab.encoders import AudioTower

    torch.manual_seed(0)
    tower = AudioTower(32, 15, 4, 16, 8, timbre_blur=5).eval()
    x = torch.zeros(2, 1, 32, 15)
    x[:, 0, [8, 12, 14], 3:9] = torch.tensor([1.0, 0.5, 0.3])[:, None]  # partials, one pitch
    shifted = torch.roll(x, 6, dims=2)  # the same timbre six mel bins higher
    with torch.no_grad():

        def timbre(z):
            return tower.timbre_head(tower.timbre(z.amax(dim=-1)).amax(dim=-1))

        torch.testing.assert_close(timbre(shifted), timbre(x))
        assert tower(x).shape == (2, 8)
        assert not torch.allclose(tower(shifted), tower(x))  # the pitch still shows
        seen = []
        hook = tower.conv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        tower(x)
        hook.remove()
        blurred = torch.nn.functional.avg_pool2d(x, (5, 1), stride=1, padding=(2, 0))[:, 0]
        torch.testing.assert_close(seen[0], blurred)
        one = AudioTower(32, 15, 4, 16, 8).eval()
        assert not hasattr(one, "timbre") and one(x).shape == (2, 8)
    with pytest.raises(ValueError, match="timbre_blur"):
        AudioTower(32, 15, 4, 16, 8, timbre_blur=-1)
    with pytest.raises(ValueError, match="audio_timbre_blur"):
        EncoderConfig(audio_timbre_blur=-2)


def test_conv_tower_additive_colour():
    """``colour="additive"``: the CNN sees each pixel's brightest channel only, so recolouring
    an object at equal brightness changes the output by exactly the colour stream's change;
    the colour stream pools over the picture, so moving the object by whole pooling blocks
    leaves it unchanged. ``"joint"`` (one CNN over rgb) mixes colour into the geometry."""
    from ibllm_lab.encoders import ConvTower

    torch.manual_seed(0)
    size = 16

    def picture(rgb, x0, y0):
        img = torch.full((3, size, size), 0.2)
        img[:, y0 : y0 + 4, x0 : x0 + 6] = torch.tensor(rgb).view(3, 1, 1)
        return img

    red, green = (0.9, 0.1, 0.1), (0.1, 0.9, 0.2)  # same brightest channel
    a = torch.stack([picture(red, 0, 0), picture(red, 8, 4)])
    b = torch.stack([picture(green, 0, 0), picture(green, 8, 4)])
    additive = ConvTower(3, size, 4, 32, 8, colour="additive", colour_pool=4)
    joint = ConvTower(3, size, 4, 32, 8)
    with torch.no_grad():
        shift = additive(b) - additive(a)
        torch.testing.assert_close(
            shift, additive.colour_stream(b) - additive.colour_stream(a), atol=1e-5, rtol=1e-5
        )
        assert shift.abs().max() > 1e-3  # colour does reach the embedding
        col = additive.colour_stream(a)
        torch.testing.assert_close(col[0], col[1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(additive(a)[0], additive(a)[1])  # position still does
        shift = joint(b) - joint(a)
        assert not torch.allclose(shift[0], shift[1], atol=1e-4)
    with pytest.raises(ValueError, match="image_colour"):
        EncoderConfig(image_colour="split")
    with pytest.raises(ValueError, match="3 input channels"):
        ConvTower(1, size, 4, 32, 8, colour="additive")


def test_point_group_tower_additive_colour():
    """``colour="additive"``: changing the clouds' colours moves every embedding (before
    normalisation) by the same vector, whatever the geometry, and geometry alone decides the
    rest; ``"local"`` mixes the two."""
    from ibllm_lab.encoders import PointGroupTower

    torch.manual_seed(0)
    geometry = torch.rand(3, 40, 3)  # three different solids
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.9])

    def clouds(rgb):
        return torch.cat([geometry, rgb.expand(3, 40, 3)], dim=-1)

    additive = PointGroupTower(4, 16, 8, groups=4, group_size=8, radius=0.4, colour="additive")
    local = PointGroupTower(4, 16, 8, groups=4, group_size=8, radius=0.4, colour="local")
    with torch.no_grad():
        shift = additive(clouds(blue)) - additive(clouds(red))  # (3, D)
        torch.testing.assert_close(shift, shift[:1].expand_as(shift), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(additive(clouds(red))[0], additive(clouds(red))[1])
        shift = local(clouds(blue)) - local(clouds(red))
        assert not torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-4)
    with pytest.raises(ValueError, match="point_colour"):
        EncoderConfig(point_colour="head")
    with pytest.raises(ValueError, match="colour"):
        PointGroupTower(4, 16, 8, groups=4, group_size=8, radius=0.4, colour="global")


def test_point_group_tower_distance_histogram():
    """The D2 branch: the share of point pairs per distance bin (self-pairs in bin 0, far
    pairs in the last), over an evenly strided subset of ``d2_points`` points."""
    from ibllm_lab.encoders import POINT_D2_RANGE, PointGroupTower

    tower = PointGroupTower(4, 16, 8, 4, 8, 0.4, d2_bins=6, d2_points=3)
    width = POINT_D2_RANGE / 6
    # three points: distances 0 (x3, self), 1.5 width (x2), 3.5 width (x2), 5 width (x2)
    xyz = torch.tensor([[[0.0, 0, 0], [1.5 * width, 0, 0], [5 * width, 0, 0]]])
    hist = tower.distance_histogram(xyz) / 6 * 9  # back to pair counts
    torch.testing.assert_close(hist, torch.tensor([[3.0, 2, 0, 2, 0, 2]]))
    # pairs beyond the range fall in the last bin
    far = tower.distance_histogram(xyz * 10) / 6 * 9
    torch.testing.assert_close(far, torch.tensor([[3.0, 0, 0, 0, 0, 6]]))
    # a longer cloud uses points 0, P/3, 2P/3: the rest does not change the histogram
    long = torch.zeros(1, 9, 3)
    long[0, ::3] = xyz[0]
    long[0, 1::3] = torch.rand(3, 3) * 5
    torch.testing.assert_close(tower.distance_histogram(long), tower.distance_histogram(xyz))
    with_d2 = PointGroupTower(4, 16, 8, 4, 8, 0.4, colour="additive", d2_bins=12)
    clouds = torch.rand(2, 40, 6)
    assert with_d2(clouds).shape == (2, 8) and with_d2.d2[0].in_features == 12
    with pytest.raises(ValueError, match="point_d2_bins >= 0 and point_d2_points >= 2"):
        EncoderConfig(point_d2_bins=-1)


def test_encoders_cli_rejects_bad_overrides(tmp_path, capsys):
    """``ibllm-lab encoders --overrides`` takes EncoderConfig fields only, and says which
    field it does not know before any training starts."""
    from ibllm_lab.encoders import cli

    with pytest.raises(SystemExit):
        cli(["--world", str(tmp_path), "--overrides", '{"image_color": "additive"}'])
    assert "unknown EncoderConfig fields ['image_color']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--world", str(tmp_path), "--overrides", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--world", str(tmp_path), "--overrides", "{image_colour: additive}"])
    assert "is not valid JSON" in capsys.readouterr().err


def test_audio_front_end_follows_the_config_and_round_trips(world, tmp_path):
    """``audio_scale`` / ``audio_f_min`` set the encoder's audio preprocessing, which the
    artefact saves: a loaded encoder embeds sounds exactly as the trained one."""
    cfg = EncoderConfig.from_name(
        "quick",
        **{**TINY_ENC, "stage1_epochs": 1, "stage2_epochs": 1},
        audio_scale="log",
        audio_f_min=120.0,
        audio_timbre_blur=5,
    )
    enc = train_encoders(world, dataclasses.replace(cfg, stage2=("Audio",)))
    assert (enc.prep.audio.scale, enc.prep.audio.f_min) == ("log", 120.0)
    enc.save(tmp_path / "e.pt")
    back = BindLite.load(tmp_path / "e.pt")
    assert (back.prep.audio.scale, back.prep.audio.f_min) == ("log", 120.0)
    raw = load_media(world, world.split("test")[:8], "Audio", enc.prep)
    assert torch.equal(back.encode("Audio", raw), enc.encode("Audio", raw))
    with pytest.raises(ValueError, match="audio_scale"):
        EncoderConfig(audio_scale="bark")


def test_point_geometry_computed_once_equals_per_batch(encoder, world):
    """Stage 2 computes the point tower's grouping and D2 histogram once per set of clouds
    (``PointGroupTower.geometry``) and indexes rows of it per step: a batch's embeddings are
    exactly those the tower computes from the clouds alone, with gradients to the tower."""
    from ibllm_lab.encoders import PointGroupTower, _stage2_inputs

    torch.manual_seed(0)
    tower = PointGroupTower(4, 16, 8, groups=4, group_size=8, radius=0.4, d2_bins=6)
    x = torch.rand(10, 32, 6)
    geo = tower.geometry(x)
    assert set(geo) == {"idx", "inside", "d2"}
    sub = torch.tensor([7, 2, 5])
    part = tower.geometry(x[sub])
    assert all(torch.equal(geo[k][sub], part[k]) for k in geo)  # a row depends on its cloud
    torch.testing.assert_close(
        tower(x[sub], {k: v[sub] for k, v in geo.items()}), tower(x[sub]), rtol=0, atol=0
    )
    raw = load_media(world, world.split("train"), "Point", encoder.prep)
    inputs = _stage2_inputs(encoder, Modality.POINT, raw)
    idx = torch.tensor([3, 0, 11, 4])
    want = encoder.embed(Modality.POINT, encoder.preprocess("Point", [raw[i] for i in idx]))
    torch.testing.assert_close(inputs(idx), want, rtol=0, atol=0)
    tower.requires_grad_(True)
    tower(x[sub], {k: v[sub] for k, v in geo.items()}).sum().backward()
    assert tower.local[0].weight.grad is not None
