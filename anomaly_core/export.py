"""A fitted model as one self-contained ONNX graph, for runtimes without Python (line-side inspection).

Contract of the graph (docs/export.md):

    input   image  [N, S, S, 3] uint8 RGB, S = config.input_size, already resized to S x S with
                   anomaly_core.images.resize_square (PIL bilinear with antialiasing, whole frame, no crop)
    outputs score  [N] float32        the image score, as the Parquet `score` column
            grid   [N, G, G] float32  cosine distance of each patch to its nearest bank entry, G = grid_size
            map    [N, S, S] float32  the anomaly map (anomaly_core.scoring.anomaly_maps of the grid)

The graph holds the steps `Model.score` runs: the backbone over the tiles and their stitching, the
descriptor steps the config enables (neighbourhood aggregation, position code), exact cosine 1-NN against
the bank (a constant [M, D]: one matrix product and a maximum), the image-score reduction, the image-level
term of a model fitted with one (anomaly_core.image_term) and the map smoothing. The threshold, model id
and the facts a caller needs (input size, grid, resize) are in the graph's metadata_props. Options the
graph cannot express are refused, never dropped (exportable).

Where the library's step is numpy, the graph uses an equivalent torch step defined here and tested
against it (tests/test_export.py): tile cutting and stitching as gathers whose indices come from the
library's own numpy functions, the neighbourhood average as two matrix products, the image-score
reduction, and the 1-NN as one matrix product against the whole bank.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from anomaly_core.backbone import normalised_tokens
from anomaly_core.config import ModelConfig
from anomaly_core.features import split_tokens
from anomaly_core.image_term import LOG_FLOOR, ImageTerm
from anomaly_core.index import MemoryBank
from anomaly_core.patches import position_code
from anomaly_core.scoring import reduce_grids, smoothing_matrix, upsampling_matrix
from anomaly_core.tiling import cut_tiles, stitch_tiles

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "grid", "map")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# LayerNormalization is a standard op from opset 17; the TorchScript exporter writes opsets up to 20.
DEFAULT_OPSET = 17
MIN_OPSET = 14
# A protobuf message (an .onnx file read whole) cannot exceed 2 GiB: above this many bytes of tensors the
# graph is written with its tensors in one external data file beside it (OUT.onnx.data).
PROTOBUF_LIMIT = 2 ** 31 - 1
# Leave room for the graph's nodes and metadata below the protobuf limit.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - (64 << 20)


def exportable(config: ModelConfig, bank: MemoryBank) -> None:
    """Raise ValueError naming every option of this model that the graph cannot express (and what to do)."""
    problems = []
    if config.align:
        problems.append("align=True turns each image by a pose estimated from its own edges (PCA, "
                        "anomaly_core.align) and warps the map back: a data-dependent warp the graph does not "
                        "hold; fit with --no-align to export")
    if config.foreground_mask:
        problems.append("foreground_mask=True splits each image's patches by Otsu's threshold on its own first "
                        "principal component and then dilates and closes the mask (anomaly_core.foreground): "
                        "a per-image histogram threshold the graph does not hold; fit with "
                        "--no-foreground-mask to export")
    if bank.kind == "ivfpq":
        problems.append("index='ivfpq' stores the bank as product-quantised codes, so its vectors cannot be "
                        "recovered exactly for the graph's exact search; refit with --index flat (or hnsw / "
                        "ivf, whose vectors are stored whole)")
    if problems:
        raise ValueError("this model cannot be exported as one ONNX graph: " + "; ".join(problems))


def bank_vectors(bank: MemoryBank) -> np.ndarray:
    """The bank's vectors [M, D] float32 unit rows, shards in order (MemoryBank.vectors), for the graph's
    exact search; an ivfpq bank is refused (its codes are not the vectors it was fitted on). The order
    within a shard does not matter to the graph's maximum."""
    if bank.kind == "ivfpq":
        raise ValueError(f"index kind {bank.kind!r}: its vectors are not stored whole; refit with --index flat")
    return np.ascontiguousarray(bank.vectors(), dtype=np.float32)                       # [M, D]


