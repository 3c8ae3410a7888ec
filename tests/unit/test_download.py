"""The model download's verification and cache logic (tauon_serve.download), on local files only.

The verification functions are pure (names and sizes in, a named error out). The download itself is
storage-agnostic (tauon_core.storage lists and reads local paths as it does ``s3://``), so the cache,
resume, cancellation and clean-up logic runs here against a local "store" directory; the real S3 path
(SeaweedFS, the server process) is in tests/workload/test_model_download.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tauon_core import storage
from tauon_serve import download
from tauon_serve.download import (
    INCOMPLETE_MODEL,
    INDEX,
    MODEL_CACHE_TOO_SMALL,
    MODEL_DOWNLOAD_TIMEOUT,
    ModelDownloadError,
    ModelDownloadRetryable,
    check_model_files,
    download_model,
    model_dir,
    parse_index,
    safe_name,
    verify_local,
)

URI = "s3://models/sentiment/"


def _index(shards: dict[str, str], total: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"weight_map": shards}
    if total is not None:
        out["metadata"] = {"total_size": total}
    return out


# --- pure verification --------------------------------------------------------------------------


def test_single_file_model_is_whole() -> None:
    sizes = {"config.json": 600, "model.safetensors": 1000, "tokenizer.json": 50}
    assert check_model_files(URI, sizes, None) == ["model.safetensors"]


def test_missing_config_and_weights_are_named_with_the_uri() -> None:
    with pytest.raises(ModelDownloadError) as err:
        check_model_files(URI, {"tokenizer.json": 5}, None)
    assert err.value.reason == INCOMPLETE_MODEL
    msg = str(err.value)
    assert URI in msg and "config.json" in msg and "model.safetensors (or model.safetensors.index.json" in msg


def test_missing_config_hints_at_the_model_subprefix() -> None:
    """A FineTuneJob's output root given instead of its model/ prefix."""
    with pytest.raises(
        ModelDownloadError, match=r"model/ holds one: is the model s3://models/sentiment/model/"
    ):
        check_model_files(URI, {"model/config.json": 5, "model/model.safetensors": 9}, None)


def test_empty_files_count_as_missing() -> None:
    with pytest.raises(ModelDownloadError, match=r"missing model.safetensors \(empty\)"):
        check_model_files(URI, {"config.json": 5, "model.safetensors": 0}, None)


def test_sharded_model_needs_every_shard_of_the_index() -> None:
    shards = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    sizes = {"config.json": 5, INDEX: 100, "model-00001-of-00002.safetensors": 700}
    with pytest.raises(ModelDownloadError) as err:
        check_model_files(URI, sizes, _index(shards))
    assert err.value.reason == INCOMPLETE_MODEL
    assert f"model-00002-of-00002.safetensors (named by {INDEX})" in str(err.value)
    sizes["model-00002-of-00002.safetensors"] = 300
    assert check_model_files(URI, sizes, _index(shards, total=990)) == sorted(set(shards.values()))


def test_index_total_size_must_fit_in_the_shards() -> None:
    shards = {"a": "s1.safetensors", "b": "s2.safetensors"}
    sizes = {"config.json": 5, INDEX: 100, "s1.safetensors": 10, "s2.safetensors": 10}
    with pytest.raises(
        ModelDownloadError, match=r"shards hold 20 bytes, less than the metadata.total_size \(500\)"
    ):
        check_model_files(URI, sizes, _index(shards, total=500))
    check_model_files(URI, sizes, {"weight_map": shards, "metadata": "not a dict"})  # no total: no check


