"""Evaluation metrics with their standard definitions (numpy and scipy).

- image / pixel AUROC: area under the ROC curve, ties counted as one half (Mann-Whitney U).
- AUPRO: area under the per-region-overlap curve up to a false positive rate of 0.3, divided by 0.3
  (Bergmann et al., MVTec AD, IJCV 2021). Regions are 8-connected components of each ground-truth mask.
- F1-max: the best F1 over all thresholds on image scores (anomalib's F1Max).
- recall at a false-alarm rate: the share of anomalous images flagged by the lowest threshold that flags at
  most that share of the normal ones (the ROC curve read at that false positive rate). It uses the test
  labels, so it describes the scores, not a threshold a user would get; that one is calibrated on normal
  images only (anomaly_core.threshold).
- peak on defect: whether a map's strongest pixel lies on (or within a tolerance of) the image's defect,
  the pointing game of Zhang et al. (ECCV 2016, arXiv 1608.00507), which allows 15 px: what a user sees
  first in the heatmap, per defective image, whatever the image score.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if labels.all() or not labels.any():
        raise ValueError(f"AUROC needs both classes; got {int(labels.sum())} positives of {labels.size}")
    return labels, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve. labels: [N] bool (True = anomalous); scores: [N] higher = more anomalous."""
    labels, scores = _check_binary(labels, scores)
    ranks = rankdata(scores)                                          # ties get their average rank
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over thresholds "score >= t", t taken at every distinct score."""
    labels, scores = _check_binary(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)                                                 # [N] predicted positive = first i+1
    fp = np.cumsum(~y)
    last_of_tie = np.concatenate([s[1:] != s[:-1], [True]])           # thresholds at distinct scores
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(f1.max())


def recall_at_false_alarm_rate(labels: np.ndarray, scores: np.ndarray, rate: float) -> float:
    """labels: [N] bool (True = anomalous), scores: [N] -> the largest share of anomalous images flagged
    ("score >= t") by a threshold t that flags at most `rate` of the normal images."""
    labels, scores = _check_binary(labels, scores)
    normal = np.sort(scores[~labels])[::-1]                           # [n] descending
    allowed = int(np.floor(rate * normal.size + 1e-9))                # normal images that may be flagged
    # the lowest admissible t: just above the (allowed+1)-th highest normal score
    t = np.nextafter(normal[allowed], np.inf) if allowed < normal.size else -np.inf
    return float((scores[labels] >= t).mean())


def peak_on_defect(masks: np.ndarray, maps: np.ndarray, *, tolerance: int) -> np.ndarray:
    """masks: [N, H, W] bool ground truth, each with a defect pixel; maps: [N, H, W] float -> [N] bool: the
    map's strongest pixel (the first in row-major order on ties) lies within `tolerance` pixels of a defect
    pixel, in the chessboard distance (a (2 * tolerance + 1)-pixel square around it holds one)."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be [N, H, W]")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 pixels")
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} of {len(masks)} masks have no defect pixel (e.g. index "
                         f"{int(np.argmax(empty))}); pass the defective images only")
    n, _, w = maps.shape
    y, x = np.divmod(maps.reshape(n, -1).argmax(axis=1), w)                       # [N], [N]
    near = ndimage.maximum_filter(masks, size=(1, 2 * tolerance + 1, 2 * tolerance + 1), mode="constant")
    return near[np.arange(n), y, x]


def aupro(masks: np.ndarray, maps: np.ndarray, *, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`.

    masks: [N, H, W] bool ground truth; maps: [N, H, W] float anomaly scores.
    PRO(t) is the mean, over all connected defect regions of all images, of the fraction of the region's
    pixels with score >= t; FPR(t) is the fraction of normal pixels (all images) with score >= t.
    Computed exactly at every distinct score by one sort: each defect pixel adds 1/(|region| * n_regions)
    to PRO and each normal pixel adds 1/n_normal to FPR as the threshold falls past it.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be [N, H, W]")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit={fpr_limit} must be in (0, 1]")
    weights = np.zeros(masks.shape, dtype=np.float64)
    region_sizes = []
    labelled = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    eight = np.ones((3, 3), dtype=bool)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=eight)
        labelled[i] = np.where(lab > 0, lab + offset, 0)
        region_sizes.extend(np.bincount(lab.ravel())[1:].tolist())
        offset += n
    n_regions = offset
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError(f"AUPRO needs defect regions and normal pixels; got {n_regions} regions, "
                         f"{n_normal} normal pixels")
    sizes = np.asarray([0] + region_sizes, dtype=np.float64)
    defect = labelled > 0
    weights[defect] = 1.0 / (sizes[labelled[defect]] * n_regions)
    flat_scores = maps.ravel()
    order = np.argsort(-flat_scores, kind="mergesort")
    s = flat_scores[order]
    pro = np.cumsum(weights.ravel()[order])                           # [P] PRO at threshold s[i]
    fpr = np.cumsum((~masks).ravel()[order]) / n_normal               # [P] FPR at threshold s[i]
    last_of_tie = np.concatenate([s[1:] != s[:-1], [True]])
    fpr = np.concatenate([[0.0], fpr[last_of_tie]])
    pro = np.concatenate([[0.0], pro[last_of_tie]])
    # cut the curve at fpr_limit, interpolating the PRO value there
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < fpr.size:
        f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        p_cut = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
        fpr = np.concatenate([fpr[:k], [fpr_limit]])
        pro = np.concatenate([pro[:k], [p_cut]])
    return float(np.trapezoid(pro, fpr) / fpr_limit)
