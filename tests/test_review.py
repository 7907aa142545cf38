"""The review page (jobs.review): its queries on a generated 100,000-row output, labels through the page,
the server behind `anomaly review`, and the page driven in a real headless Chromium."""

import contextlib
import datetime as dt
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_core.storage import StorageOptions
from jobs.cli import main
from jobs.labels import REVIEWER_ENV, append_labels, read_labels
from jobs.review import Filters, ReviewData
from tests.helpers import make_bucket, upload
from tests.scored_output import move_images, write_output

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(ReviewData, every row) of a generated output of 100,000 rows over four nights."""
    out = tmp_path_factory.mktemp("big") / "scores"
    rows = write_output(out, {f"2026-11-{d}": 25_000 for d in (19, 20, 21, 22)}, seed=3)
    return ReviewData(str(out), reviewer="ana"), rows


def reference(rows, *, verdict, product, line, score_min, score_max, date_from, date_to):
    """The rows a filter keeps, by brute force: [(uri, run_id, score)] sorted by score descending, then uri."""
    keep = pc.and_(pc.and_(pc.equal(rows["verdict"], verdict), pc.equal(rows["product"], product)),
                   pc.and_(pc.equal(rows["line"], line), pc.and_(pc.greater_equal(rows["score"], score_min),
                                                                  pc.less_equal(rows["score"], score_max))))
    dates = [dt.date.fromisoformat(d) for d in rows["run_date"].to_pylist()]
    sel = [k and date_from <= d <= date_to for k, d in zip(keep.to_pylist(), dates, strict=True)]
    got = [(u, r, s) for u, r, s, k in zip(rows["uri"].to_pylist(), rows["run_id"].to_pylist(),
                                           rows["score"].to_pylist(), sel, strict=True) if k]
    return sorted(got, key=lambda t: (-t[2], t[0], t[1]))


def test_a_filtered_page_of_100k_rows_is_the_brute_force_slice(big):
    data, rows = big
    want = dict(verdict="normal", product="tile", line="L1", score_min=0.1, score_max=0.3,
                date_from=dt.date(2026, 11, 20), date_to=dt.date(2026, 11, 21))
    expected = reference(rows, **want)
    page = data.rows(Filters(**want, offset=100, limit=50))
    assert page["total"] == len(expected) > 10_000
    assert [(r["uri"], r["run_id"], r["score"]) for r in page["rows"]] == expected[100:150]


def test_the_last_page_is_short_and_pages_never_overlap(big):
    data, rows = big
    f = dict(verdict="anomalous", product="brick", line="L2", score_min=0.0, score_max=9.0,
             date_from=dt.date(2026, 11, 19), date_to=dt.date(2026, 11, 22))
    expected = reference(rows, **f)
    pages = [data.rows(Filters(**f, offset=o, limit=200))["rows"] for o in range(0, len(expected), 200)]
    assert 0 < len(pages[-1]) <= 200 and [r["uri"] for p in pages for r in p] == [u for u, _, _ in expected]


def test_rows_sort_by_score_ascending_and_filter_by_uri(big):
    data, _ = big
    page = data.rows(Filters(q="/2026-11-22/product=tile/", sort="score_asc", limit=20))
    scores = [r["score"] for r in page["rows"]]
    assert scores == sorted(scores) and all("/2026-11-22/product=tile/" in r["uri"] for r in page["rows"])
    assert page["total"] == 12_500


def test_labels_filter_rows_and_show_beside_them(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-21": 40}, seed=1)
    data = ReviewData(str(out), reviewer="ana")
    first = rows.slice(0, 3).to_pylist()
    append_labels(str(out), [{**r, "label": lab} for r, lab in zip(first, ("normal", "defect", "normal"),
                                                                    strict=True)], reviewer="ben")
    labelled = data.rows(Filters(label="normal", sort="uri"))["rows"]
    assert [r["uri"] for r in labelled] == sorted([first[0]["uri"], first[2]["uri"]])
    assert all(r["label"] == "normal" and r["reviewer"] == "ben" for r in labelled)
    assert data.rows(Filters(label="unlabelled"))["total"] == 37 and data.rows(Filters(label="labelled"))["total"] == 3


def test_error_rows_sort_last_and_fall_outside_any_score_range(tmp_path):
    out = tmp_path / "scores"
    write_output(out, {"2026-11-21": 20}, errors=3, seed=1)
    data = ReviewData(str(out), reviewer="ana")
    for sort in ("score_desc", "score_asc"):
        assert [r["verdict"] for r in data.rows(Filters(sort=sort))["rows"]][-3:] == ["error"] * 3
    assert data.rows(Filters(score_min=-100.0))["total"] == 17


@pytest.mark.parametrize("params, match", [
    ({"verdict": "bad"}, "verdict='bad' is not one of anomalous, normal, review, error"),
    ({"sort": "random"}, "sort='random' is not one of score_desc"),
    ({"date_from": "22/11/2026"}, "date_from='22/11/2026' is not a date YYYY-MM-DD"),
    ({"limit": "5000"}, r"limit=5000 in \[1, 200\]"),
    ({"colour": "red"}, "unknown filter 'colour'; use date_from"),
])
def test_a_bad_filter_is_refused_naming_it(params, match):
    with pytest.raises(ValueError, match=match):
        Filters.parse(params)


@pytest.fixture
def small(tmp_path):
    """(ReviewData, rows) of a 12-image output whose images exist as files."""
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-21": 12}, seed=2, defect_rate=0.5, images=tmp_path / "archive")
    return ReviewData(str(out), reviewer="ana"), rows


def test_a_label_from_the_page_is_appended_under_the_images_hash(small):
    data, rows = small
    row = rows.to_pylist()[4]
    detail = data.label({"run_id": row["run_id"], "uri": row["uri"], "label": "normal", "comment": "new supplier"})
    assert detail["labels"][0]["label"] == "normal" and detail["labels"][0]["reviewer"] == "ana"
    (got,) = read_labels(data.out).to_pylist()
    assert (got["content_sha256"], got["uri"], got["comment"]) == (row["content_sha256"], row["uri"], "new supplier")


def test_the_detail_carries_the_image_level_term_null_without_one(small):
    data, rows = small
    row = rows.to_pylist()[0]
    assert data.row(row["run_id"], row["uri"])["image_term_score"] is None             # NaN: no image term


def test_a_label_of_no_row_or_of_a_bad_value_writes_nothing(small):
    data, rows = small
    row = rows.to_pylist()[0]
    with pytest.raises(KeyError, match="no row of run"):
        data.label({"run_id": row["run_id"], "uri": "/etc/passwd", "label": "normal"})
    with pytest.raises(ValueError, match="choose one of defect, normal"):
        data.label({"run_id": row["run_id"], "uri": row["uri"], "label": "fine"})
    assert read_labels(data.out).num_rows == 0


def test_the_overlay_is_the_image_with_its_rebuilt_heatmap_and_only_rows_are_served(small):
    data, rows = small
    row = next(r for r in rows.to_pylist() if r["verdict"] == "anomalous")
    image = np.asarray(Image.open(__import__("io").BytesIO(data.image(row["run_id"], row["uri"], "image", 240))))
    over = np.asarray(Image.open(__import__("io").BytesIO(data.image(row["run_id"], row["uri"], "overlay", 240))))
    assert image.shape == over.shape == (24, 32, 3)                   # 32 x 24 px originals, not enlarged
    # the generated defect is hot in its top-left quarter: the overlay changes it more than the rest
    change = np.abs(over.astype(int) - image.astype(int)).mean(axis=2)
    assert change[:12, :16].mean() > change[12:, 16:].mean()
    with pytest.raises(KeyError):
        data.image(row["run_id"], str(Path(row["uri"]).with_name("elsewhere.png")), "image", 240)
    with pytest.raises(ValueError, match="size=999 is not one of 240, 800"):
        data.image(row["run_id"], row["uri"], "image", 999)


def member_pixels(uri: str) -> np.ndarray:
    """[H, W, 3] uint8 pixels of the image `<tar>#<member>`, read with tarfile: the reference."""
    shard, member = uri.split("#", 1)
    with tarfile.open(shard) as tf:
        return np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB"))


def test_an_image_in_a_tar_shard_is_served_from_its_member_uri(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-21": 6}, seed=2, defect_rate=0.5, images=tmp_path / "archive", tar=True)
    data = ReviewData(str(out), reviewer="ana")
    uris = rows["uri"].to_pylist()
    originals = np.stack([member_pixels(u) for u in uris]).astype(int)             # [6, 24, 32, 3]
    for i, row in enumerate(rows.to_pylist()):
        assert ".tar#product=" in row["uri"]
        served = np.asarray(Image.open(io.BytesIO(data.image(row["run_id"], row["uri"], "image", 240))))
        assert served.shape == (24, 32, 3)
        # a JPEG of random pixels is far from them, but nearer to its own member than to any other
        assert np.abs(originals - served).mean(axis=(1, 2, 3)).argmin() == i
        assert Image.open(io.BytesIO(data.image(row["run_id"], row["uri"], "overlay", 240))).size == (32, 24)


@pytest.mark.integration
def test_images_in_a_tar_shard_on_s3_are_served_and_the_shard_is_fetched_once(tmp_path, s3_server):
    out, archive = tmp_path / "scores", tmp_path / "archive"
    rows = write_output(out, {"2026-11-21": 4}, seed=2, images=archive, tar=True)
    originals = np.stack([member_pixels(u) for u in rows["uri"].to_pylist()]).astype(int)
    make_bucket(s3_server.url, "review-shards")
    options = StorageOptions(endpoint_url=s3_server.url, max_attempts=2)
    upload(archive, "s3://review-shards/archive", options)
    shutil.rmtree(archive)                                             # only the copy on S3 is left
    move_images(out, str(archive), "s3://review-shards/archive")
    data = ReviewData(str(out), reviewer="ana", options=options)
    members = [u.split("#", 1)[1] for u in rows["uri"].to_pylist()]
    page = data.rows(Filters())["rows"]
    before = s3_server.requests
    data.image(page[0]["run_id"], page[0]["uri"], "image", 240)
    one_fetch = s3_server.requests - before
    for row in page:
        shard, member = row["uri"].split("#", 1)
        assert shard == "s3://review-shards/archive/2026-11-21.tar"
        served = np.asarray(Image.open(io.BytesIO(data.image(row["run_id"], row["uri"], "image", 240))))
        assert np.abs(originals - served).mean(axis=(1, 2, 3)).argmin() == members.index(member)
        data.image(row["run_id"], row["uri"], "overlay", 800)
    assert s3_server.requests - before == one_fetch > 0                 # 8 images of one shard: one fetch


def as_parquet_table(out: Path, archive: Path, night: str) -> Path:
    """Rewrite an output written with write_output(..., tar=True) as if its images had been scored from a
    Parquet table: the members of `<archive>/<night>.tar` become rows of `<archive>/<night>.parquet`
    (image bytes in column "png", member names in column "name"), the rows' uris `<table>#<name>`.
    Returns the table's path."""
    shard, table = archive / f"{night}.tar", archive / f"{night}.parquet"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    pq.write_table(pa.table({"png": [b for _, b in members], "name": [n for n, _ in members]}), table)
    shard.unlink()
    move_images(out, str(shard), str(table))
    return table


