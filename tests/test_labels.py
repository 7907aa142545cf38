"""jobs.labels: reviewers' labels appended under OUT/_labels, the latest in force, nothing lost when many
writers append at once (local disk and a real S3 server)."""

import datetime as dt
import hashlib
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from anomaly_core import storage
from anomaly_core.storage import StorageOptions
from jobs.labels import (
    LABEL_SCHEMA,
    REVIEWER_ENV,
    LabelCache,
    append_labels,
    labels_dataset,
    labels_uri,
    read_labels,
    reviewer_name,
)
from tests.helpers import make_bucket


def sha(i) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def label(i, value="normal", comment=None) -> dict:
    return {"content_sha256": sha(i), "uri": f"/archive/img_{i}.png", "label": value, "comment": comment}


T0 = dt.datetime(2026, 11, 22, 6, 30, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "scores"), None
    make_bucket(request.getfixturevalue("s3_server").url, "label-tests")
    opts = StorageOptions(endpoint_url=request.getfixturevalue("s3_server").url, max_attempts=2)
    return f"s3://label-tests/{request.node.name.replace('[', '-').rstrip(']')}", opts


def test_a_write_is_one_parquet_file_with_the_label_schema(out):
    uri, opts = out
    written = append_labels(uri, [label(1, "defect", "scratch"), label(2)], reviewer="ana", options=opts,
                            now=T0)
    assert written.startswith(labels_uri(uri) + "/") and storage.list_files(labels_uri(uri), opts) == [written]
    fs, path = storage.filesystem(written, opts)
    table = pq.read_table(path, filesystem=fs)
    assert table.schema.equals(LABEL_SCHEMA)
    assert table.to_pylist()[0] == {**label(1, "defect", "scratch"), "reviewer": "ana", "labelled_at": T0}


def test_a_later_label_supersedes_an_earlier_one(out):
    uri, opts = out
    append_labels(uri, [label(1, "defect"), label(2, "defect")], reviewer="ana", options=opts, now=T0)
    append_labels(uri, [label(1, "normal", "new supplier")], reviewer="ben", options=opts,
                  now=T0 + dt.timedelta(microseconds=1))
    rows = {r["content_sha256"]: r for r in read_labels(uri, options=opts).to_pylist()}
    assert {k: (r["label"], r["reviewer"], r["comment"]) for k, r in rows.items()} == {
        sha(1): ("normal", "ben", "new supplier"), sha(2): ("defect", "ana", None)}


def test_an_older_label_written_later_does_not_supersede(tmp_path):
    append_labels(str(tmp_path), [label(1, "normal")], reviewer="ana", now=T0 + dt.timedelta(hours=1))
    append_labels(str(tmp_path), [label(1, "defect")], reviewer="ben", now=T0)
    assert read_labels(str(tmp_path))["label"].to_pylist() == ["normal"]


