"""Object storage for the workloads: one way to name, list, read and write ``s3://`` URIs and local paths.

Locations
    ``s3://bucket/key`` (an object) or ``s3://bucket/prefix/`` (a prefix; the trailing ``/`` is optional
    where a prefix is expected), ``file://PATH`` or a plain path. Everything goes through fsspec
    (``s3fs`` for S3, the local filesystem otherwise), so callers never branch on the scheme.

Credentials and endpoint
    Only from the environment, never from arguments, so nothing a caller logs or raises can carry
    them: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN`` (the operator
    renders ``spec.storage.s3.secretRef`` as env ``valueFrom``; ``tauon run --local`` passes the
    caller's environment), ``AWS_ENDPOINT_URL`` (any S3-compatible store; wins over
    ``TAUON_S3_ENDPOINT``, which the operator renders from ``spec.storage.s3.endpoint``) and
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Errors
    Every failed storage call becomes one of four named errors, each naming the URI and nothing else
    of the request (no header, no key id, no signature):

    ============================  =========  ===============================================
    ``StorageUnreachable``        retryable  connection refused/reset, DNS, timeouts, 5xx and
                                             throttling (``SlowDown``) after botocore's retries
    ``StorageAccessDenied``       permanent  403, unknown key id, bad signature, expired token
    ``BucketNotFound``            permanent  ``NoSuchBucket``
    ``ObjectNotFound``            permanent  ``NoSuchKey``/404, or a prefix with no matching object
    ============================  =========  ===============================================

    A 404 without an error code (S3 answers HEAD requests with a bare status) is told apart by asking
    for the bucket once. Retryable errors are ``RetryableError`` (the gang restarts); permanent ones are
    ``PermanentError`` (the job fails with that reason). botocore retries throttling and 5xx itself
    (``standard`` mode, ``TAUON_S3_MAX_ATTEMPTS``, default 5) before anything here sees them. The named
    errors pickle (they cross ranks inside torch.distributed.checkpoint's failure reports).

Writing without rename
    S3 has no rename, so a reader must never be able to take a half-written set of objects for a whole
    one. ``publish_dir`` uploads a local directory under a prefix and writes its marker
    (``PUBLISHED_MARKER``, listing every file and its size) last, after deleting the previous marker
    first; ``published`` is the reader's side (the marker, and every listed file there with its size).
    ``write_bytes_if`` is a conditional PUT (``If-None-Match: *`` or ``If-Match: <etag>``) for
    compare-and-swap records (the trainer's owner file); a store that ignores the headers writes
    unconditionally (AWS S3 and SeaweedFS honour both; callers read back where that matters).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, cast

import fsspec

from tauon_core.errors import PermanentError, RetryableError

STORAGE_UNREACHABLE = "StorageUnreachable"
STORAGE_ACCESS_DENIED = "StorageAccessDenied"
BUCKET_NOT_FOUND = "BucketNotFound"
OBJECT_NOT_FOUND = "ObjectNotFound"

_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "InvalidSecurity",
        "AccountProblem",
        "RequestTimeTooSkewed",
        "403",
    }
)


class StorageUnreachable(RetryableError):
    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(STORAGE_UNREACHABLE, f"{uri}: object storage unreachable ({detail})")
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.reason, self.message, self.uri))


class StoragePermanentError(PermanentError):
    """A storage failure that retrying cannot fix; ``reason`` names which."""

    def __init__(self, reason: str, uri: str, message: str) -> None:
        super().__init__(reason, f"{uri}: {message}")
        self.uri = uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.reason, self.message, self.uri))


def _rebuild(cls: type[Exception], reason: str, message: str, uri: str) -> Exception:
    """Unpickle a named error (they cross ranks inside torch.distributed.checkpoint's failure reports)."""
    err = cls.__new__(cls)
    Exception.__init__(err, f"{reason}: {message}")
    err.reason, err.message, err.uri = reason, message, uri  # type: ignore[attr-defined]
    return err


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``)."""
    return uri.startswith("s3://")


def local_path(uri: str) -> str:
    """The filesystem path of a ``file://`` URI or plain path (``s3://`` is refused)."""
    if is_remote(uri):
        raise ValueError(f"{uri} is not a local path")
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/`` (URIs) or the OS separator (paths)."""
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return os.path.join(local_path(base), *parts)


@dataclass(frozen=True)
class S3Settings:
    """Endpoint, region and retry budget from the environment (credentials stay there)."""

    endpoint: str | None
    region: str | None
    max_attempts: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Settings:
        e = os.environ if env is None else env
        endpoint = e.get("AWS_ENDPOINT_URL") or e.get("TAUON_S3_ENDPOINT") or None
        region = e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or None
        try:
            attempts = max(1, int(e.get("TAUON_S3_MAX_ATTEMPTS", "5")))
        except ValueError:
            attempts = 5
        return cls(endpoint=endpoint, region=region, max_attempts=attempts)


def _s3_options(settings: S3Settings) -> dict[str, Any]:
    client_kwargs: dict[str, Any] = {}
    if settings.endpoint:
        client_kwargs["endpoint_url"] = settings.endpoint
    if settings.region:
        client_kwargs["region_name"] = settings.region
    config_kwargs = {
        "retries": {"max_attempts": settings.max_attempts, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    # skip_instance_cache: fsspec's own cache would not follow a changed environment (credentials are not
    # in its key); ``_s3_filesystem`` keeps one instance per environment itself, and a library given
    # these options builds a fresh one.
    return {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs, "skip_instance_cache": True}


_FS_CACHE: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def _s3_filesystem(settings: S3Settings) -> fsspec.AbstractFileSystem:
    """One s3fs instance per process, settings and credentials in the environment (a changed environment
    gets a new one; the key holds a digest of the credentials, not them). Reusing it saves the client
    set-up (~0.1 s) of every call; listings are never cached, so every call sees the store as it is."""
    env = "\0".join(os.environ.get(k, "") for k in _CREDENTIAL_VARS)
    key = (os.getpid(), settings, hashlib.sha256(env.encode()).hexdigest())
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            if len(_FS_CACHE) >= 16:
                _FS_CACHE.clear()
            fs = fsspec.filesystem("s3", use_listings_cache=False, **_s3_options(settings))
            _FS_CACHE[key] = fs
    return fs


def fsspec_options(uri: str) -> dict[str, Any]:
    """The options ``filesystem`` builds its s3fs instance with (endpoint, region, retries; never a
    credential), for libraries that build their own fsspec filesystem from a URI (e.g.
    ``torch.distributed.checkpoint.FsspecWriter(uri, **fsspec_options(uri))``); ``{}`` for paths."""
    return _s3_options(S3Settings.from_env()) if is_remote(uri) else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it (``bucket/key`` or a local path)."""
    if is_remote(uri):
        return _s3_filesystem(S3Settings.from_env()), uri[len("s3://") :]
    return fsspec.filesystem("file"), local_path(uri)


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _client_code(exc: BaseException) -> str | None:
    """The S3 error code (or bare HTTP status) of the first botocore ClientError in ``exc``'s chain."""
    for cur in _chain(exc):
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if status:
                return str(status)
    return None


