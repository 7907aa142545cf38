"""A score run killed part-way (SIGKILL, no chance to clean up) and run again finishes the audit:
every image exactly once, the committed part not scored twice; a finished audit is left alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import duckdb
import pytest

from anomaly_core import storage
from anomaly_core.shards import expand_braces
from jobs import output
from jobs.pack import run_pack
from jobs.score import run_score

# scores through Ray, and kills and restarts a score job
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def archive(texture_dataset, tmp_path_factory):
    """40 images: the texture test set four times over, in line=... folders."""
    root = tmp_path_factory.mktemp("resume_archive")
    for copy in range(4):
        shutil.copytree(texture_dataset / "test", root / f"line=L{copy}")
    return root


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def test_killed_run_resumes_without_duplicates_or_gaps(archive, fitted_model_dir, tmp_path, ray_local):
    out, date = tmp_path / "out", "2026-11-24"
    argv = [sys.executable, "-m", "jobs", "score", str(archive), str(fitted_model_dir[0]), str(out),
            "--batch-size", "2", "--rows-per-file", "2", "--run-date", date]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}          # its own in-process Ray
    proc = subprocess.Popen(argv, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = lambda: list(out.glob("_staging/*/*.parquet"))                   # noqa: E731
    try:
        wait_for(lambda: len(staged()) >= 2 or proc.poll() is not None, 300, "the first committed files")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                                   # the job and its Ray, mid-run
        proc.wait()
    committed = 2 * len(staged())
    assert not list(out.glob("_runs/*.json")) and 0 < committed < 40, "the run was not killed part-way"

    summary = run_score(str(archive), str(fitted_model_dir[0]), str(out), batch_size=2, rows_per_file=2,
                        run_date=date)
    assert summary["resumed_from"] >= committed and summary["scored_now"] == 40 - summary["resumed_from"]
    assert (summary["images"], summary["duplicates"], summary["errors"]) == (40, 0, 0)
    uris = [u for (u,) in duckdb.execute(
        f"SELECT uri FROM read_parquet('{out}/run_date={date}/*.parquet') ORDER BY uri").fetchall()]
    assert uris == storage.list_files(str(archive))                          # each image exactly once
    assert not staged()


def test_a_killed_run_of_shards_resumes_by_shard_with_every_image_once(archive, fitted_model_dir, tmp_path,
                                                                      ray_local):
    shards = run_pack(str(archive), str(tmp_path / "shards"), shard_size=2)["shards"]      # 20 shards
    out, date = tmp_path / "out", "2026-11-27"
    argv = [sys.executable, "-m", "jobs", "score", shards, str(fitted_model_dir[0]), str(out),
            "--batch-size", "2", "--rows-per-file", "2", "--run-date", date]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = lambda: list(out.glob("_staging/*/*.parquet"))                   # noqa: E731  one per shard
    try:
        wait_for(lambda: len(staged()) >= 2 or proc.poll() is not None, 300, "the first committed shards")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = {f.name for f in staged()}
    assert not list(out.glob("_runs/*.json")) and 0 < len(committed) < 20, "the run was not killed part-way"
    assert committed <= {output.part_name([s]) + ".parquet" for s in expand_braces(shards)}

    summary = run_score(shards, str(fitted_model_dir[0]), str(out), batch_size=2, rows_per_file=2, run_date=date)
    assert summary["shards_resumed"] >= len(committed) and summary["shards"] == 20
    assert summary["resumed_from"] == 2 * summary["shards_resumed"] and summary["scored_now"] == 40 - summary[
        "resumed_from"]
    assert (summary["images"], summary["duplicates"], summary["errors"]) == (40, 0, 0)
    uris = [u for (u,) in duckdb.execute(
        f"SELECT uri FROM read_parquet('{out}/run_date={date}/*.parquet') ORDER BY uri").fetchall()]
    members = sorted(f"{s}#{n}" for s in expand_braces(shards) for n in tarfile.open(s).getnames())
    assert uris == members and len(uris) == 40                                # each image exactly once
    assert len(list(out.glob(f"run_date={date}/*.parquet"))) == 20 and not staged()


def test_a_finished_audit_is_not_run_again_unless_replaced(archive, fitted_model_dir, tmp_path, ray_local):
    out, date = str(tmp_path / "out"), "2026-11-25"
    first = run_score(str(archive / "line=L0"), str(fitted_model_dir[0]), out, batch_size=4, run_date=date)
    files = sorted(os.listdir(tmp_path / "out" / f"run_date={date}"))
    again = run_score(str(archive / "line=L0"), str(fitted_model_dir[0]), out, batch_size=4, run_date=date)
    assert again == first and sorted(os.listdir(tmp_path / "out" / f"run_date={date}")) == files
    replaced = run_score(str(archive / "line=L0"), str(fitted_model_dir[0]), out, batch_size=4, run_date=date,
                         replace=True)
    assert replaced["run_id"] == first["run_id"] and (replaced["images"], replaced["duplicates"]) == (10, 0)
    assert replaced["scored_now"] == 10 and replaced["finished_at"] >= first["finished_at"]
    assert output.read_summary(out, first["run_id"]) == replaced


def test_two_starts_of_one_audit_at_once_one_scores_the_other_fails_naming_it(archive, fitted_model_dir, tmp_path,
                                                                              ray_local):
    out, date = tmp_path / "out", "2026-11-26"
    argv = [sys.executable, "-m", "jobs", "score", str(archive / "line=L0"), str(fitted_model_dir[0]), str(out),
            "--batch-size", "2", "--run-date", date]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}          # each its own in-process Ray
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]                                                # a cron job retried at once
    outputs = [p.communicate(timeout=600) for p in procs]
    results = [(p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(procs, outputs, strict=True)]
    assert sorted(rc for rc, _, _ in results) == [0, 1], [err[-2000:] for _, _, err in results]
    (_, winner, _), (_, _, loser) = sorted(results)
    summary = json.loads(winner.splitlines()[-1])
    assert "Error: run " + summary["run_id"] in loser and "is being written by process" in loser, loser[-2000:]
    uris = [u for (u,) in duckdb.execute(
        f"SELECT uri FROM read_parquet('{out}/run_date={date}/*.parquet') ORDER BY uri").fetchall()]
    assert uris == storage.list_files(str(archive / "line=L0")) and summary["duplicates"] == 0
    assert storage.list_files(output.lease_uri(str(out), summary["run_id"])) == []      # released
