"""The image term (config.global_block): image descriptors, their nearest-image distance, its combination
with the patch score, and how fit, cross-fit, update, save and load carry it."""

import dataclasses
import json

import numpy as np
import pytest

from anomaly_core.align import align_images
from anomaly_core.config import ModelConfig
from anomaly_core.features import FeatureExtractor
from anomaly_core.fit import feature_blocks, fit_bank, split_calibration
from anomaly_core.image_term import ImageTerm, image_descriptors, image_distances
from anomaly_core.index import MemoryBank
from anomaly_core.model import Model
from anomaly_core.threshold import calibrate
from tests.helpers import unit_rows

# a 2 x 2 grid of 384-wide patches; top_fraction given, so fit_bank takes it as fitted
CFG = ModelConfig(image_size=28, tiles=1, blocks=(5,), global_block=4, coreset_ratio=1.0, top_fraction=0.01,
                  calibration="crossfit", crossfit_folds=3)
WEIGHTS = {"source": "test", "state_sha256": "0" * 64}


def near(rng, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    """[n, D] unit rows scattered around the unit row `centre` [D]."""
    x = centre + spread * rng.standard_normal((n, centre.size)).astype(np.float32) / np.sqrt(centre.size)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def good_parts(rng, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n normal images: patches [n, 4, 384] around one patch kind, image descriptors [n, 384] around one
    shape; and the two centres' patch kind [384] (the shape is the third)."""
    kind, shape = unit_rows(rng, 2, 384)
    return near(rng, kind, n * 4, 0.3).reshape(n, 4, 384), near(rng, shape, n, 0.05), kind


def test_an_image_descriptor_is_the_normalised_mean_of_its_unit_tokens(rng):
    tokens = unit_rows(rng, 2 * 9, 16).reshape(2, 9, 16)
    mean = tokens.mean(axis=1)
    np.testing.assert_allclose(image_descriptors(tokens), mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               atol=1e-6)


def test_image_distances_are_the_cosine_distance_to_the_nearest_bank_image(rng):
    q, bank = unit_rows(rng, 5, 32), unit_rows(rng, 7, 32)
    np.testing.assert_allclose(image_distances(q, bank), 1 - (q @ bank.T).max(axis=1), atol=1e-5)


def test_the_combined_score_is_the_patch_score_unless_the_image_term_is_the_more_anomalous():
    term = ImageTerm.of(np.zeros((1, 4), np.float32), patch_scores=np.array([0.1, 0.2, 0.4]),
                        distances=np.array([0.01, 0.02, 0.04]))          # both logs spread alike
    patch, dist = np.array([0.3, 0.2]), np.array([0.01, 0.08])        # image 0: patch larger; 1: image larger
    z_image = (np.log(0.08) - term.image_log_mean) / term.image_log_std
    np.testing.assert_allclose(term.combine(patch, dist),
                               [0.3, np.exp(term.patch_log_mean + term.patch_log_std * z_image)], rtol=1e-5)
    assert term.combine(np.array([0.2]), np.array([0.01]))[0] == pytest.approx(0.2, rel=1e-5)


def test_calibration_scores_against_a_leave_fold_out_image_bank_and_the_final_bank_holds_every_image(rng):
    feats, images, _ = good_parts(rng, 6)
    names = [f"i{k}" for k in range(6)]
    plan = split_calibration(names, config=CFG)
    blocks = feature_blocks(feats, plan.fold, images_per_block=4, paths=names, images=images)
    _, cal, stats = fit_bank(blocks, config=CFG, plan=plan, n_estimate=6 * 4)
    dist = [image_distances(images[i:i + 1], images[plan.fold != k])[0] for i, k in enumerate(plan.fold)]
    by_name = dict(zip(stats.calibration_images, stats.calibration_patches.image_distances, strict=True))
    assert [by_name[n] for n in names] == pytest.approx(dist, abs=1e-5)          # never its own descriptor
    np.testing.assert_array_equal(np.sort(stats.image_term.vectors, axis=0), np.sort(images, axis=0))
    # the threshold is set on the combined scores, which the stats record
    patch = np.array([MemoryBank.build(feats[plan.fold != k].reshape(-1, 384)).nearest(feats[i]).max()
                      for i, k in enumerate(plan.fold)])                     # top 1% of 4 patches: the largest
    order = [names.index(n) for n in stats.calibration_images]
    combined = ImageTerm.of(images, patch_scores=patch[order], distances=np.array(dist)[order])
    expected = combined.combine(patch[order], np.array(dist)[order])
    np.testing.assert_allclose(stats.calibration_scores, expected, rtol=1e-4)
    assert cal.threshold == pytest.approx(calibrate(expected, false_alarm_rate=CFG.false_alarm_rate).threshold,
                                          rel=1e-4)


def test_a_holdout_fit_keeps_the_held_out_images_out_of_the_image_bank(rng):
    feats, images, _ = good_parts(rng, 10)
    names = [f"i{k}" for k in range(10)]
    model = Model.fit_features(feats, config=dataclasses.replace(CFG, calibration="holdout"), paths=names,
                               images=images)
    held = [names.index(n) for n in model.stats.calibration_images]
    assert len(model.stats.image_term.vectors) == 10 - len(held)
    assert not np.isin(images[held], model.stats.image_term.vectors).all(axis=1).any()


def test_a_part_whose_patches_are_normal_but_whose_shape_is_not_is_flagged_only_with_the_image_term(rng):
    feats, images, kind = good_parts(rng, 30)
    with_term = Model.fit_features(feats, config=CFG, images=images)
    without = Model.fit_features(feats, config=dataclasses.replace(CFG, global_block=None))
    patches = near(rng, kind, 4, 0.3)[None]                                      # [1, 4, 384]: normal patches
    bent = unit_rows(rng, 1, 384)                                                # a shape unlike any bank image
    assert not without.is_anomalous(without.score_features(patches).scores)[0]
    result = with_term.score_features(patches, images=bent)
    assert with_term.is_anomalous(result.scores)[0]
    assert result.scores[0] == result.image_term_scores[0]                       # the term set the score
    usual = near(rng, images.mean(axis=0) / np.linalg.norm(images.mean(axis=0)), 1, 0.0)
    assert not with_term.is_anomalous(with_term.score_features(patches, images=usual).scores)[0]


def test_a_model_with_an_image_term_needs_the_image_descriptors(rng):
    feats, images, _ = good_parts(rng, 6)
    model = Model.fit_features(feats, config=CFG, images=images)
    with pytest.raises(ValueError, match="image descriptors"):
        model.score_features(feats[:1])
    with pytest.raises(ValueError, match="image descriptor"):
        Model.fit_features(feats, config=CFG)


def test_the_image_term_is_saved_loaded_and_part_of_the_model_id(rng, tmp_path):
    feats, images, _ = good_parts(rng, 6)
    model = Model.fit_features(feats, config=CFG, images=images, weights=WEIGHTS)
    manifest = model.save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.stats.image_term.vectors, model.stats.image_term.vectors)
    np.testing.assert_allclose(loaded.score_features(feats, images=images).scores,
                               model.score_features(feats, images=images).scores, rtol=1e-6)
    edited = json.loads((tmp_path / "m" / "manifest.json").read_text())
    edited["image_term"]["image_log_std"] *= 2
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match="hashes to"):
        Model.load(tmp_path / "m")
    assert manifest["image_term"]["vectors"] == "image_vectors.npy"


