"""Verdict threshold calibrated on held-out normal images only; no defect label is ever used."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float        # image score at and above which the verdict is "anomalous"
    normal_mean: float      # mean held-out normal score: maps to normalised score 0
    normal_std: float
    normal_max: float
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(normal_scores: np.ndarray, *, sigmas: float) -> Calibration:
    """normal_scores: [N] image scores of held-out good images, N >= 2.

    threshold = mean + sigmas * std (sample std). Never below the largest held-out score, so no held-out
    good image is flagged.
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"calibration needs at least 2 held-out normal scores, got {s.size}; "
                         f"add good images or raise holdout_fraction")
    mean, std = float(s.mean()), float(s.std(ddof=1))
    threshold = max(mean + sigmas * std, float(s.max()))
    if threshold <= mean:                      # all held-out scores equal: keep the map well defined
        threshold = mean + max(abs(mean), 1.0) * 1e-6
    return Calibration(threshold=threshold, normal_mean=mean, normal_std=std,
                       normal_max=float(s.max()), n_images=int(s.size))


def normalise(scores: np.ndarray, cal: Calibration) -> np.ndarray:
    """Score on a model-independent scale: 0 = mean normal image, 1 = the threshold. [N] -> [N] float32."""
    s = np.asarray(scores, dtype=np.float64)
    return ((s - cal.normal_mean) / (cal.threshold - cal.normal_mean)).astype(np.float32)
