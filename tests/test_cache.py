"""The visual cache: the method's formula, the faiss and torch paths, persistence, recall."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibllm_lab.cache import CacheGate, FaissCache, TorchCache, apply_cache, calibrate_gate
from ibllm_lab.modality import VisualCache

D = 32


def unit(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def clustered(n: int, d: int = D, n_clusters: int = 20, noise: float = 0.35, seed: int = 0):
    """Unit vectors drawn around a few unit centres (image embeddings are clustered)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, d, generator=g), dim=-1)
    which = torch.randint(n_clusters, (n,), generator=g)
    x = centres[which] + noise * torch.randn(n, d, generator=g) / d**0.5
    return F.normalize(x, dim=-1)


def naive_cache(query, bank, cache_size, cache_t, cache_weight):
    """The method's formula written out per sample in float64, from exhaustive search."""
    out = []
    for q in query.double():
        sims = bank.double() @ q  # (N,)
        top, idx = sims.topk(cache_size)
        w = torch.exp(top * cache_t - (top * cache_t).max())
        w = w / w.sum()
        proto = (w[:, None] * bank.double()[idx]).sum(0)
        proto = proto / proto.norm()
        mixed = (1 - cache_weight) * q + cache_weight * proto
        out.append(mixed / mixed.norm())
    return torch.stack(out)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_apply_cache_matches_formula():
    bank, query = unit(50, seed=1), unit(4, seed=2) * 0.7  # fused features need not be unit
    sims, idx = (query @ bank.T).topk(5, dim=-1)
    out = apply_cache(query, bank[idx], sims, cache_t=20.0, cache_weight=0.5)
    torch.testing.assert_close(
        out.double(), naive_cache(query, bank, 5, 20.0, 0.5), atol=1e-6, rtol=1e-5
    )
    assert out.shape == (4, D) and out.dtype == torch.float32


@pytest.mark.parametrize("cache_weight", [0.0, 0.3, 1.0])
def test_faiss_flat_matches_formula_and_torch_path(cache_weight):
    bank, query = unit(300, seed=3), unit(7, seed=4)
    expected = naive_cache(query, bank, 10, 20.0, cache_weight)
    flat = FaissCache.build(bank)
    torch_cache = TorchCache(bank)
    assert isinstance(flat, VisualCache) and isinstance(torch_cache, VisualCache)
    out_flat = flat(query, 10, 20.0, cache_weight)
    out_torch = torch_cache(query, 10, 20.0, cache_weight)
    torch.testing.assert_close(out_flat.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_torch.double(), expected, atol=1e-5, rtol=1e-5)
    if cache_weight == 0.0:
        torch.testing.assert_close(out_flat, F.normalize(query, dim=-1))


def test_output_keeps_query_dtype_and_grad_free_query():
    bank = unit(100, seed=5)
    query = unit(3, seed=6).to(torch.bfloat16).requires_grad_(True)
    for cache in (FaissCache.build(bank), TorchCache(bank)):
        out = cache(query, 4, 20.0, 0.5)
        assert out.dtype == torch.bfloat16 and out.device == query.device
        torch.testing.assert_close(out.float().norm(dim=-1), torch.ones(3), atol=1e-2, rtol=0)


def test_reconstruction_paths_agree():
    """The zero-copy flat view and reconstruct_batch (HNSW) give the stored vectors."""
    bank = unit(200, seed=7)
    ids = np.array([[0, 5, 199], [3, 3, 1]])
    flat, hnsw = FaissCache.build(bank), FaissCache.build(bank, kind="hnsw")
    assert flat._xb is not None and hnsw._xb is None
    np.testing.assert_array_equal(flat.neighbours(ids), bank.numpy()[ids])
    np.testing.assert_array_equal(hnsw.neighbours(ids), bank.numpy()[ids])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    bank, query = clustered(2000, seed=8), clustered(5, seed=9)
    cache = FaissCache.build(bank, kind=kind, nprobe=4)
    path = cache.save(tmp_path / "cache" / f"{kind}.faiss")
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{kind}.faiss"]  # no tmp left
    loaded = FaissCache.load(path)
    assert type(loaded.index) is type(cache.index) and loaded.ntotal == 2000
    torch.testing.assert_close(loaded(query, 10, 20.0, 0.5), cache(query, 10, 20.0, 0.5))


