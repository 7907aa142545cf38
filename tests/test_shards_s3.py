"""Archives of shards end to end through a real S3 server (moto_server on 127.0.0.1): fit and score from
tar shards and from a Parquet image table give the scores the same images give as files; corrupt,
truncated and missing shards give error rows; brace ranges and prefixes list the right shards."""

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_core import storage
from anomaly_core.config import ModelConfig
from anomaly_core.decode import SHARD_ROWS
from anomaly_core.shards import pack_tar
from anomaly_core.storage import StorageOptions
from jobs import runtime
from jobs.analyst import connect
from jobs.fit import run_fit
from jobs.pack import run_pack
from jobs.runtime import list_archive, read_shards_decoded, shards_per_block
from jobs.score import run_score
from tests.helpers import TEST_CONFIG_KW, make_bucket, upload

# fits and scores through Ray against a moto S3 server
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(s3_server, texture_dataset, ray_local):
    """Options reaching the server; bucket `lake` with the texture dataset as files under files/ and as
    tar shards under tar/train (3 shards) and tar/test (4 shards)."""
    make_bucket(s3_server.url, "lake")
    opts = StorageOptions(endpoint_url=s3_server.url, max_attempts=2)
    upload(texture_dataset, "s3://lake/files", opts)
    run_pack("s3://lake/files/train/good", "s3://lake/tar/train", shard_size=4, options=opts)
    run_pack("s3://lake/files/test", "s3://lake/tar/test", shard_size=3, options=opts)
    return opts


@pytest.fixture(scope="module")
def models(s3):
    """(manifest fitted on the files, manifest fitted on the tar shards)."""
    config = ModelConfig(**TEST_CONFIG_KW)
    return (run_fit("s3://lake/files/train/good", "s3://lake/models/files", config=config, batch_size=4, options=s3),
            run_fit("s3://lake/tar/train/shard-{000000..000002}.tar", "s3://lake/models/tar", config=config,
                    batch_size=4, options=s3))


def scores(out: str, options, *, key) -> dict:
    return {key(u): (s, v) for u, s, v in connect(out, options).execute("SELECT uri, score, verdict FROM scores")
            .fetchall()}


def assert_same_scores(got: dict, want: dict) -> None:
    """Same images, same verdicts, scores equal to float32 rounding: a shard's images reach the model in
    batches made up differently from the files', and a batched forward pass rounds the last bits per
    batch shape."""
    assert sorted(got) == sorted(want) and len(got) == 10
    assert {k: v for k, (_, v) in got.items()} == {k: v for k, (_, v) in want.items()}
    assert [got[k][0] for k in sorted(got)] == pytest.approx([want[k][0] for k in sorted(want)], rel=1e-5)


def below(marker: str):
    return lambda uri: uri.split(marker, 1)[1]


def test_brace_ranges_and_prefixes_list_the_right_shards(s3, s3_server):
    shards = [f"s3://lake/tar/test/shard-{i:06d}.tar" for i in range(4)]
    before = s3_server.requests
    assert len(list_archive("s3://lake/tar/test/shard-{000000..000999}.tar", s3).shards) == 1000
    assert s3_server.requests - before == 1                     # the bucket checked once, not once per name
    assert list_archive("s3://lake/tar/test", s3).shards == shards
    assert list_archive("s3://lake/tar/test/shard-{000001..000002}.tar", s3).shards == shards[1:3]
    storage.write_bytes("s3://lake/lists/test.txt", b"s3://lake/tar/test/shard-{000000..000003}.tar\n", s3)
    assert list_archive("s3://lake/lists/test.txt", s3).shards == shards


def test_shards_read_in_blocks_of_several_names_give_the_rows_one_shard_per_block_gives(s3, monkeypatch):
    shards = list_archive("s3://lake/tar/test", s3).shards

    def rows():
        ds = read_shards_decoded(shards, input_size=32, batch_size=2, options=s3)
        return sorted((r["path"], r[SHARD_ROWS], r["pixels"].tobytes()) for r in ds.take_all())

    assert shards_per_block(len(shards)) == 1
    one_per_block = rows()
    monkeypatch.setattr(runtime, "BLOCKS_OF_ONE_SHARD", 1)
    assert shards_per_block(len(shards)) == 4
    assert rows() == one_per_block and len(one_per_block) == 10


def test_fit_and_score_from_tar_shards_equal_fit_and_score_from_the_files(models, s3):
    from_files, from_tar = models
    assert from_tar["model_id"] == from_files["model_id"]               # the same bank and threshold
    assert from_tar["stats"]["n_images"] == from_files["stats"]["n_images"] == 10
    run_score("s3://lake/files/test", "s3://lake/models/files", "s3://lake/out/files", batch_size=4,
                      run_date="2026-11-30", options=s3)
    tar = run_score("s3://lake/tar/test/shard-{000000..000003}.tar", "s3://lake/models/tar", "s3://lake/out/tar",
                    batch_size=4, run_date="2026-11-30", options=s3)
    assert (tar["images"], tar["errors"], tar["shards"], tar["scored_now"]) == (10, 0, 4, 10)
    by_file = scores("s3://lake/out/files", s3, key=below("/files/test/"))
    by_member = scores("s3://lake/out/tar", s3, key=below(".tar#"))
    assert_same_scores(by_member, by_file)
    uris = [u for (u,) in connect("s3://lake/out/tar", s3).execute("SELECT uri FROM scores ORDER BY uri").fetchall()]
    assert uris[0] == "s3://lake/tar/test/shard-000000.tar#defect/000.png"
    parts = storage.list_files("s3://lake/out/tar/run_date=2026-11-30", s3)
    assert len(parts) == 4                                                  # one committed file per shard


