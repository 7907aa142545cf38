import numpy as np
import pytest

from anomaly_core import metrics


def brute_auroc(labels, scores):
    """Mann-Whitney: the fraction of (anomalous, normal) pairs ordered correctly, a tie counting one half."""
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


def reference_aupro(masks, maps, limit):
    """AUPRO as Bergmann et al. define it (MVTec AD, IJCV 2021, section 4.2), one threshold at a time: the
    regions are the 8-connected components of each ground-truth mask; at threshold t, PRO is the mean over
    all regions of the fraction of the region scoring >= t, FPR the fraction of normal pixels scoring >= t;
    the curve is integrated over FPR in [0, limit], cut at the limit by linear interpolation, and divided
    by the limit. Shares no code with metrics.aupro, which sweeps every threshold in one sort."""
    from scipy import ndimage
    regions = []
    for m, a in zip(masks, maps, strict=True):
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


@pytest.fixture
def defects():
    """[4, 16, 16] ground truth with six regions of 1 to 24 pixels: two in one image, two touching only
    at a corner (one region under 8-connectivity), one image without a defect."""
    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 10:12, 7:11] = True                                   # two regions in one image
    masks[1, 5:11, 1:5] = True
    masks[1, 12, 12] = True                                        # a single pixel
    masks[2, 3:5, 3:5] = True
    masks[2, 5:7, 5:7] = True                                      # touches the square above at a corner
    masks[2, 13, 0:3] = True
    return masks                                                   # masks[3]: a normal image


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_the_published_definition_threshold_by_threshold(defects, rng, limit):
    maps = rng.random(defects.shape) + defects * 0.4               # overlapping classes: PRO rises gradually
    assert metrics.aupro(defects, maps, fpr_limit=limit) == pytest.approx(reference_aupro(defects, maps, limit))


def test_aupro_counts_tied_scores_at_one_threshold(defects, rng):
    maps = np.round(rng.random(defects.shape) + defects * 0.4, 1)  # few distinct scores, large ties
    assert metrics.aupro(defects, maps) == pytest.approx(reference_aupro(defects, maps, 0.3))


def test_aupro_weighs_small_regions_like_large_ones():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :5, :5] = True                                        # 25 px region, found
    masks[0, 8, 8] = True                                          # 1 px region, missed
    maps = masks.astype(float) * 2
    maps[0, 8, 8] = -1.0                                           # below every normal pixel
    # PRO is 0.5 at every useful threshold (one region of two), though 25 of 26 defect pixels are found
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)


def test_recall_at_a_false_alarm_rate_reads_the_roc_curve():
    from anomaly_core.metrics import recall_at_false_alarm_rate
    normal = np.arange(100) / 100.0                                    # 0.00 .. 0.99
    defect = np.array([0.985, 0.975, 0.5, 2.0])
    y = np.r_[np.zeros(100, bool), np.ones(4, bool)]
    s = np.r_[normal, defect]
    assert recall_at_false_alarm_rate(y, s, 0.0) == 0.25               # only 2.0 beats every normal image
    assert recall_at_false_alarm_rate(y, s, 0.01) == 0.5               # 1 normal may pass: t > 0.98
    assert recall_at_false_alarm_rate(y, s, 0.02) == 0.75              # t > 0.97
    assert recall_at_false_alarm_rate(y, s, 0.5) == 1.0                # t > 0.49


def brute_peak_on_defect(masks, maps, tolerance):
    """Each map's argmax against every defect pixel: the smallest chessboard distance within tolerance."""
    out = []
    for m, a in zip(masks, maps, strict=True):
        y, x = np.unravel_index(np.argmax(a), a.shape)
        dy, dx = np.nonzero(m)
        out.append(np.max(np.abs(np.stack([dy - y, dx - x])), axis=0).min() <= tolerance)
    return np.array(out)


@pytest.mark.parametrize("tolerance", [0, 1, 3])
def test_peak_on_defect_matches_the_distance_to_the_nearest_defect_pixel(rng, tolerance):
    masks = np.zeros((40, 16, 16), dtype=bool)
    maps = rng.random((40, 16, 16))
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):        # one defect of 1-2 px a side, and
        y, x = rng.integers(0, 9, size=2)
        m[y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = True
        a[y + i % 6, x + (i // 6) % 6] = 2.0                          # the peak 0-5 px from its corner
    got = metrics.peak_on_defect(masks, maps, tolerance=tolerance)
    np.testing.assert_array_equal(got, brute_peak_on_defect(masks, maps, tolerance))
    assert got.any() and not got.all()


def test_peak_on_defect_needs_a_defect_in_every_mask():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="1 of 2 masks have no defect pixel"):
        metrics.peak_on_defect(masks, np.zeros((2, 4, 4)), tolerance=1)
