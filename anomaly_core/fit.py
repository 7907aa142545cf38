"""Feature blocks -> memory bank + calibrated threshold: the fit recipe, wherever the blocks live.

A feature block is a dict {"path" [B] str, "error" [B] str, "features" [B, P, D] float32, "foreground"
[B, P] bool, "fold" [B] int16, "copy" [B] int16}: one coreset partition's worth of images, each with the
calibration fold it belongs to (SplitPlan) and its augmentation copy index (0: the image itself). The fit
job keeps its blocks in Ray's object store and passes a `map_fn` that runs each pass as Ray tasks;
in-process fits (anomaly_core.model.Model.fit) keep them in a list and map with a plain loop. Both run
`fit_bank`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import numpy as np
import torch

from anomaly_core.align import align_images, resample_images
from anomaly_core.backbone import BACKBONES
from anomaly_core.config import SHARP_TOP_FRACTION, SMOOTH_TOP_FRACTION, ModelConfig
from anomaly_core.coreset import MapFn, composable_coreset, coreset_size, identity, local_map
from anomaly_core.image_term import ImageTerm, image_distances
from anomaly_core.images import size_range
from anomaly_core.index import AUTO_FLAT_MAX, MemoryBank, choose_index
from anomaly_core.scoring import image_scores, patch_distances
from anomaly_core.threshold import Calibration, calibrate, quantile_images

log = logging.getLogger(__name__)

# Calibration scores that must lie at or above a quantile threshold for the fit to choose SHARP_TOP_FRACTION
# (fitted_config): 2, so that no single calibration image sets the threshold of the heavier-tailed score.
SHARP_SCORES_ABOVE = 2

# Position consistency above which fit suggests the options for fixtured parts: half of the normal
# patch-distance variance is explained by where a patch is, not by which image it is in.
POSITION_HINT = 0.5
# The alignment trial (alignment_trial, when config.align is None): at most this many good images, seeded,
# are described unaligned and aligned and cross-fitted in ALIGN_TRIAL_FOLDS folds. 16 and 32 images gave
# the same decisions on the four shared sets (docs/ablation.md, "Parts at any angle"); 32 costs 64 forwards.
ALIGN_TRIAL_IMAGES = 32
ALIGN_TRIAL_FOLDS = 4
# Fewer good images than this run no trial (4 folds of 4): a median of fewer scores decides on noise.
ALIGN_TRIAL_MIN = 16
# Aligned normal images must score at most this share of the unaligned median for the fit to align. The
# shared sets measured 0.75-0.85 (cable glands at any angle; 16-32 images), 0.99-1.20 (fixtured or round
# parts) and 1.38-1.42 (a texture); the margin keeps a small or noisy gain from buying alignment's costs
# (a pose estimate per image on the CPU, no ONNX export).
ALIGN_GAIN = 0.9

# Position consistency above which fit suggests the image term (config.global_block): the normal images
# share a layout, as parts do and textures do not. A tenth of the variance lies 6x above the texture
# measured (magnetic_tile 0.016) and 2x below the least consistent part (mpdd_metal_plate 0.21; cable
# gland 0.40, hazelnut 0.59-0.69), docs/ablation.md "An image-level term".
PART_HINT = 0.1


@dataclass(frozen=True)
class CalibrationPatches:
    """What re-scores C calibration images against their bank plus added vectors, without their images.

    grids: [C, P] float32 patch distances of each image to the bank that scored it: exact at its stored
    positions, an upper bound elsewhere (after an update: the distance to the parent's bank, which only
    gained vectors since). positions: [C, S] int32 its S patches of largest distance, whose features [C, S,
    D] float16 are kept (unit rows rounded to float16). An image's score from its grid is exact when no
    bound outside the stored positions can enter the score (`exact`); otherwise it is an upper bound,
    tighter than the score recorded before the bank grew. With an image term (config.global_block):
    images [C, D'] float32, each image's descriptor, and image_distances [C] float32, its distance to the
    image bank that scored it (exact: an update lowers it by the added images' descriptors); else None.
    """
    grids: np.ndarray
    positions: np.ndarray
    features: np.ndarray
    images: np.ndarray | None = None
    image_distances: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.grids)

    @classmethod
    def of(cls, grids: np.ndarray, features: np.ndarray, *, stored: int, images: np.ndarray | None = None,
           image_distances: np.ndarray | None = None) -> CalibrationPatches:
        """From patch distances [C, P] and descriptors [C, P, D] of C images: the `stored` farthest each;
        images [C, D'] and image_distances [C] as they are (None: no image term)."""
        pos = np.argsort(-grids, axis=1, kind="stable")[:, :stored].astype(np.int32)            # [C, S]
        return cls(grids=np.asarray(grids, dtype=np.float32), positions=pos,
                   features=np.take_along_axis(features, pos[:, :, None].astype(np.int64), axis=1).astype(np.float16),
                   images=None if images is None else np.asarray(images, dtype=np.float32),
                   image_distances=None if image_distances is None else np.asarray(image_distances, dtype=np.float32))

    @classmethod
    def concat(cls, parts: Sequence[CalibrationPatches]) -> CalibrationPatches:
        return cls(**{f.name: (None if getattr(parts[0], f.name) is None
                               else np.concatenate([getattr(p, f.name) for p in parts])) for f in fields(cls)})

    def take(self, rows: Sequence[int]) -> CalibrationPatches:
        """The images at `rows`, in that order."""
        ix = np.asarray(rows, dtype=np.int64)
        return CalibrationPatches(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[ix]
                                     for f in fields(self)})

    def lowered(self, added: np.ndarray, *, added_images: np.ndarray | None = None) -> CalibrationPatches:
        """The grids against the bank plus `added` ([a, D] float32 unit rows): each stored patch's distance
        becomes the smaller of its distance to the bank and to its nearest added row (exact search); the
        other positions keep their bounds. added_images: [b, D'] descriptors added to the image bank, which
        lower image_distances the same way (None or empty: unchanged)."""
        out = self
        if added_images is not None and len(added_images) and self.images is not None and len(self):
            out = replace(self, image_distances=np.minimum(self.image_distances,
                                                           image_distances(self.images, added_images)))
        if len(added) == 0 or len(self) == 0:
            return out
        c, s, d = self.features.shape
        near = MemoryBank.build(np.ascontiguousarray(added, dtype=np.float32)).nearest(
            self.features.reshape(-1, d).astype(np.float32)).reshape(c, s)                    # [C, S]
        grids = self.grids.copy()
        rows = np.arange(c)[:, None]
        grids[rows, self.positions] = np.minimum(grids[rows, self.positions], near)
        return replace(out, grids=grids)

    def exact(self, *, config: ModelConfig) -> np.ndarray:
        """[C] bool: the image's score from its grid is its exact score. topk_mean and max read the k
        largest distances (k = 1 for max): exact when the k-th largest stored distance is at least every
        bound outside the stored positions. smoothed_max mixes every position with its neighbours: exact
        only when every position is stored."""
        c, p = self.grids.shape
        outside = np.ones((c, p), dtype=bool)
        outside[np.arange(c)[:, None], self.positions] = False
        if not outside.any() or c == 0:
            return np.ones(c, dtype=bool)
        if config.reduction == "smoothed_max":
            return np.zeros(c, dtype=bool)
        k = 1 if config.reduction == "max" else max(1, math.ceil(config.top_fraction * p))
        stored = np.take_along_axis(self.grids, self.positions.astype(np.int64), axis=1)      # [C, S]
        kth = -np.sort(-stored, axis=1)[:, min(k, stored.shape[1]) - 1]                        # [C]
        bound = np.where(outside, self.grids, -np.inf).max(axis=1)                            # [C]
        return kth >= bound


def stored_patches(config: ModelConfig) -> int:
    """Patches whose features are kept per calibration image (CalibrationPatches): 8 x the k that topk_mean
    averages (at least 64; all when the grid is smaller). The update lowers their distances; the score
    stays exact while its k patches are among them, so the margin is what adding vectors near the
    farthest patches can take away before a bound outside them enters (the update counts those cases)."""
    p = config.grid_size ** 2
    return min(p, max(64, 8 * max(1, math.ceil(config.top_fraction * p))))


@dataclass(frozen=True, kw_only=True)
class FitStats:
    """What a fit saw and built; stored as the manifest's "stats"."""
    n_images: int                   # readable good images
    n_train_images: int             # images in the bank (before augmentation copies)
    n_calibration_images: int       # images whose scores set the threshold (held out, or cross-fitted)
    calibration_split: str          # "holdout" or "crossfit-K" (SplitPlan.name)
    n_train_patches: int            # patches the final coreset chose from (augmented copies included)
    bank_size: int                  # vectors in the memory bank
    cover_radius: float             # largest distance from a training patch to its nearest bank entry
    coreset_seconds: float          # all coreset runs and calibration passes (K + 1 runs when cross-fitted)
    calibration_images: list[str]   # names of the calibration images (provenance of the threshold)
    # share of the calibration patch distances' variance that is between positions (position_consistency):
    # near 0 for textures and parts seen anywhere, high when normal hot spots sit at fixed places
    position_consistency: float | None = None           # None: models fitted before it was recorded
    unreadable: list[tuple[str, str]] = field(default_factory=list)   # (name, error) of skipped images
    feature_seconds: float = 0.0    # wall time of feature extraction (set by the caller that ran it)
    fit_seconds: float = 0.0        # wall time of the whole fit (set by the caller)
    # index kind of the bank: config.index, or what index="auto" chose for the bank size (choose_index);
    # None: models fitted before it was recorded (their config.index is the kind)
    index: str | None = None
    # original sizes of the training images (anomaly_core.images.size_range); the scorer gives no normal
    # verdict far outside them. None: unknown (fitted from pixels or features without sizes)
    input_sizes: dict | None = None
    # the calibration images' scores, in the order of calibration_images: what an update (anomaly_core.update)
    # recalibrates with, without their features (a model with an image term re-scores them from
    # calibration_patches). None: models fitted before they were recorded
    calibration_scores: list[float] | None = None
    # what re-scores the calibration images against a bank that gained vectors (CalibrationPatches; an
    # array file of the model, not part of the manifest's "stats"). None: models fitted before it was stored
    calibration_patches: CalibrationPatches | None = field(default=None, compare=False, repr=False)
    # the image term of a model with a global_block (its bank images' descriptors, a file of the model, and
    # its standardisation, the manifest's "image_term"); None: the image score is the patch score alone
    image_term: ImageTerm | None = field(default=None, compare=False, repr=False)
    # what the alignment trial measured when the fit chose config.align (aligned_config); None: not run
    alignment_trial: AlignmentTrial | None = None

    def to_dict(self) -> dict:
        """The manifest's "stats": every field but calibration_patches and image_term (stored apart)."""
        out = asdict(replace(self, calibration_patches=None, image_term=None))
        del out["calibration_patches"], out["image_term"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FitStats:
        """From a manifest's "stats", also of models fitted before cross-fitting (hold-out names)."""
        renamed = {"n_holdout_images": "n_calibration_images", "holdout_images": "calibration_images"}
        values = {renamed.get(k, k): v for k, v in data.items()}
        values.setdefault("calibration_split", "holdout")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}      # e.g. n_unreadable, now len(unreadable)
        values["unreadable"] = [(u, "") if isinstance(u, str) else tuple(u) for u in values.get("unreadable", [])]
        if values.get("alignment_trial") is not None:
            values["alignment_trial"] = AlignmentTrial(**values["alignment_trial"])
        return cls(**values)


@dataclass(frozen=True)
class SplitPlan:
    """Which normal images calibrate the threshold, against which bank.

    fold: [N] int16, for each image the fold whose calibration bank leaves it out (-1: in every bank).
    crossfit False: fold 0 is held out; the bank is fitted on the rest and scores fold 0 (one coreset run).
    crossfit True: for each fold f a bank fitted without f scores f; the final bank holds every image.
    """
    fold: np.ndarray
    n_folds: int
    crossfit: bool

    @property
    def name(self) -> str:
        return f"crossfit-{self.n_folds}" if self.crossfit else "holdout"

    def held_out(self, paths: Sequence[str]) -> frozenset[str]:
        """Names of the images kept out of the final bank (none when cross-fitted)."""
        return frozenset() if self.crossfit else frozenset(
            str(p) for p, f in zip(paths, self.fold, strict=True) if f == 0)

    def folds_of(self, paths: Sequence[str]) -> dict[str, int]:
        """name -> fold, for the images that some calibration bank leaves out."""
        return {str(p): int(f) for p, f in zip(paths, self.fold, strict=True) if f >= 0}


def split_calibration(paths: Sequence[str], *, config: ModelConfig) -> SplitPlan:
    """The SplitPlan of a fit on `paths`. Depends only on the set of names and the seed (not on read order).

    Hold-out: max(2, round(holdout_fraction * N)) images, at least 1 kept. Cross-fit (config.calibration,
    or "auto" when that hold-out is smaller than the threshold's quantile needs, anomaly_core.threshold):
    min(crossfit_folds, N) folds of near-equal size (leave-one-out for N <= crossfit_folds).
    """
    n = len(paths)
    n_hold = min(max(2, int(round(config.holdout_fraction * n))), n - 1)
    crossfit = (config.calibration == "crossfit"
                or (config.calibration == "auto" and n_hold < quantile_images(config.false_alarm_rate)))
    if n < 2 or (n < 3 and not crossfit):
        raise ValueError(f"fit needs at least 2 good images to calibrate a threshold by cross-fitting (3 with "
                         f"calibration='holdout'); got {n}")
    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")              # canonical order
    rank = np.empty(n, dtype=np.int64)
    rank[order[np.random.default_rng(config.seed).permutation(n)]] = np.arange(n)   # [N] seeded rank
    if crossfit:
        k = min(config.crossfit_folds, n)
        return SplitPlan(fold=(rank % k).astype(np.int16), n_folds=k, crossfit=True)
    return SplitPlan(fold=np.where(rank < n_hold, 0, -1).astype(np.int16), n_folds=1, crossfit=False)


def fitted_config(config: ModelConfig, *, plan: SplitPlan, names: Sequence[str]) -> ModelConfig:
    """The config a fit on `names` split by `plan` records: `config` with top_fraction=None resolved.

    SHARP_TOP_FRACTION where the plan yields enough calibration images for a distribution-free quantile at
    config.false_alarm_rate that is not their largest score (at least 2 of them at or above it:
    anomaly_core.threshold.quantile_images, 39 images at 5%), else SMOOTH_TOP_FRACTION. The sharper score
    has the heavier normal tail; a threshold set by one extreme calibration image, or by a tail fitted to a
    few, pays for that tail twice (mpdd, 20 good images, one draw of three: verdict recall 0.75 with the top
    1%, 0.44 with the top 0.25%; config.py, docs/ablation.md). Depends only on the plan, so every
    calibration pass and the saved model use the same image score."""
    if config.top_fraction is not None:
        return config
    n_calibration = len(plan.folds_of(names))
    needed = quantile_images(config.false_alarm_rate, at_or_above=SHARP_SCORES_ABOVE)
    fraction = SHARP_TOP_FRACTION if n_calibration >= needed else SMOOTH_TOP_FRACTION
    log.info("image score: mean of the top %g%% of patches (%d calibration images; the top %g%% needs %d at a "
             "false-alarm rate of %g)", 100 * fraction, n_calibration, 100 * SHARP_TOP_FRACTION, needed,
             config.false_alarm_rate)
    return replace(config, top_fraction=fraction)


@dataclass(frozen=True)
class AlignmentTrial:
    """What alignment_trial measured: the median cross-fitted image score of `images` good images,
    unaligned and aligned (patch-distance units), and their ratio (aligned / unaligned)."""
    images: int
    unaligned: float
    aligned: float

    @property
    def ratio(self) -> float:
        return self.aligned / self.unaligned if self.unaligned > 0 else 1.0

    @property
    def aligns(self) -> bool:
        return self.ratio <= ALIGN_GAIN


def trial_scores(features: np.ndarray, foreground: np.ndarray, *, config: ModelConfig,
                 folds: int = ALIGN_TRIAL_FOLDS) -> np.ndarray:
    """[m, P, D] unit descriptors and [m, P] foreground of m good images -> [m] image scores, each image
    scored against the exact bank of every patch of the images outside its fold (image i in fold i % folds),
    with the config's image score (the 1% of SMOOTH_TOP_FRACTION where the fit chooses it)."""
    m, p, d = features.shape
    fold = np.arange(m) % folds                                                     # [m]
    options = replace(config, top_fraction=config.top_fraction or SMOOTH_TOP_FRACTION).score_options
    scores = np.zeros(m, dtype=np.float32)
    for k in range(folds):
        out = fold == k
        if not out.any():
            continue
        bank = MemoryBank.build(features[~out][foreground[~out]])                    # [n, D] exact
        dist = patch_distances(features[out], bank, foreground=foreground[out])      # [b, P]
        scores[out] = image_scores(dist.reshape(-1, config.grid_size, config.grid_size), **options)
    return scores


def alignment_trial(pixels: np.ndarray, *, describe: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                    config: ModelConfig) -> AlignmentTrial:
    """Does turning parts to a canonical pose (anomaly_core.align) bring unseen good images closer to the
    bank? pixels: [m, S, S, 3] uint8 good images (m >= ALIGN_TRIAL_FOLDS); describe: pixels -> (descriptors
    [b, P, D], foreground [b, P]) in batches of any size (FeatureExtractor.describe). Both ways share the
    backbone and the patch distance, so their scores compare: a bank of parts seen at any angle holds each
    pose only a few times, and alignment lowers the normal scores (mvtec3d_cable_gland: 0.8x); on fixtured
    parts the pose estimate only adds jitter, on a texture it turns the grain (1.1x-1.5x). The unaligned
    arm is resampled by a sub-pixel shift (resample_images), so that the interpolation's smoothing, which
    makes any two images look more alike, counts on both sides and only the turn is judged."""
    def scores(px: np.ndarray) -> np.ndarray:
        parts = [describe(px[i:i + 8]) for i in range(0, len(px), 8)]
        return trial_scores(np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts]),
                            config=config)
    return AlignmentTrial(images=len(pixels),
                          unaligned=float(np.median(scores(resample_images(pixels, seed=config.seed)))),
                          aligned=float(np.median(scores(align_images(pixels)[0]))))


