"""Cost in AUROC and gain in speed of the approximate memory-bank indexes against exact search.

    python bench/features.py ../shared/data/magnetic_tile --out /tmp/feats_mt.npz
    python bench/index.py --features /tmp/feats_mt.npz [--ef-search 16 32 64 128] [--nprobe 8]

Same coreset bank (default config: 10% greedy, composable) for every kind; image AUROC from the test
features; search speed in query patches per second over all test patches, single process. HNSW is
measured at each --ef-search, alone and with the exhaustive re-search of the rows beyond the coreset's
cover radius (MemoryBank exact_above): "rows searched twice" is the share of query patches whose first
distance exceeded that bound, "patches off exact" the share whose distance differs from flat's (by more
than float rounding), "largest error" the most any patch's distance exceeds the exact one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig
from anomaly_core.coreset import coreset_size, select_coreset
from anomaly_core.index import INDEX_KINDS, MemoryBank
from anomaly_core.metrics import auroc
from anomaly_core.scoring import image_scores

ROUNDING = 1e-5          # distances of the same pair computed by two FAISS code paths differ by about this


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    a = ap.parse_args()
    f = np.load(a.features)
    cfg = ModelConfig(top_fraction=SMOOTH_TOP_FRACTION)     # the top-1% mean of the tables in docs/benchmarks.md
    train = f["train"].reshape(-1, f["train"].shape[-1]).astype(np.float32)
    test, labels = f["test"].astype(np.float32), f["labels"]                     # [M, P, D], [M]
    grid = int(round(test.shape[1] ** 0.5))                                        # the features' patch grid
    k = coreset_size(train.shape[0], ratio=cfg.coreset_ratio, size=None)
    core = select_coreset(train, k=k, projection_dim=cfg.projection_dim, seed=0, partition_size=cfg.coreset_partition,
                          oversample=cfg.coreset_oversample, refine=cfg.coreset_refine)
    queries = test.reshape(-1, test.shape[-1])                                     # [M * P, D]
    bound = core.cover_radius
    print(f"bank {k} of {train.shape[0]} patches, cover radius {bound:.4f}; {queries.shape[0]} query patches; "
          f"{len(labels)} test images")
    print("| index | ef_search / nprobe | exhaustive above | build s | query patches/s | speed vs flat | "
          "rows searched twice | patches off exact | largest error | image AUROC | AUROC vs flat |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    banks = {}
    for kind in INDEX_KINDS:
        t = time.perf_counter()
        bank = MemoryBank.build(core.features, kind=kind)
        banks[kind] = (bank, time.perf_counter() - t)
    runs = [("flat", "", None)]
    runs += [("hnsw", ef, r) for ef in a.ef_search for r in (None, bound)]
    runs += [(kind, a.nprobe, r) for kind in ("ivf", "ivfpq") for r in (None, bound)]
    exact = ref_speed = ref_auc = None
    first = {}                                                 # (kind, knob) -> distances without the bound
    for kind, knob, r in runs:
        built, build_s = banks[kind]
        bank = MemoryBank(built.shards, exact_above=r,
                          **({"ef_search": knob} if kind == "hnsw" else {"nprobe": knob} if kind != "flat" else {}))
        t = time.perf_counter()
        d = bank.nearest(queries)                                                  # [M * P]
        speed = queries.shape[0] / (time.perf_counter() - t)
        if exact is None:
            exact, ref_speed = d, speed
        twice = "" if r is None else f"{(first[kind, knob] > r).mean():.2%}"
        first.setdefault((kind, knob), d)
        auc = auroc(labels, image_scores(d.reshape(test.shape[0], grid, grid), **cfg.score_options))
        ref_auc = auc if ref_auc is None else ref_auc
        print(f"| {kind} | {knob} | {'' if r is None else f'{r:.4f}'} | {build_s:.1f} | {speed:,.0f} | "
              f"{speed / ref_speed:.2f}x | {twice} | {(d - exact > ROUNDING).mean():.3%} | {(d - exact).max():.4f} | "
              f"{auc:.4f} | {auc - ref_auc:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
