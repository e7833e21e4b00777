"""The training-free visual cache (METHOD.md, data flow step 3).

A bank of image embeddings; a query (the fused feature of any modality) is pulled towards
the image distribution the model was trained on:

    sims, neighbours = top-``cache_size`` inner-product neighbours of the query
    prototype = normalize(sum_k softmax(sims * cache_t)_k * neighbours_k)
    out = normalize((1 - cache_weight) * query + cache_weight * prototype)

The query is used as given (the fused feature is not re-normalised before the cache).

An optional ``CacheGate`` (not part of the method; off unless passed as ``gate=``) makes the
weight depend on how far the query sits from the image distribution: a query whose nearest
cached image is as close as the bank's own images are to theirs (an image) is left alone,
one further away (another modality) gets the full ``cache_weight``. ``calibrate_gate``
sets its threshold from the bank alone, so it stays training-free. On the default world
the method's cache costs image queries of held-out shape-colour combinations (their
neighbours all show other combinations) while it helps every other modality; the gate
keeps the help and removes most of that cost (``ibllm_lab.transfer``).
The reference computes the weighted sum as ``sims @ prototypes``, which is only the
per-sample sum at batch 1; here it is per sample at every batch size.

Two implementations of the ``VisualCache`` protocol share ``apply_cache``:

- ``FaissCache``: a faiss inner-product index (flat by default; IVF, HNSW and IVF-PQ for
  millions of vectors), saved and loaded as a faiss index file. Search is batched and the
  neighbours are gathered vectorised (a zero-copy view of flat storage, else
  ``reconstruct_batch``), never one vector at a time.
- ``TorchCache``: the bank as a tensor on the query's device, top-k by matrix product
  (the GPU path; optionally stored in half precision with exact float32 re-scoring).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "pq")

# faiss switches flat search to BLAS only above this many queries; the default (hundreds)
# makes a 64-query search several times slower (TOOLCHAIN.md).
BLAS_THRESHOLD = 16
FAISS_DEFAULT_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # before we set it

# TorchCache: most query-by-bank similarities held at once (elements), to bound memory.
MAX_SIM_ELEMENTS = 1 << 28

# TorchCache with a half-precision bank: candidates re-scored in float32, per neighbour.
RESCORE_FACTOR = 4


@dataclass(frozen=True)
class CacheGate:
    """Per-query cache weight from the query's nearest-neighbour similarity ``s1``:
    ``cache_weight * clamp((threshold - s1) / ramp, 0, 1)``: none at or above
    ``threshold``, all of it at ``threshold - ramp`` and below (``ramp`` 0: a step).
    Similarities are inner products of unit vectors. Build it with ``calibrate_gate``."""

    threshold: float
    ramp: float = 0.1

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"CacheGate threshold must be finite, got {self.threshold}")
        if not (math.isfinite(self.ramp) and self.ramp >= 0):
            raise ValueError(f"CacheGate ramp must be finite and >= 0, got {self.ramp}")

    def weights(self, top1: torch.Tensor, cache_weight: float) -> torch.Tensor:
        """top1 (B,) float -> (B,) cache weights."""
        if self.ramp == 0:
            return float(cache_weight) * (top1 < self.threshold).to(top1.dtype)
        return float(cache_weight) * ((self.threshold - top1) / self.ramp).clamp(0.0, 1.0)


def calibrate_gate(
    cache: FaissCache | TorchCache,
    quantile: float = 0.01,
    ramp: float = 0.1,
    sample: int = 10_000,
    seed: int = 0,
) -> CacheGate:
    """A ``CacheGate`` whose threshold is the ``quantile`` of the bank's own leave-one-out
    nearest-neighbour similarity (over at most ``sample`` bank vectors, drawn with
    ``seed``): a query closer to its nearest cached image than that fraction of cached
    images are to theirs counts as an image and keeps its feature."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    if cache.ntotal < 2:
        raise ValueError(f"calibrating the gate needs a bank of >= 2 vectors, got {cache.ntotal}")
    n = min(int(sample), cache.ntotal)
    rows = np.sort(np.random.default_rng(seed).choice(cache.ntotal, n, replace=False))
    if isinstance(cache, TorchCache):
        vecs = cache.bank[torch.from_numpy(rows).to(cache.bank.device)].float()
        sims, ids = (t.cpu().numpy() for t in cache.search(vecs, 2))
    else:
        vecs = cache.neighbours(rows[:, None])[:, 0]
        sims, ids = cache.search(vecs, 2)
    # the vector itself is normally its own first hit; otherwise (an exact duplicate, or an
    # approximate index) the first hit is already another vector
    loo = np.where(ids[:, 0] == rows, sims[:, 1], sims[:, 0])
    loo = loo[np.isfinite(loo) & (ids[:, 1] >= 0)]
    if loo.size == 0:
        raise RuntimeError("no leave-one-out neighbours found: raise nprobe / ef_search")
    return CacheGate(float(np.quantile(loo, quantile)), float(ramp))