@pytest.mark.integration
def test_the_command_serves_images_of_a_parquet_table_by_its_image_and_id_columns(tmp_path):
    out, archive = tmp_path / "scores", tmp_path / "archive"
    rows = write_output(out, {"2026-11-21": 3}, seed=2, images=archive, tar=True)
    want = {u.split("#", 1)[1]: member_pixels(u) for u in rows["uri"].to_pylist()}
    table = as_parquet_table(out, archive, "2026-11-21")
    (row,) = [r for r in ReviewData(str(out), reviewer="ana").rows(Filters())["rows"]
              if r["uri"].endswith("000001.png")]
    assert row["uri"] == f"{table}#product=tile/line=L1/img_000001.png"
    query = urllib.parse.urlencode({"run_id": row["run_id"], "uri": row["uri"], "kind": "image", "size": 240})
    with review_server(out, "--image-column", "png", "--id-column", "name") as url:
        status, jpeg = request(f"{url}api/image?{query}")
    assert status == 200
    served = np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)
    nearest = min(want, key=lambda m: np.abs(want[m] - served).mean())   # a JPEG: nearest to its own pixels
    assert nearest == "product=tile/line=L1/img_000001.png"
    with review_server(out) as url:                                   # the default column "image": not there
        assert request(f"{url}api/image?{query}")[0] == 404