def test_a_parquet_image_table_scores_as_the_files_do(models, s3, texture_dataset):
    test = texture_dataset / "test"
    names = sorted(p.relative_to(test).as_posix() for p in test.rglob("*.png"))
    images = [{"bytes": (texture_dataset / "test" / n).read_bytes(), "path": n} for n in names]
    for i, part in enumerate((slice(0, 6), slice(6, None))):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": images[part], "name": names[part]}), buf, row_group_size=4)
        storage.write_bytes(f"s3://lake/parquet/test/part-{i}.parquet", buf.getvalue(), s3)
    summary = run_score("s3://lake/parquet/test", "s3://lake/models/files", "s3://lake/out/parquet", batch_size=4,
                        run_date="2026-11-30", id_column="name", options=s3)
    assert (summary["images"], summary["errors"], summary["shards"]) == (10, 0, 2)
    files = run_score("s3://lake/files/test", "s3://lake/models/files", "s3://lake/out/files", batch_size=4,
                      run_date="2026-11-30", options=s3)                  # done already: read back
    assert files["images"] == 10
    assert_same_scores(scores("s3://lake/out/parquet", s3, key=below(".parquet#")),
                       scores("s3://lake/out/files", s3, key=below("/files/test/")))


def test_corrupt_truncated_and_missing_shards_give_error_rows_and_the_rest_is_scored(models, s3, texture_dataset):
    good = [(texture_dataset / "test" / "good" / f"00{i}.png").read_bytes() for i in range(3)]
    storage.write_bytes("s3://lake/bad/s-0.tar", pack_tar([("a.png", good[0]), ("broken.png", b"\x89PNG\r\n\x1a\n"),
                                                           ("a.json", b"{}")]), s3)
    whole = pack_tar([("b.png", good[1]), ("c.png", good[2])])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        c = tf.getmember("c.png")
    storage.write_bytes("s3://lake/bad/s-1.tar", whole[:c.offset_data + c.size // 2], s3)        # cut in c.png
    buf = io.BytesIO()
    pq.write_table(pa.table({"png": [good[0], None, b"garbage"]}), buf)
    storage.write_bytes("s3://lake/bad/t-0.parquet", buf.getvalue(), s3)
    storage.write_bytes("s3://lake/bad/t-1.parquet", b"PAR1 but no table", s3)
    storage.write_bytes("s3://lake/bad/list.txt", b"s-{0..2}.tar\nt-{0..1}.parquet\n", s3)   # s-2.tar is missing
    summary = run_score("s3://lake/bad/list.txt", "s3://lake/models/files", "s3://lake/out/bad", batch_size=4,
                        run_date="2026-11-30", image_column="png", options=s3)
    rows = dict(connect("s3://lake/out/bad", s3).execute(
        "SELECT replace(uri, 's3://lake/bad/', ''), status FROM scores").fetchall())
    assert rows == {"s-0.tar#a.png": "ok", "s-0.tar#broken.png": "error", "s-1.tar#b.png": "ok",
                    "s-1.tar#c.png": "error", "s-1.tar": "error", "s-2.tar": "error",
                    "t-0.parquet#row=0": "ok", "t-0.parquet#row=1": "error", "t-0.parquet#row=2": "error",
                    "t-1.parquet": "error"}
    assert (summary["images"], summary["errors"], summary["shards"]) == (10, 7, 5)
    errors = dict(connect("s3://lake/out/bad", s3).execute(
        "SELECT replace(uri, 's3://lake/bad/', ''), error FROM scores WHERE status = 'error'").fetchall())
    assert errors["s-2.tar"] == "s3://lake/bad/s-2.tar not found"
    assert "truncated or corrupt tar after" in errors["s-1.tar"] and "no image bytes" in errors["t-0.parquet#row=1"]


def test_a_missing_image_column_stops_the_job_naming_the_columns_there_are(models, s3):
    with pytest.raises(ValueError, match=r"has no column 'pixels'; its columns: \['image', 'name'\]"):
        run_score("s3://lake/parquet/test", "s3://lake/models/files", "s3://lake/out/nocol", image_column="pixels",
                  run_date="2026-11-30", options=s3)


def test_an_outage_while_reading_a_shard_stops_the_job_and_a_rerun_finishes_it(models, s3, s3_server):
    out = "s3://lake/out/outage"
    s3_server.cut_at(rb"^GET /lake/tar/test/shard-000002\.tar", after=0)     # the server gone at that read
    try:
        with pytest.raises(OSError, match="NETWORK_CONNECTION") as e:
            run_score("s3://lake/tar/test", "s3://lake/models/files", out, batch_size=4, run_date="2026-11-30",
                      options=s3)
    finally:
        s3_server.restore()
    assert not isinstance(e.value, storage.StorageError)                    # an outage is not a permanent error
    assert storage.list_files(storage.join(out, "_runs"), s3, suffixes=(".json",)) == []   # not complete
    summary = run_score("s3://lake/tar/test", "s3://lake/models/files", out, batch_size=4, run_date="2026-11-30",
                        options=s3)
    assert (summary["images"], summary["errors"], summary["duplicates"], summary["shards"]) == (10, 0, 0, 4)
    assert summary["scored_now"] + summary["resumed_from"] == 10
