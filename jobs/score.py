"""Score job: an image archive -> scores, verdicts and heatmaps (Ray actor pool) -> Parquet.

    python -m jobs score DATA_URI MODEL_URI OUT_URI [options]     (the same as `anomaly score`)
    python -m jobs score --config audit.yaml [--run-date YYYY-MM-DD]

A run is one audit: (archive, model, audit date). Its id is derived from those three, so re-running the
same audit resumes it: images already committed by an earlier, killed attempt are not scored again, and
a finished audit is left as it is unless `replace=True`. One process writes a run at a time (a lease,
jobs/output.py). Output layout: jobs/output.py.

The model is resolved once, on the driver, to one model id (the pinned `model_id` when given): every
actor loads that model or fails, so a model replaced in its bucket during the run never scores a row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time

from anomaly_core import storage
from anomaly_core.artifact import check_manifest, read_manifest
from anomaly_core.config import ModelConfig
from anomaly_core.storage import StorageOptions
from jobs import output
from jobs.audit import resolve_date
from jobs.runtime import (
    check_paths_reach_every_node,
    default_actors,
    ensure_ray,
    list_inputs,
    model_stage,
    read_decoded,
    track,
)
from jobs.scorer import Scorer

log = logging.getLogger(__name__)


def audit_run_id(data_uri: str | list[str], model_id: str, run_date: str) -> str:
    """Deterministic id of an audit: the same archive, model and date give the same id (and so resume),
    however the archive URIs are spelled or ordered."""
    uris = sorted(storage.normalise(u) for u in ([data_uri] if isinstance(data_uri, str) else data_uri))
    key = json.dumps([uris, model_id, run_date]).encode()
    return f"{run_date}-{hashlib.sha256(key).hexdigest()[:12]}"


def run_score(data_uri: str | list[str], model_uri: str, out_uri: str, *, batch_size: int = 16,
              actors: int | None = None, device: str = "auto", address: str | None = None,
              run_id: str | None = None, run_date: str | None = None, replace: bool = False,
              rows_per_file: int = 1024, model_id: str | None = None, shared_fs: bool = False,
              heatmap_png: bool = False, options: StorageOptions | None = None) -> dict:
    """Score every image named by `data_uri` with the model at `model_uri`; returns the run summary,
    which is also written to OUT/_runs/<run_id>.json.

    run_date: the audit date the rows are partitioned under: YYYY-MM-DD, "today" or "yesterday" (UTC);
    default: today.
    replace: delete a finished (or partial) run with the same id and score it again from nothing.
    rows_per_file: rows per committed Parquet file, the unit of work a killed run can lose.
    heatmap_png: also store each map as a PNG (jobs.scorer.Scorer), beside the grid.
    model_id: the id the model must have (16 hex digits, as `fit` printed it); a model at `model_uri`
    with another id is refused before any of its files is read. None: whatever model is there.
    shared_fs: local paths are on a file system every Ray node mounts at the same place; without it, local
    paths are refused on a cluster of more than one node.
    """
    t0 = time.time()
    now = dt.datetime.now(dt.timezone.utc)
    run_date = resolve_date(run_date, today=now.date())
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file={rows_per_file} must be >= 1")
    options = (options or StorageOptions()).resolved()       # workers use the driver's endpoint and region
    model_uri, out_uri = storage.normalise(model_uri), storage.normalise(out_uri)
    for uri in (model_uri, out_uri):
        storage.check_bucket(uri, options)           # fail fast on a missing bucket or bad credentials
    manifest = read_manifest(model_uri, options)     # ... and on a bad model path, before Ray starts
    model_id = check_manifest(manifest, model_uri, model_id=model_id)
    config = ModelConfig.from_dict(manifest["config"])
    run_id = output.check_run_id(run_id or audit_run_id(data_uri, model_id, run_date))
    if not replace and (done := output.read_summary(out_uri, run_id, options)) is not None:
        log.info("score: run %s is complete already (%d images); nothing to do (replace=True re-runs it)",
                 run_id, done["images"])
        return done
    with output.RunLease(out=out_uri, run_id=run_id, options=options) as lease:
        if not replace and (done := output.read_summary(out_uri, run_id, options)) is not None:
            return done                               # finished by the run that held the lease before us
        uris = list_inputs(data_uri, options)         # before --replace deletes anything
        if not shared_fs and any(not storage.is_s3(u) for u in [model_uri, out_uri, *uris]):
            ensure_ray(address)                       # local paths: only on one node, or a shared file system
            check_paths_reach_every_node({"model": [model_uri], "output": [out_uri], "archive": uris})
        if replace:
            output.delete_run(out_uri, run_id, run_date, options)
        committed = output.committed_uris(out_uri, run_id, run_date, options)
        todo = [u for u in uris if u not in committed]
        log.info("score: run %s: %d images, %d committed by an earlier attempt, %d to score",
                 run_id, len(uris), len(uris) - len(todo), len(todo))
        if todo:
            ensure_ray(address)
            n_actors, threads, gpus = default_actors(actors)
            # blocks no larger than a file, so that small --rows-per-file values commit as they go
            ds = read_decoded(todo, input_size=config.input_size, batch_size=batch_size, options=options,
                              block_rows=min(64, rows_per_file))
            ds = ds.map_batches(Scorer, fn_constructor_kwargs={
                "model_path": model_uri, "model_id": model_id, "device": device,   # auto: cuda where Ray gave a GPU
                "num_threads": threads, "run_id": run_id, "run_time": now.isoformat(timespec="seconds"),
                "run_date": run_date, "options": options, "heatmap_png": heatmap_png},
                batch_size=batch_size, compute=model_stage(n_actors), num_cpus=1, num_gpus=gpus,
                batch_format="numpy")
            ds = track(ds, total=len(todo), label="score")
            ds.write_datasink(output.StagedParquetSink(out_uri, run_id, rows_per_file=rows_per_file,
                                                       options=options))
        lease.check()
        output.publish(out_uri, run_id, run_date, options)
        seconds = time.time() - t0
        rows = output.read_run(out_uri, run_id, run_date, output.COUNT_COLUMNS, options)
        summary = output.count_rows(rows)
        missing = set(uris) - set(rows["uri"].to_pylist())
        if missing or summary["duplicates"]:          # never mark an incomplete or doubled run complete
            raise RuntimeError(f"run {run_id} in {out_uri}: {len(missing)} images without a row (e.g. "
                               f"{sorted(missing)[:3]}) and {summary['duplicates']} duplicated rows; not marked "
                               f"complete. Re-run to finish it, or re-run with replace (--replace) to start over")
        summary.update(run_id=run_id, run_date=run_date, model_id=model_id, output=out_uri,
                       data=data_uri, scored_now=len(todo), resumed_from=len(uris) - len(todo),
                       seconds=round(seconds, 2),
                       images_per_second=round(len(todo) / seconds, 2) if todo and seconds else None,
                       finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        lease.check()
        output.write_summary(out_uri, run_id, summary, options)
    log.info("score: %s", summary)
    return summary