def test_an_error_row_cannot_be_labelled(tmp_path):
    out = tmp_path / "scores"
    rows = write_output(out, {"2026-11-21": 6}, errors=2, seed=1).to_pylist()
    data = ReviewData(str(out), reviewer="ana")
    bad = next(r for r in rows if r["status"] == "error")
    with pytest.raises(ValueError, match=f"{re.escape(bad['uri'])} was not scored .cannot decode image.: an "
                                         "error row has no image to label"):
        data.label({"run_id": bad["run_id"], "uri": bad["uri"], "label": "normal"})
    assert read_labels(data.out).num_rows == 0


def test_drift_compares_nights_with_the_models_calibration(tmp_path):
    out = tmp_path / "scores"
    write_output(out, {"2026-11-20": 400, "2026-11-21": 400}, shift={"2026-11-21": 0.1}, defect_rate=0.0)
    drift = ReviewData(str(out), reviewer="ana").drift()
    assert [(n["run_date"], n["drifted"]) for n in drift["nights"]] == [("2026-11-20", False), ("2026-11-21", True)]
    assert drift["reference"] is None and drift["figure"].startswith("data:image/png;base64,")


@pytest.mark.integration
def test_an_output_on_s3_is_reviewed_and_labelled_there(small, s3_server):
    data, rows = small
    make_bucket(s3_server.url, "review-tests")
    options = StorageOptions(endpoint_url=s3_server.url, max_attempts=2)
    upload(Path(data.out), "s3://review-tests/scores", options)
    remote = ReviewData("s3://review-tests/scores", reviewer="ana", options=options)
    assert [r["uri"] for r in remote.rows(Filters(sort="uri"))["rows"]] == sorted(rows["uri"].to_pylist())
    row = rows.to_pylist()[0]
    remote.label({"run_id": row["run_id"], "uri": row["uri"], "label": "normal"})
    assert read_labels("s3://review-tests/scores", options=options)["uri"].to_pylist() == [row["uri"]]
    assert read_labels(data.out).num_rows == 0                          # written to the output reviewed