def apply_cache(
    query: torch.Tensor,
    neighbours: torch.Tensor,
    sims: torch.Tensor,
    cache_t: float,
    cache_weight: float,
    gate: CacheGate | None = None,
) -> torch.Tensor:
    """The cache formula, given the retrieved neighbours.

    query (B, D); neighbours (B, K, D); sims (B, K) inner products of query and neighbours
    (``-inf`` marks a missing neighbour). ``gate``: per-query weights (``CacheGate``)
    instead of ``cache_weight`` for all. Returns (B, D) unit-norm, on the query's device and
    dtype; computed in float32.
    """
    if query.dim() != 2 or neighbours.dim() != 3 or sims.dim() != 2:
        raise ValueError(
            f"expected query (B, D), neighbours (B, K, D), sims (B, K); got "
            f"{tuple(query.shape)}, {tuple(neighbours.shape)}, {tuple(sims.shape)}"
        )
    if neighbours.shape[:2] != sims.shape or neighbours.shape[::2] != query.shape:
        raise ValueError(
            f"shape mismatch: query {tuple(query.shape)}, neighbours {tuple(neighbours.shape)}, "
            f"sims {tuple(sims.shape)}"
        )
    q = query.float()
    weights = torch.softmax(sims.to(q.device, torch.float32) * float(cache_t), dim=-1)  # (B, K)
    neighbours = neighbours.to(q.device, torch.float32)
    prototype = F.normalize(torch.einsum("bk,bkd->bd", weights, neighbours), dim=-1)  # (B, D)
    if gate is None:
        w: torch.Tensor | float = float(cache_weight)
    else:
        top1 = sims.to(q.device, torch.float32).amax(dim=-1)
        w = gate.weights(top1, cache_weight)[:, None]  # (B, 1)
    out = (1.0 - w) * q + w * prototype
    return F.normalize(out, dim=-1).to(query.dtype)


def _check_call(query: torch.Tensor, dim: int, ntotal: int, cache_size: int) -> None:
    if query.dim() != 2 or query.shape[1] != dim:
        raise ValueError(f"query must be (B, {dim}) for this cache, got {tuple(query.shape)}")
    if not 1 <= int(cache_size) <= ntotal:
        raise ValueError(f"cache_size={cache_size} must be in [1, {ntotal}] (vectors in the bank)")


def _as_float32(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, D) float32 C-contiguous array, as faiss requires (NumPy 2 promotes to float64)."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(feats, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {arr.shape}")
    return arr


