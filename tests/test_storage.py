"""anomaly_core.storage against local disk and a real S3 server (moto_server on 127.0.0.1)."""

import os

import pytest

from anomaly_core import storage
from anomaly_core.storage import StorageError, StorageOptions
from tests.helpers import make_bucket
from tests.s3server import MotoServer, Relay


@pytest.fixture(scope="module")
def s3(s3_server):
    make_bucket(s3_server.url, "storage-tests")
    return StorageOptions(endpoint_url=s3_server.url, max_attempts=2)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), None                        # asks for no S3 server: a unit test
    return (f"s3://storage-tests/{request.node.name.replace('[', '-').rstrip(']')}",
            request.getfixturevalue("s3"))


def test_bytes_round_trip(root):
    uri, opts = root
    storage.write_bytes(storage.join(uri, "a/b.bin"), b"\x00\x01payload", opts)
    assert storage.read_bytes(storage.join(uri, "a/b.bin"), opts) == b"\x00\x01payload"
    assert storage.exists(storage.join(uri, "a/b.bin"), opts)
    assert not storage.exists(storage.join(uri, "a/nothing"), opts)


def test_a_file_removed_while_its_folder_is_listed_does_not_fail_the_listing(tmp_path, monkeypatch):
    # pyarrow stats each entry after reading the folder: another writer's delete in between raises
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("{}")
    real = storage.filesystem

    class Racing:
        def __init__(self, fs):
            self.fs, self.calls = fs, 0

        def get_file_info(self, selector):
            self.calls += 1
            if self.calls == 1:
                (tmp_path / "a.json").unlink()
                raise FileNotFoundError(f"{tmp_path / 'a.json'}: no such file")
            return self.fs.get_file_info(selector)

    monkeypatch.setattr(storage, "filesystem", lambda uri, options=None: (Racing(real(uri, options)[0]),
                                                                        real(uri, options)[1]))
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(str(tmp_path))] == ["b.json"]


def test_listing_is_recursive_sorted_filtered_and_skips_hidden_names(root):
    uri, opts = root
    for name in ("z/2.png", "a/1.PNG", "a/notes.txt", "_staging/3.png", "a/.tmp-4.png"):
        storage.write_bytes(storage.join(uri, name), b"x", opts)
    found = storage.list_files(uri, opts, suffixes=(".png",))
    assert found == [storage.join(uri, "a/1.PNG"), storage.join(uri, "z/2.png")]
    assert storage.list_files(storage.join(uri, "missing"), opts) == []


def test_reading_a_missing_object_is_file_not_found_naming_it(root):
    uri, opts = root
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        storage.read_bytes(storage.join(uri, "nothing.png"), opts)


def test_move_and_delete(root):
    uri, opts = root
    storage.write_bytes(storage.join(uri, "m/src.bin"), b"1", opts)
    storage.move(storage.join(uri, "m/src.bin"), storage.join(uri, "n/dst.bin"), opts)
    assert storage.list_files(uri, opts) == [storage.join(uri, "n/dst.bin")]
    storage.delete(uri, opts)
    assert storage.list_files(uri, opts) == []


def test_local_write_leaves_no_temporary_file(tmp_path):
    storage.write_bytes(str(tmp_path / "f.bin"), b"abc")
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.integration
def test_missing_bucket_is_a_permanent_error_naming_the_bucket(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_bucket("s3://no-such-bucket/archive/", s3)
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.list_files("s3://no-such-bucket/archive/", s3)


@pytest.mark.integration
def test_wrong_credentials_are_a_permanent_error_naming_the_bucket():
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})    # checks keys; ours are unknown to it
    try:
        with pytest.raises(StorageError, match="access denied to bucket 'audits'"):
            storage.check_bucket("s3://audits/x", StorageOptions(endpoint_url=server.url, max_attempts=1))
    finally:
        server.stop()


def test_an_unreachable_server_is_retried_then_reported_with_the_uri():
    dead = StorageOptions(endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(OSError, match="s3://bucket/key.png") as e:
        storage.read_bytes("s3://bucket/key.png", dead)
    assert not isinstance(e.value, StorageError)                     # transient: a re-run may succeed


def test_options_are_checked():
    with pytest.raises(ValueError, match="must start with http"):
        StorageOptions(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage.filesystem("gs://bucket/x")


@pytest.mark.integration
def test_a_stalled_server_is_retried_then_reported_as_a_timeout_naming_the_uri(s3_server, s3):
    storage.write_bytes("s3://storage-tests/stall/key.png", b"image", s3)
    relay = Relay(int(s3_server.direct_url.rsplit(":", 1)[1]))         # our own relay, stalled alone
    stalled = StorageOptions(endpoint_url=relay.url, max_attempts=2, connect_timeout_s=1, request_timeout_s=1)
    try:
        assert storage.read_bytes("s3://storage-tests/stall/key.png", stalled) == b"image"
        relay.stall()
        for call in (lambda: storage.read_bytes("s3://storage-tests/stall/key.png", stalled),
                     lambda: storage.write_bytes("s3://storage-tests/stall/new.png", b"x", stalled)):
            with pytest.raises(TimeoutError, match="s3://storage-tests/stall/.*did not answer in time"):
                call()
        relay.restore()
        assert storage.read_bytes("s3://storage-tests/stall/key.png", stalled) == b"image"
    finally:
        relay.cut()


def test_timeouts_are_checked():
    with pytest.raises(ValueError, match="connect_timeout_s=0 must be"):
        StorageOptions(connect_timeout_s=0)