def test_index_parsing() -> None:
    assert parse_index(URI, json.dumps(_index({"a": "s.safetensors"})).encode())["weight_map"] == {
        "a": "s.safetensors"
    }
    for raw, match in [
        (b"{not json", "not valid JSON"),
        (b"[]", "no weight_map"),
        (b'{"weight_map": {}}', "no weight_map"),
        (b'{"weight_map": {"a": 3}}', "no weight_map"),
        (b'{"weight_map": {"a": "../../etc/passwd"}}', "outside the model"),
    ]:
        with pytest.raises(ModelDownloadError, match=match) as err:
            parse_index(URI, raw)
        assert err.value.reason == "InvalidModel" and URI in str(err.value)


def test_safe_names() -> None:
    assert safe_name("config.json") and safe_name("1_Pooling/config.json")
    for bad in ("", "/etc/x", "a//b", "../x", "a/../../x", "./x", "a\\b", "a/"):
        assert not safe_name(bad), bad


def test_verify_local_compares_sizes_with_the_listing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert verify_local(URI, str(tmp_path), {"config.json": 2, "model.safetensors": 10}) == [
        "model.safetensors"
    ]
    with pytest.raises(
        ModelDownloadError, match=r"model.safetensors \(10, listed 11 bytes\), tok.json \(absent"
    ):
        verify_local(URI, str(tmp_path), {"config.json": 2, "model.safetensors": 11, "tok.json": 3})


def test_model_dir_is_per_uri_and_readable(tmp_path: Path) -> None:
    a = model_dir(str(tmp_path), "s3://models/sentiment")
    assert a == model_dir(str(tmp_path), "s3://models/sentiment/")
    assert a != model_dir(str(tmp_path), "s3://models/other/")
    assert os.path.basename(a).startswith("models-sentiment-")


# --- the download, against a local "store" -----------------------------------------------------


def _store(root: Path, *, weights: int = 3 << 20) -> Path:
    """A model directory as the trainer writes it (a nested file included)."""
    src = root / "store" / "model"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "config.json").write_text('{"architectures": ["BertModel"]}')
    (src / "model.safetensors").write_bytes(os.urandom(weights))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "1_Pooling" / "config.json").write_text("{}")
    return src


def _same_tree(a: Path, b: Path) -> None:
    for f in a.rglob("*"):
        if f.is_file() and f.name != storage.PUBLISHED_MARKER:
            assert (b / f.relative_to(a)).read_bytes() == f.read_bytes(), f


class _Reads:
    """Records storage.open_read calls (and can fail or slow them) and storage.read_bytes calls."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None, delay: float = 0
    ) -> None:
        self.names: list[str] = []
        self.small: list[str] = []  # read_bytes: the index and the publication marker
        real = storage.open_read
        real_bytes = storage.read_bytes

        def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
            self.small.append(uri.rsplit("/", 1)[-1])
            return real_bytes(uri, start, end)

        monkeypatch.setattr(storage, "read_bytes", read_bytes)

        def open_read(uri: str, block_size: int = 8 << 20) -> Any:
            self.names.append(uri.rsplit("/", 1)[-1])
            if fail_after is not None and len(self.names) > fail_after:
                raise storage.StorageUnreachable(uri, "ConnectionResetError")
            f = real(uri, block_size)
            if delay:
                slow_read = f.read

                def read(n: int = -1) -> bytes:
                    time.sleep(delay)
                    return slow_read(min(n, 64 << 10))

                f.read = read  # type: ignore[method-assign]
            return f

        monkeypatch.setattr(storage, "open_read", open_read)


def test_download_then_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _store(tmp_path)
    cache = tmp_path / "cache"
    got = Path(download_model(str(src), str(cache), 60, concurrency=2))
    assert got.parent == cache
    _same_tree(src, got)
    marker = json.loads((got / download.CACHE_MARKER).read_text())
    assert set(marker["files"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "1_Pooling/config.json",
    }
    assert not (got / download.JOURNAL).exists()
    assert not list(got.rglob("*" + download.PART_SUFFIX))

    reads = _Reads(monkeypatch)
    assert download_model(str(src), str(cache), 60) == str(got)
    assert reads.names == [] and reads.small == []  # a current, complete copy: nothing read

    (src / "tokenizer.json").write_text('{"version": "2.0", "changed": true}')
    assert download_model(str(src), str(cache), 60) == str(got)
    assert sorted(reads.names) == ["tokenizer.json"]  # only what changed (the journal of the rest)
    _same_tree(src, got)


def test_two_processes_share_one_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas on one volume: the second waits for the first's lock, then reuses its copy."""
    src = _store(tmp_path)
    reads = _Reads(monkeypatch, delay=0.01)
    results: list[str] = []
    workers = [
        threading.Thread(target=lambda: results.append(download_model(str(src), str(tmp_path / "c"), 60)))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert len(results) == 2 and results[0] == results[1]
    assert sorted(reads.names) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "config.json"]
    )
    _same_tree(src, Path(results[0]))


