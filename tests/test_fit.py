"""The fit recipe on feature blocks: calibration split, blocks, bank and threshold, statistics; the fit
job's split of names known only once shards are read."""

import dataclasses

import numpy as np
import pytest

from anomaly_core.config import SHARP_TOP_FRACTION, SMOOTH_TOP_FRACTION, ModelConfig
from anomaly_core.fit import (
    CalibrationPatches,
    FitStats,
    bank_patches,
    feature_blocks,
    fit_bank,
    fitted_config,
    patch_estimate,
    split_calibration,
)
from anomaly_core.index import MemoryBank
from anomaly_core.scoring import image_scores
from tests.helpers import FLOAT16_ROUNDING, unit_rows

# top_fraction given: fit_bank takes a fitted config (fitted_config resolves None)
HOLDOUT = ModelConfig(image_size=28, tiles=1, blocks=(5,), coreset_ratio=1.0, calibration="holdout", top_fraction=0.01)
CROSSFIT = dataclasses.replace(HOLDOUT, calibration="crossfit", crossfit_folds=3)


def test_the_split_is_deterministic_and_order_free():
    paths = [f"img{i}.png" for i in range(20)]
    for cfg in (HOLDOUT, CROSSFIT):
        a = split_calibration(paths, config=cfg).fold
        b = split_calibration(paths[::-1], config=cfg).fold[::-1]
        np.testing.assert_array_equal(a, b)
    assert (split_calibration(paths, config=HOLDOUT).fold == 0).sum() == 4                    # 20%
    assert np.bincount(split_calibration(paths, config=CROSSFIT).fold).tolist() == [7, 7, 6]


def test_auto_cross_fits_when_the_holdout_is_too_small_for_the_rate():
    auto = dataclasses.replace(HOLDOUT, calibration="auto", false_alarm_rate=0.05)        # quantile needs 19
    assert split_calibration([str(i) for i in range(90)], config=auto).crossfit              # 18 held: too few
    assert not split_calibration([str(i) for i in range(95)], config=auto).crossfit          # 19 held: enough
    few = split_calibration(list("abcd"), config=auto)
    assert few.crossfit and few.n_folds == 4 and sorted(few.fold) == [0, 1, 2, 3]              # leave-one-out


def test_the_fit_averages_fewer_patches_only_where_its_threshold_is_a_quantile():
    auto = dataclasses.replace(HOLDOUT, calibration="auto", top_fraction=None)   # 5%: the sharper score needs 39

    def chosen(n: int, config: ModelConfig = auto, copies: int = 1) -> float:
        names = [str(i) for i in range(n)]
        plan = split_calibration(names, config=config)
        # augmented copies are rows of their own with their image's name and fold: counted once
        plan = dataclasses.replace(plan, fold=np.tile(plan.fold, copies))
        return fitted_config(config, plan=plan, names=names * copies).top_fraction

    # cross-fitted on 19-38 images the 5% quantile is the largest score: one image would set the threshold
    assert chosen(18) == chosen(38) == chosen(38, copies=4) == SMOOTH_TOP_FRACTION
    assert chosen(39) == SHARP_TOP_FRACTION                                    # cross-fitted on 39: 2 at or above
    assert chosen(195) == SHARP_TOP_FRACTION                                   # 39 held out
    assert chosen(190) == SMOOTH_TOP_FRACTION                                  # 38 held out
    one_percent = dataclasses.replace(auto, false_alarm_rate=0.01)            # cross-fits up to 494 images
    assert chosen(199, one_percent) == SHARP_TOP_FRACTION and chosen(198, one_percent) == SMOOTH_TOP_FRACTION
    assert chosen(100, dataclasses.replace(auto, top_fraction=0.05)) == 0.05                     # given: kept


