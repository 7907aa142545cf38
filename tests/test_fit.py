"""The fit recipe on feature blocks: hold-out split, blocks, bank and calibration, statistics."""

import numpy as np
import pytest

from anomaly_core.config import ModelConfig
from anomaly_core.fit import FitStats, feature_blocks, fit_bank, patch_estimate, split_holdout, train_patches
from anomaly_core.index import MemoryBank
from tests.helpers import unit_rows


def test_holdout_split_is_deterministic_and_order_free():
    paths = [f"img{i}.png" for i in range(20)]
    a = split_holdout(paths, fraction=0.2, seed=3)
    b = split_holdout(paths[::-1], fraction=0.2, seed=3)[::-1]
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 4


def test_holdout_needs_three_images():
    with pytest.raises(ValueError, match="at least 3 good images"):
        split_holdout(["a", "b"], fraction=0.5, seed=0)


def test_patch_estimate_counts_augmented_copies():
    cfg = ModelConfig(image_size=56, tiles=1, blocks=(5,), augment="flips")       # 4 copies, 4 x 4 grid
    assert patch_estimate(3, config=cfg) == 3 * 4 * 16


def test_blocks_hold_their_rows_and_names(rng):
    f = unit_rows(rng, 5 * 4, 8).reshape(5, 4, 8)
    blocks = feature_blocks(f, np.array([0, 0, 1, 0, 1], bool), images_per_block=2, paths=list("abcde"))
    assert [list(b["path"]) for b in blocks] == [["a", "b"], ["c", "d"], ["e"]]
    np.testing.assert_array_equal(np.concatenate([train_patches(b) for b in blocks]),
                                  f[[0, 1, 3]].reshape(-1, 8))


def test_fit_bank_calibrates_on_the_held_out_rows_only(rng):
    """Full bank (ratio 1): bank images score 0 against it, so the threshold comes from the held-out
    images alone; the statistics count what went where, unreadable rows included."""
    cfg = ModelConfig(image_size=28, tiles=1, blocks=(5,), coreset_ratio=1.0)          # 2 x 2 grid, D 384
    f = unit_rows(rng, 6 * 4, 384).reshape(6, 4, 384)
    held = np.array([0, 0, 0, 1, 1, 0], bool)
    blocks = feature_blocks(f, held, images_per_block=4, paths=[f"i{k}" for k in range(6)])
    blocks[1]["error"][1] = "corrupt"                                                  # i5 is unreadable
    bank, cal, stats = fit_bank(blocks, config=cfg, n_estimate=4 * 4)
    ref = MemoryBank.build(f[:3].reshape(-1, 384))
    expected = ref.nearest(f[3:5].reshape(-1, 384)).reshape(2, 4)                      # [2 held, 4 patches]
    assert bank.size == 12 and cal.normal_max == pytest.approx(float(expected.max(axis=1).max()), abs=1e-5)
    assert isinstance(stats, FitStats)
    assert (stats.n_images, stats.n_train_images, stats.n_holdout_images) == (5, 3, 2)
    assert stats.holdout_images == ["i3", "i4"] and stats.unreadable == [("i5", "corrupt")]
    assert FitStats.from_dict(stats.to_dict()) == stats