def test_a_failed_download_resumes_and_stale_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _store(tmp_path)
    cache = tmp_path / "cache"
    target = Path(model_dir(str(cache), str(src)))
    target.mkdir(parents=True)
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")  # a previous model's
    (target / ("model.safetensors" + download.PART_SUFFIX)).write_bytes(b"stale part")

    reads = _Reads(monkeypatch, fail_after=1)
    with pytest.raises(storage.StorageUnreachable):
        download_model(str(src), str(cache), 60, concurrency=1)
    assert reads.names[0] == "model.safetensors"  # largest first
    assert not (target / download.CACHE_MARKER).exists()
    assert not (target / "model-00001-of-00002.safetensors").exists()

    monkeypatch.undo()
    reads = _Reads(monkeypatch)
    download_model(str(src), str(cache), 60, concurrency=1)
    assert "model.safetensors" not in reads.names and len(reads.names) == 3
    _same_tree(src, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["1_Pooling", "config.json", "model.safetensors", "tokenizer.json", download.CACHE_MARKER]
    )


def test_timeout_is_a_named_retryable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _store(tmp_path)
    _Reads(monkeypatch, delay=0.05)
    before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(ModelDownloadRetryable) as err:
        download_model(str(src), str(tmp_path / "cache"), 0.5, concurrency=1)
    assert time.monotonic() - t0 < 2
    assert err.value.reason == MODEL_DOWNLOAD_TIMEOUT
    assert "not downloaded within 0.5s" in str(err.value) and "MiB" in str(err.value)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before  # the cancelled workers stopped


def test_publication_marker_decides_the_files(tmp_path: Path) -> None:
    src = _store(tmp_path)
    files = {n: (src / n).stat().st_size for n in ("config.json", "model.safetensors", "tokenizer.json")}
    (src / storage.PUBLISHED_MARKER).write_text(json.dumps({"files": files}))
    got = Path(download_model(str(src), str(tmp_path / "cache"), 60))
    assert not (got / "1_Pooling").exists()  # not published: not part of the model
    assert not (got / storage.PUBLISHED_MARKER).exists()

    files["model.safetensors"] += 1  # a marker that does not match what is there
    (src / storage.PUBLISHED_MARKER).write_text(json.dumps({"files": files}))
    with pytest.raises(ModelDownloadError, match=r"lists files the store does not hold") as err:
        download_model(str(src), str(tmp_path / "cache2"), 60)
    assert err.value.reason == INCOMPLETE_MODEL


