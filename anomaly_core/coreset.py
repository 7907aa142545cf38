"""Greedy k-center coreset on a random projection (PatchCore's approximate greedy), single-partition or
two-round composable (Malkomes et al., NeurIPS 2015; Ceccarello et al., PVLDB 2019; docs/design.md §3).

The composable scheme splits the points into partitions, runs greedy in each to an oversampled share of
the target, then greedy again on the union of the survivors. Its cost is linear in N (each partition is
small enough to stay in cache) instead of N x k, and the partitions run in parallel through an injected
`map_fn` (the fit job passes one that runs Ray tasks over blocks of the object store; nothing here
imports Ray). Only survivors, refinement candidates and the bank ever reach the caller's process, so a
training set larger than any one machine's memory can be fitted.

Guarantee: with k centres kept per partition the composition is a 4-approximation (Malkomes et al.).
Keeping only an oversampled *share* of k per partition, as here, is what makes the cost linear, and
gives no constant factor; the refinement pass closes most of the gap (docs/benchmarks.md: measured radii).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from anomaly_core.index import MemoryBank


@dataclass(frozen=True)
class Coreset:
    features: np.ndarray    # [k, D] float32 selected rows (original space, L2-normalised)
    cover_radius: float     # max over all rows of the cosine distance to the nearest selected row
    n_points: int           # rows the selection covers


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
                   min_sq_dist: np.ndarray | None = None, until: float | None = None) -> np.ndarray:
    """Farthest-point (Gonzalez) selection: a 2-approximation of the minimal cover radius.

    points: [N, d] float32 (Euclidean). Returns [k] int64 indices. Either `start` (the first centre) or
    `min_sq_dist` ([N] squared distance of each point to centres chosen before; the first new centre is
    its argmax) sets where selection begins. until: stop early, returning fewer than k, once the
    farthest point's squared distance to the chosen centres is <= until (every point covered that well).
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
        if until is not None and min_d[c] <= until:
            return chosen[:i]
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


# ---- the composable coreset over partitions -------------------------------------------------------
# A partition is anything `points_of` turns into [n_p, D] float32 rows: a slice of an array in memory,
# or a Ray block of patch features that only the worker holding it ever reads. Each step below is a
# pure function of one partition plus arrays shared by all; `map_fn(step, parts, *shared)` runs them
# (in this process, or as Ray tasks with the shared arrays in the object store).

MapFn = Callable[..., Sequence]


def local_map(fn: Callable, parts: Iterable, *shared) -> list:
    """map_fn that runs every step here, in order."""
    return [fn(part, *shared) for part in parts]


