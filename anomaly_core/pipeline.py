"""Per-batch steps of the fit and score jobs, as plain callables on dict[str, np.ndarray] batches.

Ray Data calls these (`map_batches`), and tests call them directly; nothing here imports Ray. Heavy
set-up (backbone, bank) happens once in `__init__`, as in Ray's batch-inference pattern.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from anomaly_core import storage
from anomaly_core.align import align_images, unalign_maps
from anomaly_core.artifact import Model, load_model
from anomaly_core.augment import AUGMENTATIONS, augment_images
from anomaly_core.backbone import Backbone
from anomaly_core.config import ModelConfig
from anomaly_core.coreset import MapFn, composable_coreset, identity, local_map
from anomaly_core.foreground import foreground_mask
from anomaly_core.images import ImageDecodeError, content_hash, decode_image, resize_square
from anomaly_core.index import MemoryBank, set_search_threads
from anomaly_core.patches import add_position, aggregate_neighbours
from anomaly_core.scoring import anomaly_maps, encode_heatmap, image_scores, peak_location
from anomaly_core.storage import StorageOptions
from anomaly_core.threshold import Calibration, calibrate, normalise
from anomaly_core.tiling import cut_tiles, stitch_tiles

log = logging.getLogger(__name__)


def read_batch(batch: dict[str, np.ndarray], *, input_size: int, options: StorageOptions | None = None
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
                         "error": np.asarray(errors, dtype=object)}, input_size=input_size)


def decode_batch(batch: dict[str, np.ndarray], *, input_size: int) -> dict[str, np.ndarray]:
    """{"path": [B] str, "bytes": [B] bytes, optional "error": [B] str} -> adds pixels [B, S, S, 3] uint8,
    S = input_size (the config's, tiles included; zeros where unreadable), width/height [B] int32 (0 if
    unreadable), content_sha256 [B] str, error [B] str ("" when fine; a row that arrives with an error
    keeps it). Drops "bytes"."""
    n = len(batch["path"])
    pixels = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
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
        pixels[i] = resize_square(img, input_size)
        error.append("")
    out = {k: v for k, v in batch.items() if k != "bytes"}
    out.update(pixels=pixels, width=width, height=height,
               content_sha256=np.asarray(digest, dtype=object), error=np.asarray(error, dtype=object))
    return out


def describe_tokens(tokens: np.ndarray, *, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Stitched backbone tokens [B, G*G, D] unit rows -> (descriptors [B, G*G, feature_dim] unit rows,
    foreground [B, G*G] bool): neighbourhood aggregation, the position code and the foreground mask as
    the config says, the same at fit and at score time."""
    g = config.grid_size
    fg = (foreground_mask(tokens, grid=g) if config.foreground_mask
          else np.ones(tokens.shape[:2], dtype=bool))                               # [B, G*G]
    f = aggregate_neighbours(tokens, grid=g, size=config.neighbourhood)
    return add_position(f, grid=g, weight=config.position_weight), fg


