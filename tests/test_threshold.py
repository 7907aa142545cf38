import numpy as np
import pytest

from anomaly_core.threshold import calibrate, normalise


def test_threshold_is_mean_plus_k_std():
    s = np.array([1.0, 2.0, 3.0, 4.0])
    cal = calibrate(s, sigmas=3)
    assert cal.threshold == pytest.approx(s.mean() + 3 * s.std(ddof=1))


def test_threshold_never_flags_a_held_out_image():
    s = np.array([0.0] * 20 + [10.0])
    assert calibrate(s, sigmas=0.1).threshold >= 10.0


def test_normalised_scale_fixes_mean_and_threshold():
    cal = calibrate(np.array([0.2, 0.3, 0.25, 0.22]), sigmas=3)
    np.testing.assert_allclose(normalise(np.array([cal.normal_mean, cal.threshold]), cal), [0, 1], atol=1e-6)


def test_equal_scores_still_give_a_usable_threshold():
    cal = calibrate(np.array([0.5, 0.5]), sigmas=3)
    assert cal.threshold > 0.5
    assert np.isfinite(normalise(np.array([0.6]), cal)).all()


def test_one_score_is_not_enough():
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(np.array([0.1]), sigmas=3)
