"""Few-shot bank augmentation: each good image also enters the bank turned and/or mirrored.

With 1-16 good images the bank lacks the poses a part takes on the line; AnomalyDINO (arXiv 2405.14529,
§3.3) adds rotated copies of the reference images. The symmetries of the square (multiples of 90 degrees,
mirror images) are exact on a square input: no interpolation, no corners from outside the frame. Parts
that appear at any angle need the angles in between too: "turns8" adds the diagonals (every 45 degrees),
interpolated bilinearly, the corners that come from outside the frame filled with the median colour of
the image's border (on the plain background these parts are shown on, that is more background; docs/
ablation.md#rotated-parts measures it). Choose the group the part allows: a part with a printed label must
not be mirrored ("rotations", "turns8"); a part that is always fixtured the same way gains nothing ("none").
Only bank images are augmented: held-out and scored images are not. Cross-fitted images enter the bank
and are augmented, but only the image itself is scored for the threshold (anomaly_core.fit).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# name -> the transforms as (degrees counter-clockwise, mirror left-right first); the first is the identity
AUGMENTATIONS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (180, True), (180, False)),      # identity, mirror, flip up-down, 180
    "rotations": ((0, False), (90, False), (180, False), (270, False)),
    "dihedral": tuple((d, m) for m in (False, True) for d in (0, 90, 180, 270)),
    "turns8": tuple((d, False) for d in range(0, 360, 45)),
}


def turn_images(images: np.ndarray, *, degrees: float, order: int = 1) -> np.ndarray:
    """[B, H, W, C] -> the same shape, each image turned counter-clockwise by `degrees` about its centre.
    Multiples of 90 on a square image are exact (np.rot90); other angles interpolate with spline `order`
    (1: bilinear) and fill the corners from outside the frame with the median colour of the image's border
    (order 0, for masks: with 0)."""
    b, h, w, c = images.shape
    if degrees % 90 == 0 and h == w:
        return np.rot90(images, k=int(degrees // 90) % 4, axes=(1, 2))
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)  # [B, 2H+2W, C]
    fill = np.median(border, axis=1) if order else np.zeros((b, c))                                   # [B, C]
    out = np.empty_like(images)
    for i in range(b):
        for ch in range(c):
            plane = ndimage.rotate(images[i, ..., ch].astype(np.float32), degrees, reshape=False, order=order,
                                   mode="constant", cval=float(fill[i, ch]))                          # [H, W]
            out[i, ..., ch] = plane.round().clip(0, 255) if images.dtype == np.uint8 else plane
    return out


def augment_images(images: np.ndarray, *, name: str) -> np.ndarray:
    """[B, S, S, C] -> [B * A, S, S, C], A = len(AUGMENTATIONS[name]); an image's copies are consecutive,
    the first is the image itself."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment={name!r} is unknown; choose one of {sorted(AUGMENTATIONS)}")
    ops = AUGMENTATIONS[name]
    if len(ops) == 1:
        return images
    out = [turn_images(images[:, :, ::-1] if mirror else images, degrees=d) for d, mirror in ops]
    return np.stack(out, axis=1).reshape(-1, *images.shape[1:])              # [B, A, S, S, C] -> [B*A, ...]
