"""The scored output of audit runs: Parquet committed file by file, published per run, resumable.

Layout under OUT (a local folder or an s3:// prefix):

    run_date=YYYY-MM-DD/<run_id>-<part>.parquet   published rows: what analysts read
    _staging/<run_id>/<part>.parquet              rows of a run still in progress
    _runs/<run_id>.json                           the run summary, written last: the run is complete

Every file appears whole or not at all (storage.write_bytes) and is named by the images it holds, so a
killed run leaves only complete files, a write task Ray retries rewrites its own files instead of adding
copies, and re-running the run scores just the images no file holds. `analyst.connect` and
`scores_dataset` read only runs whose summary exists (the commit marker), so a run being published or
replaced is never seen half-done; a bare `read_parquet('OUT/run_date=*/*.parquet')` may see a run while
its files are being moved.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data import Datasink

from anomaly_core import storage
from anomaly_core.schema import PARTITION_COLUMN, output_schema
from anomaly_core.storage import StorageOptions

log = logging.getLogger(__name__)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PART = r"-[0-9a-f]{32}\.parquet"                 # <run_id>-<hash of the file's image URIs>.parquet


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
    return storage.join(out, f"{PARTITION_COLUMN}={run_date}")


def parquet_bytes(table: pa.Table) -> bytes:
    """One Parquet file (zstd) with the output schema and its version in the key-value metadata."""
    table = table.drop_columns([c for c in (PARTITION_COLUMN,) if c in table.column_names])
    table = table.select(output_schema().names).cast(output_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class StagedParquetSink(Datasink):
    """Ray Data sink: each write task gets at least `rows_per_file` rows (Ray bundles small blocks) and
    commits them as staged Parquet files of `rows_per_file` rows, one after the other."""

    def __init__(self, out: str, run_id: str, *, rows_per_file: int, options: StorageOptions | None = None):
        self.staging, self.rows_per_file, self.options = staging_uri(out, run_id), rows_per_file, options

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> int:
        schema = output_schema(include_partition=True)
        # cast before concatenating: a block of only unreadable images has all-null heatmaps (type null)
        table = pa.concat_tables([(b if isinstance(b, pa.Table) else pa.Table.from_pandas(b))
                                  .select(schema.names).cast(schema) for b in blocks])
        for s in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(s, self.rows_per_file)
            storage.write_bytes(storage.join(self.staging, f"{part_name(part['uri'].to_pylist())}.parquet"),
                                parquet_bytes(part), self.options)
        return table.num_rows


def run_files(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> list[str]:
    """Every committed file of the run: staged and published."""
    mine = re.compile(re.escape(run_id) + PART)
    published = [u for u in storage.list_files(partition_uri(out, run_date), options, suffixes=(".parquet",))
                 if mine.fullmatch(u.rsplit("/", 1)[-1])]
    return storage.list_files(staging_uri(out, run_id), options, suffixes=(".parquet",)) + published


def read_columns(files: list[str], columns: list[str], options: StorageOptions | None = None) -> pa.Table:
    if not files:
        return pa.table({c: pa.array([], output_schema().field(c).type) for c in columns})
    fs, _ = storage.filesystem(files[0], options)
    paths = [storage.filesystem(f, options)[1] for f in files]
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=output_schema()).to_table(columns=columns)


def read_run(out: str, run_id: str, run_date: str, columns: list[str],
             options: StorageOptions | None = None) -> pa.Table:
    """`columns` of every committed row of the run."""
    return read_columns(run_files(out, run_id, run_date, options), columns, options)


def committed_uris(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> set[str]:
    """Image URIs already scored by the run (in any of its committed files)."""
    return set(read_run(out, run_id, run_date, ["uri"], options)["uri"].to_pylist())


def publish(out: str, run_id: str, run_date: str, options: StorageOptions | None = None) -> int:
    """Move the run's staged files into its partition, then drop the staging folder (with any temporary
    file a killed writer left); returns how many moved. Safe to repeat after a crash half-way."""
    staged = storage.list_files(staging_uri(out, run_id), options, suffixes=(".parquet",))
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