def test_labels_of_the_same_instant_resolve_the_same_way_whatever_the_files(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    append_labels(a, [label(1, "defect")], reviewer="ana", now=T0)
    append_labels(a, [label(1, "normal")], reviewer="ana", now=T0)
    append_labels(b, [label(1, "normal"), label(1, "defect")], reviewer="ana", now=T0)   # one file, other order
    assert read_labels(a).to_pylist() == read_labels(b).to_pylist()
    assert read_labels(a)["label"].to_pylist() == ["normal"]                          # label DESC: the tie-break


def test_no_labels_is_an_empty_table_with_the_schema(tmp_path):
    table = read_labels(str(tmp_path / "never-labelled"))
    assert table.num_rows == 0 and table.schema.equals(LABEL_SCHEMA)


def test_the_cache_holds_every_label_and_reads_each_file_once(tmp_path):
    out = str(tmp_path)
    cache = LabelCache(out)
    first = append_labels(out, [label(1)], reviewer="ana", now=T0)
    assert cache.table()["content_sha256"].to_pylist() == [sha(1)]
    with open(first, "wb") as f:                   # a file read before is not read again
        f.write(b"not parquet any more")
    append_labels(out, [label(2, "defect")], reviewer="ben", now=T0)
    table = cache.table()
    assert table.schema.equals(LABEL_SCHEMA) and table["content_sha256"].to_pylist() == [sha(1), sha(2)]


@pytest.mark.parametrize("bad, match", [
    ({"label": "ok"}, "label='ok' is not a label; choose one of defect, normal"),
    ({"content_sha256": "abc"}, "content_sha256='abc' must be the 64 lower-case hex digits"),
    ({"uri": ""}, "uri='' must be"),
])
def test_a_bad_row_fails_naming_the_value_and_writes_nothing(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        append_labels(str(tmp_path), [label(1), {**label(2), **bad}], reviewer="ana")
    assert storage.list_files(labels_uri(str(tmp_path))) == []


def test_the_reviewer_comes_from_the_option_else_the_environment(monkeypatch):
    monkeypatch.setenv(REVIEWER_ENV, "from-env")
    assert reviewer_name("given") == "given" and reviewer_name() == "from-env"
    monkeypatch.delenv(REVIEWER_ENV)
    with pytest.raises(ValueError, match=f"pass --reviewer NAME or set the environment variable {REVIEWER_ENV}"):
        reviewer_name()
    with pytest.raises(ValueError, match="reviewer=' ': give a non-empty name"):
        append_labels("unused", [label(1)], reviewer=" ")


# ---- concurrency: many writers at once, nothing lost -------------------------------------------------------

WRITERS, WRITES_EACH = 8, 6


def _write_many(args) -> list[str]:
    """Writer `w` appends WRITES_EACH single-label files (a reviewer clicking through images)."""
    uri, opts, w = args
    return [append_labels(uri, [label(f"{w}-{i}", "defect" if i % 2 else "normal")], reviewer=f"r{w}",
                          options=opts) for i in range(WRITES_EACH)]


def _expect_every_label(uri, opts, files):
    assert len(set(files)) == WRITERS * WRITES_EACH                  # every write took a name of its own
    assert sorted(storage.list_files(labels_uri(uri), opts)) == sorted(files)
    got = {(r["content_sha256"], r["label"], r["reviewer"]) for r in read_labels(uri, options=opts).to_pylist()}
    assert got == {(sha(f"{w}-{i}"), "defect" if i % 2 else "normal", f"r{w}")
                   for w in range(WRITERS) for i in range(WRITES_EACH)}


def test_threads_appending_at_once_lose_nothing(out):
    uri, opts = out
    with ThreadPoolExecutor(WRITERS) as pool:
        files = [f for fs in pool.map(_write_many, [(uri, opts, w) for w in range(WRITERS)]) for f in fs]
    _expect_every_label(uri, opts, files)


@pytest.mark.integration                 # starts four interpreters: seconds of imports
def test_processes_appending_at_once_lose_nothing(tmp_path):
    uri = str(tmp_path / "scores")
    # spawn: fresh interpreters, as separate reviewers' servers would be
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        files = [f for fs in pool.map(_write_many, [(uri, None, w) for w in range(WRITERS)]) for f in fs]
    _expect_every_label(uri, None, files)


LABELS_CYCLE = ("defect", "normal")


def _label_one_image(args) -> list[str]:
    """Writer `w` labels the same image WRITES_EACH times. Times come from three instants, so writers tie
    on the latest one and the tie-break (reviewer, label, uri, comment) decides."""
    uri, opts, w = args
    return [append_labels(uri, [{"content_sha256": sha("same"), "uri": f"/archive/copy_{(w + i) % 3}.png",
                                 "label": LABELS_CYCLE[(w + i) % 2], "comment": None if i % 3 == 0 else f"c{w}-{i}"}],
                          reviewer=f"r{w % 3}", options=opts, now=T0 + dt.timedelta(microseconds=(w * i) % 3))
            for i in range(WRITES_EACH)]


def test_writers_labelling_the_same_image_at_once_leave_one_label_in_force(out):
    uri, opts = out
    with ThreadPoolExecutor(WRITERS) as pool:
        files = [f for fs in pool.map(_label_one_image, [(uri, opts, w) for w in range(WRITERS)]) for f in fs]
    assert sorted(storage.list_files(labels_uri(uri), opts)) == sorted(files) and len(set(files)) == len(files)
    written = labels_dataset(uri, opts).to_table().to_pylist()
    assert len(written) == WRITERS * WRITES_EACH                      # every label of every file is there
    # the documented order, by brute force: latest time, then reviewer, label, uri, comment (None lowest)
    latest = max(written, key=lambda r: (r["labelled_at"], r["reviewer"], r["label"], r["uri"],
                                         r["comment"] is not None, r["comment"] or ""))
    assert read_labels(uri, options=opts).to_pylist() == [latest]
