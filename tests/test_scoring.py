import numpy as np
import pytest

from anomaly_core.scoring import anomaly_maps, decode_heatmap, encode_heatmap, image_scores, peak_location


def test_topk_mean_averages_the_largest_one_percent(rng):
    d = rng.random((3, 16, 16)).astype(np.float32)
    k = 3                                                             # ceil(0.01 * 256)
    want = np.sort(d.reshape(3, -1), axis=1)[:, -k:].mean(1)
    got = image_scores(d, reduction="topk_mean", top_fraction=0.01, sigma=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_max_reduction(rng):
    d = rng.random((2, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(image_scores(d, reduction="max", top_fraction=0.01, sigma=0.5),
                                  d.reshape(2, -1).max(1))


def test_smoothed_max_is_the_peak_of_the_grid_after_a_gaussian_in_patches():
    from scipy import ndimage
    d = np.zeros((2, 9, 9), np.float32)
    d[0, 4, 4] = 1.0                                                  # one hot patch
    d[1, 3:6, 3:6] = 1.0                                              # a 3 x 3 defect, same peak
    got = image_scores(d, reduction="smoothed_max", top_fraction=0.01, sigma=0.5)
    want = [ndimage.gaussian_filter(x, 0.5, mode="nearest").max() for x in d]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] < 0.7 < 0.95 < got[1]                               # the lone patch loses most, the region little


def test_unknown_reduction_lists_choices():
    with pytest.raises(ValueError, match="smoothed_max"):
        image_scores(np.zeros((1, 2, 2)), reduction="mean", top_fraction=0.1, sigma=0.5)


def test_constant_grid_gives_constant_map():
    m = anomaly_maps(np.full((1, 4, 4), 0.3, np.float32), out_size=28, sigma=4)
    assert m.shape == (1, 28, 28)
    np.testing.assert_allclose(m, 0.3, atol=1e-6)


def test_map_peak_lands_on_the_anomalous_patch():
    grid = np.zeros((1, 8, 8), np.float32)
    grid[0, 2, 5] = 1.0                                               # row 2, column 5
    m = anomaly_maps(grid, out_size=112, sigma=4)[0]
    x, y = peak_location(m, width=800, height=400)
    assert 5 * 100 <= x < 6 * 100 and 2 * 50 <= y < 3 * 50


def test_heatmap_round_trip_within_quantisation(rng):
    m = rng.random((30, 40)).astype(np.float32) * 0.7 + 0.1
    png, lo, hi = encode_heatmap(m)
    back = decode_heatmap(png, lo, hi)
    assert back.shape == m.shape
    assert np.abs(back - m).max() <= (hi - lo) / 510 + 1e-6


def test_flat_heatmap_round_trip():
    png, lo, hi = encode_heatmap(np.full((5, 5), 0.25, np.float32))
    np.testing.assert_allclose(decode_heatmap(png, lo, hi), 0.25)
