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
from collections.abc import Callable
from functools import partial

import numpy as np
import ray

from anomaly_core import storage
from anomaly_core.artifact import check_target
from anomaly_core.config import ModelConfig
from anomaly_core.coreset import coreset_size
from anomaly_core.decode import shard_uris
from anomaly_core.features import FeatureExtractor, augment_batch
from anomaly_core.fit import (
    ALIGN_TRIAL_IMAGES,
    ALIGN_TRIAL_MIN,
    AlignmentTrial,
    SplitPlan,
    aligned_config,
    alignment_trial,
    compose,
    fit_bank,
    fitted_config,
    images_per_block,
    mark_folds,
    patch_estimate,
    split_calibration,
    trial_sample,
)
from anomaly_core.model import Model
from anomaly_core.shards import is_shard, shard_of
from anomaly_core.storage import StorageOptions
from anomaly_core.weights import load_weights
from jobs.runtime import (
    Archive,
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
    """Fail when the coreset survivors alone (what the driver must hold) exceed the budget: before any work
    where the images' names are known first, else (shards, good_features) before the coreset."""
    if memory_budget_mb is None:
        return
    k = coreset_size(n_patches, ratio=config.coreset_ratio, size=config.coreset_size)
    need = config.coreset_oversample * k * (config.feature_dim + config.projection_dim) * 4 / 2 ** 20
    if need > memory_budget_mb / 2:
        raise ValueError(f"the coreset of {k} patches needs about {need:.0f} MB of survivors on the driver, more "
                         f"than half of memory_budget_mb={memory_budget_mb}; lower --coreset-ratio "
                         f"(PatchCore: 0.01 is enough at this scale) or raise --memory-budget-mb")


def feature_blocks(ds: ray.data.Dataset, *, config: ModelConfig, held: frozenset[str], total: int | None,
                   batch_size: int, actors: int | None, device: str, label: str) -> list:
    """ObjectRefs of the feature blocks (anomaly_core.fit's format, one coreset partition each) of the
    decoded images of `ds`: augmented copies of the bank images when the config augments (`held`: the
    names kept out of the bank), features from the actor pool. Every block's "fold" is -1: the folds are
    set when a pass reads a block (GoodFeatures.block_of). total: the rows the actor pool will put out,
    for the progress line (None: unknown, no line). The blocks stay in Ray's object store (spilled to
    disk beyond it)."""
    n_actors, threads, gpus = default_actors(actors)
    if config.n_augment > 1:
        ds = ds.map_batches(augment_batch, fn_kwargs={"name": config.augment, "held": held},
                            batch_size=batch_size, batch_format="numpy", num_cpus=0.5)
    ds = ds.map_batches(FeatureExtractor, fn_constructor_kwargs={
        "config": config, "device": device, "num_threads": threads},
        batch_size=batch_size, compute=model_stage(n_actors), num_cpus=1, num_gpus=gpus, batch_format="numpy")
    if total is not None:
        ds = track(ds, total=total, label=label)
    ds = ds.map_batches(mark_folds, fn_kwargs={"folds": {}}, batch_size=images_per_block(config),
                        batch_format="numpy", num_cpus=0.5)
    return [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]


def block_names(block) -> list[str]:
    """Names of the images (originals, not augmented copies) of an Arrow feature block, in order."""
    b = numpy_block(block)
    return [str(p) for p, c in zip(b["path"], b["copy"], strict=True) if c == 0]


@dataclasses.dataclass(frozen=True)
class GoodFeatures:
    """Feature blocks of good images and the calibration split of their names."""
    blocks: list                      # ObjectRefs of the blocks in Ray's object store, folds not set
    names: list[str]                  # every image's name (unreadable ones too), in read order
    plan: SplitPlan | None            # None: no image calibrates (anomaly_core.update.update_split)

    @property
    def held(self) -> frozenset[str]:
        """Names kept out of the final bank (a hold-out's calibration images)."""
        return self.plan.held_out(self.names) if self.plan is not None else frozenset()

    @property
    def n_bank_images(self) -> int:
        """Images whose patches the final bank chooses from (augmented copies not counted)."""
        return len(self.names) - len(self.held)

    def block_of(self) -> Callable:
        """The passes' block_of: an Arrow block -> its numpy block with each image's fold (SplitPlan.folds_of)."""
        folds = self.plan.folds_of(self.names) if self.plan is not None else {}
        return compose(partial(mark_folds, folds=folds), numpy_block)


def shard_names(shards: list[str], *, options: StorageOptions, image_column: str,
                id_column: str | None) -> list[str]:
    """Every image URI of `shards`, in shard then member order: one Ray task per shard reads it."""
    return [u for part in ray_map(shard_uris, shards, options, image_column, id_column) for u in part]


def keep_rows(batch: dict[str, np.ndarray], *, names: frozenset[str]) -> dict[str, np.ndarray]:
    """The rows of a decoded batch whose "path" is one of `names`."""
    keep = np.array([str(p) in names for p in batch["path"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def read_images(uris: list[str], *, input_size: int, batch_size: int, options: StorageOptions,
                image_column: str, id_column: str | None) -> ray.data.Dataset:
    """Decoded images (jobs.runtime's read datasets) named one by one: files and objects, and images in
    shards (`<shard>#<member>`, as a scored output names them: the images labelled normal there). The
    shards holding those are read once each and only the named images kept, with the error row of a
    shard nothing could be read from (it names the shard)."""
    members = [u for u in uris if "#" in u and is_shard(shard_of(u))]
    files = sorted(set(uris) - set(members))
    parts = [read_decoded(files, input_size=input_size, batch_size=batch_size, options=options)] if files else []
    if members:
        shards = sorted({shard_of(u) for u in members})
        check_image_columns(shards, image_column=image_column, id_column=id_column, options=options)
        parts.append(read_shards_decoded(shards, input_size=input_size, batch_size=batch_size, options=options,
                                         image_column=image_column, id_column=id_column).map_batches(
            keep_rows, fn_kwargs={"names": frozenset(members + shards)}, batch_size=batch_size,
            batch_format="numpy", num_cpus=0.5))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def good_features(archive: Archive, *, config: ModelConfig, split: Callable[[list[str]], SplitPlan | None],
                  check: Callable[[GoodFeatures], None] | None = None, batch_size: int,
                  actors: int | None, device: str, options: StorageOptions, image_column: str,
                  id_column: str | None, label: str) -> GoodFeatures:
    """Read and describe the good images of `archive` (images, read_images, or shards:
    jobs.runtime.list_archive) in Ray (read tasks, then the feature actors) and split their names for
    calibration with `split`; the fit and update jobs' common first stage. Ray must be running.

    The split needs every image's name. Images: the listing's, split before any image is read.
    Shards: their images are named only when a shard is read, so the split is made from the names in
    the feature blocks, each shard being read once; the split depends only on the set of names and the
    seed (split_calibration), so it is the one a listing first would give. With augmentation the
    held-out images must be known before the features (they get no augmented copies, and the copies
    decide how the blocks are cut), so there one Ray task per shard lists its rows first (shard_names),
    reading each shard twice.
    check(good): called with the names and split (no blocks yet) as soon as the split is known (the
    fit's memory budget); for shards without augmentation, after the features."""
    if archive.shards:
        check_image_columns(archive.shards, image_column=image_column, id_column=id_column, options=options)
        names = shard_names(archive.shards, options=options, image_column=image_column,
                            id_column=id_column) if config.n_augment > 1 else None
        ds = read_shards_decoded(archive.shards, input_size=config.input_size, batch_size=batch_size,
                                 options=options, image_column=image_column, id_column=id_column)
    else:
        names = archive.images
        ds = read_images(names, input_size=config.input_size, batch_size=batch_size, options=options,
                         image_column=image_column, id_column=id_column)
    listed = names is not None
    before = GoodFeatures(blocks=[], names=names or [], plan=split(names) if listed else None)
    if listed and check is not None:
        check(before)
    blocks = feature_blocks(ds, config=config, held=before.held, batch_size=batch_size, actors=actors,
                            total=len(before.held) + before.n_bank_images * config.n_augment if listed else None,
                            device=device, label=label)
    if not listed:
        names = [n for part in ray_map(block_names, blocks) for n in part]
        before = GoodFeatures(blocks=[], names=names, plan=split(names))
        if check is not None:
            check(before)
    return dataclasses.replace(before, blocks=blocks)


def trial_pixels(archive: Archive, *, config: ModelConfig, options: StorageOptions, image_column: str,
                 id_column: str | None) -> np.ndarray | None:
    """[m, S, S, 3] uint8: the good images the alignment trial runs on (anomaly_core.fit.trial_sample), read
    and decoded by Ray tasks; None when fewer than ALIGN_TRIAL_MIN are readable. A listing is sampled with
    the config's seed; shards name their images only when read, so there it is their first images."""
    if archive.shards:
        ds = read_shards_decoded(archive.shards, input_size=config.input_size, batch_size=ALIGN_TRIAL_IMAGES,
                                 options=options, image_column=image_column,
                                 id_column=id_column).limit(ALIGN_TRIAL_IMAGES)
    else:
        sample = trial_sample(archive.images, seed=config.seed)
        if not sample:
            return None
        ds = read_images(sample, input_size=config.input_size, batch_size=ALIGN_TRIAL_IMAGES, options=options,
                         image_column=image_column, id_column=id_column)
    rows = ds.take_all()
    pixels = [r["pixels"] for r in rows if r["error"] == ""]
    return np.stack(pixels) if len(pixels) >= ALIGN_TRIAL_MIN else None


@ray.remote(num_cpus=1)
def _alignment_trial(pixels: np.ndarray, config: ModelConfig, device: str) -> AlignmentTrial:
    """alignment_trial in a Ray task, with the backbone on `device` (a GPU when the task is given one)."""
    return alignment_trial(pixels, describe=FeatureExtractor(config=config, device=device).describe, config=config)


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
    ensure_ray(address, object_store_mb=memory_budget_mb)
    if not shared_fs:
        check_paths_reach_every_node({"training images": archive.images or archive.shards, "model": [model_uri]})
    gpus = default_actors(actors)[2]
    ray.data.DataContext.get_current().execution_options.preserve_order = True   # same blocks, same coreset

    def trial() -> AlignmentTrial | None:
        pixels = trial_pixels(archive, config=config, options=options, image_column=image_column,
                              id_column=id_column)
        return None if pixels is None else ray.get(
            _alignment_trial.options(num_gpus=1 if gpus else 0).remote(pixels, config, device))
    config, align_trial = aligned_config(config, trial)
    t_features = time.time()
    good = good_features(
        archive, config=config, split=partial(split_calibration, config=config),
        check=lambda good: check_budget(config, patch_estimate(good.n_bank_images, config=config), memory_budget_mb),
        batch_size=batch_size, actors=actors, device=device, options=options, image_column=image_column,
        id_column=id_column, label="fit: features")
    t_feat = time.time() - t_features
    log.info("fit: features of %d images in %d blocks, %.1fs", len(good.names), len(good.blocks), t_feat)
    config = fitted_config(config, plan=good.plan, names=good.names)
    bank, cal, stats = fit_bank(good.blocks, config=config, plan=good.plan,
                                n_estimate=patch_estimate(good.n_bank_images, config=config), map_fn=ray_map,
                                block_of=good.block_of(), search_device="cuda" if gpus else "cpu")
    del good
    for path, error in stats.unreadable:
        log.warning("skipped unreadable training image %s: %s", path, error)
    stats = dataclasses.replace(stats, feature_seconds=round(t_feat, 2), fit_seconds=round(time.time() - t0, 2),
                                alignment_trial=align_trial)
    _, weights = load_weights(config.weights, backbone=config.backbone)      # the identity the actors load
    model = Model(config=config, bank=bank, calibration=cal, weights=weights, stats=stats)
    manifest = model.save(model_uri, overwrite=overwrite, options=options)
    log.info("fit: %d images (%d unreadable) -> bank %d, threshold %.4f, %.1fs -> %s",
             stats.n_images, len(stats.unreadable), bank.size, cal.threshold, stats.fit_seconds, model_uri)
    return manifest