def test_an_update_adds_the_new_bank_images_and_lowers_the_parents_image_distances(rng, tmp_path):
    feats, images, kind = good_parts(rng, 12)
    parent = Model.fit_features(feats[:6], config=dataclasses.replace(CFG, calibration="holdout"),
                                images=images[:6], paths=[f"old{i}" for i in range(6)], weights=WEIGHTS)
    parent.save(tmp_path / "p")
    child = parent.update_features(feats[6:8], images=images[6:8], paths=["new0", "new1"])   # too few to hold out
    np.testing.assert_array_equal(child.stats.image_term.vectors,
                                  np.concatenate([parent.stats.image_term.vectors, images[6:8]]))
    before = parent.stats.calibration_patches
    expected = np.minimum(before.image_distances, image_distances(before.images, images[6:8]))
    np.testing.assert_allclose(child.stats.calibration_patches.image_distances, expected, atol=1e-6)


def test_backbone_tokens_carry_the_global_block_after_the_patch_blocks():
    px = np.random.default_rng(0).integers(0, 255, (2, 28, 28, 3), dtype=np.uint8)
    plain = FeatureExtractor(config=ModelConfig(image_size=28, tiles=1, blocks=(4, 5), align=False), device="cpu")
    extractor = FeatureExtractor(config=ModelConfig(image_size=28, tiles=1, blocks=(4, 5), global_block=4, align=False),
                                 device="cpu")
    tokens = extractor.tokens(px)                                                  # [2, 4, 3 * 384]
    np.testing.assert_allclose(tokens[..., :768], plain.tokens(px), atol=1e-5)
    block4 = FeatureExtractor(config=ModelConfig(image_size=28, tiles=1, blocks=(4,)), device="cpu").tokens(px)
    np.testing.assert_allclose(tokens[..., 768:], block4, atol=1e-5)
    features, foreground, descriptors = extractor.describe_all(px)
    np.testing.assert_allclose(features, plain.describe(px)[0], atol=1e-5)
    np.testing.assert_allclose(descriptors, image_descriptors(block4), atol=1e-5)
    batch = {"path": np.array(["a", "b"], dtype=object), "error": np.array(["", ""], dtype=object), "pixels": px}
    assert extractor(batch)["image"].shape == (2, 384) and "image" not in plain(batch)


def test_a_global_block_beyond_the_backbone_is_refused():
    with pytest.raises(ValueError, match=r"global_block=12 must be a block index in 0\.\.11"):
        ModelConfig(global_block=12)


def test_an_aligned_fit_describes_each_image_in_its_canonical_pose():
    """Model.fit and Model.score take the image descriptors of the aligned pixels, as the patches."""
    from tests.test_model import parts
    cfg = ModelConfig(image_size=56, tiles=1, blocks=(5,), global_block=3, align=True, coreset_ratio=0.5)
    good = parts(6, 0)
    model = Model.fit(good, config=cfg, device="cpu")
    aligned = FeatureExtractor(config=cfg, device="cpu").describe_all(align_images(good)[0])[2]
    np.testing.assert_allclose(np.sort(model.stats.image_term.vectors, axis=0), np.sort(aligned, axis=0), atol=1e-5)
    result = model.score(good[:2], maps=False)
    np.testing.assert_allclose(result.image_term_scores, model.stats.image_term.in_score_units(
        image_distances(aligned[:2], model.stats.image_term.vectors)), rtol=1e-5)