def test_a_fit_says_when_its_largest_calibration_score_is_the_threshold(rng, caplog):
    def logged(n: int) -> bool:
        f = unit_rows(rng, n * 4, 8).reshape(n, 4, 8)
        plan = split_calibration([str(i) for i in range(n)], config=CROSSFIT)
        caplog.clear()
        with caplog.at_level("INFO", logger="anomaly_core.fit"):
            fit_bank(feature_blocks(f, plan.fold, images_per_block=8), config=CROSSFIT, plan=plan, n_estimate=n * 4)
        return "the largest of the" in caplog.text

    assert logged(19) and not logged(39)                  # 5%: the 19th of 19 scores, the 38th of 39


def test_scoring_with_an_unfitted_image_score_says_what_to_set():
    unfitted = dataclasses.replace(HOLDOUT, top_fraction=None)
    with pytest.raises(ValueError, match="chosen by the fit"):
        image_scores(np.zeros((1, 2, 2), dtype=np.float32), **unfitted.score_options)


def test_a_fit_needs_two_images_to_cross_fit_and_three_to_hold_out():
    with pytest.raises(ValueError, match="at least 2 good images"):
        split_calibration(["a"], config=CROSSFIT)
    with pytest.raises(ValueError, match="3 with"):
        split_calibration(["a", "b"], config=HOLDOUT)


def test_patch_estimate_counts_augmented_copies():
    cfg = ModelConfig(image_size=56, tiles=1, blocks=(5,), augment="flips")       # 4 copies, 4 x 4 grid
    assert patch_estimate(3, config=cfg) == 3 * 4 * 16


def test_blocks_hold_their_rows_and_names(rng):
    f = unit_rows(rng, 5 * 4, 8).reshape(5, 4, 8)
    blocks = feature_blocks(f, np.array([-1, -1, 0, -1, 0]), images_per_block=2, paths=list("abcde"))
    assert [list(b["path"]) for b in blocks] == [["a", "b"], ["c", "d"], ["e"]]
    np.testing.assert_array_equal(np.concatenate([bank_patches(b, leave_out=0) for b in blocks]),
                                  f[[0, 1, 3]].reshape(-1, 8))
    assert sum(len(bank_patches(b, leave_out=None)) for b in blocks) == 5 * 4


def test_a_holdout_fit_calibrates_on_the_held_out_rows_only(rng):
    """Full bank (ratio 1): the threshold comes from the held-out images' nearest distances to the bank
    images alone; the statistics count what went where, unreadable rows included."""
    f = unit_rows(rng, 6 * 4, 384).reshape(6, 4, 384)                          # 2 x 2 grid
    plan = dataclasses.replace(split_calibration(list("abcdef"), config=HOLDOUT),
                               fold=np.array([-1, -1, -1, 0, 0, -1], np.int16))
    blocks = feature_blocks(f, plan.fold, images_per_block=4, paths=[f"i{k}" for k in range(6)])
    blocks[1]["error"][1] = "corrupt"                                                  # i5 is unreadable
    bank, cal, stats = fit_bank(blocks, config=HOLDOUT, plan=plan, n_estimate=4 * 4)
    ref = MemoryBank.build(f[:3].reshape(-1, 384))
    expected = ref.nearest(f[3:5].reshape(-1, 384)).reshape(2, 4).max(axis=1)         # top 1% of 4 = max
    assert bank.size == 12 and cal.normal_max == pytest.approx(float(expected.max()), abs=1e-5)
    assert isinstance(stats, FitStats) and stats.calibration_split == "holdout"
    assert (stats.n_images, stats.n_train_images, stats.n_calibration_images) == (5, 3, 2)
    assert stats.calibration_images == ["i3", "i4"] and stats.unreadable == [("i5", "corrupt")]
    assert FitStats.from_dict(stats.to_dict()) == stats


