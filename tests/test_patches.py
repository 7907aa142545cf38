import numpy as np
import pytest

from anomaly_core.config import ModelConfig
from anomaly_core.patches import add_position, aggregate_neighbours, position_code
from tests.helpers import unit_rows


def test_aggregation_is_the_normalised_neighbourhood_mean(rng):
    g, d = 5, 8
    f = unit_rows(rng, 2 * g * g, d).reshape(2, g * g, d)
    got = aggregate_neighbours(f, grid=g, size=3).reshape(2, g, g, d)
    grid = f.reshape(2, g, g, d)
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="symmetric")   # scipy's "reflect"
    for i, j in [(0, 0), (2, 3), (4, 4)]:
        mean = padded[:, i:i + 3, j:j + 3].mean(axis=(1, 2))                      # [2, D]
        np.testing.assert_allclose(got[:, i, j], mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-5)


def test_aggregation_of_one_is_the_identity(rng):
    f = unit_rows(rng, 16, 4).reshape(1, 16, 4)
    assert aggregate_neighbours(f, grid=4, size=1) is f


def test_position_codes_are_unit_and_fall_with_the_offset():
    code = position_code(8).reshape(8, 8, 4)
    np.testing.assert_allclose(np.linalg.norm(code, axis=-1), 1, atol=1e-6)
    along_row = [float(code[0, 0] @ code[0, j]) for j in range(8)]
    assert along_row[0] == pytest.approx(1) and all(a > b for a, b in zip(along_row[:-1], along_row[1:], strict=True))


def test_position_weight_adds_a_weighted_position_distance(rng):
    g, w = 4, 0.5
    f = unit_rows(rng, g * g, 6).reshape(1, g * g, 6)
    x = add_position(f, grid=g, weight=w)[0]                                     # [P, 10]
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1, atol=1e-6)
    code = position_code(g)
    d_feat, d_pos = 1 - f[0, 2] @ f[0, 9], 1 - code[2] @ code[9]
    assert 1 - x[2] @ x[9] == pytest.approx((d_feat + w * d_pos) / (1 + w), abs=1e-6)


def test_position_weight_zero_is_the_identity(rng):
    f = unit_rows(rng, 16, 4).reshape(1, 16, 4)
    assert add_position(f, grid=4, weight=0.0) is f


def test_descriptor_options_are_checked():
    with pytest.raises(ValueError, match="neighbourhood=2 must be an odd"):
        ModelConfig(neighbourhood=2)
    with pytest.raises(ValueError, match="position_weight=-1"):
        ModelConfig(position_weight=-1)
    assert ModelConfig(position_weight=1.0).feature_dim == ModelConfig().feature_dim + 4


# ---- a placement anomaly: a part missing from a fixtured assembly, every local texture still normal ----

SIZE, RADIUS = 112, 16


def placement_config(weight: float, *, align: bool = False) -> ModelConfig:
    """Not aligned unless asked: alignment centres each assembly on its edges, which moves the plate of
    one with a part missing, a different way to catch it than the position term these tests specify."""
    return ModelConfig(image_size=SIZE, tiles=1, blocks=(7,), coreset_ratio=0.5, position_weight=weight,
                       calibration="holdout", holdout_fraction=0.25, align=align)


def assembly(rng, parts):
    """[S, S, 3] uint8: a plain grey plate (noise sd 4) with discs of real texture (which move with their
    disc) at the given centres, each placed with +-2 px of fixturing play."""
    from jobs.demo import _texture
    img = 120 + rng.normal(0, 4, (SIZE, SIZE))
    yy, xx = np.mgrid[-RADIUS:RADIUS, -RADIUS:RADIUS]
    disc = yy ** 2 + xx ** 2 < RADIUS ** 2
    for name, (cy, cx) in parts:
        tex = _texture(name)[100:100 + 2 * RADIUS, 100:100 + 2 * RADIUS].astype(float)
        cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
        img[cy - RADIUS:cy + RADIUS, cx - RADIUS:cx + RADIUS][disc] = tex[disc]
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, 2)


def score_ratio(cfg: ModelConfig, train: np.ndarray, test: np.ndarray) -> float:
    """Image score of `test` over the calibrated threshold of a model fitted on `train` (>= 1: anomalous),
    alignment included when the config asks for it."""
    from anomaly_core.model import Model
    model = Model.fit(train, config=cfg, device="cpu")
    return float(model.score(test[None]).scores[0] / model.calibration.threshold)


def test_a_missing_part_escapes_the_global_search_and_is_caught_by_position():
    rng = np.random.default_rng(0)
    left, right = (SIZE // 2, SIZE // 4 + 2), (SIZE // 2, 3 * SIZE // 4 - 2)
    train = np.stack([assembly(rng, [("brick", left), ("grass", right)]) for _ in range(16)])
    missing = assembly(rng, [("brick", left)])                     # the grass part is gone: plate shows
    assert score_ratio(placement_config(0.0), train, missing) < 1.0   # plate patches exist elsewhere: missed
    assert score_ratio(placement_config(3.0), train, missing) > 1.5   # but not at that place: caught


def turned(img: np.ndarray, rng) -> np.ndarray:
    """The assembly as an unfixtured part: turned by a random angle and shifted by up to 6 px."""
    from scipy import ndimage
    out = ndimage.rotate(img, rng.uniform(0, 360), axes=(0, 1), reshape=False, order=1, mode="reflect")
    return np.roll(out, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))


def test_pose_alignment_lets_position_catch_a_missing_part_of_an_unfixtured_assembly():
    rng = np.random.default_rng(1)
    left, right = (SIZE // 2, SIZE // 4 + 2), (SIZE // 2, 3 * SIZE // 4 - 2)
    train = np.stack([turned(assembly(rng, [("brick", left), ("grass", right)]), rng) for _ in range(16)])
    normal = turned(assembly(rng, [("brick", left), ("grass", right)]), rng)
    missing = turned(assembly(rng, [("brick", left)]), rng)
    aligned = placement_config(3.0, align=True)
    assert score_ratio(aligned, train, missing) > 1.0
    assert score_ratio(aligned, train, normal) < 1.0
