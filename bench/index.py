"""Cost in AUROC and gain in speed of the approximate memory-bank indexes against exact search.

    python bench/features.py ../shared/data/magnetic_tile --out /tmp/feats_mt.npz
    python bench/index.py --features /tmp/feats_mt.npz

Same coreset bank (default config: 10% greedy, composable) for every kind; image AUROC from the test
features; search speed in query patches per second over all test patches, single process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from anomaly_core.config import ModelConfig
from anomaly_core.coreset import coreset_size, select_coreset
from anomaly_core.index import INDEX_KINDS, MemoryBank
from anomaly_core.metrics import auroc
from anomaly_core.scoring import image_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--nprobe", type=int, default=8)
    a = ap.parse_args()
    f = np.load(a.features)
    cfg = ModelConfig()
    train = f["train"].reshape(-1, f["train"].shape[-1])
    test, labels = f["test"], f["labels"]                                          # [M, P, D], [M]
    grid = int(round(test.shape[1] ** 0.5))                                        # the features' patch grid
    k = coreset_size(train.shape[0], ratio=cfg.coreset_ratio, size=None)
    core = select_coreset(train, k=k, projection_dim=cfg.projection_dim, seed=0, partition_size=cfg.coreset_partition,
                          oversample=cfg.coreset_oversample, refine=cfg.coreset_refine)
    bank_feats = core.features
    queries = test.reshape(-1, test.shape[-1])
    print(f"bank {k} of {train.shape[0]} patches; {queries.shape[0]} query patches; {len(labels)} test images")
    print("| index | build s | query patches/s | speed vs flat | image AUROC | AUROC vs flat |")
    print("| --- | --- | --- | --- | --- | --- |")
    ref_speed = ref_auc = None
    for kind in INDEX_KINDS:
        t = time.perf_counter()
        bank = MemoryBank.build(bank_feats, kind=kind, nprobe=a.nprobe)
        build = time.perf_counter() - t
        t = time.perf_counter()
        d = bank.nearest(queries).reshape(test.shape[0], grid, grid)    # [M, G, G]
        speed = queries.shape[0] / (time.perf_counter() - t)
        auc = auroc(labels, image_scores(d, **cfg.score_options))
        ref_speed, ref_auc = ref_speed or speed, ref_auc if ref_auc is not None else auc
        print(f"| {kind} | {build:.1f} | {speed:,.0f} | {speed / ref_speed:.1f}x | {auc:.4f} | {auc - ref_auc:+.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
