"""jobs/runtime.py: local paths against the cluster's nodes (a node list as ray.nodes() gives it); what a
block of listed names holds, and the archives refused from those counts; an archive listed in Ray tasks
against the same archive listed on the driver."""

import re

import numpy as np
import pyarrow as pa
import pytest

from jobs.runtime import check_archive, check_paths_reach_every_node, list_archive, name_kinds, stream_archive


def nodes(alive: int, dead: int = 0) -> list[dict]:
    """A resource view as ray.nodes() reports it."""
    return [{"NodeID": f"{i:02x}" * 28, "Alive": i < alive, "Resources": {"CPU": 4.0}}
            for i in range(alive + dead)]


def test_local_paths_are_refused_on_two_nodes_naming_each_and_the_fix():
    paths = {"archive": ["/data/a.png", "/data/b.png"], "model": ["s3://models/m"], "output": ["/out"]}
    with pytest.raises(ValueError) as e:
        check_paths_reach_every_node(paths, nodes=nodes(2))
    message = str(e.value)
    assert "has 2 nodes" in message and "archive /data/a.png and 1 more" in message and "output /out" in message
    assert "Use s3:// URIs" in message and "--shared-fs" in message and "s3://models/m" not in message


@pytest.mark.parametrize("view", [nodes(1), nodes(1, dead=2)])
def test_local_paths_are_fine_on_one_live_node(view):
    check_paths_reach_every_node({"archive": ["/data/a.png"], "output": ["/out"]}, nodes=view)


def test_object_storage_paths_are_fine_on_any_cluster():
    check_paths_reach_every_node({"archive": ["s3://archive/a.png"], "model": ["s3://models/m"]}, nodes=nodes(8))


def test_name_kinds_counts_a_block_and_names_the_first_of_each_kind():
    rng = np.random.default_rng(0)
    pool = ["s3://a/x.png", "s3://a/y.jpg", "/local/z.png", "s3://a/s-1.tar", "s3://a/s#2.tar", "/local/t.parquet"]
    for _ in range(20):
        names = list(rng.choice(pool, size=rng.integers(0, 8)))
        row = name_kinds(pa.table({"path": pa.array(names, pa.string())})).to_pylist()
        shards = [n for n in names if n.endswith((".tar", ".parquet"))]
        images = [n for n in names if n not in shards]
        assert row == [{"images": len(images), "shards": len(shards), "image": min(images, default=None),
                        "shard": min(shards, default=None),
                        "shard_with_hash": min([s for s in shards if "#" in s], default=None),
                        "local": min([n for n in names if n.startswith("/")], default=None)}]


def test_an_archive_of_both_kinds_an_empty_one_and_a_shard_named_with_a_hash_are_refused():
    with pytest.raises(ValueError, match=r"names both images \(3, e.g. /a.png\) and shards \(1, e.g. /s.tar\)"):
        check_archive("/x", images=3, shards=1, image="/a.png", shard="/s.tar", shard_with_hash=None)
    with pytest.raises(ValueError, match="contains '#'"):
        check_archive("/x", images=0, shards=1, image=None, shard="/s#.tar", shard_with_hash="/s#.tar")
    with pytest.raises(FileNotFoundError, match="no images or shards in '/x'"):
        check_archive("/x", images=0, shards=0, image=None, shard=None, shard_with_hash=None)
    check_archive("/x", images=2, shards=0, image="/a.png", shard=None, shard_with_hash=None)


@pytest.mark.integration
def test_stream_archive_finds_what_list_archive_finds_and_fails_as_it_does(tmp_path, ray_local):
    for name in ("line=1/a.png", "line=1/b/_MG_1.JPG", "line=2/c.png", "line=2/notes.txt", "shards/s-1.tar",
                 "shards/s-2.tar", "mixed/a.png", "mixed/s.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "night.txt").write_text("line=1/a.png\nline=2/gone.png\n")
    sources = [str(tmp_path / "line={1..2}"), str(tmp_path / "line=1"), str(tmp_path / "night.txt")]
    streamed = stream_archive(sources)
    images = sorted({r["path"] for r in streamed.images.take_all()})
    assert images == list_archive(sources).images and streamed.shards == [] and streamed.local == images[0]
    assert stream_archive(str(tmp_path / "shards")).shards == list_archive(str(tmp_path / "shards")).shards
    for bad in ("mixed", "nowhere", "line=2/notes.txt"):
        with pytest.raises((ValueError, FileNotFoundError)) as listed:
            list_archive(str(tmp_path / bad))
        with pytest.raises(type(listed.value), match=re.escape(str(listed.value))):
            stream_archive(str(tmp_path / bad))
