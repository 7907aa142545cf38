"""Real DINOv2 patch features of the shared data sets (cached as .npz for the coreset and index benchmarks),
and the timing of FeatureExtractor.tokens that the ablation and tiling benchmarks share.

    python bench/features.py ../shared/data/mpdd_metal_plate --out /tmp/feats_mpdd.npz
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anomaly_core.config import ModelConfig
from anomaly_core.features import FeatureExtractor
from anomaly_core.images import IMAGE_EXTENSIONS, decode_image, resize_square


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def read_pixels(paths: list[Path], size: int) -> np.ndarray:
    """[N, S, S, 3] uint8: the image files resized to `size` as the jobs decode them."""
    return np.stack([resize_square(decode_image(p.read_bytes()), size) for p in paths])


def cache_name(cfg: ModelConfig) -> str:
    """What a cached feature file depends on, for its name: input size, tiles, blocks and the global block
    (e.g. s224_t2_b5+7, s224_t2_b5+7_g4)."""
    glob = f"_g{cfg.global_block}" if cfg.global_block is not None else ""
    return f"s{cfg.image_size}_t{cfg.tiles}_b{'+'.join(map(str, cfg.blocks))}{glob}"


def extract(paths: list[Path], cfg: ModelConfig, *, batch: int = 16) -> np.ndarray:
    """[N, P, D] float32 L2-normalised patch tokens of the images, with the config's backbone and tiles."""
    ex = FeatureExtractor(config=cfg)
    out = []
    for i in range(0, len(paths), batch):
        out.append(ex.tokens(read_pixels(paths[i:i + batch], cfg.input_size)))
    return np.concatenate(out)


def median_seconds(fn: Callable[[], object], *, warm_up: Callable[[], object], reps: int = 3) -> float:
    """Median wall-clock seconds of fn() over `reps` runs, after one call of warm_up()."""
    warm_up()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def tokens_seconds(cfg: ModelConfig, px: np.ndarray) -> float:
    """Seconds per image of FeatureExtractor.tokens (backbone over every tile, stitched) for `cfg` on the
    batch `px` [B, S, S, 3], S = cfg.input_size: median of 3 runs after a warm-up on one image."""
    ex = FeatureExtractor(config=cfg, device="cpu")
    return median_seconds(lambda: ex.tokens(px), warm_up=lambda: ex.tokens(px[:1])) / len(px)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cfg = ModelConfig()
    train = list_images(a.dataset / "train" / "good")
    test = list_images(a.dataset / "test")
    np.savez(a.out, train=extract(train, cfg), test=extract(test, cfg),
             labels=np.array([p.parent.name != "good" for p in test]),
             test_paths=np.array([str(p) for p in test]))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