def test_a_finetunejob_model_without_its_marker_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer deletes the marker before republishing and writes it last: meanwhile, no model."""
    src = _store(tmp_path)
    (src.parent / download.OUTPUT_OWNER_FILE).write_text('{"uid": "u1"}')
    reads = _Reads(monkeypatch)
    with pytest.raises(ModelDownloadRetryable) as err:
        download_model(str(src), str(tmp_path / "cache"), 60)
    assert err.value.reason == download.MODEL_NOT_PUBLISHED and storage.PUBLISHED_MARKER in str(err.value)
    assert reads.names == []
    files = {n: (src / n).stat().st_size for n in ("config.json", "model.safetensors")}
    (src / storage.PUBLISHED_MARKER).write_text(json.dumps({"files": files}))
    download_model(str(src), str(tmp_path / "cache"), 60)  # published: read


def test_incomplete_sharded_model_fails_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _store(tmp_path)
    (src / "model.safetensors").unlink()
    (src / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    (src / INDEX).write_text(
        json.dumps(_index({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}))
    )
    reads = _Reads(monkeypatch)
    with pytest.raises(ModelDownloadError, match=r"missing model-00002-of-00002.safetensors") as err:
        download_model(str(src), str(tmp_path / "cache"), 60)
    assert err.value.reason == INCOMPLETE_MODEL and str(src) in str(err.value)
    assert reads.names == [] and reads.small == [INDEX]  # judged from the listing and the index only


def test_cache_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _store(tmp_path)

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(ModelDownloadError, match=r"MiB left to download, 1.0 MiB free") as err:
        download_model(str(src), str(tmp_path / "cache"), 60)
    assert err.value.reason == MODEL_CACHE_TOO_SMALL


def test_unreachable_store_serves_a_complete_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    src = _store(tmp_path)
    cache = tmp_path / "cache"
    got = download_model(str(src), str(cache), 60)

    def unreachable(uri: str, suffixes: Any = ()) -> list[storage.ObjectInfo]:
        raise storage.StorageUnreachable(uri, "EndpointConnectionError")

    monkeypatch.setattr(storage, "list_objects", unreachable)
    with caplog.at_level(logging.WARNING, logger="tauon.serve.download"):
        assert download_model(str(src), str(cache), 60) == got
    assert "unreachable" in caplog.text and "unchecked" in caplog.text
    with pytest.raises(storage.StorageUnreachable):  # nothing complete to fall back on
        download_model(str(src), str(tmp_path / "empty-cache"), 60)


def test_progress_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _store(tmp_path, weights=40 << 20)
    with caplog.at_level(logging.INFO, logger="tauon.serve.download"):
        download_model(str(src), str(tmp_path / "cache"), 60)
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if m.startswith("downloading ") and "MiB (" in m]
    assert progress and all("/40.0 MiB" in m for m in progress), lines
    assert any(m.startswith("downloaded ") and "verified: config.json, model.safetensors" in m for m in lines)


# --- the server's flags and model source ---------------------------------------------------------


def test_server_flags_for_s3_models() -> None:
    from tauon_serve.config import DEFAULT_MODEL_CACHE_DIR, parse_args

    env = {"TAUON_MODEL_DIR": URI, "TAUON_MODEL_NAME": "n"}
    cfg = parse_args([], env=env)
    assert cfg.model_cache_dir == DEFAULT_MODEL_CACHE_DIR and DEFAULT_MODEL_CACHE_DIR.endswith("tauon-models")
    assert (cfg.model_download_timeout_seconds, cfg.model_download_concurrency) == (1800.0, 4)
    env |= {"TAUON_MODEL_CACHE_DIR": "/cache", "TAUON_MODEL_DOWNLOAD_TIMEOUT_SECONDS": "60"}
    cfg = parse_args(["--model-download-concurrency", "2"], env=env)
    assert (cfg.model_cache_dir, cfg.model_download_timeout_seconds, cfg.model_download_concurrency) == (
        "/cache",
        60.0,
        2,
    )
    for bad in (["--model-download-timeout-seconds", "0"], ["--model-download-concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad, env=env)


def test_s3_model_source_is_checked_for_form_only() -> None:
    from tauon_core.sources import ModelSourceError
    from tauon_serve.predictor import resolve_model_source

    assert resolve_model_source("s3://models/sentiment") == "s3://models/sentiment"  # fetched at load
    with pytest.raises(ModelSourceError, match="names no bucket"):
        resolve_model_source("s3:///model")
