"""Score job: an image archive -> scores, verdicts and heatmaps (Ray actor pool) -> Parquet.

    python -m jobs.score DATA_URI MODEL_DIR OUT_DIR [options]     (the same options as `anomaly score`)

Output: Hive-partitioned Parquet under OUT_DIR/run_date=YYYY-MM-DD/, one row per image (README lists
the columns). Read it with DuckDB: SELECT * FROM read_parquet('OUT_DIR/**/*.parquet', hive_partitioning=1).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid

from anomaly_core.artifact import read_manifest
from anomaly_core.config import ModelConfig
from anomaly_core.pipeline import Scorer
from anomaly_core.schema import PARTITION_COLUMN, output_schema
from jobs.analyst import connect
from jobs.runtime import default_actors, ensure_ray, read_decoded

log = logging.getLogger(__name__)


def run_score(data_uri: str | list[str], model_dir: str, out_dir: str, *, batch_size: int = 16,
              actors: int | None = None, device: str = "auto", address: str | None = None,
              run_id: str | None = None, run_date: str | None = None) -> dict:
    """Score every image under `data_uri` with the model in `model_dir`; returns the run summary.

    run_date: the audit date (YYYY-MM-DD) the rows are partitioned under; default: today (UTC).
    """
    t0 = time.time()
    if run_date is not None:
        try:
            dt.date.fromisoformat(run_date)
        except ValueError:
            raise ValueError(f"run_date={run_date!r} must be a date as YYYY-MM-DD, e.g. 2026-11-22") from None
    manifest = read_manifest(model_dir)              # fail fast, before Ray starts, on a bad model path
    config = ModelConfig.from_dict(manifest["config"])
    ensure_ray(address)
    now = dt.datetime.now(dt.timezone.utc)
    run_id = run_id or f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    n_actors, threads, gpus = default_actors(actors)
    ds = read_decoded(data_uri, image_size=config.image_size, batch_size=batch_size)
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={
        "model_path": str(model_dir), "device": "cuda" if gpus else device, "num_threads": threads,
        "run_id": run_id, "run_time": now.isoformat(timespec="seconds"), "run_date": run_date or ""},
        batch_size=batch_size, concurrency=n_actors, num_cpus=1, num_gpus=gpus, batch_format="numpy")
    ds.write_parquet(out_dir, partition_cols=[PARTITION_COLUMN], schema=output_schema(include_partition=True))
    seconds = time.time() - t0
    summary = summarise(out_dir, run_id=run_id)
    summary.update(run_id=run_id, model_id=manifest["model_id"], seconds=round(seconds, 2),
                   images_per_second=round(summary["images"] / seconds, 2) if seconds else None,
                   output=str(out_dir))
    log.info("score: %s", summary)
    return summary


def summarise(out_dir: str, *, run_id: str) -> dict:
    """Counts of one run, read back from the Parquet it wrote."""
    row = connect(out_dir).execute(
        "SELECT count(*), count(*) FILTER (verdict = 'anomalous'), count(*) FILTER (status = 'error') "
        "FROM scores WHERE run_id = ?", [run_id]).fetchone()
    return {"images": row[0], "anomalous": row[1], "errors": row[2]}


if __name__ == "__main__":
    from jobs.cli import score
    score(prog_name="python -m jobs.score")
