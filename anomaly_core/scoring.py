"""From patch distances to what a user sees: anomaly maps, image scores, stored heatmaps.

Maps are computed with torch where their input is (numpy in: on the CPU, numpy out; a tensor in: on its
device, a tensor out), so a GPU scorer upsamples and smooths on the GPU and only per-image outputs
return to the host. The stored heatmap is the patch-distance grid itself (float16), and `decode_heatmap`
rebuilds the map from it with the same function the scorer used (docs/schema.md).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from anomaly_core.align import unalign_maps

REDUCTIONS = ("topk_mean", "max", "smoothed_max")


def patch_distances(features: np.ndarray, bank, *, foreground: np.ndarray | None = None) -> np.ndarray:
    """Descriptors [B, P, D] float32 unit rows -> [B, P] float32 cosine distance of each patch to its
    nearest bank entry (`bank.nearest`, anomaly_core.index.MemoryBank); patches outside `foreground`
    ([B, P] bool, None: everywhere) score 0 and are not searched (the search is most of the step's cost
    after the forward, and background is often most of an object's frame)."""
    b, p, d = features.shape
    rows = features.reshape(-1, d)                                                  # [B*P, D]
    if foreground is None:
        return bank.nearest(rows).reshape(b, p)
    keep = np.asarray(foreground, dtype=bool).reshape(-1)                           # [B*P]
    dist = np.zeros(b * p, dtype=np.float32)
    if keep.any():
        dist[keep] = bank.nearest(rows[keep])
    return dist.reshape(b, p)                                                       # [B, P]


def image_scores(grids: np.ndarray | torch.Tensor, *, reduction: str, top_fraction: float,
                 sigma: float) -> np.ndarray | torch.Tensor:
    """Image anomaly score from its patch grid.

    grids: [B, G, G] float nearest-neighbour distances. Returns [B] float32, a numpy array for a numpy
    input, else a tensor on the input's device.
    "topk_mean": mean of the ceil(top_fraction * G^2) largest (AnomalyDINO, arXiv 2405.14529 §3);
    "max": the largest (PatchCore without its reweighting);
    "smoothed_max": the largest after a Gaussian of `sigma` patches over the grid (edges repeated): a
    defect of one to three patches keeps most of its peak, a single noisy patch loses part of it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is unknown; choose one of {list(REDUCTIONS)}")
    g = _tensor(grids)
    if g.ndim != 3:
        raise ValueError(f"patch grids must be [B, G, G], got shape {tuple(g.shape)}")
    smoothing = smoothing_matrix(g.shape[1], float(sigma)).float().to(g.device)          # [G, G]
    with torch.inference_mode():
        return _like(reduce_grids(g, reduction=reduction, top_fraction=top_fraction, smoothing=smoothing), grids)


def reduce_grids(grids: torch.Tensor, *, reduction: str, top_fraction: float,
                 smoothing: torch.Tensor) -> torch.Tensor:
    """image_scores' reductions in torch ops that also trace to ONNX (anomaly_core.export): grids
    [B, G, G] float32 -> [B] float32; smoothing [G, G] float32 = smoothing_matrix(G, sigma), used by
    "smoothed_max" only. The caller checks the reduction's name."""
    b, g = grids.shape[0], grids.shape[1]
    flat = grids.reshape(b, g * g)                                                   # [B, G*G]
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "smoothed_max":
        return (smoothing @ grids @ smoothing.T).reshape(b, g * g).amax(dim=1)
    k = max(1, math.ceil(top_fraction * g * g))
    return flat.topk(k, dim=1).values.mean(dim=1)                                   # [B]


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor of x: numpy arrays on the CPU, tensors where they are."""
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _like(t: torch.Tensor, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """t in x's kind: a numpy array when x was one, else the tensor."""
    return t if isinstance(x, torch.Tensor) else t.numpy()


def gaussian_kernel(sigma: float, *, truncate: float = 4.0) -> torch.Tensor:
    """[2r + 1] float64 normalised Gaussian, r = int(truncate * sigma + 0.5): scipy.ndimage's kernel."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


@functools.lru_cache(maxsize=32)
def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] float64 M such that M @ v is v smoothed by a Gaussian of `sigma` samples, edges
    repeated (scipy.ndimage.gaussian_filter1d, mode="nearest"); the identity for sigma 0."""
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    rows = torch.arange(size).repeat_interleave(len(k))                              # [size * taps]
    cols = (torch.arange(size)[:, None] + torch.arange(-r, r + 1)).clamp(0, size - 1).reshape(-1)
    return torch.zeros(size, size, dtype=torch.float64).index_put_((rows, cols), k.repeat(size), accumulate=True)


@functools.lru_cache(maxsize=32)
def upsampling_matrix(size: int, grid: int) -> torch.Tensor:
    """[size, grid] float64 U such that U @ v is v linearly resampled to `size` samples at pixel centres
    (torch's interpolate with align_corners=False, PIL's bilinear resize when enlarging)."""
    eye = torch.eye(grid, dtype=torch.float64)[None]                                 # [1, grid, grid]
    return torch.nn.functional.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=32)