def test_a_cross_fit_scores_every_image_against_a_bank_without_its_fold_and_banks_them_all(rng):
    f = unit_rows(rng, 6 * 4, 384).reshape(6, 4, 384)
    plan = split_calibration([f"i{k}" for k in range(6)], config=CROSSFIT)
    blocks = feature_blocks(f, plan.fold, images_per_block=4, paths=[f"i{k}" for k in range(6)])
    bank, cal, stats = fit_bank(blocks, config=CROSSFIT, plan=plan, n_estimate=6 * 4)
    brute = [MemoryBank.build(f[plan.fold != k].reshape(-1, 384)).nearest(f[i]).max()
             for i, k in enumerate(plan.fold)]                                              # leave-fold-out
    assert bank.size == 24 and stats.calibration_split == "crossfit-3"
    assert (stats.n_train_images, stats.n_calibration_images) == (6, 6)
    assert sorted(stats.calibration_images) == [f"i{k}" for k in range(6)]
    assert cal.normal_max == pytest.approx(max(brute), abs=1e-5)
    assert cal.normal_mean == pytest.approx(np.mean(brute), abs=1e-5)
    # each recorded score beside its image's name: what an update recalibrates with (anomaly_core.update)
    by_name = dict(zip(stats.calibration_images, stats.calibration_scores, strict=True))
    assert [by_name[f"i{i}"] for i in range(6)] == pytest.approx(brute, abs=1e-5)


def test_old_manifest_stats_still_load():
    old = {"n_images": 10, "n_train_images": 8, "n_holdout_images": 2, "n_train_patches": 512, "bank_size": 52,
           "cover_radius": 0.1, "coreset_seconds": 0.5, "holdout_images": ["a", "b"], "unreadable": ["x.png"],
           "n_unreadable": 1, "feature_seconds": 1.0, "fit_seconds": 2.0}
    s = FitStats.from_dict(old)
    assert (s.n_calibration_images, s.calibration_split, s.unreadable) == (2, "holdout", [("x.png", "")])
    assert s.calibration_scores is None


def test_position_consistency_is_the_between_position_share_of_the_variance(rng):
    from anomaly_core.fit import position_consistency

    def consistency(d):                                                  # d: [images, positions]
        return position_consistency(len(d), d.sum(axis=0), (d ** 2).sum(axis=0))
    hot = np.tile(np.linspace(0.1, 0.5, 16), (30, 1))                   # every image: the same hot spots
    noise = rng.normal(0, 0.01, (30, 16))
    assert consistency(hot + noise) > 0.95 > 0.05 > consistency(0.3 + noise)
    d = rng.random((7, 5))
    between, within = d.mean(axis=0).var(), d.var(axis=0).mean()
    assert consistency(d) == pytest.approx(between / (between + within))


def test_fit_suggests_the_image_term_for_parts_but_not_for_textures():
    from anomaly_core.fit import layout_hints
    texture, part, fixtured = (layout_hints(c, config=ModelConfig()) for c in (0.016, 0.40, 0.69))
    assert texture == []
    assert len(part) == 1 and "--global-block 4" in part[0]
    assert "--global-block 4" in fixtured[0] and "--position-weight" in fixtured[1]


def test_fit_does_not_suggest_the_image_term_a_model_already_has():
    from anomaly_core.fit import layout_hints
    assert layout_hints(0.40, config=ModelConfig(global_block=4)) == []


def fit_on_random(rng, config: ModelConfig, **kw):
    f = unit_rows(rng, 6 * 4, 384).reshape(6, 4, 384)
    plan = split_calibration([f"i{k}" for k in range(6)], config=config)
    blocks = feature_blocks(f, plan.fold, images_per_block=4, paths=[f"i{k}" for k in range(6)])
    return fit_bank(blocks, config=config, plan=plan, n_estimate=6 * 4, **kw)


def test_auto_index_keeps_a_small_bank_exact_and_records_the_kind(rng):
    assert CROSSFIT.index == "auto"                                                  # the default
    bank, _, stats = fit_on_random(rng, CROSSFIT)
    assert bank.kind == stats.index == "flat"


def test_auto_index_builds_hnsw_beyond_the_target_devices_threshold(rng, monkeypatch):
    from anomaly_core import index
    monkeypatch.setitem(index.AUTO_FLAT_MAX, "cpu", 20)                             # the bank holds 24
    bank, _, stats = fit_on_random(rng, CROSSFIT)
    assert bank.kind == stats.index == "hnsw"
    bank, _, stats = fit_on_random(rng, CROSSFIT, search_device="cuda")             # exact search is cheap there
    assert bank.kind == stats.index == "flat"


