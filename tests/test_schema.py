"""The written Parquet, anomaly_core.schema and docs/schema.md say the same thing."""

import glob
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from anomaly_core.schema import COLUMNS, METADATA_KEY, PARTITION_COLUMN, SCHEMA_VERSION, markdown_table, output_schema

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