def _map_operator(size: int, grid: int, sigma: float, device: str) -> torch.Tensor:
    """[size, grid] float32 smoothing @ upsampling, on `device`."""
    return (smoothing_matrix(size, sigma) @ upsampling_matrix(size, grid)).float().to(device)


@torch.inference_mode()
def smooth_map(maps: np.ndarray | torch.Tensor, *, sigma: float) -> np.ndarray | torch.Tensor:
    """[..., H, W] float maps -> the same smoothed by a Gaussian of `sigma` pixels (0: unchanged), edges
    repeated (scipy.ndimage.gaussian_filter with mode="nearest"), where the maps are."""
    if sigma <= 0:
        return maps
    t = _tensor(maps)
    h, w = t.shape[-2:]
    rows = smoothing_matrix(h, sigma).float().to(t.device)
    cols = smoothing_matrix(w, sigma).float().to(t.device)
    return _like(rows @ t @ cols.T, maps)


@torch.inference_mode()
def anomaly_maps(patch_distances: np.ndarray | torch.Tensor, *, out_size: int,
                 sigma: float) -> np.ndarray | torch.Tensor:
    """Patch grid -> pixel map: bilinear upsampling (pixel centres) then Gaussian smoothing with edges
    repeated (PatchCore, AnomalyDINO), where the grid is.

    Both steps are linear and separable, so the map is A @ grid @ A^T with A = smoothing @ upsampling
    ([out_size, G]): two small matrix products per image instead of a convolution over the large map.
    patch_distances: [B, G, G] float. Returns [B, out_size, out_size] float32 in the same units, a numpy
    array for a numpy input, else a tensor on the input's device.
    """
    d = _tensor(patch_distances)
    if d.ndim != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"patch_distances must be [B, G, G], got shape {tuple(d.shape)}")
    a = _map_operator(out_size, d.shape[1], float(sigma), str(d.device))            # [S, G]
    return _like(a @ d @ a.T, patch_distances)


