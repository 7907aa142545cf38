"""Tiles at the backbone's native scale, stitched into one patch grid."""

import numpy as np
import pytest

from anomaly_core.backbone import PATCH_SIZE
from anomaly_core.config import ModelConfig
from anomaly_core.tiling import cut_tiles, stitch_tiles


def patch_means(images: np.ndarray) -> np.ndarray:
    """A 'backbone' that sees only its patch: [B, S, S, 3] -> [B, (S/14)^2, 3] mean colour per patch."""
    b, s = images.shape[:2]
    g = s // PATCH_SIZE
    x = images.reshape(b, g, PATCH_SIZE, g, PATCH_SIZE, 3).astype(np.float64)
    return x.mean(axis=(2, 4)).reshape(b, g * g, 3)


@pytest.mark.parametrize("tiles,overlap", [(2, 0), (2, 4), (3, 2), (3, 4)])
def test_stitched_tiles_of_a_local_feature_equal_the_feature_of_the_whole_image(rng, tiles, overlap):
    cfg = ModelConfig(image_size=112, tiles=tiles, tile_overlap=overlap)        # 8 x 8 patches a tile
    images = rng.integers(0, 256, (2, cfg.input_size, cfg.input_size, 3), dtype=np.uint8)
    parts = cut_tiles(images, tiles=tiles, tile_size=cfg.image_size, stride=cfg.tile_stride)
    assert parts.shape == (2 * tiles * tiles, 112, 112, 3)
    got = stitch_tiles(patch_means(parts), tiles=tiles, tile_grid=cfg.tile_grid, overlap=overlap)
    np.testing.assert_array_equal(got, patch_means(images))


def test_the_grid_grows_by_the_stride_per_tile():
    cfg = ModelConfig(image_size=224, tiles=2)                  # PatchCore's 28 x 28 feature map at 224 px
    assert (cfg.tile_grid, cfg.grid_size, cfg.input_size, cfg.tile_stride) == (16, 28, 392, 168)
    assert ModelConfig(image_size=224, tiles=4).input_size == 224 + 3 * 168


def test_each_stitched_token_comes_from_the_tile_whose_centre_is_nearest(rng):
    cfg = ModelConfig(image_size=112, tiles=2, tile_overlap=4)
    tokens = np.zeros((4, cfg.tile_grid ** 2, 1))
    for t in range(4):
        tokens[t] = t                                                          # tile id as the feature
    got = stitch_tiles(tokens, tiles=2, tile_grid=8, overlap=4)[0, :, 0].reshape(12, 12)
    assert (got[:6, :6] == 0).all() and (got[:6, 6:] == 1).all() and (got[6:, :6] == 2).all()
    assert (got[6:, 6:] == 3).all()


def test_cutting_an_image_of_the_wrong_size_says_which_size_is_needed(rng):
    with pytest.raises(ValueError, match="needs 196 px"):
        cut_tiles(np.zeros((1, 200, 200, 3), np.uint8), tiles=2, tile_size=112, stride=84)


@pytest.mark.parametrize("kw,msg", [({"tiles": 0}, "tiles=0"), ({"tiles": 2, "tile_overlap": 3}, "even"),
                                    ({"tiles": 2, "image_size": 56, "tile_overlap": 4}, r"\[0, 4\)")])
def test_bad_tiling_is_refused_with_the_valid_range(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_the_extractor_stitches_real_backbone_tokens_and_maps_cover_the_input(rng):
    """Tokens of tile (0, 0)'s own region are the tokens of that tile fed alone; maps are input_size."""
    from anomaly_core.backbone import Backbone
    from anomaly_core.features import FeatureExtractor
    from anomaly_core.index import MemoryBank
    from anomaly_core.scoring import anomaly_maps, image_scores, patch_distances
    # 4x4 a tile, 6x6 stitched; top_fraction given: scored without a fit
    cfg = ModelConfig(image_size=56, blocks=(3,), tiles=2, tile_overlap=2, top_fraction=0.01)
    px = rng.integers(0, 256, (2, cfg.input_size, cfg.input_size, 3), dtype=np.uint8)
    ex = FeatureExtractor(config=cfg, device="cpu")
    tok = ex.tokens(px).reshape(2, 6, 6, -1)
    alone = Backbone(name=cfg.backbone, weights=cfg.weights, image_size=56, blocks=(3,), device="cpu")
    ref = alone.patch_features(px[:, :56, :56]).reshape(2, 4, 4, -1)
    np.testing.assert_allclose(tok[:, :3, :3], ref[:, :3, :3], atol=1e-5)
    feats, fg = ex.describe(px)
    bank = MemoryBank.build(feats[0], kind="flat", shard_size=1 << 20, seed=0, nprobe=1, ef_search=16)
    dist = patch_distances(feats, bank, foreground=fg)                             # [2, 36]
    scores = image_scores(dist.reshape(2, 6, 6), **cfg.score_options)
    maps = anomaly_maps(dist.reshape(2, 6, 6), out_size=cfg.input_size, sigma=cfg.map_sigma)
    assert maps.shape == (2, cfg.input_size, cfg.input_size) and scores[0] < scores[1]
