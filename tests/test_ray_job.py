"""The nightly audit as a user runs it: a real Ray head (`ray start --head` on this machine), the score
job sent with `ray job submit` from an audit file, the Parquet read back with DuckDB."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.helpers import wait_for_dashboard
from tests.s3server import free_port

# starts a Ray head with `ray start --head` and submits jobs to it
pytestmark = pytest.mark.integration


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """Dashboard URL of a 2-CPU Ray head started for this module. Ray 2.60 requires token auth by
    default; `ray start` writes the token to ~/.ray/auth_token, which `ray job submit` reads."""
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env['PATH']}")   # `python` = this venv's
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "wb")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                             "--include-dashboard=true", "--disable-usage-stats",
                             # the test session's own in-process Ray holds the default agent ports
                             *(f"--{name}={free_port()}" for name in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                 "runtime-env-agent-port", "metrics-export-port"))],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; see {log.name}") from None
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)                  # `ray start --block` stops its cluster on SIGTERM
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def submit(url, env, *argv) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python -m jobs score ...`, exactly as the README shows it.
    Retried while the head's job agent is still starting (the dashboard answers a few seconds before it)."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
                               "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m", *argv],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(2)


def test_submitted_audit_writes_parquet_and_a_one_line_summary(ray_head, fitted_model_dir, texture_dataset,
                                                                tmp_path):
    url, env = ray_head
    shutil.copytree(texture_dataset / "test", tmp_path / "archive" / "2026-11-21")
    audit = tmp_path / "audit.yaml"
    audit.write_text(f"model: {fitted_model_dir[0]}\narchive: {tmp_path}/archive/{{date}}\n"
                     f"output: {tmp_path}/out\ndate: 2026-11-21\nresources: {{batch_size: 4}}\n")
    done = submit(url, env, "jobs", "score", "--config", str(audit))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"')))
    assert (summary["images"], summary["errors"], summary["run_date"]) == (10, 0, "2026-11-21")
    rows = duckdb.execute(f"SELECT count(*), count(DISTINCT uri) FROM "
                          f"read_parquet('{tmp_path}/out/run_date=2026-11-21/*.parquet')").fetchone()
    assert rows == (10, 10)


def test_a_failing_job_ends_with_a_nonzero_status_and_the_reason(ray_head, tmp_path):
    url, env = ray_head
    failed = submit(url, env, "jobs", "score", str(tmp_path), str(tmp_path / "no_model"), str(tmp_path / "out"))
    assert failed.returncode != 0
    assert "is not a fitted model" in failed.stdout + failed.stderr
