"""The output contract: one row per scored image. docs/schema.md documents it column by column and a
test fails when the two, or a written file, drift apart. Bump SCHEMA_VERSION on any change."""

from __future__ import annotations

import pyarrow as pa

# 2: the heatmap is stored as its patch-distance grid (heatmap_grid, heatmap_size, heatmap_sigma,
#    heatmap_pose); the PNG columns of version 1 stay, null unless the score job is asked for them.
# 3: image_term_score, the image-level term of models fitted with --global-block (NaN otherwise).
SCHEMA_VERSION = "3"
METADATA_KEY = b"anomaly.schema_version"

# (name, type, unit, meaning); the order is the column order in the files.
COLUMNS = [
    ("uri", pa.string(), "", "the image file (local path or URI)"),
    ("content_sha256", pa.string(), "hex", "sha256 of the file's bytes"),
    ("width", pa.int32(), "px", "original width (0 when unreadable)"),
    ("height", pa.int32(), "px", "original height (0 when unreadable)"),
    ("product", pa.string(), "", "value of a `product=...` folder in the path, else empty"),
    ("line", pa.string(), "", "value of a `line=...` folder in the path, else empty"),
    ("status", pa.string(), "", "`ok`, `warning` (scored, but an image the model was not fitted for) or `error`"),
    ("error", pa.string(), "", "why the image could not be scored, or the reason for a warning; empty when ok"),
    ("score", pa.float32(), "cosine distance", "image anomaly score; NaN on error"),
    ("score_normalised", pa.float32(), "", "0 = mean calibration (normal) image score, 1 = the threshold"),
    ("verdict", pa.string(), "",
     "`anomalous` (score >= threshold), `normal`, `review` (status warning: no verdict) or `error`"),
    ("threshold", pa.float32(), "cosine distance", "the model's calibrated threshold"),
    ("image_term_score", pa.float32(), "cosine distance",
     "the image-level term in score units (models fitted with --global-block; NaN otherwise): the score is the "
     "larger of it and the patch score, so a score equal to it was set by the whole image, not by a patch"),
    ("heatmap_grid", pa.binary(), "float16 cosine distance",
     "patch distances, G x G float16 little-endian, row-major (2 G^2 bytes); null on error"),
    ("heatmap_size", pa.int32(), "px", "side S of the map rebuilt from the grid (the input size); 0 on error"),
    ("heatmap_sigma", pa.float32(), "px", "Gaussian sigma of that map's smoothing; NaN on error"),
    ("heatmap_pose", pa.list_(pa.float32()), "px, px, rad",
     "(row, column, angle) of the pose the grid was scored in (models fitted with --align), else null"),
    ("heatmap_png", pa.binary(), "PNG",
     "8-bit grayscale anomaly map, S x S; null unless scored with --heatmap-png (always set in version 1)"),
    ("heatmap_min", pa.float32(), "cosine distance", "score at PNG value 0; NaN without heatmap_png"),
    ("heatmap_max", pa.float32(), "cosine distance", "score at PNG value 255; NaN without heatmap_png"),
    ("peak_x", pa.int32(), "px", "column of the strongest point, original image pixels (-1 on error)"),
    ("peak_y", pa.int32(), "px", "row of the strongest point, original image pixels (-1 on error)"),
    ("model_id", pa.string(), "", "content hash of the model that scored the image"),
    ("model_created_at", pa.string(), "ISO 8601 UTC", "when that model was fitted"),
    ("run_id", pa.string(), "", "the audit run (derived from archive, model and date; a resumed run keeps it)"),
    ("run_time", pa.string(), "ISO 8601 UTC", "when the attempt that scored this row started"),
    ("run_date", pa.string(), "YYYY-MM-DD", "audit date; the Hive partition key (a folder, not a column in the file)"),
]

PARTITION_COLUMN = "run_date"
# What anomaly_core.decode_heatmap reads from a row.
HEATMAP_COLUMNS = ("heatmap_grid", "heatmap_size", "heatmap_sigma", "heatmap_pose", "heatmap_png", "heatmap_min",
                   "heatmap_max")


def output_schema(*, include_partition: bool = False) -> pa.Schema:
    """Arrow schema of the files (without the partition column unless asked), carrying the version."""
    fields = [pa.field(n, t) for n, t, _, _ in COLUMNS if include_partition or n != PARTITION_COLUMN]
    return pa.schema(fields, metadata={METADATA_KEY: SCHEMA_VERSION.encode()})


def markdown_table() -> str:
    """The documentation table (docs/schema.md embeds exactly this)."""
    rows = ["| column | type | unit | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| {n} | `{t}` | {u} | {m} |" for n, t, u, m in COLUMNS]
    return "\n".join(rows)
