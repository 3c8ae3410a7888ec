"""Fetching a model from object storage into a local directory before the server loads it.

An InferenceService whose ``--model`` is ``s3://bucket/prefix[/]`` gets it downloaded by
:func:`download_model` (called by :func:`tauon_serve.loading.load_predictor` in the inference thread,
after the socket listens: liveness answers, readiness stays false until the model is downloaded,
verified, loaded and warmed up). Pure I/O over :mod:`tauon_core.storage` (fsspec/s3fs; credentials and
endpoint only from the environment); no torch, no FastAPI.

What is downloaded
    Every object under the prefix, recursively (``1_Pooling/config.json`` keeps its sub-directory),
    except names that would land outside the directory (``..``, empty segments) and this module's own
    file names. When the prefix holds the trainer's publication marker
    (``tauon_core.storage.PUBLISHED_MARKER``, written last by ``publish_dir``), exactly the files it
    lists are downloaded, and each must be there with the size it records; without a marker (a model
    uploaded by hand) the listing is the model.

Verification (before any byte is downloaded, from the listing and the index, and again on the local copy)
    ``config.json`` is present; the weights are ``model.safetensors``, or ``model.safetensors.index.json``
    and every shard its ``weight_map`` names, each present and not empty, together at least the index's
    ``metadata.total_size`` when it has one; every downloaded file has the size the store listed; after
    the download the prefix is listed again and nothing has changed. A partial or inconsistent model is
    ``ModelDownloadError`` (permanent, reason ``IncompleteModel`` or ``InvalidModel``) naming the URI
    and what is missing. Storage failures keep their named errors (``StorageUnreachable`` retryable;
    ``StorageAccessDenied``, ``BucketNotFound``, ``ObjectNotFound`` permanent). A prefix without the
    marker whose parent holds the trainer's ``.tauon-owner.json`` is a FineTuneJob's model still being
    published (the trainer deletes the marker first and writes it last): ``ModelNotPublished``
    (retryable), never a mix of two versions.

Bounded memory, progress, timeout
    Each object streams through ``storage.open_read`` in ``CHUNK_BYTES`` pieces into ``NAME.tauon-part``,
    is fsynced, checked for its size and renamed into place; up to ``concurrency`` objects at once
    (largest first), so memory is about ``2 * CHUNK_BYTES`` per stream whatever the model's size. The
    free space of the cache is checked against what is left to download first (``ModelCacheTooSmall``).
    Progress (bytes done/total, files, MiB/s) is logged every ``log_every_s`` seconds and at every tenth
    of the total. The whole download (listing included) runs in a daemon thread joined with the
    timeout: past it the download is cancelled (workers stop at their next chunk) and
    ``ModelDownloadTimeout`` (retryable) is raised.

Cache and restarts
    The model goes to ``<cache dir>/<name>-<hash of the URI>/``. ``.tauon-download.json`` (the complete
    marker: the URI, the listing it was downloaded from, every file's size and ETag) is written last,
    after verification, and deleted before a directory is changed. A restarted container whose marker
    matches the store's listing (names, sizes, ETags) makes that one LIST request and no GET; when the
    store is unreachable, a complete copy is served with a warning rather than not at all. An unfinished download keeps a journal
    (``.tauon-download.partial.json``) of the files already in place, so a restart after a timeout
    fetches only the rest; a model changed in the store fetches only the files whose size or ETag
    changed. Anything else in the directory (a previous model's files, stale ``.tauon-part`` files) is
    deleted before downloading, so the old and the new model never mix. An exclusive ``flock`` on
    ``<directory>.lock`` lets replicas share one cache volume: the second waits, then finds the copy
    complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, cast

from tauon_core import storage
from tauon_core.errors import INVALID_MODEL, PermanentError, RetryableError

from .config import (
    DEFAULT_MODEL_CACHE_DIR,
    DEFAULT_MODEL_DOWNLOAD_CONCURRENCY,
    DEFAULT_MODEL_DOWNLOAD_TIMEOUT_SECONDS,
)

log = logging.getLogger("tauon.serve.download")

CHUNK_BYTES = 8 << 20
LOG_EVERY_SECONDS = 10.0
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CACHE_MARKER = ".tauon-download.json"  # written last: this directory holds the whole, verified model
JOURNAL = ".tauon-download.partial.json"  # files already in place during an unfinished download
PART_SUFFIX = ".tauon-part"
_OWN_NAMES = frozenset({CACHE_MARKER, JOURNAL})
_MIB = float(1 << 20)

# Reasons (CamelCase, as in the termination message contract).
INCOMPLETE_MODEL = "IncompleteModel"
MODEL_CACHE_TOO_SMALL = "ModelCacheTooSmall"
MODEL_DOWNLOAD_TIMEOUT = "ModelDownloadTimeout"
MODEL_CHANGED = "ModelChanged"
MODEL_NOT_PUBLISHED = "ModelNotPublished"
OUTPUT_OWNER_FILE = ".tauon-owner.json"  # the trainer's, at the root of every FineTuneJob output


class ModelDownloadError(PermanentError):
    """The model in object storage cannot be served as it is (retrying cannot fix it)."""

    def __init__(self, reason: str, uri: str, message: str) -> None:
        super().__init__(reason, f"{uri}: {message}")
        self.uri = uri


class ModelDownloadRetryable(RetryableError):
    """The download did not finish (timeout, the model changed meanwhile); a restart may succeed."""

    def __init__(self, reason: str, uri: str, message: str) -> None:
        super().__init__(reason, f"{uri}: {message}")
        self.uri = uri


class _Cancelled(Exception):
    """A worker saw the cancel event (timeout or another worker's failure)."""


# --- verification (pure) ------------------------------------------------------------------------


def safe_name(name: str) -> bool:
    """Whether a relative object name stays inside the model directory (no ``..``, ``.``, empty
    segments, leading ``/`` or backslash)."""
    if not name or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def parse_index(uri: str, raw: bytes) -> dict[str, Any]:
    """The parsed ``model.safetensors.index.json``; ``InvalidModel`` when it is not a usable index."""
    try:
        index = json.loads(raw)
    except ValueError:
        raise ModelDownloadError(INVALID_MODEL, uri, f"{INDEX} is not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise ModelDownloadError(INVALID_MODEL, uri, f"{INDEX} has no weight_map (tensor name -> shard file)")
    unsafe = sorted({v for v in weight_map.values() if not safe_name(v)})
    if unsafe:
        raise ModelDownloadError(INVALID_MODEL, uri, f"{INDEX} names shards outside the model: {unsafe}")
    return cast(dict[str, Any], index)


def shard_names(index: Mapping[str, Any]) -> list[str]:
    """The shard files an index's ``weight_map`` names, sorted, each once."""
    return sorted(set(index["weight_map"].values()))


def _config_hint(uri: str, names: Iterable[str]) -> str:
    nested = sorted(n.rsplit("/", 1)[0] for n in names if n.endswith("/" + CONFIG))
    if not nested:
        return ""
    return f" ({nested[0]}/ holds one: is the model {uri.rstrip('/')}/{nested[0]}/?)"


def check_model_files(uri: str, sizes: Mapping[str, int], index: Mapping[str, Any] | None) -> list[str]:
    """Check that the files ``sizes`` (relative name -> bytes) form a whole safetensors model; return
    its weight files. ``index`` is the parsed index when ``sizes`` has one. Raises ``ModelDownloadError``
    (``IncompleteModel``) naming ``uri`` and everything missing."""
    missing: list[str] = []

    def need(name: str) -> None:
        if sizes.get(name, 0) <= 0:
            missing.append(name + (" (empty)" if name in sizes else ""))

    need(CONFIG)
    if CONFIG not in sizes:
        missing[-1] += _config_hint(uri, sizes)
    if INDEX in sizes:
        if index is None:
            raise ValueError("check_model_files: the index must be parsed when the model has one")
        weights = shard_names(index)
        for shard in weights:
            need(shard)
            if shard not in sizes:
                missing[-1] += f" (named by {INDEX})"
    elif WEIGHTS in sizes:
        weights = [WEIGHTS]
        need(WEIGHTS)
    else:
        weights = []
        missing.append(f"{WEIGHTS} (or {INDEX} and its shards)")
    if missing:
        raise ModelDownloadError(INCOMPLETE_MODEL, uri, "incomplete model: missing " + ", ".join(missing))
    meta = index.get("metadata") if index else None
    total = meta.get("total_size") if isinstance(meta, dict) else None
    held = sum(sizes[w] for w in weights)
    if isinstance(total, int | float) and held < total:
        raise ModelDownloadError(
            INCOMPLETE_MODEL,
            uri,
            f"inconsistent model: the shards hold {held} bytes, less than the metadata.total_size "
            f"({int(total)}) of {INDEX}",
        )
    return weights


def local_sizes(directory: str, names: Iterable[str]) -> dict[str, int]:
    """Size of each of ``names`` under ``directory``; absent files are left out."""
    out: dict[str, int] = {}
    for name in names:
        try:
            out[name] = os.path.getsize(os.path.join(directory, *name.split("/")))
        except OSError:
            pass
    return out


def verify_local(uri: str, directory: str, expected: Mapping[str, int]) -> list[str]:
    """Check the downloaded copy of ``uri`` in ``directory``: every file in ``expected`` (name -> the
    size the store listed) has that size, and the files form a whole model (``check_model_files``, the
    index read from the local copy). Returns the weight files; raises ``ModelDownloadError``."""
    have = local_sizes(directory, expected)
    wrong = [
        f"{name} ({have[name] if name in have else 'absent'}, listed {size} bytes)"
        for name, size in sorted(expected.items())
        if have.get(name) != size
    ]
    if wrong:
        raise ModelDownloadError(
            INCOMPLETE_MODEL, uri, f"the download in {directory} differs from the store: " + ", ".join(wrong)
        )
    index = None
    if INDEX in expected:
        with open(os.path.join(directory, INDEX), "rb") as f:
            index = parse_index(uri, f.read())
    return check_model_files(uri, have, index)


# --- what the store holds -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The model under a prefix: its files (relative name -> object) and, when published by tauon,
    the marker object (its ETag changes when the model is republished)."""

    uri: str
    files: dict[str, storage.ObjectInfo]
    marker: storage.ObjectInfo | None

    def record(self) -> dict[str, dict[str, Any]]:
        """The model's files as the complete marker keeps them: ``{name: {"size", "etag"}}``."""
        return listing_record(self.files)


def normalize(uri: str) -> str:
    """``uri`` as a prefix: with exactly one trailing ``/``."""
    return uri.rstrip("/") + "/"


def _listing(uri: str) -> dict[str, storage.ObjectInfo]:
    """Every usable object under the prefix ``uri`` by relative name (others skipped with a warning)."""
    root = uri if storage.is_remote(uri) else storage.local_path(uri)
    out: dict[str, storage.ObjectInfo] = {}
    for obj in storage.list_objects(uri):
        if not obj.uri.startswith(root):
            continue
        name = obj.uri[len(root) :]
        if not name or name.endswith("/"):
            continue
        base = name.rsplit("/", 1)[-1]
        if not safe_name(name) or base in _OWN_NAMES or base.endswith(PART_SUFFIX):
            log.warning(
                "%s: skipping the object %r (not a file name the model directory can hold)", uri, name
            )
            continue
        out[name] = obj
    return out


def _published_files(
    uri: str, files: dict[str, storage.ObjectInfo], marker: storage.ObjectInfo
) -> dict[str, storage.ObjectInfo]:
    """The files the trainer's marker lists, each checked against the listing."""
    try:
        record = json.loads(storage.read_bytes(marker.uri))
        listed = record["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ModelDownloadError(
            INVALID_MODEL, uri, f"{storage.PUBLISHED_MARKER} is not a publication record"
        ) from None
    bad = [
        f"{name} ({'absent' if name not in files else f'{files[name].size} bytes'}, marker says {size})"
        for name, size in sorted(listed.items())
        if name not in files or files[name].size != size
    ]
    if bad:
        raise ModelDownloadError(
            INCOMPLETE_MODEL,
            uri,
            f"incomplete model: {storage.PUBLISHED_MARKER} lists files the store does not hold as listed: "
            + ", ".join(bad),
        )
    return {name: files[name] for name in listed}


def _not_being_published(uri: str) -> None:
    """A prefix without the publication marker whose parent is a FineTuneJob's output (it holds the
    trainer's owner file) is a model being written, or never finished: not a model to read."""
    stripped = uri.rstrip("/")
    if "/" not in stripped.split("://", 1)[-1]:
        return  # a bucket's top level: no parent
    if storage.exists(storage.join(stripped.rsplit("/", 1)[0] + "/", OUTPUT_OWNER_FILE)):
        raise ModelDownloadRetryable(
            MODEL_NOT_PUBLISHED,
            uri,
            f"a FineTuneJob's model without its {storage.PUBLISHED_MARKER} (written last): still being "
            "published, or the job stopped before; a restart reads it once it is published",
        )


def listing_record(objects: Mapping[str, storage.ObjectInfo]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "etag"}}`` of a listing: what a cached copy is compared with."""
    return {n: {"size": o.size, "etag": o.etag} for n, o in sorted(objects.items())}


def plan(uri: str, listing: Mapping[str, storage.ObjectInfo] | None = None) -> Plan:
    """Check, before downloading anything, that the prefix ``uri`` (its ``listing`` by relative name,
    listed here when not given) holds a whole model; reads only the index and the marker. Storage
    errors keep their named reasons."""
    uri = normalize(uri)
    files = dict(_listing(uri) if listing is None else listing)
    marker = files.pop(storage.PUBLISHED_MARKER, None)
    if marker is not None:
        files = _published_files(uri, files, marker)
    else:
        _not_being_published(uri)
    index = parse_index(uri, storage.read_bytes(files[INDEX].uri)) if INDEX in files else None
    check_model_files(uri, {n: o.size for n, o in files.items()}, index)
    return Plan(uri=uri, files=files, marker=marker)


def model_dir(cache_dir: str, uri: str) -> str:
    """The directory under ``cache_dir`` that holds the model of ``uri``: readable, and one per URI."""
    uri = normalize(uri)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.split("://", 1)[-1].strip("/")).strip("-.")[-60:]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{readable or 'model'}-{digest}")


# --- the download -------------------------------------------------------------------------------


class _Progress:
    """Bytes and files done, logged every ``every_s`` seconds and at every tenth of the total."""

    def __init__(self, uri: str, total: int, files: int, every_s: float) -> None:
        self.uri, self.total, self.files, self.every_s = uri, total, files, every_s
        self.done = 0
        self.files_done = 0
        self.lock = threading.Lock()
        self.t0 = self.last_t = time.monotonic()
        self.last_tenth = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            tenth = self.done * 10 // max(1, self.total)
            if (now - self.last_t >= self.every_s or tenth > self.last_tenth) and self.done < self.total:
                self.last_t, self.last_tenth = now, tenth
                log.info("downloading %s: %s", self.uri, self._summary(now))

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1

    def rate(self) -> float:
        return self.done / _MIB / max(1e-6, time.monotonic() - self.t0)

    def _summary(self, now: float) -> str:
        pct = 100.0 * self.done / max(1, self.total)
        return (
            f"{self.done / _MIB:.1f}/{self.total / _MIB:.1f} MiB ({pct:.0f}%), "
            f"{self.files_done}/{self.files} files, {self.rate():.1f} MiB/s"
        )

    def summary(self) -> str:
        with self.lock:
            return self._summary(time.monotonic())


class _Download:
    """One download of ``uri`` into its directory under ``cache_dir`` (see the module docstring)."""

    def __init__(self, uri: str, cache_dir: str, concurrency: int, log_every_s: float) -> None:
        self.uri = normalize(uri)
        self.dir = model_dir(cache_dir, self.uri)
        self.concurrency = max(1, concurrency)
        self.log_every_s = log_every_s
        self.cancel = threading.Event()
        self.progress: _Progress | None = None
        self.journal: dict[str, dict[str, Any]] = {}
        self.journal_lock = threading.Lock()

    # files of the directory

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, *name.split("/"))

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("uri") == self.uri else None

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        tmp = self._path(name) + PART_SUFFIX
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(name))

    def _remove(self, name: str) -> None:
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass

    def complete(self) -> dict[str, Any] | None:
        """The complete marker (``uri``, ``listing``: the store's listing it was downloaded from,
        ``files``: what was downloaded) when every file it lists is here with its size."""
        marker = self._read_json(CACHE_MARKER)
        files = marker.get("files") if marker else None
        if not marker or not isinstance(files, dict) or not all(safe_name(n) for n in files):
            return None
        have = local_sizes(self.dir, files)
        ok = all(isinstance(m, dict) and have.get(n) == m.get("size") for n, m in files.items())
        return marker if ok else None

    def _kept(self, p: Plan, previous: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Files already in place that are still current: from a previous complete copy (``previous``,
        its marker's record) or an unfinished download (the journal)."""
        files = (self._read_json(JOURNAL) or {}).get("files")
        done: dict[str, Any] = {**previous, **(files if isinstance(files, dict) else {})}
        want = p.record()
        have = local_sizes(self.dir, want)
        return {n: m for n, m in want.items() if done.get(n) == m and have.get(n) == m["size"]}

    def _clean(self, keep: Iterable[str]) -> None:
        """Delete every file of the directory but ``keep`` and the journal."""
        keep_set = {*keep, JOURNAL}
        for root, _dirs, names in os.walk(self.dir):
            for name in names:
                full = os.path.join(root, name)
                if os.path.relpath(full, self.dir).replace(os.sep, "/") not in keep_set:
                    os.remove(full)

    def _check_space(self, need: int) -> None:
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise ModelDownloadError(
                MODEL_CACHE_TOO_SMALL,
                self.uri,
                f"{need / _MIB:.1f} MiB left to download, {free / _MIB:.1f} MiB free in {self.dir}: "
                "size the model cache volume (--model-cache-dir / TAUON_MODEL_CACHE_DIR) for the model",
            )

    # the transfer

    def _fetch(self, name: str, obj: storage.ObjectInfo, progress: _Progress) -> None:
        dest = self._path(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + PART_SUFFIX
        try:
            with open(tmp, "wb") as out:
                if obj.size > 0:
                    with storage.open_read(obj.uri, block_size=CHUNK_BYTES) as src:
                        while data := src.read(CHUNK_BYTES):
                            if self.cancel.is_set():
                                raise _Cancelled
                            out.write(data)
                            progress.add(len(data))
                out.flush()
                os.fsync(out.fileno())
            got = os.path.getsize(tmp)
            if got != obj.size:
                raise ModelDownloadRetryable(
                    MODEL_CHANGED, obj.uri, f"read {got} bytes, listed {obj.size}: changed while downloading"
                )
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        with self.journal_lock:
            self.journal[name] = {"size": obj.size, "etag": obj.etag}
            self._write_json(JOURNAL, {"uri": self.uri, "files": dict(self.journal)})
        progress.file_done()

    def _fetch_all(self, todo: list[tuple[str, storage.ObjectInfo]], progress: _Progress) -> None:
        if not todo:
            return
        pool = ThreadPoolExecutor(min(self.concurrency, len(todo)), thread_name_prefix="tauon-download")
        try:
            futures = [pool.submit(self._fetch, n, o, progress) for n, o in todo]
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            self.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_unchanged(self, p: Plan) -> None:
        """List again: a model republished (or replaced by hand) during the download is not mixed."""
        now = _listing(self.uri)
        marker = now.pop(storage.PUBLISHED_MARKER, None)
        changed = sorted(
            n for n, o in p.files.items() if n not in now or (now[n].size, now[n].etag) != (o.size, o.etag)
        )
        if p.marker is not None and (marker is None or marker.etag != p.marker.etag):
            changed.append(storage.PUBLISHED_MARKER)
        if changed:
            raise ModelDownloadRetryable(
                MODEL_CHANGED,
                self.uri,
                f"the model changed while it was downloaded ({', '.join(changed)}); a restart fetches it again",
            )

    def run(self) -> str:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.dir + ".lock", "a+b") as lock:  # one process per directory (a shared volume)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: waiting for another process downloading into %s", self.uri, self.dir)
                fcntl.flock(lock, fcntl.LOCK_EX)
            return self._run_locked()

    def _run_locked(self) -> str:
        try:
            listing = _listing(self.uri)
        except storage.StorageUnreachable as err:
            if self.complete() is None:
                raise
            log.warning("%s; serving the copy downloaded earlier in %s unchecked", err, self.dir)
            return self.dir
        previous = self.complete() or {}
        if previous.get("listing") == listing_record(listing):  # one LIST, no GET
            log.info(
                "%s: the copy in %s is current (%d files); reused", self.uri, self.dir, len(previous["files"])
            )
            return self.dir
        p = plan(self.uri, listing)
        kept = self._kept(p, previous.get("files") or {})
        self.journal = dict(kept)
        self._write_json(JOURNAL, {"uri": self.uri, "files": dict(self.journal)})
        self._remove(CACHE_MARKER)
        self._clean(kept)
        todo = sorted(((n, o) for n, o in p.files.items() if n not in kept), key=lambda t: (-t[1].size, t[0]))
        need = sum(o.size for _, o in todo)
        self._check_space(need)
        log.info(
            "downloading %s into %s: %d files, %.1f MiB%s",
            self.uri,
            self.dir,
            len(todo),
            need / _MIB,
            f" ({len(kept)} files already here)" if kept else "",
        )
        self.progress = progress = _Progress(self.uri, need, len(todo), self.log_every_s)
        self._fetch_all(todo, progress)
        self._check_unchanged(p)
        weights = verify_local(self.uri, self.dir, {n: o.size for n, o in p.files.items()})
        marker = {"uri": self.uri, "listing": listing_record(listing), "files": p.record(), "at": time.time()}
        self._write_json(CACHE_MARKER, marker)
        self._remove(JOURNAL)
        log.info(
            "downloaded %s: %d files, %.1f MiB in %.1fs (%.1f MiB/s); verified: %s, %s",
            self.uri,
            len(todo),
            need / _MIB,
            time.monotonic() - progress.t0,
            progress.rate(),
            CONFIG,
            f"{INDEX} + {len(weights)} shards" if INDEX in p.files else WEIGHTS,
        )
        return self.dir


def download_model(
    uri: str,
    cache_dir: str = DEFAULT_MODEL_CACHE_DIR,
    timeout_s: float = DEFAULT_MODEL_DOWNLOAD_TIMEOUT_SECONDS,
    *,
    concurrency: int = DEFAULT_MODEL_DOWNLOAD_CONCURRENCY,
    log_every_s: float = LOG_EVERY_SECONDS,
) -> str:
    """Download the model under the prefix ``uri`` into its directory under ``cache_dir`` (or reuse a
    complete, current copy there) and return that directory. Raises ``ModelDownloadError`` (a partial
    or invalid model, a cache too small), ``ModelDownloadRetryable`` (``ModelDownloadTimeout`` past
    ``timeout_s``, ``ModelChanged``) or the named storage errors."""
    job = _Download(uri, cache_dir, concurrency, log_every_s)
    result: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(job.run())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, name="tauon-model-download", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        job.cancel.set()
        done = job.progress.summary() if job.progress is not None else "still listing the model"
        raise ModelDownloadRetryable(
            MODEL_DOWNLOAD_TIMEOUT,
            job.uri,
            f"not downloaded within {timeout_s:g}s ({done}); raise --model-download-timeout-seconds "
            "(TAUON_MODEL_DOWNLOAD_TIMEOUT_SECONDS) or check the store; a restart keeps the files done",
        )
    if failure:
        raise failure[0]
    return result[0]
