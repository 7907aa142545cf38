"""Pose alignment for parts that are not fixtured: each image is turned and shifted into a canonical pose
before its features are computed, so that position-aware scoring (patches.add_position) compares a patch
with bank patches at the same place *on the part*, not in the frame. DinoPatch aligns by PCA of edges for
the same reason.

The pose is read from the image's strongest edges (the top 10% of gradient magnitude, weighted by it):
their centroid is moved to the image centre and their principal axis turned to horizontal. The axis
leaves a 180-degree ambiguity, settled by making the edges' third moment along it negative. Anomaly
maps computed in the aligned frame are warped back to the image's own frame.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Fraction of pixels, by gradient magnitude, that count as edges.
EDGE_FRACTION = 0.1


def edge_pose(gray: np.ndarray) -> np.ndarray:
    """gray: [S, S] float image -> pose [3] float64: (row, column) of the edge centroid in pixels and the
    angle in radians, counter-clockwise from the column axis, of the edges' principal axis."""
    g = ndimage.gaussian_filter(np.asarray(gray, dtype=np.float64), 1.0)
    w = np.hypot(*np.gradient(g))                                            # [S, S] edge strength
    w = np.where(w >= np.quantile(w, 1 - EDGE_FRACTION), w, 0.0)
    total = w.sum()
    if total == 0:                                                           # a flat image: no pose
        c = (gray.shape[0] - 1) / 2
        return np.array([c, c, 0.0])
    rows, cols = np.mgrid[:gray.shape[0], :gray.shape[1]].astype(np.float64)
    cy, cx = (w * rows).sum() / total, (w * cols).sum() / total
    dy, dx = -(rows - cy), cols - cx                                         # y up, so angles are ccw
    cxx, cyy, cxy = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
    theta = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
    u = dx * np.cos(theta) + dy * np.sin(theta)                              # coordinate along the axis
    if (w * u ** 3).sum() > 0:
        theta += np.pi
    return np.array([cy, cx, theta])


def _matrix(theta: float) -> np.ndarray:
    """[2, 2]: aligned (row, col) offsets -> image (row, col) offsets, for a part turned by theta."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def align_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images: [B, S, S, 3] uint8 -> (aligned [B, S, S, 3] uint8, poses [B, 3] from edge_pose).
    Pixels that come from outside the image repeat its nearest edge."""
    s = images.shape[1]
    centre = np.full(2, (s - 1) / 2)
    out = np.empty_like(images)
    poses = np.stack([edge_pose(im.mean(axis=-1)) for im in images])         # [B, 3]
    for i, (im, (cy, cx, theta)) in enumerate(zip(images, poses, strict=True)):
        m = _matrix(theta)
        offset = np.array([cy, cx]) - m @ centre
        for ch in range(im.shape[-1]):
            out[i, ..., ch] = ndimage.affine_transform(im[..., ch].astype(np.float32), m, offset=offset,
                                                       order=1, mode="nearest").round().clip(0, 255)
    return out, poses


def resample_images(images: np.ndarray, *, seed: int) -> np.ndarray:
    """images: [B, S, S, 3] uint8 -> the same images shifted by a random sub-pixel offset (each axis uniform
    in [0, 1) px, drawn with `seed`) with align_images' bilinear interpolation and border rule: the
    smoothing an alignment's turn brings, without the turn (the alignment trial's control arm)."""
    offsets = np.random.default_rng(seed).random((len(images), 2))                 # [B, 2] (row, col) px
    out = np.empty_like(images)
    for i, (im, shift) in enumerate(zip(images, offsets, strict=True)):
        for ch in range(im.shape[-1]):
            out[i, ..., ch] = ndimage.shift(im[..., ch].astype(np.float32), shift, order=1,
                                            mode="nearest").round().clip(0, 255)
    return out


def unalign_maps(maps: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """maps: [B, S, S] float32 in the aligned frame, poses [B, 3] -> [B, S, S] in each image's own frame."""
    s = maps.shape[1]
    centre = np.full(2, (s - 1) / 2)
    out = np.empty_like(maps)
    for i, (amap, (cy, cx, theta)) in enumerate(zip(maps, poses, strict=True)):
        inv = _matrix(theta).T                                               # rotations: inverse = transpose
        out[i] = ndimage.affine_transform(amap, inv, offset=centre - inv @ np.array([cy, cx]), order=1,
                                          mode="nearest")
    return out