def test_approximate_indexes_recall_on_clustered_data():
    bank, query = clustered(5000, seed=10), clustered(64, seed=11)
    truth = FaissCache.build(bank).search(query.numpy(), 10)[1]
    ivf = FaissCache.build(bank, kind="ivf", nlist=32, nprobe=4)
    hnsw = FaissCache.build(bank, kind="hnsw", m=16, ef_construction=100, ef_search=128)
    pq = FaissCache.build(bank, kind="pq", nlist=16, nprobe=4, pq_m=8, pq_bits=6)
    assert recall_at(ivf.search(query.numpy(), 10)[1], truth) >= 0.9
    assert recall_at(hnsw.search(query.numpy(), 10)[1], truth) >= 0.9
    assert recall_at(pq.search(query.numpy(), 10)[1], truth) >= 0.3
    # more probes never lose neighbours; probing every list is exact
    ivf.set_search_params(nprobe=32)
    assert recall_at(ivf.search(query.numpy(), 10)[1], truth) == 1.0
    out = pq(query, 10, 20.0, 0.5)  # PQ neighbours are approximations, output still unit
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(64))


def test_half_precision_torch_bank_rescored_exactly():
    bank, query = clustered(3000, seed=12), clustered(16, seed=13)
    exact = TorchCache(bank)
    half = TorchCache(bank, dtype=torch.bfloat16)
    s32, i32 = exact.search(query, 10)
    s16, i16 = half.search(query, 10)
    assert recall_at(i16.numpy(), i32.numpy()) >= 0.95
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, atol=2e-2, rtol=0)


def test_torch_cache_blocks_queries_and_chunks_the_bank(monkeypatch):
    """Query blocks (bounded memory) and bank chunks give the result of one matmul."""
    import ibllm_lab.cache as cache_mod

    bank, query = unit(500, seed=14), unit(9, seed=15)
    whole = TorchCache(bank).search(query, 5)
    torch.testing.assert_close(TorchCache(bank, chunk_rows=64).search(query, 5), whole)
    torch.testing.assert_close(TorchCache(bank, chunk_rows=3).search(query, 5), whole)
    monkeypatch.setattr(cache_mod, "MAX_SIM_ELEMENTS", 2 * 500)  # 2 queries per block
    blocked = TorchCache(bank).search(query, 5)
    torch.testing.assert_close(blocked, whole)


def naive_gated(query, bank, cache_size, cache_t, cache_weight, threshold, ramp):
    """The gated cache per sample: the method's formula with the weight
    ``cache_weight * clamp((threshold - top1) / ramp, 0, 1)`` of each query's own top-1."""
    rows = []
    for q in query:
        top1 = float((bank.double() @ q.double()).max())
        w = cache_weight * min(max((threshold - top1) / ramp, 0.0), 1.0)
        rows.append(naive_cache(q[None], bank, cache_size, cache_t, w)[0])
    return torch.stack(rows)


