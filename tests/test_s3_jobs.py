"""Fit and score end to end through a real S3 server (moto_server on 127.0.0.1): archive, model and
Parquet all in buckets, read back with DuckDB; failures of the store mid-run (cut, stalled); pinned
models; no credential leaks."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from anomaly_core import storage
from anomaly_core.artifact import ModelFileError
from anomaly_core.config import ModelConfig
from anomaly_core.storage import StorageError, StorageOptions
from jobs.analyst import connect
from jobs.fit import run_fit
from jobs.score import run_score
from jobs.scorer import Scorer
from tests.helpers import TEST_CONFIG_KW, TEST_SECRET, make_bucket, upload

# fits and scores through Ray against a moto S3 server
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(s3_server, texture_dataset, ray_local):
    """Options reaching the server through the relay, with buckets archive/models/audits; the texture
    dataset uploaded to s3://archive/brick/."""
    for b in ("archive", "models", "audits"):
        make_bucket(s3_server.url, b)
    opts = StorageOptions(endpoint_url=s3_server.url, max_attempts=2)
    upload(texture_dataset, "s3://archive/brick", opts)
    return opts


@pytest.fixture(scope="module")
def s3_model(s3):
    manifest = run_fit("s3://archive/brick/train/good", "s3://models/brick", config=ModelConfig(**TEST_CONFIG_KW),
                       batch_size=8, options=s3)
    return "s3://models/brick", manifest


def scores_by_name(out, options=None) -> dict:
    rows = connect(out, options).execute("SELECT uri, score FROM scores").fetchall()
    return {u.split("/test/", 1)[1]: s for u, s in rows}


def test_fit_writes_the_model_to_s3_with_the_manifest_last(s3_model, s3):
    uri, manifest = s3_model
    names = [u.rsplit("/", 1)[1] for u in storage.list_files(uri, s3)]
    assert names == ["bank-00000.faiss", "calibration_features.npy", "calibration_grids.npy",
                     "calibration_positions.npy", "manifest.json"]
    assert sorted(manifest["files"]) == names[:-1] and manifest["stats"]["n_images"] == 10


def test_scores_from_s3_equal_scores_from_a_local_folder(s3_model, s3, texture_dataset, tmp_path):
    s3_summary = run_score("s3://archive/brick/test", s3_model[0], "s3://audits/brick", batch_size=4,
                           run_date="2026-11-22", options=s3)
    local_summary = run_score(str(texture_dataset / "test"), s3_model[0], str(tmp_path / "out"), batch_size=4,
                              run_date="2026-11-22", options=s3)
    assert s3_summary["images"] == local_summary["images"] == 10 and s3_summary["errors"] == 0
    from_s3, from_disk = scores_by_name("s3://audits/brick", s3), scores_by_name(str(tmp_path / "out"))
    assert len(from_s3) == 10 and from_s3 == from_disk


def test_duckdb_reads_the_s3_output_by_night(s3_model, s3):
    run_score("s3://archive/brick/test", s3_model[0], "s3://audits/nights", batch_size=4,
              run_date="2026-11-21", options=s3)
    con = connect("s3://audits/nights", s3)
    assert con.execute("SELECT CAST(run_date AS VARCHAR), count(*) FROM scores GROUP BY ALL").fetchall() == [
        ("2026-11-21", 10)]


def test_a_manifest_file_of_uris_is_an_archive_and_missing_objects_become_error_rows(s3_model, s3):
    listed = storage.list_files("s3://archive/brick/test", s3)[:3] + ["s3://archive/brick/test/gone.png"]
    storage.write_bytes("s3://archive/lists/tonight.txt", ("# tonight\n" + "\n".join(listed)).encode(), s3)
    summary = run_score("s3://archive/lists/tonight.txt", s3_model[0], "s3://audits/listed", batch_size=4,
                        run_date="2026-11-22", options=s3)
    assert (summary["images"], summary["errors"]) == (4, 1)
    err = connect("s3://audits/listed", s3).execute("SELECT uri, error FROM scores WHERE status = 'error'").fetchall()
    assert err == [("s3://archive/brick/test/gone.png", "s3://archive/brick/test/gone.png not found")]


def test_a_missing_bucket_stops_the_job_before_any_work(s3_model, s3):
    with pytest.raises(StorageError, match="bucket 'no-such-archive' does not exist"):
        run_score("s3://no-such-archive/x/", s3_model[0], "s3://audits/x", options=s3)
    with pytest.raises(StorageError, match="bucket 'no-such-output' does not exist"):
        run_score("s3://archive/brick/test", s3_model[0], "s3://no-such-output/x", options=s3)


def test_server_outage_mid_run_then_rerun_finishes_without_duplicates(s3_model, s3, s3_server):
    out = "s3://audits/outage"
    # the 3rd staged file's CompleteMultipartUpload finds the server gone. The first attempt runs as a
    # separate `python -m jobs score` process, as a nightly job would: it must end, with status 1 and the
    # reason, and take its Ray with it.
    s3_server.cut_at(rb"^POST /audits/outage/_staging/\S*uploadId=", after=2)
    try:
        first = subprocess.run(
            [sys.executable, "-m", "jobs", "score", "s3://archive/brick/test", s3_model[0], out, "--batch-size", "2",
             "--rows-per-file", "2", "--run-date", "2026-11-23", "--endpoint-url", s3_server.url],
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True, text=True,
            timeout=600)
    finally:
        s3_server.restore()
    assert first.returncode == 1 and "NETWORK_CONNECTION" in first.stderr, first.stderr[-2000:]
    assert "StorageError" not in first.stderr                     # an outage is not a permanent error
    direct = StorageOptions(endpoint_url=s3_server.direct_url)
    staged = storage.list_files(storage.join(out, "_staging"), direct)
    assert 1 <= len(staged) < 5                     # part of the run was committed, not all of it
    summary = run_score("s3://archive/brick/test", s3_model[0], out, batch_size=2, rows_per_file=2,
                        run_date="2026-11-23", options=s3)
    assert summary["resumed_from"] == 2 * len(staged) and summary["scored_now"] == 10 - 2 * len(staged)
    assert (summary["images"], summary["duplicates"]) == (10, 0)
    uris = [u for (u,) in connect(out, s3).execute("SELECT uri FROM scores ORDER BY uri").fetchall()]
    assert uris == storage.list_files("s3://archive/brick/test", s3)


