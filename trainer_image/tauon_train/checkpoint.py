"""Sharded checkpoints (torch.distributed.checkpoint) that resume at any world size, under either strategy,
in a local directory or under an ``s3://`` prefix.

``Checkpointer`` owns the checkpoints of a run: ``save`` (the attempt fence, every rank's shards, rank 0's
commit; in the background by default), ``wait``/``close`` (the save in flight), ``resume`` (the newest checkpoint that validates, older ones as fallback, one whose data fails to load
moved aside unless it is the last) and ``check_fence``. The functions below it are the layout; each takes a local path
or an ``s3://`` URI.

Layout under ``<output>/checkpoints/``::

    step-N/                  a finished checkpoint
      dcp/                   torch.distributed.checkpoint: {"model": ..., "optim": ...}; every rank writes
                             its own shards (FSDP: its DTensor shards; DDP: rank 0 writes the replicated
                             tensors once). For LoRA only the trainable parameters are stored.
      rng/rank-R.pt          RNG states of rank R (restored when the world size is unchanged)
      state.json             step, epoch, global sample position in the epoch, world size, strategy,
                             owner uid, running loss sums
      complete               written last (the sha256 of every other file); without it, never loaded
    .tmp-step-N-<random>/    local only: being written (or left by a crash; removed at the next start)

Visibility. Locally a checkpoint is written into ``.tmp-step-N-*`` and renamed into place in one
``os.rename`` by global rank 0. S3 has no rename: the checkpoint is written in place under ``step-N/``
(``FsspecWriter``/``FsspecReader`` with the store's options from ``tauon_core.storage``), and the
``complete`` object, written by rank 0 after every rank's shards, the DCP metadata and state.json are
stored (S3 PUTs are read-after-write consistent), is what makes it one. Rank 0 re-checks the attempt
fence just before writing it. Re-saving a step deletes its ``complete`` first; retention deletes
``complete`` before the rest of the prefix; a prefix without ``complete`` is removed at the next start.

Background saves (the trainer's default; ``TAUON_CHECKPOINT_SYNC=1`` forces the blocking path). ``save``
waits for the previous save (raising its failure), checks the fence, gets the target from rank 0 and
copies the state to host memory (``torch.distributed.checkpoint.async_save``'s staging), then returns:
the training step resumes. In a background thread every rank writes its shards (DCP's collectives on a
gloo process group of the checkpointer's own, never interleaved with training's) and its RNG state, all
ranks agree, and rank 0 re-checks the fence and commits. The guarantees are those of the blocking path:
the ``complete`` marker is written only after every rank's files are durable (fsync'd locally, PUT on S3)
and the fence was re-checked; a failure on any rank is agreed in the background and raised on every rank
by the next ``save`` or ``wait`` (the trainer's ``finish``, before the final model), with the same
classification; a process killed mid-save leaves no marker, so the previous checkpoint stays the newest.

Errors. Storage failures are the named errors of ``tauon_core.storage`` (with the URI): DCP's per-rank
failures are converted where they happen, and every rank raises the same error (``StorageUnreachable``
is retryable; the restart resumes). An unreachable store never makes a checkpoint look invalid: only a
missing object or unreadable content does.

Parameter names are those of ``get_state_dict`` (wrapper prefixes removed), so a checkpoint written
under ddp loads under fsdp and the other way round, at any world size (DCP reshards on load). The
learning-rate schedule is a function of the step and is recomputed, not stored.

Only the newest ``KEEP`` complete checkpoints are kept. ``validate`` checks a checkpoint without loading
it, so a bad newest checkpoint falls back to the previous one before any tensor is touched.

A checkpoint is untrusted input (anyone who can write the output directory could plant one):

- ``complete`` records the sha256 of every other file of the checkpoint (``SUMS``), computed by each rank
  while it writes its files (``_HashingFileSystem`` around DCP's writer) and gathered to rank 0, so the
  commit reads nothing back; ``validate`` checks ``.metadata`` against it before unpickling it, then every shard's size and
  every file's checksum. (A checkpoint of an older trainer has no checksums: sizes only.) They catch
  corruption and partial tampering; whoever can rewrite ``complete`` too is stopped by the next point.
- DCP's ``.metadata`` is a pickle: it is read only through ``_MetadataUnpickler`` (DCP's metadata types,
  ``torch.Size``, dtypes, layouts, nothing callable beyond them), by ``validate`` and by DCP itself during
  the load (``_reader`` overrides ``read_metadata``); non-tensor values in the shards (optimizer
  hyperparameters) must load with ``weights_only=True``. Anything else is ``UnsafeCheckpoint``.
- ``state.json`` names the job that wrote it (``owner_uid``): a checkpoint of another job than the one
  that claimed the output is refused (``OutputInUse``), never resumed.

Failures while loading are judged by cause. Data errors (``CheckpointDataError``: a checksum mismatch, a
refused pickle, a missing shard, unparseable content) move the checkpoint aside (``.corrupt-step-N-*``,
removed at the next start; on S3 its ``complete`` is deleted) and the run fails retryably, so the restart
resumes from the previous one; but the last remaining checkpoint is never moved: the run fails
``CheckpointCorrupt`` (permanent) and keeps it, as it does when no complete checkpoint validates (never a
silent restart from step 0). Any other failure (EIO, an OOM at a new world size, a collective timeout)
keeps the checkpoint and fails retryably (``CheckpointUnreadable``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import numpy as np
import torch
from torch import nn

from tauon_core import storage
from tauon_core.errors import (
    ATTEMPT_SUPERSEDED,
    CHECKPOINT_CORRUPT,
    CHECKPOINT_UNREADABLE,
    OUTPUT_IN_USE,
    PermanentError,
    RetryableError,
)

from . import dist
from .output import Superseded, check_fence, claimed_uid, fence_status, fsync_dir, fsync_tree

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions

T = TypeVar("T")

KEEP = 2
COMPLETE = "complete"
STATE = "state.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"
METADATA = f"{DCP_DIR}/.metadata"  # relative to the checkpoint, as the checksums name files
SUMS = "sha256"  # the key of the per-file checksums in the ``complete`` marker
_STEP_RE = re.compile(r"^step-(\d+)$")
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a file directly in dcp/ (no / or ..)
_HASH_CHUNK = 8 << 20
_HASH_THREADS = 8


class CheckpointDataError(Exception):
    """The checkpoint's own content is bad: a checksum mismatch, a refused pickle, a missing shard,
    unparseable data. The only kind of load failure that moves a checkpoint aside."""


class UnsafeCheckpoint(CheckpointDataError):
    """A pickle in the checkpoint refers to something other than DCP's metadata types or plain values;
    it is refused before anything it names is called."""


# What DCP's ``.metadata`` pickle may name (found by pickling the metadata of real DDP and FSDP saves).
_METADATA_GLOBALS = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", n)
            for n in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a torch.layout by name (a lookup, nothing else)
        ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other class or function (``os.system``, ``builtins.eval``...) is
    refused with ``UnsafeCheckpoint`` when the pickle names it, before it could be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(
            f"DCP metadata names {module}.{name}, which is not one of DCP's metadata types; refusing to "
            "unpickle it (a checkpoint written by something other than torch.distributed.checkpoint)"
        )


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress (or next to start)
    sample_pos: int = 0  # global position in the epoch's sample order (samples of `epoch` consumed)
    total_steps: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    owner_uid: str = ""
    train_loss_sum: float = 0.0  # sum over optimizer steps of the (global) step loss
    train_loss_count: int = 0
    samples_seen: int = 0  # global training samples processed so far
    tokens_seen: int = 0
    extra: dict[str, float | None] = field(default_factory=dict)  # initialEval* of a fresh run


def checkpoints_dir(output: str) -> str:
    return storage.join(output, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def _remote(path: str) -> bool:
    return storage.is_remote(path)


def _remote_steps(ckdir: str) -> dict[str, set[str]]:
    """S3: every ``step-N`` prefix under ``ckdir`` and the objects under it (relative names), one listing."""
    base = ckdir.rstrip("/") + "/"
    out: dict[str, set[str]] = {}
    for obj in storage.list_tree(ckdir):
        name, _, rel = obj.uri[len(base) :].partition("/")
        if _STEP_RE.match(name):
            out.setdefault(name, set()).add(rel)
    return out


def list_complete(ckdir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first. Incomplete and temporary dirs are ignored."""
    out: list[tuple[int, str]] = []
    if _remote(ckdir):
        for name, rels in _remote_steps(ckdir).items():
            if COMPLETE in rels:
                out.append((int(name.split("-")[1]), storage.join(ckdir, name)))
        return sorted(out)
    try:
        names = os.listdir(ckdir)
    except FileNotFoundError:
        return out
    for name in names:
        m = _STEP_RE.match(name)
        path = os.path.join(ckdir, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            out.append((int(m.group(1)), path))
    out.sort()
    return out


def latest_complete(ckdir: str) -> tuple[int, str] | None:
    found = list_complete(ckdir)
    return found[-1] if found else None


def remove_stale(ckdir: str) -> list[str]:
    """Remove temporary dirs left by a crash and step dirs without the ``complete`` marker."""
    removed: list[str] = []
    if _remote(ckdir):
        for name, rels in sorted(_remote_steps(ckdir).items()):
            if COMPLETE not in rels:
                storage.delete(storage.join(ckdir, name), recursive=True)
                removed.append(name)
        return removed
    try:
        names = os.listdir(ckdir)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(ckdir, name)
        stale = name.startswith((".tmp-", ".old-", ".corrupt-"))
        if stale or (_STEP_RE.match(name) and not os.path.isfile(os.path.join(path, COMPLETE))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _delete_remote_checkpoint(path: str) -> None:
    """S3: ``complete`` first, so a half-deleted prefix never looks like a checkpoint."""
    storage.delete(storage.join(path, COMPLETE))
    storage.delete(path, recursive=True)


def prune(ckdir: str, keep: int = KEEP) -> None:
    found = list_complete(ckdir)
    for _, path in found[:-keep] if keep > 0 else found:
        if _remote(path):
            _delete_remote_checkpoint(path)
            continue
        # rename first so a half-deleted dir never looks like a checkpoint
        trash = os.path.join(ckdir, f".old-{os.path.basename(path)}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _write_json(path: str, obj: object) -> None:
    if _remote(path):
        storage.write_bytes(path, _json_bytes(obj))
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# --- DCP through fsspec (S3), with the named storage errors ----------------------------------


def _named(exc: BaseException, uri: str) -> BaseException:
    """The error to raise for ``exc`` (from DCP or storage) while working on ``uri``: a named storage
    error for S3 (out of a ``CheckpointException``'s per-rank failures too), else ``exc`` itself."""
    inner = [f[0] for f in getattr(exc, "failures", {}).values()] or [exc]
    for cls in (RetryableError, PermanentError):  # any rank's unreachable store wins: retry
        found = next((e for e in inner if isinstance(e, cls)), None)
        if found is not None:
            return found
    first = inner[0]
    if _remote(uri) and isinstance(first, Exception) and storage.is_storage_failure(first):
        return storage.classify(first, uri)
    return first if isinstance(first, Exception) else exc  # not a BaseException that escapes main()


class _HashingStream:
    """A DCP output stream that computes the sha256 of the bytes as they are written (DCP writes each
    file front to back: ``write``, ``tell``, ``flush``, ``fileno`` for the fsync, ``close``; it never
    seeks), so the commit needs no second read of the checkpoint."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def write(self, b: Any) -> int:
        n: int | None = self._raw.write(b)
        view = memoryview(b).cast("B")
        self._hash.update(view if n is None or n >= view.nbytes else view[:n])
        return view.nbytes if n is None else n

    def tell(self) -> int:
        return int(self._raw.tell())

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return int(self._raw.fileno())  # fsspec's files raise here: DCP then relies on flush/close

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # a seek would invalidate the running hash

    def close(self) -> None:
        self._raw.close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _file_name(path: Any) -> str:
    return str(path).replace(os.sep, "/").rsplit("/", 1)[-1]


class _HashingFileSystem:
    """Wraps a DCP writer's ``fs`` (``FileSystem`` locally, the fsspec one on S3): every file written
    through it gets its sha256 recorded by name once its stream closed without error; a rename (DCP
    writes ``.metadata.tmp`` and renames it) moves the record. ``delay`` (a test hook, see
    ``_test_write_delay``) sleeps once, after the first file was created, before writing to it."""

    def __init__(self, inner: Any, delay: float = 0.0) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._delay = delay
        self.sums: dict[str, str] = {}  # file name in dcp/ -> sha256

    def __getattr__(self, name: str) -> Any:  # concat_path, init_path, mkdir, exists, rm_file, ...
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with self._inner.create_stream(path, mode) as raw:
                yield raw
            return
        with self._inner.create_stream(path, mode) as raw:
            if self._delay > 0:
                delay, self._delay = self._delay, 0.0
                time.sleep(delay)
            stream = _HashingStream(raw)
            yield stream
        with self._lock:
            self.sums[_file_name(path)] = stream.hexdigest()

    def rename(self, path: Any, new_path: Any) -> None:
        self._inner.rename(path, new_path)
        with self._lock:
            digest = self.sums.pop(_file_name(path), None)
            if digest is not None:
                self.sums[_file_name(new_path)] = digest


def _written(writer: FileSystemWriter) -> dict[str, str]:
    """The sha256 of each file ``writer`` wrote, relative to the checkpoint (``dcp/<name>``)."""
    fs = writer.fs
    sums = fs.sums if isinstance(fs, _HashingFileSystem) else {}
    return {f"{DCP_DIR}/{name}": digest for name, digest in sums.items()}


TEST_WRITE_DELAY_ENV = "TAUON_TEST_CHECKPOINT_WRITE_DELAY"


def _test_write_delay(step: int) -> float:
    """Test hook (never set by the operator): ``TAUON_TEST_CHECKPOINT_WRITE_DELAY=<from step>:<seconds>``
    makes every rank's DCP write of each checkpoint at or after that step sleep that long after creating
    its first shard file, so a test can kill a run while a (background) save is in progress."""
    raw = os.environ.get(TEST_WRITE_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    first, _, seconds = raw.partition(":")
    try:
        return float(seconds) if step >= int(first) else 0.0
    except ValueError:
        raise ValueError(
            f"{TEST_WRITE_DELAY_ENV}={raw!r}: expected <from step>:<seconds>, e.g. 4:30"
        ) from None


def _writer(path: str, delay: float = 0.0) -> FileSystemWriter:
    """The DCP writer for ``path``: ``FileSystemWriter`` (fsync) locally, ``FsspecWriter`` on S3; either
    computes the sha256 of each file as it writes it (``_written``)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.fsspec_filesystem import FsspecWriter

    if not _remote(path):
        local = FileSystemWriter(path, sync_files=True)
        local.fs = _HashingFileSystem(local.fs, delay)  # type: ignore[assignment]
        return local

    class _Writer(FsspecWriter):
        """Failures become named storage errors on the rank they happen on (they then reach every rank
        inside DCP's ``CheckpointException``); no ``makedirs`` (S3 has no directories, and s3fs would
        create a missing bucket) and no fsync (a finished PUT is durable)."""

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan  # the prefix was cleared by ``begin``: no metadata to find, nothing to create

        def write_data(self, plan: Any, planner: Any) -> Any:
            with storage.storage_failures(path):
                return super().write_data(plan, planner)

        def finish(self, metadata: Any, results: Any) -> None:
            with storage.storage_failures(path):
                super().finish(metadata, results)

    remote = _share_filesystem(_Writer(path, sync_files=False, **storage.fsspec_options(path)), path)
    remote.fs = _HashingFileSystem(remote.fs, delay)  # type: ignore[assignment]
    return remote


def load_metadata(f: BinaryIO, where: str) -> Any:
    """DCP's ``Metadata`` from the pickle in ``f`` through ``_MetadataUnpickler``, checked to be one (its
    shard files plain names inside dcp/). ``CheckpointDataError`` (``UnsafeCheckpoint``) for anything
    else; a failure to read ``f`` (the store's) propagates."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(f).load()
    except CheckpointDataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError) as e:
        raise CheckpointDataError(f"{where} unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise UnsafeCheckpoint(f"{where} holds a {type(md).__name__}, not DCP metadata")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str) or not _SHARD_NAME_RE.match(rel):
            raise UnsafeCheckpoint(f"{where} names a shard file {rel!r} outside its directory")
    return md


@contextlib.contextmanager
def _data_errors(where: str) -> Iterator[None]:
    """Content that fails to parse, or a file of the checkpoint that is not there, is the checkpoint's
    fault (``CheckpointDataError``); anything else (EIO, OOM, a timeout) propagates unchanged."""
    try:
        yield
    except (pickle.UnpicklingError, EOFError, FileNotFoundError) as e:
        raise CheckpointDataError(f"{where}: {type(e).__name__}: {e}") from None


def _safe_read_metadata(reader: Any, rank: int | None) -> Any:
    """DCP's ``FileSystemReader.read_metadata`` through ``load_metadata`` (torch unpickles it unrestricted).
    Only the global ``.metadata`` (tauon never writes rank-local ones, which DCP falls back to). DCP turns
    a failure here into an ``AssertionError`` naming it: the reader keeps the error as ``data_error``."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    if rank is not None:
        raise reader.data_error or CheckpointDataError("rank-local DCP metadata is never used")
    md_path = reader._get_metadata_path(None)
    try:
        with _data_errors(str(md_path)), reader.fs.create_stream(md_path, "rb") as f:
            md = load_metadata(f, str(md_path))
    except CheckpointDataError as e:
        reader.data_error = e
        raise
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    md.storage_meta.load_id = reader.load_id
    return md


def _reader(path: str) -> FileSystemReader:
    """The DCP reader for ``path``: metadata through the restricted unpickler (wherever DCP reads it, in
    ``dcp.load`` too), content errors as ``CheckpointDataError``; on S3 the named storage errors."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.fsspec_filesystem import FsspecReader

    class _LocalReader(FileSystemReader):
        data_error: CheckpointDataError | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return _safe_read_metadata(self, kwargs.get("rank"))

        def read_data(self, plan: Any, planner: Any) -> Any:
            with _data_errors(path):
                return super().read_data(plan, planner)

    if not _remote(path):
        return _LocalReader(path)

    class _Reader(FsspecReader):
        data_error: CheckpointDataError | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with storage.storage_failures(storage.join(path, ".metadata")):
                return _safe_read_metadata(self, kwargs.get("rank"))

        def read_data(self, plan: Any, planner: Any) -> Any:
            with _data_errors(path), storage.storage_failures(path):
                return super().read_data(plan, planner)

    return _share_filesystem(_Reader(path, **storage.fsspec_options(path)), path)


def _planner() -> Any:
    """DCP's default load planner, except that non-tensor values (optimizer hyperparameters) must be
    plain data (``torch.load(weights_only=True)``); DCP itself unpickles them unrestricted."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                fqn = read_item.dest_index.fqn
                raise UnsafeCheckpoint(f"value {fqn} is not plain data: {e}") from None
            value.seek(0)  # only plain data: the default (unrestricted) load runs nothing else
            super().load_bytes(read_item, value)

    return _Planner()


def _share_filesystem(dcp_io: T, path: str) -> T:
    """Give a DCP writer/reader the process's s3fs instance (``tauon_core.storage.filesystem``) instead
    of its own fresh one: the client set-up it saves is most of a small checkpoint's save (~0.1 s) and
    resume (~0.7 s) time. torch keeps the fsspec filesystem in ``.fs.fs``; should that change, DCP's own
    instance is used (slower, same result)."""
    inner = getattr(dcp_io, "fs", None)
    if inner is not None and hasattr(inner, "fs"):
        inner.fs = storage.filesystem(path)[0]
    return dcp_io


# --- writing (target -> every rank's shards -> rank 0 commits) -----------------------------------


def new_tmp_dir(ckdir: str, step: int) -> str:
    """Rank 0: a fresh temporary directory for step ``step`` (its name is broadcast to every rank)."""
    os.makedirs(ckdir, exist_ok=True)
    tmp = os.path.join(ckdir, f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}")
    os.makedirs(os.path.join(tmp, DCP_DIR))
    os.makedirs(os.path.join(tmp, RNG_DIR))
    return tmp


def begin(ckdir: str, step: int) -> str:
    """Rank 0: where every rank writes step ``step``: a fresh temporary directory locally; on S3 the
    ``step-N`` prefix itself, emptied first (``complete`` before the rest: a re-saved step is never
    loadable while it is rewritten)."""
    if not _remote(ckdir):
        return new_tmp_dir(ckdir, step)
    target = storage.join(ckdir, step_dir_name(step))
    _delete_remote_checkpoint(target)
    return target


def write_shards(tmp: str, app_state: dict[str, Any], rank: int, rng: dict[str, Any]) -> dict[str, str]:
    """Every rank (collective): its DCP shards of ``app_state`` and its RNG state. Returns the sha256 of
    each file this rank wrote (relative to the checkpoint), computed while writing."""
    from torch.distributed.checkpoint import state_dict_saver

    writer = _writer(storage.join(tmp, DCP_DIR))
    state_dict_saver.save(app_state, storage_writer=writer)
    return {**_written(writer), **write_rng(tmp, rank, rng)}


def write_rng(tmp: str, rank: int, rng: dict[str, Any]) -> dict[str, str]:
    """This rank's RNG state (fsync'd locally); returns its sha256 by relative name."""
    rel = f"{RNG_DIR}/rank-{rank}.pt"
    buf = io.BytesIO()
    torch.save(rng, buf)
    data = buf.getvalue()
    _write_bytes(storage.join(tmp, rel), data)
    return {rel: hashlib.sha256(data).hexdigest()}


def _write_bytes(path: str, data: bytes) -> None:
    """One file: a PUT on S3; locally written and fsync'd."""
    if _remote(path):
        storage.write_bytes(path, data)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- checksums (recorded in ``complete`` at commit, verified before any load) -----------------------


def checkpoint_files(path: str) -> list[str]:
    """Every file of the checkpoint at ``path`` but ``complete``, relative (``/``-separated), sorted."""
    if _remote(path):
        base = path.rstrip("/") + "/"
        rels = [o.uri[len(base) :] for o in storage.list_tree(path)]
    else:
        rels = [
            os.path.relpath(os.path.join(d, n), path).replace(os.sep, "/")
            for d, _dirs, files in os.walk(path)
            for n in files
        ]
    return sorted(r for r in rels if r != COMPLETE)


def _sha256(uri: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(uri) if _remote(uri) else open(uri, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checksums(path: str, rels: list[str]) -> dict[str, str]:
    """sha256 of each of ``rels`` under ``path`` (several files at once: hashlib releases the GIL)."""
    if not rels:
        return {}
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(rels))) as pool:
        return dict(zip(rels, pool.map(lambda rel: _sha256(storage.join(path, rel)), rels), strict=True))


def _marker(state: TrainState, sums: dict[str, str]) -> dict[str, Any]:
    """The ``complete`` marker: the step, and the sha256 of every other file of the checkpoint."""
    return {"step": state.step, "time": time.time(), SUMS: dict(sorted(sums.items()))}


def recorded_checksums(path: str) -> dict[str, str] | None:
    """The checksums in ``complete``; None for a marker without them (a checkpoint of an older trainer)."""
    raw = storage.read_bytes(storage.join(path, COMPLETE)) if _remote(path) else _read_local(path, COMPLETE)
    data = json.loads(raw)
    sums = data.get(SUMS) if isinstance(data, dict) else None
    if sums is None:
        return None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ValueError(f"{COMPLETE}: {SUMS} is not a map of file to checksum")
    return sums


def _read_local(path: str, rel: str) -> bytes:
    with open(os.path.join(path, rel), "rb") as f:
        return f.read()


def verify_checksums(path: str, rels: list[str], sums: dict[str, str]) -> str | None:
    """None when each of ``rels`` exists and matches its recorded sha256; else the first that does not.
    A read error other than a missing file propagates (the store's, not the checkpoint's)."""
    unrecorded = [rel for rel in rels if rel not in sums]
    if unrecorded:
        return f"{unrecorded[0]} has no recorded checksum"
    try:
        actual = checksums(path, rels)
    except (FileNotFoundError, storage.StoragePermanentError) as e:
        if isinstance(e, PermanentError) and not _missing(e):
            raise
        return f"a file is missing ({e})"
    bad = [rel for rel in rels if actual[rel] != sums[rel]]
    if bad:
        return f"checksum mismatch: {bad[0]} (sha256 {actual[bad[0]][:16]}, recorded {sums[bad[0]][:16]})"
    return None


def commit(
    tmp: str, ckdir: str, state: TrainState, keep: int = KEEP, *, sums: dict[str, str] | None = None
) -> str:
    """Rank 0, once every rank's shards are written and durable: state.json, the ``complete`` marker
    (locally: fsync, rename into place), prune. Returns the checkpoint's path.

    ``sums``: the sha256 of every file the ranks wrote (computed while writing them, gathered to rank 0);
    the checkpoint is not read again. Without them (a caller that wrote the files itself) every file is
    hashed by reading it back."""
    body = _json_bytes(asdict(state))
    if sums is None:
        sums = checksums(tmp, [rel for rel in checkpoint_files(tmp) if rel != STATE])
    sums = {**sums, STATE: hashlib.sha256(body).hexdigest()}
    if _remote(tmp):
        _write_bytes(storage.join(tmp, STATE), body)
        _write_json(storage.join(tmp, COMPLETE), _marker(state, sums))
        prune(ckdir, keep)
        return tmp
    name = step_dir_name(state.step)
    try:
        _write_bytes(os.path.join(tmp, STATE), body)
        _write_json(os.path.join(tmp, COMPLETE), _marker(state, sums))
        fsync_tree(tmp)  # directory entries (every rank fsync'd its own files already)
        final = os.path.join(ckdir, name)
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): swap it out
            old = os.path.join(ckdir, f".old-{name}-{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckdir, keep)
    return final


def discard(tmp: str) -> None:
    """Rank 0, after a failed or fenced save: drop a local temporary directory. On S3 nothing is deleted
    (the prefix has no ``complete``, so it is never loaded, and the next start removes it; deleting it
    here could delete a newer attempt's shards of the same step)."""
    if not _remote(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------


def read_state(path: str) -> TrainState:
    if _remote(path):
        raw = json.loads(storage.read_bytes(storage.join(path, STATE)))
    else:
        with open(os.path.join(path, STATE), encoding="utf-8") as f:
            raw = json.load(f)
    if "sample_pos" not in raw and "batches_in_epoch" in raw:  # checkpoints of older trainers
        raw["sample_pos"] = 0
    known = {k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw}
    return TrainState(**known)


def _missing(err: BaseException) -> bool:
    """A missing object: the checkpoint is incomplete (any other storage error is the store's, not the
    checkpoint's, and propagates)."""
    return isinstance(err, storage.StoragePermanentError) and err.reason == storage.OBJECT_NOT_FOUND


def _shard_sizes(dcp_dir: str, names: list[str]) -> dict[str, int]:
    """The size of each of ``names`` under ``dcp_dir`` that exists (one listing on S3)."""
    if _remote(dcp_dir):
        base = dcp_dir.rstrip("/") + "/"
        return {o.uri[len(base) :]: o.size for o in storage.list_tree(dcp_dir)}
    out = {}
    for rel in names:
        try:
            out[rel] = os.path.getsize(os.path.join(dcp_dir, rel))
        except OSError:
            pass
    return out


def read_metadata(dcp_dir: str) -> Any:
    """The DCP metadata of ``dcp_dir`` through the restricted unpickler (``UnsafeCheckpoint`` otherwise)."""
    return _reader(dcp_dir).read_metadata()


def _shard_needs(md: Any) -> dict[str, int]:
    """Each shard file the metadata names and the size it must have at least."""
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = info.relative_path
        sizes[rel] = max(sizes.get(rel, 0), int(info.offset) + int(info.length))
    return sizes


def _check_sizes(dcp_dir: str, sizes: dict[str, int]) -> str | None:
    have = _shard_sizes(dcp_dir, sorted(sizes))
    for rel, need in sorted(sizes.items()):
        if rel not in have:
            return f"shard {rel} missing"
        if have[rel] < need:
            return f"shard {rel} truncated ({have[rel]} of {need} bytes)"
    return None


def validate(path: str) -> str | None:
    """None when ``path`` looks loadable; else what is wrong with its data. Nothing is unpickled before
    its checksum matched: the metadata's checksum, then the metadata (restricted unpickler), the shard
    sizes, then every other file's checksum (checkpoints of older trainers have none: sizes only).
    Storage errors other than a missing object propagate (an unreachable store is not a bad checkpoint),
    so does a local read error other than a missing file (EIO)."""
    try:
        read_state(path)
        sums = recorded_checksums(path)
    except (FileNotFoundError, ValueError, TypeError, storage.StoragePermanentError) as e:
        if isinstance(e, PermanentError) and not _missing(e):
            raise
        return f"{STATE} or {COMPLETE} unreadable: {e}"
    if sums is not None:
        problem = verify_checksums(path, [METADATA], sums)
        if problem is not None:
            return problem
    dcp_dir = storage.join(path, DCP_DIR)
    try:
        needs = _shard_needs(read_metadata(dcp_dir))
    except CheckpointDataError as e:
        return f"DCP metadata refused: {type(e).__name__}: {e}"
    except (RetryableError, PermanentError) as e:
        if not _missing(e):
            raise
        return f"DCP metadata unreadable: {e}"
    problem = _check_sizes(dcp_dir, needs)
    if problem is not None or sums is None:
        return problem
    rest = sorted({*sums, *(f"{DCP_DIR}/{rel}" for rel in needs)} - {METADATA})
    return verify_checksums(path, rest, sums)


def load_shards(path: str, app_state: dict[str, Any]) -> None:
    """Every rank (collective): fill ``app_state`` in place from the checkpoint (resharding as needed)."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _reader(storage.join(path, DCP_DIR))
    try:
        state_dict_loader.load(app_state, storage_reader=reader, planner=_planner())
    except (Exception, CheckpointException) as e:
        refused = getattr(reader, "data_error", None)
        if refused is not None:  # DCP reports a metadata failure as an AssertionError: the named one
            raise refused from e
        raise


def is_data_error(exc: BaseException) -> bool:
    """Whether a load failure (``exc``, or any rank's failure inside DCP's ``CheckpointException``) is
    the checkpoint's own data: only those move a checkpoint aside."""
    inner = [f[0] for f in getattr(exc, "failures", {}).values()] or [exc]
    return any(isinstance(e, CheckpointDataError) or _missing(e) for e in inner)


def quarantine(path: str) -> str:
    """Move a checkpoint that failed to load out of the way (``.corrupt-step-N-*``, removed at the next
    start), so the restart falls back to the previous one instead of failing on it forever. On S3 its
    ``complete`` is deleted instead (the prefix is then removed at the next start)."""
    if _remote(path):
        storage.delete(storage.join(path, COMPLETE))
        return f"{path} (its {COMPLETE} marker deleted)"
    parent, name = os.path.split(path)
    dest = os.path.join(parent, f".corrupt-{name}-{secrets.token_hex(4)}")
    os.rename(path, dest)
    fsync_dir(parent)
    return dest


def load_rng(path: str, rank: int) -> dict[str, Any] | None:
    f = storage.join(path, RNG_DIR, f"rank-{rank}.pt")
    if _remote(path):
        if not storage.exists(f):
            return None
        src: Any = io.BytesIO(storage.read_bytes(f))
    elif not os.path.isfile(f):
        return None
    else:
        src = f
    loaded: dict[str, Any] = torch.load(src, map_location="cpu", weights_only=True)
    return loaded


# --- every rank raising the same error ----------------------------------------------------------

Packed = tuple[str, str, str]


def _pack(e: BaseException) -> Packed:
    if isinstance(e, Superseded):
        return ("superseded", ATTEMPT_SUPERSEDED, str(e))
    if isinstance(e, PermanentError):
        return ("permanent", e.reason, e.message)
    if isinstance(e, RetryableError):
        return ("retryable", e.reason, e.message)
    return ("error", type(e).__name__, str(e))


def _unpack(p: Packed) -> Exception:
    kind, reason, message = p
    if kind == "superseded":
        return Superseded(message)
    if kind == "permanent":
        return PermanentError(reason, message)
    if kind == "retryable":
        return RetryableError(reason, message)
    return RuntimeError(f"another rank failed: {reason}: {message}")


def _broadcast(d: dist.DistEnv, obj: T, group: Any = None) -> T:
    """Rank 0's ``obj`` on every rank, over ``group`` (None: the default process group)."""
    if group is None or not d.distributed:
        return dist.broadcast_object(d, obj)
    import torch.distributed as tdist

    box: list[T] = [obj]
    tdist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(d: dist.DistEnv, obj: T, group: Any = None) -> list[T]:
    """Every rank's ``obj`` on every rank, over ``group`` (None: the default process group)."""
    if group is None or not d.distributed:
        return dist.all_gather_object(d, obj)
    import torch.distributed as tdist

    out: list[Any] = [None] * d.world_size
    tdist.all_gather_object(out, obj, group=group)
    return out


def _on_main(d: dist.DistEnv, fn: Callable[[], T], group: Any = None) -> T:
    """``fn()`` on global rank 0, its result on every rank; if it fails, every rank raises (rank 0 its
    own exception, the others the same reason and message), so no rank waits forever for rank 0."""
    out: tuple[bool, Any] | None = None
    err: BaseException | None = None
    if d.is_main:
        try:
            out = (True, fn())
        except Exception as e:
            err, out = e, (False, _pack(e))
    out = _broadcast(d, out, group)
    assert out is not None
    if err is not None:
        raise err
    if not out[0]:
        raise _unpack(out[1])
    return out[1]  # type: ignore[no-any-return]


def _agree(d: dist.DistEnv, failure: BaseException | None, group: Any = None) -> None:
    """Collective: when any rank failed, every rank raises (the failing rank its own error, the others
    the lowest failing rank's reason and message)."""
    packed = _gather(d, _pack(failure) if failure is not None else None, group)
    bad = [p for p in packed if p is not None]
    if failure is not None:
        raise failure
    if bad:
        raise _unpack(bad[0])


# --- the checkpointer -------------------------------------------------------------------------


SYNC_ENV = "TAUON_CHECKPOINT_SYNC"


def async_enabled(env: dict[str, str] | None = None) -> bool:
    """Checkpoints are saved in the background unless ``TAUON_CHECKPOINT_SYNC`` is 1/true/yes/on."""
    e = os.environ if env is None else env
    return (e.get(SYNC_ENV) or "").strip().lower() not in ("1", "true", "yes", "on")


@dataclass
class _Pending:
    """A save in the background: its future resolves to the committed path (or raises, on every rank)."""

    step: int
    future: Future[str]


class Checkpointer:
    """The checkpoints of one run under ``<output>/checkpoints``, for every rank (the methods are
    collective). ``module`` has the model's state_dict names (no wrapper); LoRA stores only the trainable
    parameters. Writes are fenced: a newer attempt owning the output raises ``Superseded`` on every rank.

    With ``background`` (the trainer's default, off with ``TAUON_CHECKPOINT_SYNC=1``: ``async_enabled``),
    saves are asynchronous: ``save`` blocks only
    for the previous save (which must have committed or failed), the fence, the target and the copy of
    the state to host memory (DCP's ``async_save`` staging); every rank's DCP write, the agreement and
    rank 0's commit run in a background thread whose collectives use a process group of their own
    (gloo), so they never interleave with training's. A background failure is raised on every rank by
    the next ``save`` or ``wait`` (``finish``), the same error the synchronous path raises."""

    def __init__(
        self,
        output: str,
        attempt: int,
        d: dist.DistEnv,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lora: bool,
        background: bool = False,
    ) -> None:
        self.output = output
        self.attempt = attempt
        self.d = d
        self.module = module
        self.optimizer = optimizer
        self.device = device
        self.lora = lora
        self.dir = checkpoints_dir(output)
        self.background = background  # the trainer passes ``async_enabled()``
        self.background_seconds = 0.0  # time saves spent after ``save`` returned (write, agree, commit)
        self.last_committed: str | None = None  # the path of the newest checkpoint this process committed
        self._pending: _Pending | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        if self.background and d.distributed:
            import torch.distributed as tdist

            if tdist.is_available() and tdist.is_initialized():  # collective: every rank, same order
                self._group = tdist.new_group(backend="gloo")

    def check_fence(self) -> None:
        """Rank 0 reads the owner file; every rank stops (``Superseded``) if a newer attempt took over."""
        _on_main(self.d, lambda: check_fence(self.output, self.attempt))

    @property
    def pending(self) -> bool:
        """Whether a save is still in flight (or finished but not yet collected by ``wait``)."""
        return self._pending is not None

    def save(self, state: TrainState) -> None:
        """Every rank writes its shards into rank 0's target; rank 0 commits once all succeeded. In the
        background (the default) this returns once the state is copied to host memory; first it waits
        for the previous save and raises its failure."""
        self.wait()
        if not self.background:
            self._save_now(state)
            return
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import async_save

        d = self.d
        self.check_fence()
        target = _on_main(d, lambda: begin(self.dir, state.step))
        snapshot = copy.deepcopy(state)
        rng = capture_rng(self.device)
        t0 = time.monotonic()
        writer = _writer(storage.join(target, DCP_DIR), _test_write_delay(state.step))
        failure: BaseException | None = None
        upload: Future[Any] | None = None
        try:  # staging (the copy to host memory) happens here; the write in DCP's own thread
            started = async_save(self._app_state(), storage_writer=writer, process_group=self._group)
            upload = started if isinstance(started, Future) else started.upload_completion
        except (Exception, CheckpointException) as e:
            failure = _named(e, target)
        try:
            _agree(d, failure)
        except BaseException:
            # a rank that staged already has a write in flight whose collectives wait for the rank
            # that failed: it is abandoned (the run is failing), never waited for
            if d.is_main:
                discard(target)
            raise
        assert upload is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tauon-checkpoint")
        done = upload

        def finish() -> str:
            try:
                return self._complete(target, snapshot, rng, writer, done.result, self._group)
            finally:
                self.background_seconds += time.monotonic() - t0

        self._pending = _Pending(state.step, self._executor.submit(finish))

    def _save_now(self, state: TrainState) -> None:
        """The synchronous save: every rank's shards, the agreement and rank 0's commit, before returning."""
        from torch.distributed.checkpoint import state_dict_saver

        self.check_fence()
        target = _on_main(self.d, lambda: begin(self.dir, state.step))
        writer = _writer(storage.join(target, DCP_DIR), _test_write_delay(state.step))
        app_state = self._app_state()
        rng = capture_rng(self.device)
        self._complete(
            target, state, rng, writer, lambda: state_dict_saver.save(app_state, storage_writer=writer)
        )

    def _complete(
        self,
        target: str,
        state: TrainState,
        rng: dict[str, Any],
        writer: FileSystemWriter,
        write: Callable[[], Any],
        group: Any = None,
    ) -> str:
        """Every rank: ``write()`` its DCP shards (or wait for them), its RNG state; then all agree
        (gathering every rank's checksums to rank 0) and rank 0 commits; returns the checkpoint's path.
        Any rank's failure is raised on every rank (rank 0 drops the target first)."""
        from torch.distributed.checkpoint.api import CheckpointException

        d = self.d
        failure: BaseException | None = None
        sums: dict[str, str] = {}
        try:
            write()
            sums = {**_written(writer), **write_rng(target, d.rank, rng)}
        except (Exception, CheckpointException) as e:
            failure = _named(e, target)
        gathered = _gather(d, (_pack(failure) if failure is not None else None, sums), group)
        bad = [p for p, _ in gathered if p is not None]
        if failure is not None or bad:
            if d.is_main:
                discard(target)
            if failure is not None:
                raise failure
            raise _unpack(bad[0])
        merged = {rel: digest for _, rank_sums in gathered for rel, digest in rank_sums.items()}
        path = _on_main(d, lambda: self._commit(target, state, merged), group)
        self.last_committed = path
        return path

    def wait(self) -> str | None:
        """Block until the save in flight (if any) committed; its path, or None when none was in flight.
        Its failure is raised here, on every rank alike (the ranks agreed on it in the background)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.future.result()

    def close(self) -> BaseException | None:
        """At the end of the run, also after a failure: wait for the save in flight and stop the background
        thread. Returns (does not raise) that save's failure; ``wait`` first to have it raised."""
        failure: BaseException | None = None
        try:
            self.wait()
        except Exception as e:
            failure = e
            dist.log(self.d, f"warning: the checkpoint in flight failed: {type(e).__name__}: {e}")
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return failure

    def _commit(self, target: str, state: TrainState, sums: dict[str, str] | None = None) -> str:
        """Rank 0: the fence once more (a newer attempt may have started while the shards were written),
        then the commit."""
        stale = fence_status(self.output, self.attempt)
        if stale is not None:
            discard(target)
            raise Superseded(stale)
        return commit(target, self.dir, state, sums=sums)

    def resume(self) -> TrainState | None:
        """Load the newest complete checkpoint that validates (logging each one skipped); None when there
        is none. One that fails to load anyway: a data error moves it aside (never the last one) and
        the run fails; any other error (EIO, OOM, a timeout) keeps it and fails retryably."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        d = self.d
        found = _on_main(d, self._newest_valid)
        if found is None:
            return None
        path, state = found
        st = self._app_state()
        try:
            load_shards(path, st)  # DCP gathers errors: every rank raises together
        except (Exception, CheckpointException) as e:
            named = _named(e, path)
            if is_data_error(e) or _missing(named):  # rank 0 decides; every rank raises the same
                raise _unpack(_on_main(d, lambda: _pack(self._set_aside(path, named)))) from None
            if isinstance(named, RetryableError | PermanentError):
                raise named from None  # the store's failure, not the checkpoint's: keep it
            raise RetryableError(
                CHECKPOINT_UNREADABLE,
                f"loading checkpoint {path} failed ({type(named).__name__}: {named}); it is kept and the "
                "restart loads it again",
            ) from e
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=st["model"],
            optim_state_dict=st["optim"],
            options=self._options(),
        )
        self._restore_rng(path, state)
        dist.log(
            d,
            f"resuming from {path} (step {state.step}, epoch {state.epoch}, sample {state.sample_pos}; "
            f"written by {state.world_size} rank(s) under {state.strategy})",
        )
        return state

    def _restore_rng(self, path: str, state: TrainState) -> None:
        """Every rank its own RNG state (same world size only); a storage failure on any rank fails all."""
        d = self.d
        rng, failure = None, None
        if state.world_size == d.world_size:
            try:
                rng = load_rng(path, d.rank)
            except Exception as e:
                failure = e
        _agree(d, failure)
        if rng is not None:
            restore_rng(rng, self.device)

    def _set_aside(self, path: str, err: BaseException) -> Exception:
        """Rank 0, after a data error loading ``path``: the error to raise. It is moved aside when an
        older checkpoint is left to resume from; the last one is never moved (or deleted)."""
        if len(list_complete(self.dir)) <= 1:
            return PermanentError(
                CHECKPOINT_CORRUPT,
                f"checkpoint {path} failed to load ({err}) and is the only checkpoint left; it is kept. "
                "Move it aside to train from step 0",
            )
        moved = quarantine(path)
        return RetryableError(
            CHECKPOINT_CORRUPT,
            f"checkpoint {path} failed to load ({err}); moved aside to {moved}; the restart resumes from "
            "the previous checkpoint",
        )

    def _newest_valid(self) -> tuple[str, TrainState] | None:
        """Rank 0: the newest complete checkpoint that ``validate`` accepts, and its state. Another job's
        checkpoint fails ``OutputInUse``; complete checkpoints none of which validates fail
        ``CheckpointCorrupt`` (all kept: never a silent restart from step 0); a read error of the
        store fails retryably."""
        problems: list[str] = []
        for step, path in reversed(list_complete(self.dir)):
            self._check_owner(path)
            try:
                problem = validate(path)
            except OSError as e:
                raise RetryableError(
                    CHECKPOINT_UNREADABLE, f"checkpoint {path} could not be read ({e}); it is kept"
                ) from None
            if problem is None:
                return path, read_state(path)
            problems.append(f"step {step}: {problem}")
            dist.log(
                self.d,
                f"warning: checkpoint {path} (step {step}) is not loadable ({problem}); trying an older one",
            )
        if problems:
            raise PermanentError(
                CHECKPOINT_CORRUPT,
                f"no checkpoint under {self.dir} is loadable ({'; '.join(problems)}); all are kept. "
                "Move them aside to train from step 0",
            )
        return None

    def _check_owner(self, path: str) -> None:
        """Refuse a checkpoint written by another job than the one this process claimed the output for
        (``state.json``'s ``owner_uid``); an unreadable state is ``validate``'s to report."""
        uid = claimed_uid(self.output)
        if not uid:
            return
        try:
            owner = read_state(path).owner_uid
        except (OSError, ValueError, TypeError, storage.StoragePermanentError):
            return
        if owner != uid:
            raise PermanentError(
                OUTPUT_IN_USE,
                f"checkpoint {path} was written by job uid {owner or '(none)'}, not by this job (uid "
                f"{uid}); refusing to resume another job's checkpoint. Nothing was changed",
            )

    def _options(self) -> StateDictOptions:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora, strict=not self.lora)

    def _app_state(self) -> dict[str, Any]:
        """What DCP saves and loads: ``{"model": ..., "optim": ...}`` under the model's own names."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.module, self.optimizer, options=self._options())
        return {"model": msd, "optim": osd}


# --- RNG state --------------------------------------------------------------------------------


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states, as plain lists/tensors (loadable with weights_only=True)."""
    py = random.getstate()
    np_state: Any = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(st: dict[str, Any], device: torch.device | None = None) -> None:
    py = st["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    npst = st["numpy"]
    np.random.set_state(
        (
            str(npst[0]),
            np.asarray(npst[1].numpy(), dtype=np.uint32),
            int(npst[2]),
            int(npst[3]),
            float(npst[4]),
        )
    )
    torch.set_rng_state(st["torch"].cpu())
    if device is not None and device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)
