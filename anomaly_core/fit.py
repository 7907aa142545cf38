"""Feature blocks -> memory bank + calibrated threshold: the fit recipe, wherever the blocks live.

A feature block is a dict {"path" [B] str, "error" [B] str, "features" [B, P, D] float32, "foreground"
[B, P] bool, "held" [B] bool}: one coreset partition's worth of images. The fit job keeps its blocks in
Ray's object store and passes a `map_fn` that runs each pass as Ray tasks; in-process fits
(anomaly_core.model.Model.fit) keep them in a list and map with a plain loop. Both run `fit_bank`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import numpy as np

from anomaly_core.config import ModelConfig
from anomaly_core.coreset import MapFn, composable_coreset, identity, local_map
from anomaly_core.index import MemoryBank
from anomaly_core.scoring import image_scores, patch_distances
from anomaly_core.threshold import Calibration, calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FitStats:
    """What a fit saw and built; stored as the manifest's "stats"."""
    n_images: int                   # readable good images: bank + held out
    n_train_images: int             # images in the bank (before augmentation copies)
    n_holdout_images: int           # readable images held out to calibrate the threshold
    n_train_patches: int            # patches the coreset chose from (augmented copies included)
    bank_size: int                  # vectors in the memory bank
    cover_radius: float             # largest distance from a training patch to its nearest bank entry
    coreset_seconds: float
    holdout_images: list[str]       # names of the held-out images (calibration provenance)
    unreadable: list[tuple[str, str]] = field(default_factory=list)   # (name, error) of skipped images
    feature_seconds: float = 0.0    # wall time of feature extraction (set by the caller that ran it)
    fit_seconds: float = 0.0        # wall time of the whole fit (set by the caller)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FitStats:
        """From a manifest's "stats". Keys this version does not know are dropped (older manifests kept
        e.g. n_unreadable); unreadable entries that are bare names get an empty error."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["unreadable"] = [(u, "") if isinstance(u, str) else tuple(u) for u in values.get("unreadable", [])]
        return cls(**values)


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


def patch_estimate(n_bank_images: int, *, config: ModelConfig) -> int:
    """Training patches the coreset will see from `n_bank_images` images (augmented copies included):
    sets its round-1 share before the blocks exist (see coreset.composable_coreset)."""
    return n_bank_images * config.n_augment * config.grid_size ** 2


def mark_holdout(batch: dict[str, np.ndarray], *, held: frozenset[str]) -> dict[str, np.ndarray]:
    """FeatureExtractor output -> a feature block (adds "held" [B] bool: path in `held`)."""
    return {"path": batch["path"], "error": batch["error"], "features": batch["features"],
            "foreground": batch["foreground"], "held": np.array([str(p) in held for p in batch["path"]], dtype=bool)}


def feature_blocks(features: np.ndarray, held: np.ndarray, *, images_per_block: int,
                   foreground: np.ndarray | None = None, paths: Sequence[str] | None = None
                   ) -> list[dict[str, np.ndarray]]:
    """In-memory features [N, P, D], hold-out flags [N] bool, foreground [N, P] bool (None: everywhere) and
    names [N] (None: "0", "1", ...) -> the blocks fit_bank takes (what the fit job builds in Ray's
    object store)."""
    n, p = features.shape[:2]
    fg = np.ones((n, p), dtype=bool) if foreground is None else foreground
    names = np.array([str(i) for i in range(n)] if paths is None else [str(x) for x in paths], dtype=object)
    return [{"path": names[s:s + images_per_block],
             "error": np.full(len(names[s:s + images_per_block]), "", dtype=object),
             "features": features[s:s + images_per_block], "foreground": fg[s:s + images_per_block],
             "held": held[s:s + images_per_block]}
            for s in range(0, n, images_per_block)]


def train_patches(block: dict[str, np.ndarray]) -> np.ndarray:
    """[n, D] foreground patch rows of the block's readable, not held-out images (the coreset's input)."""
    keep = (block["error"] == "") & ~block["held"]                               # [B]
    return block["features"][keep][block["foreground"][keep]]                   # [b, P, D][b, P] -> [n, D]


def feature_scores(features: np.ndarray, bank: MemoryBank, *, config: ModelConfig,
                   foreground: np.ndarray | None = None) -> np.ndarray:
    """Descriptors [B, P, D] -> image scores [B] float32 (the scores a verdict is taken on)."""
    return image_scores(patch_distances(features, bank, foreground=foreground),
                        reduction=config.reduction, top_fraction=config.top_fraction)


@dataclass(frozen=True)
class _BlockCalibration:
    scores: np.ndarray                  # [m] float32 image scores of the block's held-out images
    held_paths: list[str]               # their names
    n_bank_rows: int                    # readable bank rows (augmented copies included)
    unreadable: list[tuple[str, str]]   # (name, error)


def _calibrate_block(block, bank_bytes: list[np.ndarray], *, config: ModelConfig, block_of: Callable
                     ) -> _BlockCalibration:
    """One block's held-out scores against the bank (shipped serialised: it runs as a Ray task)."""
    block = block_of(block)
    bank = MemoryBank.deserialize(bank_bytes, nprobe=config.nprobe, ef_search=config.ef_search)
    ok = block["error"] == ""
    held = ok & block["held"]                                                   # [B]
    scores = (feature_scores(block["features"][held], bank, config=config, foreground=block["foreground"][held])
              if held.any() else np.zeros(0, dtype=np.float32))
    return _BlockCalibration(
        scores=scores, held_paths=[str(p) for p in block["path"][held]],
        n_bank_rows=int((ok & ~block["held"]).sum()),
        unreadable=[(str(p), str(e)) for p, e in zip(block["path"][~ok], block["error"][~ok])])


def fit_bank(blocks: Sequence, *, config: ModelConfig, n_estimate: int, map_fn: MapFn = local_map,
             block_of: Callable = identity) -> tuple[MemoryBank, Calibration, FitStats]:
    """Memory bank and calibration from feature blocks, which stay where they are: every pass over them
    goes through `map_fn` (default: a loop here; the fit job: Ray tasks on the object store).

    block_of: turns an element of `blocks` into the block dict (the fit job's are Arrow blocks).
    n_estimate: expected training patches (patch_estimate; sets the coreset's round-1 share).
    Returns the bank, the threshold calibrated on the held-out images, and the fit's statistics.
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
    parts = map_fn(partial(_calibrate_block, config=config, block_of=block_of), blocks, bank.serialize())
    held_scores = np.concatenate([c.scores for c in parts])
    cal = calibrate(held_scores, sigmas=config.threshold_sigmas)
    n_train = sum(c.n_bank_rows for c in parts) // config.n_augment
    stats = FitStats(n_images=n_train + int(held_scores.size), n_train_images=n_train,
                     n_holdout_images=int(held_scores.size), n_train_patches=core.n_points, bank_size=bank.size,
                     cover_radius=core.cover_radius, coreset_seconds=round(t_core, 2),
                     holdout_images=[p for c in parts for p in c.held_paths],
                     unreadable=[u for c in parts for u in c.unreadable])
    return bank, cal, stats


def _compose(f: Callable, g: Callable) -> Callable:
    """x -> f(g(x)), picklable (Ray ships it to the tasks)."""
    return partial(_apply_both, f, g)


def _apply_both(f: Callable, g: Callable, x):
    return f(g(x))
