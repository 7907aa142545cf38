"""Ray start-up and the Ray Data steps both jobs share."""

from __future__ import annotations

import logging
import os

import ray

from anomaly_core.images import IMAGE_EXTENSIONS
from anomaly_core.pipeline import decode_batch

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start Ray in this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting Ray in-process (no --address / RAY_ADDRESS)")
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.isatty(2)          # plain logs under `ray job submit` or CI


def resources() -> tuple[int, int]:
    """(CPUs, GPUs) the cluster reports."""
    r = ray.cluster_resources()
    return int(r.get("CPU", 1)), int(r.get("GPU", 0))


def default_actors(requested: int | None) -> tuple[int, int, float]:
    """(actor count, torch threads per actor, GPUs per actor) from what the cluster has.

    GPUs: one actor per GPU. CPUs: actors of 4 threads (ViT matmuls scale well to ~4 cores), at least one;
    each actor reserves a single logical CPU so decoding tasks still get scheduled beside it.
    """
    cpus, gpus = resources()
    if gpus:
        return requested or gpus, max(1, cpus // max(gpus, 1)), 1.0
    n = requested or max(1, cpus // 4)
    return n, max(1, cpus // n), 0.0


def ray_map(fn, items):
    """map() whose calls run as Ray tasks (one CPU each), results in input order. Numpy arguments travel
    through the object store; this is the `map_fn` the coreset partitions run with."""
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(item) for item in items])


def read_decoded(uri: str | list[str], *, image_size: int, batch_size: int) -> "ray.data.Dataset":
    """Ray Data dataset of decoded images (see anomaly_core.pipeline.decode_batch) under `uri`."""
    ds = ray.data.read_binary_files(uri, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS),
                                    ignore_missing_paths=False)
    return ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=batch_size,
                          batch_format="numpy")
