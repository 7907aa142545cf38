"""Reviewers' labels of scored images: an append-only Parquet table under OUT/_labels/.

Each write is one new file, `OUT/_labels/<UTC time>-<random hex>.parquet`, written whole or not at all
(storage.write_bytes) under a name no other writer can take, so reviewers labelling at the same time,
from one process or many hosts, never overwrite each other, and a reader never sees half a file.
Nothing is edited or deleted: a later label of the same image (content_sha256) supersedes an earlier one.

Columns (LABEL_SCHEMA): content_sha256 and uri of the image as the scores have them, label (`defect`: a
real defect; `normal`: a false alarm or acceptable variation), an optional comment, the reviewer's name
and the UTC time of the label. `read_labels` returns the label in force per image; `jobs.analyst.connect`
exposes the same as the `labels` view, beside `scores`.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import uuid

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from anomaly_core import storage
from anomaly_core.storage import StorageOptions

LABELS = ("defect", "normal")
REVIEWER_ENV = "ANOMALY_REVIEWER"
SHA256 = re.compile(r"[0-9a-f]{64}")
LABEL_SCHEMA = pa.schema([
    pa.field("content_sha256", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("comment", pa.string()),
    pa.field("reviewer", pa.string(), nullable=False),
    pa.field("labelled_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

# The label in force per image: the latest; labels of the same microsecond are ordered by their content,
# so the choice is the same whichever files hold them (and after any rewrite of the files).
LATEST_SQL = """
SELECT content_sha256, uri, label, comment, reviewer, labelled_at
FROM {source}
QUALIFY row_number() OVER (PARTITION BY content_sha256 ORDER BY labelled_at DESC, reviewer DESC, label DESC,
                                                                 uri DESC, comment DESC NULLS LAST) = 1
"""


def labels_uri(out: str) -> str:
    return storage.join(out, "_labels")


def reviewer_name(value: str | None = None) -> str:
    """The reviewer's name: `value` (a --reviewer option) or else $ANOMALY_REVIEWER."""
    name = value if value is not None else os.environ.get(REVIEWER_ENV)
    if name is None:
        raise ValueError(f"no reviewer name: pass --reviewer NAME or set the environment variable "
                         f"{REVIEWER_ENV}=NAME (it is stored with every label)")
    return check_reviewer(name)


def check_reviewer(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or any(c in name for c in "\r\n\t"):
        raise ValueError(f"reviewer={name!r}: give a non-empty name of at most 200 characters on one line, "
                         f"e.g. --reviewer j.smith or {REVIEWER_ENV}=j.smith")
    return name.strip()


def check_label(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"label={label!r} is not a label; choose one of {', '.join(LABELS)}")
    return label


def _check_row(row: dict) -> dict:
    sha, uri, comment = row.get("content_sha256"), row.get("uri"), row.get("comment")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise ValueError(f"content_sha256={sha!r} must be the 64 lower-case hex digits of the image's "
                         f"content_sha256 column")
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"uri={uri!r} must be the image's uri as the scores have it")
    if comment is not None and not isinstance(comment, str):
        raise ValueError(f"comment={comment!r} must be text or None")
    return {"content_sha256": sha, "uri": uri, "label": check_label(row.get("label")),
            "comment": comment or None}


def append_labels(out: str, rows: list[dict], *, reviewer: str, options: StorageOptions | None = None,
                  now: dt.datetime | None = None) -> str:
    """Append labels to OUT's labels table as one new file; returns its URI.

    rows: [{"content_sha256", "uri", "label" (one of LABELS), "comment" (optional)}], checked before
    anything is written. now: the label time (default: the current UTC time), the same for every row;
    within one call a later row of the same image supersedes an earlier one only through its content
    (LATEST_SQL), so give one row per image.
    """
    checked = [_check_row(r) for r in rows]
    if not checked:
        raise ValueError("no labels to append: rows is empty")
    reviewer = check_reviewer(reviewer)
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    table = pa.Table.from_pylist([{**r, "reviewer": reviewer, "labelled_at": now} for r in checked],
                                 schema=LABEL_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = storage.join(labels_uri(out), f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet")
    storage.write_bytes(uri, buf.getvalue(), options)
    return uri


def labels_dataset(out: str, options: StorageOptions | None = None,
                   files: list[str] | None = None) -> pads.Dataset:
    """pyarrow dataset of the label files under OUT/_labels (or of `files`; empty when there is none)."""
    if files is None:
        files = storage.list_files(labels_uri(out), options, suffixes=(".parquet",))
    fs, _ = storage.filesystem(labels_uri(out), options)
    return pads.dataset([storage.filesystem(f, options)[1] for f in files], filesystem=fs, format="parquet",
                        schema=LABEL_SCHEMA)


class LabelCache:
    """Every label of OUT in memory, read incrementally: a label file never changes once written, so
    `table()` lists OUT/_labels and reads only the files it has not read before. For a process that
    queries the labels again and again (the review page), where each query would otherwise open every
    file, one per label."""

    def __init__(self, out: str, options: StorageOptions | None = None):
        self.out, self.options = out, options
        self._read: set[str] = set()
        self._table = LABEL_SCHEMA.empty_table()

    def table(self) -> pa.Table:
        files = storage.list_files(labels_uri(self.out), self.options, suffixes=(".parquet",))
        if new := [f for f in files if f not in self._read]:
            added = labels_dataset(self.out, self.options, files=new).to_table()
            self._table = pa.concat_tables([self._table, added]).combine_chunks()
            self._read.update(new)
        return self._table


def create_labels_view(con: duckdb.DuckDBPyConnection, out: str, options: StorageOptions | None = None, *,
                       cache: LabelCache | None = None) -> None:
    """Views on `con`: `all_labels` (every label written) and `labels` (the one in force per image),
    read from the files now, or from `cache` (refreshed)."""
    con.register("all_labels", cache.table() if cache is not None else labels_dataset(out, options))
    con.execute(f"CREATE OR REPLACE VIEW labels AS {LATEST_SQL.format(source='all_labels')}")


def read_labels(out: str, *, options: StorageOptions | None = None) -> pa.Table:
    """The label in force per image (LATEST_SQL) as a table with LABEL_SCHEMA's columns, sorted by
    content_sha256."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    create_labels_view(con, out, options)
    table = con.sql("SELECT * FROM labels ORDER BY content_sha256").to_arrow_table()
    return table.cast(LABEL_SCHEMA)