def trial_sample(names: Sequence[str], *, seed: int) -> list[str]:
    """The good images an alignment trial reads: ALIGN_TRIAL_IMAGES of `names`, drawn with `seed`, in their
    order (all of them when there are fewer); [] below ALIGN_TRIAL_MIN."""
    if len(names) < ALIGN_TRIAL_MIN:
        return []
    pick = np.random.default_rng(seed).choice(len(names), size=min(ALIGN_TRIAL_IMAGES, len(names)), replace=False)
    return [names[i] for i in sorted(pick)]


def aligned_config(config: ModelConfig, trial: Callable[[], AlignmentTrial | None]) -> tuple[ModelConfig,
                                                                                          AlignmentTrial | None]:
    """`config` with align=None resolved, and the trial that resolved it (None: none was run). `trial()` runs
    the alignment trial on the fit's good images, or returns None when they are too few (trial_sample).
    Augmented copies exclude alignment (ModelConfig), so a config that augments is not aligned."""
    if config.align is not None:
        return config, None
    if config.n_augment > 1:
        return replace(config, align=False), None
    t0 = time.perf_counter()
    result = trial()
    if result is None:
        log.info("alignment: not tried (fewer than %d good images); images are scored as they are",
                 ALIGN_TRIAL_MIN)
        return replace(config, align=False), None
    log.info("alignment trial on %d good images (%.1fs): aligned, their median score is %.2fx the unaligned "
             "(aligns at <= %.2fx): %s", result.images, time.perf_counter() - t0, result.ratio, ALIGN_GAIN,
             "parts appear at varying angles, so every image is turned to a canonical pose" if result.aligns
             else "images are scored as they are")
    return replace(config, align=result.aligns), result