_CONNECTION_FAILURES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "TimeoutError",
        "ProxyConnectionError",
        "HTTPClientError",
    }
)


def _connection_failure(exc: BaseException) -> str | None:
    """The type name of the first connection-level failure in ``exc``'s chain, if any."""
    return next((type(c).__name__ for c in _chain(exc) if type(c).__name__ in _CONNECTION_FAILURES), None)


def _bucket_exists(uri: str) -> bool | None:
    """Whether the bucket of ``uri`` exists: True, False, or None when that cannot be told."""
    fs, _ = filesystem(uri)
    try:
        fs.call_s3("head_bucket", Bucket=_bucket(uri))
        return True
    except Exception as exc:
        code = _client_code(exc)
        if code in ("NoSuchBucket", "404") or isinstance(exc, FileNotFoundError):
            return False
        return None


def classify(exc: BaseException, uri: str) -> RetryableError | PermanentError:
    """The named storage error for ``exc`` raised while working on ``uri``."""
    if isinstance(exc, RetryableError | PermanentError):
        return exc
    code = _client_code(exc)
    detail = code or type(exc).__name__
    if code in _ACCESS_CODES or (code is None and isinstance(exc, PermissionError)):
        return StoragePermanentError(
            STORAGE_ACCESS_DENIED, uri, f"access denied ({detail}); check the credentials and the policy"
        )
    if code == "NoSuchBucket":
        return StoragePermanentError(BUCKET_NOT_FOUND, uri, f"bucket {_bucket(uri)!r} does not exist")
    if code in ("NoSuchKey", "404") or (code is None and isinstance(exc, FileNotFoundError)):
        if is_remote(uri) and _bucket_exists(uri) is False:
            return StoragePermanentError(BUCKET_NOT_FOUND, uri, f"bucket {_bucket(uri)!r} does not exist")
        return StoragePermanentError(OBJECT_NOT_FOUND, uri, "no such object")
    # throttling, 5xx, connection failures and anything unrecognised: retryable (the gang restarts with
    # backoff and backoffLimit bounds it); the detail names the code or exception type
    return StorageUnreachable(uri, _connection_failure(exc) or detail)


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn any failure inside the block into the named error for ``uri``."""
    try:
        yield
    except (RetryableError, PermanentError):
        raise
    except Exception as exc:
        raise classify(exc, uri) from None


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the store (an S3 error code, a connection failure, an I/O error) rather
    than from what was read (``classify`` takes anything unrecognised for an unreachable store)."""
    if isinstance(exc, RetryableError | PermanentError | OSError):
        return True
    return _client_code(exc) is not None or _connection_failure(exc) is not None