def tile_index(config: ModelConfig) -> np.ndarray:
    """[T*T * s*s] int64: for each pixel of cut_tiles' output of one image (tiles row-major, each s x s),
    its index in the image's S*S pixels: cut_tiles itself applied to the pixel numbers."""
    s = config.input_size
    numbers = np.arange(s * s, dtype=np.int64).reshape(1, s, s)
    return cut_tiles(numbers, tiles=config.tiles, tile_size=config.image_size, stride=config.tile_stride).reshape(-1)


def stitch_index(config: ModelConfig) -> np.ndarray:
    """[G*G] int64: for each patch of the stitched grid, its index among one image's T*T * g*g tile tokens
    (cut_tiles' order): stitch_tiles itself applied to the token numbers."""
    t, g = config.tiles, config.tile_grid
    numbers = np.arange(t * t * g * g, dtype=np.int64).reshape(t * t, g * g, 1)
    return stitch_tiles(numbers, tiles=t, tile_grid=g, overlap=config.tile_overlap).reshape(-1)


def neighbourhood_matrix(grid: int, size: int) -> np.ndarray:
    """[G, G] float32 R such that R @ x is x averaged over `size` neighbours along one axis, borders by
    reflection: the 1-D step of anomaly_core.patches.aggregate_neighbours (uniform_filter, mode="reflect"),
    which is separable, so the 2-D average is R @ x @ R^T on each channel."""
    return ndimage.uniform_filter1d(np.eye(grid, dtype=np.float64), size=size, axis=0,
                                    mode="reflect").astype(np.float32)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Exact cosine 1-NN: queries [..., D] and bank [M, D] unit rows (same dtype) -> [...] float32 distance
    1 - max similarity, clipped to [0, 2] as anomaly_core.index.faiss_search does."""
    sim = torch.matmul(queries, bank.T).amax(dim=-1).float()                        # [...]
    return (1.0 - sim).clamp(0.0, 2.0)


class ScoringGraph(torch.nn.Module):
    """Model.score as one torch module that traces to ONNX: image [N, S, S, 3] uint8 -> (score [N],
    grid [N, G, G], map [N, S, S]), all float32. vit: the truncated timm ViT (anomaly_core.backbone), in
    `dtype`; bank: [M, D] float32 unit rows, stored in `dtype`; image_term: the model's (config.global_block),
    whose image vectors stay float32 whatever `dtype` (nearest-image distances of about 1e-3 are below
    float16's resolution of a cosine near 1)."""

    def __init__(self, *, vit: torch.nn.Module, bank: np.ndarray, config: ModelConfig, dtype: torch.dtype,
                 image_term: ImageTerm | None = None):
        super().__init__()
        if (config.global_block is None) != (image_term is None):
            raise ValueError(f"global_block={config.global_block} needs the model's image term, and only it has one")
        self.config, self.vit, self.blocks = config, vit, tuple(config.blocks)
        self.image_term = image_term
        if image_term is not None:
            self.register_buffer("image_vectors", torch.from_numpy(image_term.vectors).float())
        self.register_buffer("tile_index", torch.from_numpy(tile_index(config)))
        self.register_buffer("stitch_index", torch.from_numpy(stitch_index(config)))
        g = config.grid_size
        self.register_buffer("neighbours", torch.from_numpy(neighbourhood_matrix(g, config.neighbourhood)))
        w = config.position_weight
        # add_position: [feature, sqrt(w) * code] / sqrt(1 + w), the code a constant [G*G, 4]
        self.register_buffer("position", torch.from_numpy(np.sqrt(w) * position_code(g)))
        self.register_buffer("bank", torch.from_numpy(bank).to(dtype))
        # the linear operators of anomaly_core.scoring, built here so the graph holds them as constants:
        # the grid's smoothing (smooth_map) and the map's upsampling then smoothing (anomaly_maps: A @ grid @ A^T)
        self.register_buffer("grid_smoothing", smoothing_matrix(g, config.score_sigma).float())
        self.register_buffer("map_operator", (smoothing_matrix(config.input_size, config.map_sigma)
                                              @ upsampling_matrix(config.input_size, g)).float())

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[N, S, S, 3] uint8 -> stitched backbone tokens [N, G*G, D] float32 unit rows
        (FeatureExtractor.tokens: tiles cut and stitched by gathers of cut_tiles' and stitch_tiles' indices)."""
        cfg = self.config
        n, s, t = image.shape[0], cfg.image_size, cfg.tiles
        tiles = image.reshape(n, -1, 3)[:, self.tile_index].reshape(n * t * t, s, s, 3)
        tokens = normalised_tokens(self.vit, tiles, blocks=self.blocks,
                                   global_block=cfg.global_block)                    # [N*T*T, g*g, D (+ D')]
        return tokens.reshape(n, -1, tokens.shape[-1])[:, self.stitch_index]       # [N, G*G, D (+ D')]

    def describe(self, tokens: torch.Tensor) -> torch.Tensor:
        """Stitched tokens [N, G*G, D] unit rows -> descriptors [N, G*G, feature_dim] unit rows
        (anomaly_core.features.describe_tokens without the foreground mask, which exportable refuses)."""
        cfg = self.config
        f = split_tokens(tokens, config=cfg)[0]                                      # the patch blocks' channels
        n, g, d = f.shape[0], cfg.grid_size, f.shape[-1]
        if cfg.neighbourhood > 1:                  # aggregate_neighbours: R @ x @ R^T on each channel
            r = self.neighbours
            f = torch.matmul(r, f.reshape(n, g, g * d)).reshape(n, g, g, d)         # rows averaged
            f = torch.matmul(r, f.transpose(1, 2).reshape(n, g, g * d))             # columns: [N, G(c), G(r)*D]
            f = torch.nn.functional.normalize(f.reshape(n, g, g, d).transpose(1, 2).reshape(n, g * g, d), dim=-1)
        if cfg.position_weight:                    # add_position: [f, sqrt(w) * code] / sqrt(1 + w)
            f = torch.cat([f, self.position.expand(n, -1, -1)], dim=-1) / math.sqrt(1.0 + cfg.position_weight)
        return f

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        n, g = image.shape[0], cfg.grid_size
        tokens = self.tokens(image)                                                 # [N, G*G, D (+ D')]
        f = self.describe(tokens)                                                   # [N, G*G, D]
        grid = nearest_distance(f.to(self.bank.dtype), self.bank).reshape(n, g, g)  # [N, G, G] float32
        score = reduce_grids(grid, reduction=cfg.reduction, top_fraction=cfg.top_fraction,
                             smoothing=self.grid_smoothing)                   # [N]
        if self.image_term is not None:
            score = self.combined(score, split_tokens(tokens, config=cfg)[1].float())
        a = self.map_operator                                                       # [S, G]
        amap = a @ grid @ a.T                                                       # [N, S, S]
        return score, grid, amap

    def combined(self, score: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Model.score's image term in torch: patch scores [N] and the global block's unit tokens
        [N, G*G, D'] -> [N] combined scores (image_descriptors, their nearest-image distance,
        ImageTerm.combine)."""
        t = self.image_term
        desc = torch.nn.functional.normalize(image_tokens.mean(dim=1), dim=-1)            # [N, D']
        dist = nearest_distance(desc, self.image_vectors)                                 # [N]
        zi = (torch.log(dist.clamp_min(LOG_FLOOR)) - t.image_log_mean) / t.image_log_std
        return torch.maximum(score, torch.exp(t.patch_log_mean + t.patch_log_std * zi))       # in_score_units


@dataclass(frozen=True)
class ExportResult:
    path: str                  # the .onnx file
    external_data: str | None  # the tensors' file beside it, when the graph exceeds the protobuf limit
    bytes: int                 # size on disk, both files
    bank_size: int
    metadata: dict


def graph_metadata(*, config: ModelConfig, manifest: dict, dtype: str, opset: int) -> dict[str, str]:
    """metadata_props of the graph: everything a caller needs besides the tensors, as strings."""
    cal = manifest["calibration"]
    return {
        "model_id": manifest["model_id"],
        "threshold": repr(float(cal["threshold"])),
        "normal_mean": repr(float(cal["normal_mean"])),
        "input_size": str(config.input_size),
        "grid_size": str(config.grid_size),
        "resize": "anomaly_core.images.resize_square: whole frame to input_size x input_size RGB, PIL bilinear "
                  "with antialiasing (Image.resize(..., Image.BILINEAR)), no crop",
        "verdict": "anomalous when score >= threshold",
        "score_normalised": "(score - normal_mean) / (threshold - normal_mean)",
        "reduction": config.reduction,
        "dtype": dtype,
        "opset": str(opset),
    }


def export_model(model, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> ExportResult:
    """Write `model` (anomaly_core.model.Model, saved or loaded: it needs its id) as one ONNX graph at `out`.

    dtype "fp16" stores the backbone and the bank in float16 and runs them so (the descriptors are
    normalised, and everything after the search reduced, in float32); the input and outputs are the same.
    When the tensors exceed external_data_threshold bytes (default: just under protobuf's 2 GiB) they go
    to one file `out` + ".data" beside the graph, which runtimes read from the graph's folder.
    """
    import onnx

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset} is too old for this graph; use {MIN_OPSET} or later (default {DEFAULT_OPSET})")
    if model.manifest is None:
        raise ValueError("the model has no id until it is saved; save it (Model.save) or load it from its folder")
    cfg = model.config
    exportable(cfg, model.bank)
    if model.bank.kind != "flat":
        log.warning("bank index %s: the graph searches its %d vectors exactly, so its distances are at most the "
                    "library's approximate ones (equal wherever that search found the true nearest entry)",
                    model.bank.kind, model.bank.size)
    vit = copy.deepcopy(model.backbone(device="cpu").backbone.model).to(DTYPES[dtype])
    bank = bank_vectors(model.bank)
    graph = ScoringGraph(vit=vit, bank=bank, config=cfg, dtype=DTYPES[dtype],
                         image_term=model.stats.image_term).eval()
    s = cfg.input_size
    example = torch.zeros((1, s, s, 3), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns of every Python value it freezes (shapes, the normalisation constants):
            # all are fixed by the config, which is what the graph is for
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, (example,), str(raw), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={INPUT_NAME: {0: "N"}, **{k: {0: "N"} for k in OUTPUT_NAMES}})
        proto = onnx.load(str(raw))                                  # external tensors, if any, read back in
    meta = graph_metadata(config=cfg, manifest=model.manifest, dtype=dtype, opset=opset)
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"anomaly-audit model {meta['model_id']}: image [N, {s}, {s}, 3] uint8 RGB -> score [N], "
                        f"grid [N, {cfg.grid_size}, {cfg.grid_size}], map [N, {s}, {s}] float32")
    return _save(proto, out, external_data_threshold=external_data_threshold, bank_size=len(bank), meta=meta)


def _tensor_bytes(proto) -> int:
    """Bytes of the graph's constant tensors: initializers and Constant nodes' values."""
    n = sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)
    return n + sum(a.t.ByteSize() for node in proto.graph.node for a in node.attribute if a.HasField("t"))


def _save(proto, out: Path, *, external_data_threshold: int, bank_size: int, meta: dict) -> ExportResult:
    """Write the graph to a temporary name beside `out` and rename it into place (a half-written graph is
    never at `out`); its tensors in `out`.data when they exceed the threshold."""
    import onnx

    data = out.with_name(out.name + ".data")
    external = _tensor_bytes(proto) > external_data_threshold
    tmp = out.with_name(f".{out.name}.tmp")
    if external:
        log.info("graph tensors exceed %d bytes: writing them to %s beside the graph", external_data_threshold, data)
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(tmp))
        data.unlink(missing_ok=True)
    os.replace(tmp, out)
    size = out.stat().st_size + (data.stat().st_size if external else 0)
    return ExportResult(path=str(out), external_data=str(data) if external else None, bytes=size,
                        bank_size=bank_size, metadata=meta)