def images_per_block(config: ModelConfig) -> int:
    """Images per feature block (one coreset partition): about `coreset_partition` patches."""
    return max(1, config.coreset_partition // config.grid_size ** 2)


def patch_estimate(n_bank_images: int, *, config: ModelConfig) -> int:
    """Training patches the coreset will see from `n_bank_images` images (augmented copies included):
    sets its round-1 share before the blocks exist (see coreset.composable_coreset)."""
    return n_bank_images * config.n_augment * config.grid_size ** 2


def mark_folds(batch: dict[str, np.ndarray], *, folds: dict[str, int]) -> dict[str, np.ndarray]:
    """FeatureExtractor output -> a feature block: adds "fold" [B] int16 (SplitPlan.folds_of; -1 for the
    others) and keeps "copy" [B] int16 (augment_batch's; all 0 when absent), the image descriptors "image"
    [B, D'] (config.global_block) and the original "width" and "height" [B] when the batch has them."""
    out = {k: batch[k] for k in ("path", "error", "features", "foreground", "image", "width", "height")
           if k in batch}
    out["fold"] = np.array([folds.get(str(p), -1) for p in batch["path"]], dtype=np.int16)
    out["copy"] = batch["copy"] if "copy" in batch else np.zeros(len(batch["path"]), dtype=np.int16)
    return out


def feature_blocks(features: np.ndarray, fold: np.ndarray, *, images_per_block: int,
                   foreground: np.ndarray | None = None, paths: Sequence[str] | None = None,
                   copy: np.ndarray | None = None, images: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """In-memory features [N, P, D], folds [N] int (SplitPlan.fold), foreground [N, P] bool (None:
    everywhere), names [N] (None: "0", "1", ...), copy index [N] (None: all originals) and image descriptors
    [N, D'] (config.global_block; None: none) -> the blocks fit_bank takes (what the fit job builds in
    Ray's object store)."""
    n, p = features.shape[:2]
    fg = np.ones((n, p), dtype=bool) if foreground is None else foreground
    names = np.array([str(i) for i in range(n)] if paths is None else [str(x) for x in paths], dtype=object)
    cp = np.zeros(n, dtype=np.int16) if copy is None else np.asarray(copy, dtype=np.int16)
    fold = np.asarray(fold, dtype=np.int16)
    return [{"path": names[s:s + images_per_block],
             "error": np.full(len(names[s:s + images_per_block]), "", dtype=object),
             "features": features[s:s + images_per_block], "foreground": fg[s:s + images_per_block],
             "fold": fold[s:s + images_per_block], "copy": cp[s:s + images_per_block]}
            | ({} if images is None else {"image": images[s:s + images_per_block]})
            for s in range(0, n, images_per_block)]


def bank_patches(block: dict[str, np.ndarray], *, leave_out: int | None) -> np.ndarray:
    """[n, D] foreground patch rows of the block's readable images outside fold `leave_out` (None: all):
    the coreset's input."""
    keep = block["error"] == ""                                                    # [B]
    if leave_out is not None:
        keep &= block["fold"] != leave_out
    return block["features"][keep][block["foreground"][keep]]                     # [b, P, D][b, P] -> [n, D]


def image_rows(block: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(image descriptors [n, D'], folds [n] int16) of the block's readable images, augmented copies
    included: the rows every pass's image bank is chosen from (config.global_block)."""
    keep = block["error"] == ""                                                    # [B]
    return block["image"][keep], block["fold"][keep]


def position_consistency(count: int, total: np.ndarray, total_sq: np.ndarray) -> float:
    """Between-position share of the variance of patch distances d[i, p] over `count` images, from
    total = sum_i d[i, p] and total_sq = sum_i d[i, p]^2 ([P] float64 each): var_p(mean_i d) / (that +
    mean_p var_i d), an intraclass correlation; count >= 2 (calibrate asks as much)."""
    mean = total / count                                                         # [P]
    within = float(np.mean(total_sq / count - mean ** 2))
    between = float(mean.var())
    return between / (between + within) if between + within > 0 else 0.0


def layout_hints(consistency: float, *, config: ModelConfig) -> list[str]:
    """What the fit suggests from its position consistency (position_consistency, 0-1) for the options a
    config does not use: the image term for parts (>= PART_HINT), the fixtured-part options (>= POSITION_HINT)."""
    hints = []
    if consistency >= PART_HINT and config.global_block is None:
        hints.append(f"normal images share a layout (position consistency {consistency:.2f} >= {PART_HINT}), as "
                     "parts do and textures do not: if a defect can change the part's shape while each patch "
                     "still looks normal (bent, cut, missing pieces), --global-block 4 adds an image-level term "
                     "(docs/ablation.md, 'An image-level term'; it costs textures)")
    if consistency >= POSITION_HINT:
        hints.append(f"normal images score alike at the same positions (position consistency {consistency:.2f} >= "
                     f"{POSITION_HINT}): the parts look fixtured, so --position-weight (a part moved or missing) "
                     "may catch what the global search cannot; for parts seen at any angle, see --align")
    return hints


@dataclass(frozen=True)
class BlockCalibration:
    scores: np.ndarray                  # [m] float32 patch scores of the block's fold-f originals
    distance_sum: np.ndarray            # [P] float64 sums of their patch distances per position
    distance_sq: np.ndarray             # [P] float64 sums of squares
    paths: list[str]                    # their names
    n_images: int                       # readable original images in the block
    originals: list[str]                # their names
    unreadable: list[tuple[str, str]]   # (name, error)
    sizes: np.ndarray                   # [n, 2] int (width, height) of the readable originals; [0, 2] unknown
    patches: CalibrationPatches         # of the fold-f originals, in the order of `paths` (with their image
                                        # descriptors and distances when the model has an image term)


def calibrate_block(block, bank_bytes: list[np.ndarray], image_bank: np.ndarray | None, *, fold: int,
                    config: ModelConfig, block_of: Callable, exact_above: float | None) -> BlockCalibration:
    """Patch scores of the block's fold-`fold` images (originals, not augmented copies) against a bank
    fitted without them (shipped serialised: this runs as a Ray task), searched as the model will search
    it: rows beyond `exact_above` (that bank's cover radius) exhaustively (MemoryBank); with image_bank
    ([M, D'] descriptors of the images of that bank; None: no image term) their image distances too."""
    block = block_of(block)
    bank = MemoryBank.deserialize(bank_bytes, nprobe=config.nprobe, ef_search=config.ef_search,
                                  exact_above=exact_above)
    ok = block["error"] == ""
    original = ok & (block["copy"] == 0)
    sel = original & (block["fold"] == fold)                                      # [B]
    dist = patch_distances(block["features"][sel], bank, foreground=block["foreground"][sel]).astype(
        np.float64)                                                                # [m, P]
    g = config.grid_size
    scores = image_scores(dist.reshape(-1, g, g), **config.score_options)                 # [m]
    return BlockCalibration(
        scores=scores, distance_sum=dist.sum(axis=0), distance_sq=(dist ** 2).sum(axis=0),
        paths=[str(p) for p in block["path"][sel]], n_images=int(original.sum()),
        originals=[str(p) for p in block["path"][original]],
        unreadable=[(str(p), str(e)) for p, e in zip(block["path"][~ok], block["error"][~ok], strict=True)],
        sizes=(np.stack([block["width"][original], block["height"][original]], axis=1).astype(np.int64)
               if "width" in block else np.zeros((0, 2), dtype=np.int64)),
        patches=CalibrationPatches.of(
            dist, block["features"][sel], stored=stored_patches(config),
            images=None if image_bank is None else block["image"][sel],
            image_distances=None if image_bank is None else image_distances(block["image"][sel], image_bank)))


def calibration_passes(blocks: Sequence, *, plan: SplitPlan | None, n_estimate: int, banked: Callable,
                       config: ModelConfig, map_fn: MapFn, block_of: Callable, image_base: np.ndarray | None = None
                       ) -> tuple[tuple, np.ndarray | None, list[BlockCalibration]]:
    """The bank passes of a calibrated fit (fit_bank) or update (anomaly_core.update), and their calibration.

    banked(leave_out, estimate) -> (selection, MemoryBank): a bank of the blocks' images less fold
    `leave_out` (None: every image), `estimate` the patches expected in it. Cross-fitted plan: each fold
    is scored by a bank built without it, then the final bank holds every image. Otherwise (a hold-out
    plan, or None) fold 0 is left out of the one bank and scored by it. image_base: [M0, D'] image
    descriptors every image bank starts from (a parent's; [0, D'] for a fit), to which each pass adds
    its images' (image_rows, read from the blocks once); None: no image term.
    Returns (the final banked(...) result, the final image bank or None, the calibration of every block,
    fold by fold).
    """
    if image_base is not None:
        parts = map_fn(compose(image_rows, block_of), blocks)
        rows = np.concatenate([image_base[:0], *(r for r, _ in parts)])               # [n, D']
        folds = np.concatenate([np.zeros(0, np.int16), *(f for _, f in parts)])       # [n]

    def images(leave_out: int | None) -> np.ndarray | None:
        if image_base is None:
            return None
        keep = rows[folds != leave_out] if leave_out is not None else rows
        return np.concatenate([image_base, keep]).astype(np.float32)                  # [M, D']

    def calibrated(fold: int, bank: MemoryBank, image_bank: np.ndarray | None) -> list[BlockCalibration]:
        return map_fn(partial(calibrate_block, fold=fold, config=config, block_of=block_of,
                              exact_above=bank.exact_above), blocks, bank.serialize(), image_bank)

    if plan is not None and plan.crossfit:
        fold_estimate = n_estimate * (plan.n_folds - 1) // plan.n_folds
        parts = [c for f in range(plan.n_folds) for c in calibrated(f, banked(f, fold_estimate)[1], images(f))]
        return banked(None, n_estimate), images(None), parts
    final, image_bank = banked(0, n_estimate), images(0)
    return final, image_bank, calibrated(0, final[1], image_bank)


def fit_bank(blocks: Sequence, *, config: ModelConfig, plan: SplitPlan, n_estimate: int,
             map_fn: MapFn = local_map, block_of: Callable = identity,
             search_device: str = "cpu") -> tuple[MemoryBank, Calibration, FitStats]:
    """Memory bank and calibration from feature blocks, which stay where they are: every pass over them
    goes through `map_fn` (default: a loop here; the fit job: Ray tasks on the object store).

    config: the fit's config with its top_fraction set (fitted_config). plan: the SplitPlan whose folds the
    blocks carry. n_estimate: expected patches of the final bank
    (patch_estimate; sets the coreset's round-1 share). block_of: turns an element of `blocks` into the
    block dict (the fit job's are Arrow blocks). search_device: where the model will be scored ("cpu" or
    "cuda"), which sets the bank size up to which index="auto" stays exact (choose_index).
    Returns the bank, the threshold calibrated at config.false_alarm_rate, and the fit's statistics.
    """
    t0 = time.perf_counter()
    kind = index_kind(config, n_estimate=n_estimate, search_device=search_device)

    def fitted(leave_out: int | None, estimate: int):
        core = composable_coreset(
            blocks, k=config.coreset_size, ratio=config.coreset_ratio, n_estimate=estimate,
            dim=config.feature_dim, projection_dim=config.projection_dim, oversample=config.coreset_oversample,
            refine=config.coreset_refine, seed=config.seed,
            points_of=compose(partial(bank_patches, leave_out=leave_out), block_of), map_fn=map_fn)
        return core, MemoryBank.build(core.features, kind=kind, shard_size=config.shard_size, seed=config.seed,
                                      nprobe=config.nprobe, ef_search=config.ef_search, exact_above=core.cover_radius)

    (core, bank), image_bank, parts = calibration_passes(
        blocks, plan=plan, n_estimate=n_estimate, banked=fitted, config=config, map_fn=map_fn, block_of=block_of,
        image_base=None if config.global_block is None else np.zeros((0, BACKBONES[config.backbone].dim), np.float32))
    t_core = time.perf_counter() - t0
    log.info("coreset: %d of %d patches, cover radius %.4f; calibration %s; %.1fs",
             core.features.shape[0], core.n_points, core.cover_radius, plan.name, t_core)
    patches = CalibrationPatches.concat([c.patches for c in parts])
    term, scores = image_scoring(image_bank, np.concatenate([c.scores for c in parts]), patches)
    cal = calibrate(scores, false_alarm_rate=config.false_alarm_rate)
    consistency = position_consistency(int(scores.size), sum(c.distance_sum for c in parts),
                                       sum(c.distance_sq for c in parts))
    for hint in layout_hints(consistency, config=config):
        log.info(hint)
    if cal.method != "quantile":
        log.warning("the threshold rests on %d normal images, fewer than the %d that a false-alarm rate of %g "
                    "needs to be set without a model of the scores: it comes from a log-normal fitted to them. "
                    "A new normal part is flagged with probability <= %.3f (90%% upper bound %.3f); add good "
                    "images to tighten it", cal.n_images, quantile_images(config.false_alarm_rate),
                    config.false_alarm_rate, cal.expected_rate, cal.expected_rate_90)
    elif cal.threshold >= cal.normal_max:
        log.info("the threshold is the largest of the %d calibration scores, so one unusual good image sets it; "
                 "at a false-alarm rate of %g, %d calibration images or more put it below their largest",
                 cal.n_images, config.false_alarm_rate,
                 quantile_images(config.false_alarm_rate, at_or_above=SHARP_SCORES_ABOVE))
    one_pass = parts[:len(blocks)]                               # every block seen once (the first fold's pass)
    n_images = sum(c.n_images for c in one_pass)
    sizes = np.concatenate([c.sizes for c in one_pass])                     # [n, 2] (width, height)
    stats = FitStats(n_images=n_images, n_train_images=n_images - (0 if plan.crossfit else int(scores.size)),
                     n_calibration_images=int(scores.size), calibration_split=plan.name,
                     n_train_patches=core.n_points, bank_size=bank.size, cover_radius=core.cover_radius,
                     coreset_seconds=round(t_core, 2), calibration_images=[p for c in parts for p in c.paths],
                     position_consistency=round(consistency, 4),
                     unreadable=[u for c in one_pass for u in c.unreadable], index=kind,
                     input_sizes=size_range(sizes[:, 0], sizes[:, 1]) if len(sizes) else None,
                     calibration_scores=[float(s) for s in scores], calibration_patches=patches, image_term=term)
    return bank, cal, stats


def image_scoring(image_bank: np.ndarray | None, patch_scores: np.ndarray, patches: CalibrationPatches
                  ) -> tuple[ImageTerm | None, np.ndarray]:
    """(the image term, the calibration images' image scores [C]) from the final image bank [M, D'] (None:
    no image term, the scores are the patch scores [C]) and the calibration images' patch scores and
    CalibrationPatches (their image distances), in the same order: what the threshold is set on."""
    if image_bank is None:
        return None, np.asarray(patch_scores)
    term = ImageTerm.of(image_bank, patch_scores=patch_scores, distances=patches.image_distances)
    log.info("image term: %d bank images; calibration log patch score %.3f +- %.3f, log image distance %.3f "
             "+- %.3f", len(image_bank), term.patch_log_mean, term.patch_log_std, term.image_log_mean,
             term.image_log_std)
    return term, term.combine(patch_scores, patches.image_distances)


def index_kind(config: ModelConfig, *, n_estimate: int, search_device: str) -> str:
    """The bank's index kind: config.index, or for "auto" the choice for the final bank's expected size
    (ceil(coreset_ratio x n_estimate) or coreset_size), logged. Cross-fitted calibration banks, smaller,
    take the same kind, so the threshold comes from the search the scorer runs."""
    if config.index != "auto":
        return config.index
    size = coreset_size(n_estimate, ratio=config.coreset_ratio, size=config.coreset_size)
    kind = choose_index(size, device=search_device)
    log.info("index auto: %s for a bank of about %d vectors scored on %s (exact up to %d there)", kind, size,
             search_device, AUTO_FLAT_MAX[torch.device(search_device).type])
    return kind


def compose(f: Callable, g: Callable) -> Callable:
    """x -> f(g(x)), picklable (Ray ships it to the tasks)."""
    return partial(_apply_both, f, g)


def _apply_both(f: Callable, g: Callable, x):
    return f(g(x))
