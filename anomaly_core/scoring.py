"""From patch distances to what a user sees: anomaly maps, image scores, compact heatmaps."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage

REDUCTIONS = ("topk_mean", "max", "smoothed_max")


def patch_distances(features: np.ndarray, bank, *, foreground: np.ndarray | None = None) -> np.ndarray:
    """Descriptors [B, P, D] float32 unit rows -> [B, P] float32 cosine distance of each patch to its
    nearest bank entry (`bank.nearest`, anomaly_core.index.MemoryBank); patches outside `foreground`
    ([B, P] bool, None: everywhere) score 0."""
    b, p, d = features.shape
    dist = bank.nearest(features.reshape(-1, d)).reshape(b, p)                    # [B, P]
    return dist if foreground is None else np.where(foreground, dist, np.float32(0))


def image_scores(grids: np.ndarray, *, reduction: str, top_fraction: float, sigma: float) -> np.ndarray:
    """Image anomaly score from its patch grid.

    grids: [B, G, G] float32 nearest-neighbour distances. Returns [B] float32.
    "topk_mean": mean of the ceil(top_fraction * G^2) largest (AnomalyDINO, arXiv 2405.14529 §3);
    "max": the largest (PatchCore without its reweighting);
    "smoothed_max": the largest after a Gaussian of `sigma` patches over the grid (edges repeated): a
    defect of one to three patches keeps most of its peak, a single noisy patch loses part of it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is unknown; choose one of {list(REDUCTIONS)}")
    g = np.asarray(grids, dtype=np.float32)
    if g.ndim != 3:
        raise ValueError(f"patch grids must be [B, G, G], got shape {g.shape}")
    if len(g) == 0:                                                    # a batch with no readable image
        return np.zeros(0, dtype=np.float32)
    d = g.reshape(len(g), -1)                                          # [B, G*G]
    if reduction == "max":
        return d.max(axis=1)
    if reduction == "smoothed_max":
        return np.array([smooth_map(x, sigma=sigma).max() for x in g], dtype=np.float32)
    k = max(1, math.ceil(top_fraction * d.shape[1]))
    top = np.partition(d, d.shape[1] - k, axis=1)[:, -k:]             # [B, k]
    return top.mean(axis=1)


def anomaly_maps(patch_distances: np.ndarray, *, out_size: int, sigma: float) -> np.ndarray:
    """Patch grid -> pixel map: bilinear upsampling then Gaussian smoothing (PatchCore, AnomalyDINO).

    patch_distances: [B, h, w] float32. Returns [B, out_size, out_size] float32 in the same units.
    """
    d = np.asarray(patch_distances, dtype=np.float32)
    if d.ndim != 3:
        raise ValueError(f"patch_distances must be [B, h, w], got shape {d.shape}")
    out = np.empty((d.shape[0], out_size, out_size), dtype=np.float32)
    for i, grid in enumerate(d):
        # PIL's bilinear resize samples pixel centres (align_corners=False), like torch's interpolate.
        up = np.asarray(Image.fromarray(grid, mode="F").resize((out_size, out_size), Image.BILINEAR))
        out[i] = smooth_map(up, sigma=sigma)
    return out


def smooth_map(amap: np.ndarray, *, sigma: float) -> np.ndarray:
    """[S, S] float32 map -> the same map smoothed by a Gaussian of `sigma` pixels (0: unchanged)."""
    return ndimage.gaussian_filter(amap, sigma=sigma, mode="nearest") if sigma > 0 else amap


def peak_location(amap: np.ndarray, *, width: int, height: int) -> tuple[int, int]:
    """(x, y) in original image pixels of the strongest point of a square map [S, S]."""
    s = amap.shape[0]
    iy, ix = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return int((ix + 0.5) * width / s), int((iy + 0.5) * height / s)


def encode_heatmap(amap: np.ndarray) -> tuple[bytes, float, float]:
    """[H, W] float map -> (8-bit grayscale PNG, vmin, vmax). decode_heatmap inverts it to within
    (vmax - vmin) / 510 per pixel."""
    amap = np.asarray(amap, dtype=np.float32)
    vmin, vmax = float(amap.min()), float(amap.max())
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    q = np.round((amap - vmin) * scale).astype(np.uint8)
    buf = io.BytesIO()
    # zlib level 1: the maps are smooth, so it compresses nearly as well as the default 6 (392 px maps:
    # +20% bytes) at a fifth of the CPU time, which on a GPU worker is the score step's largest cost
    # (docs/benchmarks.md, "GPU").
    Image.fromarray(q, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), vmin, vmax


def decode_heatmap(png: bytes, vmin: float, vmax: float) -> np.ndarray:
    """Inverse of encode_heatmap: PNG bytes and value range -> [H, W] float32 anomaly scores."""
    q = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return (vmin + q * ((vmax - vmin) / 255.0)).astype(np.float32)
