"""jobs/output.py without Ray: staged commits, names, publishing, what readers see, one writer per run."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from anomaly_core import storage
from anomaly_core.schema import output_schema
from jobs import output
from jobs.analyst import connect


def rows(uris, *, run_id="r1", run_date="2026-11-22", errors=False) -> pa.Table:
    """A block as the Scorer emits it (errors=True: every image unreadable, heatmaps all null)."""
    n = len(uris)
    cols = {}
    for f in output_schema(include_partition=True):
        if pa.types.is_string(f.type):
            cols[f.name] = pa.array([""] * n, pa.string())
        elif pa.types.is_binary(f.type):
            cols[f.name] = pa.nulls(n) if errors else pa.array([b"png"] * n, pa.binary())
        elif pa.types.is_list(f.type):
            cols[f.name] = pa.nulls(n, f.type)
        else:
            cols[f.name] = pa.array(np.zeros(n), f.type)
    cols.update(uri=pa.array(uris), run_id=pa.array([run_id] * n), run_date=pa.array([run_date] * n),
                status=pa.array(["error" if errors else "ok"] * n),
                verdict=pa.array(["error" if errors else "normal"] * n))
    return pa.table(cols)


def committed_uris(out: str, run_id: str) -> set[str]:
    return set(output.read_run(out, run_id, "2026-11-22", ["uri"])["uri"].to_pylist())


def test_a_block_of_only_unreadable_images_is_written_beside_normal_ones(tmp_path):
    sink = output.StagedParquetSink(str(tmp_path), "r1", rows_per_file=10)
    assert rows(["/a/bad.png"], errors=True).schema.field("heatmap_png").type == pa.null()
    assert sink.write([rows(["/a/1.png", "/a/2.png"]), rows(["/a/bad.png"], errors=True)], None) == 3
    assert committed_uris(str(tmp_path), "r1") == {"/a/1.png", "/a/2.png", "/a/bad.png"}


def test_an_empty_block_without_columns_is_skipped(tmp_path):
    sink = output.StagedParquetSink(str(tmp_path), "r1", rows_per_file=10)
    assert sink.write([pa.table({}), rows(["/a/1.png"])], None) == 1
    assert sink.write([pa.table({})], None) == 0
    assert committed_uris(str(tmp_path), "r1") == {"/a/1.png"}


def test_files_are_named_by_their_images_so_a_retried_write_replaces_itself(tmp_path):
    sink = output.StagedParquetSink(str(tmp_path), "r1", rows_per_file=2)
    for _ in range(2):                                      # Ray re-running a write task after a crash
        sink.write([rows([f"/a/{i}.png" for i in range(5)])], None)
    assert len(storage.list_files(output.staging_uri(str(tmp_path), "r1"))) == 3
    committed = output.read_run(str(tmp_path), "r1", "2026-11-22", output.COUNT_COLUMNS)
    assert output.count_rows(committed)["duplicates"] == 0


def test_readers_see_a_run_only_once_its_summary_exists(tmp_path):
    out = str(tmp_path)
    output.StagedParquetSink(out, "r1", rows_per_file=10).write([rows(["/a/1.png"])], None)
    output.publish(out, "r1", "2026-11-22")
    assert connect(out).execute("SELECT count(*) FROM scores").fetchone() == (0,)
    output.write_summary(out, "r1", {"images": 1})
    assert connect(out).execute("SELECT uri, CAST(run_date AS VARCHAR) FROM scores").fetchall() == [
        ("/a/1.png", "2026-11-22")]
    assert not storage.exists(output.staging_uri(out, "r1"))


def test_a_run_never_claims_the_files_of_a_run_whose_id_it_prefixes(tmp_path):
    out = str(tmp_path)
    for run_id, uri in (("nightly", "/a/1.png"), ("nightly-2", "/a/2.png")):
        output.StagedParquetSink(out, run_id, rows_per_file=10).write([rows([uri], run_id=run_id)], None)
        output.publish(out, run_id, "2026-11-22")
    assert committed_uris(out, "nightly") == {"/a/1.png"}


@pytest.mark.parametrize("bad", ["", "_hidden", ".dot", "a/b", "x" * 200, "spaces here"])
def test_run_ids_that_would_hide_or_nest_files_are_refused(bad):
    with pytest.raises(ValueError, match="use letters, digits"):
        output.check_run_id(bad)


def test_staged_files_this_job_did_not_write_are_not_published(tmp_path):
    out = str(tmp_path)
    storage.write_bytes(storage.join(output.staging_uri(out, "r1"), "not-ours.parquet"), b"x")
    with pytest.raises(ValueError, match="did not write"):
        output.publish(out, "r1", "2026-11-22")


@pytest.mark.parametrize("bad", ["../2026-11-22", "2026-11-22/x", "yesterday"])
def test_a_partition_value_that_is_not_a_date_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="must be YYYY-MM-DD"):
        output.partition_uri(str(tmp_path), bad)


# ---- one writer per run -----------------------------------------------------------------------------------

def foreign_lease(out: str, run_id: str, *, host: str, pid: int, expires_in: float) -> str:
    """A lease as another process writes it; returns its token."""
    token = "0123456789abcdef"
    storage.write_bytes(output.lease_uri(out, run_id, token), json.dumps({
        "run_id": run_id, "token": token, "host": host, "pid": pid, "acquired_at": time.time() - 60,
        "expires_at": time.time() + expires_in, "held": True}).encode())
    return token


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    with output.RunLease(out=str(tmp_path), run_id="r1"):
        with pytest.raises(output.RunBusyError, match=f"run r1 .* is being written by process {os.getpid()} "
                                                      f"on '{socket.gethostname()}'"):
            output.RunLease(out=str(tmp_path), run_id="r1").acquire()
    with output.RunLease(out=str(tmp_path), run_id="r1"):          # released on exit: the next one gets it
        pass
    assert storage.list_files(output.lease_uri(str(tmp_path), "r1")) == []


def test_a_live_lease_of_another_host_is_respected(tmp_path):
    foreign_lease(str(tmp_path), "r1", host="other-node", pid=1, expires_in=300)
    with pytest.raises(output.RunBusyError, match="process 1 on 'other-node'"):
        output.RunLease(out=str(tmp_path), run_id="r1").acquire()


@pytest.mark.parametrize("host, pid, expires_in", [
    ("other-node", 1, -1),                            # a killed run elsewhere: once its lease expired
    (socket.gethostname(), "dead", 300),              # a killed run on this host: at once
    (socket.gethostname(), "self", 300),              # a failed run of this process that could not release it
])
def test_a_lease_left_by_a_killed_run_is_taken_over(tmp_path, host, pid, expires_in):
    pid = {"dead": dead_pid(), "self": os.getpid()}.get(pid, pid)
    old = foreign_lease(str(tmp_path), "r1", host=host, pid=pid, expires_in=expires_in)
    with output.RunLease(out=str(tmp_path), run_id="r1") as lease:
        tokens = [u.rsplit("/", 1)[-1] for u in storage.list_files(output.lease_uri(str(tmp_path), "r1"))]
        assert tokens == [lease.token] and old not in tokens


def test_of_simultaneous_starts_exactly_one_holds_the_lease(tmp_path):
    leases = [output.RunLease(out=str(tmp_path), run_id="r1") for _ in range(4)]
    start = threading.Barrier(len(leases))
    outcome = {}

    def race(lease):
        start.wait()
        try:
            outcome[lease.token] = lease.acquire()
        except Exception as e:                    # RunBusyError expected; anything else fails below
            outcome[lease.token] = e
    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v in outcome.values() if isinstance(v, output.RunLease)]
    losers = [v for v in outcome.values() if v not in winners]
    assert len(winners) == 1 and len(losers) == 3
    assert all(isinstance(v, output.RunBusyError) and "is being written by" in str(v) for v in losers)
    assert storage.list_files(output.lease_uri(str(tmp_path), "r1")) == [winners[0].uri]


def test_a_held_lease_is_renewed_and_a_lost_one_stops_the_commit(tmp_path):
    with output.RunLease(out=str(tmp_path), run_id="r1", ttl_s=30, renew_every_s=0.05) as lease:
        first = json.loads(storage.read_bytes(lease.uri))["expires_at"]
        deadline = time.time() + 30
        while json.loads(storage.read_bytes(lease.uri))["expires_at"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(storage.read_bytes(lease.uri))["expires_at"] > first
        lease.check()
        lease._stop.set()                          # the renewal thread pauses (no race with the lines below)
        lease._thread.join()
        storage.delete(lease.uri)                  # expired and taken over by another process
        assert not lease.renew() and not storage.exists(lease.uri)        # renewal does not bring it back
        with pytest.raises(output.RunBusyError, match="lost its lease"):
            lease.check()


def random_run(seed: int) -> tuple[list[str], pa.Table]:
    """Listed names (some repeated, as overlapping sources give them) and committed rows (some images
    twice, some not listed) drawn from 30 names."""
    rng = np.random.default_rng(seed)
    pool = [f"s3://a/{i:02d}.png" for i in range(30)]
    listed = list(rng.choice(pool, size=rng.integers(0, 40)))
    uris = list(rng.choice(pool, size=rng.integers(0, 30)))
    status = list(rng.choice(["ok", "error", "warning"], size=len(uris)))
    verdict = [("error" if s == "error" else str(rng.choice(["normal", "anomalous"]))) for s in status]
    return listed, pa.table({"uri": pa.array(uris, pa.string()), "status": pa.array(status, pa.string()),
                             "verdict": pa.array(verdict, pa.string())})


def expected_counts(listed: list[str], committed: pa.Table) -> dict:
    """tally_counts by sets and counters."""
    uris, status, verdict = (committed[c].to_pylist() for c in output.COUNT_COLUMNS)
    per_uri = {u: uris.count(u) for u in uris}
    return {"images": len(uris), "anomalous": verdict.count("anomalous"), "errors": status.count("error"),
            "warnings": status.count("warning"), "duplicates": sum(n - 1 for n in per_uri.values()),
            "listed": len(set(listed)), "missing": len(set(listed) - set(uris))}


@pytest.mark.parametrize("seed", range(10))
def test_tally_counts_of_listed_names_and_committed_rows_equal_set_arithmetic(seed):
    listed, committed = random_run(seed)
    both = pa.concat_tables([output.listed_side(pa.table({"path": pa.array(listed, pa.string())})),
                             output.committed_side(committed)])
    grouped = both.group_by("path").aggregate([("listed", "max"), *((c, "sum") for c in output.TALLY[1:])])
    grouped = grouped.rename_columns([c.rsplit("_", 1)[0] for c in grouped.column_names])   # as Ray names them
    assert output.tally_block_counts(grouped).to_pylist() == [expected_counts(listed, committed)]


@pytest.mark.integration
@pytest.mark.parametrize("seed", range(3))
def test_tally_in_ray_tasks_finds_pending_names_and_counts_as_sets_do(seed, tmp_path, ray_local):
    import ray
    listed, committed = random_run(seed)
    files = []
    for i in range(0, committed.num_rows, 7):                  # committed files of up to 7 rows
        part = committed.slice(i, 7)
        block = rows(part["uri"].to_pylist())
        block = block.set_column(block.schema.get_field_index("status"), "status", part["status"])
        block = block.set_column(block.schema.get_field_index("verdict"), "verdict", part["verdict"])
        files.append(str(tmp_path / f"{i}.parquet"))
        storage.write_bytes(files[-1], output.parquet_bytes(block))
    names = ray.data.from_arrow([pa.table({"path": pa.array(listed[i:i + 5], pa.string())})
                                 for i in range(0, max(len(listed), 1), 5)])
    tallied = output.tally(names, files).materialize()
    assert output.tally_counts(tallied) == expected_counts(listed, committed)
    pending = sorted(r["path"] for r in output.pending(tallied).take_all())
    assert pending == sorted(set(listed) - set(committed["uri"].to_pylist()))
