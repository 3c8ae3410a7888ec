"""The output directory: ownership, attempt fencing, path containment and durable atomic swaps.

``<output>/.tauon-owner.json`` = ``{"uid", "job", "attempt", "createdAt"}``, written by global rank 0 at
the first start of a job. Another job (another uid) finds it and fails at once with ``OutputInUse``
(nothing is read or overwritten); an output with checkpoints or a model but no owner file is treated the
same way (its owner is unknown). ``attempt`` is raised by each newer attempt; an attempt that finds a
higher recorded attempt is stale (an old pod on a partitioned node) and stops before writing anything.
Jobs without a uid (hand-written job.json) skip the uid check but are still fenced by attempt.
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
    that resolves outside ``mount`` (the volume mounted for it) when that is known."""
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


def clean_stale(output: str) -> list[str]:
    """Remove ``.tmp-model-*``/``.tmp-adapter-*`` left by a crash (or ENOSPC); restore an ``.old-*`` copy
    whose replacement never arrived. Returns what was removed or restored (for the log)."""
    done: list[str] = []
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


def read_owner(output: str) -> dict[str, Any] | None:
    path = os.path.join(output, OWNER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PermanentError(OUTPUT_IN_USE, f"{path} is unreadable ({e}); refusing to use {output}") from None
    if not isinstance(data, dict):
        raise PermanentError(OUTPUT_IN_USE, f"{path} is not a JSON object; refusing to use {output}")
    return data


def _has_results(output: str) -> bool:
    ck = os.path.join(output, "checkpoints")
    has_ck = os.path.isdir(ck) and any(n.startswith("step-") for n in os.listdir(ck))
    return has_ck or os.path.isdir(os.path.join(output, MODEL_DIR))


def claim(output: str, uid: str, job: str, attempt: int) -> dict[str, Any]:
    """Rank 0 at start: take (or confirm) ownership of ``output`` and record ``attempt``.

    Raises ``PermanentError(OutputInUse)`` for another job's output, ``Superseded`` for a stale attempt.
    """
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, OWNER_FILE)
    owner = read_owner(output)
    if owner is None:
        if uid and _has_results(output):
            raise PermanentError(
                OUTPUT_IN_USE,
                f"{output} already holds checkpoints or a model but no {OWNER_FILE} (another job, or an "
                "older tauon); use another output path or empty it",
            )
        owner = {"uid": uid, "job": job, "attempt": attempt, "createdAt": time.time()}
        write_json_durable(path, owner)
        return owner
    if uid and owner.get("uid") != uid:
        raise PermanentError(
            OUTPUT_IN_USE,
            f"{output} belongs to job uid {owner.get('uid') or '(none)'} ({owner.get('job', '?')}), "
            f"not to this job (uid {uid}); see {path}. Nothing was overwritten",
        )
    recorded = int(owner.get("attempt", 0) or 0)
    if recorded > attempt:
        raise Superseded(f"{output}: attempt {recorded} is newer than this attempt {attempt}")
    if recorded < attempt:
        owner = {**owner, "attempt": attempt}
        write_json_durable(path, owner)
    return owner


def check_fence(output: str, attempt: int) -> None:
    """Before every write of checkpoints or the model: stop if a newer attempt has taken over."""
    owner = read_owner(output)
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
