"""Incremental update: a fitted model and feature blocks of new good images -> the bank, threshold and
statistics of a new model that also covers them, without a refit and without the features of the
parent's training images.

**Bank.** The parent's bank vectors (MemoryBank.vectors) are the centres from which greedy k-center continues
over the new patches (anomaly_core.coreset.continue_coreset). The rule, and why:

- Stop radius: half the parent's recorded cover radius R (stop_radius). The parent's greedy centres and
  its farthest training patch are R apart pairwise, so no bank of the parent's size can cover the
  parent's patches closer than R / 2 (two of those points would share a centre): R / 2 is the finest
  density a fit at the parent's size is known to reach. A new patch within it of a centre is covered as
  well as that, and adds nothing; the others are candidates, and greedy stops once every candidate lies
  within R / 2. Stopping at R itself, as the first version did, left fewer candidates than a refit,
  whose radius is below R, covers.
- Budget: coreset_ratio of the candidates (capped by max_added), the density a fit gives patches: each
  new patch the bank does not already cover costs what a fit spends on a patch. New images that repeat
  what the bank holds thus add little, and the bank grows with what is new, not with the number of
  images. A budget of coreset_ratio of all new patches (a refit's count) was measured too: the same
  image AUROC on mvtec3d_cable_gland at twice the vectors and about four times the seconds
  (docs/benchmarks.md "Incremental update"), so the candidates' count it is.

Against refits on the union, over three cuts x three model seeds (docs/benchmarks.md "Incremental update"):
image AUROC 0.0013 below on average on magnetic_tile at 224 px (0.0015 below a refit that banks the same
images, standard error 0.0007; at 392 px, three seeds, +0.0037 and -0.0003), within the 0.0054 by which
the refit's own AUROC moves between hold-out draws; pixel AUROC within 0.001 and AUPRO within 0.003 on
both sets measured. A gap seen against one refit is mostly which images that refit's hold-out kept out
of its bank. The parent's index is copied and extended by the picks (extend_bank): the same kind, the
parent's entries unchanged.

**Configuration.** The new model keeps its parent's config, the image score included: a parent fitted on
too few calibration images for the sharper image score (anomaly_core.fit.fitted_config) keeps the top 1% after any
update, since its recorded calibration scores are in that score's units. A refit chooses again.

**Calibration.** The threshold needs scores of normal images that the new bank did not see
(anomaly_core.threshold). Two sources, both without the parent's training features:

- The parent's calibration images, re-scored. A fit keeps, for each calibration image, its patch
  distances and the features of its farthest patches (anomaly_core.fit.CalibrationPatches, a file of
  the model). Against the new bank, which holds the bank that scored them plus the added vectors, a
  stored patch's distance is the smaller of its recorded one and its distance to the nearest added
  vector (exact search); the rest keep their recorded distances as upper bounds. The score is exact
  whenever those bounds cannot enter it (CalibrationPatches.exact; the update logs how many are), an
  upper bound otherwise. A cross-fitted parent's images are thereby scored against their fold's bank
  plus the added vectors, as a cross-fitted refit would score them against its fold's bank.
  A parent saved before the patches were stored keeps its recorded scores: upper bounds, since the new
  bank only lowers them, so the threshold is at least the exact one and errs towards fewer alarms (logged).
  Calibration images that are among the new images are dropped, since the new bank now sees them.
- A held-out part of the new images, split as a fit splits its images (anomaly_core.fit.split_calibration:
  held out, or cross-fitted when few), scored exactly against a bank extended without them.

With fewer than MIN_NEW_CALIBRATION new images all of them go into the bank and the threshold rests on the
parent's scores. A parent fitted before its scores were recorded calibrates on the new held-out part
alone, and is refused when that part is too small. The threshold's guarantee is for a normal part drawn
as the combined calibration set is; a new kind of normal part whose share of the line differs from its
share here is flagged at a rate that differs accordingly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import faiss
import numpy as np

from anomaly_core.config import ModelConfig
from anomaly_core.coreset import Extension, MapFn, continue_coreset, identity, local_map
from anomaly_core.fit import (
    CalibrationPatches,
    FitStats,
    SplitPlan,
    bank_patches,
    calibration_passes,
    compose,
    image_scoring,
    split_calibration,
)
from anomaly_core.images import size_range
from anomaly_core.index import MemoryBank
from anomaly_core.scoring import image_scores
from anomaly_core.threshold import Calibration, calibrate

log = logging.getLogger(__name__)

# New images below which none is held out: all go into the bank (split_calibration needs 3 for a hold-out).
MIN_NEW_CALIBRATION = 3


def extend_bank(bank: MemoryBank, added: np.ndarray, *, config: ModelConfig, exact_above: float | None) -> MemoryBank:
    """A new bank of the same kind as `bank`, which is not modified: copies of its shards, the last one
    filled up to config.shard_size with the first rows of `added` ([a, D] float32 unit rows; FAISS adds
    them to the trained index: ivf and ivfpq assign them with the shard's quantiser, hnsw links them into
    its graph), the rest in new shards built as a fit builds them. exact_above: its search bound
    (MemoryBank; the cover radius of the extended bank)."""
    shards = [faiss.clone_index(s) for s in bank.shards]
    rest = np.ascontiguousarray(added, dtype=np.float32)
    room = max(0, config.shard_size - shards[-1].ntotal)
    if room and len(rest):
        shards[-1].add(rest[:room])
        rest = rest[room:]
    if len(rest):
        shards += MemoryBank.build(rest, kind=bank.kind, shard_size=config.shard_size, seed=config.seed).shards
    return MemoryBank(shards, nprobe=config.nprobe, ef_search=config.ef_search, exact_above=exact_above)


def update_split(paths: Sequence[str], *, config: ModelConfig) -> SplitPlan | None:
    """Which new images calibrate: split_calibration's plan, or None (all banked) below MIN_NEW_CALIBRATION."""
    return split_calibration(paths, config=config) if len(paths) >= MIN_NEW_CALIBRATION else None


