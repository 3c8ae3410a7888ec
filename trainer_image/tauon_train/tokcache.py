"""The tokenized-data cache: raw shards tokenized once, kept as flat arrays, read back by positioned reads
(local) or ranged reads (``s3://``).

Used for causal-lm datasets (``dataset.type`` text, chat, prompt-completion); sequence-classification
keeps the in-memory path of ``data``. This module knows storage, layout, concurrency and reading; what a
row becomes (parsing, validation, encoding) is the ``ShardEncoder`` that ``data`` passes in.

Key (``cache_key``)
    sha256 over the format version, the shard list (each shard's name relative to the dataset path, its
    size and etag/mtime), the tokenizer fingerprint (``tokenizer_fingerprint``: the fast tokenizer's
    serialized pipeline without truncation/padding state, else its vocabulary and init arguments; plus its
    class, chat template, special tokens and the tokenizers/transformers versions), ``dataset.type``,
    format and fields, the effective max length and packing. The same inputs give the same key on every
    rank and in every job, so a restart, a resume at another world size or another job reuses an entry.

Layout: ``<cache root>/<key>/``
    Per raw shard i (``shard-000042.*``, in the dataset's URI order):

    ``.ids``      uint32 token ids of every document, back to back (little-endian, raw)
    ``.targets``  uint8, 1 where the token is a target (chat and prompt-completion only; text's targets are
                  every token but a document's first)
    ``.offsets``  int64, n+1 token offsets of the n documents (one document per row, in row order; a row
                  with nothing to learn is a zero-length document, so the split sees the same n)
    ``.lines``    int64, the row's line within the shard (1-based); a row's identity is that plus the
                  lines of the shards before it (``index.json``)
    ``.done.json``      the marker, written LAST: documents, tokens and lines of the shard
    ``.error.json``     a failed shard: reason, message, the run that wrote it and whether the error is
                        the data's own (deterministic) or the run's (storage, retryable)
    ``.progress.json``  a heartbeat, rewritten while the shard is tokenized

    ``index.json`` (written last of all, by rank 0 once every shard has its marker): the key, format
    version, the shards with their counts, and the totals. Its presence is a cache hit. Temporary files
    (``.shard-*.tmp-*``) a crashed writer left behind are never read (nor removed).

Writes and concurrency
    Arrays stream into temporary files (local: next to their final name; ``s3://``: a local spool
    directory), then local ones are fsynced and renamed (``os.replace``) and remote ones uploaded (a PUT or
    multipart upload is atomic), and only then is the marker written. Content is a function of the key,
    so concurrent writers of one key (other ranks, other jobs) can only replace a file with the same
    bytes. A reader never trusts a shard without its marker, and a partial entry (arrays, no marker) is
    simply rebuilt.

Building (``build``; every rank, before any process group)
    Cache hit: nothing is tokenized or written. Otherwise rank r of W tokenizes, in order, the shards with
    ``i % W == r`` that have no marker, streaming each through the encoder in bounded chunks (neither a
    shard's text nor its ids are ever held whole), then waits (polling the markers with a bounded
    interval) until every shard is done; rank 0 then writes ``index.json`` and the others wait for it. A
    rank whose shard raises writes an error marker first; every rank then raises the error of the
    lowest-numbered failed shard once every shard before it is done, so all ranks fail identically
    without a process group. A waiting rank stops early when a shard before its next one has failed.
    Error markers of the data itself are trusted by everyone; those of a run (storage errors, retryable
    ones) only by the same run (``run_id``: job uid, attempt, torchrun run id and restart count), so a
    new attempt retries them. A rank retries its own shards' error markers whatever their origin. Waiting
    times out (``DataCacheTimeout``, retryable) only when nothing in the entry changed for
    ``TAUON_DATA_CACHE_TIMEOUT`` seconds (default 1800); the heartbeat keeps a long shard alive.

Reading (``TokenizedCorpus``)
    Document i's ids, targets and line are slices of the arrays: positioned reads (``os.pread``, at most
    ``_FILES`` files open) for local entries, ranged reads through one LRU block cache for ``s3://``
    entries (64 KiB blocks, 64 MiB in all; a random read costs one small GET). Local reads go through the
    page cache rather than memory maps:
    a map would count every page an epoch touches, i.e. the whole corpus, in the rank's RSS. Memory holds
    one int64 token offset per document (the global offsets), never the tokens: it does not grow with the
    corpus' text, only with its number of documents. Opening reads every shard's ``.offsets`` once.

Read-ahead (``s3://`` entries)
    A read that continues the previous read of the same file into a new block (a sequential scan: the
    rows of an evaluation pass, ``iter_documents``, the lines of a split) keeps the next ``_AHEAD`` (16)
    blocks of that file cached or in flight: once fewer than half of them are, the missing ones are
    fetched in the background in one ranged read (so a scan makes a few large reads, not many small ones);
    the rest of a read spanning several blocks is fetched in the background, in one ranged read, while
    its first block is read; ``TokenizedCorpus.prefetch(docs)`` (``CorpusDataset.prefetch`` and
    ``__getitems__``) starts the blocks of documents the caller will read next (the next micro-batches
    of the shuffled order). Training's own order is a random permutation, so sample to sample there is nothing
    sequential to detect: what a single item costs there is one 64 KiB ranged GET on a miss. The
    background work is bounded (4 threads, 32 blocks in flight, never past a file's end as its marker
    gives it); a fetch that failed raises its named storage error once, on the first read that needs one
    of its blocks (the others are fetched again when needed; never a hang: a read waits only for a fetch
    under way, which the storage timeouts bound); ``close`` cancels what has not started and joins the
    threads.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tauon_core import storage
from tauon_core.errors import DATASET_NOT_FOUND, PermanentError, RetryableError

from .shards import Shard

FORMAT_VERSION = 1
DATA_CACHE_TIMEOUT = "DataCacheTimeout"
INDEX = "index.json"
_DONE, _ERROR, _PROGRESS = ".done.json", ".error.json", ".progress.json"
_FLUSH_TOKENS = 1 << 20  # tokens buffered before they go to the temporary file
_HEARTBEAT_S = 60.0
_POLL_S = 5.0  # the longest pause between two looks at the markers
_FILES = 64  # open array files at most (local entries)
_TYPECODES = {"ids": "I", "targets": "B", "offsets": "q", "lines": "q"}  # uint32, uint8, int64, int64
assert array.array("I").itemsize == 4 and array.array("q").itemsize == 8
_BLOCK = 64 << 10  # ranged-read block (s3 entries): a random read costs about as much as 4 KiB would
_BLOCKS = 1024  # blocks kept (s3 entries): 64 MiB
_AHEAD = 16  # blocks read ahead of a sequential scan, in reads of at least half that (s3 entries)
_WORKERS = 4  # read-ahead threads (s3 entries)
_PENDING = 32  # blocks in flight at most (s3 entries)
_RUN_ERRORS = frozenset(
    {
        DATASET_NOT_FOUND,
        storage.STORAGE_UNREACHABLE,
        storage.STORAGE_ACCESS_DENIED,
        storage.BUCKET_NOT_FOUND,
        storage.OBJECT_NOT_FOUND,
    }
)


@dataclass(frozen=True)
class Document:
    """One row, tokenized: its ids, its targets (1/0 per token; None for text) and its line in the shard.
    A row with nothing to learn is ``Document([], [], line)`` (or ``[]``/None for text)."""

    ids: Sequence[int]
    targets: Sequence[int] | None
    line: int


# Tokenizes one shard as a stream of documents, one per row in order; returns the shard's line count.
ShardEncoder = Callable[[Shard], Generator[Document, None, int]]


@dataclass
class DatasetReport:
    """What building the datasets did (metrics.json ``dataset``, status.resolved.dataset)."""

    shards: int
    documents: int
    tokens: int
    cache_key: str | None = None  # None: not cached (the in-memory path)
    cache_hit: bool = False
    tokenize_seconds: float = 0.0

    def metrics(self) -> dict[str, float | str]:
        m: dict[str, float | str] = {
            "shards": self.shards,
            "documents": self.documents,
            "tokens": self.tokens,
        }
        if self.cache_key is not None:
            m["cacheKey"] = self.cache_key
            m["cacheHit"] = self.cache_hit
        m["tokenizeSeconds"] = round(self.tokenize_seconds, 3)
        return m

    def describe(self) -> str:
        cache = (
            f" cache={self.cache_key[:16]} ({'hit' if self.cache_hit else 'built'})"
            if self.cache_key is not None
            else ""
        )
        return (
            f"dataset: {self.shards} shards, {self.documents} documents, {self.tokens} tokens{cache}, "
            f"tokenized in {self.tokenize_seconds:.1f}s"
        )


# --- the key ---------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides how the tokenizer encodes (the same on every rank for the same files)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())  # without the truncation/padding a call left set
        copy.no_truncation()
        copy.no_padding()
        h.update(copy.to_str().encode())
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        kwargs = {
            k: v
            for k, v in getattr(tokenizer, "init_kwargs", {}).items()
            if "path" not in k and "dir" not in k
        }
        h.update(json.dumps([vocab, kwargs], sort_keys=True, default=_stable).encode())
    import tokenizers
    import transformers

    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": getattr(tokenizer, "special_tokens_map", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "versions": [tokenizers.__version__, transformers.__version__],
    }
    h.update(json.dumps(extra, sort_keys=True, default=_stable).encode())
    return h.hexdigest()


def _stable(o: object) -> str:
    """A value for the fingerprint that is the same in every process (never a memory address)."""
    text = str(o)
    return type(o).__name__ if " at 0x" in text else text


def shard_name(path: str, uri: str) -> str:
    """A shard's name relative to the dataset path (its base name for a single-file dataset)."""
    base = path.rstrip("/")
    if uri == base:
        return uri.rsplit("/", 1)[-1]
    return uri[len(base) + 1 :] if uri.startswith(base + "/") else uri


