"""The written Parquet, anomaly_core.schema and docs/schema.md say the same thing."""

import glob
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_core import decode_heatmap
from anomaly_core.schema import (
    COLUMNS,
    HEATMAP_COLUMNS,
    METADATA_KEY,
    PARTITION_COLUMN,
    SCHEMA_VERSION,
    markdown_table,
    output_schema,
)
from anomaly_core.scoring import encode_heatmap_png
from jobs.analyst import connect, fetch

DOC = Path(__file__).parents[1] / "docs" / "schema.md"


def test_documentation_table_is_the_schema():
    text = DOC.read_text()
    table = re.search(r"<!-- table:[^>]*-->\n(.*?)\n<!-- end table -->", text, re.S).group(1)
    assert table == markdown_table(), "docs/schema.md is stale: paste anomaly_core.schema.markdown_table()"
    assert f"version {SCHEMA_VERSION}" in text


@pytest.mark.integration
def test_written_files_match_the_schema_and_carry_its_version(nightly_output):
    out, _ = nightly_output
    files = glob.glob(f"{out}/**/*.parquet", recursive=True)
    assert files
    for f in files:
        written = pq.read_schema(f)
        assert written.metadata[METADATA_KEY].decode() == SCHEMA_VERSION
        assert [(x.name, x.type) for x in written] == [(x.name, x.type) for x in output_schema()]
        assert Path(f).parent.name.startswith(f"{PARTITION_COLUMN}=")


def test_every_column_is_documented_with_a_meaning():
    assert all(meaning for *_, meaning in COLUMNS)
    assert len({name for name, *_ in COLUMNS}) == len(COLUMNS)


# Columns of schema version 1, in its order: the heatmap was a PNG and its value range.
VERSION_1 = ["uri", "content_sha256", "width", "height", "product", "line", "status", "error", "score",
             "score_normalised", "verdict", "threshold", "heatmap_png", "heatmap_min", "heatmap_max", "peak_x",
             "peak_y", "model_id", "model_created_at", "run_id", "run_time"]


def write_version_1_output(out: Path, heat: np.ndarray) -> None:
    """A published run as version 1 wrote it: one ok row and one error row."""
    png, lo, hi = encode_heatmap_png(heat)
    values = {"uri": ["a.png", "b.png"], "status": ["ok", "error"], "heatmap_png": [png, None],
              "heatmap_min": [lo, None], "heatmap_max": [hi, None], "run_id": ["r1", "r1"]}
    fields = [output_schema().field(n) for n in VERSION_1]
    table = pa.table({f.name: pa.array(values.get(f.name, [None, None]), f.type) for f in fields},
                     schema=pa.schema(fields, metadata={METADATA_KEY: b"1"}))
    (out / "run_date=2026-11-20").mkdir(parents=True)
    pq.write_table(table, out / "run_date=2026-11-20" / f"r1-{'0' * 32}.parquet")
    (out / "_runs").mkdir()
    (out / "_runs" / "r1.json").write_text(json.dumps({"run_id": "r1"}))


def test_version_1_output_still_reads_its_png_heatmaps(tmp_path):
    heat = np.linspace(0.1, 0.5, 36 * 36, dtype=np.float32).reshape(36, 36)
    write_version_1_output(tmp_path, heat)
    ok, error = fetch(connect(str(tmp_path)), f"SELECT uri, status, {', '.join(HEATMAP_COLUMNS)} FROM scores "
                                              "ORDER BY uri")
    assert ok["heatmap_grid"] is None and ok["heatmap_png"] is not None
    np.testing.assert_allclose(decode_heatmap(ok), heat, atol=0.4 / 510 + 1e-6)
    with pytest.raises(ValueError, match="could not be scored"):
        decode_heatmap(error)
