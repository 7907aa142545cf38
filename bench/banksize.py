"""Scoring speed against bank size: the same images scored against banks of 10k, 100k and 1M vectors.

    python bench/banksize.py --data DIR [--sizes 10000 100000 1000000] [--index flat hnsw] [--images 8]
                             [--device cpu|cuda] [--exact-above R]

The banks are real patch features (defaults: 392 px, 28 x 28 patches, blocks 5 + 7, 768-d) of the good
training images of DIR (MVTec layout; default: generated brick parts), repeated with Gaussian noise
(sigma 0.05 per dimension / sqrt(D), renormalised) up to each size. The queries are the test images of
DIR. For each size and index kind, in one process, with the bank placed where the scorer would place it
(MemoryBank.place: FAISS on the CPU, the GPU search on CUDA):
  - bare forward: the backbone over every tile, stitched (FeatureExtractor.tokens), the reference;
  - search: the bank search of every patch of an image (MemoryBank.nearest);
  - score step: forward + descriptors + search + image score + map + peak, what a score actor does per
    image besides decoding and building rows.
Each row times its own forward right before the other two, so that the three share the machine's load.
Reported as images/s and as ratios to the bare forward: the search's cost (search time / forward time)
and the score step's share of the forward's speed (forward time / step time).
--exact-above R: the bound a fitted model gives its bank (its cover radius; 0.1467 for the 200-image fit
of bench/throughput.py at the defaults): an approximate bank's rows beyond it are searched again over
every stored vector, as a scorer does (MemoryBank exact_above). Default: none, the index's search alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig  # noqa: E402
from anomaly_core.decode import decode_batch  # noqa: E402
from anomaly_core.features import FeatureExtractor  # noqa: E402
from anomaly_core.images import IMAGE_EXTENSIONS  # noqa: E402
from anomaly_core.index import MemoryBank  # noqa: E402
from anomaly_core.model import score_features  # noqa: E402
from anomaly_core.scoring import image_maps, peak_locations  # noqa: E402
from bench.features import median_seconds  # noqa: E402
from bench.gpu import png_parts, raw_batch  # noqa: E402


def image_bytes(data: Path | None, split: str, n: int, *, size: int, seed: int) -> list[bytes]:
    """n image files of DIR/train/good (split "train") or DIR/test (split "test"), sorted, spread over
    the defect types; generated brick parts without DIR."""
    if data is None:
        return png_parts(n, size=size, seed=seed, defects=split == "test")
    root = data / ("train/good" if split == "train" else "test")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    pick = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    return [files[i].read_bytes() for i in pick]


def repeat_with_noise(base: np.ndarray, n: int, *, seed: int, noise: float = 0.05) -> np.ndarray:
    """[m, D] unit rows -> [n, D] float32 unit rows: base rows cycled, each copy after the first moved by
    Gaussian noise of `noise` / sqrt(D) per dimension (about `noise` in norm) and renormalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for s in range(0, n, len(base)):
        part = base[:min(len(base), n - s)]
        if s:
            part = part + rng.standard_normal(part.shape, dtype=np.float32) * (noise / np.sqrt(base.shape[1]))
        out[s:s + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def seconds(fn, *, repeat: int) -> float:
    """Median wall time of fn() over `repeat` runs (bench.features.median_seconds), warmed up by one run
    only when repeat > 1: a single timed pass of a 1M bank is all this machine affords."""
    return median_seconds(fn, warm_up=fn if repeat > 1 else (lambda: None), reps=repeat)


def score_step(ex: FeatureExtractor, bank: MemoryBank, px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a score actor computes for images [B, S, S, 3]: descriptors, search, image scores, maps on the
    device and their peaks (the peaks are what comes back)."""
    cfg, device = ex.config, ex.backbone.device
    f, g = ex.describe(px)
    r = score_features(f, bank, config=cfg, foreground=g, maps=False)
    maps = image_maps(torch.from_numpy(r.distances).to(device), out_size=cfg.input_size, sigma=cfg.map_sigma)
    return peak_locations(maps, widths=np.full(len(px), 1000), heights=np.full(len(px), 1000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="MVTec-layout folder (default: generated parts)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--index", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--train", type=int, default=16, help="good images whose patches seed the banks")
    ap.add_argument("--images", type=int, default=8, help="query images scored per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--exact-above", type=float, default=None, help="cosine distance beyond which an approximate "
                    "bank's rows are searched exhaustively (a model's cover radius; default: never)")
    a = ap.parse_args()
    cfg = ModelConfig(top_fraction=SMOOTH_TOP_FRACTION)   # the image score is not what is timed
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    ex = FeatureExtractor(config=cfg, device=a.device)
    device = ex.backbone.device

    def pixels(split: str, n: int, seed: int) -> np.ndarray:
        return decode_batch(raw_batch(image_bytes(a.data, split, n, size=cfg.input_size, seed=seed)),
                            input_size=cfg.input_size)["pixels"]
    base = ex.describe(pixels("train", a.train, 1))[0].reshape(-1, cfg.feature_dim)      # [train * P, D]
    px = pixels("test", a.images, 2)                                                     # [Q, S, S, 3]
    n = len(px)
    feats = ex.describe(px)[0]                                                           # [Q, P, D]
    ex.tokens(px[:1])                                                                   # warm-up
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} CPU threads'}) "
          f"input {cfg.input_size} px, grid {cfg.grid_size}x{cfg.grid_size}, D={cfg.feature_dim}; banks from "
          f"{len(base)} patches of {a.train} images; {n} query images; each row times its own forward")
    print("| bank vectors | index | search path | build s | forward img/s | search img/s | search cost vs forward | "
          "score step img/s | score step vs forward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    q = feats.reshape(-1, cfg.feature_dim)                                              # [Q * P, D]
    for size, kind in itertools.product(a.sizes, a.index):
        vectors = repeat_with_noise(base, size, seed=size)
        t = time.perf_counter()
        bank = MemoryBank.build(vectors, kind=kind, seed=0, exact_above=a.exact_above).place(device)
        build = time.perf_counter() - t
        # the three timings of a row back to back, so that they share the machine's load
        t_fwd = seconds(partial(ex.tokens, px), repeat=a.repeat) / n
        t_search = seconds(partial(bank.nearest, q), repeat=a.repeat) / n
        t_step = seconds(partial(score_step, ex, bank, px), repeat=a.repeat) / n
        print(f"| {size:,} | {kind} | {bank.search_path} | {build:.1f} | {1 / t_fwd:.2f} | {1 / t_search:.2f} | "
              f"{t_search / t_fwd:.2f} | {1 / t_step:.2f} | {t_fwd / t_step:.2f} |", flush=True)

if __name__ == "__main__":
    main()