class FeatureExtractor:
    """Decoded batch -> {"path", "error", "features" [B, P, D] float32, "foreground" [B, P] bool};
    unreadable rows keep their error, all-zero features and no foreground, so the fit job can report them
    and leave them out of the bank."""

    def __init__(self, *, config: ModelConfig, device: str = "auto", num_threads: int | None = None):
        self.config = config
        self.backbone = Backbone(name=config.backbone, weights=config.weights, image_size=config.image_size,
                                 blocks=config.blocks, device=device, num_threads=num_threads)

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8, S = input_size -> backbone tokens [B, G*G, D] float32 unit rows, tiles stitched."""
        cfg = self.config
        tiles = cut_tiles(pixels, tiles=cfg.tiles, tile_size=cfg.image_size,
                          stride=cfg.tile_stride)                                        # [B*T*T, s, s, 3]
        return stitch_tiles(self.backbone.patch_features(tiles), tiles=cfg.tiles, tile_grid=cfg.tile_grid,
                            overlap=cfg.tile_overlap)                                    # [B, G*G, D]

    def describe(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, S, S, 3] uint8 -> describe_tokens of its tokens: ([B, G*G, feature_dim], [B, G*G] bool)."""
        return describe_tokens(self.tokens(pixels), config=self.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        p = self.config.grid_size ** 2
        feats = np.zeros((len(ok), p, self.config.feature_dim), dtype=np.float32)
        fg = np.zeros((len(ok), p), dtype=bool)
        if ok.any():
            px = batch["pixels"][ok]                                               # [b, S, S, 3]
            feats[ok], fg[ok] = self.describe(align_images(px)[0] if self.config.align else px)
        return {"path": batch["path"], "error": batch["error"], "features": feats, "foreground": fg}


def augment_batch(batch: dict[str, np.ndarray], *, name: str, held: frozenset[str]) -> dict[str, np.ndarray]:
    """Decoded batch -> the same columns with each readable bank image followed by its augmented copies
    (anomaly_core.augment, same path); held-out and unreadable rows stay single."""
    copies = np.where((batch["error"] == "") & np.array([str(p) not in held for p in batch["path"]]),
                      len(AUGMENTATIONS[name]), 1)                               # [B]
    out = {k: np.repeat(v, copies, axis=0) for k, v in batch.items() if k != "pixels"}
    pixels = []
    for i, n in enumerate(copies):
        px = batch["pixels"][i:i + 1]                                             # [1, S, S, 3]
        pixels.append(augment_images(px, name=name) if n > 1 else px)
    out["pixels"] = np.concatenate(pixels)                                        # [sum(copies), S, S, 3]
    return out


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


def images_per_block(config: ModelConfig) -> int:
    """Images per feature block (one coreset partition): about `coreset_partition` patches."""
    return max(1, config.coreset_partition // config.grid_size ** 2)


def mark_holdout(batch: dict[str, np.ndarray], *, held: frozenset[str]) -> dict[str, np.ndarray]:
    """FeatureExtractor output -> a feature block: {"path", "error", "features" [B, P, D], "foreground"
    [B, P] bool, "held" [B] bool}."""
    return {"path": batch["path"], "error": batch["error"], "features": batch["features"],
            "foreground": batch["foreground"], "held": np.array([str(p) in held for p in batch["path"]], dtype=bool)}


def feature_blocks(features: np.ndarray, held: np.ndarray, *, images_per_block: int,
                   foreground: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """In-memory features [N, P, D], hold-out flags [N] and foreground [N, P] bool (None: everywhere)
    -> the blocks fit_bank takes (what the fit job builds in Ray's object store)."""
    n, p = features.shape[:2]
    fg = np.ones((n, p), dtype=bool) if foreground is None else foreground
    return [{"path": np.array([str(i) for i in range(s, min(s + images_per_block, n))], dtype=object),
             "error": np.full(min(images_per_block, n - s), "", dtype=object),
             "features": features[s:s + images_per_block], "foreground": fg[s:s + images_per_block],
             "held": held[s:s + images_per_block]}
            for s in range(0, n, images_per_block)]


def train_patches(block: dict[str, np.ndarray]) -> np.ndarray:
    """[n, D] foreground patch rows of the block's readable, not held-out images (the coreset's input)."""
    keep = (block["error"] == "") & ~block["held"]                               # [B]
    return block["features"][keep][block["foreground"][keep]]                   # [b, P, D][b, P] -> [n, D]


def calibration_rows(block: dict[str, np.ndarray], bank: MemoryBank, *, config: ModelConfig
                     ) -> tuple[np.ndarray, int, list[tuple[str, str]]]:
    """(image scores [m] float32 of the block's held-out images against `bank`, the number of its bank
    rows (augmented copies included), its unreadable images as (path, error))."""
    ok = block["error"] == ""
    held = ok & block["held"]                                                   # [B]
    scores = (score_features(block["features"][held], bank, config=config, foreground=block["foreground"][held],
                             with_maps=False)[0] if held.any() else np.zeros(0, dtype=np.float32))
    bad = [(str(p), str(e)) for p, e in zip(block["path"][~ok], block["error"][~ok])]
    return scores, int((ok & ~block["held"]).sum()), bad


def _calibration_step(block, bank_bytes: list[np.ndarray], *, config: ModelConfig, block_of: Callable):
    bank = MemoryBank.deserialize(bank_bytes, nprobe=config.nprobe, ef_search=config.ef_search)
    return calibration_rows(block_of(block), bank, config=config)


def fit_bank(blocks: Sequence, *, config: ModelConfig, n_estimate: int, map_fn: MapFn = local_map,
             block_of: Callable = identity) -> tuple[MemoryBank, Calibration, dict]:
    """Memory bank and calibration from feature blocks (see mark_holdout), which stay where they are:
    every pass over them goes through `map_fn` (builtin: here; the fit job: Ray tasks on the object store).

    block_of: turns an element of `blocks` into the block dict (the fit job's are Arrow blocks).
    n_estimate: expected training patches (sets the coreset's round-1 share; see composable_coreset).
    Returns the bank, the threshold calibrated on the held-out images, and fit statistics.
    """
    t0 = time.perf_counter()
    core = composable_coreset(
        blocks, k=config.coreset_size, ratio=config.coreset_ratio, n_estimate=n_estimate,
        dim=config.feature_dim, projection_dim=config.projection_dim, oversample=config.coreset_oversample,
        refine=config.coreset_refine, seed=config.seed, points_of=_compose(train_patches, block_of),
        map_fn=map_fn)
    t_core = time.perf_counter() - t0
    log.info("coreset: %d of %d patches, cover radius %.4f, %.1fs",
             core.features.shape[0], core.n_points, core.cover_radius, t_core)
    bank = MemoryBank.build(core.features, kind=config.index, shard_size=config.shard_size,
                            seed=config.seed, nprobe=config.nprobe, ef_search=config.ef_search)
    rows = map_fn(partial(_calibration_step, config=config, block_of=block_of), blocks, bank.serialize())
    held_scores = np.concatenate([s for s, _, _ in rows])
    unreadable = [bad for _, _, b in rows for bad in b]
    cal = calibrate(held_scores, sigmas=config.threshold_sigmas)
    stats = {"n_train_images": sum(n for _, n, _ in rows) // config.n_augment,
             "n_holdout_images": int(held_scores.size),
             "n_train_patches": core.n_points, "bank_size": bank.size, "unreadable": unreadable,
             "cover_radius": core.cover_radius, "coreset_seconds": round(t_core, 2)}
    return bank, cal, stats


def _compose(f: Callable, g: Callable) -> Callable:
    """x -> f(g(x)), picklable (Ray ships it to the tasks)."""
    return partial(_apply_both, f, g)


def _apply_both(f: Callable, g: Callable, x):
    return f(g(x))


def score_features(features: np.ndarray, bank: MemoryBank, *, config: ModelConfig,
                   foreground: np.ndarray | None = None, with_maps: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """features: [B, G*G, D], foreground: [B, G*G] bool or None (everywhere) -> (image scores [B] float32,
    anomaly maps [B, S, S] float32 or None, S = input_size). Background patches score 0."""
    b, p, d = features.shape
    dist = bank.nearest(features.reshape(-1, d)).reshape(b, p)               # [B, G*G]
    if foreground is not None:
        dist = np.where(foreground, dist, np.float32(0))
    scores = image_scores(dist, reduction=config.reduction, top_fraction=config.top_fraction)
    if not with_maps:
        return scores, None
    g = config.grid_size
    maps = anomaly_maps(dist.reshape(b, g, g), out_size=config.input_size, sigma=config.map_sigma)
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
        """model_path: local folder or s3:// URI; num_threads: torch and FAISS threads of this process
        (None: leave both as they are); run_time: ISO-8601 UTC start of the run;
        run_date: the audit date (partition key), by default the date of run_time."""
        self.model: Model = load_model(model_path, options)
        cfg = self.model.config
        self.extractor = FeatureExtractor(config=cfg, device=device, num_threads=num_threads)
        if num_threads:                    # the bank search gets the threads the backbone gets
            set_search_threads(num_threads)
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
            pixels = batch["pixels"][ok]                                       # [b, S, S, 3]
            if cfg.align:
                pixels, poses = align_images(pixels)
            feats, fg = self.extractor.describe(pixels)                        # [b, P, D], [b, P]
            s, maps = score_features(feats, self.model.bank, config=cfg, foreground=fg)
            if cfg.align:
                maps = unalign_maps(maps, poses)                               # back to the image's frame
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