def cache_key(
    path: str,
    shards: Sequence[Shard],
    fingerprint: str,
    dataset: Mapping[str, object],
    max_len: int,
    packing: bool,
) -> str:
    """The entry's key: sha256 over everything its content depends on (see the module docstring)."""
    ident = {
        "format": FORMAT_VERSION,
        "shards": [[shard_name(path, s.uri), s.size, s.etag] for s in shards],
        "tokenizer": fingerprint,
        "dataset": dataset,
        "maxLen": max_len,
        "packing": packing,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def run_id(uid: str, attempt: int, env: dict[str, str] | None = None) -> str:
    """What tells this run's error markers from an earlier run's (the same on every rank of a gang)."""
    e = os.environ if env is None else env
    parts = [uid, str(attempt), e.get("TORCHELASTIC_RUN_ID", ""), e.get("TORCHELASTIC_RESTART_COUNT", "")]
    return ":".join(parts)


# --- one entry in storage ----------------------------------------------------------------------------


def _name(i: int, suffix: str) -> str:
    return f"shard-{i:06d}{suffix}"


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` whole: a unique temporary name, fsync, rename, fsync of the directory."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Entry:
    """One key's directory (local) or prefix (``s3://``): names are relative to it."""

    def __init__(self, root: str, key: str) -> None:
        self.remote = storage.is_remote(root)
        self.root = root if self.remote else storage.local_path(root)
        self.key = key
        self.uri = storage.join(self.root, key)

    def path(self, name: str) -> str:
        return storage.join(self.uri, name)

    def listing(self) -> dict[str, tuple[int, str]]:
        """Every file of the entry: name -> (size, mtime or etag)."""
        if not self.remote:
            out: dict[str, tuple[int, str]] = {}
            try:
                with os.scandir(self.uri) as it:
                    for e in it:
                        with contextlib.suppress(FileNotFoundError):  # a temp file renamed meanwhile
                            st = e.stat()
                            out[e.name] = (st.st_size, str(st.st_mtime_ns))
            except FileNotFoundError:
                pass
            return out
        prefix = self.uri + "/"
        try:
            found = storage.list_objects(prefix)
        except storage.StoragePermanentError as e:
            if e.reason == storage.OBJECT_NOT_FOUND:
                return {}
            raise
        return {o.uri[len(prefix) :]: (o.size, o.etag) for o in found}

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes | None:
        """The bytes of a file (None when it does not exist)."""
        path = self.path(name)
        if self.remote:
            try:
                return storage.read_bytes(path, start, end)
            except storage.StoragePermanentError as e:
                if e.reason == storage.OBJECT_NOT_FOUND:
                    return None
                raise
        try:
            with open(path, "rb") as f:
                f.seek(start or 0)
                return f.read() if end is None else f.read(end - (start or 0))
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object file; None when missing or not a JSON object (an entry never trusts it)."""
        data = self.read(name)
        try:
            obj = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, sort_keys=True).encode()
        if self.remote:
            storage.write_bytes(self.path(name), data)
        else:
            _atomic_write(self.path(name), data)

    def delete(self, name: str) -> None:
        """Best effort: a file left behind is only clutter."""
        with contextlib.suppress(OSError, PermanentError, RetryableError):
            if self.remote:
                storage.delete(self.path(name))
            else:
                os.remove(self.path(name))

    def temp_dir(self) -> str:
        """Where a shard's arrays are written before their commit."""
        if self.remote:
            return tempfile.mkdtemp(prefix="tauon-tokcache-")
        os.makedirs(self.uri, exist_ok=True)
        return self.uri

    def commit(self, tmp: str, name: str) -> None:
        """Make a finished temporary array file ``name`` (atomically: rename, or one upload)."""
        if self.remote:
            storage.upload_file(tmp, self.path(name))
            os.remove(tmp)
            return
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))


# --- writing one shard ------------------------------------------------------------------------------


class _ShardWriter:
    """Streams one shard's documents into temporary array files, in chunks of bounded size."""

    def __init__(self, entry: Entry, index: int, masked: bool) -> None:
        self.entry, self.index, self.masked = entry, index, masked
        self.dir = entry.temp_dir()
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        kinds = ["ids", "offsets", "lines"] + (["targets"] if masked else [])
        self.tmp = {k: os.path.join(self.dir, f".{_name(index, '.' + k)}.tmp-{tag}") for k in kinds}
        self.files = {k: open(p, "wb") for k, p in self.tmp.items()}
        self.buf = {k: array.array(_TYPECODES[k]) for k in kinds}  # 1-8 bytes per value, not a list
        self.buf["offsets"].append(0)
        self.documents = 0
        self.tokens = 0

    def add(self, doc: Document) -> None:
        n = len(doc.ids)
        self.buf["ids"].extend(doc.ids)  # OverflowError for an id outside uint32
        if self.masked:
            targets = doc.targets if doc.targets is not None else [1] * n
            if len(targets) != n:
                raise ValueError(f"document at line {doc.line}: {n} ids but {len(targets)} targets")
            self.buf["targets"].extend(targets)
        self.tokens += n
        self.documents += 1
        self.buf["offsets"].append(self.tokens)
        self.buf["lines"].append(doc.line)
        if len(self.buf["ids"]) >= _FLUSH_TOKENS or len(self.buf["lines"]) >= _FLUSH_TOKENS // 8:
            self.flush()

    def flush(self) -> None:
        for kind, values in self.buf.items():
            if values:
                if sys.byteorder == "big":  # the files are little-endian
                    values.byteswap()
                self.files[kind].write(values.tobytes())
                del values[:]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def commit(self, lines: int) -> dict[str, Any]:
        """Make the arrays and return the marker (which the caller writes last)."""
        self.flush()
        self.close()
        for kind, tmp in self.tmp.items():
            self.entry.commit(tmp, _name(self.index, "." + kind))
        return {"documents": self.documents, "tokens": self.tokens, "lines": lines}

    def abort(self) -> None:
        self.close()
        for tmp in self.tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def cleanup(self) -> None:
        if self.entry.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    index: int
    reason: str
    message: str
    retryable: bool

    def error(self) -> PermanentError | RetryableError:
        cls = RetryableError if self.retryable else PermanentError
        return cls(self.reason, self.message)


def _timeout_s() -> float:
    try:
        return max(1.0, float(os.environ.get("TAUON_DATA_CACHE_TIMEOUT", "1800")))
    except ValueError:
        return 1800.0


@dataclass
class _Builder:
    """One rank's part of building an entry: its shards, then the wait for everyone else's."""

    entry: Entry
    shards: Sequence[Shard]
    names: Sequence[str]
    encode: ShardEncoder
    masked: bool
    rank: int
    world: int
    run: str
    poll_s: float
    timeout_s: float
    own_failure: tuple[_Failure, BaseException] | None = None
    _markers: dict[str, tuple[tuple[int, str], _Failure | None]] = field(default_factory=dict)
    _last_check: float = 0.0

    def run_all(self) -> dict[str, Any]:
        """Tokenize this rank's missing shards, then wait; the index of the finished entry."""
        names = self.entry.listing()
        self._last_check = time.monotonic()
        for i in range(self.rank, len(self.shards), self.world):
            if self._failed_before(i):
                break
            if _name(i, _DONE) in names and self._done_marker(i) is not None:
                continue
            try:
                self._tokenize(i, stale_error=_name(i, _ERROR) in names)
            except Exception as e:  # recorded for the other ranks, raised here by _wait
                self._record_failure(i, e)
                break
        return self._wait()

    def _marker_base(self, i: int) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "key": self.entry.key, "shard": i, "name": self.names[i]}

    def _done_marker(self, i: int) -> dict[str, Any] | None:
        m = self.entry.read_json(_name(i, _DONE))
        if m is None or any(m.get(k) != v for k, v in self._marker_base(i).items()):
            return None
        if not all(isinstance(m.get(k), int) and m[k] >= 0 for k in ("documents", "tokens", "lines")):
            return None
        return m

    def _tokenize(self, i: int, stale_error: bool) -> None:
        writer = _ShardWriter(self.entry, i, self.masked)
        beat, beats = time.monotonic(), 0
        try:
            docs = self.encode(self.shards[i])
            while True:
                try:
                    writer.add(next(docs))
                except StopIteration as stop:
                    lines = int(stop.value)
                    break
                if time.monotonic() - beat > _HEARTBEAT_S:
                    beat, beats = time.monotonic(), beats + 1
                    progress = {"rank": self.rank, "run": self.run, "documents": writer.documents}
                    self.entry.write_json(_name(i, _PROGRESS), progress)
            marker = {**self._marker_base(i), **writer.commit(lines)}
        except BaseException:
            writer.abort()
            raise
        finally:
            writer.cleanup()
        self.entry.write_json(_name(i, _DONE), marker)
        if stale_error:
            self.entry.delete(_name(i, _ERROR))
        if beats:
            self.entry.delete(_name(i, _PROGRESS))

    def _record_failure(self, i: int, e: Exception) -> None:
        """Remember this rank's failure and write its error marker (best effort). Anything but a
        ``PermanentError`` is retryable for the other ranks (a crash restarts the gang anyway)."""
        if isinstance(e, PermanentError | RetryableError):
            failure = _Failure(i, e.reason, e.message, isinstance(e, RetryableError))
        else:
            failure = _Failure(i, type(e).__name__, f"{self.shards[i].uri}: {e}"[:2000], True)
        self.own_failure = (failure, e)
        marker = {
            **self._marker_base(i),
            "reason": failure.reason,
            "message": failure.message,
            "retryable": failure.retryable,
            "deterministic": not failure.retryable and failure.reason not in _RUN_ERRORS,
            "run": self.run,
        }
        with contextlib.suppress(PermanentError, RetryableError, OSError):
            self.entry.write_json(_name(i, _ERROR), marker)

    def _failure(self, name: str, sig: tuple[int, str]) -> _Failure | None:
        """The failure an error marker records, when this run trusts it (cached per version of the file)."""
        cached = self._markers.get(name)
        if cached is not None and cached[0] == sig:
            return cached[1]
        m = self.entry.read_json(name)
        failure = None
        if m is not None and m.get("key") == self.entry.key and isinstance(m.get("shard"), int):
            if m.get("deterministic") is True or m.get("run") == self.run:
                failure = _Failure(
                    m["shard"], str(m.get("reason")), str(m.get("message")), m.get("retryable") is True
                )
        self._markers[name] = (sig, failure)
        return failure

    def _first_failure(self, names: dict[str, tuple[int, str]]) -> _Failure | None:
        """The lowest-numbered failed shard (without a done marker) whose failure this run trusts."""
        found = [self.own_failure[0]] if self.own_failure else []
        for name, sig in names.items():
            if name.endswith(_ERROR) and name.removesuffix(_ERROR) + _DONE not in names:
                f = self._failure(name, sig)
                if f is not None:
                    found.append(f)
        return min(found, key=lambda f: f.index) if found else None

    def _failed_before(self, i: int) -> bool:
        """Whether a shard before ``i`` has failed (looked up at most once per poll interval)."""
        if time.monotonic() - self._last_check < self.poll_s:
            return False
        self._last_check = time.monotonic()
        first = self._first_failure(self.entry.listing())
        return first is not None and first.index < i

    def _wait(self) -> dict[str, Any]:
        """Poll the entry until every shard is done (then the index) or a trusted failure decides."""
        delay, last_sig, last_change = min(0.05, self.poll_s), None, time.monotonic()
        while True:
            names = self.entry.listing()
            if INDEX in names:
                index = self.entry.read_json(INDEX)
                if index is not None and _valid_index(index, self.entry.key, self.names):
                    return index
            first = self._first_failure(names)
            limit = first.index if first is not None else len(self.shards)
            if all(_name(i, _DONE) in names for i in range(limit)):
                if first is not None:
                    own = self.own_failure
                    raise own[1] if own is not None and own[0].index == first.index else first.error()
                if self.rank == 0:
                    return self._write_index()
            sig = tuple(sorted(names.items()))
            if sig != last_sig:
                last_sig, last_change = sig, time.monotonic()
            elif time.monotonic() - last_change > self.timeout_s:
                raise RetryableError(
                    DATA_CACHE_TIMEOUT,
                    f"{self.entry.uri}: nothing changed in the data cache for {self.timeout_s:.0f}s while "
                    f"waiting for shards tokenized by other ranks (TAUON_DATA_CACHE_TIMEOUT)",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, self.poll_s)

    def _write_index(self) -> dict[str, Any]:
        """Rank 0, every shard done: the index from the markers, written last."""
        shards = []
        for i, s in enumerate(self.shards):
            m = self._done_marker(i)
            if m is None:  # only a tampered entry gets here: rebuild that shard next time
                self.entry.delete(_name(i, _DONE))
                raise RetryableError(
                    DATA_CACHE_TIMEOUT, f"{self.entry.path(_name(i, _DONE))}: invalid marker"
                )
            shards.append(
                {
                    "name": self.names[i],
                    "size": s.size,
                    "etag": s.etag,
                    **{k: m[k] for k in ("documents", "tokens", "lines")},
                }
            )
        index = {
            "format": FORMAT_VERSION,
            "key": self.entry.key,
            "masked": self.masked,
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        self.entry.write_json(INDEX, index)
        return index


def _valid_index(index: dict[str, Any], key: str, names: Sequence[str]) -> bool:
    shards = index.get("shards")
    return (
        index.get("format") == FORMAT_VERSION
        and index.get("key") == key
        and isinstance(shards, list)
        and [s.get("name") if isinstance(s, dict) else None for s in shards] == list(names)
        and all(isinstance(s.get(k), int) for s in shards for k in ("documents", "tokens", "lines"))
    )


def build(
    root: str,
    key: str,
    shards: Sequence[Shard],
    names: Sequence[str],
    encode: ShardEncoder,
    masked: bool,
    *,
    rank: int = 0,
    world: int = 1,
    run: str = "",
    poll_s: float | None = None,
    timeout_s: float | None = None,
) -> tuple[TokenizedCorpus, DatasetReport]:
    """The corpus of entry ``key`` under ``root``, built first unless it is a cache hit (see the module
    docstring). ``tokenize_seconds`` in the report is this rank's time building the entry (its shards and
    the wait for the others'); 0 on a hit."""
    entry = Entry(root, key)
    index = entry.read_json(INDEX)
    hit = index is not None and _valid_index(index, key, names)
    seconds = 0.0
    if not hit:
        t0 = time.monotonic()
        poll, timeout = poll_s or _POLL_S, timeout_s or _timeout_s()
        builder = _Builder(entry, shards, names, encode, masked, rank, world, run, poll, timeout)
        index = builder.run_all()
        seconds = time.monotonic() - t0
    assert index is not None
    corpus = TokenizedCorpus(entry, index)
    return corpus, DatasetReport(len(shards), corpus.documents, corpus.tokens, key, hit, seconds)


# --- reading --------------------------------------------------------------------------------------

_DTYPES: dict[str, np.dtype[Any]] = {
    "ids": np.dtype("<u4"),
    "targets": np.dtype("u1"),
    "offsets": np.dtype("<i8"),
    "lines": np.dtype("<i8"),
}


class _LocalArrays:
    """Slices of local array files by positioned reads (``os.pread``; at most ``_FILES`` kept open). The
    page cache serves them and nothing is mapped into the process: a memory map would count every page an
    epoch touches (all of them) in the rank's RSS."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()

    def _fd(self, name: str) -> int:
        with self.lock:
            fd = self.fds.get(name)
            if fd is not None:
                self.fds.move_to_end(name)
                return fd
            fd = os.open(self.entry.path(name), os.O_RDONLY)
            self.fds[name] = fd
            if len(self.fds) > _FILES:
                os.close(self.fds.popitem(last=False)[1])
            return fd

    def slice(self, name: str, kind: str, a: int, b: int) -> np.ndarray[Any, Any]:
        dtype = _DTYPES[kind]
        if b <= a:
            return np.empty(0, dtype)
        n = (b - a) * dtype.itemsize
        data = os.pread(self._fd(name), n, a * dtype.itemsize)
        if len(data) != n:
            raise RetryableError(DATA_CACHE_TIMEOUT, f"{self.entry.path(name)}: shorter than its marker says")
        return np.frombuffer(data, dtype).copy()

    def __del__(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class _RemoteArrays:
    """Slices of remote array files through ranged reads, one LRU cache of ``_BLOCK``-byte blocks and a
    small read-ahead (see the module docstring, Reading). ``limits``: each file's size in bytes (from the
    markers), so a read-ahead never asks past a file's end; a file without one is never read ahead.

    Background fetches run on at most ``_WORKERS`` threads, at most ``_PENDING`` blocks in flight (memory:
    ``_BLOCKS + _PENDING`` blocks at most), consecutive blocks in one ranged read. A fetch that fails stays
    pending until the first read that needs one of its blocks raises its error (the same named storage
    error a direct read would raise); one nobody needs is never raised. ``close`` cancels what has not started and joins the threads; reads still work after it,
    without read-ahead."""

    def __init__(self, entry: Entry, limits: Mapping[str, int] | None = None) -> None:
        self.entry = entry
        self.limits = dict(limits or {})
        self.size, self.keep, self.ahead, self.in_flight = _BLOCK, _BLOCKS, _AHEAD, _PENDING
        self.blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.pending: dict[tuple[str, int], Future[dict[tuple[str, int], bytes]]] = {}
        self.last: dict[str, int] = {}  # per file: the last block the previous read touched
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pool_pid = 0
        self.closed = False

    def _fetch(self, name: str, k: int) -> bytes:
        data = self.entry.read(name, k * self.size, (k + 1) * self.size)
        if data is None:
            raise storage.StoragePermanentError(
                storage.OBJECT_NOT_FOUND, self.entry.path(name), "no such object"
            )
        return data

    def _keep(self, key: tuple[str, int], data: bytes) -> None:
        """Caller holds the lock."""
        self.blocks[key] = data
        self.blocks.move_to_end(key)
        while len(self.blocks) > self.keep:
            self.blocks.popitem(last=False)

    def _fetch_run(self, name: str, first: int, last: int) -> dict[tuple[str, int], bytes]:
        """Blocks ``first..last`` of a file in one ranged read (fewer blocks at the file's end)."""
        data = self.entry.read(name, first * self.size, (last + 1) * self.size)
        if data is None:
            raise storage.StoragePermanentError(
                storage.OBJECT_NOT_FOUND, self.entry.path(name), "no such object"
            )
        n = self.size
        return {(name, k): data[(k - first) * n : (k - first + 1) * n] for k in range(first, last + 1)}

    def _background(self, name: str, first: int, last: int) -> dict[tuple[str, int], bytes]:
        blocks = self._fetch_run(name, first, last)  # an error stays in the future, for a read to raise
        with self.lock:
            for key, data in blocks.items():
                if data:
                    self._keep(key, data)
                self.pending.pop(key, None)
        return blocks

    def _schedule(self, name: str, ks: Iterable[int], run: int = 1) -> None:
        """Fetch these blocks of ``name`` in the background (those not cached, not in flight, within the
        file), runs of up to ``run`` consecutive blocks in one ranged read each."""
        with self.lock:
            if self.closed:
                return
            self._forget_parent()
            if self.pool is None:
                self.pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="tauon-readahead")
                self.pool_pid = os.getpid()
            limit = self.limits.get(name, 0)
            todo = sorted(
                k
                for k in set(ks)
                if (name, k) not in self.blocks and (name, k) not in self.pending and k * self.size < limit
            )
            runs: list[list[int]] = []
            for k in todo:
                if runs and runs[-1][-1] == k - 1 and len(runs[-1]) < run:
                    runs[-1].append(k)
                else:
                    runs.append([k])
            for r in runs:
                if len(self.pending) + len(r) > self.in_flight:
                    break
                fut = self.pool.submit(self._background, name, r[0], r[-1])
                self.pending.update({(name, k): fut for k in r})

    def _forget_parent(self) -> None:
        """In a forked child (a DataLoader worker): the parent's threads and fetches are not here, so
        nothing may wait for them. Caller holds the lock."""
        if self.pool is not None and self.pool_pid != os.getpid():
            self.pool, self.pending = None, {}

    def _block(self, name: str, k: int) -> bytes:
        key = (name, k)
        with self.lock:
            self._forget_parent()
            data = self.blocks.get(key)
            if data is not None:
                self.blocks.move_to_end(key)
                return data
            fut = self.pending.get(key)
        data = None
        if fut is not None:
            try:
                data = fut.result().get(key)
            except CancelledError:  # closed meanwhile: read it here
                pass
            except BaseException:
                with self.lock:  # raised once: the run's other blocks are read again when needed
                    for other in [x for x, f in self.pending.items() if f is fut]:
                        del self.pending[other]
                raise
        if not data:
            data = self._fetch(name, k)
        with self.lock:
            self._keep(key, data)
        return data

    def _read_ahead(self, name: str, first: int, last: int) -> None:
        # a scan: once fewer than half the ``ahead`` blocks after ``last`` are cached or in flight, the
        # missing ones up to ``last + ahead`` go in one ranged read (a few large reads, not many small)
        """Blocks a read of ``[first, last]`` will need next: the rest of a multi-block read, and the
        next ``ahead`` blocks when it continues the file's previous read into a new block (a sequential
        scan; random reads, and reads that stay within the previous one's block, schedule nothing)."""
        with self.lock:
            prev = self.last.get(name)
            self.last[name] = last
        if last > first:
            self._schedule(name, range(first + 1, last + 1), run=last - first)
        if self.ahead and prev is not None and first in (prev, prev + 1) and last > prev:
            with self.lock:
                ready = sum(
                    (name, k) in self.blocks or (name, k) in self.pending
                    for k in range(last + 1, last + 1 + self.ahead)
                )
            if ready < (self.ahead + 1) // 2:
                self._schedule(name, range(last + 1, last + 1 + self.ahead), run=self.ahead)

    def prefetch(self, name: str, kind: str, a: int, b: int) -> None:
        """Start fetching the blocks a later ``slice(name, kind, a, b)`` needs."""
        if b > a:
            n = _DTYPES[kind].itemsize
            first, last = a * n // self.size, (b * n - 1) // self.size
            self._schedule(name, range(first, last + 1), run=last - first + 1)

    def slice(self, name: str, kind: str, a: int, b: int) -> np.ndarray[Any, Any]:
        dtype = _DTYPES[kind]
        if b <= a:
            return np.empty(0, dtype)
        lo, hi = a * dtype.itemsize, b * dtype.itemsize
        first, last = lo // self.size, (hi - 1) // self.size
        self._read_ahead(name, first, last)
        parts = []
        for k in range(first, last + 1):
            block = self._block(name, k)
            parts.append(block[max(lo - k * self.size, 0) : hi - k * self.size])
        data = b"".join(parts)
        if len(data) != hi - lo:
            raise RetryableError(DATA_CACHE_TIMEOUT, f"{self.entry.path(name)}: shorter than its marker says")
        return np.frombuffer(data, dtype).copy()

    def close(self) -> None:
        """Stop the read-ahead: cancel what has not started, wait for what has, join the threads."""
        with self.lock:
            self.closed = True
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class TokenizedCorpus:
    """The documents of one entry, by global index (shards in order, rows in order within a shard)."""

    def __init__(self, entry: Entry, index: dict[str, Any]) -> None:
        self.entry = entry
        shards = index["shards"]
        self.masked = bool(index.get("masked"))
        self.num_shards = len(shards)
        counts = np.array([s["documents"] for s in shards], dtype=np.int64)
        self.doc_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.line_base = np.concatenate([[0], np.cumsum([s["lines"] for s in shards])]).astype(np.int64)
        self.tok_start = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])]).astype(np.int64)
        self.documents = int(self.doc_start[-1])
        self.tokens = int(self.tok_start[-1])
        limits: dict[str, int] = {}
        for i, sh in enumerate(shards):
            limits[_name(i, ".ids")] = 4 * sh["tokens"]
            limits[_name(i, ".targets")] = sh["tokens"] if self.masked else 0
            limits[_name(i, ".lines")] = 8 * sh["documents"]
        self.limits = limits  # each array file's size in bytes, as the markers give it
        self.arrays: _LocalArrays | _RemoteArrays = (
            _RemoteArrays(entry, limits) if entry.remote else _LocalArrays(entry)
        )
        self.starts = np.zeros(self.documents + 1, dtype=np.int64)  # global token offset of each document
        for i, s in enumerate(shards):
            a, b = int(self.doc_start[i]), int(self.doc_start[i + 1])
            raw = entry.read(_name(i, ".offsets"))
            off = np.frombuffer(raw or b"", _DTYPES["offsets"])
            if len(off) != b - a + 1 or (len(off) and int(off[-1]) != s["tokens"]):
                raise RetryableError(
                    DATA_CACHE_TIMEOUT, f"{entry.path(_name(i, '.offsets'))}: does not match its marker"
                )
            self.starts[a : b + 1] = off + self.tok_start[i]

    def lengths(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Every document's token count (0: nothing to learn)."""
        return np.diff(self.starts)

    def _locate(self, doc: int) -> tuple[int, int, int]:
        """(shard, first token, end token) of a document, token offsets within its shard."""
        if not 0 <= doc < self.documents:
            raise IndexError(doc)
        s = int(np.searchsorted(self.doc_start, doc, side="right")) - 1
        base = int(self.tok_start[s])
        return s, int(self.starts[doc]) - base, int(self.starts[doc + 1]) - base

    def prefetch(self, docs: Iterable[int]) -> None:
        """Start reading these documents' ids (and targets) in the background (``s3://`` entries; at most
        ``_PENDING`` blocks in flight, the rest is read when asked for); nothing for local entries."""
        arrays = self.arrays
        if not isinstance(arrays, _RemoteArrays):
            return
        for doc in docs:
            s, a, b = self._locate(int(doc))
            arrays.prefetch(_name(s, ".ids"), "ids", a, b)
            if self.masked:
                arrays.prefetch(_name(s, ".targets"), "targets", a, b)

    def close(self) -> None:
        """Stop the read-ahead threads (reads still work, without read-ahead)."""
        if isinstance(self.arrays, _RemoteArrays):
            self.arrays.close()

    def ids(self, doc: int) -> np.ndarray[Any, Any]:
        s, a, b = self._locate(doc)
        return self.arrays.slice(_name(s, ".ids"), "ids", a, b)

    def targets(self, doc: int) -> np.ndarray[Any, Any] | None:
        """1 where a token is a target (chat, prompt-completion); None for text (every token but the first)."""
        if not self.masked:
            return None
        s, a, b = self._locate(doc)
        return self.arrays.slice(_name(s, ".targets"), "targets", a, b)

    def line(self, doc: int) -> int:
        """The row's identity: its line counted across the shards in order (as ``data.Row.line``)."""
        s, _, _ = self._locate(doc)
        j = doc - int(self.doc_start[s])
        return int(self.arrays.slice(_name(s, ".lines"), "lines", j, j + 1)[0]) + int(self.line_base[s])


def iter_documents(
    corpus: TokenizedCorpus,
) -> Iterator[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None, int]]:
    """(ids, targets, line) of every document in order (for tests and tools)."""
    for d in range(corpus.documents):
        yield corpus.ids(d), corpus.targets(d), corpus.line(d)
