"""Fit and score through Ray Data on generated real-texture images; results read back with DuckDB."""

import json
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from anomaly_core import decode_heatmap, metrics
from anomaly_core.artifact import content_id
from anomaly_core.schema import HEATMAP_COLUMNS
from jobs.cli import main
from jobs.score import run_score


@pytest.fixture(scope="module")
def model(fitted_model_dir):
    return fitted_model_dir


@pytest.fixture(scope="module")
def scored(model, texture_dataset, tmp_path_factory):
    archive = tmp_path_factory.mktemp("archive")
    shutil.copytree(texture_dataset / "test", archive / "test")
    (archive / "test" / "defect" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (archive / "test" / "good" / "empty.jpg").write_bytes(b"")
    out = tmp_path_factory.mktemp("out") / "scores"
    summary = run_score(str(archive), str(model[0]), str(out), batch_size=8)
    return out, summary


def rows(out, sql):
    """Run `sql` with {T} standing for the scored table."""
    return duckdb.execute(sql.format(T=f"read_parquet('{out}/**/*.parquet', hive_partitioning=1)")).fetchall()


@pytest.mark.integration
def test_fit_writes_a_calibrated_model(model):
    path, manifest = model
    assert (path / "manifest.json").is_file() and (path / "bank-00000.faiss").is_file()
    stats = manifest["stats"]
    # 10 images are too few for a 1% quantile: cross-fitted in 5 folds, then all 10 enter the bank
    assert stats["n_images"] == stats["n_calibration_images"] == 10 and stats["calibration_split"] == "crossfit-5"
    assert stats["bank_size"] == int(np.ceil(0.1 * 10 * 64))
    assert manifest["calibration"]["threshold"] >= manifest["calibration"]["normal_max"]


@pytest.mark.integration
def test_every_image_gets_one_row_and_bad_ones_an_error(scored):
    out, summary = scored
    assert summary["images"] == 12 and summary["errors"] == 2
    bad = rows(out, "SELECT uri, verdict, error FROM {T} WHERE status = 'error' ORDER BY uri")
    assert [r[0].rsplit("/", 1)[1] for r in bad] == ["corrupt.png", "empty.jpg"]
    assert all(r[1] == "error" and r[2] for r in bad)


@pytest.mark.integration
def test_defects_score_above_normal_parts(scored):
    out, _ = scored
    r = rows(out, "SELECT uri LIKE '%/defect/%', score FROM {T} WHERE status = 'ok'")
    labels, scores = np.array([x[0] for x in r]), np.array([x[1] for x in r])
    assert metrics.auroc(labels, scores) >= 0.9


@pytest.mark.integration
def test_output_columns_and_heatmap_decoding(scored, model):
    out, summary = scored
    cols = {r[0] for r in duckdb.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{out}/**/*.parquet', hive_partitioning=1)").fetchall()}
    assert {"uri", "content_sha256", "width", "height", "score", "score_normalised", "verdict", "threshold",
            "heatmap_grid", "heatmap_size", "heatmap_sigma", "heatmap_pose", "heatmap_png", "peak_x", "peak_y",
            "model_id", "run_id", "run_time", "run_date", "status", "error"} <= cols
    row = dict(zip(["model_id", "run_id", *HEATMAP_COLUMNS], rows(
        out, f"SELECT model_id, run_id, {', '.join(HEATMAP_COLUMNS)} FROM {{T}} "
             "WHERE status = 'ok' ORDER BY score DESC LIMIT 1")[0], strict=True))
    heat = decode_heatmap(row)
    assert heat.shape == (112, 112) and np.isfinite(heat).all() and row["heatmap_png"] is None
    assert row["model_id"] == model[1]["model_id"] and row["run_id"] == summary["run_id"]
    assert rows(out, "SELECT count(*) FROM {T} WHERE NOT isnan(image_term_score)") == [(0,)]   # no image term


def test_cli_fit_rejects_bad_config_before_starting(texture_dataset, tmp_path):
    res = CliRunner().invoke(main, ["fit", str(texture_dataset), str(tmp_path / "m"), "--image-size", "100"])
    assert res.exit_code != 0 and "multiple of 14" in res.output


@pytest.mark.integration
def test_cli_evaluate_writes_metrics(ray_local, texture_dataset, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", str(texture_dataset), "--out", str(tmp_path),
                                    "--image-size", "112", "--blocks", "6", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "n_train", "n_test", "fit_seconds",
                "score_seconds"):
        assert key in m
    assert m["n_train"] == 10 and m["n_test"] == 10 and m["image_auroc"] >= 0.9
    assert m["threshold_method"] == "lognormal_tail" and m["calibration_split"] == "crossfit-5"
    assert 0 <= m["recall_at_0.01_false_alarms"] <= m["recall_at_0.05_false_alarms"] <= 1
    assert 0 <= m["peak_on_defect"] <= 1 and 0 <= m["missed_with_peak_on_defect"] <= m["n_test_anomalous"]
    per_image = duckdb.execute(f"SELECT count(*), count(peak_on_defect), sum(peak_on_defect::INT), "
                               f"min(defect_area) FROM '{tmp_path}/per_image.parquet'").fetchone()
    assert per_image[:3] == (10, m["n_test_anomalous"], round(m["peak_on_defect"] * m["n_test_anomalous"]))
    assert 0 < per_image[3] < 1


def test_evaluate_names_the_small_defect_options_only_for_small_missed_defects():
    from jobs.evaluate import missed_note
    assert missed_note(missed=0, defective=9, median_area=0.001, recall_at_5=0.5) is None
    small = missed_note(missed=3, defective=9, median_area=0.002, recall_at_5=0.5)
    assert "3 of 9" in small and "0.20% of the image" in small and "--blocks 2,4 --global-block 4" in small
    large = missed_note(missed=3, defective=9, median_area=0.05, recall_at_5=0.5)
    assert "--false-alarm-rate" in large and "--blocks" not in large and "0.50 at 5%" in large


def test_peak_findings_skip_normal_images_and_masks_that_vanished_in_the_resize():
    from jobs.evaluate import peak_findings
    masks = np.zeros((4, 8, 8), dtype=bool)
    maps = np.zeros((4, 8, 8))
    masks[0, 2, 2] = masks[1, 6, 6] = True                    # two defects; image 2's mask is empty, 3 is normal
    maps[:, 2, 3] = 1.0                                       # every peak at (2, 3): one pixel from defect 0
    located, on_defect = peak_findings(masks, maps, defective=np.array([True, True, True, False]), tolerance=1)
    np.testing.assert_array_equal(located, [True, True, False, False])
    np.testing.assert_array_equal(on_defect, [True, False, False, False])


@pytest.mark.integration
def test_evaluate_without_masks_writes_image_metrics_and_null_pixel_metrics(ray_local, texture_dataset, tmp_path,
                                                                           caplog):
    import shutil
    data = tmp_path / "no_masks"
    shutil.copytree(texture_dataset, data, ignore=shutil.ignore_patterns("ground_truth"))
    res = CliRunner().invoke(main, ["evaluate", str(data), "--out", str(tmp_path / "ev"),
                                    "--image-size", "112", "--blocks", "6", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["pixel_auroc"] is None and m["aupro"] is None and m["n_defective_without_mask"] == 6
    assert m["image_auroc"] >= 0.9 and m["f1_max"] > 0
    assert "no ground-truth mask" in (tmp_path / "ev" / "report.html").read_text()


def test_fit_refuses_a_memory_budget_its_coreset_cannot_fit_before_any_work():
    from anomaly_core.config import ModelConfig
    from jobs.fit import check_budget
    with pytest.raises(ValueError, match="lower --coreset-ratio"):
        check_budget(ModelConfig(), 10 ** 8, 4096)                     # 2 x 10^7 survivors x 896 floats
    check_budget(ModelConfig(coreset_ratio=0.001), 10 ** 7, 4096)      # 10^4 x 2: fits


@pytest.mark.integration
def test_tiled_augmented_fit_and_score_through_ray(ray_local, texture_dataset, tmp_path):
    """The fit job augments only bank images (not the held-out ones) and counts each once; heatmaps cover
    the stitched input."""
    from anomaly_core.config import ModelConfig
    from jobs.fit import run_fit
    cfg = ModelConfig(image_size=56, blocks=(3,), tiles=2, tile_overlap=2, augment="flips", calibration="holdout")
    manifest = run_fit(str(texture_dataset / "train" / "good"), str(tmp_path / "m"), config=cfg, batch_size=4)
    stats = manifest["stats"]
    assert (stats["n_train_images"], stats["n_calibration_images"]) == (8, 2)
    assert stats["n_train_patches"] == 8 * 4 * cfg.grid_size ** 2             # 4 flips of each bank image
    run_score(str(texture_dataset / "test"), str(tmp_path / "m"), str(tmp_path / "out"), batch_size=4,
              heatmap_png=True)
    (values,) = rows(tmp_path / "out", f"SELECT {', '.join(HEATMAP_COLUMNS)} FROM {{T}} LIMIT 1")
    row = dict(zip(HEATMAP_COLUMNS, values, strict=True))
    from_grid, from_png = decode_heatmap(row), decode_heatmap(row | {"heatmap_grid": None})
    assert from_grid.shape == (cfg.input_size, cfg.input_size) == (84, 84)
    assert np.abs(from_grid - from_png).max() <= (row["heatmap_max"] - row["heatmap_min"]) / 510 + 1e-3


@pytest.mark.integration
def test_the_fit_job_records_the_training_images_sizes_in_the_model_id(fitted_model_dir):
    _, manifest = fitted_model_dir
    assert manifest["stats"]["input_sizes"] == {"min_side": 112, "max_side": 112, "min_aspect": 1.0, "max_aspect": 1.0}
    edited = json.loads(json.dumps(manifest))
    edited["stats"]["input_sizes"]["max_side"] = 4000                        # widen what gets a verdict
    assert content_id(edited) != manifest["model_id"]


@pytest.mark.integration
def test_an_image_term_fits_and_scores_through_ray_as_in_process(ray_local, texture_dataset, tmp_path):
    """The fit job carries each image's descriptor through Ray's blocks (augmented copies too); the score
    job's scores are the in-process model's."""
    from anomaly_core.config import ModelConfig
    from anomaly_core.images import decode_image, resize_square
    from anomaly_core.model import Model
    from jobs.fit import run_fit
    cfg = ModelConfig(image_size=56, blocks=(3,), global_block=2, tiles=1, augment="flips", calibration="holdout")
    manifest = run_fit(str(texture_dataset / "train" / "good"), str(tmp_path / "m"), config=cfg, batch_size=4)
    model = Model.load(tmp_path / "m")
    assert len(model.stats.image_term.vectors) == 8 * 4 and "image_term" in manifest       # 4 flips of 8 images
    run_score(str(texture_dataset / "test"), str(tmp_path / "m"), str(tmp_path / "out"), batch_size=4)
    got = {uri: (score, term) for uri, score, term in rows(tmp_path / "out",
                                                           "SELECT uri, score, image_term_score FROM {T}")}
    paths = sorted((texture_dataset / "test").rglob("*.png"))
    pixels = np.stack([resize_square(decode_image(p.read_bytes()), cfg.input_size) for p in paths])
    expected = model.score(pixels, maps=False)
    assert [got[str(p)][0] for p in paths] == pytest.approx(expected.scores.tolist(), rel=1e-4)
    assert [got[str(p)][1] for p in paths] == pytest.approx(expected.image_term_scores.tolist(), rel=1e-4)


@pytest.mark.integration
def test_the_fit_job_runs_the_alignment_trial_as_an_in_process_fit_does(ray_local, tmp_path):
    """16 good parts at random angles: the job reads the trial's sample through Ray, decides to align as
    Model.fit decides on the same images, and records the same trial."""
    from PIL import Image

    from anomaly_core.config import ModelConfig
    from anomaly_core.model import Model
    from jobs.fit import run_fit
    from tests.helpers import TEST_CONFIG_KW, textured_part
    cfg = ModelConfig(**TEST_CONFIG_KW)
    rng = np.random.default_rng(3)
    px = np.stack([textured_part(a, cfg.input_size, rng) for a in rng.uniform(-np.pi, np.pi, 16)])
    (tmp_path / "good").mkdir()
    names = [str(tmp_path / "good" / f"{i:03d}.png") for i in range(len(px))]
    for name, img in zip(names, px, strict=True):
        Image.fromarray(img).save(name)
    manifest = run_fit(str(tmp_path / "good"), str(tmp_path / "m"), config=cfg, batch_size=8)
    local = Model.fit(px, config=cfg, names=names, device="cpu")
    assert manifest["config"]["align"] is True is local.config.align
    trial = manifest["stats"]["alignment_trial"]
    assert trial["images"] == 16
    assert trial["aligned"] == pytest.approx(local.stats.alignment_trial.aligned, rel=1e-4)
    assert trial["unaligned"] == pytest.approx(local.stats.alignment_trial.unaligned, rel=1e-4)
    loaded = Model.load(str(tmp_path / "m")).stats.alignment_trial
    assert (loaded.images, loaded.unaligned, loaded.aligned) == (16, trial["unaligned"], trial["aligned"])