@contextlib.contextmanager
def storage_failures(uri: str) -> Iterator[None]:
    """``storage_errors`` for failures of the store only: anything else (a corrupt object's content
    failing to parse) propagates unchanged, for the caller to judge."""
    try:
        yield
    except (RetryableError, PermanentError):
        raise
    except Exception as exc:
        if is_storage_failure(exc):
            raise classify(exc, uri) from None
        raise


def _raise(exc: BaseException, uri: str) -> NoReturn:
    raise classify(exc, uri) from None


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or file): its URI, size in bytes and a content tag (S3 ETag, or mtime for files)."""

    uri: str
    size: int
    etag: str


def _info(fs: fsspec.AbstractFileSystem, path: str, remote: bool) -> ObjectInfo:
    d = fs.info(path)
    uri = "s3://" + path if remote else path
    tag = str(d.get("ETag") or d.get("etag") or "").strip('"') if remote else str(d.get("mtime", ""))
    return ObjectInfo(uri=uri, size=int(d.get("size") or 0), etag=tag)


def list_objects(uri: str, suffixes: Sequence[str] = ()) -> list[ObjectInfo]:
    """``uri`` itself when it is one object/file, else every object under it (recursively) whose name
    ends with one of ``suffixes`` (all when empty), sorted by URI. Nothing found: ``ObjectNotFound``."""
    remote = is_remote(uri)
    fs, path = filesystem(uri)
    with storage_errors(uri):
        if not uri.endswith("/") and fs.isfile(path):
            return [_info(fs, path, remote)]
        found = fs.find(path.rstrip("/"), detail=True)
        if remote and not found:
            # find() on a missing bucket answers [] on some stores: ask once
            if _bucket_exists(uri) is False:
                raise StoragePermanentError(BUCKET_NOT_FOUND, uri, f"bucket {_bucket(uri)!r} does not exist")
    out = []
    for p, d in sorted(cast(dict[str, dict[str, Any]], found).items()):
        if d.get("type") == "directory" or (suffixes and not p.endswith(tuple(suffixes))):
            continue
        tag = str(d.get("ETag") or "").strip('"') if remote else str(d.get("mtime", ""))
        out.append(ObjectInfo(uri=("s3://" + p) if remote else p, size=int(d.get("size") or 0), etag=tag))
    if not out:
        want = f" ending in {', '.join(suffixes)}" if suffixes else ""
        raise StoragePermanentError(OBJECT_NOT_FOUND, uri, f"no object{want} under this prefix")
    return out


def stat(uri: str) -> ObjectInfo:
    """Size and content tag of one object or file."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        return _info(fs, path, is_remote(uri))


def exists(uri: str) -> bool:
    """Whether the object or file exists (a missing bucket is an error, not False)."""
    try:
        stat(uri)
        return True
    except StoragePermanentError as err:
        if err.reason == OBJECT_NOT_FOUND:
            return False
        raise


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes ``[start, end)`` of one object (all of it by default): a ranged GET on S3."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        return cast(bytes, fs.cat_file(path, start=start, end=end))


def open_read(uri: str, block_size: int = 8 << 20) -> BinaryIO:
    """A streaming binary reader of one object (ranged reads of ``block_size`` with read-ahead)."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        if is_remote(uri):
            f = fs.open(path, "rb", block_size=block_size, cache_type="readahead")
        else:
            f = fs.open(path, "rb")
    return cast(BinaryIO, _Guarded(f, uri))


class _Guarded:
    """A file object whose read errors become the named storage errors (an object deleted or the
    store lost while streaming says so, with the URI)."""

    def __init__(self, f: Any, uri: str) -> None:
        self._f = f
        self._uri = uri

    def read(self, n: int = -1) -> bytes:
        try:
            return cast(bytes, self._f.read(n))
        except Exception as exc:
            _raise(exc, self._uri)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return int(self._f.seek(pos, whence))

    def tell(self) -> int:
        return int(self._f.tell())

    @property
    def closed(self) -> bool:
        return bool(self._f.closed)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object or file whole. On S3 a single PUT is atomic (readers see the old object or
    the new one); a local file is written to a temporary name and renamed."""
    if not is_remote(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri)
    with storage_errors(uri):
        fs.pipe_file(path, data)


