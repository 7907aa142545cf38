"""Verdict threshold in the user's units: a target false-alarm rate on normal parts, set from the scores of
normal images the bank did not see (held out, or cross-fitted; anomaly_core.fit). No defect label is used.

With n calibration scores of exchangeable normal images, the threshold t = the k-th smallest score, k =
ceil((n + 1)(1 - alpha)), flags a new normal image with probability (n + 1 - k) / (n + 1) <= alpha, whatever
the score distribution (a split-conformal quantile; Vovk et al. 2005, Angelopoulos & Bates 2021 §1). That
needs k <= n, i.e. n >= 1/alpha - 1 images: 19 for 5%, 99 for 1%. With fewer, the threshold comes from a
log-normal fitted to the scores (its prediction bound; stated as such in the manifest), never below their
maximum, and the rate it achieves is reported with the bound the n images can actually support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# How the threshold was set: a distribution-free quantile, or a fitted tail where there are too few images.
# "mean_3sigma" names the rule of models fitted before thresholds were set in false-alarm units.
METHODS = ("quantile", "lognormal_tail", "mean_3sigma")


@dataclass(frozen=True)
class Calibration:
    threshold: float                    # image score at and above which the verdict is "anomalous"
    normal_mean: float                  # mean calibration score: maps to normalised score 0
    normal_std: float
    normal_max: float
    n_images: int                       # calibration scores the threshold rests on
    method: str = "mean_3sigma"         # one of METHODS
    false_alarm_rate: float | None = None       # the target rate on normal parts
    achieved_rate: float | None = None          # fraction of the calibration scores >= threshold
    expected_rate: float | None = None          # distribution-free bound on the rate for a new normal part
    expected_rate_90: float | None = None       # 90% upper confidence bound on that rate, at this n

    def to_dict(self) -> dict:
        return asdict(self)


def quantile_images(false_alarm_rate: float, *, at_or_above: int = 1) -> int:
    """Calibration images a distribution-free quantile at this rate needs: the smallest n with
    ceil((n + 1)(1 - alpha)) <= n (19 for 0.05, 99 for 0.01). at_or_above: how many of the n scores must lie
    at or above the threshold, floor((n + 1) alpha) (1: the threshold may be their maximum; 2: 39 at 0.05)."""
    return math.ceil(at_or_above / false_alarm_rate - 1 - 1e-9)


def rate_bound(scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(bound on P(new normal score >= threshold), 90% upper confidence bound on it) from n exchangeable
    calibration scores: with k of them <= threshold, the new score exceeds the k-th smallest with
    probability (n + 1 - k) / (n + 1); conditional on the calibration set that rate is Beta(n + 1 - k, k)."""
    n, k = scores.size, int((scores <= threshold).sum())
    if k == 0:
        return 1.0, 1.0
    return (n + 1 - k) / (n + 1), float(stats.beta.ppf(0.9, n + 1 - k, k))


def calibrate(normal_scores: np.ndarray, *, false_alarm_rate: float) -> Calibration:
    """normal_scores: [N] image scores of normal images the bank did not see, N >= 2 -> the threshold that
    flags `false_alarm_rate` of normal parts (module docstring: quantile where N allows, else fitted tail)."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    if s.ndim != 1 or n < 2:
        raise ValueError(f"calibration needs at least 2 normal scores, got {n}; add good images")
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate={false_alarm_rate} must be in (0, 1), e.g. 0.01 for 1 in 100 parts")
    if n >= quantile_images(false_alarm_rate):
        method = "quantile"
        threshold = float(s[math.ceil((n + 1) * (1 - false_alarm_rate)) - 1])
    else:
        method = "lognormal_tail"
        # the (1 - rate) prediction bound of one new log-normal score given n: Student t, not the normal
        # quantile, so the n scores' own uncertainty widens it (exact coverage when log-normal)
        logs = np.log(np.maximum(s, 1e-12))
        t = stats.t.ppf(1 - false_alarm_rate, n - 1) * math.sqrt(1 + 1 / n)
        threshold = max(float(np.exp(logs.mean() + t * logs.std(ddof=1))), float(s[-1]))
    mean = float(s.mean())
    if threshold <= mean:                      # all scores equal: keep the normalised score well defined
        threshold = mean + max(abs(mean), 1.0) * 1e-6
    expected, upper = rate_bound(s, threshold)
    return Calibration(threshold=threshold, normal_mean=mean, normal_std=float(s.std(ddof=1)),
                       normal_max=float(s[-1]), n_images=int(n), method=method, false_alarm_rate=false_alarm_rate,
                       achieved_rate=float((s >= threshold).mean()), expected_rate=expected,
                       expected_rate_90=upper)


def normalise(scores: np.ndarray, cal: Calibration) -> np.ndarray:
    """Score on a model-independent scale: 0 = mean normal image, 1 = the threshold. [N] -> [N] float32."""
    s = np.asarray(scores, dtype=np.float64)
    return ((s - cal.normal_mean) / (cal.threshold - cal.normal_mean)).astype(np.float32)