def _check_bank(feats: np.ndarray) -> None:
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise ValueError(f"the cache needs a non-empty (N, D) bank, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("the cache bank contains NaN or infinite values")


def _default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, with at least 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of ``dim`` that is at most dim / 16 (64 for 1024-d)."""
    return max(m for m in range(1, max(1, dim // 16) + 1) if dim % m == 0)


class FaissCache:
    """``VisualCache`` over a faiss inner-product index whose vectors can be reconstructed.

    Build with ``FaissCache.build(feats, kind=...)`` or wrap an existing index; ``nprobe``
    (IVF, PQ) and ``ef_search`` (HNSW) set the search effort.
    """

    def __init__(self, index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None):
        if index.ntotal == 0:
            raise ValueError("the faiss index is empty: build the cache from at least one vector")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(
                "the visual cache needs an inner-product index (faiss.METRIC_INNER_PRODUCT), "
                f"got metric_type={index.metric_type}"
            )
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        self.index = index
        self._ivf = faiss.try_extract_index_ivf(index)
        if self._ivf is not None:
            # IVF lists are unordered: reconstruction by id needs the direct map.
            self._ivf.make_direct_map()
        self._xb = self._flat_view()
        self._check_reconstruct()
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _flat_view(self) -> np.ndarray | None:
        """Zero-copy (N, D) view of a flat index's storage, or None for other indexes."""
        if not isinstance(self.index, faiss.IndexFlat):
            return None
        n, d = self.ntotal, self.dim
        return faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)

    def _check_reconstruct(self) -> None:
        try:
            self.index.reconstruct_batch(np.zeros(1, dtype=np.int64))
        except RuntimeError as err:
            raise ValueError(
                f"the cache needs an index whose vectors can be reconstructed; "
                f"{type(self.index).__name__} cannot ({str(err).splitlines()[-1][:200]}). "
                "Build it with FaissCache.build(feats, kind=...)."
            ) from None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Search effort: lists probed (IVF, PQ) and HNSW's candidate-list size."""
        if nprobe is not None:
            if self._ivf is None:
                raise ValueError(f"nprobe applies to IVF indexes, not {type(self.index).__name__}")
            self._ivf.nprobe = int(nprobe)
        if ef_search is not None:
            if not hasattr(self.index, "hnsw"):
                raise ValueError(f"ef_search applies to HNSW, not {type(self.index).__name__}")
            self.index.hnsw.efSearch = int(ef_search)

    @classmethod
    def build(
        cls,
        feats: torch.Tensor | np.ndarray,
        kind: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int = 8,
        m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        pq_m: int | None = None,
        pq_bits: int = 8,
        train_size: int | None = None,
        seed: int = 0,
    ) -> FaissCache:
        """Index ``feats`` (N, D) (rows normally unit-norm image embeddings).

        kind: "flat" (exact, ``IndexFlatIP``), "ivf" (``IndexIVFFlat``: ``nlist`` lists,
        ``nprobe`` probed), "hnsw" (``IndexHNSWFlat``: ``m`` links, ``ef_construction``,
        ``ef_search``), "pq" (``IndexIVFPQ``: ``pq_m`` sub-quantisers of ``pq_bits`` bits;
        neighbours are then approximations). ``train_size``: rows sampled to train IVF/PQ
        (default: all, at most 256 per list).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; expected one of {KINDS}")
        x = _as_float32(feats)
        _check_bank(x)
        n, d = x.shape
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, m, metric)
            index.hnsw.efConstruction = ef_construction
        else:
            nlist = nlist or _default_nlist(n)
            if nlist > n:
                raise ValueError(f"nlist={nlist} is larger than the number of vectors {n}")
            quantizer = faiss.IndexFlatIP(d)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
            else:
                pq_m = pq_m or _pq_subquantizers(d)
                if d % pq_m:
                    raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
                index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, pq_bits, metric)
            index.own_fields = True
            quantizer.this.disown()  # the IVF index now owns and frees the quantiser
            index.cp.seed = seed
            index.train(_train_sample(x, train_size or 256 * nlist, seed))
        index.add(x)
        log.info("built %s visual cache: %d x %d", kind, n, d)
        ivf_like = kind in ("ivf", "pq")
        return cls(
            index,
            nprobe=nprobe if ivf_like else None,
            ef_search=ef_search if kind == "hnsw" else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write the index as a faiss index file, atomically (tmp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, **search_params: Any) -> FaissCache:
        """Read a faiss index file written by ``save`` (or the reference's cache index)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no faiss index file at {path}")
        return cls(faiss.read_index(str(path)), **search_params)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Batched search: query (B, D) float32 -> (sims (B, k) float32, ids (B, k) int64).

        A missing neighbour (an IVF search that found fewer than k) has id -1.
        """
        return self.index.search(_as_float32(query), int(k))

    def neighbours(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` (B, K) as (B, K, D) float32, gathered in one call (-1 -> zeros)."""
        flat = ids.reshape(-1)
        safe = np.where(flat < 0, 0, flat)
        if self._xb is not None:
            vecs = self._xb[safe]  # fancy indexing copies only the K rows needed per query
        else:
            vecs = self.index.reconstruct_batch(safe)
        vecs[flat < 0] = 0.0
        return vecs.reshape(*ids.shape, self.dim)

    def __call__(
        self,
        query: torch.Tensor,
        cache_size: int,
        cache_t: float,
        cache_weight: float,
        gate: CacheGate | None = None,
    ) -> torch.Tensor:
        """query (B, D) on any device -> (B, D) unit-norm, same device and dtype."""
        _check_call(query, self.dim, self.ntotal, cache_size)
        sims, ids = self.search(query.detach().float().cpu().numpy(), cache_size)
        if (ids < 0).all(axis=1).any():
            raise RuntimeError("the cache search found no neighbour for a query: raise nprobe")
        neighbours = torch.from_numpy(self.neighbours(ids))
        sims_t = torch.from_numpy(sims).masked_fill(torch.from_numpy(ids < 0), -math.inf)
        return apply_cache(query, neighbours, sims_t, cache_t, cache_weight, gate)


def _train_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most ``size`` rows of x, drawn without replacement (all rows if fewer)."""
    if x.shape[0] <= size:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))
    return np.ascontiguousarray(x[rows])


class TorchCache:
    """``VisualCache`` with the bank as a tensor, top-k by matrix product (the GPU path).

    feats (N, D); ``dtype`` stores the bank (default: float32). A half-precision bank is
    searched in that precision for ``RESCORE_FACTOR * k`` candidates, which are then re-scored
    in float32 (against the stored vectors), so that the ranking and the weights do not
    suffer from half-precision products. ``chunk_rows``: score the bank in chunks of this
    many rows and keep each chunk's top candidates (similarities of a chunk then stay in the
    GPU's L2 cache; None: one product over the whole bank). The bank moves to the query's
    device on first use.
    """

    def __init__(
        self,
        feats: torch.Tensor | np.ndarray,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        chunk_rows: int | None = None,
    ):
        bank = torch.as_tensor(feats)
        if bank.dim() != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(bank.shape)}")
        if bank.numel() == 0:
            raise ValueError(f"the cache needs a non-empty (N, D) bank, got {tuple(bank.shape)}")
        # move, then check and convert: both run on the (faster) target device
        bank = bank.to(device or bank.device)
        if not torch.isfinite(bank).all():
            raise ValueError("the cache bank contains NaN or infinite values")
        self.bank = bank.to(dtype).contiguous()
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.bank.shape[0])

    def to(self, device: torch.device | str) -> TorchCache:
        self.bank = self.bank.to(device)
        return self

    @torch.no_grad()
    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, D) -> (sims (B, k) float32, ids (B, k) int64), on the bank's device."""
        q = query.to(self.bank.device, torch.float32)
        exact = self.bank.dtype == torch.float32
        n_cand = k if exact else min(self.ntotal, RESCORE_FACTOR * k)
        block = max(1, MAX_SIM_ELEMENTS // self.ntotal)
        blocks = [self._search_block(q[i : i + block], n_cand) for i in range(0, len(q), block)]
        sims = torch.cat([s for s, _ in blocks])  # (B, n_cand)
        ids = torch.cat([i for _, i in blocks])
        if not exact:
            cand = self.bank[ids].float()  # (B, n_cand, D)
            sims = torch.einsum("bd,bkd->bk", q, cand)  # exact float32 scores
            sims, order = sims.topk(k, dim=-1)
            ids = ids.gather(1, order)
        return sims, ids

    def _search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of one block of queries ``q (b, D)`` over the bank, chunk by chunk."""
        q = q.to(self.bank.dtype)
        chunk = self.chunk_rows or self.ntotal
        tops, ids = [], []
        for start in range(0, self.ntotal, chunk):
            sims = q @ self.bank[start : start + chunk].T  # (b, chunk)
            top, idx = sims.topk(min(k, sims.shape[1]), dim=-1)
            tops.append(top)
            ids.append(idx + start)
        if len(tops) == 1:
            return tops[0].float(), ids[0]
        top, order = torch.cat(tops, dim=1).topk(k, dim=-1)  # merge the chunks' candidates
        return top.float(), torch.cat(ids, dim=1).gather(1, order)

    @torch.no_grad()
    def __call__(
        self,
        query: torch.Tensor,
        cache_size: int,
        cache_t: float,
        cache_weight: float,
        gate: CacheGate | None = None,
    ) -> torch.Tensor:
        """query (B, D) -> (B, D) unit-norm, same device and dtype as the query."""
        _check_call(query, self.dim, self.ntotal, cache_size)
        if self.bank.device != query.device:
            self.to(query.device)
        sims, ids = self.search(query, int(cache_size))
        return apply_cache(query, self.bank[ids], sims, cache_t, cache_weight, gate)
