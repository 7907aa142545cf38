"""Greedy k-center coreset on a random projection (PatchCore's approximate greedy), single-partition or
two-round composable (Malkomes et al., NeurIPS 2015; Ceccarello et al., PVLDB 2019; DESIGN §2).

The composable scheme splits the points into partitions, runs greedy in each to an oversampled share of
the target, then greedy again on the union of the survivors. Its cost is linear in N (each partition is
small enough to stay in cache) instead of N x k, and the partitions run in parallel through an injected
`map_fn` (the fit job passes one that runs Ray tasks; nothing here imports Ray).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from anomaly_core.index import MemoryBank


@dataclass(frozen=True)
class Coreset:
    indices: np.ndarray     # [k] int64 rows of the input, in selection order
    cover_radius: float     # max over inputs of the cosine distance to the nearest selected row


def coreset_size(n: int, *, ratio: float, size: int | None) -> int:
    """Bank size for n patches: `size` when given, else ceil(ratio * n), clipped to [1, n]."""
    k = size if size is not None else int(np.ceil(ratio * n))
    return int(min(max(k, 1), n))


def random_projection(dim_in: int, dim_out: int, *, seed: int) -> np.ndarray:
    """[dim_in, dim_out] float32 Gaussian matrix scaled by 1/sqrt(dim_out): preserves distances in
    expectation (Johnson-Lindenstrauss), as PatchCore's sparse random projection does."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def greedy_kcenter(points: np.ndarray, k: int, *, start: int | None = None,
                   min_sq_dist: np.ndarray | None = None) -> np.ndarray:
    """Farthest-point (Gonzalez) selection: a 2-approximation of the minimal cover radius.

    points: [N, d] float32 (Euclidean). Returns [k] int64 indices. Either `start` (the first centre) or
    `min_sq_dist` ([N] squared distance of each point to centres chosen before; the first new centre is
    its argmax) sets where selection begins.
    Each step costs one [N, d] x [d] product: ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if (start is None) == (min_sq_dist is None):
        raise ValueError("give exactly one of start= and min_sq_dist=")
    x = np.ascontiguousarray(points, dtype=np.float32)
    sq = np.einsum("nd,nd->n", x, x)                                        # [N]
    if min_sq_dist is None:
        min_d = np.full(n, np.inf, dtype=np.float32)                        # [N] squared dist to set
        c = start
    else:
        min_d = np.array(min_sq_dist, dtype=np.float32)
        c = int(np.argmax(min_d))
    d = np.empty(n, dtype=np.float32)                                       # reused: no allocation per step
    chosen = np.empty(k, dtype=np.int64)
    # a bar in a terminal for long selections; tqdm stays silent when stderr is not a TTY (Ray jobs, CI)
    steps = tqdm(range(k), desc="greedy coreset", unit="centre", mininterval=2.0, leave=False,
                 disable=None if k >= 2000 else True)
    for i in steps:
        chosen[i] = c
        np.matmul(x, x[c], out=d)                                           # [N] x . c
        d *= -2.0
        d += sq
        d += sq[c]                                                          # ||x - c||^2
        np.minimum(min_d, d, out=min_d)
        c = int(np.argmax(min_d))
    return chosen


def nearest_sq_dist(points: np.ndarray, centres: np.ndarray, *, batch: int = 1 << 16) -> np.ndarray:
    """[N] squared Euclidean distance of each point to its nearest centre (exact FAISS search: one GEMM
    per batch, compute-bound, unlike greedy's memory-bound product per centre)."""
    import faiss
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    out = np.empty(points.shape[0], dtype=np.float32)
    for s in range(0, points.shape[0], batch):
        d, _ = index.search(np.ascontiguousarray(points[s:s + batch], dtype=np.float32), 1)
        out[s:s + batch] = d[:, 0]
    return out


def _greedy_task(args: tuple[np.ndarray, int, int]) -> np.ndarray:
    points, k, start = args
    return greedy_kcenter(points, k, start=start)


def composable_greedy(points: np.ndarray, k: int, *, partition_size: int, oversample: float, seed: int,
                      refine: float = 0.0, map_fn: Callable[[Callable, Iterable], Iterable] = map) -> np.ndarray:
    """Two-round greedy k-center. points: [N, d] float32. Returns [k] int64 indices into points.

    Round 1: contiguous partitions of `partition_size` rows each keep ceil(oversample * k * n_p / N)
    centres (all of them if fewer). Round 2: greedy on the union. A 4-approximation of the optimal cover
    radius, approaching 2 as the oversampling grows; with one partition it is plain greedy.
    refine: the last `refine` fraction of the k centres is chosen by greedy over *all* points, starting
    from their exact distances to the two-round centres: it picks exactly the points the composition
    covers worst, which is where its radius exceeds plain greedy's.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if partition_size < 1 or oversample < 1:
        raise ValueError(f"partition_size={partition_size} must be >= 1 and oversample={oversample} >= 1")
    rng = np.random.default_rng(seed)
    if n <= partition_size:
        return greedy_kcenter(points, k, start=int(rng.integers(n)))
    bounds = [(s, min(s + partition_size, n)) for s in range(0, n, partition_size)]
    jobs = []
    for s, e in bounds:
        k_p = min(e - s, math.ceil(oversample * k * (e - s) / n))
        jobs.append((points[s:e], k_p, int(rng.integers(e - s))))
    survivors = np.concatenate([s + np.asarray(idx) for (s, _), idx in zip(bounds, map_fn(_greedy_task, jobs))])
    k_extra = min(int(refine * k), k - 1)
    k_two = k - k_extra
    chosen = survivors if survivors.size <= k_two else survivors[
        greedy_kcenter(points[survivors], k_two, start=int(rng.integers(survivors.size)))]
    if k_extra == 0 or chosen.size == k:
        return chosen
    k_extra = k - chosen.size
    extra = greedy_kcenter(points, k_extra, min_sq_dist=nearest_sq_dist(points, points[chosen]))
    return np.concatenate([chosen, extra])


def select_coreset(features: np.ndarray, *, k: int, projection_dim: int, seed: int, partition_size: int,
                   oversample: float, refine: float,
                   map_fn: Callable[[Callable, Iterable], Iterable] = map) -> Coreset:
    """Approximate greedy coreset of L2-normalised features [N, D] float32.

    Selection runs on one random projection to `projection_dim` shared by every partition (skipped when
    that is not smaller than D); the cover radius is then measured exactly in the original space with
    cosine distance against the selected rows.
    """
    f = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = f.shape
    proj = f @ random_projection(dim, projection_dim, seed=seed) if projection_dim < dim else f
    idx = composable_greedy(np.ascontiguousarray(proj), k, partition_size=partition_size,
                            oversample=oversample, seed=seed, refine=refine, map_fn=map_fn)
    radius = float(MemoryBank.build(f[idx]).nearest(f).max())
    return Coreset(indices=idx, cover_radius=radius)