def upload_file(local: str, uri: str) -> None:
    """Copy a local file to ``uri`` (multipart on S3 for large files)."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        if is_remote(uri):
            fs.put_file(local, path)
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fs.copy(local, path)


def delete(uri: str, recursive: bool = False) -> None:
    """Remove an object (or everything under a prefix with ``recursive``); missing is fine."""
    fs, path = filesystem(uri)
    with storage_errors(uri):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


# --- conditional writes and whole-prefix publishing (the trainer's outputs) ---------------------

PUBLISHED_MARKER = ".tauon-complete.json"
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def write_bytes_if(uri: str, data: bytes, *, absent: bool = False, etag: str | None = None) -> bool:
    """A conditional PUT of one object (S3 only): only if no object exists there (``absent``:
    ``If-None-Match: *``) or only while its content tag is still ``etag`` (``If-Match``). True when
    written, False when the condition did not hold (412, or 409 for a concurrent conditional write). A
    store that ignores conditional headers writes unconditionally and answers True."""
    if not is_remote(uri):
        raise ValueError(f"{uri}: conditional writes are for object storage only")
    if absent == (etag is not None):
        raise ValueError("write_bytes_if needs exactly one of absent and etag")
    fs, path = filesystem(uri)
    cond: dict[str, Any] = {"mode": "create"} if absent else {"IfMatch": '"' + str(etag).strip('"') + '"'}
    try:
        fs.pipe_file(path, data, **cond)
    except FileExistsError:  # s3fs's translation of a failed If-None-Match
        return False
    except Exception as exc:
        if _client_code(exc) in _PRECONDITION_CODES:
            return False
        _raise(exc, uri)
    return True


def list_tree(uri: str) -> list[ObjectInfo]:
    """Every object (file) under the prefix (directory) ``uri``, recursively, sorted by URI; ``[]`` when
    there is none (a missing bucket is still ``BucketNotFound``)."""
    try:
        return list_objects(uri.rstrip("/") + "/")
    except StoragePermanentError as err:
        if err.reason == OBJECT_NOT_FOUND:
            return []
        raise


def _relative(base: str, uri: str) -> str:
    return uri[len(base.rstrip("/")) + 1 :]


def _local_files(local_dir: str) -> dict[str, int]:
    files: dict[str, int] = {}
    for root, _dirs, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel != PUBLISHED_MARKER:
                files[rel] = os.path.getsize(full)
    return files


def publish_dir(local_dir: str, uri: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the fully written local directory ``local_dir`` to the prefix ``uri`` so that no reader
    ever takes a partial copy for a whole one; returns the marker's record.

    Order: the previous ``PUBLISHED_MARKER`` is deleted (a previous copy stops being readable before any
    of it changes), objects that are not in the new copy are deleted, the files are uploaded (an
    ``*.index.json`` after the files it indexes), and the marker (``{"files": {name: size}, **meta}``)
    is written last. A failure anywhere leaves the prefix without a marker: ``published`` says None and
    the next ``publish_dir`` overwrites it."""
    files = _local_files(local_dir)
    marker = join(uri, PUBLISHED_MARKER)
    delete(marker)
    for obj in list_tree(uri):
        if _relative(uri, obj.uri) not in files:
            delete(obj.uri)
    for rel in sorted(files, key=lambda r: (r.endswith(".index.json"), r)):
        upload_file(os.path.join(local_dir, rel), join(uri, rel))
    record: dict[str, Any] = {"files": files, **(meta or {})}
    write_bytes(marker, json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
    return record


def published(uri: str) -> dict[str, Any] | None:
    """The marker record of the prefix ``uri`` once ``publish_dir`` completed it and every file it lists
    is there with its size; None otherwise (nothing published, being replaced, or damaged since)."""
    try:
        record = json.loads(read_bytes(join(uri, PUBLISHED_MARKER)))
    except StoragePermanentError as err:
        if err.reason == OBJECT_NOT_FOUND:
            return None
        raise
    except ValueError:
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return None
    have = {_relative(uri, o.uri): o.size for o in list_tree(uri)}
    if any(have.get(rel) != size for rel, size in files.items()):
        return None
    return cast(dict[str, Any], record)
