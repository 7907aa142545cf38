import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from anomaly_core.align import unalign_maps
from anomaly_core.scoring import (
    anomaly_maps,
    decode_grid,
    decode_heatmap,
    decode_heatmap_png,
    encode_grid,
    encode_heatmap_png,
    image_maps,
    image_scores,
    peak_locations,
    smooth_map,
)


def reference_maps(grids: np.ndarray, *, out_size: int, sigma: float) -> np.ndarray:
    """The maps as PIL and scipy compute them: bilinear resize of pixel centres, Gaussian with edges
    repeated."""
    return np.stack([ndimage.gaussian_filter(
        np.asarray(Image.fromarray(g, mode="F").resize((out_size, out_size), Image.BILINEAR)), sigma,
        mode="nearest") for g in grids])


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
    m = anomaly_maps(grid, out_size=112, sigma=4)
    (x,), (y,) = peak_locations(m, widths=[800], heights=[400])
    assert 5 * 100 <= x < 6 * 100 and 2 * 50 <= y < 3 * 50


def test_peaks_of_maps_on_a_device_equal_those_on_the_host(rng):
    m = rng.random((3, 20, 20)).astype(np.float32)
    host = peak_locations(m, widths=[100, 200, 50], heights=[100, 80, 60])
    device = peak_locations(torch.from_numpy(m), widths=[100, 200, 50], heights=[100, 80, 60])
    np.testing.assert_array_equal(host, device)


@pytest.mark.parametrize("grid, out_size, sigma", [(28, 392, 7.0), (16, 224, 4.0), (6, 84, 1.5), (8, 56, 0)])
def test_maps_equal_pil_and_scipy(grid, out_size, sigma, rng):
    grids = rng.random((2, grid, grid)).astype(np.float32) * 0.5
    np.testing.assert_allclose(anomaly_maps(grids, out_size=out_size, sigma=sigma),
                               reference_maps(grids, out_size=out_size, sigma=sigma), atol=1e-5)


def test_maps_of_a_tensor_stay_a_tensor_where_it_is(rng):
    grids = rng.random((2, 8, 8)).astype(np.float32)
    on_device = anomaly_maps(torch.from_numpy(grids), out_size=56, sigma=2.0)
    assert isinstance(on_device, torch.Tensor) and on_device.device.type == "cpu"
    np.testing.assert_array_equal(on_device.numpy(), anomaly_maps(grids, out_size=56, sigma=2.0))


def test_smoothing_wider_than_the_map_repeats_its_edges_as_scipy_does(rng):
    g = rng.random((3, 3)).astype(np.float32)
    np.testing.assert_allclose(smooth_map(g, sigma=2.0), ndimage.gaussian_filter(g, 2.0, mode="nearest"),
                               atol=1e-6)


def test_png_heatmap_round_trip_within_quantisation(rng):
    m = rng.random((30, 40)).astype(np.float32) * 0.7 + 0.1
    png, lo, hi = encode_heatmap_png(m)
    back = decode_heatmap_png(png, lo, hi)
    assert back.shape == m.shape
    assert np.abs(back - m).max() <= (hi - lo) / 510 + 1e-6


def test_flat_png_heatmap_round_trip():
    png, lo, hi = encode_heatmap_png(np.full((5, 5), 0.25, np.float32))
    np.testing.assert_allclose(decode_heatmap_png(png, lo, hi), 0.25)


def test_grid_is_stored_as_float16_row_major(rng):
    g = rng.random((28, 28)).astype(np.float32)
    data = encode_grid(g)
    assert len(data) == 28 * 28 * 2
    assert np.frombuffer(data, "<f2")[28 * 3 + 5] == np.float16(g[3, 5])
    np.testing.assert_array_equal(decode_grid(data), g.astype(np.float16).astype(np.float32))


def test_grid_of_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="G \\* G"):
        decode_grid(b"\0" * 6)


def test_stored_grid_rebuilds_the_scorers_map_within_float16_rounding(rng):
    """Maps are convex combinations of grid values, so the float16 grid moves no pixel by more than it
    moves a grid value."""
    g = rng.random((1, 28, 28)).astype(np.float32) * 0.6
    row = {"heatmap_grid": encode_grid(g[0]), "heatmap_size": 392, "heatmap_sigma": 7.0, "heatmap_pose": None}
    rounding = np.abs(g - g.astype(np.float16)).max()
    scorer = image_maps(g, out_size=392, sigma=7.0)[0]
    assert np.abs(decode_heatmap(row) - scorer).max() <= rounding + 1e-6


def test_stored_grid_with_a_pose_rebuilds_the_map_in_the_images_frame(rng):
    g = rng.random((1, 8, 8)).astype(np.float32)
    pose = np.array([[20.0, 30.0, 0.6]])
    row = {"heatmap_grid": encode_grid(g[0]), "heatmap_size": 56, "heatmap_sigma": 2.0,
           "heatmap_pose": pose[0].tolist()}
    want = unalign_maps(anomaly_maps(g.astype(np.float16).astype(np.float32), out_size=56, sigma=2.0), pose)[0]
    np.testing.assert_allclose(decode_heatmap(row), want, atol=1e-6)


def test_row_without_grid_reads_its_png():
    m = np.linspace(0.1, 0.4, 49, dtype=np.float32).reshape(7, 7)
    png, lo, hi = encode_heatmap_png(m)
    row = {"heatmap_grid": None, "heatmap_png": png, "heatmap_min": lo, "heatmap_max": hi}
    np.testing.assert_allclose(decode_heatmap(row), m, atol=(hi - lo) / 510 + 1e-6)


def test_row_without_any_heatmap_says_how_to_rescore():
    with pytest.raises(ValueError, match="--replace"):
        decode_heatmap({"uri": "a.png", "status": "ok", "heatmap_grid": None, "heatmap_png": None})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maps_on_the_gpu_equal_those_on_the_cpu(rng):
    grids = rng.random((2, 28, 28)).astype(np.float32)
    on_gpu = anomaly_maps(torch.from_numpy(grids).cuda(), out_size=392, sigma=7.0)
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), anomaly_maps(grids, out_size=392, sigma=7.0), atol=1e-5)
