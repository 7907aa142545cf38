"""Coreset selection: PatchCore's plain approximate greedy (the baseline) against ours.

    python bench/coreset.py --features /tmp/feats_mpdd.npz --sizes 100000,500000,1000000,2000000

Points are real DINOv2 patch features (bench/features.py), repeated with small Gaussian noise (sigma 0.01
per dimension before renormalising) to reach each size, then projected to 128-d as both methods do.
For each size, one run prints: the baseline's time, ours with 1 and 2 workers (Ray tasks), and both cover
radii measured exactly (Euclidean, in the projected space both methods select in).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from anomaly_core.coreset import composable_greedy, greedy_kcenter, random_projection


def patchcore_greedy(features: torch.Tensor, k: int, *, seed: int) -> np.ndarray:
    """ApproximateGreedyCoresetSampler._compute_greedy_coreset_indices of patchcore-inspection
    (amazon-science/patchcore-inspection, sampler.py), on already-projected features: 10 random starting
    points, then one full distance column per selected point, min-reduced."""
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    starts = torch.randint(0, n, (10,), generator=gen)

    def dists(a, b):                                       # [N, d], [m, d] -> [N, m] Euclidean
        a2 = a.pow(2).sum(1, keepdim=True)
        b2 = b.pow(2).sum(1, keepdim=True)
        return (a2 - 2 * a @ b.T + b2.T).clamp(min=0).sqrt()

    anchor = dists(features, features[starts]).mean(dim=-1, keepdim=True)       # [N, 1]
    chosen = []
    for _ in range(k):
        i = int(torch.argmax(anchor))
        chosen.append(i)
        col = dists(features, features[i:i + 1])                                 # [N, 1]
        anchor = torch.min(torch.cat([anchor, col], dim=-1), dim=1).values.reshape(-1, 1)
    return np.array(chosen)


def cover_radius(points: np.ndarray, centres: np.ndarray) -> float:
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(centres))
    worst = 0.0
    for s in range(0, points.shape[0], 1 << 17):
        d, _ = index.search(points[s:s + (1 << 17)], 1)
        worst = max(worst, float(d.max()))
    return worst ** 0.5


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
    import ray
    ray.init(num_cpus=2, include_dashboard=False)
    remote = None

    def ray_map(fn, items):
        nonlocal remote
        remote = remote or ray.remote(num_cpus=1)(fn)
        return ray.get([remote.remote(item) for item in items])

    f = np.load(a.features)
    real = np.concatenate([f["train"].reshape(-1, f["train"].shape[-1]), f["test"].reshape(-1, f["test"].shape[-1])])
    proj = random_projection(real.shape[1], 128, seed=0)
    rng = np.random.default_rng(0)
    print(f"real vectors: {real.shape[0]}, k {a.k}, partition {a.partition}, oversample {a.oversample}, "
          f"refine {a.refine}")
    print("| N | k | baseline s | ours, one partition s | ours composable, 1 worker s | 2 workers s | "
          "speed-up (one partition / 1w / 2w) | radius baseline | one partition | composable |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(x) for x in a.sizes.split(",")):
        idx = rng.integers(0, real.shape[0], n)
        x = real[idx] + 0.01 * rng.standard_normal((n, real.shape[1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        p = np.ascontiguousarray(x @ proj)                                        # [N, 128]
        del x
        k = a.k
        t = time.perf_counter()
        plain = greedy_kcenter(p, k, start=0)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        base = patchcore_greedy(torch.from_numpy(p), k, seed=0)
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        ours = composable_greedy(p, k, partition_size=a.partition, oversample=a.oversample, seed=0, refine=a.refine)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        ours2 = composable_greedy(p, k, partition_size=a.partition, oversample=a.oversample, seed=0,
                                  refine=a.refine, map_fn=ray_map)
        t_two = time.perf_counter() - t
        assert np.array_equal(ours, ours2)
        r_base, r_plain, r_ours = (cover_radius(p, p[i]) for i in (base, plain, ours))
        print(f"| {n:,} | {k:,} | {t_base:.1f} | {t_plain:.1f} | {t_one:.1f} | {t_two:.1f} | "
              f"{t_base / t_plain:.1f}x / {t_base / t_one:.1f}x / {t_base / t_two:.1f}x | "
              f"{r_base:.4f} | {r_plain:.4f} | {r_ours:.4f} |", flush=True)


if __name__ == "__main__":
    main()