def merge_sizes(parent: dict | None, new: dict | None) -> dict | None:
    """Size range (anomaly_core.images.size_range) covering both; a parent without one stays without
    (it gives no size verdicts), new images of unknown size leave the parent's."""
    if parent is None or new is None:
        return parent
    return {"min_side": min(parent["min_side"], new["min_side"]), "max_side": max(parent["max_side"], new["max_side"]),
            "min_aspect": min(parent["min_aspect"], new["min_aspect"]),
            "max_aspect": max(parent["max_aspect"], new["max_aspect"])}


def stop_radius(cover_radius: float) -> float:
    """The continuation's stop radius (cosine) for a parent of recorded cover radius `cover_radius`: half
    of it, the finest a bank of the parent's size is known to cover its own patches (module docstring)."""
    return cover_radius / 2


def rescored(stats: FitStats, keep: Sequence[int], added: np.ndarray, *, config: ModelConfig,
             added_images: np.ndarray | None = None) -> tuple[np.ndarray, CalibrationPatches | None, int]:
    """The parent's calibration images at `keep` (indices into stats.calibration_images) scored against
    its bank plus `added` ([a, D] float32 unit rows), and its image bank plus `added_images` ([b, D']
    descriptors, with an image term): (patch scores [c] float64, their CalibrationPatches with the lowered
    grids and image distances, how many scores are exact). A parent without stored patches: its recorded
    scores (upper bounds), None, 0."""
    recorded = np.array([stats.calibration_scores[i] for i in keep], dtype=np.float64)
    if stats.calibration_patches is None:
        return recorded, None, 0
    patches = stats.calibration_patches.take(keep).lowered(added, added_images=added_images)
    g = config.grid_size
    scores = image_scores(patches.grids.reshape(-1, g, g), **config.score_options).astype(np.float64)
    return scores, patches, int(patches.exact(config=config).sum())