def test_an_explicit_index_is_built_whatever_the_bank_size(rng):
    bank, _, stats = fit_on_random(rng, dataclasses.replace(CROSSFIT, index="hnsw"))
    assert bank.kind == stats.index == "hnsw"


def test_the_folds_of_the_split_are_set_on_the_blocks_when_a_pass_reads_them():
    """The fit job cuts its blocks before the names of shard images are known; block_of gives each image
    the fold of the split made once they are."""
    from ray.data.block import BlockAccessor

    from jobs.fit import GoodFeatures, block_names
    names = [f"s.tar#{i}.png" for i in range(6)]
    arrow = [BlockAccessor.batch_to_block(b) for b in feature_blocks(np.zeros((6, 4, 8), np.float32), np.full(6, -1),
                                                                    images_per_block=4, paths=names)]
    plan = split_calibration(names, config=CROSSFIT)
    good = GoodFeatures(blocks=arrow, names=names, plan=plan)
    assert [n for b in arrow for n in block_names(b)] == names
    np.testing.assert_array_equal(np.concatenate([good.block_of()(b)["fold"] for b in arrow]), plan.fold)
    hold = GoodFeatures(blocks=arrow, names=names, plan=split_calibration(names, config=HOLDOUT))
    assert hold.held == {n for n, k in zip(names, hold.plan.fold, strict=True) if k == 0} and len(hold.held) == 2
    assert hold.n_bank_images == 4


