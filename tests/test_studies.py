"""The notebooks' experiment helpers (ibllm_lab.studies, ibllm_lab.plots) on tiny inputs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ibllm_lab import plots, studies
from ibllm_lab.cache import FaissCache
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.modality import Modality
from ibllm_lab.model import ImageBindLLM


def clustered(n: int, dim: int = 16, centres: int = 8, noise: float = 0.2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centres, dim, generator=gen), dim=-1)
    x = c[torch.randint(centres, (n,), generator=gen)] + noise * torch.randn(n, dim, generator=gen)
    return F.normalize(x, dim=-1)


def test_cache_sweep_weight_zero_is_identity_and_weight_moves_towards_images():
    images, bank = clustered(40, seed=1), clustered(400, seed=1)[40:]  # same clusters
    gap = 0.6 * F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3)), dim=0)
    audio = F.normalize(images + gap, dim=-1)  # a modality offset from the images
    cache = FaissCache.build(bank, "flat")
    base = {"cache_size": 10, "cache_t": 20.0, "cache_weight": 0.0}
    grid = studies.one_at_a_time(base, cache_weight=[0.5, 1.0])
    assert [g["cache_weight"] for g in grid] == [0.0, 0.5, 1.0]
    sweep = studies.cache_sweep({Modality.AUDIO: audio}, images, cache, grid)
    by = sweep.set_index("cache_weight")
    raw = studies.embedding_stats(audio, images)
    assert by.loc[0.0, "cosine_to_paired_image"] == pytest.approx(raw["cosine_to_paired_image"])
    assert by.loc[1.0, "centroid_distance"] < by.loc[0.5, "centroid_distance"]
    assert by.loc[0.5, "centroid_distance"] < by.loc[0.0, "centroid_distance"]


def test_gate_comparison_leaves_images_and_pulls_the_offset_modality():
    from ibllm_lab.cache import calibrate_gate

    # tight clusters: an image's nearest cached image is about as close as the bank's own
    images, bank = clustered(40, noise=0.05, seed=1), clustered(400, noise=0.05, seed=1)[40:]
    offsets = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    audio = F.normalize(images + 2.0 * offsets, dim=-1)  # far from every cached image
    cache = FaissCache.build(bank, "flat")
    gate = calibrate_gate(cache, quantile=0.01, ramp=0.0)
    setting = {"cache_size": 10, "cache_t": 20.0, "cache_weight": 0.5}
    table = studies.gate_comparison(
        {Modality.IMAGE: images, Modality.AUDIO: audio}, images, cache, gate, setting
    ).set_index(["modality", "cache"])
    assert table.loc[("Audio", "off"), "pulled"] == 0.0
    assert table.loc[("Audio", "method"), "pulled"] == 1.0
    # image queries sit as close to the bank as its own vectors: the gate keeps nearly all
    assert table.loc[("Image", "gated"), "pulled"] <= 0.1
    assert (
        table.loc[("Image", "gated"), "cosine_to_paired_image"]
        > table.loc[("Image", "method"), "cosine_to_paired_image"]
    )
    # the offset modality is far from every cached image: the gate pulls it like the method
    assert table.loc[("Audio", "gated"), "pulled"] == 1.0
    assert table.loc[("Audio", "gated"), "centroid_distance"] == pytest.approx(
        table.loc[("Audio", "method"), "centroid_distance"]
    )


def test_index_comparison_exact_search_has_recall_one():
    bank = clustered(2000, dim=32, centres=20)
    table = studies.index_comparison(bank, bank[:50], ("flat", "ivf", "hnsw"), k=5, reps=1)
    recall = dict(zip(table.kind, table["recall@5"], strict=True))
    assert recall["flat"] == 1.0 and 0.5 < recall["ivf"] <= 1.0 and 0.5 < recall["hnsw"] <= 1.0
    assert (table.search_ms_per_query > 0).all()


def test_gates_as_changes_and_restores_the_gates():
    torch.manual_seed(0)
    llama = LlamaConfig.from_name("tiny", vocab_size=64, dim=16, n_layers=3, n_heads=2)
    model = ImageBindLLM(llama, AdapterConfig.from_name("tiny", encoder_dim=8, query_layer=3))
    gates = studies._gates(model)
    with torch.no_grad():
        for g in gates.values():
            g.fill_(0.3)
    with studies.gates_as(model, 1):
        assert [float(g.detach().abs().max()) for g in gates.values()] == pytest.approx([0, 0, 0.3])
    with studies.gates_as(model, "open"):
        assert all(torch.tanh(g).min() > 0.999 for g in gates.values())
    with pytest.raises(ValueError), studies.gates_as(model, "half"):
        pass
    assert all(torch.equal(g, torch.full_like(g, 0.3)) for g in gates.values())


def test_exact_match_and_settings_grid():
    assert studies.exact_match(["Red.", "a circle", "two"], ["red", "circle", "three"]) == [
        True,
        True,
        False,
    ]
    assert studies.settings_grid(a=[1, 2], b=[3]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def test_projection_is_deterministic_and_keeps_clusters_apart():
    x = clustered(120, dim=16, centres=3, noise=0.05).numpy()
    xy = plots.project_2d(x, "pca")
    assert xy.shape == (120, 2) and np.allclose(xy, plots.project_2d(x, "pca"))
    ids, dist = plots.knn_graph(x, 5)
    assert (ids[:, 0] == np.arange(120)).all() and (dist[:, 0] < 1e-5).all()
    with pytest.raises(ValueError, match="projection method"):
        plots.project_2d(x, "tsne")


# ------------------------------------------------------------------- trained ablations
TINY_BUDGET = {
    "pretrain": {"epochs": 1, "max_examples": 32},
    "finetune": {"epochs": 1, "max_examples": 32},
}
VARIANTS = {
    "reference": {},
    "input token": {"injection": "input_token", "query_layer": 0},
    "norm only": {"w_bias": False, "lora_rank": 0},
}


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    """Three variants trained with a tiny budget on the quick embedded default (built
    through the library when missing) and evaluated on two conditions' mini-benchmarks."""
    default = studies.embedded_default(progress=False)
    root = tmp_path_factory.mktemp("ablations")
    options = dict(
        train_dir=root / "train",
        conditions=[("Image", False), ("Audio", False), ("Audio", True)],
        n_scenes=2,
        kinds=("vqa", "captions"),
        budget=TINY_BUDGET,
        progress=False,
    )
    table = studies.trained_ablations(default, VARIANTS, root / "out", **options)
    runs = {v: root / "train" / v.replace(" ", "_") for v in VARIANTS}
    return default, table, runs, root, options


