"""Patch descriptors from backbone tokens: neighbourhood aggregation and position encoding.

Both act on the [B, G*G, D] grid of one image size, identically at fit and at score time, so the bank
and the queries live in the same space. Pure numpy; shapes in each docstring.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Width added by add_position: (cos, sin) of the row and of the column angle.
POSITION_DIM = 4


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def aggregate_neighbours(features: np.ndarray, *, grid: int, size: int) -> np.ndarray:
    """PatchCore's local neighbourhood aggregation (Roth et al., CVPR 2022, §3.1: a size x size average
    around each patch, borders by reflection), then L2-normalised again.

    features: [B, G*G, D] float32 L2-normalised rows. Returns the same shape. size=1 returns the input.
    A patch then describes its neighbourhood: small defects that change a patch's context score higher,
    and single-patch noise is averaged out (sharper, less speckled maps).
    """
    if size == 1:
        return features
    b, p, d = features.shape
    assert p == grid * grid, (p, grid)
    f = features.reshape(b, grid, grid, d)                                    # [B, G, G, D]
    f = ndimage.uniform_filter(f, size=(1, size, size, 1), mode="reflect")   # [B, G, G, D]
    return _unit(f.reshape(b, p, d)).astype(np.float32)


def position_code(grid: int) -> np.ndarray:
    """[G*G, 4] float32, rows of norm 1: (cos, sin) of pi * row / G and of pi * column / G, over sqrt(2).

    Two codes' inner product is (cos(pi * d_row / G) + cos(pi * d_col / G)) / 2: 1 at the same place,
    falling monotonically with the offset, -1 at opposite corners.
    """
    t = np.pi * (np.arange(grid) + 0.5) / grid                                # [G] angles in (0, pi)
    rows, cols = np.meshgrid(t, t, indexing="ij")                             # [G, G]
    code = np.stack([np.cos(rows), np.sin(rows), np.cos(cols), np.sin(cols)], -1) / np.sqrt(2.0)
    return code.reshape(grid * grid, POSITION_DIM).astype(np.float32)


def add_position(features: np.ndarray, *, grid: int, weight: float) -> np.ndarray:
    """DinoPatch-style position-aware descriptor: [B, G*G, D] unit rows -> [B, G*G, D + 4] unit rows.

    Appends sqrt(weight) x position_code and renormalises, so the bank's cosine distance becomes
        d = (d_feature + weight * d_position) / (1 + weight),  d_position = 1 - code . code'
    one search combining "looks like a normal patch" with "normal patches look like this *here*": a part
    that is whole but moved or missing matches bank patches only at other places, and pays for it.
    weight=0 returns the input.
    """
    if weight == 0:
        return features
    b, p, d = features.shape
    code = np.broadcast_to(np.sqrt(weight) * position_code(grid), (b, p, POSITION_DIM))  # [B, P, 4]
    return (np.concatenate([features, code], axis=-1) / np.sqrt(1.0 + weight)).astype(np.float32)