@pytest.mark.integration
@pytest.mark.parametrize("augment", ["none", "flips"])
def test_a_fit_from_tar_shards_lists_them_first_only_to_augment_and_makes_the_model_the_files_make(
        ray_local, texture_dataset, tmp_path, monkeypatch, augment):
    """Without augmentation each shard is read once: the split comes from the names in the feature
    blocks. With it, the held-out images must be known before the copies are made: the shards are
    listed first. Either way the model is the one the same images as files give."""
    from anomaly_core.shards import pack_tar
    from jobs import fit
    from tests.helpers import TEST_CONFIG_KW
    images = sorted((texture_dataset / "train" / "good").glob("*.png"))[:5]
    (tmp_path / "files").mkdir()
    for f in images:
        (tmp_path / "files" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tar").mkdir()
    for i, part in enumerate((images[:4], images[4:])):
        (tmp_path / "tar" / f"shard-{i:06d}.tar").write_bytes(pack_tar([(f.name, f.read_bytes()) for f in part]))
    listed = []
    shard_names = fit.shard_names
    monkeypatch.setattr(fit, "shard_names", lambda shards, **kw: listed.append(shards) or shard_names(shards, **kw))
    config = ModelConfig(**TEST_CONFIG_KW, augment=augment, calibration="holdout")
    by_tar = fit.run_fit(str(tmp_path / "tar"), str(tmp_path / "m_tar"), config=config, batch_size=4)
    by_files = fit.run_fit(str(tmp_path / "files"), str(tmp_path / "m_files"), config=config, batch_size=4)
    assert len(listed) == (augment != "none")
    assert by_tar["model_id"] == by_files["model_id"]
    banked = 3 * config.n_augment * config.grid_size ** 2                # 2 of the 5 held out, not augmented
    assert by_tar["stats"]["n_train_patches"] == by_files["stats"]["n_train_patches"] == banked
    assert [n.rsplit("#", 1)[1] for n in by_tar["stats"]["calibration_images"]] == \
        [n.rsplit("/", 1)[1] for n in by_files["stats"]["calibration_images"]]


def cosine_distance(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[..., D] rows -> [...] brute-force cosine distance to the nearest row of `bank` [M, D] (unit rows)."""
    return 1 - (x.astype(np.float64) @ bank.T.astype(np.float64)).max(-1)


def test_lowered_calibration_grids_score_as_the_grown_bank_scores_them_when_exact_and_above_otherwise(rng):
    cfg = dataclasses.replace(HOLDOUT, image_size=56, top_fraction=0.125)      # grid 4 x 4, topk_mean of 2
    bank, feats = unit_rows(rng, 20, 64), unit_rows(rng, 3 * 16, 64).reshape(3, 16, 64)
    patches = CalibrationPatches.of(cosine_distance(feats, bank), feats, stored=4)
    # image 0 loses its four stored patches to the added rows (a bound outside them then enters its score);
    # image 1 its farthest only (its 2nd..4th stored still top the rest); image 2 nothing
    added = np.concatenate([feats[0, patches.positions[0]], feats[1, patches.positions[1, :1]]])
    lowered = patches.lowered(added)
    g = cfg.grid_size

    def score(grids):
        return image_scores(np.asarray(grids, dtype=np.float32).reshape(-1, g, g), **cfg.score_options)
    exact_scores = score(cosine_distance(feats, np.concatenate([bank, added])))
    got, exact = score(lowered.grids), lowered.exact(config=cfg)
    assert exact.tolist() == [False, True, True]
    np.testing.assert_allclose(got[exact], exact_scores[exact], atol=1e-3)               # float16 features
    assert (got[~exact] >= exact_scores[~exact] - 1e-3).all() and got[0] > exact_scores[0]
    assert patches.exact(config=cfg).all()                                 # nothing lowered: all exact


def test_calibration_patches_of_a_fit_follow_its_calibration_images():
    rng = np.random.default_rng(3)
    g, d = HOLDOUT.grid_size, HOLDOUT.feature_dim
    feats = unit_rows(rng, 10 * g * g, d).reshape(10, g * g, d)
    plan = split_calibration([str(i) for i in range(10)], config=HOLDOUT)
    blocks = feature_blocks(feats, plan.fold, images_per_block=4)
    _, _, stats = fit_bank(blocks, config=HOLDOUT, plan=plan, n_estimate=8 * g * g)
    p = stats.calibration_patches
    rows = [int(n) for n in stats.calibration_images]
    assert len(p) == len(rows) == 2 and p.features.dtype == np.float16
    np.testing.assert_allclose(p.features.astype(np.float32),
                               np.take_along_axis(feats[rows], p.positions[:, :, None].astype(np.int64), 1), atol=1e-3)
    np.testing.assert_allclose(image_scores(p.grids.reshape(-1, g, g), **HOLDOUT.score_options),
                               stats.calibration_scores, rtol=1e-6)
    assert "calibration_patches" not in stats.to_dict()


def test_calibration_banks_search_exhaustively_beyond_their_cover_radius(rng):
    # every patch banked (ratio 1): cover radius 0 (up to the float16 rounding of an HNSW bank's vectors,
    # FLOAT16_ROUNDING), so each calibration row is searched exhaustively and an HNSW fit at
    # ef_search 1 calibrates as a flat fit, up to that rounding, though its graph alone misses
    config = dataclasses.replace(HOLDOUT, image_size=56, ef_search=1)
    f = unit_rows(rng, 40 * 16, 384).reshape(40, 16, 384)
    names = [f"i{k}" for k in range(40)]
    plan = split_calibration(names, config=config)

    def fit(index: str):
        cfg = dataclasses.replace(config, index=index)
        return fit_bank(feature_blocks(f, plan.fold, images_per_block=8, paths=names), config=cfg, plan=plan,
                        n_estimate=int((plan.fold != 0).sum()) * 16)

    hnsw_bank, hnsw_cal, hnsw_stats = fit("hnsw")
    flat_bank, flat_cal, _ = fit("flat")
    graph_only = MemoryBank.build(hnsw_bank.vectors(), kind="hnsw", ef_search=1)
    held = f[plan.fold == 0].reshape(-1, 384)
    assert (graph_only.nearest(held) > flat_bank.nearest(held) + 1e-6).any()          # the graph alone misses
    assert hnsw_bank.exact_above == hnsw_stats.cover_radius < FLOAT16_ROUNDING
    assert hnsw_cal.threshold == pytest.approx(flat_cal.threshold, abs=FLOAT16_ROUNDING)
