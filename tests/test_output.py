"""jobs/output.py without Ray: staged commits, names, publishing, what readers see."""

import numpy as np
import pyarrow as pa
import pytest

from anomaly_core import storage
from anomaly_core.schema import output_schema
from jobs import output
from jobs.analyst import connect


def rows(uris, *, run_id="r1", run_date="2026-11-22", errors=False) -> pa.Table:
    """A block as the Scorer emits it (errors=True: every image unreadable, heatmaps all null)."""
    n = len(uris)
    cols = {}
    for f in output_schema(include_partition=True):
        if pa.types.is_string(f.type):
            cols[f.name] = pa.array([""] * n, pa.string())
        elif pa.types.is_binary(f.type):
            cols[f.name] = pa.nulls(n) if errors else pa.array([b"png"] * n, pa.binary())
        else:
            cols[f.name] = pa.array(np.zeros(n), f.type)
    cols.update(uri=pa.array(uris), run_id=pa.array([run_id] * n), run_date=pa.array([run_date] * n),
                status=pa.array(["error" if errors else "ok"] * n),
                verdict=pa.array(["error" if errors else "normal"] * n))
    return pa.table(cols)


def test_a_block_of_only_unreadable_images_is_written_beside_normal_ones(tmp_path):
    sink = output.StagedParquetSink(str(tmp_path), "r1", rows_per_file=10)
    assert rows(["/a/bad.png"], errors=True).schema.field("heatmap_png").type == pa.null()
    assert sink.write([rows(["/a/1.png", "/a/2.png"]), rows(["/a/bad.png"], errors=True)], None) == 3
    assert output.committed_uris(str(tmp_path), "r1", "2026-11-22") == {"/a/1.png", "/a/2.png", "/a/bad.png"}


def test_files_are_named_by_their_images_so_a_retried_write_replaces_itself(tmp_path):
    sink = output.StagedParquetSink(str(tmp_path), "r1", rows_per_file=2)
    for _ in range(2):                                      # Ray re-running a write task after a crash
        sink.write([rows([f"/a/{i}.png" for i in range(5)])], None)
    assert len(storage.list_files(output.staging_uri(str(tmp_path), "r1"))) == 3
    committed = output.read_run(str(tmp_path), "r1", "2026-11-22", output.COUNT_COLUMNS)
    assert output.count_rows(committed)["duplicates"] == 0


def test_readers_see_a_run_only_once_its_summary_exists(tmp_path):
    out = str(tmp_path)
    output.StagedParquetSink(out, "r1", rows_per_file=10).write([rows(["/a/1.png"])], None)
    output.publish(out, "r1", "2026-11-22")
    assert connect(out).execute("SELECT count(*) FROM scores").fetchone() == (0,)
    output.write_summary(out, "r1", {"images": 1})
    assert connect(out).execute("SELECT uri, CAST(run_date AS VARCHAR) FROM scores").fetchall() == [
        ("/a/1.png", "2026-11-22")]
    assert not storage.exists(output.staging_uri(out, "r1"))


def test_a_run_never_claims_the_files_of_a_run_whose_id_it_prefixes(tmp_path):
    out = str(tmp_path)
    for run_id, uri in (("nightly", "/a/1.png"), ("nightly-2", "/a/2.png")):
        output.StagedParquetSink(out, run_id, rows_per_file=10).write([rows([uri], run_id=run_id)], None)
        output.publish(out, run_id, "2026-11-22")
    assert output.committed_uris(out, "nightly", "2026-11-22") == {"/a/1.png"}


@pytest.mark.parametrize("bad", ["", "_hidden", ".dot", "a/b", "x" * 200, "spaces here"])
def test_run_ids_that_would_hide_or_nest_files_are_refused(bad):
    with pytest.raises(ValueError, match="use letters, digits"):
        output.check_run_id(bad)
