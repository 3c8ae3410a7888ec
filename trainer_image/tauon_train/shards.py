"""Raw dataset shards: which objects make up a dataset, and their text, with errors that name the shard.

A dataset (``dataset.path`` in job.json) is one file or object, or a directory or ``s3://`` prefix of
shards. Under a directory or prefix every object whose name ends in the format's suffixes is a shard
(``.jsonl``/``.jsonl.gz`` or ``.csv``/``.csv.gz``, recursively), in URI order; anything else is skipped.
The format comes from ``dataset.format``, else from the path's extension (``.csv``/``.csv.gz`` are csv,
everything else jsonl).

Shards are listed and read through ``tauon_core.storage``: on ``s3://`` a failure is one of its named
errors (``ObjectNotFound`` for a missing object, an empty prefix or a shard deleted after listing,
``BucketNotFound``, ``StorageAccessDenied``, retryable ``StorageUnreachable``). A local dataset that is
missing or has no shard is ``DatasetNotFound``. A ``.gz`` shard is decompressed as a stream; corrupt or
truncated data is ``InvalidDataset`` naming the shard and the line where it broke. Text is strict UTF-8
(a leading BOM is dropped); undecodable bytes name their shard and line.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from tauon_core import storage
from tauon_core.errors import DATASET_NOT_FOUND, INVALID_DATASET, PermanentError

SUFFIXES: dict[str, tuple[str, ...]] = {"jsonl": (".jsonl", ".jsonl.gz"), "csv": (".csv", ".csv.gz")}
_CHUNK = 4 << 20


def format_of(path: str) -> str:
    """The format a path implies when ``dataset.format`` is not set."""
    name = path.lower().removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "jsonl"


@dataclass(frozen=True)
class Shard:
    """One raw shard: its URI or path, size and content tag (ETag or mtime)."""

    uri: str
    size: int
    etag: str


def _is_single(path: str) -> bool:
    if storage.is_remote(path):
        return not path.endswith("/") and storage.exists(path)
    return os.path.isfile(path)


def list_shards(path: str, fmt: str, source: str = "") -> list[Shard]:
    """The shards of a dataset in URI order (one entry for a single file or object)."""
    shown = f" (dataset.source={source})" if source and source != path else ""
    if not storage.is_remote(path):
        if not os.path.exists(path):
            raise PermanentError(DATASET_NOT_FOUND, f"dataset file {path} not found{shown}")
        if os.path.isdir(path):
            found = [p for p in _local_tree(path) if p.endswith(SUFFIXES[fmt])]
            if not found:
                raise PermanentError(
                    DATASET_NOT_FOUND,
                    f"dataset directory {path} has no {' or '.join(SUFFIXES[fmt])} shard{shown}",
                )
            return [Shard(p, os.path.getsize(p), str(os.path.getmtime(p))) for p in found]
        if not os.path.isfile(path):
            raise PermanentError(DATASET_NOT_FOUND, f"dataset path {path} is not a file{shown}")
        return [Shard(path, os.path.getsize(path), str(os.path.getmtime(path)))]
    if _is_single(path):
        info = storage.stat(path)
        return [Shard(info.uri, info.size, info.etag)]
    return [Shard(o.uri, o.size, o.etag) for o in storage.list_objects(path, SUFFIXES[fmt])]


def _local_tree(root: str) -> list[str]:
    out: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in files)
    return sorted(out)


def _gunzip(uri: str, data: bytes) -> bytes:
    """Decompress a gzip shard (several members allowed); errors name the line where the data broke."""
    out = bytearray()
    view = memoryview(data)
    while view:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            for i in range(0, len(view), _CHUNK):
                out += d.decompress(view[i : i + _CHUNK])
                if d.eof:
                    break
            out += d.flush()
        except zlib.error as e:
            line = out.count(b"\n") + 1
            raise PermanentError(INVALID_DATASET, f"{uri}:{line}: corrupt gzip data ({e})") from None
        if not d.eof:
            line = out.count(b"\n") + 1
            raise PermanentError(INVALID_DATASET, f"{uri}:{line}: truncated gzip data (the shard ends early)")
        view = memoryview(d.unused_data) if d.unused_data else memoryview(b"")
    return bytes(out)


def read_text(shard: Shard) -> str:
    """The whole shard as strict UTF-8 text (gunzipped when it ends in ``.gz``)."""
    uri = shard.uri
    if storage.is_remote(uri):
        data = storage.read_bytes(uri)
    else:
        try:
            with open(uri, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise PermanentError(DATASET_NOT_FOUND, f"dataset path {uri} is not a file") from None
        except OSError as e:
            raise PermanentError(DATASET_NOT_FOUND, f"dataset file {uri} unreadable: {e.strerror}") from None
    if uri.lower().endswith(".gz"):
        data = _gunzip(uri, data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PermanentError(
            INVALID_DATASET, f"{uri}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
