"""Fit job: good images -> patch features (Ray actor pool) -> feature blocks in Ray's object store ->
composable coreset bank + calibration (Ray tasks over the blocks) -> model dir.

The driver never holds the training features: only the names, the coreset survivors and the bank.
Blocks beyond the object store's capacity (`memory_budget_mb` when Ray starts here) spill to local disk.

    python -m jobs fit DATA_URI MODEL_URI [options]     (the same as `anomaly fit`)
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import ray

from anomaly_core import storage
from anomaly_core.artifact import check_target
from anomaly_core.config import ModelConfig
from anomaly_core.coreset import coreset_size
from anomaly_core.decode import shard_uris
from anomaly_core.features import FeatureExtractor, augment_batch
from anomaly_core.fit import fit_bank, images_per_block, mark_folds, patch_estimate, split_calibration
from anomaly_core.model import Model
from anomaly_core.storage import StorageOptions
from anomaly_core.weights import load_weights
from jobs.runtime import (
    check_image_columns,
    check_paths_reach_every_node,
    default_actors,
    ensure_ray,
    list_archive,
    model_stage,
    ray_map,
    read_decoded,
    read_shards_decoded,
    track,
)

log = logging.getLogger(__name__)


def numpy_block(block) -> dict[str, np.ndarray]:
    """An Arrow block of the feature dataset -> its numpy columns (features [B, P, D] float32)."""
    from ray.data.block import BlockAccessor
    return BlockAccessor.for_block(block).to_batch_format("numpy")


def check_budget(config: ModelConfig, n_patches: int, memory_budget_mb: int | None) -> None:
    """Fail before any work when the coreset survivors alone (what the driver must hold) exceed the budget."""
    if memory_budget_mb is None:
        return
    k = coreset_size(n_patches, ratio=config.coreset_ratio, size=config.coreset_size)
    need = config.coreset_oversample * k * (config.feature_dim + config.projection_dim) * 4 / 2 ** 20
    if need > memory_budget_mb / 2:
        raise ValueError(f"the coreset of {k} patches needs about {need:.0f} MB of survivors on the driver, more "
                         f"than half of memory_budget_mb={memory_budget_mb}; lower --coreset-ratio "
                         f"(PatchCore: 0.01 is enough at this scale) or raise --memory-budget-mb")


def feature_blocks(ds: ray.data.Dataset, *, config: ModelConfig, folds: dict[str, int], held: frozenset[str],
                   n_images: int, batch_size: int, actors: int | None, device: str, label: str) -> list:
    """ObjectRefs of the feature blocks (anomaly_core.fit's format, one coreset partition each) of the
    decoded images of `ds` (`n_images` of them): augmented copies of the bank images when the config
    augments (`held`: the names kept out of the bank), features from the actor pool, folds from `folds`
    (name -> fold; -1 for the others). The blocks stay in Ray's object store (spilled to disk beyond it)."""
    n_actors, threads, gpus = default_actors(actors)
    if config.n_augment > 1:
        ds = ds.map_batches(augment_batch, fn_kwargs={"name": config.augment, "held": held},
                            batch_size=batch_size, batch_format="numpy", num_cpus=0.5)
    ds = track(ds.map_batches(FeatureExtractor, fn_constructor_kwargs={
        "config": config, "device": device, "num_threads": threads},
        batch_size=batch_size, compute=model_stage(n_actors), num_cpus=1, num_gpus=gpus, batch_format="numpy"),
        total=len(held) + (n_images - len(held)) * config.n_augment, label=label)
    ds = ds.map_batches(mark_folds, fn_kwargs={"folds": folds}, batch_size=images_per_block(config),
                        batch_format="numpy", num_cpus=0.5)
    return [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]


def run_fit(data_uri: str | list[str], model_uri: str, *, config: ModelConfig, batch_size: int = 16,
            actors: int | None = None, device: str = "auto", address: str | None = None,
            overwrite: bool = False, options: StorageOptions | None = None,
            memory_budget_mb: int | None = None, shared_fs: bool = False, image_column: str = "image",
            id_column: str | None = None) -> dict:
    """Fit a model on the good images named by `data_uri` (folder, s3:// prefix or manifest file of
    images, or shards: jobs.runtime.list_archive); returns the manifest written to `model_uri` (folder
    or s3:// prefix).

    memory_budget_mb: object-store memory for the feature blocks when Ray starts in this process (the
    rest spills to disk); also bounds what the driver may hold. None: Ray's default (30% of RAM).
    shared_fs: local paths are on a file system every Ray node mounts at the same place; without it, local
    paths are refused on a cluster of more than one node.
    image_column, id_column: the image-bytes column and the optional id column of Parquet shards.
    """
    t0 = time.time()
    options = (options or StorageOptions()).resolved()       # workers use the driver's endpoint and region
    model_uri = storage.normalise(model_uri)
    storage.check_bucket(model_uri, options)
    check_target(model_uri, overwrite=overwrite, options=options)          # before hours of work
    archive = list_archive(data_uri, options)
    if archive.shards:
        # the calibration split needs every image's name first: one Ray task per shard lists its rows
        ensure_ray(address, object_store_mb=memory_budget_mb)
        check_image_columns(archive.shards, image_column=image_column, id_column=id_column, options=options)
        uris = [u for part in ray_map(shard_uris, archive.shards, options, image_column, id_column) for u in part]
    else:
        uris = archive.images
    plan = split_calibration(uris, config=config)
    held = plan.held_out(uris)                                # kept out of the final bank (hold-out only)
    n_estimate = patch_estimate(len(uris) - len(held), config=config)
    check_budget(config, n_estimate, memory_budget_mb)
    ensure_ray(address, object_store_mb=memory_budget_mb)
    if not shared_fs:
        check_paths_reach_every_node({"training images": archive.images or archive.shards, "model": [model_uri]})
    gpus = default_actors(actors)[2]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True              # same blocks, same coreset, on every run
    if archive.shards:                                        # the order listed above: shards, then members
        ds = read_shards_decoded(archive.shards, input_size=config.input_size, batch_size=batch_size,
                                 options=options, image_column=image_column, id_column=id_column)
    else:
        ds = read_decoded(uris, input_size=config.input_size, batch_size=batch_size, options=options)
    blocks = feature_blocks(ds, config=config, folds=plan.folds_of(uris), held=held, n_images=len(uris),
                            batch_size=batch_size, actors=actors, device=device, label="fit: features")
    t_feat = time.time() - t0
    log.info("fit: features of %d images in %d blocks, %.1fs", len(uris), len(blocks), t_feat)
    bank, cal, stats = fit_bank(blocks, config=config, plan=plan, n_estimate=n_estimate, map_fn=ray_map,
                                block_of=numpy_block, search_device="cuda" if gpus else "cpu")
    del blocks
    for path, error in stats.unreadable:
        log.warning("skipped unreadable training image %s: %s", path, error)
    stats = dataclasses.replace(stats, feature_seconds=round(t_feat, 2), fit_seconds=round(time.time() - t0, 2))
    _, weights = load_weights(config.weights, backbone=config.backbone)      # the identity the actors load
    model = Model(config=config, bank=bank, calibration=cal, weights=weights, stats=stats)
    manifest = model.save(model_uri, overwrite=overwrite, options=options)
    log.info("fit: %d images (%d unreadable) -> bank %d, threshold %.4f, %.1fs -> %s",
             stats.n_images, len(stats.unreadable), bank.size, cal.threshold, stats.fit_seconds, model_uri)
    return manifest