def test_an_output_without_runs_is_refused_saying_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no complete run: run `anomaly score"):
        ReviewData(str(tmp_path), reviewer="ana")


def test_the_command_needs_a_reviewer_name(tmp_path, monkeypatch):
    monkeypatch.delenv(REVIEWER_ENV, raising=False)
    res = CliRunner().invoke(main, ["review", str(tmp_path)])
    assert res.exit_code == 1 and f"set the environment variable {REVIEWER_ENV}" in res.output


# ---- the server and the page ---------------------------------------------------------------------------------

@contextlib.contextmanager
def review_server(out, *args, reviewer="inspector"):
    """`anomaly review OUT --port 0 ...` as a process; yields the page's URL that it prints."""
    env = {**os.environ, REVIEWER_ENV: reviewer}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "review", str(out), "--port", "0", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        url = re.search(r"http://[^ ]+/", line)
        assert url, f"no address printed: {line!r} {proc.poll() is not None and proc.stderr.read()}"
        yield url.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def request(url, *, data=None, headers=None):
    """(status, body: parsed when JSON) of a request."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {})) as r:
            status, body, kind = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get_content_type()
    return status, json.loads(body) if kind == "application/json" else body


@pytest.mark.integration
def test_the_server_listens_on_loopback_and_refuses_foreign_hosts_and_forms(small):
    data, rows = small
    row = rows.to_pylist()[0]
    with review_server(data.out) as url:
        assert url.startswith("http://127.0.0.1:")
        status, facets = request(url + "api/facets")
        assert status == 200 and facets["reviewer"] == "inspector" and facets["rows"] == 12
        assert request(url + "api/facets", headers={"Host": "attacker.example"})[0] == 400
        form = f"run_id={row['run_id']}&label=normal".encode()
        assert request(url + "api/labels", data=form,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        body = json.dumps({"run_id": row["run_id"], "uri": row["uri"], "label": "defect"}).encode()
        status, detail = request(url + "api/labels", data=body, headers={"Content-Type": "application/json"})
        assert status == 200 and detail["labels"][0]["reviewer"] == "inspector"
    assert read_labels(data.out)["label"].to_pylist() == ["defect"]


@pytest.mark.integration
def test_review_in_chromium_filter_open_label_reload(nightly_output, fitted_model_dir, tmp_path):
    from playwright.sync_api import sync_playwright
    assert CHROMIUM, "Chromium is required here: apt-get install chromium"
    out = tmp_path / "scores"
    shutil.copytree(nightly_output[0], out)                          # the shared output stays unlabelled
    model_dir, manifest = fitted_model_dir
    # a connection of its own, read to the end: the module's default connection is shared by every test
    ((flagged,),) = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{out}/run_date=*/*.parquet') "
                                             "WHERE verdict = 'anomalous'").fetchall()
    assert flagged > 0
    with review_server(out, "--model", str(model_dir)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-loaded='1']")
        assert page.locator(".row").count() == 22                       # 2 nights x (10 images + broken.png)
        page.select_option("#filters [name=verdict]", "anomalous")
        page.wait_for_selector("body[data-loaded='1']")
        assert page.locator(".row").count() == flagged and "verdict=anomalous" in page.url
        assert page.locator(".row .v-anomalous").count() == flagged
        page.keyboard.press("Enter")                                    # open the first (worst) image
        page.wait_for_function("() => { const i = document.querySelector('#d-overlay');"
                               " return i.complete && i.naturalWidth > 0; }")
        first = page.locator(".row").first.get_attribute("data-uri")
        assert page.get_attribute("#detail", "data-uri") == first
        fields = page.inner_text("#d-fields")
        assert manifest["model_id"] in fields and "threshold" in fields and "peak" in fields
        page.keyboard.press("c")
        page.keyboard.type("acceptable tooling mark")
        page.keyboard.press("Escape")
        page.keyboard.press("n")                                        # label it normal
        page.wait_for_selector("#status:has-text('labelled normal')")
        page.reload()
        page.wait_for_selector("body[data-loaded='1']")
        labels = page.eval_on_selector_all(f".row[data-uri='{first}']", "els => els.map(e => e.dataset.label)")
        assert labels == ["normal", "normal"]                           # the image on both nights
        page.wait_for_selector("#drift-summary:has-text('nights')")
        page.click("#drift-summary")
        assert "calibration" in page.inner_text("#drift-body")         # --model: its calibration beside them
        page.select_option("#filters [name=verdict]", "error")          # broken.png: not scored, no label
        page.wait_for_selector("body[data-loaded='1']")
        broken_uri = page.locator(".row").first.get_attribute("data-uri")
        assert broken_uri.endswith("broken.png") and page.is_hidden("#d-actions")
        page.keyboard.press("d")
        page.wait_for_selector("#status:has-text('not labelled')")
        error_row = request(url + "api/rows?verdict=error")[1]["rows"][0]
        assert error_row["uri"] == broken_uri
        status, refused = request(url + "api/labels", data=json.dumps(
            {"run_id": error_row["run_id"], "uri": broken_uri, "label": "defect"}).encode(),
            headers={"Content-Type": "application/json"})
        assert status == 400 and "an error row has no image to label" in refused["error"]
        broken = page.evaluate("Array.from(document.images).filter(i => i.getAttribute('src') && i.complete"
                               " && i.naturalWidth === 0).map(i => i.src)")
        assert broken == []
        page.screenshot(path=str(tmp_path / "review.png"))
        browser.close()
    assert Image.open(tmp_path / "review.png").size == (1280, 900)
    (got,) = read_labels(str(out)).to_pylist()
    assert (got["uri"], got["label"], got["comment"], got["reviewer"]) == (
        first, "normal", "acceptable tooling mark", "inspector")
