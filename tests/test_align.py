"""Pose alignment by PCA of edges: parts in any pose come out in one pose, and maps go back."""

import numpy as np
import pytest

from anomaly_core.align import align_images, edge_pose, unalign_maps

S = 96


def part(angle: float, centre: tuple[float, float]) -> np.ndarray:
    """[S, S, 3] uint8: a bright bar with a knob at one end, turned by `angle` (radians, ccw) about `centre`."""
    rows, cols = np.mgrid[:S, :S].astype(float)
    dx, dy = cols - centre[1], -(rows - centre[0])
    u = dx * np.cos(angle) + dy * np.sin(angle)                   # along the bar
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    shape = ((np.abs(u) < 26) & (np.abs(v) < 6)) | ((u - 26) ** 2 + v ** 2 < 11 ** 2)
    return np.repeat(np.where(shape, 200, 40).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("angle", [0.3, 1.9, -2.5])
def test_the_pose_is_the_centroid_and_the_axis_of_the_part(angle):
    ref = edge_pose(part(0.0, (48, 48)).mean(-1))
    pose = edge_pose(part(angle, (44, 53)).mean(-1))
    c, s = np.cos(angle), np.sin(angle)
    moved = np.array([44, 53]) + np.array([[c, -s], [s, c]]) @ (ref[:2] - 48)   # (row, col), y down
    assert np.hypot(*(pose[:2] - moved)) < 1.5                      # the centroid turns with the part
    turn = (pose[2] - ref[2] - angle + np.pi) % (2 * np.pi) - np.pi
    assert abs(turn) < 0.05                                         # no 180-degree flip either


def test_parts_in_any_pose_align_to_the_same_image():
    aligned, _ = align_images(np.stack([part(a, c) for a, c in [(0.0, (48, 48)), (2.2, (40, 55)),
                                                                (-1.0, (52, 44))]]))
    fg = aligned[0, ..., 0] > 120
    for other in aligned[1:]:
        assert np.mean((other[..., 0] > 120) != fg) < 0.02         # < 2% of pixels disagree


def test_maps_warp_back_to_the_image_frame():
    img = part(1.2, (45, 50))
    aligned, poses = align_images(img[None])
    back = unalign_maps(aligned[..., 0].astype(np.float32), poses)[0]
    assert np.mean((back > 120) != (img[..., 0] > 120)) < 0.01


def test_a_flat_image_keeps_its_pose():
    img = np.full((1, S, S, 3), 90, np.uint8)
    aligned, poses = align_images(img)
    np.testing.assert_array_equal(aligned, img)
    assert poses[0, 2] == 0


# ---- the fit's alignment trial (anomaly_core.fit.aligned_config) -------------------------------------------

@pytest.fixture(scope="module")
def trial_extractor():
    from anomaly_core.config import ModelConfig
    from anomaly_core.features import FeatureExtractor
    from tests.helpers import TEST_CONFIG_KW
    cfg = ModelConfig(**TEST_CONFIG_KW)
    return cfg, FeatureExtractor(config=cfg, device="cpu")


@pytest.mark.parametrize("any_angle", [True, False])
def test_the_trial_aligns_parts_seen_at_any_angle_and_not_fixtured_ones(trial_extractor, any_angle):
    from anomaly_core.fit import alignment_trial
    from tests.helpers import textured_part
    cfg, ex = trial_extractor
    rng = np.random.default_rng(0)
    angles = rng.uniform(-np.pi, np.pi, 16) if any_angle else np.full(16, 0.4)
    px = np.stack([textured_part(a, cfg.input_size, rng) for a in angles])
    trial = alignment_trial(px, describe=ex.describe, config=cfg)
    assert trial.images == 16
    assert trial.aligns == any_angle, trial


def test_trial_scores_are_each_image_against_the_patches_of_the_other_folds(rng):
    from anomaly_core.config import ModelConfig
    from anomaly_core.fit import trial_scores
    from anomaly_core.scoring import image_scores
    from tests.helpers import unit_rows
    cfg = ModelConfig(image_size=56, tiles=1, top_fraction=0.25)                   # a 4 x 4 grid
    m, p, d = 9, 16, 8
    f = unit_rows(rng, m * p, d).reshape(m, p, d)
    fg = rng.random((m, p)) < 0.8
    got = trial_scores(f, fg, config=cfg, folds=4)
    for i in range(m):
        others = np.concatenate([f[j][fg[j]] for j in range(m) if j % 4 != i % 4])            # [n, D]
        dist = np.where(fg[i], 1 - (f[i] @ others.T).max(axis=1), 0.0)                       # [P]
        want = image_scores(dist.reshape(1, 4, 4).astype(np.float32), **cfg.score_options)[0]
        assert got[i] == pytest.approx(want, abs=1e-5)


def test_the_trial_draws_a_seeded_sample_and_needs_enough_images():
    from anomaly_core.fit import ALIGN_TRIAL_IMAGES, ALIGN_TRIAL_MIN, trial_sample
    names = [f"g{i:03d}" for i in range(100)]
    assert trial_sample(names[:ALIGN_TRIAL_MIN - 1], seed=0) == []
    assert trial_sample(names[:ALIGN_TRIAL_MIN], seed=0) == names[:ALIGN_TRIAL_MIN]
    drawn = trial_sample(names, seed=0)
    assert len(drawn) == ALIGN_TRIAL_IMAGES and drawn == sorted(drawn) == trial_sample(names, seed=0)
    assert drawn != trial_sample(names, seed=1)


def test_the_fit_aligns_when_the_trial_lowers_the_normal_scores_enough():
    from anomaly_core.config import ModelConfig
    from anomaly_core.fit import ALIGN_GAIN, AlignmentTrial, aligned_config

    def chosen(trial, **kw):
        return aligned_config(ModelConfig(**kw), lambda: trial)
    gain = AlignmentTrial(images=32, unaligned=0.30, aligned=0.30 * (ALIGN_GAIN - 0.01))
    loss = AlignmentTrial(images=32, unaligned=0.30, aligned=0.30 * (ALIGN_GAIN + 0.01))
    assert chosen(gain) == (ModelConfig(align=True), gain)
    assert chosen(loss) == (ModelConfig(align=False), loss)
    assert chosen(None) == (ModelConfig(align=False), None)                       # too few images: no trial


def test_a_given_align_or_augmentation_runs_no_trial():
    from anomaly_core.config import ModelConfig
    from anomaly_core.fit import aligned_config

    def never():
        raise AssertionError("the trial ran")
    for given in (True, False):
        assert aligned_config(ModelConfig(align=given), never) == (ModelConfig(align=given), None)
    assert aligned_config(ModelConfig(augment="rotations"), never) == (
        ModelConfig(augment="rotations", align=False), None)


def test_features_and_models_refuse_an_unresolved_align(trial_extractor):
    cfg, ex = trial_extractor
    batch = {"path": np.array(["a"], dtype=object), "error": np.array([""], dtype=object),
             "pixels": np.zeros((1, cfg.input_size, cfg.input_size, 3), np.uint8)}
    with pytest.raises(ValueError, match="align=None is chosen by the fit"):
        ex(batch)