def image_maps(grids: np.ndarray | torch.Tensor, *, out_size: int, sigma: float,
               poses: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
    """What the scorer and decode_heatmap both call: anomaly_maps of the grids [B, G, G], turned back to
    each image's own frame when the model aligns (poses [B, 3] of anomaly_core.align; that warp runs on
    the host). Same kind and device as `grids`."""
    maps = anomaly_maps(grids, out_size=out_size, sigma=sigma)
    if poses is None:
        return maps
    host = maps.cpu().numpy() if isinstance(maps, torch.Tensor) else maps
    back = unalign_maps(host, np.asarray(poses, dtype=np.float64))
    return torch.from_numpy(back).to(maps.device) if isinstance(maps, torch.Tensor) else back


def peak_locations(maps: np.ndarray | torch.Tensor, *, widths: np.ndarray,
                   heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x [B], y [B]) int32 in original image pixels of the strongest point of each square map
    [B, S, S] (argmax where the maps are; only the B indices come back)."""
    s = maps.shape[-1]
    flat = maps.reshape(len(maps), -1)
    i = (flat.argmax(dim=1).cpu().numpy() if isinstance(flat, torch.Tensor) else flat.argmax(axis=1))
    iy, ix = np.divmod(i, s)
    x = (ix + 0.5) * np.asarray(widths, dtype=np.float64) / s
    y = (iy + 0.5) * np.asarray(heights, dtype=np.float64) / s
    return x.astype(np.int32), y.astype(np.int32)


# The stored grid: float16, little-endian, row-major (docs/schema.md).
GRID_DTYPE = np.dtype("<f2")


def encode_grid(grid: np.ndarray) -> bytes:
    """[G, G] float patch distances -> G * G float16 values, little-endian, row-major."""
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"a heatmap grid must be [G, G], got shape {g.shape}")
    return g.astype(GRID_DTYPE).tobytes()


def decode_grid(data: bytes) -> np.ndarray:
    """Inverse of encode_grid: -> [G, G] float32 (G from the length)."""
    v = np.frombuffer(data, dtype=GRID_DTYPE)
    g = math.isqrt(len(v))
    if g * g != len(v):
        raise ValueError(f"a heatmap grid holds G * G float16 values; got {len(data)} bytes")
    return v.astype(np.float32).reshape(g, g)


def decode_heatmap(row: Mapping) -> np.ndarray:
    """An output row (a mapping of its columns; docs/schema.md) -> its anomaly map [S, S] float32 in
    the image's frame, rebuilt from `heatmap_grid` as the scorer built it (image_maps, with the row's
    `heatmap_size`, `heatmap_sigma` and `heatmap_pose`). Rows without a grid (schema version 1, or
    scored with the PNG option) are read from `heatmap_png` within (max - min) / 510 per pixel."""
    if row.get("heatmap_grid") is not None:
        pose = row.get("heatmap_pose")
        return image_maps(decode_grid(row["heatmap_grid"])[None], out_size=int(row["heatmap_size"]),
                          sigma=float(row["heatmap_sigma"]),
                          poses=None if pose is None else np.asarray(pose)[None])[0]
    if row.get("heatmap_png") is not None:
        return decode_heatmap_png(row["heatmap_png"], float(row["heatmap_min"]), float(row["heatmap_max"]))
    raise ValueError(f"row {row.get('uri', '')!r} has no heatmap (status {row.get('status', '?')!r}): an "
                     f"image that could not be scored has none; for other rows, re-score the images with "
                     f"`anomaly score ARCHIVE MODEL OUT --replace`")


def encode_heatmap_png(amap: np.ndarray) -> tuple[bytes, float, float]:
    """[H, W] float map -> (8-bit grayscale PNG, vmin, vmax). decode_heatmap_png inverts it to within
    (vmax - vmin) / 510 per pixel."""
    amap = np.asarray(amap, dtype=np.float32)
    vmin, vmax = float(amap.min()), float(amap.max())
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    q = np.round((amap - vmin) * scale).astype(np.uint8)
    buf = io.BytesIO()
    # zlib level 1: the maps are smooth, so it compresses nearly as well as the default 6 (392 px maps:
    # +20% bytes) at a fifth of the CPU time (docs/benchmarks.md, "GPU").
    Image.fromarray(q, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), vmin, vmax


def decode_heatmap_png(png: bytes, vmin: float, vmax: float) -> np.ndarray:
    """Inverse of encode_heatmap_png: PNG bytes and value range -> [H, W] float32 anomaly scores."""
    q = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return (vmin + q * ((vmax - vmin) / 255.0)).astype(np.float32)