def test_trained_ablations_table_has_one_row_per_variant_with_the_metrics(ablations):
    _, table, _, root, _ = ablations
    assert list(table.variant) == list(VARIANTS)
    assert list(table.injection) == ["gated", "input_token", "gated"]
    assert list(table.injected_layers) == [2, 0, 2]  # the quick base LM has 2 layers
    assert list(table.peft) == ["bias + LoRA + norm", "bias + LoRA + norm", "norm"]
    metrics = ["mini_vqa accuracy (Image)", "mini_captions CIDEr (Image)"]
    metrics += ["mini_captions CIDEr (Audio)", "mini_captions CIDEr (Audio, cache)"]
    assert set(metrics) <= set(table.columns) and table[metrics].notna().all().all()
    assert (table.train_s > 0).all()
    saved = pd.read_csv(root / "out" / "trained_ablations.csv")
    assert list(saved.variant) == list(VARIANTS)
    long = pd.read_csv(root / "out" / "trained_ablations_long.csv")
    assert set(long.cache) == {False, True} and set(long.variant) == set(VARIANTS)
    panels = studies.headline_panels(table)
    assert set(panels) == {"mini_vqa accuracy", "mini_captions CIDEr"}
    assert set(panels["mini_captions CIDEr"]["norm only"]) == {"Image", "Audio", "Audio, cache"}
    fig = plots.bar_panels(panels, "trained ablations")
    assert len(fig.axes) == 2
    plt.close(fig)


