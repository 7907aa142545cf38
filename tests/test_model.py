"""The method as one object: fit, score, save and load in one process (no Ray)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from anomaly_core.artifact import content_id
from anomaly_core.config import SMOOTH_TOP_FRACTION, ModelConfig
from anomaly_core.index import MemoryBank
from anomaly_core.model import Model, score_features
from anomaly_core.scoring import anomaly_maps
from tests.helpers import unit_rows

CFG = ModelConfig(image_size=56, tiles=1, blocks=(5,), coreset_ratio=0.5)


def parts(n: int, seed: int) -> np.ndarray:
    """[n, 56, 56, 3] uint8 crops of a real brick texture."""
    from jobs.demo import _texture, make_part
    rng = np.random.default_rng(seed)
    tex = _texture("brick")
    return np.stack([np.repeat(make_part(tex, rng, size=56)[..., None], 3, 2) for _ in range(n)])


def stained(seed: int) -> np.ndarray:
    from jobs.demo import _texture, add_defect
    img, _ = add_defect(parts(1, seed)[0, ..., 0], "stain", np.random.default_rng(seed), foreign=_texture("grass"))
    return np.repeat(img[..., None], 3, 2)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.fit(parts(8, 0), config=CFG, device="cpu")


def test_a_few_shot_fit_cross_fits_its_threshold_and_banks_every_image(model):
    s = model.stats
    assert (s.n_images, s.n_train_images, s.n_calibration_images, s.calibration_split) == (8, 8, 8, "crossfit-5")
    assert s.bank_size == int(np.ceil(0.5 * 8 * 16)) == model.bank.size
    assert model.calibration.n_images == 8 and model.calibration.method == "lognormal_tail"
    assert s.fit_seconds >= s.feature_seconds > 0


def test_a_fit_records_the_image_score_it_chose(model, tmp_path):
    assert CFG.top_fraction is None and model.config.top_fraction == SMOOTH_TOP_FRACTION     # 8 images: a tail
    manifest = model.save(tmp_path / "m")
    assert manifest["config"]["top_fraction"] == SMOOTH_TOP_FRACTION
    assert Model.load(tmp_path / "m").config == model.config


def test_a_holdout_fit_keeps_its_calibration_images_out_of_the_bank():
    m = Model.fit(parts(8, 0), config=dataclasses.replace(CFG, calibration="holdout"), device="cpu")
    assert (m.stats.n_train_images, m.stats.n_calibration_images, m.stats.bank_size) == (6, 2, 48)


def test_a_stained_part_scores_above_normal_parts_and_the_threshold(model):
    r = model.score(np.stack([parts(1, 5)[0], stained(6)]))
    assert r.scores.shape == (2,) and r.distances.shape == (2, 4, 4) and r.maps.shape == (2, 56, 56)
    assert r.scores[1] > r.scores[0] and list(model.is_anomalous(r.scores)) == [False, True]


def test_saved_and_loaded_models_score_alike(model, tmp_path):
    manifest = model.save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m")
    px = np.stack([parts(1, 7)[0], stained(8)])
    a, b = model.score(px), loaded.score(px)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-6)
    assert loaded.model_id == manifest["model_id"] and loaded.stats == model.stats


def test_fitted_and_loaded_banks_search_exhaustively_beyond_the_cover_radius(model, tmp_path):
    model.save(tmp_path / "m")
    for m in (model, Model.load(tmp_path / "m")):
        assert m.bank.exact_above == m.stats.cover_radius > 0


def test_a_backbone_with_other_weights_is_refused(model, tmp_path):
    model.save(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "other")
    mf = json.loads((tmp_path / "other" / "manifest.json").read_text())
    mf["weights"]["state_sha256"] = "0" * 64
    mf["model_id"] = content_id(mf)                      # a consistent model, fitted with other weights
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match="refit"):
        Model.load(tmp_path / "other").backbone(device="cpu")


def test_a_model_fitted_from_features_without_weights_cannot_be_saved(rng, tmp_path):
    f = unit_rows(rng, 5 * 16, 384).reshape(5, 16, 384)
    m = Model.fit_features(f, config=CFG)
    with pytest.raises(ValueError, match="identity"):
        m.save(tmp_path / "m")


def test_maps_are_the_patch_distances_upsampled_and_smoothed_at_the_scaled_sigma(rng):
    cfg = ModelConfig(image_size=56, tiles=2, tile_overlap=2, blocks=(7,), top_fraction=0.01)   # grid 6, input 84 px
    g, d = cfg.grid_size, 384
    bank = MemoryBank.build(unit_rows(rng, 50, d))
    feats = unit_rows(rng, 2 * g * g, d)                                        # [2 * G*G, D]
    r = score_features(feats.reshape(2, g * g, d), bank, config=cfg)
    np.testing.assert_allclose(r.distances.reshape(-1), bank.nearest(feats), rtol=1e-6)
    expected = anomaly_maps(r.distances, out_size=cfg.input_size, sigma=cfg.map_sigma)
    assert cfg.map_sigma == pytest.approx(4 * 84 / 224)
    np.testing.assert_allclose(r.maps, expected, rtol=1e-6)
