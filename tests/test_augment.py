"""Few-shot bank augmentation by the symmetries of the square."""

import numpy as np
import pytest

from anomaly_core.augment import augment_images, turn_images
from anomaly_core.config import ModelConfig


def test_dihedral_gives_eight_distinct_exact_copies_the_first_the_image(rng):
    img = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    out = augment_images(img, name="dihedral")
    assert out.shape == (16, 6, 6, 3)
    np.testing.assert_array_equal(out[0], img[0])
    np.testing.assert_array_equal(out[8], img[1])
    copies = {c.tobytes() for c in out[:8]}
    assert len(copies) == 8
    assert all(np.array_equal(np.sort(c, axis=None), np.sort(img[0], axis=None)) for c in out[:8])


def test_groups_are_nested_and_none_is_the_identity(rng):
    img = rng.integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
    every = {c.tobytes() for c in augment_images(img, name="dihedral")}
    for name in ("flips", "rotations"):
        assert {c.tobytes() for c in augment_images(img, name=name)} <= every
    assert augment_images(img, name="none") is img


def test_unknown_augmentations_list_the_choices():
    with pytest.raises(ValueError, match="dihedral"):
        augment_images(np.zeros((1, 2, 2, 3), np.uint8), name="rotate45")
    with pytest.raises(ValueError, match="flips"):
        ModelConfig(augment="mirror")


def test_augmenting_a_fixtured_part_contradicts_position_and_is_refused():
    with pytest.raises(ValueError, match="position_weight"):
        ModelConfig(augment="flips", position_weight=1.0)


def test_only_readable_bank_images_are_copied(rng):
    from anomaly_core.features import augment_batch
    batch = {"path": np.array(["a", "held", "bad"], dtype=object), "error": np.array(["", "", "empty"], dtype=object),
             "width": np.array([4, 4, 0]), "pixels": rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)}
    out = augment_batch(batch, name="rotations", held=frozenset({"held"}))
    assert list(out["path"]) == ["a"] * 4 + ["held", "bad"]
    assert list(out["error"]) == [""] * 5 + ["empty"] and out["pixels"].shape == (6, 4, 4, 3)
    np.testing.assert_array_equal(out["pixels"][1], np.rot90(batch["pixels"][0]))


def test_a_rotated_part_is_normal_to_a_bank_that_saw_its_rotations():
    """Few-shot: 5 images of a part with oriented texture, cross-fitted (each scored by a bank of the other
    4, then all banked with their rotations); the part turned by 90 degrees scores as an anomaly against
    the plain bank and as normal against the bank augmented with rotations."""
    from anomaly_core.model import Model
    from jobs.demo import _texture
    tex = _texture("brick")                                                          # horizontal courses
    crops = np.stack([np.repeat(tex[r:r + 56, r:r + 56, None], 3, 2) for r in (0, 40, 80, 120, 160)])
    turned = np.rot90(np.repeat(tex[200:256, 200:256, None], 3, 2))[None].copy()
    ratio = {}
    for name in ("none", "rotations"):
        cfg = ModelConfig(image_size=56, tiles=1, blocks=(5,), augment=name, coreset_ratio=1.0)
        model = Model.fit(crops, config=cfg, device="cpu")
        assert model.stats.calibration_split == "crossfit-5" and model.calibration.n_images == 5
        assert (model.stats.n_train_images, model.stats.n_train_patches) == (5, 5 * cfg.n_augment * 16)
        ratio[name] = float(model.score(turned).scores[0] / model.calibration.threshold)
    assert ratio["rotations"] < 1 < ratio["none"], ratio


def test_augmenting_aligned_parts_is_refused_as_pointless():
    with pytest.raises(ValueError, match="align"):
        ModelConfig(augment="rotations", align=True)


def test_turns8_adds_the_diagonals_to_the_exact_quarter_turns(rng):
    img = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    out = augment_images(img, name="turns8")
    assert out.shape == (8, 8, 8, 3)
    for i, quarter in ((0, 0), (2, 1), (4, 2), (6, 3)):                     # 0, 90, 180, 270 degrees
        np.testing.assert_array_equal(out[i], np.rot90(img[0], k=quarter))


def test_a_diagonal_turn_fills_the_corners_with_the_border_colour():
    img = np.full((1, 32, 32, 3), 40, dtype=np.uint8)
    img[:, 12:20, 12:20] = 200                                               # a square part on a plain ground
    turned = turn_images(img, degrees=45)
    assert turned[0, 0, 0].tolist() == [40, 40, 40]                          # a corner from outside the frame
    assert turned[0, 16, 16].tolist() == [200, 200, 200]                     # the part turns about the centre
    assert abs((turned[0, ..., 0] > 120).sum() - 64) <= 8                    # its area, up to interpolation


def test_two_diagonal_turns_make_a_quarter_turn_of_a_smooth_image():
    yy, xx = np.mgrid[:33, :33].astype(np.float32)
    img = (128 + 60 * np.sin(yy / 5) * np.cos(xx / 7))[None, ..., None].astype(np.uint8)   # [1, 33, 33, 1]
    twice = turn_images(turn_images(img, degrees=45), degrees=45)
    centre = slice(8, 25)                                                    # inside the disc that stays in frame
    diff = np.abs(twice[0, centre, centre].astype(int) - np.rot90(img[0], k=1)[centre, centre])
    assert diff.mean() < 2
