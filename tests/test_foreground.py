"""AnomalyDINO's PCA foreground mask on normalised tokens."""

import numpy as np
import pytest

from anomaly_core.foreground import first_component, foreground_mask, otsu_threshold
from tests.helpers import unit_rows


def object_tokens(rng, grid: int, inside: np.ndarray, noise: float = 0.1) -> np.ndarray:
    """[1, G*G, 32] unit tokens: one direction on the object (inside [G, G] bool), another off it."""
    a, b = unit_rows(rng, 2, 32)
    x = np.where(inside.ravel()[:, None], a, b) + noise * rng.standard_normal((grid * grid, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True))[None].astype(np.float32)


def disc(grid: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:grid, :grid]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2


def test_otsu_splits_two_modes_between_them(rng):
    x = np.r_[rng.normal(0, 0.1, 300), rng.normal(2, 0.1, 100)]
    assert 0.3 < otsu_threshold(x) < 1.7


def test_power_iteration_finds_the_svd_axis(rng):
    x = rng.standard_normal((3, 200, 16)) * np.linspace(3, 0.5, 16)          # distinct variances
    x -= x.mean(axis=1, keepdims=True)
    v = first_component(x)
    for i in range(3):
        assert abs(v[i] @ np.linalg.svd(x[i], full_matrices=False)[2][0]) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("centre", [(8, 8), (5, 11)])                    # centred, and off centre
def test_the_mask_covers_the_object_and_not_the_far_background(rng, centre):
    inside = disc(16, *centre, r=4)
    mask = foreground_mask(object_tokens(rng, 16, inside), grid=16)[0].reshape(16, 16)
    assert mask[inside].all()                                      # dilation errs towards keeping edges
    far = ~disc(16, *centre, r=6)
    assert not mask[far].any()


def test_the_background_is_the_side_that_holds_the_border_whatever_the_sign(rng):
    inside = disc(16, 8, 8, r=6)                                   # object larger than its background
    mask = foreground_mask(object_tokens(rng, 16, inside), grid=16)[0].reshape(16, 16)
    assert mask[8, 8] and not mask[0, 0] and not mask[15, 15]


def test_background_patches_stay_out_of_the_bank_and_score_zero(rng):
    from anomaly_core.config import ModelConfig
    from anomaly_core.fit import bank_patches, feature_blocks
    from anomaly_core.index import MemoryBank
    from anomaly_core.scoring import anomaly_maps, patch_distances
    f = unit_rows(rng, 3 * 16, 8).reshape(3, 16, 8)
    fg = np.zeros((3, 16), dtype=bool)
    fg[:, 4:12] = True                                             # patch rows 1 and 2 of the 4x4 grid
    block = feature_blocks(f, np.array([-1, -1, 0]), images_per_block=3, foreground=fg)[0]
    np.testing.assert_array_equal(bank_patches(block, leave_out=0), f[:2, 4:12].reshape(-1, 8))
    bank = MemoryBank.build(bank_patches(block, leave_out=0), kind="flat", shard_size=1 << 20, seed=0, nprobe=1,
                            ef_search=16)
    cfg = ModelConfig(image_size=56, tiles=1, blocks=(7,), foreground_mask=True, smoothing_sigma=0)
    dist = patch_distances(f[2:], bank, foreground=fg[2:]).reshape(1, 4, 4)
    maps = anomaly_maps(dist, out_size=cfg.input_size, sigma=cfg.map_sigma)
    # patch rows 0 and 3 are background: their outer half-patch of pixels is 0 (bilinear clamps there)
    assert (maps[0, :7] == 0).all() and (maps[0, -7:] == 0).all() and maps[0, 14:42].min() > 0


def test_background_patches_are_not_searched(rng):
    from anomaly_core.index import MemoryBank
    from anomaly_core.scoring import patch_distances

    class Recording(MemoryBank):
        def nearest(self, queries):
            self.searched = queries.copy()
            return super().nearest(queries)

    f = unit_rows(rng, 2 * 9, 8).reshape(2, 9, 8)
    fg = rng.random((2, 9)) < 0.5
    bank = Recording.build(unit_rows(rng, 20, 8), kind="flat", shard_size=1 << 20, seed=0, nprobe=1, ef_search=16)
    dist = patch_distances(f, bank, foreground=fg)
    np.testing.assert_array_equal(bank.searched, f[fg])
    brute = 1 - (f @ bank.vectors().T).max(-1)                                     # [2, 9]
    np.testing.assert_allclose(dist, np.where(fg, brute, 0), atol=1e-5)
