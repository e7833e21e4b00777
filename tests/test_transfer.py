"""The transfer experiment (ibllm_lab.transfer): scoring, probes, the step-0 check and one
end-to-end run on a small world with precomputed features."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ibllm_lab.modality import Modality
from ibllm_lab.transfer import (
    RESULTS,
    TransferConfig,
    build_probes,
    describe_correct,
    run_transfer,
    summary,
)

TRUTH = {
    "shape": "circle",
    "color": "red",
    "size": "small",
    "position": "top left",
    "count": "two",
    "motion": "left",
}


def test_describe_scoring_names_each_attribute():
    got = describe_correct("There are two small red circles in the top left.", TRUTH)
    assert got == {
        "shape": True,
        "color": True,
        "size": True,
        "position": True,
        "count": True,
        "motion": False,
    }
    got = describe_correct("One large red or blue square, moving left.", TRUTH)
    assert got == {
        "shape": False,
        "color": False,
        "size": False,
        "position": False,
        "count": False,
        "motion": True,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ibllm_lab.world import WorldConfig, generate_world

    cfg = WorldConfig.from_name("quick", n_scenes=40, n_alpaca=40)
    return generate_world(cfg, tmp_path_factory.mktemp("world"))


def test_probes_cover_every_attribute_in_training_wording(world):
    scenes = world.split("test")
    probes = build_probes(scenes, seed=0)
    assert len(probes) == len(scenes) * (6 + 6 + 2)
    assert probes == build_probes(scenes, seed=0)
    first = [p for p in probes if p.scene == 0]
    assert [p.attribute for p in first if p.kind == "attribute"] == [
        "shape",
        "color",
        "size",
        "position",
        "count",
        "motion",
    ]
    assert all(p.prompt.endswith("### Response:") for p in probes)
    assert {p.answer for p in probes if p.kind == "yesno"} <= {"yes", "no"}
    assert first[0].answer == scenes[0].attributes["shape"]


def _features(world) -> dict:
    """Precomputed 'encoder' output: a noisy one-hot code of the attributes a modality
    carries (what a perfectly aligned encoder would give)."""
    from ibllm_lab.world import ATTRIBUTES, carries

    g = torch.Generator().manual_seed(0)
    ids = [s.id for s in world.scenes]
    out = {}
    for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO, Modality.POINT, Modality.DEPTH):
        rows = []
        for s in world.scenes:
            code = [
                torch.nn.functional.one_hot(
                    torch.tensor(vals.index(s.attributes[a])), len(vals)
                ).float()
                * (a in carries(m))
                for a, vals in ATTRIBUTES.items()
                if a != "motion"
            ]
            rows.append(torch.cat(code + [0.1 * torch.randn(11, generator=g)]))
        out[m] = (ids, torch.stack(rows))
    return out


def test_run_transfer_end_to_end_writes_the_table(world, tmp_path):
    from ibllm_lab.encoders import PrecomputedEncoder

    encoder = PrecomputedEncoder(_features(world))
    cfg = TransferConfig(
        n_scenes=4,
        mix_weights=(0.5,),
        max_gen_len={"attribute": 3, "yesno": 2, "describe": 8, "caption": 8},
    )
    df = run_transfer(
        world,
        encoder,
        tmp_path,
        preset="quick",
        cfg=cfg,
        progress=False,
        train_overrides={"batch_size": 8},
    )
    saved = pd.read_csv(tmp_path / RESULTS)
    assert len(saved) == len(df)
    check = df[df.kind == "check"].set_index("metric")["value"]
    assert check["logits_equal_base"] == 1.0 and check["max_abs_diff"] == 0.0
    conditions = set(df.condition)
    for m in ("Image", "Video", "Audio", "Point", "Depth"):
        assert {m, m + " + cache", m + " + gated cache"} <= conditions
    assert {"text-only", "Image+Audio w=0.5", "Audio (noise 1) + cache"} <= conditions
    gated = df[df.condition.str.endswith("gated cache")]
    assert gated.cache.all() and gated.cache_gate.all()
    assert not df[df.condition.str.endswith(" + cache")].cache_gate.any()
    attr_rows = df[df.kind == "attribute"]
    audio = attr_rows[(attr_rows.condition == "Audio") & (attr_rows.metric == "accuracy")]
    audio = audio.set_index("attribute")
    # the split by shape-colour combination partitions the scenes of the "accuracy" row
    image = attr_rows[(attr_rows.condition == "Image") & (attr_rows.attribute == "color")]
    n = image.set_index("metric")["n"]
    split = [m for m in n.index if m.startswith("accuracy ") and m.endswith("combinations")]
    assert split and n[split].sum() == n["accuracy"]
    assert audio.loc["color", "carried"] and not audio.loc["position", "carried"]
    assert audio.loc["shape", "chance"] == pytest.approx(1 / 6)
    assert set(df[df.kind == "caption"].metric) == {"CIDEr", "BLEU-4"}
    assert ((df.value >= 0) & (df.value <= 100)).all()
    table = summary(df)
    assert {"attr_carried", "attr_uncarried", "yesno", "describe", "CIDEr"} <= set(table.columns)
    assert {"attr_carried_seen", "attr_carried_novel", "attr_bindable"} <= set(table.columns)
    # images carry every attribute video carries (motion through the motion trails)
    video = attr_rows[(attr_rows.condition == "Video") & (attr_rows.metric == "accuracy")]
    video = video[video.carried == True].set_index("attribute").value  # noqa: E712
    assert "motion" in video.index
    assert table.loc["Video", "attr_bindable"] == pytest.approx(video.mean())
    depth = attr_rows[(attr_rows.condition == "Depth") & (attr_rows.metric == "accuracy")]
    assert set(depth[depth.carried == True].attribute) == {"shape", "size", "position", "count"}  # noqa: E712
    assert table.loc["Image", "attr_bindable"] == pytest.approx(table.loc["Image", "attr_carried"])
    assert "Audio + cache" in table.index


def test_weak_encoder_rows_with_and_without_cache(world, tmp_path):
    """``evaluate_transfer`` adds "<modality> (weak encoder)" rows, with and without the
    cache, from a second encoder (here: the same features with noise on audio and point), and
    ``weak_encoder`` builds none for an encoder it cannot re-align."""
    from ibllm_lab.checkpoint import load
    from ibllm_lab.encoders import PrecomputedEncoder
    from ibllm_lab.train import train_pipeline
    from ibllm_lab.transfer import evaluate_transfer, train_cache, weak_encoder

    feats = _features(world)
    encoder = PrecomputedEncoder(feats)
    g = torch.Generator().manual_seed(1)
    noisy = {m: (ids, f + 0.8 * torch.randn(f.shape, generator=g)) for m, (ids, f) in feats.items()}
    noisy[Modality.IMAGE] = feats[Modality.IMAGE]
    cfg = TransferConfig(
        n_scenes=3,
        mix_weights=(0.5,),
        modalities=("Image",),
        degraded=(),
        max_gen_len={"attribute": 2, "yesno": 2, "describe": 4, "caption": 4},
    )
    assert weak_encoder(world, encoder, cfg) is None
    run = train_pipeline(
        world, encoder, tmp_path / "train", preset="quick", progress=False, batch_size=8
    )
    model = load(run.llama_dir, run.finetune)
    cache = train_cache(world, encoder, tmp_path / "train" / "features")
    df = evaluate_transfer(
        model,
        world,
        encoder,
        tmp_path / "train" / "features",
        cfg,
        cache,
        PrecomputedEncoder(noisy),
    )
    conditions = set(df.condition)
    for m in cfg.weak_modalities:
        assert {f"{m} (weak encoder)", f"{m} (weak encoder) + cache"} <= conditions
    assert (tmp_path / "train" / "features" / "weak" / "Audio.pt").exists()


def test_gated_cache_settings_are_checked(tmp_path, capsys):
    from ibllm_lab.transfer import cli

    assert TransferConfig(cache_gate_quantile=None).cache_gate_quantile is None
    with pytest.raises(ValueError, match="cache_gate_quantile must lie in"):
        TransferConfig(cache_gate_quantile=1.0)
    with pytest.raises(SystemExit):
        cli(["--world", str(tmp_path), "--out", str(tmp_path), "--cache-gate-quantile", "1.5"])
    assert "--cache-gate-quantile must lie in [0, 1)" in capsys.readouterr().err


def test_summary_bindable_columns_leave_out_what_images_do_not_carry(monkeypatch):
    """``summary``'s bindable columns average the attributes both the modality and images
    carry, per split: with true stills (images without motion trails) video's motion
    (carried, wrong here) is left out of them only."""
    import pandas as pd

    from ibllm_lab.transfer import summary
    from ibllm_lab.world import CARRIES

    monkeypatch.setitem(CARRIES, Modality.IMAGE, CARRIES[Modality.IMAGE] - {"motion"})
    rows = []
    for attr, seen, novel in (("shape", 1.0, 0.5), ("color", 0.8, 0.4), ("motion", 0.0, 0.0)):
        for metric, v in (
            ("accuracy", (seen + novel) / 2),
            ("accuracy seen combinations", seen),
            ("accuracy novel combinations", novel),
        ):
            rows.append(
                dict(
                    condition="Video",
                    kind="attribute",
                    attribute=attr,
                    carried=True,
                    metric=metric,
                    value=v,
                    chance=0.2,
                )
            )
    table = summary(pd.DataFrame(rows))
    assert table.loc["Video", "attr_bindable_seen"] == pytest.approx(0.9)
    assert table.loc["Video", "attr_bindable_novel"] == pytest.approx(0.45)
    assert table.loc["Video", "attr_carried_seen"] == pytest.approx(0.6)
    assert table.loc["Video", "attr_bindable"] == pytest.approx(0.675)