def test_no_credential_is_written_to_models_outputs_or_logs(s3_model, s3, caplog):
    caplog.set_level(logging.DEBUG)
    run_score("s3://archive/brick/test", s3_model[0], "s3://audits/brick", run_date="2026-11-22", options=s3)
    for bucket in ("models", "audits"):
        objects = storage.list_files(f"s3://{bucket}", s3, skip_hidden=False)
        assert any("/_runs/" in u for u in objects) or bucket == "models"
        for uri in objects:
            data = storage.read_bytes(uri, s3)
            assert TEST_SECRET.encode() not in data and b"test-key-id" not in data, uri
    assert TEST_SECRET not in caplog.text


def test_a_pinned_audit_scores_with_that_model_and_refuses_any_other_before_reading_it(s3_model, s3, tmp_path,
                                                                                       monkeypatch):
    uri, manifest = s3_model
    monkeypatch.setenv("ANOMALY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError, match=f"holds model {manifest['model_id']}, not the pinned model 0{{15}}1"):
        run_score("s3://archive/brick/test", uri, "s3://audits/pinned", model_id="0" * 15 + "1", options=s3)
    with pytest.raises(ModelFileError, match="not the pinned model"):       # what each scoring actor does
        Scorer(model_path=uri, model_id="0" * 15 + "1", options=s3)
    assert not (tmp_path / "cache").exists()                          # no bank file was fetched
    summary = run_score("s3://archive/brick/test/good", uri, "s3://audits/pinned", batch_size=4,
                        model_id=manifest["model_id"], run_date="2026-11-22", options=s3)
    assert summary["model_id"] == manifest["model_id"] and summary["errors"] == 0


def test_a_stalled_server_stops_the_job_naming_the_uri_and_records_no_row(s3_model, s3_server):
    out, date = "s3://audits/stalled", "2026-11-26"
    # short limits, so that each stalled read gives up after 2 attempts of 2 s
    short = StorageOptions(endpoint_url=s3_server.url, max_attempts=2, connect_timeout_s=1, request_timeout_s=2)
    s3_server.stall_at(rb"^GET /archive/brick/test/\S+\.png", after=3)    # the 4th image read gets no answer
    try:
        with pytest.raises(TimeoutError, match=r"s3://archive/brick/test/\S+\.png: the storage server did not "):
            run_score("s3://archive/brick/test", s3_model[0], out, batch_size=2, rows_per_file=2, run_date=date,
                      options=short)
    finally:
        s3_server.restore()
    summary = run_score("s3://archive/brick/test", s3_model[0], out, batch_size=2, rows_per_file=2, run_date=date,
                        options=short)
    assert (summary["images"], summary["errors"], summary["duplicates"]) == (10, 0, 0)


def test_a_killed_run_over_an_s3_prefix_resumes_with_every_image_once(s3_model, s3, s3_server):
    out, date = "s3://audits/killed", "2026-11-28"
    # the 3rd staged file's upload gets no answer: the job hangs there with two files committed, and is
    # killed (SIGKILL, its Ray with it) as a crashed node would be
    s3_server.stall_at(rb"^POST /audits/killed/_staging/\S*uploadId=", after=2)
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs", "score", "s3://archive/brick/test", s3_model[0], out, "--batch-size", "2",
         "--rows-per-file", "2", "--run-date", date, "--endpoint-url", s3_server.url],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    direct = StorageOptions(endpoint_url=s3_server.direct_url)
    staged = lambda: storage.list_files(storage.join(out, "_staging"), direct)            # noqa: E731
    try:
        deadline = time.time() + 300
        while len(staged()) < 2 and job.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)                                           # the 3rd upload is held by the relay
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        s3_server.restore()
    assert len(staged()) == 2 and not storage.list_files(storage.join(out, "_runs"), direct, suffixes=(".json",))
    summary = run_score("s3://archive/brick/test", s3_model[0], out, batch_size=2, rows_per_file=2, run_date=date,
                        options=s3)
    # a write the killed job had in flight (held by the relay) can still complete after the kill: that
    # file is whole, and counted
    assert 4 <= summary["resumed_from"] < 10 and summary["scored_now"] == 10 - summary["resumed_from"]
    assert (summary["images"], summary["duplicates"], summary["errors"]) == (10, 0, 0)
    uris = [u for (u,) in connect(out, s3).execute("SELECT uri FROM scores ORDER BY uri").fetchall()]
    assert uris == storage.list_files("s3://archive/brick/test", s3)        # each image exactly once


def test_sources_that_overlap_give_each_image_one_row(s3_model, s3):
    summary = run_score(["s3://archive/brick/test", "s3://archive/brick/test/good"], s3_model[0],
                        "s3://audits/overlap", batch_size=4, run_date="2026-11-28", options=s3)
    assert (summary["images"], summary["duplicates"], summary["scored_now"]) == (10, 0, 10)
    uris = [u for (u,) in connect("s3://audits/overlap", s3).execute("SELECT uri FROM scores ORDER BY uri").fetchall()]
    assert uris == storage.list_files("s3://archive/brick/test", s3)
