"""tauon_core.storage against real stores on loopback: SeaweedFS (the S3 the workloads meet), moto and a
throttling endpoint (faults a real store does not produce on demand), and local files.

Every failure must surface as its named error with the URI and never a credential.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest

from tauon_core import storage
from tauon_core.errors import PermanentError, RetryableError, report_retryable
from tests.net import free_port
from tests.s3store import S3Store, moto_server, seaweedfs, unavailable_store


@pytest.fixture
def use_store(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def apply(store: S3Store, **extra: str) -> None:
        for k, v in store.env(**extra).items():
            monkeypatch.setenv(k, v)

    return apply


@pytest.fixture(scope="module")
def weed() -> Iterator[S3Store]:
    with seaweedfs() as store:
        yield store


@pytest.fixture
def moto() -> Iterator[S3Store]:
    with moto_server() as store:
        yield store


def _assert_clean(err: BaseException, store: S3Store) -> None:
    text = str(err)
    assert store.secret_key not in text and store.access_key not in text


# --- local files ---------------------------------------------------------------------------------------


def test_local_listing_reading_and_atomic_write(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "c" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "b"}\n'))
    (tmp_path / "notes.txt").write_text("skip me")
    found = storage.list_objects(str(tmp_path) + "/", (".jsonl", ".jsonl.gz"))
    assert [Path(o.uri).name for o in found] == ["a.jsonl", "b.jsonl.gz"]
    assert storage.list_objects("file://" + str(tmp_path / "a.jsonl"))[0].size == 14
    assert storage.read_bytes(str(tmp_path / "a.jsonl"), 2, 6) == b"text"
    storage.write_bytes(str(tmp_path / "out" / "x.bin"), b"123")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"123"
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_local_missing_and_empty_prefix_are_named(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as e:
        storage.list_objects(str(tmp_path / "nope.jsonl"))
    assert e.value.reason == storage.OBJECT_NOT_FOUND and "nope.jsonl" in e.value.message
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(PermanentError) as e:
        storage.list_objects(str(tmp_path) + "/", (".jsonl",))
    assert e.value.reason == storage.OBJECT_NOT_FOUND and "ending in .jsonl" in e.value.message


def test_join() -> None:
    assert storage.join("s3://b/p/", "x", "y.bin") == "s3://b/p/x/y.bin"
    assert storage.join("file:///tmp/a", "b") == "/tmp/a/b"


# --- moto: fault injection ----------------------------------------------------------------------------


def test_vanished_object_while_streaming_is_object_not_found(moto: S3Store, use_store) -> None:  # type: ignore[no-untyped-def]
    use_store(moto)
    s3 = moto.client()
    s3.create_bucket(Bucket="corpus")
    s3.put_object(Bucket="corpus", Key="shard-0.jsonl", Body=b"x" * 300_000)
    f = storage.open_read("s3://corpus/shard-0.jsonl", block_size=64 * 1024)
    assert len(f.read(1000)) == 1000
    s3.delete_object(Bucket="corpus", Key="shard-0.jsonl")
    with pytest.raises(PermanentError) as e:
        f.read()
    assert e.value.reason == storage.OBJECT_NOT_FOUND
    assert "s3://corpus/shard-0.jsonl" in e.value.message
    _assert_clean(e.value, moto)


def test_missing_bucket_and_key_are_told_apart(moto: S3Store, use_store) -> None:  # type: ignore[no-untyped-def]
    use_store(moto)
    moto.client().create_bucket(Bucket="there")
    with pytest.raises(PermanentError) as e:
        storage.stat("s3://absent/x.jsonl")
    assert e.value.reason == storage.BUCKET_NOT_FOUND and "'absent'" in e.value.message
    with pytest.raises(PermanentError) as e:
        storage.stat("s3://there/x.jsonl")
    assert e.value.reason == storage.OBJECT_NOT_FOUND
    with pytest.raises(PermanentError) as e:
        storage.list_objects("s3://absent/prefix/")
    assert e.value.reason == storage.BUCKET_NOT_FOUND
    with pytest.raises(PermanentError) as e:
        storage.list_objects("s3://there/prefix/")
    assert e.value.reason == storage.OBJECT_NOT_FOUND


def test_throttling_is_retried_then_retryable(
    use_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    with unavailable_store() as (store, handler):
        use_store(store, TAUON_S3_MAX_ATTEMPTS="3")
        with pytest.raises(RetryableError) as e:
            storage.read_bytes("s3://bucket/key.jsonl")
    assert e.value.reason == storage.STORAGE_UNREACHABLE
    assert "s3://bucket/key.jsonl" in e.value.message
    assert "SlowDown" in e.value.message or "503" in e.value.message
    assert handler.hits >= 3  # botocore retried before giving up
    _assert_clean(e.value, store)
    # the termination message carries the storage reason as retryable
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TAUON_TERMINATION_LOG", str(log))
    assert report_retryable(e.value) == 1
    assert '"reason": "StorageUnreachable"' in log.read_text() and '"retryable": true' in log.read_text()


def test_nothing_listening_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("TAUON_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(RetryableError) as e:
        storage.list_objects("s3://b/p/")
    assert e.value.reason == storage.STORAGE_UNREACHABLE and "s3://b/p/" in e.value.message


# --- SeaweedFS: the real store --------------------------------------------------------------------------


def test_seaweedfs_round_trip(weed: S3Store, use_store) -> None:  # type: ignore[no-untyped-def]
    use_store(weed)
    weed.client().create_bucket(Bucket="roundtrip")
    storage.write_bytes("s3://roundtrip/corpus/a.jsonl", b'{"text": "hello"}\n')
    storage.write_bytes("s3://roundtrip/corpus/sub/b.csv.gz", gzip.compress(b"text\nworld\n"))
    storage.write_bytes("s3://roundtrip/corpus/README", b"not data")
    found = storage.list_objects("s3://roundtrip/corpus/", (".jsonl", ".csv.gz"))
    assert [o.uri for o in found] == ["s3://roundtrip/corpus/a.jsonl", "s3://roundtrip/corpus/sub/b.csv.gz"]
    assert all(o.etag for o in found) and found[0].size == 18
    assert storage.read_bytes("s3://roundtrip/corpus/a.jsonl", 2, 6) == b"text"
    with storage.open_read("s3://roundtrip/corpus/sub/b.csv.gz") as f:
        assert gzip.decompress(f.read()) == b"text\nworld\n"
    assert storage.exists("s3://roundtrip/corpus/a.jsonl")
    assert not storage.exists("s3://roundtrip/corpus/zz.jsonl")
    storage.delete("s3://roundtrip/corpus/", recursive=True)
    with pytest.raises(PermanentError) as e:
        storage.list_objects("s3://roundtrip/corpus/")
    assert e.value.reason == storage.OBJECT_NOT_FOUND


def test_seaweedfs_wrong_credentials_are_access_denied(weed: S3Store, use_store) -> None:  # type: ignore[no-untyped-def]
    use_store(weed)
    weed.client().create_bucket(Bucket="locked")
    storage.write_bytes("s3://locked/a.jsonl", b"{}\n")
    wrong = S3Store(weed.endpoint, weed.access_key, "not-the-secret-" + "x" * 10)
    use_store(wrong)
    with pytest.raises(PermanentError) as e:
        storage.read_bytes("s3://locked/a.jsonl")
    assert e.value.reason == storage.STORAGE_ACCESS_DENIED
    assert "s3://locked/a.jsonl" in e.value.message
    _assert_clean(e.value, wrong)


def test_seaweedfs_missing_bucket_and_empty_prefix(weed: S3Store, use_store) -> None:  # type: ignore[no-untyped-def]
    use_store(weed)
    with pytest.raises(PermanentError) as e:
        storage.list_objects("s3://no-such-bucket/shards/")
    assert e.value.reason == storage.BUCKET_NOT_FOUND
    weed.client().create_bucket(Bucket="empty")
    with pytest.raises(PermanentError) as e:
        storage.list_objects("s3://empty/shards/", (".jsonl",))
    assert e.value.reason == storage.OBJECT_NOT_FOUND and "s3://empty/shards/" in e.value.message