def update_bank(blocks: Sequence, *, config: ModelConfig, bank: MemoryBank, stats: FitStats, plan: SplitPlan | None,
                max_added: int | None = None, map_fn: MapFn = local_map,
                block_of: Callable = identity) -> tuple[MemoryBank, Calibration, FitStats, dict]:
    """The parent's (config, bank, stats) extended by the new images' feature blocks (anomaly_core.fit's
    block format; their folds from `plan`, None: no new image calibrates), passes run through `map_fn`
    as fit_bank runs them.

    max_added: most vectors added (None: the budget alone, coreset_ratio of the candidates).
    Returns (new bank, calibration, new FitStats, what was added: the manifest's "added" record, with the
    new images' names, their patches, the candidates among them, the vectors added, bank size and cover
    radius before and after, the stop radius, and which scores calibrated).
    """
    t0 = time.perf_counter()
    centres = bank.vectors()                                                   # [M, D]
    radius = stop_radius(stats.cover_radius)

    def extended(leave_out: int | None, _estimate: int) -> tuple[Extension, MemoryBank]:
        ext = continue_coreset(blocks, centres, radius=radius, ratio=config.coreset_ratio, max_added=max_added,
                               oversample=config.coreset_oversample,
                               points_of=compose(partial(bank_patches, leave_out=leave_out), block_of),
                               map_fn=map_fn)
        return ext, extend_bank(bank, ext.features, config=config,
                                exact_above=max(stats.cover_radius, ext.cover_radius))

    # hold-out: fold 0 is the new calibration part; no plan: every fold is -1, so fold 0 selects no image
    # and the calibration pass only counts the images, their sizes and the unreadable ones. The budget
    # counts the candidates as round 1 finds them, so the passes need no estimate of the patches (0).
    parent_images = stats.image_term.vectors if stats.image_term is not None else None
    (ext, new_bank), image_bank, parts = calibration_passes(blocks, plan=plan, n_estimate=0, banked=extended,
                                                            config=config, map_fn=map_fn, block_of=block_of,
                                                            image_base=parent_images)
    one_pass = parts[:len(blocks)]                         # every block seen once (the first fold's pass)
    new_images = [p for c in one_pass for p in c.originals]
    new_names = [p for c in parts for p in c.paths]
    new_scores = np.concatenate([c.scores for c in parts]).astype(np.float64)
    seen = set(new_images)
    keep = [i for i, name in enumerate(stats.calibration_images)
            if stats.calibration_scores is not None and name not in seen]
    parent_scores, parent_patches, n_exact = rescored(
        stats, keep, ext.features, config=config,
        added_images=None if image_bank is None else image_bank[len(parent_images):])
    if stats.calibration_scores is None:
        log.warning("the parent model records no calibration scores (fitted before they were recorded): the "
                    "threshold rests on the %d held-out new images alone", new_scores.size)
    elif parent_patches is None:
        log.warning("the parent model stores no calibration patches (saved before they were kept): its %d "
                    "calibration images keep their recorded scores, upper bounds of their scores against the new "
                    "bank, so the threshold errs high (fewer alarms); a refit stores them", len(keep))
    else:
        log.info("update: %d parent calibration images re-scored against the new bank, %d exactly, %d as upper "
                 "bounds", len(keep), n_exact, len(keep) - n_exact)
    if len(keep) + new_scores.size < 2:
        raise ValueError(f"{len(keep)} recorded parent scores and {new_scores.size} held-out new images: the threshold "
                         f"needs at least 2 normal scores the new bank did not see; add good images (from "
                         f"{MIN_NEW_CALIBRATION} new images up, some are held out) or refit")
    sizes = np.concatenate([c.sizes for c in one_pass])                    # [n, 2] (width, height)
    # in the order of calibration_images; none when kept parent images have none (a chained update then
    # keeps upper bounds for them, as for its parent)
    patches = (None if parent_patches is None and keep else CalibrationPatches.concat(
        ([parent_patches] if parent_patches is not None else []) + [c.patches for c in parts]))
    # a model with an image term is re-standardised on the new calibration set (it always stores patches)
    term, scores = image_scoring(image_bank, np.concatenate([parent_scores, new_scores]), patches)
    cal = calibrate(scores, false_alarm_rate=config.false_alarm_rate)
    t_update = time.perf_counter() - t0
    new_stats = FitStats(
        n_images=stats.n_images + len(new_images),
        n_train_images=stats.n_train_images + len(new_images) - (0 if plan is not None and plan.crossfit
                                                                  else len(new_names)),
        n_calibration_images=int(scores.size),
        calibration_split=f"{stats.calibration_split}+{plan.name if plan is not None else 'none'}",
        n_train_patches=stats.n_train_patches + ext.n_points, bank_size=new_bank.size,
        cover_radius=max(stats.cover_radius, ext.cover_radius), coreset_seconds=round(t_update, 2),
        calibration_images=[stats.calibration_images[i] for i in keep] + new_names,
        calibration_scores=[float(s) for s in scores],
        calibration_patches=patches, image_term=term,
        position_consistency=stats.position_consistency, alignment_trial=stats.alignment_trial,
        unreadable=list(stats.unreadable) + [u for c in one_pass for u in c.unreadable], index=new_bank.kind,
        input_sizes=merge_sizes(stats.input_sizes, size_range(sizes[:, 0], sizes[:, 1]) if len(sizes) else None))
    added = {"images": new_images, "patches": ext.n_points, "candidates": ext.n_candidates,
             "vectors": int(len(ext.features)), "bank_size": [bank.size, new_bank.size],
             "cover_radius": [stats.cover_radius, new_stats.cover_radius], "stop_radius": radius, "calibration": {
                 "parent_scores": len(keep), "parent_rescored": len(keep) if parent_patches is not None else 0,
                 "parent_exact": n_exact, "new_scores": int(new_scores.size),
                 "new_split": plan.name if plan is not None else "none"},
             "seconds": round(t_update, 2)}
    log.info("update: %d new images, %d new patches, %d beyond the stop radius %.4f, %d added (bank %d -> %d); "
             "threshold on %d parent + %d new scores: %.4f; %.1fs", len(new_images), ext.n_points,
             ext.n_candidates, radius, len(ext.features), bank.size, new_bank.size, len(keep),
             new_scores.size, cal.threshold, t_update)
    return new_bank, cal, new_stats, added
