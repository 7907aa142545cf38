"""Update job: a fitted model + new good images -> a new model whose bank also covers them, without a
refit (anomaly_core.update: the coreset continued from the bank's centres, the threshold recalibrated).

Only the new images are read and described (the same read tasks and feature actors as the fit job); the
parent model is loaded, checked and never written. The new model's manifest records the parent's id
("parent") and what was added ("added").

    python -m jobs update MODEL GOOD_IMAGES NEW_MODEL          (the same as `anomaly update`)
    python -m jobs update MODEL --from-labels OUT NEW_MODEL    (the images labelled `normal` in OUT)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import ray

from anomaly_core import storage
from anomaly_core.artifact import check_target
from anomaly_core.model import Model
from anomaly_core.storage import StorageOptions
from anomaly_core.update import update_bank, update_split
from anomaly_core.weights import load_weights
from jobs.fit import good_features
from jobs.runtime import Archive, check_paths_reach_every_node, ensure_ray, list_archive, ray_map

log = logging.getLogger(__name__)


def update_arguments(args: tuple[str, ...], *, from_labels: str | None) -> tuple[str | None, str]:
    """(GOOD_IMAGES or None, NEW_MODEL) from the command's positional arguments after MODEL: two of them,
    or only NEW_MODEL with --from-labels."""
    want = 1 if from_labels else 2
    if len(args) != want:
        usage = "MODEL --from-labels OUT NEW_MODEL" if from_labels else "MODEL GOOD_IMAGES NEW_MODEL"
        raise ValueError(f"update takes {usage}; got {len(args) + 1} paths ({', '.join(('MODEL',) + args)})")
    return (None, args[0]) if from_labels else (args[0], args[1])


def labelled_normal(out: str, options: StorageOptions | None = None) -> list[str]:
    """Sorted URIs of the images whose label in force in the scored output `out` is `normal` (false
    alarms and other good parts a reviewer marked; jobs/labels.py)."""
    from jobs.labels import read_labels
    table = read_labels(out, options=options)
    uris = sorted({u for u, label in zip(table["uri"].to_pylist(), table["label"].to_pylist(), strict=True)
                   if label == "normal"})
    if not uris:
        raise ValueError(f"no image in {out} is labelled normal ({table.num_rows} labels in force); label false "
                         f"alarms with `anomaly review {out}` or pass a folder of good images")
    return uris


def run_update(model_uri: str, data_uri: str | list[str] | None, new_model_uri: str, *,
               from_labels: str | None = None, max_added: int | None = None, batch_size: int = 16,
               actors: int | None = None, device: str = "auto", address: str | None = None,
               overwrite: bool = False, options: StorageOptions | None = None, shared_fs: bool = False,
               image_column: str = "image", id_column: str | None = None) -> dict:
    """Write to `new_model_uri` the model at `model_uri` updated with the good images named by `data_uri`
    (what run_fit takes: folder, s3:// prefix or manifest file of images, or shards) or, with
    `from_labels`, the images labelled normal in that scored output; returns the new manifest.
    max_added: most vectors added to the bank (None: the budget alone, coreset_ratio of the candidates;
    anomaly_core.update). The other options are run_fit's."""
    t0 = time.time()
    options = (options or StorageOptions()).resolved()
    model_uri, new_model_uri = storage.normalise(model_uri), storage.normalise(new_model_uri)
    if (data_uri is None) == (from_labels is None):
        raise ValueError("give exactly one of GOOD_IMAGES and --from-labels OUT")
    if new_model_uri == model_uri:
        raise ValueError(f"NEW_MODEL is the model being updated ({model_uri}); an update never replaces its parent: "
                         f"choose another location")
    if max_added is not None and max_added < 0:
        raise ValueError(f"max_added={max_added} must be >= 0 (0: recalibrate only)")
    storage.check_bucket(new_model_uri, options)
    check_target(new_model_uri, overwrite=overwrite, options=options)
    parent = Model.load(model_uri, options)
    config = parent.config
    _, weights = load_weights(config.weights, backbone=config.backbone)     # the identity the actors load
    if parent.weights is not None and weights["state_sha256"] != parent.weights["state_sha256"]:
        raise ValueError(f"model {parent.model_id} was fitted with weights {parent.weights} but "
                         f"{config.weights!r} now loads tensors with sha256 {weights['state_sha256'][:12]}...; "
                         f"install the same weights (an update adds features of the same backbone) or refit")
    archive = (Archive(images=labelled_normal(from_labels, options), shards=[]) if from_labels
               else list_archive(data_uri, options))
    ensure_ray(address)
    if not shared_fs:
        check_paths_reach_every_node({"good images": archive.images or archive.shards,
                                      "models": [model_uri, new_model_uri]})
    ray.data.DataContext.get_current().execution_options.preserve_order = True    # same blocks on every run
    good = good_features(archive, config=config, split=partial(update_split, config=config), batch_size=batch_size,
                         actors=actors, device=device, options=options, image_column=image_column,
                         id_column=id_column, label="update: features")
    t_feat = time.time() - t0
    log.info("update: features of %d new images in %d blocks, %.1fs", len(good.names), len(good.blocks), t_feat)
    bank, cal, stats, added = update_bank(
        good.blocks, config=config, bank=parent.bank, stats=parent.stats, plan=good.plan,
        max_added=max_added, map_fn=ray_map, block_of=good.block_of())
    del good
    for path, error in stats.unreadable[len(parent.stats.unreadable):]:
        log.warning("skipped unreadable new image %s: %s", path, error)
    stats = dataclasses.replace(stats, feature_seconds=round(t_feat, 2), fit_seconds=round(time.time() - t0, 2))
    added["seconds"] = stats.fit_seconds
    model = Model(config=config, bank=bank, calibration=cal, weights=parent.weights, stats=stats,
                  lineage={"parent": parent.model_id, "added": added})
    manifest = model.save(new_model_uri, overwrite=overwrite, options=options)
    log.info("update: %s + %d images -> %s (bank %d -> %d, threshold %.4f -> %.4f), %.1fs", parent.model_id,
             len(added["images"]), manifest["model_id"], parent.bank.size, bank.size, parent.calibration.threshold,
             cal.threshold, stats.fit_seconds)
    return manifest