def test_gated_cache_weights_each_query_by_its_nearest_neighbour():
    bank = clustered(400, seed=11)
    # queries at every distance from the bank: bank vectors (top-1 = 1), near and far
    near = F.normalize(bank[:4] + 0.15 * unit(4, seed=12), dim=-1)
    query = torch.cat([bank[4:7], near, unit(5, seed=13)])
    top1 = (query @ bank.T).amax(dim=-1)
    threshold = float(top1.median())
    for cache in (FaissCache.build(bank), TorchCache(bank)):
        for ramp in (0.0, 0.2):
            gate = CacheGate(threshold, ramp)
            out = cache(query, 10, 20.0, 0.5, gate=gate)
            if ramp:
                expected = naive_gated(query, bank, 10, 20.0, 0.5, threshold, ramp)
            else:  # a step: the method's cache below the threshold, the query above
                method = naive_cache(query, bank, 10, 20.0, 0.5)
                below = (top1 < threshold)[:, None]
                expected = torch.where(below, method, F.normalize(query.double(), dim=-1))
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        # a gate nothing passes leaves every query as it is; one everything passes at full
        # weight is the method's cache
        torch.testing.assert_close(cache(query, 10, 20.0, 0.5, gate=CacheGate(-2.0)), query)
        torch.testing.assert_close(
            cache(query, 10, 20.0, 0.5, gate=CacheGate(3.0, ramp=0.5)),
            cache(query, 10, 20.0, 0.5),
        )


def test_calibrate_gate_is_the_banks_leave_one_out_quantile():
    bank = clustered(500, seed=21)
    sims = bank @ bank.T
    sims.fill_diagonal_(-2.0)
    loo = sims.amax(dim=1).numpy()
    for cache in (FaissCache.build(bank), TorchCache(bank)):
        for q in (0.01, 0.5):
            gate = calibrate_gate(cache, quantile=q, ramp=0.05)
            assert gate.threshold == pytest.approx(float(np.quantile(loo, q)), abs=1e-5)
            assert gate.ramp == 0.05
    # a sample of the bank estimates it
    sampled = calibrate_gate(FaissCache.build(bank), quantile=0.5, sample=200)
    assert sampled.threshold == pytest.approx(float(np.quantile(loo, 0.5)), abs=0.05)
    with pytest.raises(ValueError, match="quantile must lie in"):
        calibrate_gate(TorchCache(bank), quantile=1.0)
    with pytest.raises(ValueError, match=">= 2 vectors"):
        calibrate_gate(FaissCache.build(bank[:1]))
    with pytest.raises(ValueError, match="ramp must be finite and >= 0"):
        CacheGate(0.9, ramp=-0.1)
    with pytest.raises(ValueError, match="threshold must be finite"):
        CacheGate(float("nan"))


def test_clear_errors(tmp_path):
    bank = unit(20)
    cache = FaissCache.build(bank)
    with pytest.raises(ValueError, match=r"query must be \(B, 32\)"):
        cache(unit(2, d=16), 5, 20.0, 0.5)
    with pytest.raises(ValueError, match=r"cache_size=21 must be in \[1, 20\]"):
        cache(unit(2), 21, 20.0, 0.5)
    with pytest.raises(ValueError, match=r"cache_size=21"):
        TorchCache(bank)(unit(2), 21, 20.0, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        FaissCache.build(torch.zeros(0, D))
    with pytest.raises(ValueError, match="non-empty"):
        TorchCache(torch.zeros(0, D))
    with pytest.raises(ValueError, match="chunk_rows"):
        TorchCache(bank, chunk_rows=0)
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        FaissCache.build(torch.zeros(D))
    with pytest.raises(ValueError, match="NaN"):
        FaissCache.build(torch.full((3, D), float("nan")))
    with pytest.raises(ValueError, match="unknown cache kind"):
        FaissCache.build(bank, kind="lsh")
    with pytest.raises(ValueError, match="empty"):
        FaissCache(faiss.IndexFlatIP(D))
    with pytest.raises(ValueError, match="inner-product"):
        l2 = faiss.IndexFlatL2(D)
        l2.add(bank.numpy())
        FaissCache(l2)
    id_map = faiss.IndexIDMap(faiss.IndexFlatIP(D))
    id_map.add_with_ids(bank.numpy(), np.arange(100, 120))
    with pytest.raises(ValueError, match="cannot be reconstructed|can be reconstructed"):
        FaissCache(id_map)
    with pytest.raises(FileNotFoundError, match="no faiss index file"):
        FaissCache.load(tmp_path / "missing.faiss")
    with pytest.raises(ValueError, match="nprobe applies to IVF"):
        cache.set_search_params(nprobe=3)