def _project(points: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """[n, D] -> [n, d] float32 C-contiguous (d = D when there is no projection)."""
    x = points if projection is None else points @ projection
    return np.ascontiguousarray(x, dtype=np.float32)


def _survivors(part, projection: np.ndarray | None, rate: float, *, points_of: Callable
               ) -> tuple[np.ndarray, int]:
    """Round 1 on one partition: greedy to ceil(rate * n_p) centres (all when fewer), from its first row.
    Returns (survivors [k_p, D] float32 in the original space, n_p)."""
    points = points_of(part)                                                  # [n_p, D]
    n = points.shape[0]
    if n == 0:
        return points, 0
    k_p = min(n, math.ceil(rate * n))
    if k_p == n:                                  # every row survives: no selection to make
        return points, n
    return points[greedy_kcenter(_project(points, projection), k_p, start=0)], n


def _candidates(part, projection: np.ndarray | None, centres: np.ndarray, rate: float, *,
                points_of: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Refinement candidates of one partition: greedy continued from its exact squared distances to
    `centres` ([k, d] projected), ceil(rate * n_p) picks. Returns (rows [c, D], their squared distance
    to `centres` [c])."""
    points = points_of(part)
    if points.shape[0] == 0:
        return points, np.zeros(0, dtype=np.float32)
    proj = _project(points, projection)                                        # [n_p, d]
    min_sq = nearest_sq_dist(proj, centres)                                    # [n_p]
    picks = greedy_kcenter(proj, min(proj.shape[0], math.ceil(rate * proj.shape[0])), min_sq_dist=min_sq)
    return points[picks], min_sq[picks]


def _farthest(part, bank: np.ndarray, *, points_of: Callable) -> float:
    """Largest cosine distance from a row of the partition to its nearest bank row (rows L2-normalised)."""
    points = points_of(part)
    if points.shape[0] == 0:
        return 0.0
    return float(MemoryBank.build(bank).nearest(points).max())


def identity(part):
    """points_of / block_of for partitions that already are their rows (picklable, unlike a lambda)."""
    return part


def composable_coreset(parts: Sequence, *, k: int | None = None, ratio: float = 0.1, n_estimate: int,
                       dim: int, projection_dim: int, oversample: float, refine: float, seed: int,
                       points_of: Callable = identity, map_fn: MapFn = local_map) -> Coreset:
    """Greedy k-center coreset of the rows of all `parts` without ever holding them in one place.

    parts: partitions that `points_of` turns into [n_p, dim] float32 L2-normalised rows.
    k: bank size, or None for ceil(ratio * N). n_estimate: expected N (e.g. images x patches), which sets
    round 1's share before N is known; the exact N is counted on the way.
    Selection runs in one Gaussian projection to `projection_dim` shared by every partition.

    Round 1 (one map over the partitions): greedy in each to oversample x its share of the k centres.
    Round 2 (here): greedy on the union of the survivors to (1 - refine) x k. A single partition is
    plain greedy to k. Refinement (a second map): each partition continues greedy from its exact
    distances to the round-2 centres and proposes oversample x its share of the remaining refine x k;
    greedy over those proposals picks them. It spends the last centres on the points the composition
    covers worst, which is where its radius exceeds plain greedy's. A last map measures the exact
    cover radius (cosine) against all rows.
    """
    if not parts:
        raise ValueError("no partitions: the coreset needs at least one training patch")
    if oversample < 1 or not 0 <= refine < 1:
        raise ValueError(f"oversample={oversample} must be >= 1 and refine={refine} in [0, 1)")
    rng = np.random.default_rng(seed)
    projection = random_projection(dim, projection_dim, seed=seed) if projection_dim < dim else None
    one = len(parts) == 1
    k_est = coreset_size(max(n_estimate, 1), ratio=ratio, size=k)
    rate = min(1.0, k_est / max(n_estimate, 1) * (1.0 if one else oversample))
    first = map_fn(partial(_survivors, points_of=points_of), parts, projection, rate)
    n = sum(c for _, c in first)
    if n == 0:
        raise ValueError("no training patches in any partition: every training image is unreadable or held out")
    survivors = np.concatenate([s for s, _ in first])                          # [S, D]
    del first
    k = coreset_size(n, ratio=ratio, size=k)
    if survivors.shape[0] == n == k:              # every row kept (ratio 1): each is its own centre
        return Coreset(features=survivors, cover_radius=0.0, n_points=n)
    k_extra = 0 if one else min(int(refine * k), k - 1)
    proj = _project(survivors, projection)                                     # [S, d]
    if survivors.shape[0] > k - k_extra:
        keep = greedy_kcenter(proj, k - k_extra, start=int(rng.integers(survivors.shape[0])))
        survivors, proj = survivors[keep], proj[keep]
    bank = survivors
    if k_extra and survivors.shape[0] < n:
        proposals = map_fn(partial(_candidates, points_of=points_of), parts, projection, proj,
                           oversample * k_extra / n)
        cand = np.concatenate([c for c, _ in proposals])                       # [C, D]
        cand_sq = np.concatenate([d for _, d in proposals])                    # [C]
        del proposals
        extra = greedy_kcenter(_project(cand, projection), min(k_extra, cand.shape[0]), min_sq_dist=cand_sq)
        bank = np.concatenate([survivors, cand[extra]])
    radius = max(map_fn(partial(_farthest, points_of=points_of), parts, bank))
    return Coreset(features=bank, cover_radius=radius, n_points=n)


def select_coreset(features: np.ndarray, *, k: int | None = None, ratio: float = 0.1, projection_dim: int,
                   seed: int, partition_size: int, oversample: float, refine: float,
                   map_fn: MapFn = local_map) -> Coreset:
    """composable_coreset of in-memory features [N, D] float32 L2-normalised, cut into contiguous
    partitions of `partition_size` rows (views, no copy)."""
    f = np.ascontiguousarray(features, dtype=np.float32)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got {f.shape}")
    if partition_size < 1:
        raise ValueError(f"partition_size={partition_size} must be >= 1")
    parts = [f[s:s + partition_size] for s in range(0, f.shape[0], partition_size)]
    return composable_coreset(parts, k=k, ratio=ratio, n_estimate=f.shape[0], dim=f.shape[1],
                              projection_dim=projection_dim, oversample=oversample, refine=refine,
                              seed=seed, map_fn=map_fn)


# ---- continuing a coreset from an existing bank (incremental update) ---------------------------------

@dataclass(frozen=True)
class Extension:
    """What continuing a coreset from existing centres adds (continue_coreset)."""
    features: np.ndarray    # [a, D] float32 added rows (original space, L2-normalised), in greedy order
                            # (in the partitions' order when every candidate is kept: no selection ran)
    n_points: int           # new rows looked at
    n_candidates: int       # of them farther than the stop radius from every existing centre
    cover_radius: float     # max over the new rows of the cosine distance to the nearest old or added centre


def _beyond(part, centres: np.ndarray, radius: float, rate: float | None, *,
            points_of: Callable) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Round 1 of a continuation on one partition. Its rows farther than `radius` (cosine) from every
    centre ([M, D]) are candidates; when there are more than ceil(rate * candidates) (rate None: no cap),
    greedy continued from the centres keeps that many. Returns (proposals [c, D], their squared distance
    to the centres [c], n_p, candidates before the cap)."""
    points = points_of(part)                                                   # [n_p, D]
    n = points.shape[0]
    if n == 0:
        return points, np.zeros(0, dtype=np.float32), 0, 0
    min_sq = 2.0 * MemoryBank.build(centres).nearest(points)                   # [n_p] ||x - c||^2 = 2 (1 - cos)
    far = min_sq > 2.0 * radius
    cand, min_sq = np.ascontiguousarray(points[far], dtype=np.float32), min_sq[far]
    cap = len(cand) if rate is None else min(len(cand), math.ceil(rate * len(cand)))
    if cap < len(cand):
        keep = greedy_kcenter(cand, cap, min_sq_dist=min_sq, until=2.0 * radius)
        cand, min_sq = cand[keep], min_sq[keep]
    return cand, min_sq, n, int(far.sum())


def continue_coreset(parts: Sequence, centres: np.ndarray, *, radius: float, ratio: float,
                     max_added: int | None = None, oversample: float, points_of: Callable = identity,
                     map_fn: MapFn = local_map) -> Extension:
    """Greedy k-center continued from existing `centres` ([M, D] float32 L2-normalised, a fitted bank)
    over the new rows of `parts` ([n_p, D] float32 L2-normalised through `points_of`).

    A new row is a candidate when its cosine distance to every centre exceeds `radius` (the stop radius
    the caller chooses; anomaly_core.update). Greedy then picks among the candidates, farthest from the
    centres and the picks so far first, until ceil(ratio x candidates) picks (a fit's density over the
    rows the bank does not cover; at most `max_added`, None: no further cap) or until every candidate
    lies within `radius` of a centre (for unit vectors ||x - c||^2 = 2 (1 - cos), so the stop is exact).
    Selection runs in the original space, not the fit's projection: exact distances make the stop exact.
    One partition: exactly that greedy. More: each partition first keeps at most oversample x ratio x its
    candidates by the same greedy (round 1 of composable_coreset), which is the one-pass greedy whenever
    no partition's share binds.
    A last map measures the new rows' exact cover radius against the extended bank; the old rows' radius
    cannot grow, since the bank only gains centres.
    """
    if not parts:
        raise ValueError("no partitions: the update needs at least one new image")
    if not 0 < ratio <= 1 or oversample < 1 or (max_added is not None and max_added < 0):
        raise ValueError(f"ratio={ratio} must be in (0, 1], oversample={oversample} >= 1 and "
                         f"max_added={max_added} >= 0 or None")
    rate = None if len(parts) == 1 else min(1.0, oversample * ratio)
    first = map_fn(partial(_beyond, points_of=points_of), parts, centres, radius, rate)
    n = sum(r[2] for r in first)
    if n == 0:
        raise ValueError("no new patches in any partition: every new image is unreadable or held out")
    cand = np.concatenate([r[0] for r in first])                               # [C', D]
    cand_sq = np.concatenate([r[1] for r in first])                            # [C']
    n_cand = sum(r[3] for r in first)
    del first
    budget = math.ceil(ratio * n_cand)
    budget = min(budget, len(cand), budget if max_added is None else max_added)
    if radius == 0 and budget == len(cand) == n_cand:   # every new row kept (a parent of ratio 1): no selection
        return Extension(features=cand, n_points=n, n_candidates=n_cand, cover_radius=0.0)
    picks = (greedy_kcenter(cand, budget, min_sq_dist=cand_sq, until=2.0 * radius)
             if budget else np.zeros(0, dtype=np.int64))
    added = cand[picks]
    bank = np.concatenate([centres, added]) if len(added) else centres
    radius_new = max(map_fn(partial(_farthest, points_of=points_of), parts, bank))
    return Extension(features=added, n_points=n, n_candidates=n_cand, cover_radius=radius_new)
