"""Incremental update: a fitted model and feature blocks of new good images -> the bank, threshold and
statistics of a new model that also covers them, without a refit and without the features of the
parent's training images.

**Bank.** The parent's bank vectors (MemoryBank.vectors) are the centres from which greedy k-center continues
over the new patches (anomaly_core.coreset.continue_coreset): a new patch farther than the parent's
recorded cover radius from every centre is a candidate, and greedy picks among the candidates up to a
budget (default: coreset_ratio of the new patches, the density a fit gives them) or until every candidate
lies within that radius of a centre, so that the recorded radius stays a bound for the new patches too
unless the budget binds (the new model records the radius it measured). What the bank already covers as
well as its own training patches adds nothing, so the bank grows with what is new, not with the number
of images. The parent's index is copied and extended by the picks (extend_bank): the same kind, the
parent's entries unchanged.

**Calibration.** The threshold needs scores of normal images that the new bank did not see
(anomaly_core.threshold). Two sources, both without the parent's training features:

- The parent's calibration scores, recorded at fit time (FitStats.calibration_scores). Their images'
  features are not stored, and recomputing them would cost time in proportion to the parent's images,
  so they are not re-scored. For a held-out parent the new bank contains the bank those images were
  scored against, so with exact search each one's score against the new bank is at most its recorded
  score: the recorded scores are upper bounds, and a threshold set from upper bounds is at least the one
  the exact scores would give. The false-alarm bound of the threshold therefore still holds; the error
  is towards fewer alarms. A cross-fitted parent's scores are those its fit already took for the
  scores of unseen normal images. Calibration images that are among the new images are dropped, since
  the new bank now sees them.
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
from anomaly_core.coreset import Extension, MapFn, continue_coreset, coreset_size, identity, local_map
from anomaly_core.fit import FitStats, SplitPlan, bank_patches, calibration_passes, compose, split_calibration
from anomaly_core.images import size_range
from anomaly_core.index import MemoryBank
from anomaly_core.threshold import Calibration, calibrate

log = logging.getLogger(__name__)

# New images below which none is held out: all go into the bank (split_calibration needs 3 for a hold-out).
MIN_NEW_CALIBRATION = 3


def extend_bank(bank: MemoryBank, added: np.ndarray, *, config: ModelConfig) -> MemoryBank:
    """A new bank of the same kind as `bank`, which is not modified: copies of its shards, the last one
    filled up to config.shard_size with the first rows of `added` ([a, D] float32 unit rows; FAISS adds
    them to the trained index: ivf and ivfpq assign them with the shard's quantiser, hnsw links them into
    its graph), the rest in new shards built as a fit builds them."""
    shards = [faiss.clone_index(s) for s in bank.shards]
    rest = np.ascontiguousarray(added, dtype=np.float32)
    room = max(0, config.shard_size - shards[-1].ntotal)
    if room and len(rest):
        shards[-1].add(rest[:room])
        rest = rest[room:]
    if len(rest):
        shards += MemoryBank.build(rest, kind=bank.kind, shard_size=config.shard_size, seed=config.seed).shards
    return MemoryBank(shards, nprobe=config.nprobe, ef_search=config.ef_search)


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


def update_bank(blocks: Sequence, *, config: ModelConfig, bank: MemoryBank, stats: FitStats, plan: SplitPlan | None,
                n_estimate: int, max_added: int | None = None, map_fn: MapFn = local_map,
                block_of: Callable = identity) -> tuple[MemoryBank, Calibration, FitStats, dict]:
    """The parent's (config, bank, stats) extended by the new images' feature blocks (anomaly_core.fit's
    block format; their folds from `plan`, None: no new image calibrates), passes run through `map_fn`
    as fit_bank runs them.

    n_estimate: expected new patches of the bank part (anomaly_core.fit.patch_estimate). max_added: most
    vectors added (None: ceil(coreset_ratio x new bank patches)).
    Returns (new bank, calibration, new FitStats, what was added: the manifest's "added" record, with the
    new images' names, their patches, the candidates among them, the vectors added, bank size and cover
    radius before and after, and which scores calibrated).
    """
    t0 = time.perf_counter()
    centres = bank.vectors()                                                   # [M, D]

    def extended(leave_out: int | None, estimate: int) -> tuple[Extension, MemoryBank]:
        budget = max_added if max_added is not None else coreset_size(estimate, ratio=config.coreset_ratio, size=None)
        ext = continue_coreset(blocks, centres, radius=stats.cover_radius, budget=budget, n_estimate=estimate,
                               oversample=config.coreset_oversample,
                               points_of=compose(partial(bank_patches, leave_out=leave_out), block_of),
                               map_fn=map_fn)
        return ext, extend_bank(bank, ext.features, config=config)

    # hold-out: fold 0 is the new calibration part; no plan: every fold is -1, so fold 0 selects no image
    # and the calibration pass only counts the images, their sizes and the unreadable ones
    (ext, new_bank), parts = calibration_passes(blocks, plan=plan, n_estimate=n_estimate, banked=extended,
                                                config=config, map_fn=map_fn, block_of=block_of)
    one_pass = parts[:len(blocks)]                         # every block seen once (the first fold's pass)
    new_images = [p for c in one_pass for p in c.originals]
    new_names = [p for c in parts for p in c.paths]
    new_scores = np.concatenate([c.scores for c in parts]).astype(np.float64)
    seen = set(new_images)
    kept = [(name, s) for name, s in zip(stats.calibration_images, stats.calibration_scores or [], strict=False)
            if name not in seen]
    if stats.calibration_scores is None:
        log.warning("the parent model records no calibration scores (fitted before they were recorded): the "
                    "threshold rests on the %d held-out new images alone", new_scores.size)
    if len(kept) + new_scores.size < 2:
        raise ValueError(f"{len(kept)} recorded parent scores and {new_scores.size} held-out new images: the threshold "
                         f"needs at least 2 normal scores the new bank did not see; add good images (from "
                         f"{MIN_NEW_CALIBRATION} new images up, some are held out) or refit")
    scores = np.concatenate([np.array([s for _, s in kept], dtype=np.float64), new_scores])
    cal = calibrate(scores, false_alarm_rate=config.false_alarm_rate)
    sizes = np.concatenate([c.sizes for c in one_pass])                    # [n, 2] (width, height)
    t_update = time.perf_counter() - t0
    new_stats = FitStats(
        n_images=stats.n_images + len(new_images),
        n_train_images=stats.n_train_images + len(new_images) - (0 if plan is not None and plan.crossfit
                                                                  else len(new_names)),
        n_calibration_images=int(scores.size),
        calibration_split=f"{stats.calibration_split}+{plan.name if plan is not None else 'none'}",
        n_train_patches=stats.n_train_patches + ext.n_points, bank_size=new_bank.size,
        cover_radius=max(stats.cover_radius, ext.cover_radius), coreset_seconds=round(t_update, 2),
        calibration_images=[n for n, _ in kept] + new_names, calibration_scores=[float(s) for s in scores],
        position_consistency=stats.position_consistency,
        unreadable=list(stats.unreadable) + [u for c in one_pass for u in c.unreadable], index=new_bank.kind,
        input_sizes=merge_sizes(stats.input_sizes, size_range(sizes[:, 0], sizes[:, 1]) if len(sizes) else None))
    added = {"images": new_images, "patches": ext.n_points, "candidates": ext.n_candidates,
             "vectors": int(len(ext.features)), "bank_size": [bank.size, new_bank.size],
             "cover_radius": [stats.cover_radius, new_stats.cover_radius], "calibration": {
                 "parent_scores": len(kept), "new_scores": int(new_scores.size),
                 "new_split": plan.name if plan is not None else "none"},
             "seconds": round(t_update, 2)}
    log.info("update: %d new images, %d new patches, %d beyond the cover radius %.4f, %d added (bank %d -> %d); "
             "threshold on %d parent + %d new scores: %.4f; %.1fs", len(new_images), ext.n_points,
             ext.n_candidates, stats.cover_radius, len(ext.features), bank.size, new_bank.size, len(kept),
             new_scores.size, cal.threshold, t_update)
    return new_bank, cal, new_stats, added
