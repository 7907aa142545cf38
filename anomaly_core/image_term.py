"""An image-level term beside the patch score, for defects that change a part's shape (config.global_block).

PatchCore scores each patch on its own, so a bent or cut part whose patches each look normal scores as
normal. One descriptor per image sees the whole: the mean of the image's unit tokens of one transformer
block, normalised (the global descriptor of DN2, Bergman et al. 2020, arXiv 2002.10445, on patch tokens).
Its anomaly is the cosine distance to the nearest bank image's descriptor: one vector per bank image
(augmented copies included), so the search is exact and small.

The two scores live in different units, so each is standardised by the calibration images (those the bank
did not see), as a z-score of its logarithm (both are positive and right-skewed), and the larger z-score
counts: an image is as anomalous as its more anomalous view. That z-score is mapped back into patch-score
units (the patch score whose z-score it is), so the image score stays a positive number in the units of a
model without the term (where the patch term is the larger, it is the patch score itself), and the
threshold's fitted log-normal tail still applies. The threshold is set on the calibration images' combined
scores, so the false-alarm rate holds for the combined score.

Measured (docs/ablation.md, "An image-level term"): on mvtec3d_cable_gland block 4 lifts the image AUROC
of bent glands from 0.83 to 0.95; on a texture (magnetic_tile) whole tiles differ more than their defects
move the mean, and the term costs image AUROC, hence an option for parts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from anomaly_core.index import MemoryBank

# Floor of the distances and scores before their logarithm: an image identical to a bank image has
# distance 0 (cosine distances of float32 unit rows are resolved to about 1e-7).
LOG_FLOOR = 1e-6
# Floor of a standard deviation of logarithms: calibration images that all score alike would otherwise
# make the z-score infinite.
STD_FLOOR = 1e-3


def image_descriptors(tokens: np.ndarray) -> np.ndarray:
    """Unit tokens [B, P, D] of one block -> [B, D] float32 image descriptors: their mean, L2-normalised."""
    mean = np.asarray(tokens, dtype=np.float32).mean(axis=1)                         # [B, D]
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def image_bank(vectors: np.ndarray) -> MemoryBank:
    """[M, D] bank image descriptors (unit rows) -> their exact FAISS index (MemoryBank, flat)."""
    if len(vectors) == 0:
        raise ValueError("the image bank is empty: a model with an image term needs at least one bank image")
    return MemoryBank.build(np.ascontiguousarray(vectors, dtype=np.float32))


def image_distances(descriptors: np.ndarray, vectors: np.ndarray | MemoryBank) -> np.ndarray:
    """[B, D] image descriptors against [M, D] bank image descriptors (unit rows, or their image_bank)
    -> [B] float32 cosine distance to the nearest, by FAISS's exact search."""
    bank = vectors if isinstance(vectors, MemoryBank) else image_bank(vectors)
    if len(descriptors) == 0:
        return np.zeros(0, dtype=np.float32)
    return bank.nearest(np.ascontiguousarray(descriptors, dtype=np.float32))


def _log_stats(values: np.ndarray) -> tuple[float, float]:
    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), LOG_FLOOR))
    return float(logs.mean()), max(float(logs.std(ddof=1)) if logs.size > 1 else 0.0, STD_FLOOR)


@dataclass(frozen=True)
class ImageTerm:
    """The image term of a fitted model: the bank images' descriptors and both scores' standardisation.

    vectors: [M, D] float32 unit descriptors of the bank images (image_descriptors). The four floats are
    the mean and standard deviation of the logarithm of the calibration images' patch scores and image
    distances (`of`)."""
    vectors: np.ndarray
    patch_log_mean: float
    patch_log_std: float
    image_log_mean: float
    image_log_std: float

    @classmethod
    def of(cls, vectors: np.ndarray, *, patch_scores: np.ndarray, distances: np.ndarray) -> ImageTerm:
        """Standardised by calibration images' patch scores [C] and image distances [C] (C >= 2)."""
        if len(patch_scores) != len(distances) or len(patch_scores) < 2:
            raise ValueError(f"the image term is standardised by at least 2 calibration images with both scores; "
                             f"got {len(patch_scores)} patch scores and {len(distances)} image distances")
        (pm, ps), (im, is_) = _log_stats(patch_scores), _log_stats(distances)
        return cls(vectors=np.ascontiguousarray(vectors, dtype=np.float32), patch_log_mean=pm, patch_log_std=ps,
                   image_log_mean=im, image_log_std=is_)

    @functools.cached_property
    def index(self) -> MemoryBank:
        """The vectors' exact index, built once (a scorer searches it every batch)."""
        return image_bank(self.vectors)

    def in_score_units(self, distances: np.ndarray) -> np.ndarray:
        """Image distances [B] -> [B] float32: the patch score with the same z-score (what `combine` takes
        the larger of; the output's image_term_score)."""
        zi = (np.log(np.maximum(np.asarray(distances, dtype=np.float64), LOG_FLOOR)) - self.image_log_mean
              ) / self.image_log_std
        return np.exp(self.patch_log_mean + self.patch_log_std * zi).astype(np.float32)

    def combine(self, patch_scores: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """Patch scores [B] and image distances [B] -> [B] float32 image scores: the larger of the two
        z-scores, in patch-score units (the larger of the patch score and in_score_units)."""
        return np.maximum(np.asarray(patch_scores, dtype=np.float32), self.in_score_units(distances))

    def standardisation(self) -> dict:
        """The four floats, as the manifest stores them (the vectors are a file of the model)."""
        return {"patch_log_mean": self.patch_log_mean, "patch_log_std": self.patch_log_std,
                "image_log_mean": self.image_log_mean, "image_log_std": self.image_log_std}
