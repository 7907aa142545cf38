"""Distributed (partitioned) coreset against one partition: cover radius and image AUROC, same features.

    python bench/features.py ../shared/data/magnetic_tile --out /tmp/feats_mt.npz
    python bench/partitions.py --features /tmp/feats_mt.npz --partition 16384

Bank: the default 10% coreset of all training patches (default config), selected once with every patch in
one partition (plain greedy) and once cut into partitions of --partition patches (the path the fit job
runs over Ray blocks; here in-process, which selects the same points). Test images scored as the jobs
do (mean of the top 1% patch distances).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig
from anomaly_core.coreset import select_coreset
from anomaly_core.index import MemoryBank
from anomaly_core.metrics import auroc
from anomaly_core.scoring import image_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--partition", type=int, default=ModelConfig().coreset_partition)
    a = ap.parse_args()
    f = np.load(a.features)
    cfg = ModelConfig(top_fraction=SMOOTH_TOP_FRACTION)     # the top-1% mean of the tables in docs/benchmarks.md
    train = f["train"].reshape(-1, f["train"].shape[-1])                          # [N, D]
    test, labels = f["test"], f["labels"]                                          # [M, P, D], [M]
    grid = int(round(test.shape[1] ** 0.5))                                        # the features' patch grid
    print(f"{train.shape[0]} training patches, {len(labels)} test images")
    print("| partitions | s | bank | cover radius | image AUROC |")
    print("| --- | --- | --- | --- | --- |")
    out = {}
    for name, size in (("one", train.shape[0]), (f"{-(-train.shape[0] // a.partition)} of {a.partition}", a.partition)):
        t = time.perf_counter()
        core = select_coreset(train, ratio=cfg.coreset_ratio, projection_dim=cfg.projection_dim, seed=cfg.seed,
                              partition_size=size, oversample=cfg.coreset_oversample, refine=cfg.coreset_refine)
        took = time.perf_counter() - t
        d = MemoryBank.build(core.features).nearest(test.reshape(-1, test.shape[-1]))
        grids = d.reshape(test.shape[0], grid, grid)                    # [M, G, G]
        auc = auroc(labels, image_scores(grids, **cfg.score_options))
        out[name] = (core.cover_radius, auc)
        print(f"| {name} | {took:.1f} | {core.features.shape[0]} | {core.cover_radius:.4f} | {auc:.4f} |", flush=True)
    (r1, a1), (r2, a2) = out.values()
    print(f"radius ratio {r2 / r1:.3f}, image AUROC difference {a2 - a1:+.4f}")


if __name__ == "__main__":
    main()
