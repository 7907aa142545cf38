"""Fit job: good images -> patch features (Ray actor pool) -> coreset bank + calibration -> model dir.

    python -m jobs.fit DATA_URI MODEL_URI [options]     (the same options as `anomaly fit`)
"""

from __future__ import annotations

import logging
import time

import numpy as np

from anomaly_core import storage
from anomaly_core.artifact import check_target, save_model
from anomaly_core.config import ModelConfig
from anomaly_core.pipeline import FeatureExtractor, fit_bank, split_holdout
from anomaly_core.weights import load_weights
from anomaly_core.storage import StorageOptions
from jobs.runtime import default_actors, ensure_ray, list_inputs, ray_map, read_decoded

log = logging.getLogger(__name__)


def run_fit(data_uri: str | list[str], model_uri: str, *, config: ModelConfig, batch_size: int = 16,
            actors: int | None = None, device: str = "auto", address: str | None = None,
            overwrite: bool = False, options: StorageOptions | None = None) -> dict:
    """Fit a model on the good images named by `data_uri` (folder, s3:// prefix or manifest file);
    returns the manifest written to `model_uri` (folder or s3:// prefix)."""
    t0 = time.time()
    options = (options or StorageOptions()).resolved()       # workers use the driver's endpoint and region
    model_uri = storage.normalise(model_uri)
    storage.check_bucket(model_uri, options)
    check_target(model_uri, overwrite=overwrite, options=options)          # before hours of work
    uris = list_inputs(data_uri, options)
    ensure_ray(address)
    n_actors, threads, gpus = default_actors(actors)
    ds = read_decoded(uris, image_size=config.image_size, batch_size=batch_size, options=options)
    ds = ds.map_batches(FeatureExtractor, fn_constructor_kwargs={
        "config": config, "device": "cuda" if gpus else device, "num_threads": threads},
        batch_size=batch_size, concurrency=n_actors, num_cpus=1, num_gpus=gpus, batch_format="numpy")
    paths, feats, bad = [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for p, e, f in zip(batch["path"], batch["error"], batch["features"]):
            if e:
                bad.append((p, e))
            else:
                paths.append(str(p))
                feats.append(f)
    for p, e in bad:
        log.warning("skipped unreadable training image %s: %s", p, e)
    if not paths:
        raise ValueError(f"no readable images under {data_uri!r} (extensions: png, jpg, bmp, tif, webp)")
    features = np.stack(feats)                                                   # [N, P, D]
    t_feat = time.time() - t0
    held = split_holdout(paths, fraction=config.holdout_fraction, seed=config.seed)
    bank, cal, stats = fit_bank(features[~held], features[held], config=config, map_fn=ray_map)
    stats.update(n_images=len(paths), n_unreadable=len(bad), feature_seconds=round(t_feat, 2),
                 fit_seconds=round(time.time() - t0, 2),
                 holdout_images=sorted(p for p, h in zip(paths, held) if h))
    _, weights = load_weights(config.weights, backbone=config.backbone)      # the identity the actors load
    manifest = save_model(model_uri, config=config, bank=bank, calibration=cal, weights=weights, stats=stats,
                          overwrite=overwrite, options=options)
    log.info("fit: %d images (%d unreadable) -> bank %d, threshold %.4f, %.1fs -> %s",
             len(paths), len(bad), bank.size, cal.threshold, stats["fit_seconds"], model_uri)
    return manifest


if __name__ == "__main__":
    from jobs.cli import fit
    fit(prog_name="python -m jobs.fit")
