"""The HTML report and the single-image overlay, checked in a real headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_core.artifact import FORMAT, FORMAT_VERSION, MANIFEST
from anomaly_core.storage import StorageOptions
from jobs.cli import main
from jobs.labels import append_labels
from jobs.report import calibration_reference, mark_peak, overlay, write_report
from tests.helpers import make_bucket, upload
from tests.scored_output import NORMAL_MEAN, NORMAL_STD, THRESHOLD, move_images, write_output
from tests.test_review import as_parquet_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium (Makefile); elsewhere the browser test says why it did not run.
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                   reason="Chromium not installed (make test installs Debian's chromium)")


def rendered_dom(html_file, tmp_path) -> str:
    """DOM after load, as headless Chromium sees it (no network: the file is self-contained)."""
    assert CHROMIUM, "Chromium is required here: apt-get install chromium"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--virtual-time-budget=5000", "--dump-dom", f"file://{html_file}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_overlay_keeps_size_and_marks_hot_regions():
    image = np.full((40, 60, 3), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:, 4:] = 1.0                                                   # right half anomalous
    out = overlay(image, heat, threshold=0.5)
    assert out.shape == image.shape
    assert np.abs(out[:, 45:].astype(int) - 128).mean() > np.abs(out[:, :15].astype(int) - 128).mean()


def test_mark_peak_rings_the_point_and_leaves_it_visible():
    image = np.zeros((100, 100, 3), np.uint8)
    out = mark_peak(image, 30, 60)
    changed = np.argwhere(out.any(axis=2))                              # [n, 2] (y, x) of ring pixels
    dist = np.hypot(changed[:, 0] - 60, changed[:, 1] - 30)
    assert len(changed) > 0 and dist.min() >= 2 and dist.max() <= 4 + 1    # radius 4% of 100 px, about 1 wide
    assert not out[60, 30].any() and not image.any()                   # the point itself and the input untouched


@pytest.fixture(scope="module")
def report_file(nightly_output, tmp_path_factory):
    out, _ = nightly_output
    uris = duckdb.execute(f"SELECT DISTINCT uri FROM read_parquet('{out}/**/*.parquet')").fetchall()
    labels = {u: "good" if "/good_" in u else "defect" for (u,) in uris}
    return write_report(str(out), str(tmp_path_factory.mktemp("rep") / "report.html"), top=4, labels=labels)


@pytest.mark.integration
def test_report_is_self_contained(report_file):
    text = report_file.read_text()
    assert "src='data:image/png;base64," in text and "src='http" not in text and "src='file" not in text
    assert "Top 4 anomalies" in text and "broken.png" in text and "ROC curve" in text


@pytest.mark.integration
@needs_browser
def test_report_renders_in_chromium_with_every_image(report_file, tmp_path):
    dom = rendered_dom(report_file, tmp_path)
    assert 'data-broken-images="0"' in dom, dom[-500:]
    n = int(dom.split('data-images="')[1].split('"')[0])
    assert n >= 1 + 2 * 4 + 1                                          # histogram, 4 pairs, ROC


@pytest.mark.integration
def test_show_writes_an_overlay_png(fitted_model_dir, texture_dataset, tmp_path):
    image = sorted((texture_dataset / "test" / "defect").glob("*.png"))[0]
    res = CliRunner().invoke(main, ["show", str(image), "--model", str(fitted_model_dir[0]), "--device", "cpu",
                                    "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])                   # logs go to stderr
    w, h = Image.open(image).size
    assert Image.open(tmp_path / "o.png").size == (2 * w, h) and info["verdict"] in ("anomalous", "normal")


def test_report_cli_on_missing_output_says_what_to_do(tmp_path):
    (tmp_path / "scores").mkdir()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "scores")])
    assert res.exit_code == 1 and "run `anomaly score" in res.output and "Traceback" not in res.output


CALIBRATION = {"threshold": THRESHOLD, "normal_mean": NORMAL_MEAN, "normal_std": NORMAL_STD, "normal_max": 0.33,
               "n_images": 40, "false_alarm_rate": 0.05}


def test_calibration_reference_is_in_normalised_units():
    ref = calibration_reference({"calibration": CALIBRATION, "stats": {}})
    span = THRESHOLD - NORMAL_MEAN
    assert ref["median"] == 0 and ref["p95"] == pytest.approx(1.6449 * NORMAL_STD / span)
    assert ref["p05"] == pytest.approx(-ref["p95"]) and ref["max"] == pytest.approx((0.33 - NORMAL_MEAN) / span)
    assert (ref["images"], ref["false_alarm_rate"], ref["basis"]) == (40, 0.05, "normal fit")


def test_calibration_reference_uses_the_recorded_held_out_scores():
    scores = np.random.default_rng(0).lognormal(np.log(NORMAL_MEAN), 0.2, 40)
    ref = calibration_reference({"calibration": CALIBRATION, "stats": {"calibration_scores": scores.tolist()}})
    norm = (scores - NORMAL_MEAN) / (THRESHOLD - NORMAL_MEAN)
    assert ref["basis"] == "held-out scores" and ref["median"] == pytest.approx(np.median(norm))
    assert ref["p25"] == pytest.approx(np.quantile(norm, 0.25)) and ref["p95"] == pytest.approx(np.quantile(norm, 0.95))


def test_report_flags_the_drifted_night_and_shows_reviewed_precision(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-20": 40, "2026-11-21": 40}, shift={"2026-11-21": 0.1}, defect_rate=0.1,
                        images=tmp_path / "archive", seed=6).to_pylist()
    flagged = [r for r in rows if r["verdict"] == "anomalous"]
    append_labels(str(out), [{**r, "label": "defect"} for r in flagged], reviewer="ana")
    text = write_report(str(out), str(tmp_path / "r.html"), top=2,
                        manifest={"calibration": CALIBRATION, "stats": {}}).read_text()
    assert "DRIFT on 1 of 2 nights: 2026-11-21 (median +" in text
    assert "<td>calibration</td><td>40 held-out</td>" in text and "5.0% target" in text
    assert "Reviewed verdicts" in text and "<td>1.00</td>" in text                    # every flag confirmed


def test_the_report_shows_images_read_from_tar_shard_members(tmp_path):
    out = tmp_path / "scores"
    write_output(out, {"2026-11-21": 8}, seed=4, defect_rate=0.5, images=tmp_path / "archive", tar=True)
    text = write_report(str(out), str(tmp_path / "r.html"), top=3).read_text()
    cards = re.findall(r"<img alt='image' src='data:image/png;base64,([^']+)'>.*?<code>([^<]+)</code>", text)
    assert len(cards) == 3 and "no longer readable" not in text
    for b64, uri in cards:
        shard, member = uri.split("#", 1)
        with tarfile.open(shard) as tf:                                  # the reference: the member's pixels
            want = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))), want)   # lossless PNG


def test_the_report_shows_the_passed_defects_it_is_given_highest_score_first(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-21": 8}, seed=4, defect_rate=0.5, images=tmp_path / "archive")
    by_score = sorted(zip(rows["score"].to_pylist(), rows["uri"].to_pylist(), strict=True))
    passed = [u for _, u in by_score[:3]]                                # the three lowest scores, ascending
    text = write_report(str(out), str(tmp_path / "r.html"), top=2, passed_defects=passed).read_text()
    section = text.split("Defects the heatmap finds and the verdict passes (2 of 3 shown)")[1]
    assert re.findall(r"<code>([^<]+)</code>", section)[:2] == [passed[2], passed[1]]


def test_the_report_command_reads_a_parquet_table_by_the_columns_it_was_scored_with(tmp_path):
    out, archive, html_file = tmp_path / "scores", tmp_path / "archive", tmp_path / "r.html"
    write_output(out, {"2026-11-21": 6}, seed=4, defect_rate=0.5, images=archive, tar=True)
    as_parquet_table(out, archive, "2026-11-21")
    res = CliRunner().invoke(main, ["report", str(out), "--html", str(html_file), "--top", "3",
                                    "--image-column", "png", "--id-column", "name"])
    assert res.exit_code == 0, res.output
    text = html_file.read_text()
    assert text.count("<img alt='image' src='data:image/png;base64,") == 3 and "no longer readable" not in text
    assert "2026-11-21.parquet#product=" in text
    assert CliRunner().invoke(main, ["report", str(out), "--html", str(html_file), "--top", "3"]).exit_code == 0
    assert html_file.read_text().count("original image no longer readable") == 3    # no column "image" there


@pytest.mark.integration
def test_the_report_reads_images_of_a_tar_shard_on_s3(tmp_path, s3_server):
    out, archive = tmp_path / "scores", tmp_path / "archive"
    write_output(out, {"2026-11-21": 4}, seed=4, defect_rate=0.5, images=archive, tar=True)
    make_bucket(s3_server.url, "report-shards")
    options = StorageOptions(endpoint_url=s3_server.url, max_attempts=2)
    upload(archive, "s3://report-shards/archive", options)
    shutil.rmtree(archive)                                             # only the copy on S3 is left
    move_images(out, str(archive), "s3://report-shards/archive")
    text = write_report(str(out), str(tmp_path / "r.html"), top=2, options=options).read_text()
    assert text.count("<img alt='image' src='data:image/png;base64,") == 2 and "no longer readable" not in text
    assert "<code>s3://report-shards/archive/2026-11-21.tar#product=" in text


def test_report_with_model_draws_the_models_calibration(tmp_path):
    out, model = tmp_path / "scores", tmp_path / "model"
    write_output(out, {"2026-11-21": 40}, seed=5)
    model.mkdir()                                    # the manifest fields the report reads
    (model / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                              "calibration": CALIBRATION, "stats": {}}))
    html_file = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(out), "--html", str(html_file), "--model", str(model)])
    assert res.exit_code == 0, res.output
    assert "<td>calibration</td><td>40 held-out</td>" in html_file.read_text()
    assert CliRunner().invoke(main, ["report", str(out), "--html", str(html_file)]).exit_code == 0
    assert "<td>calibration</td>" not in html_file.read_text()


def test_a_card_says_when_the_image_level_term_set_the_score():
    from jobs.report import set_by_image_term
    assert set_by_image_term({"score": 0.4, "image_term_score": 0.4})
    assert not set_by_image_term({"score": 0.4, "image_term_score": 0.2})          # a patch set it
    assert not set_by_image_term({"score": 0.4, "image_term_score": float("nan")})  # no image term
    assert not set_by_image_term({"score": 0.4, "image_term_score": None})          # an older output
