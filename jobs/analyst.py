"""The analysts' DuckDB queries (jobs/analyst.sql) as callables, over a scored output folder and its
reviewers' labels."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from anomaly_core.storage import StorageOptions
from jobs.labels import LabelCache, create_labels_view
from jobs.output import scores_dataset

SQL_FILE = Path(__file__).with_name("analyst.sql")


def load_queries(path: Path = SQL_FILE) -> dict[str, str]:
    """{name: sql} from `-- name: X` sections of the SQL file, in file order."""
    parts = re.split(r"^-- name: (\w+)\s*$", path.read_text(), flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def connect(out: str, options: StorageOptions | None = None, *,
            labels: LabelCache | None = None) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with a `scores` view over the published rows under OUT (a folder or s3:// prefix),
    and `labels` (the label in force per content_sha256) and `all_labels` views over OUT/_labels
    (jobs.labels), as they are when it connects (read through `labels` when given). Times are in UTC.

    The rows come through a pyarrow dataset (jobs.output.scores_dataset): it reads S3 with the same
    credentials and endpoint as the jobs (DuckDB's httpfs extension would be a download at run time)
    and skips staged files of unfinished runs. DuckDB pushes filters and projections into it."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("published_scores", scores_dataset(str(out), options))
    # run_date as DATE, as DuckDB's own hive_partitioning reads the folder names
    con.execute("CREATE VIEW scores AS SELECT * REPLACE (CAST(run_date AS DATE) AS run_date) FROM published_scores")
    create_labels_view(con, str(out), options, cache=labels)
    return con


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> list[dict]:
    """Rows of a query as {column: value} dicts (what anomaly_core.decode_heatmap takes)."""
    cur = con.execute(sql, params or None)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def run_query(con: duckdb.DuckDBPyConnection, name: str, **params) -> list[dict]:
    queries = load_queries()
    if name not in queries:
        raise KeyError(f"query {name!r} is unknown; choose one of {list(queries)}")
    return fetch(con, queries[name], params)
