"""Shards without Ray: tar and Parquet image tables read into (uri, bytes, error) samples, brace ranges,
archives of shards listed, decoded batches of shards, commits by shard (ShardSink) and `anomaly pack`."""

import io
import multiprocessing
import re
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_core import storage
from anomaly_core.decode import SHARD_ROWS, read_shards
from anomaly_core.shards import (
    ShardCache,
    expand_braces,
    pack_tar,
    parquet_samples,
    read_image,
    shard_of,
    tar_samples,
)
from jobs import output
from jobs.pack import run_pack
from jobs.runtime import list_archive
from tests.helpers import png_bytes
from tests.test_output import rows


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def parquet(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def test_a_brace_range_expands_padded_to_the_width_of_its_bounds():
    assert expand_braces("s3://b/shard-{000008..000010}.tar") == [
        "s3://b/shard-000008.tar", "s3://b/shard-000009.tar", "s3://b/shard-000010.tar"]
    assert expand_braces("d{8..10}/p{0..1}.tar") == ["d8/p0.tar", "d8/p1.tar", "d9/p0.tar", "d9/p1.tar",
                                                     "d10/p0.tar", "d10/p1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match=r"ends before it starts; write \{1..3\}"):
        expand_braces("x{3..1}.tar")


def test_tar_members_are_images_by_extension_in_order_and_a_repeated_name_replaces_the_earlier():
    data = pack_tar([("a/0001.jpg", b"j1"), ("a/0001.cls", b"3"), ("0002.PNG", b"p2"), ("b.c/0003.x.bmp", b"b3"),
                     ("a/0001.jpg", b"j1-again")])
    assert list(tar_samples("s3://b/s.tar", data)) == [
        ("s3://b/s.tar#a/0001.jpg", b"j1-again", ""), ("s3://b/s.tar#0002.PNG", b"p2", ""),
        ("s3://b/s.tar#b.c/0003.x.bmp", b"b3", "")]
    assert shard_of("s3://b/s.tar#a/0001.jpg") == shard_of("s3://b/s.tar") == "s3://b/s.tar"


def test_a_webdataset_sample_is_one_image_its_member_by_the_extension_preference():
    data = pack_tar([("a/0001.seg.png", b"mask"), ("a/0001.png", b"png"), ("a/0001.cls", b"3"), ("a/0001.jpg", b"jpg"),
                     ("a/0002.seg.png", b"mask only"), ("a/0002.json", b"{}"), ("b/0001.tiff", b"tiff"),
                     ("b/0001.webp", b"webp"), ("b/0001.depth.tif", b"depth")])
    assert [(u.split("#")[1], b) for u, b, _ in tar_samples("s.tar", data)] == [
        ("a/0001.jpg", b"jpg"), ("a/0002.seg.png", b"mask only"), ("b/0001.webp", b"webp")]


def test_a_truncated_tar_yields_its_whole_members_and_one_error_naming_the_shard():
    data = pack_tar([("0.png", b"x" * 3000), ("1.png", b"y" * 3000), ("2.png", b"z" * 3000)])
    member = 512 + 3072                                   # one member: its header and its data, padded
    for cut in (member + 1000, member + 100):            # in member 1's data; in its header
        samples = list(tar_samples("s.tar", data[:cut]))
        assert (samples[0][0], len(samples[0][1]), samples[0][2]) == ("s.tar#0.png", 3000, "")
        assert samples[-1][0] == "s.tar" and "truncated or corrupt tar after" in samples[-1][2]
        assert all(e for _, _, e in samples[1:])


def test_a_file_that_is_no_tar_or_has_no_images_is_one_error_row_naming_the_shard():
    assert [(u, e) for u, _, e in tar_samples("s.tar", b"garbage" * 200)] == [
        ("s.tar", "s.tar: not a readable tar file (invalid header)")]
    (only,) = tar_samples("s.tar", pack_tar([("0.json", b"{}")]))
    assert only[0] == "s.tar" and "no image members" in only[2]


def test_parquet_struct_images_get_row_uris_and_a_null_cell_is_an_error_row():
    table = pa.table({"image": pa.array([{"bytes": b"i0", "path": "0.png"}, None, {"bytes": None, "path": "2.png"},
                                         {"bytes": b"i3", "path": "3.png"}])})
    samples = list(parquet_samples("t.parquet", parquet(table, row_group_size=2)))
    assert [(u, b) for u, b, _ in samples] == [("t.parquet#row=0", b"i0"), ("t.parquet#row=1", b""),
                                               ("t.parquet#row=2", b""), ("t.parquet#row=3", b"i3")]
    assert [bool(e) for _, _, e in samples] == [False, True, True, False]


def test_parquet_binary_column_with_ids_and_a_repeated_id_is_an_error_row():
    table = pa.table({"png": pa.array([b"a", b"b", b"c"]), "part": ["p-1", "p-2", "p-1"]})
    samples = list(parquet_samples("t.parquet", parquet(table), image_column="png", id_column="part"))
    assert [(u, b, bool(e)) for u, b, e in samples] == [("t.parquet#p-1", b"a", False), ("t.parquet#p-2", b"b", False),
                                                        ("t.parquet#row=2", b"", True)]
    assert "repeats" in samples[2][2]


def test_an_id_shaped_as_a_row_number_never_takes_another_rows_uri():
    table = pa.table({"png": pa.array([b"a", b"b", b"c"]), "part": ["row=1", None, "row=2"]})
    samples = list(parquet_samples("t.parquet", parquet(table), image_column="png", id_column="part"))
    assert [(u, b, bool(e)) for u, b, e in samples] == [
        ("t.parquet#row=0", b"", True), ("t.parquet#row=1", b"b", False), ("t.parquet#row=2", b"", True)]
    assert "has the form row=<n>" in samples[0][2]


def test_an_unreadable_parquet_file_or_a_missing_column_is_one_error_row_naming_the_file():
    good = parquet(pa.table({"image": pa.array([b"a"])}))
    for data, kw, match in [(good[:len(good) // 2], {}, "magic bytes"),
                            (good, {"image_column": "img"}, r"no column 'img'; its columns: \['image'\]")]:
        (only,) = parquet_samples("t.parquet", data, **kw)
        assert only[0] == "t.parquet" and only[1] == b"" and re.search(match, only[2]), only[2]


def test_read_shards_decodes_every_member_in_batches_and_counts_the_shard_rows(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(pack_tar([(f"{i}.png", image(i)) for i in range(3)] + [("bad.png", b"not a png")]))
    batches = list(read_shards({"shard": np.array([str(shard), str(tmp_path / "gone.tar")], dtype=object)},
                               input_size=32, batch_rows=2))
    uris = [u for b in batches for u in b["path"]]
    assert uris == [f"{shard}#{m}" for m in ("0.png", "1.png", "2.png", "bad.png")] + [str(tmp_path / "gone.tar")]
    errors = [e for b in batches for e in b["error"]]
    assert [bool(e) for e in errors] == [False, False, False, True, True] and errors[-1].endswith("not found")
    assert [list(b[SHARD_ROWS]) for b in batches] == [[4, 4], [4, 4], [1]]
    assert batches[0]["pixels"].shape == (2, 32, 32, 3) and list(batches[0]["width"]) == [48, 48]


def test_an_image_in_a_shard_is_read_back_by_its_uri(tmp_path):
    (tmp_path / "s.tar").write_bytes(pack_tar([("d/0.png", b"zero"), ("d/1.png", b"one")]))
    (tmp_path / "t.parquet").write_bytes(parquet(pa.table({"image": pa.array([b"r0", b"r1"])})))
    assert read_image(f"{tmp_path}/s.tar#d/1.png") == b"one"
    assert read_image(f"{tmp_path}/t.parquet#row=1") == b"r1"
    with pytest.raises(FileNotFoundError, match="holds no readable image"):
        read_image(f"{tmp_path}/s.tar#d/2.png")


def test_images_of_a_cached_shard_are_read_without_fetching_it_again(tmp_path):
    (tmp_path / "s.tar").write_bytes(pack_tar([("0.png", b"zero"), ("1.png", b"one"), ("x.json", b"{}")]))
    cache = ShardCache(max_bytes=1000)
    assert read_image(f"{tmp_path}/s.tar#0.png", cache=cache) == b"zero" and cache.nbytes == len(b"zeroone")
    (tmp_path / "s.tar").unlink()                                       # only the cached copy is left
    assert read_image(f"{tmp_path}/s.tar#1.png", cache=cache) == b"one"
    with pytest.raises(FileNotFoundError, match="holds no readable image"):
        read_image(f"{tmp_path}/s.tar#x.json", cache=cache)


def counting(images: dict[str, bytes], fetched: list[str], key: str):
    """A fetch of shard `key` that records itself in `fetched`."""
    return lambda: fetched.append(key) or images


def test_the_shard_cache_drops_the_least_recently_used_beyond_its_bytes_and_never_keeps_a_larger_shard():
    cache, fetched = ShardCache(max_bytes=10), []
    shards = {"a": {"a#0": b"123456"}, "b": {"b#0": b"1234"}, "c": {"c#0": b"123"}, "big": {"big#0": b"x" * 11}}

    def get(key):
        return cache.get((key,), counting(shards[key], fetched, key))

    assert [get(k) for k in ("a", "b", "a")] == [shards["a"], shards["b"], shards["a"]] and fetched == ["a", "b"]
    get("c")                                                      # 13 bytes: b, used least recently, goes
    get("a"), get("c")
    assert cache.nbytes == 9 and fetched == ["a", "b", "c"]
    get("b")
    assert fetched[-1] == "b" and cache.nbytes == 7                # b back in; a dropped (c was used after it)
    get("big"), get("big")
    assert fetched[-2:] == ["big", "big"] and cache.nbytes == 7    # larger than the cache: never kept


def test_threads_asking_for_one_shard_at_once_share_one_fetch():
    cache, fetched, release = ShardCache(max_bytes=100), [], threading.Event()

    def fetch():
        fetched.append("s")
        release.wait()                                            # the others ask while this fetch runs
        return {"s#0": b"data"}

    with ThreadPoolExecutor(8) as pool:
        got = [pool.submit(cache.get, ("s",), fetch) for _ in range(8)]
        while not fetched:
            time.sleep(0.01)
        time.sleep(0.1)                                           # let the other threads reach the cache
        release.set()
        assert all(f.result() == {"s#0": b"data"} for f in got)
    assert fetched == ["s"]


def test_an_archive_of_shards_is_a_prefix_a_brace_range_or_a_manifest(tmp_path):
    for i in range(3):
        (tmp_path / "line" / f"shard-{i:03d}.tar").parent.mkdir(exist_ok=True)
        (tmp_path / "line" / f"shard-{i:03d}.tar").write_bytes(pack_tar([("0.png", b"x")]))
    listed = [str(tmp_path / "line" / f"shard-{i:03d}.tar") for i in range(3)]
    assert list_archive(str(tmp_path / "line")).shards == listed
    assert list_archive(str(tmp_path / "line" / "shard-{001..003}.tar")).shards == listed[1:] + [
        str(tmp_path / "line" / "shard-003.tar")]                   # named: the missing one becomes an error row
    (tmp_path / "list.txt").write_text("line/shard-002.tar\n# comment\nline/shard-{000..001}.tar\n")
    assert list_archive(str(tmp_path / "list.txt")) == list_archive(str(tmp_path / "line"))
    assert list_archive(listed[0]).shards == listed[:1]


def test_a_brace_range_of_folders_lists_each_folder_and_a_missing_one_fails(tmp_path):
    for line in (1, 2):
        (tmp_path / f"line-{line}" / "a").mkdir(parents=True)
        (tmp_path / f"line-{line}" / "a" / "0.png").write_bytes(image(line))
    assert list_archive(f"{tmp_path}/line-{{1..2}}/").images == [f"{tmp_path}/line-{i}/a/0.png" for i in (1, 2)]
    with pytest.raises(FileNotFoundError, match=r"line-3 not found"):
        list_archive(f"{tmp_path}/line-{{1..3}}")


def test_an_archive_of_images_and_shards_together_is_refused_naming_both(tmp_path):
    (tmp_path / "a.png").write_bytes(image(0))
    (tmp_path / "s.tar").write_bytes(pack_tar([("0.png", image(1))]))
    with pytest.raises(ValueError, match=r"names both images \(1, e.g. .*a.png\) and shards \(1, .*anomaly pack"):
        list_archive(str(tmp_path))


def shard_rows(shard: str, members: list[str]) -> pa.Table:
    t = rows([f"{shard}#{m}" for m in members])
    return t.append_column(SHARD_ROWS, pa.array([3] * len(members), pa.int64()))


def test_a_shard_split_over_write_tasks_is_committed_as_one_file_once_all_its_rows_are_written(tmp_path):
    out = str(tmp_path)
    sink = output.ShardSink(out, "r1", rows_per_write=2)
    sink.write([shard_rows("/s/a.tar", ["0.png", "1.png"]), shard_rows("/s/b.tar", ["0.png", "1.png", "2.png"])], None)
    assert output.committed_parts(out, "r1", "2026-11-22") == {output.part_name(["/s/b.tar"])}
    assert len(storage.list_files(output.pieces_uri(out, "r1"))) == 1
    sink.write([shard_rows("/s/a.tar", ["2.png"])], None)
    committed = output.committed_parts(out, "r1", "2026-11-22")
    assert committed == {output.part_name(["/s/a.tar"]), output.part_name(["/s/b.tar"])}
    assert storage.list_files(output.pieces_uri(out, "r1")) == []
    part = output.part_name(["/s/a.tar"])
    (a,) = [f for f in output.run_files(out, "r1", "2026-11-22") if output.file_part(f) == part]
    assert output.count_file(a) == {"part": part, "foreign": 0, "images": 3,
                                    "anomalous": 0, "errors": 0, "warnings": 0, "duplicates": 0}


_barrier = None


def _start_together(barrier) -> None:
    global _barrier
    _barrier = barrier


def _write_one_row(out: str, member: str, n: int) -> str | None:
    """One write task holding one row of a shard of `n` rows, started with the others of its trial."""
    t = rows([f"/s/a.tar#{member}"]).append_column(SHARD_ROWS, pa.array([n], pa.int64()))
    _barrier.wait()
    try:
        output.ShardSink(out, "r1", rows_per_write=1).write([t], None)
    except Exception as e:                                          # reported to the test, which names it
        return repr(e)
    return None


def test_write_tasks_finishing_one_shard_together_commit_it_once_without_failing(tmp_path):
    n, trials = 6, 50
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n, initializer=_start_together, initargs=(ctx.Barrier(n),)) as pool:
        for trial in range(trials):
            out = str(tmp_path / str(trial))
            errors = pool.starmap(_write_one_row, [(out, f"{i}.png", n) for i in range(n)])
            assert errors == [None] * n, f"trial {trial}"
            (f,) = output.run_files(out, "r1", "2026-11-22")
            assert sorted(output.read_columns([f], ["uri"])["uri"].to_pylist()) == [
                f"/s/a.tar#{i}.png" for i in range(n)], f"trial {trial}"
            assert storage.list_files(output.pieces_uri(out, "r1")) == [], f"trial {trial}"


def test_rows_repeated_by_overlapping_pieces_are_committed_once(tmp_path):
    out = str(tmp_path)
    sink = output.ShardSink(out, "r1", rows_per_write=1)
    sink.write([shard_rows("/s/a.tar", ["0.png"])], None)
    sink.write([shard_rows("/s/a.tar", ["0.png", "1.png"])], None)    # a retried task, other blocks
    assert output.committed_parts(out, "r1", "2026-11-22") == set()
    sink.write([shard_rows("/s/a.tar", ["2.png"])], None)
    (f,) = output.run_files(out, "r1", "2026-11-22")
    assert output.read_columns([f], ["uri"])["uri"].to_pylist() == [f"/s/a.tar#{i}.png" for i in range(3)]


def test_a_file_holding_rows_of_another_shard_counts_them_as_foreign(tmp_path):
    out = str(tmp_path)
    output.StagedParquetSink(out, "r1", rows_per_file=10).write([rows(["/s/a.tar#0.png"])], None)
    (f,) = output.run_files(out, "r1", "2026-11-22")
    assert output.count_file(f)["foreign"] == 1                    # named by its URIs, not by a shard


def test_pack_writes_sorted_shards_of_the_given_size_with_paths_below_the_folder(tmp_path):
    for i in range(5):
        (tmp_path / "in" / "line=L1" / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "line=L1" / f"{i}.png").write_bytes(image(i))
    result = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), shard_size=2)
    assert result == {"shards": f"{tmp_path}/out/shard-{{000000..000002}}.tar", "count": 3, "images": 5,
                      "missing": 0}
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tf:
        assert tf.getnames() == ["line=L1/2.png", "line=L1/3.png"]
    assert read_image(f"{tmp_path}/out/shard-000002.tar#line=L1/4.png") == image(4)
    with pytest.raises(FileExistsError, match="holds shards already"):
        run_pack(str(tmp_path / "in"), str(tmp_path / "out"), shard_size=2)


def test_pack_refuses_images_that_would_be_one_webdataset_sample(tmp_path):
    for name in ("a.1.png", "a.2.png"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(image(0))
    with pytest.raises(ValueError, match=r"'a.1.png' and 'a.2.png' would be one sample .* key 'a'"):
        run_pack(str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
