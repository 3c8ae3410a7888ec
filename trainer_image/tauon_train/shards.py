"""Raw dataset shards: which objects make up a dataset, and their text, with errors that name the shard.

A dataset (``dataset.path`` in job.json) is one file or object, or a directory or ``s3://`` prefix of
shards. Under a directory or prefix every object whose name ends in the format's suffixes is a shard
(``.jsonl``/``.jsonl.gz``, ``.csv``/``.csv.gz`` or ``.parquet``, recursively), in URI order; anything
else is skipped, except a ``.parquet.gz`` in a parquet dataset, which is refused (``InvalidDataset``:
parquet compresses its own pages). The format comes from ``dataset.format``, else from the path's
extension (``.csv``/``.csv.gz`` are csv, ``.parquet`` parquet, everything else jsonl).

Shards are listed and read through ``tauon_core.storage``: on ``s3://`` a failure is one of its named
errors (``ObjectNotFound`` for a missing object, an empty prefix or a shard deleted after listing,
``BucketNotFound``, ``StorageAccessDenied``, retryable ``StorageUnreachable``). A local dataset that is
missing or has no shard is ``DatasetNotFound``. A ``.gz`` shard is decompressed as a stream (several
members allowed, output in pieces of at most 4 MiB whatever the ratio); corrupt or truncated data is
``InvalidDataset`` naming the shard and the line where it broke. Text is strict UTF-8 (a leading BOM is
dropped); undecodable bytes name their shard, line and byte.

``read_text`` returns a shard whole (the in-memory path); ``iter_bytes`` and ``iter_lines`` stream it
(the tokenized cache): memory holds one chunk and the longest line, never the shard.

Parquet shards (``iter_parquet``, both paths) are read with pyarrow one record batch at a time (at most
``PARQUET_BATCH_ROWS`` rows, only the columns asked for, column chunks streamed through a 1 MiB buffer),
from the local file or the ``s3://`` object's file object (ranged reads): memory holds a batch and the
row group's pages being decoded, never the shard as Python objects. Rows are numbered from 1 within the
shard (parquet has no lines); a file that is not parquet or whose pages do not decode is
``InvalidDataset`` naming the shard (and the row after which it broke); a column asked for that is not in
the schema is ``MissingColumn``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from tauon_core import storage
from tauon_core.errors import (
    DATASET_NOT_FOUND,
    INVALID_DATASET,
    MISSING_COLUMN,
    PermanentError,
    RetryableError,
)

from .config import format_of  # noqa: F401  (re-exported: the suffix rule lives with the config)

SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".jsonl.gz"),
    "csv": (".csv", ".csv.gz"),
    "parquet": (".parquet",),
}
_REFUSED: dict[str, tuple[str, ...]] = {"parquet": (".parquet.gz",)}  # listed, then refused by name
PARQUET_BATCH_ROWS = 1024
_PARQUET_BUFFER = 1 << 20
_CHUNK = 4 << 20
_LINE_CHUNK = 1 << 20  # iter_lines: a chunk and its lines are what a shard costs in memory
_BOM = b"\xef\xbb\xbf"


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
    """The shards of a dataset in URI order (one entry for a single file or object). A shard the format
    refuses (``.parquet.gz``) is ``InvalidDataset`` naming it, before anything is read."""
    found = _list(path, fmt, source)
    for s in found:
        if s.uri.lower().endswith(_REFUSED.get(fmt, ())):
            raise _gzipped_parquet(s.uri)
    return found


def _gzipped_parquet(uri: str) -> PermanentError:
    return PermanentError(
        INVALID_DATASET,
        f"{uri}: a parquet shard cannot be gzipped (parquet compresses its own pages); store it as .parquet",
    )


def _list(path: str, fmt: str, source: str) -> list[Shard]:
    shown = f" (dataset.source={source})" if source and source != path else ""
    suffixes = SUFFIXES[fmt] + _REFUSED.get(fmt, ())
    if not storage.is_remote(path):
        if not os.path.exists(path):
            raise PermanentError(DATASET_NOT_FOUND, f"dataset file {path} not found{shown}")
        if os.path.isdir(path):
            found = [p for p in _local_tree(path) if p.endswith(suffixes)]
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
    return [Shard(o.uri, o.size, o.etag) for o in storage.list_objects(path, suffixes)]


def _local_tree(root: str) -> list[str]:
    out: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in files)
    return sorted(out)


def _open(uri: str) -> BinaryIO:
    """The stored bytes of a shard as a binary file (local, or the object's streaming reader)."""
    if storage.is_remote(uri):
        return storage.open_read(uri)
    try:
        return open(uri, "rb")
    except IsADirectoryError:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset path {uri} is not a file") from None
    except OSError as e:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset file {uri} unreadable: {e.strerror}") from None


def _raw_chunks(shard: Shard, size: int) -> Iterator[bytes]:
    """The shard's stored bytes in chunks of at most ``size`` (a local file or a streamed object)."""
    uri = shard.uri
    if storage.is_remote(uri):
        with storage.open_read(uri) as f:
            while chunk := f.read(size):
                yield chunk
        return
    try:
        with open(uri, "rb") as f:
            while chunk := f.read(size):
                yield chunk
    except IsADirectoryError:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset path {uri} is not a file") from None
    except OSError as e:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset file {uri} unreadable: {e.strerror}") from None


class _Gunzip:
    """Streaming gzip decompression (several members allowed) whose errors name the line where the data
    broke; every output piece is at most ``piece`` bytes, whatever the compression ratio."""

    def __init__(self, uri: str, piece: int = _CHUNK) -> None:
        self.uri = uri
        self.piece = piece
        self.newlines = 0
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.in_member = False  # the current member has started and not ended

    def _error(self, what: str) -> PermanentError:
        return PermanentError(INVALID_DATASET, f"{self.uri}:{self.newlines + 1}: {what}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        full = False
        while data or full:
            if data:
                self.in_member = True
            try:
                out = self.d.decompress(data, self.piece)
            except zlib.error as e:
                raise self._error(f"corrupt gzip data ({e})") from None
            full = len(out) == self.piece
            if out:
                self.newlines += out.count(b"\n")
                yield out
            if self.d.eof:
                data, full = self.d.unused_data, False
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.in_member = False
            else:
                data = self.d.unconsumed_tail

    def close(self) -> Iterator[bytes]:
        if not self.in_member:
            return
        try:
            out = self.d.flush()
        except zlib.error as e:
            raise self._error(f"corrupt gzip data ({e})") from None
        self.newlines += out.count(b"\n")
        if out:
            yield out
        if not self.d.eof:
            raise self._error("truncated gzip data (the shard ends early)")


def iter_bytes(shard: Shard, size: int = _CHUNK) -> Iterator[bytes]:
    """The shard's content (gunzipped when it ends in ``.gz``) in chunks of bounded size."""
    if not shard.uri.lower().endswith(".gz"):
        yield from _raw_chunks(shard, size)
        return
    gz = _Gunzip(shard.uri, size)
    for chunk in _raw_chunks(shard, size):
        yield from gz.feed(chunk)
    yield from gz.close()


def _not_utf8(uri: str, line: int, e: UnicodeDecodeError, at: int) -> PermanentError:
    return PermanentError(
        INVALID_DATASET, f"{uri}:{line}: not UTF-8 text ({e.reason} at byte {at + e.start})"
    )


def iter_lines(shard: Shard) -> Iterator[str]:
    """The shard's text split after every ``\\n`` (kept), strict UTF-8, a leading BOM dropped: what
    ``read_text(shard).splitlines`` at ``\\n`` would give, as a stream. The last line is what follows the
    last newline (``""`` when the shard ends with one), so a shard yields ``count("\\n") + 1`` lines.
    Memory holds one chunk and the longest line, never the shard."""
    uri = shard.uri
    carry: list[bytes] = []
    pos = 0  # byte offset of the first byte in carry
    bom = 0  # 3 once a leading BOM was dropped (byte offsets in messages count after it, as read_text's)
    line = 1

    def decode(raw: bytes) -> str:
        nonlocal bom
        if line == 1 and raw.startswith(_BOM):
            raw, bom = raw[len(_BOM) :], len(_BOM)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(uri, line, e, pos - bom if line > 1 else 0) from None

    for chunk in iter_bytes(shard, _LINE_CHUNK):
        if b"\n" not in chunk:
            carry.append(chunk)
            continue
        parts = chunk.split(b"\n")
        parts[0] = b"".join([*carry, parts[0]])
        carry = [parts.pop()]
        for raw in parts:
            yield decode(raw) + "\n"
            pos += len(raw) + 1
            line += 1
    yield decode(b"".join(carry))


def read_text(shard: Shard) -> str:
    """The whole shard as strict UTF-8 text (gunzipped when it ends in ``.gz``)."""
    data = b"".join(iter_bytes(shard))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = len(_BOM) if data.startswith(_BOM) else 0
        line = data[: bom + e.start].count(b"\n") + 1
        raise _not_utf8(shard.uri, line, e, 0) from None


# --- parquet ---------------------------------------------------------------------------------------


def _arrow_detail(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def iter_parquet(
    shard: Shard, columns: Sequence[str], batch_rows: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a parquet shard: (row number from 1, ``columns`` as Python values; a null is None),
    read one record batch of at most ``batch_rows`` rows at a time (see the module docstring). Storage
    failures are the named storage errors; undecodable data is ``InvalidDataset`` naming the shard."""
    import pyarrow.parquet as pq

    uri = shard.uri
    if uri.lower().endswith(".gz"):
        raise _gzipped_parquet(uri)
    with _open(uri) as f:
        try:
            pf = pq.ParquetFile(f, buffer_size=_PARQUET_BUFFER)
            names = list(pf.schema_arrow.names)
        except (PermanentError, RetryableError):
            raise
        except Exception as e:  # ArrowInvalid (no magic bytes, bad footer), OSError (thrift), ...
            raise PermanentError(
                INVALID_DATASET, f"{uri}: not a readable parquet file ({_arrow_detail(e)})"
            ) from None
        for col in columns:
            if col not in names:
                raise PermanentError(
                    MISSING_COLUMN,
                    f"{uri}: column '{col}' not in the parquet schema (columns: {', '.join(names)})",
                )
        size = batch_rows or PARQUET_BATCH_ROWS
        batches = pf.iter_batches(batch_size=size, columns=list(columns), use_threads=False)
        row = 0
        while True:
            try:
                batch = next(batches, None)
                values = [] if batch is None else batch.to_pylist()
            except (PermanentError, RetryableError):
                raise
            except Exception as e:  # a corrupt page, bad compression, invalid UTF-8 in a string column
                raise PermanentError(
                    INVALID_DATASET, f"{uri}: row {row + 1}: corrupt parquet data ({_arrow_detail(e)})"
                ) from None
            if batch is None:
                return
            for fields in values:
                row += 1
                yield row, fields
