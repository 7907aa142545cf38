"""High-resolution images as a grid of overlapping tiles at the backbone's native scale.

An image resized to `input_size` px is cut into tiles x tiles squares of `tile_size` px whose origins are
`stride` px apart (stride = tile_size - overlap). Every tile goes through the backbone at the size it was
trained for, so a patch keeps its 14 px footprint however large the image; cost grows with the area
(tiles^2 forwards), not with the square of the token count as one big forward would.

The tiles' patch tokens are stitched into one grid: where tiles overlap, each tile keeps the half of the
overlap nearer its own centre, so no kept token sat within overlap/2 patches of a cut edge (where the ViT
saw truncated context) unless that edge is the image's own border. Everything downstream (neighbourhood
aggregation, position code, search, maps) then works on the stitched grid as on one image.
"""

from __future__ import annotations

import numpy as np


def tile_origins(*, tiles: int, tile_grid: int, overlap: int) -> np.ndarray:
    """[tiles] int: first patch row (or column) of each tile in the stitched grid."""
    return np.arange(tiles) * (tile_grid - overlap)


def cut_tiles(images: np.ndarray, *, tiles: int, tile_size: int, stride: int) -> np.ndarray:
    """images: [B, S, S, C] (S = tile_size + (tiles - 1) * stride) -> [B * tiles^2, tile_size, tile_size, C],
    tiles of one image consecutive, row-major."""
    b, s = images.shape[:2]
    if s != tile_size + (tiles - 1) * stride:
        raise ValueError(f"images of {s} px cannot be cut into {tiles}x{tiles} tiles of {tile_size} px "
                         f"every {stride} px (needs {tile_size + (tiles - 1) * stride} px)")
    if tiles == 1:
        return images
    out = [images[:, r * stride:r * stride + tile_size, c * stride:c * stride + tile_size]
           for r in range(tiles) for c in range(tiles)]                      # tiles^2 x [B, s, s, C]
    return np.stack(out, axis=1).reshape(b * tiles * tiles, tile_size, tile_size, *images.shape[3:])


def stitch_tiles(tokens: np.ndarray, *, tiles: int, tile_grid: int, overlap: int) -> np.ndarray:
    """Tile tokens [B * tiles^2, g*g, D] (cut_tiles' order, g = tile_grid) -> [B, G*G, D],
    G = g + (tiles - 1) * (g - overlap). Each stitched patch comes from the tile whose centre is nearest."""
    if tiles == 1:
        return tokens
    n, p, d = tokens.shape
    g = tile_grid
    assert p == g * g and n % (tiles * tiles) == 0 and overlap % 2 == 0, (tokens.shape, tiles, g, overlap)
    b = n // (tiles * tiles)
    big = g + (tiles - 1) * (g - overlap)
    t = tokens.reshape(b, tiles, tiles, g, g, d)                              # [B, T, T, g, g, D]
    out = np.empty((b, big, big, d), dtype=tokens.dtype)                      # [B, G, G, D]
    spans = _owned(tiles=tiles, tile_grid=g, overlap=overlap)
    for r, (r0, r1, o_r) in enumerate(spans):
        for c, (c0, c1, o_c) in enumerate(spans):
            out[:, r0:r1, c0:c1] = t[:, r, c, r0 - o_r:r1 - o_r, c0 - o_c:c1 - o_c]
    return out.reshape(b, big * big, d)


def _owned(*, tiles: int, tile_grid: int, overlap: int) -> list[tuple[int, int, int]]:
    """(first, end, origin) of the stitched rows each tile supplies: its span less half the overlap on
    every side shared with a neighbour; consecutive spans meet exactly."""
    half = overlap // 2
    return [(int(o) + (half if i > 0 else 0), int(o) + tile_grid - (half if i < tiles - 1 else 0), int(o))
            for i, o in enumerate(tile_origins(tiles=tiles, tile_grid=tile_grid, overlap=overlap))]
