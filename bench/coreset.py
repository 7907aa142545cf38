"""Coreset selection: PatchCore's plain approximate greedy (the baseline) against ours.

    python bench/coreset.py --features /tmp/feats_mpdd.npz --sizes 100000,500000,1000000,2000000

Points are real DINOv2 patch features (bench/features.py), repeated with small Gaussian noise (sigma 0.01
per dimension before renormalising) to reach each size; every method selects in the same 128-d Gaussian
projection. For each size, one run prints:
- the baseline: PatchCore's reference loop (torch, one distance column per centre);
- ours, same algorithm: our greedy kernel started from the baseline's own state (its mean distance to 10
  random points), which must select exactly the same points (checked), so the radius is equal;
- ours, composable (anomaly_core.coreset.composable_coreset) with 1 worker (in-process) and 2 workers
  (Ray tasks), with 16,384-row partitions;
and the cover radii, exact, Euclidean in the projected space all methods select in.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anomaly_core.coreset import greedy_kcenter, nearest_sq_dist, random_projection, select_coreset


def _dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, d], [m, d] -> [N, m] Euclidean distances, as the reference computes them."""
    a2 = a.pow(2).sum(1, keepdim=True)
    b2 = b.pow(2).sum(1, keepdim=True)
    return (a2 - 2 * a @ b.T + b2.T).clamp(min=0).sqrt()


def patchcore_anchor(features: torch.Tensor, *, seed: int) -> torch.Tensor:
    """[N, 1]: the reference's starting state, the mean distance of each point to 10 random points."""
    starts = torch.randint(0, features.shape[0], (10,), generator=torch.Generator().manual_seed(seed))
    return _dists(features, features[starts]).mean(dim=-1, keepdim=True)


def patchcore_greedy(features: torch.Tensor, k: int, *, seed: int) -> np.ndarray:
    """ApproximateGreedyCoresetSampler._compute_greedy_coreset_indices of patchcore-inspection
    (amazon-science/patchcore-inspection, sampler.py), on already-projected features: 10 random starting
    points, then one full distance column per selected point, min-reduced."""
    anchor = patchcore_anchor(features, seed=seed)                               # [N, 1]
    chosen = []
    for _ in range(k):
        i = int(torch.argmax(anchor))
        chosen.append(i)
        col = _dists(features, features[i:i + 1])                                 # [N, 1]
        anchor = torch.min(torch.cat([anchor, col], dim=-1), dim=1).values.reshape(-1, 1)
    return np.array(chosen)


def cover_radius(points: np.ndarray, centres: np.ndarray) -> float:
    """Exact Euclidean cover radius of `centres` over `points` ([N, d], [k, d] float32)."""
    return float(np.sqrt(nearest_sq_dist(points, centres).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--sizes", default="100000,500000,1000000,2000000")
    ap.add_argument("--k", type=int, default=256,
                    help="coreset size, the same at every N so that the baseline (N x k) finishes")
    ap.add_argument("--partition", type=int, default=16384)
    ap.add_argument("--oversample", type=float, default=2.0)
    ap.add_argument("--refine", type=float, default=0.1)
    a = ap.parse_args()
    from jobs.runtime import ensure_ray, ray_map
    ensure_ray(None)

    f = np.load(a.features)
    real = np.concatenate([f["train"].reshape(-1, f["train"].shape[-1]), f["test"].reshape(-1, f["test"].shape[-1])])
    proj = random_projection(real.shape[1], 128, seed=0)                         # the one composable_coreset uses
    rng = np.random.default_rng(0)
    print(f"real vectors: {real.shape[0]}, k {a.k}, partition {a.partition}, oversample {a.oversample}, "
          f"refine {a.refine}")
    print("| N | k | baseline s | ours, same algorithm s | ours composable, 1 worker s | 2 workers s | "
          "speed-up (same / 1w / 2w) | radius baseline (= same algorithm) | composable |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(x) for x in a.sizes.split(",")):
        idx = rng.integers(0, real.shape[0], n)
        x = real[idx] + 0.01 * rng.standard_normal((n, real.shape[1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)                             # [N, 384] unit rows
        p = np.ascontiguousarray(x @ proj)                                        # [N, 128]
        k = a.k
        t = time.perf_counter()
        base = patchcore_greedy(torch.from_numpy(p), k, seed=0)
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        anchor = patchcore_anchor(torch.from_numpy(p), seed=0).numpy()[:, 0]
        same = greedy_kcenter(p, k, min_sq_dist=anchor ** 2)
        t_same = time.perf_counter() - t
        agree = np.mean(same == base)
        kw = dict(k=k, projection_dim=128, seed=0, partition_size=a.partition, oversample=a.oversample,
                  refine=a.refine)
        t = time.perf_counter()
        ours = select_coreset(x, **kw)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        ours2 = select_coreset(x, map_fn=ray_map, **kw)
        t_two = time.perf_counter() - t
        assert np.array_equal(ours.features, ours2.features)
        r_base, r_ours = cover_radius(p, p[base]), cover_radius(p, ours.features @ proj)
        print(f"| {n:,} | {k:,} | {t_base:.1f} | {t_same:.1f} | {t_one:.1f} | {t_two:.1f} | "
              f"{t_base / t_same:.1f}x / {t_base / t_one:.1f}x / {t_base / t_two:.1f}x | "
              f"{r_base:.4f}{'' if agree == 1 else f' (same algorithm: {agree:.0%} identical)'} | "
              f"{r_ours:.4f} |", flush=True)


if __name__ == "__main__":
    main()
