"""Per-batch steps of the fit and score jobs, as plain callables on dict[str, np.ndarray] batches.

Ray Data calls these (`map_batches`), and tests call them directly; nothing here imports Ray. Heavy
set-up (backbone, bank) happens once in `__init__`, as in Ray's batch-inference pattern.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np

from anomaly_core import storage
from anomaly_core.artifact import Model, load_model
from anomaly_core.backbone import Backbone
from anomaly_core.config import ModelConfig
from anomaly_core.coreset import coreset_size, select_coreset
from anomaly_core.images import ImageDecodeError, content_hash, decode_image, resize_square
from anomaly_core.index import MemoryBank
from anomaly_core.scoring import anomaly_maps, encode_heatmap, image_scores, peak_location
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import Calibration, calibrate, normalise

log = logging.getLogger(__name__)


def read_batch(batch: dict[str, np.ndarray], *, image_size: int, options: StorageOptions | None = None
               ) -> dict[str, np.ndarray]:
    """{"path": [B] URI} -> decode_batch's output. A missing object becomes a row with an error; any other
    storage error (access denied, server gone once retries are spent) raises, so that the job stops
    and no transient failure is ever recorded as a verdict."""
    blobs, errors = [], []
    for uri in batch["path"]:
        try:
            blobs.append(storage.read_bytes(str(uri), options))
            errors.append("")
        except FileNotFoundError as e:
            blobs.append(b"")
            errors.append(str(e))
    return decode_batch({"path": batch["path"], "bytes": np.asarray(blobs, dtype=object),
                         "error": np.asarray(errors, dtype=object)}, image_size=image_size)


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """{"path": [B] str, "bytes": [B] bytes, optional "error": [B] str} -> adds pixels [B, S, S, 3] uint8
    (zeros where unreadable), width/height [B] int32 (0 if unreadable), content_sha256 [B] str,
    error [B] str ("" when fine; a row that arrives with an error keeps it). Drops "bytes"."""
    n = len(batch["path"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    digest, error = [], []
    prior = batch.get("error", np.full(n, "", dtype=object))
    for i, data in enumerate(batch["bytes"]):
        data = bytes(data) if data is not None else b""
        digest.append(content_hash(data))
        if prior[i]:
            error.append(str(prior[i]))
            continue
        try:
            img = decode_image(data)                                         # [H, W, 3] uint8
        except ImageDecodeError as e:
            error.append(str(e))
            log.warning("%s: %s", batch["path"][i], e)
            continue
        height[i], width[i] = img.shape[:2]
        pixels[i] = resize_square(img, image_size)
        error.append("")
    out = {k: v for k, v in batch.items() if k != "bytes"}
    out.update(pixels=pixels, width=width, height=height,
               content_sha256=np.asarray(digest, dtype=object), error=np.asarray(error, dtype=object))
    return out


class FeatureExtractor:
    """Decoded batch -> {"path", "error", "features" [B, P, D] float32}; unreadable rows keep their error
    and all-zero features, so the fit job can report them and leave them out of the bank."""

    def __init__(self, *, config: ModelConfig, device: str = "auto", num_threads: int | None = None):
        self.backbone = Backbone(name=config.backbone, weights=config.weights, image_size=config.image_size,
                                 blocks=config.blocks, device=device, num_threads=num_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        feats = np.zeros((len(ok),) + self.backbone.feature_shape, dtype=np.float32)   # [B, P, D]
        if ok.any():
            feats[ok] = self.backbone.patch_features(batch["pixels"][ok])
        return {"path": batch["path"], "error": batch["error"], "features": feats}


def split_holdout(paths: list[str], *, fraction: float, seed: int) -> np.ndarray:
    """[N] bool, True for images held out of the bank for calibration. Depends only on the set of paths
    and the seed (not on read order). At least 2 held out, at least 1 kept."""
    n = len(paths)
    if n < 3:
        raise ValueError(f"fit needs at least 3 good images (1 for the bank, 2 to calibrate the threshold); "
                         f"got {n}")
    n_hold = min(max(2, int(round(fraction * n))), n - 1)
    order = np.argsort(np.asarray(paths, dtype=object))                      # canonical order
    perm = np.random.default_rng(seed).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[order[perm[:n_hold]]] = True
    return held


def fit_bank(train: np.ndarray, holdout: np.ndarray, *, config: ModelConfig, map_fn=map
             ) -> tuple[MemoryBank, Calibration, dict]:
    """train: [N, P, D], holdout: [M, P, D] float32 L2-normalised patch features.
    Returns the coreset bank, the calibration from the held-out images, and fit statistics.
    map_fn runs the coreset partitions (builtin map: in this process)."""
    flat = train.reshape(-1, train.shape[-1])                                # [N*P, D]
    k = coreset_size(flat.shape[0], ratio=config.coreset_ratio, size=config.coreset_size)
    log.info("coreset: %d of %d patches (projection %d)", k, flat.shape[0], config.projection_dim)
    t0 = time.perf_counter()
    core = select_coreset(flat, k=k, projection_dim=config.projection_dim, seed=config.seed,
                          partition_size=config.coreset_partition, oversample=config.coreset_oversample,
                          refine=config.coreset_refine,
                          map_fn=map_fn)
    t_core = time.perf_counter() - t0
    bank = MemoryBank.build(flat[core.indices], kind=config.index, shard_size=config.shard_size,
                            seed=config.seed, nprobe=config.nprobe, ef_search=config.ef_search)
    held_scores, _ = score_features(holdout, bank, config=config, with_maps=False)
    cal = calibrate(held_scores, sigmas=config.threshold_sigmas)
    stats = {"n_train_images": int(train.shape[0]), "n_holdout_images": int(holdout.shape[0]),
             "n_train_patches": int(flat.shape[0]), "bank_size": bank.size,
             "cover_radius": core.cover_radius, "coreset_seconds": round(t_core, 2)}
    return bank, cal, stats


def score_features(features: np.ndarray, bank: MemoryBank, *, config: ModelConfig, with_maps: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """features: [B, G*G, D] -> (image scores [B] float32, anomaly maps [B, S, S] float32 or None)."""
    b, p, d = features.shape
    dist = bank.nearest(features.reshape(-1, d)).reshape(b, p)               # [B, G*G]
    scores = image_scores(dist, reduction=config.reduction, top_fraction=config.top_fraction)
    if not with_maps:
        return scores, None
    g = config.grid_size
    maps = anomaly_maps(dist.reshape(b, g, g), out_size=config.image_size, sigma=config.smoothing_sigma)
    return scores, maps


_PATH_LABEL = {key: re.compile(rf"(?:^|/){key}=([^/]+)/") for key in ("product", "line")}


def path_label(uri: str, key: str) -> str:
    """Value of a Hive-style `key=value` folder in `uri` ("" when absent): archives laid out as
    .../product=P/line=L/... get those as columns without a side table."""
    m = _PATH_LABEL[key].search(uri)
    return m.group(1) if m else ""


class Scorer:
    """Decoded batch -> one output row per image (DESIGN §5). Unreadable images become rows with
    status "error" and the error text; the others are scored against the model's bank."""

    def __init__(self, *, model_path: str, device: str = "auto", num_threads: int | None = None,
                 run_id: str = "", run_time: str = "", run_date: str = "", options: StorageOptions | None = None):
        """model_path: local folder or s3:// URI; run_time: ISO-8601 UTC start of the run;
        run_date: the audit date (partition key), by default the date of run_time."""
        self.model: Model = load_model(model_path, options)
        cfg = self.model.config
        self.extractor = FeatureExtractor(config=cfg, device=device, num_threads=num_threads)
        expected = self.model.manifest["weights"]["state_sha256"]
        got = self.extractor.backbone.identity["state_sha256"]
        if got != expected:
            raise ValueError(f"model {model_path} was fitted with weights {self.model.manifest['weights']} "
                             f"but {cfg.weights!r} now loads tensors with sha256 {got[:12]}...; "
                             f"install the same weights or refit")
        self.run_id, self.run_time, self.run_date = run_id, run_time, run_date or run_time[:10]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, cal = self.model.config, self.model.calibration
        n = len(batch["path"])
        ok = batch["error"] == ""
        score = np.full(n, np.nan, dtype=np.float32)
        heat = np.empty(n, dtype=object)
        hmin = np.full(n, np.nan, dtype=np.float32)
        hmax = np.full(n, np.nan, dtype=np.float32)
        px = np.full(n, -1, dtype=np.int32)
        py = np.full(n, -1, dtype=np.int32)
        if ok.any():
            feats = self.extractor.backbone.patch_features(batch["pixels"][ok])   # [b, P, D]
            s, maps = score_features(feats, self.model.bank, config=cfg)
            for j, i in enumerate(np.flatnonzero(ok)):
                score[i] = s[j]
                heat[i], hmin[i], hmax[i] = encode_heatmap(maps[j])
                px[i], py[i] = peak_location(maps[j], width=int(batch["width"][i]),
                                             height=int(batch["height"][i]))
        verdict = np.where(~ok, "error", np.where(score >= cal.threshold, "anomalous", "normal"))
        return {
            "uri": batch["path"],
            "content_sha256": batch["content_sha256"],
            "width": batch["width"],
            "height": batch["height"],
            "product": np.array([path_label(str(u), "product") for u in batch["path"]], dtype=object),
            "line": np.array([path_label(str(u), "line") for u in batch["path"]], dtype=object),
            "status": np.where(ok, "ok", "error").astype(object),
            "error": batch["error"],
            "score": score,
            "score_normalised": normalise(score, cal),
            "verdict": verdict.astype(object),
            "threshold": np.full(n, cal.threshold, dtype=np.float32),
            "heatmap_png": heat,
            "heatmap_min": hmin,
            "heatmap_max": hmax,
            "peak_x": px,
            "peak_y": py,
            "model_id": np.full(n, self.model.model_id, dtype=object),
            "model_created_at": np.full(n, self.model.manifest["created_at"], dtype=object),
            "run_id": np.full(n, self.run_id, dtype=object),
            "run_time": np.full(n, self.run_time, dtype=object),
            "run_date": np.full(n, self.run_date, dtype=object),                # partition key
        }
