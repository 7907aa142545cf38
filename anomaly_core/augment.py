"""Few-shot bank augmentation: each good image also enters the bank rotated and/or flipped.

With 1-16 good images the bank lacks the poses a part takes on the line; AnomalyDINO (arXiv 2405.14529,
§3.3) adds rotated copies of the reference images. We use the eight symmetries of the square (multiples of
90 degrees, mirror images): they are exact on a square input, with no interpolation and no empty corners
that would themselves look anomalous. Choose the group the part allows: a part with a printed label must
not be mirrored ("rotations"); a part that is always fixtured the same way gains nothing ("none").
Only bank images are augmented: held-out and scored images are not. Cross-fitted images enter the bank
and are augmented, but only the image itself is scored for the threshold (anomaly_core.fit).
"""

from __future__ import annotations

import numpy as np

# name -> the transforms as (quarter turns counter-clockwise, mirror left-right first)
AUGMENTATIONS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),          # identity, mirror, flip up-down, 180
    "rotations": ((0, False), (1, False), (2, False), (3, False)),
    "dihedral": tuple((q, m) for m in (False, True) for q in range(4)),
}


def augment_images(images: np.ndarray, *, name: str) -> np.ndarray:
    """[B, S, S, C] -> [B * A, S, S, C], A = len(AUGMENTATIONS[name]); an image's copies are consecutive,
    the first is the image itself."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment={name!r} is unknown; choose one of {sorted(AUGMENTATIONS)}")
    ops = AUGMENTATIONS[name]
    if len(ops) == 1:
        return images
    out = [np.rot90(images[:, :, ::-1] if mirror else images, k=q, axes=(1, 2)) for q, mirror in ops]
    return np.stack(out, axis=1).reshape(-1, *images.shape[1:])              # [B, A, S, S, C] -> [B*A, ...]
