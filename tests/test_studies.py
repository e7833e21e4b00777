"""The notebooks' experiment helpers (ibllm_lab.studies, ibllm_lab.plots) on tiny inputs."""

from __future__ import annotations

import numpy as np
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
