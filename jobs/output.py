"""The scored output of audit runs: Parquet committed file by file, published per run, resumable.

Layout under OUT (a local folder or an s3:// prefix):

    run_date=YYYY-MM-DD/<run_id>-<part>.parquet   published rows: what analysts read
    _staging/<run_id>/<part>.parquet              rows of a run still in progress
    _staging/<run_id>/_pieces/<part>/*.parquet    rows of a shard not yet all scored (archives of shards)
    _runs/<run_id>.json                           the run summary, written last: the run is complete
    _runs/<run_id>.lease/<token>                  the lease of the one process writing the run

Every file appears whole or not at all (storage.write_bytes) and is named by the images it holds, so a
killed run leaves only complete files, a write task Ray retries rewrites its own files instead of adding
copies, and re-running the run scores just the images no file holds. `analyst.connect` and
`scores_dataset` read only runs whose summary exists (the commit marker), so a run being published or
replaced is never seen half-done; a bare `read_parquet('OUT/run_date=*/*.parquet')` may see a run while
its files are being moved.

An archive of shards (anomaly_core.shards) is committed by shard instead: each shard's rows become one
file named by the shard's URI (part_name([shard])), written once all of them are scored (ShardSink), so
a re-run lists committed shards, not images, and the completeness check counts rows per file.

One writer per run: a run is written only under a lease (RunLease), so a second start of the same audit
(a retried cron job) fails at once instead of scoring the same images twice. Every name taken from a
listing (staged file, lease token) is checked before it becomes part of a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.aggregate import Max, Sum
from ray.data.context import ShuffleStrategy

from anomaly_core import storage
from anomaly_core.decode import SHARD_ROWS
from anomaly_core.schema import PARTITION_COLUMN, output_schema
from anomaly_core.shards import shard_of
from anomaly_core.storage import StorageOptions

log = logging.getLogger(__name__)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
PART = r"-[0-9a-f]{32}\.parquet"                 # <run_id>-<hash of the file's image URIs>.parquet
STAGED = re.compile(r"[0-9a-f]{32}\.parquet")    # a staged file: <hash of the file's image URIs>.parquet


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id={run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, starting "
                         f"with a letter or digit), e.g. 2026-11-22-line3")
    return run_id


def part_name(uris: list[str]) -> str:
    """32 hex digits naming a file by the images it holds: the same rows always get the same name."""
    return hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()[:32]


def staging_uri(out: str, run_id: str) -> str:
    return storage.join(out, "_staging", run_id)


def summary_uri(out: str, run_id: str) -> str:
    return storage.join(out, "_runs", f"{run_id}.json")


def partition_uri(out: str, run_date: str) -> str:
    if not RUN_DATE.fullmatch(run_date):
        raise ValueError(f"run_date={run_date!r} must be YYYY-MM-DD (it names the output partition)")
    return storage.join(out, f"{PARTITION_COLUMN}={run_date}")


def parquet_bytes(table: pa.Table) -> bytes:
    """One Parquet file (zstd) with the output schema and its version in the key-value metadata."""
    table = table.drop_columns([c for c in (PARTITION_COLUMN,) if c in table.column_names])
    table = table.select(output_schema().names).cast(output_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def sink_table(blocks, schema: pa.Schema) -> pa.Table:
    """The rows of a write task's blocks (Arrow or pandas) as one table of `schema`. Each block is cast
    before concatenating: a block of only unreadable images has all-null heatmaps (type null). Blocks
    without rows are dropped: Ray Data can hand a sink an empty block without any column (seen in a
    resumed run's write task)."""
    tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
    kept = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
    return pa.concat_tables(kept) if kept else schema.empty_table()


class StagedParquetSink(Datasink):
    """Ray Data sink: each write task gets at least `rows_per_file` rows (Ray bundles small blocks) and
    commits them as staged Parquet files of `rows_per_file` rows, one after the other."""

    def __init__(self, out: str, run_id: str, *, rows_per_file: int, options: StorageOptions | None = None):
        self.staging, self.rows_per_file, self.options = staging_uri(out, run_id), rows_per_file, options

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> int:
        table = sink_table(blocks, output_schema(include_partition=True))
        for s in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(s, self.rows_per_file)
            storage.write_bytes(storage.join(self.staging, f"{part_name(part['uri'].to_pylist())}.parquet"),
                                parquet_bytes(part), self.options)
        return table.num_rows


def pieces_uri(out: str, run_id: str) -> str:
    return storage.join(staging_uri(out, run_id), "_pieces")


class ShardSink(Datasink):
    """Ray Data sink for an archive of shards: one committed file per shard, `part_name([shard])`.

    A write task gets rows of any shards (SHARD_ROWS says how many rows each shard has in all). A shard
    whose rows are all in the task is committed at once; otherwise its rows are written as a piece under
    `_pieces/<part>/`, and the task lists that shard's pieces: when they hold every row, it writes the
    shard's file from them and deletes them. The last piece of a shard is always written before its
    writer lists, so some task sees all of them (storage lists what was written, S3 included); two
    tasks that both see all write the same rows under the same name (each write is whole or nothing),
    and one that finds the pieces deleted under it leaves the shard to the task that committed it
    (checking that its file exists). Rows repeated by overlapping pieces (a write task Ray retried with
    other blocks) are kept once (first_per_uri). A killed run leaves pieces of
    uncommitted shards; the next attempt deletes them (clear_pieces) and scores those shards again."""

    def __init__(self, out: str, run_id: str, *, rows_per_write: int, options: StorageOptions | None = None):
        self.staging, self.pieces = staging_uri(out, run_id), pieces_uri(out, run_id)
        self.rows_per_write, self.options = rows_per_write, options

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def write(self, blocks, ctx) -> int:
        table = sink_table(blocks, output_schema(include_partition=True).append(pa.field(SHARD_ROWS, pa.int64())))
        shards = pa.array([shard_of(u) for u in table["uri"].to_pylist()])
        for shard in pc.unique(shards).to_pylist():
            rows = table.filter(pc.equal(shards, shard))
            expected = rows[SHARD_ROWS][0].as_py()
            rows = rows.drop_columns([SHARD_ROWS])
            if rows.num_rows != expected:
                piece = storage.join(self.pieces, part_name([shard]), f"{part_name(rows['uri'].to_pylist())}.parquet")
                storage.write_bytes(piece, parquet_bytes(rows), self.options)
                rows = self._gather(shard, expected)
            if rows is not None:
                self._commit(shard, rows)
        return table.num_rows

    def _gather(self, shard: str, expected: int) -> pa.Table | None:
        """Every row of `shard` from its pieces, once each, or None while some are missing or when
        another task has committed the shard (deleted its pieces) since this one wrote its piece."""
        try:
            files = storage.list_files(storage.join(self.pieces, part_name([shard])), self.options)
            if not files:                             # this task's piece included: deleted since
                raise FileNotFoundError(shard)
            pieces = [pq.read_table(io.BytesIO(storage.read_bytes(f, self.options))) for f in files]
        except FileNotFoundError:                     # deleted by a task that committed the shard meanwhile
            committed = storage.join(self.staging, f"{part_name([shard])}.parquet")
            if not storage.exists(committed, self.options):
                raise RuntimeError(f"the pieces of shard {shard} were deleted, yet it has no committed file "
                                   f"{committed}; re-run to score it again") from None
            return None
        schema = output_schema()
        rows = first_per_uri(pa.concat_tables([p.select(schema.names).cast(schema) for p in pieces]))
        return rows if rows.num_rows == expected else None

    def _commit(self, shard: str, rows: pa.Table) -> None:
        rows = rows.sort_by("uri")
        storage.write_bytes(storage.join(self.staging, f"{part_name([shard])}.parquet"), parquet_bytes(rows),
                            self.options)
        try:
            storage.delete(storage.join(self.pieces, part_name([shard])), self.options)
        except FileNotFoundError:                     # another task committing the same shard deleted them
            pass


def first_per_uri(rows: pa.Table) -> pa.Table:
    """`rows` without repeats: the first row of each uri. Pieces of one shard overlap when Ray retried a
    write task with other blocks than its first attempt had (each attempt's piece is named by its rows)."""
    _, first = np.unique(np.asarray(rows["uri"].to_pylist(), dtype=object), return_index=True)
    return rows.take(pa.array(np.sort(first)))


def clear_pieces(out: str, run_id: str, options: StorageOptions | None = None) -> None:
    """Delete the pieces a killed attempt left (their shards are scored again, whole)."""
    storage.delete(pieces_uri(out, run_id), options)


def run_files(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> list[str]:
    """Every committed file of the run: staged and published."""
    mine = re.compile(re.escape(run_id) + PART)
    published = [u for u in storage.list_files(partition_uri(out, run_date), options, suffixes=(".parquet",))
                 if mine.fullmatch(u.rsplit("/", 1)[-1])]
    return storage.list_files(staging_uri(out, run_id), options, suffixes=(".parquet",)) + published


def parquet_paths(files: list[str], options: StorageOptions | None = None):
    """(pyarrow filesystem, paths on it) of non-empty `files` (one run's files share a filesystem)."""
    fs, _ = storage.filesystem(files[0], options)
    return fs, [storage.filesystem(f, options)[1] for f in files]


def read_columns(files: list[str], columns: list[str], options: StorageOptions | None = None) -> pa.Table:
    if not files:
        return pa.table({c: pa.array([], output_schema().field(c).type) for c in columns})
    fs, paths = parquet_paths(files, options)
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=output_schema()).to_table(columns=columns)


def read_run(out: str, run_id: str, run_date: str, columns: list[str],
             options: StorageOptions | None = None) -> pa.Table:
    """`columns` of every committed row of the run."""
    return read_columns(run_files(out, run_id, run_date, options), columns, options)


def committed_rows(files: list[str], options: StorageOptions | None = None) -> ray.data.Dataset:
    """COUNT_COLUMNS of the rows of `files` (committed files of one run), read by Ray Data's Parquet
    reader in Ray tasks."""
    if not files:
        return ray.data.from_arrow(read_columns([], COUNT_COLUMNS))
    fs, paths = parquet_paths(files, options)
    return ray.data.read_parquet(paths, filesystem=fs, columns=COUNT_COLUMNS, schema=output_schema())


TALLY = ["listed", "rows", "anomalous", "errors", "warnings"]


def listed_side(block: pa.Table) -> pa.Table:
    """A block of image names (column `path`) as tally rows: listed once, no row."""
    zeros = pa.array(np.zeros(block.num_rows, np.int64))
    return pa.table({"path": block["path"], "listed": pa.array(np.ones(block.num_rows, np.int64)),
                     **{c: zeros for c in TALLY[1:]}})


def committed_side(block: pa.Table) -> pa.Table:
    """A block of committed rows (COUNT_COLUMNS) as tally rows: not listed, one row each."""
    flag = lambda column, value: pc.cast(pc.fill_null(pc.equal(block[column], value), False), pa.int64())  # noqa: E731
    return pa.table({"path": block["uri"], "listed": pa.array(np.zeros(block.num_rows, np.int64)),
                     "rows": pa.array(np.ones(block.num_rows, np.int64)), "anomalous": flag("verdict", "anomalous"),
                     "errors": flag("status", "error"), "warnings": flag("status", "warning")})


# input blocks up to which tally() groups with a sort shuffle
SORT_SHUFFLE_BLOCKS = 64


def shuffle_strategy(blocks: int) -> ShuffleStrategy:
    """How tally() groups `blocks` input blocks. A sort shuffle runs plain tasks (a grouping of a few
    blocks takes a fraction of a second), but splits each of its M input blocks into M pieces, M^2 objects
    that the driver owns and, when small, holds in its own memory (10^5 names in 100 blocks: +63 MB at
    the driver). The hash shuffle sends pieces to aggregator actors instead, O(M) objects at the driver,
    but starting the actors takes ~9 s per grouping on 2 CPUs, whatever the size."""
    return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if blocks <= SORT_SHUFFLE_BLOCKS else ShuffleStrategy.HASH_SHUFFLE


def tally(names: ray.data.Dataset, files: list[str], options: StorageOptions | None = None) -> ray.data.Dataset:
    """One row per image that `names` (a materialized dataset of one column, `path`; a name may repeat)
    lists or a committed file of `files` holds: path, listed (0/1), rows (how many committed rows it
    has), and of those rows how many are anomalous, errors and warnings. Grouped by path in Ray tasks
    (shuffle_strategy), so neither the names nor the committed URIs are ever all on the driver; this is
    the resume (pending) and the completeness check (tally_counts) of an archive of single images."""
    committed = committed_rows(files, options)
    both = names.map_batches(listed_side, batch_format="pyarrow").union(
        committed.map_batches(committed_side, batch_format="pyarrow"))
    blocks = names.num_blocks() + len(files)          # a block per committed file
    both.context.shuffle_strategy = shuffle_strategy(blocks)
    # a hash partition per 16 input blocks: each aggregator actor takes a share of ~16 blocks' rows
    partitions = None if blocks <= SORT_SHUFFLE_BLOCKS else min(200, -(-blocks // 16))
    return both.groupby("path", num_partitions=partitions).aggregate(
        Max("listed", alias_name="listed"), *(Sum(c, alias_name=c) for c in TALLY[1:]))


def pending(tallied: ray.data.Dataset) -> ray.data.Dataset:
    """The names (column `path`) of a tally (tally()) that are listed and have no committed row."""
    return tallied.map_batches(_pending, batch_format="pyarrow")


def _pending(block: pa.Table) -> pa.Table:
    return block.filter(pc.and_(pc.equal(block["listed"], 1), pc.equal(block["rows"], 0))).select(["path"])


def tally_block_counts(block: pa.Table) -> pa.Table:
    """One row of counts of a block of a tally: count_rows's (images = committed rows, duplicates =
    rows beyond the first of an image), plus listed (distinct listed names) and missing (listed
    names without a row)."""
    rows = block["rows"].to_numpy()
    listed = block["listed"].to_numpy().astype(bool)
    return pa.table({"images": [int(rows.sum())],
                     **{c: [int(pc.sum(block[c]).as_py() or 0)] for c in ("anomalous", "errors", "warnings")},
                     "duplicates": [int(np.maximum(rows - 1, 0).sum())], "listed": [int(listed.sum())],
                     "missing": [int((listed & (rows == 0)).sum())]})


def tally_counts(tallied: ray.data.Dataset) -> dict:
    """The counts of a whole tally (tally_block_counts summed): one row per block reaches the driver."""
    per_block = tallied.map_batches(tally_block_counts, batch_size=None, batch_format="pyarrow").take_all()
    keys = ["images", "anomalous", "errors", "warnings", "duplicates", "listed", "missing"]
    return {k: sum(b[k] for b in per_block) for k in keys}


def file_part(file: str) -> str:
    """The part name of a staged (`<part>.parquet`) or published (`<run_id>-<part>.parquet`) file."""
    return file.rsplit("/", 1)[-1][-len(".parquet") - 32:-len(".parquet")]


def committed_parts(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> set[str]:
    """The part names (32 hex digits) of the run's committed files, staged or published, from a listing
    alone: for an archive of shards, `part_name([shard])` of each committed shard."""
    return {file_part(f) for f in run_files(out, run_id, run_date, options)}


def count_file(file: str, options: StorageOptions | None = None) -> dict:
    """count_rows of one committed file of a shard, plus its part name and `foreign`: rows whose image
    is not in the shard the file is named by (none, unless the file was written by something else)."""
    part = file_part(file)
    t = read_columns([file], COUNT_COLUMNS, options)
    shards = {shard_of(u) for u in pc.unique(t["uri"]).to_pylist()}
    foreign = 0 if {part_name([s]) for s in shards} == {part} else t.num_rows
    return {"part": part, "foreign": foreign, **count_rows(t)}


def count_files(files: list[str], options: StorageOptions | None = None) -> list[dict]:
    """count_file of each of `files` (one Ray task's share of the completeness check)."""
    return [count_file(f, options) for f in files]


def publish(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> int:
    """Move the run's staged files into its partition, then drop the staging folder (with any temporary
    file a killed writer left); returns how many moved. Safe to repeat after a crash half-way."""
    staged = storage.list_files(staging_uri(out, run_id), options, suffixes=(".parquet",))
    stray = [f for f in staged if not STAGED.fullmatch(f.rsplit("/", 1)[-1])]
    if stray:
        raise ValueError(f"{staging_uri(out, run_id)} holds files this job did not write (e.g. {stray[0]}); "
                         f"remove them, or re-run with replace (--replace)")
    for f in staged:
        storage.move(f, storage.join(partition_uri(out, run_date), f"{run_id}-{f.rsplit('/', 1)[-1]}"), options)
    storage.delete(staging_uri(out, run_id), options)
    return len(staged)


def delete_run(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> None:
    """Remove every file of the run (staged, published, summary): `--replace` starts from nothing. The
    summary goes first, so an interrupted delete never leaves a run marked complete."""
    storage.delete(summary_uri(out, run_id), options)
    for f in run_files(out, run_id, run_date, options):
        storage.delete(f, options)
    storage.delete(staging_uri(out, run_id), options)


COUNT_COLUMNS = ["uri", "status", "verdict"]


def count_rows(t: pa.Table) -> dict:
    """Counts of a run's rows (COUNT_COLUMNS); `duplicates` counts rows whose image is in another row
    too (the score job refuses to complete a run that has any)."""
    return {"images": t.num_rows,
            "anomalous": int(pc.sum(pc.equal(t["verdict"], "anomalous")).as_py() or 0),
            "errors": int(pc.sum(pc.equal(t["status"], "error")).as_py() or 0),
            "warnings": int(pc.sum(pc.equal(t["status"], "warning")).as_py() or 0),
            "duplicates": t.num_rows - len(pc.unique(t["uri"]))}


def read_summary(out: str, run_id: str, options: StorageOptions | None = None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(summary_uri(out, run_id), options))
    except FileNotFoundError:
        return None


def write_summary(out: str, run_id: str, summary: dict, options: StorageOptions | None = None) -> None:
    storage.write_bytes(summary_uri(out, run_id), json.dumps(summary, indent=2, sort_keys=True).encode(), options)


def scores_dataset(out: str, options: StorageOptions | None = None) -> pads.Dataset:
    """pyarrow dataset of the rows of every complete run (one with a summary), run_date read back from
    the folder names."""
    fs, path = storage.filesystem(out, options)
    schema = output_schema(include_partition=True)
    complete = {u.rsplit("/", 1)[-1][:-len(".json")]
                for u in storage.list_files(storage.join(out, "_runs"), options, suffixes=(".json",))}
    part = re.compile(PART + "$")
    files = [f for f in storage.list_files(out, options, suffixes=(".parquet",))
             if part.sub("", f.rsplit("/", 1)[-1]) in complete]
    return pads.dataset([storage.filesystem(f, options)[1] for f in files], filesystem=fs, format="parquet",
                        schema=schema, partitioning=pads.partitioning(
                            pa.schema([schema.field(PARTITION_COLUMN)]), flavor="hive"),
                        partition_base_dir=path)


# ---- one writer per run ---------------------------------------------------------------------------------

# A lease not renewed for LEASE_SECONDS belongs to a dead run and is taken over. The holder renews it every
# RENEW_EVERY_S, so a live run keeps it unless storage is unreachable for the whole period (a request
# gives up after about 5 minutes, StorageOptions), and hosts' clocks need agree only to within minutes. A
# lease of a process that is gone from this host is taken over at once (a killed run re-run here).
LEASE_SECONDS = 600.0
RENEW_EVERY_S = 60.0
TOKEN = re.compile(r"[0-9a-f]{16}")


class RunBusyError(FileExistsError):
    """Another process holds the lease of the run: it is being written now."""


def lease_uri(out: str, run_id: str, token: str = "") -> str:
    return storage.join(out, "_runs", f"{run_id}.lease", token)


# tokens of the leases this process holds or is acquiring; another lease with this pid is a leftover of a
# run of this process that could not release it (storage was down when it ended)
_ACTIVE: set[str] = set()


def _alive_here(lease: dict) -> bool:
    """False when `lease` was taken on this host by a process that no longer exists, or by this process
    for a run that has ended."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return True
    if lease["pid"] == os.getpid():
        return lease.get("token") in _ACTIVE
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:                          # someone else's process: alive
        pass
    return True


def describe(lease: dict) -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.get("acquired_at", 0)))
    expires = time.strftime("%H:%M:%SZ", time.gmtime(lease.get("expires_at", 0)))
    return (f"process {lease.get('pid')} on {lease.get('host')!r} (lease {lease.get('token')}, taken "
            f"{started}, expires {expires} unless renewed)")


@dataclasses.dataclass(kw_only=True)
class RunLease:
    """The lease of one process on one run: an object `_runs/<run_id>.lease/<token>` holding its host,
    pid and expiry. Acquire: drop leases that expired or whose process is gone from this host; fail at
    once when another lease is held; else write ours as a candidate, list again and hold it only when it
    is alone (two candidates that see each other both withdraw and retry after a random pause, so of two
    simultaneous starts exactly one holds the lease and the other fails, naming it). Use it as a context
    manager: a thread renews it while the run is alive, and it is released on exit."""

    out: str
    run_id: str
    options: StorageOptions | None = None
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:16])
    ttl_s: float = LEASE_SECONDS
    renew_every_s: float = RENEW_EVERY_S
    acquired_at: float = dataclasses.field(default_factory=time.time)
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return lease_uri(self.out, self.run_id, self.token)

    def _write(self, *, held: bool) -> None:
        body = {"run_id": self.run_id, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": self.acquired_at, "expires_at": time.time() + self.ttl_s, "held": held}
        storage.write_bytes(self.uri, json.dumps(body).encode(), self.options)

    def others(self) -> list[dict]:
        """The live leases of the run other than this one; expired ones, and those of processes gone from
        this host, are deleted (taken over)."""
        live = []
        for uri in storage.list_files(lease_uri(self.out, self.run_id), self.options):
            token = uri.rsplit("/", 1)[-1]
            if token == self.token:
                continue
            if not TOKEN.fullmatch(token):
                log.warning("ignoring %s: not a lease this job writes", uri)
                continue
            try:
                lease = json.loads(storage.read_bytes(uri, self.options))
            except FileNotFoundError:                 # released since the listing
                continue
            except ValueError:
                log.warning("ignoring %s: not a lease this job writes", uri)
                continue
            if lease.get("expires_at", 0) < time.time() or not _alive_here(lease):
                log.warning("run %s: taking over the lease of %s", self.run_id, describe(lease))
                storage.delete(uri, self.options)
                continue
            live.append(lease)
        return live

    def acquire(self, *, tries: int = 20) -> RunLease:
        _ACTIVE.add(self.token)
        try:
            return self._acquire(tries)
        except BaseException:
            _ACTIVE.discard(self.token)
            raise

    def _acquire(self, tries: int) -> RunLease:
        for _ in range(tries):
            if held := [o for o in self.others() if o.get("held")]:
                raise RunBusyError(self._busy(held[0]))
            self._write(held=False)
            others = self.others()
            if not others:
                self._write(held=True)
                return self
            storage.delete(self.uri, self.options)           # withdraw, and let the other one go first
            if held := [o for o in others if o.get("held")]:
                raise RunBusyError(self._busy(held[0]))
            time.sleep(random.uniform(0.05, 0.5))
        raise RunBusyError(f"run {self.run_id} in {self.out}: other processes keep starting it; "
                           f"start it once (e.g. one cron entry)")

    def _busy(self, other: dict) -> str:
        return (f"run {self.run_id} in {self.out} is being written by {describe(other)}; wait for it to "
                f"finish (a lease left by a killed run expires {self.ttl_s / 60:.0f} min after its last "
                f"renewal, or at once when re-run on the same host)")

    def renew(self) -> bool:
        """Extend the lease; False when it is gone (taken over after it expired), which check() reports."""
        if not storage.exists(self.uri, self.options):
            return False
        self._write(held=True)
        return True

    def check(self) -> None:
        """Raise RunBusyError unless this process still holds the lease (before publishing and committing)."""
        try:
            lease = json.loads(storage.read_bytes(self.uri, self.options))
        except FileNotFoundError:
            lease = {}
        if lease.get("expires_at", 0) < time.time():
            raise RunBusyError(f"run {self.run_id} in {self.out}: this process lost its lease (not renewed "
                               f"within {self.ttl_s:.0f} s; another process may have taken the run over); "
                               f"not committing. Re-run to finish the run")
        # a renewal racing a takeover can leave our file beside the new holder's: the other one wins
        holders = [o for o in self.others() if o.get("held")]
        if holders:
            raise RunBusyError(f"run {self.run_id} in {self.out}: process {holders[0].get('pid')} on "
                               f"{holders[0].get('host')!r} holds the run's lease too (taken over while this "
                               f"process could not renew); not committing. Re-run to finish the run")

    def release(self) -> None:
        _ACTIVE.discard(self.token)
        storage.delete(self.uri, self.options)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                if not self.renew():
                    log.error("run %s: the lease %s was taken over; this run will not commit", self.run_id,
                              self.uri)
                    return
            except OSError as e:                      # storage trouble: the next renewal may succeed
                log.warning("run %s: could not renew the lease %s: %s", self.run_id, self.uri, e)

    def __enter__(self) -> RunLease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.release()
        except OSError as e:                          # e.g. the outage that ended the run: the lease expires
            log.warning("run %s: could not release the lease %s (it expires by itself): %s",
                        self.run_id, self.uri, e)
