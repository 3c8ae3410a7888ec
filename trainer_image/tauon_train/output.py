"""The output directory (or ``s3://`` prefix): ownership, attempt fencing, path containment and durable
atomic swaps.

``<output>/.tauon-owner.json`` = ``{"uid", "job", "attempt", "createdAt"}``, written by global rank 0 at
the first start of a job. Another job (another uid) finds it and fails at once with ``OutputInUse``
(nothing is read or overwritten); an output with checkpoints or a model but no owner file is treated the
same way (its owner is unknown). ``attempt`` is raised by each newer attempt; an attempt that finds a
higher recorded attempt is stale (an old pod on a partitioned node) and stops before writing anything.
Jobs without a uid (hand-written job.json) skip the uid check but are still fenced by attempt.

Object storage (``output.path: s3://bucket/prefix``)
    The same owner file, written with conditional PUTs (``tauon_core.storage.write_bytes_if``): the
    first claim creates it with ``If-None-Match: *`` (of two jobs starting together on an empty prefix
    exactly one creates it; the other reads the winner's uid and fails ``OutputInUse``) and a newer
    attempt raises ``attempt`` with ``If-Match: <etag of what it read>`` (a concurrent change makes it
    read again and decide again). AWS S3 and SeaweedFS honour both headers. On a store that ignores
    them the claim reads back the owner file after creating it, which leaves one window: two first
    claims whose create-and-read-back sequences interleave (A writes, A reads back, B writes, B reads
    back) both proceed and the later writer's uid stands. The fence then stops the other job: rank 0
    remembers the uid it claimed for, and ``check_fence`` (before every checkpoint and the model) fails
    ``OutputInUse`` when the owner file names another uid, so the loser writes nothing but what comes
    before its first checkpoint. Checkpoints and the model are never renamed on S3: they become visible
    by a marker written last (checkpoint.py; ``publish_model`` here), so there is nothing for
    ``clean_stale`` to restore.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import time
from typing import Any

from tauon_core import storage
from tauon_core.errors import (
    ATTEMPT_SUPERSEDED,
    FOREIGN_CONFIG,
    INVALID_OUTPUT,
    OUTPUT_IN_USE,
    PermanentError,
)

OWNER_FILE = ".tauon-owner.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
MODEL_MARKER = storage.PUBLISHED_MARKER  # S3: written last under model/ (and adapter/)
_CLAIM_TRIES = 4
_CLAIMED: dict[str, str] = {}  # output -> the uid this process (rank 0) claimed it for


class Superseded(Exception):
    """A newer attempt owns the output: this (stale) process must stop without writing."""

    reason = ATTEMPT_SUPERSEDED


# --- uid and path checks (before anything is written) -----------------------------------------


def check_uid(config_uid: str, env: dict[str, str] | None = None) -> None:
    """Refuse a job.json written for another job than the one this pod belongs to."""
    e = os.environ if env is None else env
    pod_uid = (e.get("TAUON_JOB_UID") or "").strip()
    if pod_uid and config_uid != pod_uid:
        raise PermanentError(
            FOREIGN_CONFIG,
            f"job.json belongs to job uid {config_uid or '(none)'} but this pod runs job uid {pod_uid} "
            "(TAUON_JOB_UID); refusing to train with another job's configuration",
        )


def current_attempt(config_attempt: int, env: dict[str, str] | None = None) -> int:
    """The gang attempt of this pod: ``$TAUON_ATTEMPT`` (set per pod by the operator; the job's ConfigMap
    is shared by all attempts), else job.json's ``attempt``."""
    e = os.environ if env is None else env
    raw = (e.get("TAUON_ATTEMPT") or "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise PermanentError(INVALID_OUTPUT, f"TAUON_ATTEMPT must be an integer, got {raw!r}") from None
        if value >= 0:
            return max(value, config_attempt)
    return config_attempt


def check_output_path(raw: str, mount: str | None) -> str:
    """The real output directory; refuses ``.``/``..``/empty segments and any path (symlinks included)
    that resolves outside ``mount`` (the volume mounted for it) when that is known. An ``s3://`` output
    is checked the same way (bucket and key segments) and returned without a trailing ``/``."""
    if storage.is_remote(raw):
        return _check_remote_output(raw)
    segs = raw.split("/")
    body = segs[1:] if raw.startswith("/") else segs
    if body and body[-1] == "":
        body = body[:-1]
    if any(s in ("", ".", "..") for s in body):
        raise PermanentError(INVALID_OUTPUT, f"output.path {raw!r} has an empty, '.' or '..' segment")
    real = os.path.realpath(raw)
    if mount:
        root = os.path.realpath(mount)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            raise PermanentError(
                INVALID_OUTPUT, f"output.path {raw} resolves to {real}, outside its mount {root}"
            )
    return real


def _check_remote_output(raw: str) -> str:
    bucket, _, key = raw[len("s3://") :].partition("/")
    segs = key.split("/") if key else []
    if segs and segs[-1] == "":
        segs = segs[:-1]
    if not bucket or any(s in ("", ".", "..") for s in segs):
        raise PermanentError(
            INVALID_OUTPUT, f"output.path {raw!r} needs a bucket and no empty, '.' or '..' key segment"
        )
    return "s3://" + "/".join([bucket, *segs])


# --- durable writes ---------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def write_json_durable(path: str, obj: object) -> None:
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(d)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def swap_in(tmp: str, final: str) -> None:
    """Make the fully written, fsynced directory ``tmp`` appear at ``final``.

    An existing ``final`` is exchanged atomically where the filesystem supports it (readers see the old
    or the new directory, never neither); elsewhere it is renamed to ``.old-<name>-*`` first, which
    ``clean_stale`` puts back if a crash happens between the two renames.
    """
    parent = os.path.dirname(final)
    fsync_tree(tmp)
    if not os.path.exists(final):
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
    else:
        old = os.path.join(parent, f".old-{os.path.basename(final)}-{secrets.token_hex(4)}")
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


def publish_model(local_dir: str, uri: str) -> None:
    """S3: make the fully written local directory ``local_dir`` the prefix ``uri`` (``<output>/model`` or
    ``adapter``) without a rename: ``tauon_core.storage.publish_dir`` deletes the previous marker first
    and writes ``MODEL_MARKER`` (every file and its size) last, so a reader that waits for the marker
    (``storage.published``) never loads a partial or mixed model. While a model is being replaced there
    is none to read (never a mix of the two)."""
    storage.publish_dir(local_dir, uri, {"format": "huggingface", "createdAt": time.time()})


def clean_stale(output: str) -> list[str]:
    """Remove ``.tmp-model-*``/``.tmp-adapter-*`` left by a crash (or ENOSPC); restore an ``.old-*`` copy
    whose replacement never arrived. Returns what was removed or restored (for the log). Nothing to do on
    S3 (a model prefix without its marker is never read and is overwritten by the next publish)."""
    done: list[str] = []
    if storage.is_remote(output):
        return done
    try:
        names = sorted(os.listdir(output))
    except FileNotFoundError:
        return done
    for name in names:
        path = os.path.join(output, name)
        for kind in (MODEL_DIR, ADAPTER_DIR):
            if name.startswith(f".tmp-{kind}-"):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {name}")
            elif name.startswith(f".old-{kind}-"):
                final = os.path.join(output, kind)
                if os.path.exists(final):
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {name}")
                else:
                    os.rename(path, final)
                    done.append(f"restored {name} -> {kind}")
    if done:
        fsync_dir(output)
    return done


# --- ownership and fencing --------------------------------------------------------------------


def _parse_owner(raw: bytes | str, where: str, output: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise PermanentError(
            OUTPUT_IN_USE, f"{where} is unreadable ({e}); refusing to use {output}"
        ) from None
    if not isinstance(data, dict):
        raise PermanentError(OUTPUT_IN_USE, f"{where} is not a JSON object; refusing to use {output}")
    return data


def _read_owner_remote(output: str, tagged: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The owner record on S3 and (``tagged``) the ETag it was read under ("" when not asked). The tag is
    read first: if the object changes in between, the later ``If-Match`` fails and the claim reads again."""
    uri = storage.join(output, OWNER_FILE)
    try:
        tag = storage.stat(uri).etag if tagged else ""
        raw = storage.read_bytes(uri)
    except storage.StoragePermanentError as e:
        if e.reason == storage.OBJECT_NOT_FOUND:
            return None, ""
        raise
    return _parse_owner(raw, uri, output), tag


def read_owner(output: str) -> dict[str, Any] | None:
    if storage.is_remote(output):
        return _read_owner_remote(output)[0]
    path = os.path.join(output, OWNER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PermanentError(OUTPUT_IN_USE, f"{path} is unreadable ({e}); refusing to use {output}") from None
    return _parse_owner(raw, path, output)


def has_results(output: str) -> bool:
    if storage.is_remote(output):
        ck = storage.join(output, "checkpoints")
        has_ck = any(o.uri[len(ck) + 1 :].startswith("step-") for o in storage.list_tree(ck))
        return has_ck or bool(storage.list_tree(storage.join(output, MODEL_DIR)))
    ck = os.path.join(output, "checkpoints")
    has_ck = os.path.isdir(ck) and any(n.startswith("step-") for n in os.listdir(ck))
    return has_ck or os.path.isdir(os.path.join(output, MODEL_DIR))


def _refuse_unowned(output: str, uid: str) -> None:
    if uid and has_results(output):
        raise PermanentError(
            OUTPUT_IN_USE,
            f"{output} already holds checkpoints or a model but no {OWNER_FILE} (another job, or an "
            "older tauon); use another output path or empty it",
        )


def _judge(output: str, owner: dict[str, Any], uid: str, attempt: int) -> int:
    """Refuse another job's output (``OutputInUse``) or a stale attempt (``Superseded``); the recorded
    attempt otherwise."""
    if uid and owner.get("uid") != uid:
        raise PermanentError(
            OUTPUT_IN_USE,
            f"{output} belongs to job uid {owner.get('uid') or '(none)'} ({owner.get('job', '?')}), "
            f"not to this job (uid {uid}); see {storage.join(output, OWNER_FILE)}. Nothing was overwritten",
        )
    recorded = int(owner.get("attempt", 0) or 0)
    if recorded > attempt:
        raise Superseded(f"{output}: attempt {recorded} is newer than this attempt {attempt}")
    return recorded


def claim(output: str, uid: str, job: str, attempt: int) -> dict[str, Any]:
    """Rank 0 at start: take (or confirm) ownership of ``output`` and record ``attempt``.

    Raises ``PermanentError(OutputInUse)`` for another job's output, ``Superseded`` for a stale attempt.
    """
    owner = (
        _claim_remote(output, uid, job, attempt)
        if storage.is_remote(output)
        else _claim_local(output, uid, job, attempt)
    )
    _CLAIMED[output] = uid
    return owner


def _claim_local(output: str, uid: str, job: str, attempt: int) -> dict[str, Any]:
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, OWNER_FILE)
    owner = read_owner(output)
    if owner is None:
        _refuse_unowned(output, uid)
        owner = {"uid": uid, "job": job, "attempt": attempt, "createdAt": time.time()}
        write_json_durable(path, owner)
        return owner
    if _judge(output, owner, uid, attempt) < attempt:
        owner = {**owner, "attempt": attempt}
        write_json_durable(path, owner)
    return owner


def _owner_bytes(owner: dict[str, Any]) -> bytes:
    return (json.dumps(owner, indent=2, sort_keys=True) + "\n").encode()


def _claim_remote(output: str, uid: str, job: str, attempt: int) -> dict[str, Any]:
    """``claim`` on S3: create with ``If-None-Match: *``, raise the attempt with ``If-Match``; a lost
    race reads the owner file again and decides again (the module docstring has the window left where a
    store ignores both)."""
    uri = storage.join(output, OWNER_FILE)
    for _ in range(_CLAIM_TRIES):
        owner, tag = _read_owner_remote(output, tagged=True)
        if owner is None:
            _refuse_unowned(output, uid)
            mine = {"uid": uid, "job": job, "attempt": attempt, "createdAt": time.time()}
            if not storage.write_bytes_if(uri, _owner_bytes(mine), absent=True):
                continue  # created meanwhile by someone else: judge theirs
            seen = _read_owner_remote(output)[0]  # read back: a store without If-None-Match
            if seen is not None and seen.get("uid") == uid:
                _judge(output, seen, uid, attempt)
                return seen
            continue
        if _judge(output, owner, uid, attempt) == attempt:
            return owner
        raised = {**owner, "attempt": attempt}
        if storage.write_bytes_if(uri, _owner_bytes(raised), etag=tag):
            return raised
    raise Superseded(f"{uri} kept changing while attempt {attempt} claimed it; another attempt is writing it")


def claimed_uid(output: str) -> str:
    """The job uid this process (rank 0) claimed ``output`` for; "" before a claim or for a job without
    a uid (hand-written job.json)."""
    return _CLAIMED.get(output, "")


def check_fence(output: str, attempt: int) -> None:
    """Before every write of checkpoints or the model: stop if a newer attempt has taken over, or fail
    ``OutputInUse`` if the owner file now names another job than the one this process claimed it for."""
    owner = read_owner(output)
    mine = _CLAIMED.get(output, "")
    if mine and owner is not None and owner.get("uid") != mine:
        raise PermanentError(
            OUTPUT_IN_USE,
            f"{storage.join(output, OWNER_FILE)} now names job uid {owner.get('uid') or '(none)'}, not "
            f"this job (uid {mine}) that claimed {output}; stopping before writing",
        )
    recorded = int((owner or {}).get("attempt", 0) or 0)
    if recorded > attempt:
        raise Superseded(f"{output}: attempt {recorded} has taken over from this attempt {attempt}")


def fence_status(output: str, attempt: int) -> str | None:
    """``check_fence`` as a value: None while this attempt may write, else why not (to broadcast)."""
    try:
        check_fence(output, attempt)
    except Superseded as e:
        return str(e)
    return None
