"""Pixels -> patch descriptors, the same at fit and at score time: backbone tokens of stitched tiles, then
neighbourhood aggregation, the position code and the foreground mask as the config says."""

from __future__ import annotations

import numpy as np

from anomaly_core.align import align_images
from anomaly_core.augment import AUGMENTATIONS, augment_images
from anomaly_core.backbone import BACKBONES, Backbone
from anomaly_core.config import ModelConfig
from anomaly_core.foreground import foreground_mask
from anomaly_core.image_term import image_descriptors
from anomaly_core.patches import add_position, aggregate_neighbours
from anomaly_core.tiling import cut_tiles, stitch_tiles


def split_tokens(tokens, *, config: ModelConfig):
    """Stitched backbone tokens [..., D * len(blocks) (+ D)] (numpy or torch) -> (the patch blocks' channels
    [..., D * len(blocks)], the global block's [..., D] or None without one): the layout normalised_tokens
    writes."""
    d = BACKBONES[config.backbone].dim * len(config.blocks)
    return tokens[..., :d], (tokens[..., d:] if config.global_block is not None else None)


def describe_tokens(tokens: np.ndarray, *, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Stitched backbone tokens [B, G*G, D * len(blocks) (+ D)] (FeatureExtractor.tokens) -> (descriptors
    [B, G*G, feature_dim] unit rows, foreground [B, G*G] bool), from the patch blocks' channels (a global
    block's follow them)."""
    g = config.grid_size
    tokens = split_tokens(tokens, config=config)[0]                                 # [B, G*G, D*nb]
    fg = (foreground_mask(tokens, grid=g) if config.foreground_mask
          else np.ones(tokens.shape[:2], dtype=bool))                               # [B, G*G]
    f = aggregate_neighbours(tokens, grid=g, size=config.neighbourhood)             # [B, G*G, D]
    return add_position(f, grid=g, weight=config.position_weight), fg


def describe_images(tokens: np.ndarray, *, config: ModelConfig) -> np.ndarray:
    """Stitched backbone tokens [B, G*G, D * len(blocks) + D] of a config with a global_block -> [B, D]
    float32 unit image descriptors (anomaly_core.image_term.image_descriptors of that block's channels,
    the last D)."""
    if config.global_block is None:
        raise ValueError("the config has no global_block: its tokens carry no image-level channels")
    return image_descriptors(split_tokens(tokens, config=config)[1])


class FeatureExtractor:
    """The backbone of a config, loaded once (Ray actors build one in __init__).

    Called on a decoded batch (anomaly_core.decode) it returns {"path", "error", "features" [B, P, D]
    float32, "foreground" [B, P] bool}, P = grid_size^2, and "image" [B, D_block] float32 (describe_images)
    when the config has a global_block; images pose-aligned first when the config says so ("copy",
    "width" and "height" are kept when the batch has them: augment_batch's copy index, the original size
    the fit records); unreadable rows keep their error, all-zero features and no foreground, so the fit
    job can report them and leave them out of the bank.
    """

    def __init__(self, *, config: ModelConfig, device: str = "auto", num_threads: int | None = None):
        self.config = config
        self.backbone = Backbone(name=config.backbone, weights=config.weights, image_size=config.image_size,
                                 blocks=config.blocks, global_block=config.global_block, device=device,
                                 num_threads=num_threads)

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8, S = input_size -> backbone tokens [B, G*G, D * len(blocks) (+ D)] float32, tiles
        stitched: the patch blocks' joint unit rows, then the global block's unit rows when the config has one."""
        cfg = self.config
        tiles = cut_tiles(pixels, tiles=cfg.tiles, tile_size=cfg.image_size,
                          stride=cfg.tile_stride)                                        # [B*T*T, s, s, 3]
        return stitch_tiles(self.backbone.patch_features(tiles), tiles=cfg.tiles, tile_grid=cfg.tile_grid,
                            overlap=cfg.tile_overlap)                                    # [B, G*G, D*nb (+ D)]

    def describe(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, S, S, 3] uint8 (already aligned if the config aligns) -> describe_tokens of its tokens:
        ([B, G*G, feature_dim], [B, G*G] bool)."""
        return describe_tokens(self.tokens(pixels), config=self.config)

    def describe_all(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """describe's two arrays and the image descriptors [B, D] (describe_images; None without a
        global_block), from one forward."""
        tokens = self.tokens(pixels)
        images = describe_images(tokens, config=self.config) if self.config.global_block is not None else None
        return *describe_tokens(tokens, config=self.config), images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        cfg = self.config
        if cfg.align is None:
            raise ValueError("align=None is chosen by the fit (anomaly_core.fit.aligned_config) before the "
                             "features; describe with a fitted model's config, or set align")
        p = cfg.grid_size ** 2
        feats = np.zeros((len(ok), p, cfg.feature_dim), dtype=np.float32)
        fg = np.zeros((len(ok), p), dtype=bool)
        images = np.zeros((len(ok), BACKBONES[cfg.backbone].dim), dtype=np.float32)
        if ok.any():
            px = batch["pixels"][ok]                                               # [b, S, S, 3]
            f, g, im = self.describe_all(align_images(px)[0] if cfg.align else px)
            feats[ok], fg[ok] = f, g
            if im is not None:
                images[ok] = im
        out = {"path": batch["path"], "error": batch["error"], "features": feats, "foreground": fg}
        if cfg.global_block is not None:
            out["image"] = images
        return out | {k: batch[k] for k in ("copy", "width", "height") if k in batch}


def augment_batch(batch: dict[str, np.ndarray], *, name: str, held: frozenset[str]) -> dict[str, np.ndarray]:
    """Decoded batch -> the same columns with each readable bank image followed by its augmented copies
    (anomaly_core.augment, same path) and a "copy" column [B'] int16 (0: the image itself, as read);
    held-out and unreadable rows stay single."""
    copies = np.where((batch["error"] == "") & np.array([str(p) not in held for p in batch["path"]]),
                      len(AUGMENTATIONS[name]), 1)                               # [B]
    out = {k: np.repeat(v, copies, axis=0) for k, v in batch.items() if k != "pixels"}
    out["copy"] = np.concatenate([np.arange(n, dtype=np.int16) for n in copies])     # [sum(copies)]
    pixels = []
    for i, n in enumerate(copies):
        px = batch["pixels"][i:i + 1]                                             # [1, S, S, 3]
        pixels.append(augment_images(px, name=name) if n > 1 else px)
    out["pixels"] = np.concatenate(pixels)                                        # [sum(copies), S, S, 3]
    return out
