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

import numpy as np
import ray

from anomaly_core import storage
from anomaly_core.artifact import check_manifest, read_manifest
from anomaly_core.config import ModelConfig
from anomaly_core.decode import SHARD_ROWS
from anomaly_core.storage import StorageOptions
from jobs import output
from jobs.audit import resolve_date
from jobs.runtime import (
    check_image_columns,
    check_paths_reach_every_node,
    default_actors,
    ensure_ray,
    model_stage,
    ray_map,
    read_decoded,
    read_shards_decoded,
    stream_archive,
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
              heatmap_png: bool = False, image_column: str = "image", id_column: str | None = None,
              options: StorageOptions | None = None) -> dict:
    """Score every image named by `data_uri` with the model at `model_uri`; returns the run summary,
    which is also written to OUT/_runs/<run_id>.json.

    run_date: the audit date the rows are partitioned under: YYYY-MM-DD, "today" or "yesterday" (UTC);
    default: today.
    replace: delete a finished (or partial) run with the same id and score it again from nothing.
    rows_per_file: rows per committed Parquet file, the unit of work a killed run can lose. An archive of
    shards (anomaly_core.shards) is committed one file per shard instead, and resumed by shard.
    image_column, id_column: the image-bytes column and the optional id column of Parquet shards.
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
        ensure_ray(address)                           # the archive is listed in Ray tasks
        archive = stream_archive(data_uri, options)   # before --replace deletes anything
        if not shared_fs:                             # local paths: only on one node, or a shared file system
            check_paths_reach_every_node({"model": [model_uri], "output": [out_uri],
                                          "archive": [u for u in [archive.local, *archive.shards] if u]})
        if replace:
            output.delete_run(out_uri, run_id, run_date, options)
        scorer = {"model_path": model_uri, "model_id": model_id, "device": device,   # auto: cuda where Ray gave a GPU
                  "run_id": run_id, "run_time": now.isoformat(timespec="seconds"), "run_date": run_date,
                  "options": options, "heatmap_png": heatmap_png}
        run = dict(out_uri=out_uri, run_id=run_id, run_date=run_date, batch_size=batch_size, actors=actors,
                   options=options, scorer=scorer)
        if archive.shards:
            counts = _score_shards(archive.shards, input_size=config.input_size, image_column=image_column,
                                   id_column=id_column, rows_per_write=rows_per_file, lease=lease, **run)
        else:
            counts = _score_images(archive.images, input_size=config.input_size, rows_per_file=rows_per_file,
                                   lease=lease, **run)
        seconds = time.time() - t0
        summary = {**counts, "run_id": run_id, "run_date": run_date, "model_id": model_id, "output": out_uri,
                   "data": data_uri, "seconds": round(seconds, 2),
                   "images_per_second": round(counts["scored_now"] / seconds, 2) if counts["scored_now"] else None,
                   "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        lease.check()
        output.write_summary(out_uri, run_id, summary, options)
    log.info("score: %s", summary)
    return summary


def _score_images(images: ray.data.Dataset, *, out_uri: str, run_id: str, run_date: str, input_size: int,
                  batch_size: int, actors: int | None, rows_per_file: int, options: StorageOptions, scorer: dict,
                  lease: output.RunLease) -> dict:
    """Score the images of `images` (stream_archive: column `path`, a name may repeat) no committed file
    holds, publish, and check that every image has exactly one row; returns the run's counts
    (output.count_rows's) with scored_now and resumed_from. What is pending and the check are counted
    in Ray tasks (output.tally), so the driver never holds the archive's names or the committed URIs."""
    before = output.tally(images, output.run_files(out_uri, run_id, run_date, options), options).materialize()
    todo = output.pending(before).materialize()
    listed, n_todo = output.tally_counts(before)["listed"], todo.count()
    log.info("score: run %s: %d images, %d committed by an earlier attempt, %d to score",
             run_id, listed, listed - n_todo, n_todo)
    if n_todo:
        n_actors, threads, gpus = default_actors(actors)
        # blocks no larger than a file, so that small --rows-per-file values commit as they go
        ds = read_decoded(todo, input_size=input_size, batch_size=batch_size, options=options,
                          block_rows=min(64, rows_per_file))
        ds = ds.map_batches(Scorer, fn_constructor_kwargs={**scorer, "num_threads": threads},
                            batch_size=batch_size, compute=model_stage(n_actors), num_cpus=1, num_gpus=gpus,
                            batch_format="numpy")
        ds = track(ds, total=n_todo, label="score")
        ds.write_datasink(output.StagedParquetSink(out_uri, run_id, rows_per_file=rows_per_file, options=options))
    lease.check()
    output.publish(out_uri, run_id, run_date, options)
    after = output.tally(images, output.run_files(out_uri, run_id, run_date, options), options).materialize()
    counts = output.tally_counts(after)
    if counts["missing"] or counts["duplicates"]:     # never mark an incomplete or doubled run complete
        missing = [r["path"] for r in output.pending(after).take(3)]
        raise RuntimeError(f"run {run_id} in {out_uri}: {counts['missing']} images without a row (e.g. "
                           f"{missing}) and {counts['duplicates']} duplicated rows; not marked "
                           f"complete. Re-run to finish it, or re-run with replace (--replace) to start over")
    counts = {k: counts[k] for k in ("images", "anomalous", "errors", "warnings", "duplicates")}
    return {**counts, "scored_now": n_todo, "resumed_from": listed - n_todo}


class ShardScorer(Scorer):
    """Scorer that passes SHARD_ROWS through: ShardSink commits a shard once it holds that many rows."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**super().__call__(batch), SHARD_ROWS: batch[SHARD_ROWS]}


FILES_PER_COUNT_TASK = 64


def _score_shards(shards: list[str], *, out_uri: str, run_id: str, run_date: str, input_size: int,
                  batch_size: int, actors: int | None, rows_per_write: int,
                  image_column: str, id_column: str | None, options: StorageOptions, scorer: dict,
                  lease: output.RunLease) -> dict:
    """Score the shards no committed file holds (one file per shard, output.ShardSink), publish, and
    check, per shard, that each has its file and each file one row per image of that shard and no
    other; returns the counts, with shards, shards_resumed, scored_now and resumed_from (images)."""
    committed = output.committed_parts(out_uri, run_id, run_date, options)
    todo = [s for s in shards if output.part_name([s]) not in committed]
    log.info("score: run %s: %d shards, %d committed by an earlier attempt, %d to score",
             run_id, len(shards), len(shards) - len(todo), len(todo))
    check_image_columns(shards, image_column=image_column, id_column=id_column, options=options)
    if todo:
        output.clear_pieces(out_uri, run_id, options)
        n_actors, threads, gpus = default_actors(actors)
        ds = read_shards_decoded(todo, input_size=input_size, batch_size=batch_size, options=options,
                                 image_column=image_column, id_column=id_column)
        ds = ds.map_batches(ShardScorer, fn_constructor_kwargs={**scorer, "num_threads": threads},
                            batch_size=batch_size, compute=model_stage(n_actors), num_cpus=1, num_gpus=gpus,
                            batch_format="numpy")
        ds.write_datasink(output.ShardSink(out_uri, run_id, rows_per_write=rows_per_write, options=options))
    lease.check()
    output.publish(out_uri, run_id, run_date, options)
    files = output.run_files(out_uri, run_id, run_date, options)
    groups = [files[s:s + FILES_PER_COUNT_TASK] for s in range(0, len(files), FILES_PER_COUNT_TASK)]
    per_file = [c for group in ray_map(output.count_files, groups, options) for c in group]
    missing = {output.part_name([s]) for s in shards} - {c["part"] for c in per_file}
    foreign = sum(c["foreign"] for c in per_file)
    counts = {k: sum(c[k] for c in per_file) for k in ("images", "anomalous", "errors", "warnings", "duplicates")}
    seen: set[str] = set()
    for c in per_file:                                # a shard's file twice (staged and published): its rows twice
        counts["duplicates"] += c["images"] if c["part"] in seen else 0
        seen.add(c["part"])
    if missing or foreign or counts["duplicates"]:    # never mark an incomplete or doubled run complete
        raise RuntimeError(f"run {run_id} in {out_uri}: {len(missing)} shards without a file, {foreign} rows in "
                           f"the file of another shard and {counts['duplicates']} duplicated rows; not marked "
                           f"complete. Re-run to finish it, or re-run with replace (--replace) to start over")
    resumed = sum(c["images"] for c in per_file if c["part"] in committed)
    return {**counts, "shards": len(shards), "shards_resumed": len(shards) - len(todo),
            "scored_now": counts["images"] - resumed, "resumed_from": resumed}
