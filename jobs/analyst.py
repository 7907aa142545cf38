"""The analysts' DuckDB queries (jobs/analyst.sql) as callables, over a scored output folder."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

SQL_FILE = Path(__file__).with_name("analyst.sql")


def load_queries(path: Path = SQL_FILE) -> dict[str, str]:
    """{name: sql} from `-- name: X` sections of the SQL file, in file order."""
    parts = re.split(r"^-- name: (\w+)\s*$", path.read_text(), flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}


def connect(out_dir: str) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with a `scores` view over OUT_DIR/**/*.parquet (Hive-partitioned)."""
    con = duckdb.connect()
    pattern = f"{out_dir}/**/*.parquet".replace("'", "''")
    con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)")
    return con


def run_query(con: duckdb.DuckDBPyConnection, name: str, **params) -> list[dict]:
    queries = load_queries()
    if name not in queries:
        raise KeyError(f"query {name!r} is unknown; choose one of {list(queries)}")
    cur = con.execute(queries[name], params or None)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]
