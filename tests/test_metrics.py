import numpy as np
import pytest

from anomaly_core import metrics


def brute_auroc(labels, scores):
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_auroc_matches_pairwise_count_with_ties(rng):
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + labels * 0.3, 1)          # rounding creates many ties
    assert metrics.auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))


def test_auroc_perfect_and_inverted():
    labels = np.array([0, 0, 1, 1], bool)
    assert metrics.auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc(np.ones(3, bool), np.arange(3.0))


def test_f1_max_matches_threshold_sweep(rng):
    labels = rng.random(100) < 0.4
    scores = np.round(rng.random(100) + labels * 0.5, 2)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = (pred & labels).sum()
        if tp:
            p, r = tp / pred.sum(), tp / labels.sum()
            best = max(best, 2 * p * r / (p + r))
    assert metrics.f1_max(labels, scores) == pytest.approx(best)


def brute_aupro(masks, maps, limit):
    from scipy import ndimage
    regions = []
    for m, a in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == i] for i in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append((normal >= t).mean())
        pros.append(np.mean([(r >= t).mean() for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    f, p = list(fprs[keep]), list(pros[keep])
    k = keep.sum()
    if k < fprs.size:                                              # interpolate at the limit
        f.append(limit)
        p.append(pros[k - 1] + (pros[k] - pros[k - 1]) * (limit - fprs[k - 1]) / (fprs[k] - fprs[k - 1]))
    return np.trapezoid(p, f) / limit


def test_aupro_matches_threshold_sweep(rng):
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:10, 7:11] = True                                    # two regions in one image
    masks[1, 5:9, 1:3] = True
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 2)
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(brute_aupro(masks, maps, 0.3))


def test_aupro_weighs_small_regions_like_large_ones():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :5, :5] = True                                        # 25 px region, found
    masks[0, 8, 8] = True                                          # 1 px region, missed
    maps = masks.astype(float) * 2
    maps[0, 8, 8] = -1.0                                           # below every normal pixel
    # PRO is 0.5 at every useful threshold (one region of two), though 25 of 26 defect pixels are found
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)
