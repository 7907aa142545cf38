"""Thresholds in false-alarm units, from normal scores only."""

import numpy as np
import pytest
from scipy import stats

from anomaly_core.threshold import calibrate, normalise, quantile_images, rate_bound


def test_quantile_needs_one_over_the_rate_minus_one_images():
    assert (quantile_images(0.05), quantile_images(0.01), quantile_images(0.1)) == (19, 99, 9)


def test_quantile_images_is_the_least_n_whose_quantile_leaves_that_many_scores_at_or_above(rng):
    for rate in (0.05, 0.01, 0.1, 0.2):
        for m in (1, 2, 3):
            n = quantile_images(rate, at_or_above=m)
            for size, enough in ((n, True), (n - 1, False)):          # brute force: calibrate distinct scores
                if size < 2:
                    continue
                s = rng.permutation(size).astype(np.float64) + 1.0
                cal = calibrate(s, false_alarm_rate=rate)
                assert (cal.method == "quantile" and (s >= cal.threshold).sum() >= m) == enough, (rate, m, size)


def test_enough_images_give_the_conformal_quantile(rng):
    s = rng.lognormal(-2, 0.3, 199)
    cal = calibrate(s, false_alarm_rate=0.01)
    assert cal.method == "quantile" and cal.threshold == np.sort(s)[int(np.ceil(200 * 0.99)) - 1]   # 198th
    assert cal.achieved_rate == pytest.approx(2 / 199) and cal.expected_rate == pytest.approx(2 / 200)


def test_the_quantile_flags_the_target_rate_of_new_normal_images():
    """Over many calibration sets, the rate at which a fresh normal image is flagged is at most alpha
    (and close to it): the distribution-free guarantee, checked by simulation on a skewed distribution."""
    rng = np.random.default_rng(1)
    alpha, rates = 0.05, []
    for _ in range(400):
        cal = calibrate(rng.gamma(2.0, 1.0, 59), false_alarm_rate=alpha)
        rates.append(stats.gamma.sf(cal.threshold, 2.0))                     # exact P(new >= threshold)
    assert np.mean(rates) <= alpha + 0.005 and np.mean(rates) > alpha - 0.02


def test_few_images_get_a_fitted_tail_never_below_their_maximum(rng):
    s = rng.lognormal(-2, 0.2, 8)
    cal = calibrate(s, false_alarm_rate=0.01)
    logs = np.log(s)
    expected = np.exp(logs.mean() + stats.t.ppf(0.99, 7) * np.sqrt(1 + 1 / 8) * logs.std(ddof=1))
    assert cal.method == "lognormal_tail" and cal.threshold == pytest.approx(max(expected, s.max()))
    assert cal.achieved_rate == 0 and cal.expected_rate == pytest.approx(1 / 9)     # 8 images support 1/9
    assert cal.expected_rate_90 == pytest.approx(1 - 0.1 ** (1 / 8))               # Beta(1, 8) 90% quantile


def test_rate_bound_counts_the_scores_at_or_below_the_threshold():
    s = np.arange(1.0, 10.0)                                                 # 9 scores
    assert rate_bound(s, 9.0)[0] == pytest.approx(1 / 10)
    assert rate_bound(s, 5.5)[0] == pytest.approx(5 / 10)
    assert rate_bound(s, 0.5) == (1.0, 1.0)


def test_normalised_scale_fixes_mean_and_threshold():
    cal = calibrate(np.array([0.2, 0.3, 0.25, 0.22]), false_alarm_rate=0.05)
    np.testing.assert_allclose(normalise(np.array([cal.normal_mean, cal.threshold]), cal), [0, 1], atol=1e-6)


def test_equal_scores_still_give_a_usable_threshold():
    cal = calibrate(np.array([0.5, 0.5]), false_alarm_rate=0.05)
    assert cal.threshold > 0.5
    assert np.isfinite(normalise(np.array([0.6]), cal)).all()


def test_one_score_is_not_enough_and_the_rate_is_checked():
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(np.array([0.1]), false_alarm_rate=0.05)
    with pytest.raises(ValueError, match="false_alarm_rate=1.5"):
        calibrate(np.array([0.1, 0.2]), false_alarm_rate=1.5)