def test_trained_variants_have_the_requested_config_and_trainable_keys(ablations):
    from ibllm_lab.checkpoint import read_adapter_file
    from ibllm_lab.io import safe_torch_load

    _, _, runs, _, _ = ablations
    pre = safe_torch_load(runs["input token"] / "pretrain" / "checkpoint.pt")["trainable"]
    blocks = range(1, AdapterConfig.from_name("tiny").bind_blocks + 1)
    bind = {"image_bind_proj.weight", "image_bind_proj.bias"} | {
        f"image_bind_{p}_{k}.weight" for p in ("norm", "f1", "f2", "f3") for k in blocks
    }
    assert set(pre) == bind  # input token: no prefix, no gates
    state, meta = read_adapter_file(runs["input token"] / "finetune" / "adapter.pth")
    assert meta["adapter_config"]["injection"] == "input_token"
    assert meta["adapter_overrides"] == VARIANTS["input token"]
    assert "prefix_query.weight" not in state
    fine = safe_torch_load(runs["norm only"] / "finetune" / "checkpoint.pt")["trainable"]
    _, meta = read_adapter_file(runs["norm only"] / "finetune" / "adapter.pth")
    assert (meta["adapter_config"]["w_bias"], meta["adapter_config"]["lora_rank"]) == (False, 0)
    n_layers = meta["llama_config"]["n_layers"]
    norms = {"llama.norm.weight"} | {
        f"llama.layers.{i}.{n}_norm.weight" for i in range(n_layers) for n in ("attention", "ffn")
    }
    assert set(fine) == norms  # neither bias nor LoRA: only the norms fine-tune
    assert meta["max_examples"] == 32 and meta["train_config"]["epochs"] == 1


def test_trained_ablations_reuse_complete_variants_and_retrain_stale_ones(ablations):
    default, table, runs, root, options = ablations
    files = [p for run in runs.values() for p in run.rglob("*.p*t")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = studies.trained_ablations(default, VARIANTS, root / "out", **options)
    assert (again.train_s == 0).all()  # every variant reused, nothing trained
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    pd.testing.assert_frame_equal(again.drop(columns="train_s"), table.drop(columns="train_s"))
    other = {**TINY_BUDGET, "finetune": {"epochs": 1, "max_examples": 64}}
    _, seconds = studies.train_variant(default, VARIANTS["norm only"], runs["norm only"], other)
    assert seconds > 0  # another budget: trained again


def test_linear_probes_find_attribute_information_and_where_it_is_lost():
    """bind_probes: an attribute the features carry is decodable from the encoder and from a
    random bind network's output; a bind network that drops its input leaves chance."""
    from types import SimpleNamespace

    from ibllm_lab.world import ATTRIBUTES

    gen = torch.Generator().manual_seed(0)
    colours = torch.randint(len(ATTRIBUTES["color"]), (600,), generator=gen)
    centres = F.normalize(torch.randn(len(ATTRIBUTES["color"]), 256, generator=gen), dim=-1)
    feats = F.normalize(centres[colours] + 0.15 * torch.randn(600, 256, generator=gen), dim=-1)
    scenes = [
        SimpleNamespace(attributes={"color": ATTRIBUTES["color"][c], "size": "small"})
        for c in colours.tolist()
    ]
    train, test = (scenes[:400], feats[:400]), (scenes[400:], feats[400:])
    shuffled = np.random.default_rng(0).permutation(colours[400:].numpy())
    assert studies.linear_probe_accuracy(feats[:400], colours[:400], feats[400:], shuffled) < 0.4
    torch.manual_seed(0)
    model = ImageBindLLM(
        LlamaConfig.from_name("tiny", n_layers=2, vocab_size=97),
        AdapterConfig.from_name("tiny", query_layer=2),
    )
    table = studies.bind_probes(model, train, test, attributes=["color"], steps=200)
    assert table.loc["color", "encoder"] > 0.95 and table.loc["color", "bind output"] > 0.5
    assert table.loc["color", "chance"] == pytest.approx(1 / 6)
    with torch.no_grad():  # a bind network whose projection is zero: a constant output
        model.image_bind_proj.weight.zero_()
        model.image_bind_proj.bias.zero_()
    lost = studies.bind_probes(model, train, test, attributes=["color"], steps=200)
    assert lost.loc["color", "bind output"] < 0.35 < 0.95 < lost.loc["color", "encoder"]
    with pytest.raises(ValueError, match="one label per row"):
        studies.linear_probe_accuracy(feats[:10], colours[:9], feats[:5], colours[:5])


def test_embedded_default_restores_the_callers_thread_count(ablations):
    """Loading (or building) the embedded default runs on ``threads`` torch threads and gives
    the caller's setting back, so a notebook's one-thread inference stays one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        studies.embedded_default(progress=False, threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
