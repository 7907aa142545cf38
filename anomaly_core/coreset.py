"""Greedy k-center coreset on a random projection (PatchCore's approximate greedy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def greedy_kcenter(points: np.ndarray, k: int, *, start: int) -> np.ndarray:
    """Farthest-point (Gonzalez) selection: a 2-approximation of the minimal cover radius.

    points: [N, d] float32 (Euclidean). Returns [k] int64 indices, the first being `start`.
    Each step costs one [N, d] x [d] product: ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    sq = np.einsum("nd,nd->n", points, points)                              # [N]
    min_d = np.full(n, np.inf, dtype=np.float32)                            # [N] squared dist to set
    chosen = np.empty(k, dtype=np.int64)
    c = start
    for i in range(k):
        chosen[i] = c
        d = sq - 2.0 * (points @ points[c]) + sq[c]                         # [N]
        np.minimum(min_d, d, out=min_d)
        c = int(np.argmax(min_d))
    return chosen


def select_coreset(features: np.ndarray, *, k: int, projection_dim: int, seed: int) -> Coreset:
    """Approximate greedy coreset of L2-normalised features [N, D] float32.

    Selection runs on a random projection to `projection_dim` (skipped when that is not smaller than D);
    the cover radius is then measured exactly in the original space with cosine distance.
    """
    f = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = f.shape
    proj = f @ random_projection(dim, projection_dim, seed=seed) if projection_dim < dim else f
    start = int(np.random.default_rng(seed).integers(n))
    idx = greedy_kcenter(np.ascontiguousarray(proj), k, start=start)
    radius = float(MemoryBank.build(f[idx]).nearest(f).max())
    return Coreset(indices=idx, cover_radius=radius)
