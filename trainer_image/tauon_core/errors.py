"""Permanent (non-retryable) errors and the termination message contract (docs/api.md, "Failure semantics").

A permanent error is one that retrying cannot fix: bad configuration, bad data, a missing model. The
trainer reports it three ways, then exits with code 2:

- one line on stderr: ``tauon-trainer: error: <Reason>: <message>``;
- the termination log (``$TAUON_TERMINATION_LOG``, default ``/dev/termination-log`` when that file exists)
  gets ``{"retryable": false, "reason": "<Reason>", "message": "<message>"}``; an unwritable log is ignored;
- exit code ``EXIT_PERMANENT`` (2).

torchrun turns any failing worker into its own exit code 1, so the operator classifies the pod by the
termination message, never by the exit code.
"""

from __future__ import annotations

import json
import os
import sys

EXIT_OK = 0
EXIT_RETRYABLE = 1  # unexpected exception: the operator restarts the gang
EXIT_PERMANENT = 2  # PermanentError: the job goes Failed (PermanentError)
EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped at a step boundary; retryable

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message.
_MAX_MESSAGE_CHARS = 3000


class PermanentError(Exception):
    """An error that retrying cannot fix. ``reason`` is CamelCase (e.g. ``DatasetNotFound``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class RetryableError(Exception):
    """An error that a restart may fix (an unreachable store); ``reason`` is CamelCase and reaches the
    termination message with ``retryable: true``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# Reasons used by the trainer (others may be added; keep them CamelCase).
INVALID_CONFIG = "InvalidConfig"
DATASET_NOT_FOUND = "DatasetNotFound"
INVALID_DATASET = "InvalidDataset"
MISSING_COLUMN = "MissingColumn"
EMPTY_DATASET = "EmptyDataset"
INVALID_LABEL = "InvalidLabel"
MODEL_NOT_FOUND = "ModelNotFound"
INVALID_MODEL = "InvalidModel"
INVALID_MODEL_CONFIG = "InvalidModelConfig"  # model.config (init: scratch) rejected by transformers
OUTPUT_IN_USE = "OutputInUse"  # the output belongs to another job (owner file with another uid)
FOREIGN_CONFIG = "ForeignConfig"  # job.json's uid differs from $TAUON_JOB_UID
INVALID_OUTPUT = "InvalidOutput"  # output.path resolves outside its mount, or has ./../empty segments
ATTEMPT_SUPERSEDED = "AttemptSuperseded"  # a newer attempt owns the output (retryable: this pod is stale)
CHECKPOINT_CORRUPT = "CheckpointCorrupt"  # a checkpoint's data is bad (checksum, refused pickle, no shard)
CHECKPOINT_UNREADABLE = "CheckpointUnreadable"  # loading failed otherwise (EIO, OOM): retryable, kept


def termination_log_path() -> str | None:
    """``$TAUON_TERMINATION_LOG``, else /dev/termination-log when it exists (Kubernetes creates it in every
    container); None otherwise, so a run outside Kubernetes never creates files under /dev."""
    explicit = os.environ.get("TAUON_TERMINATION_LOG")
    if explicit:
        return explicit
    return DEFAULT_TERMINATION_LOG if os.path.exists(DEFAULT_TERMINATION_LOG) else None


def write_termination_log(payload: dict[str, object]) -> bool:
    """Write ``payload`` as JSON to the termination log; False (and no exception) when unwritable."""
    path = termination_log_path()
    if path is None:
        return False
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload, ensure_ascii=False))
        return True
    except OSError:
        return False


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_MAX_MESSAGE_CHARS]


def report_permanent(err: PermanentError) -> int:
    """Print the one-line reason, write the termination message, return the exit code."""
    message = _one_line(err.message)
    print(f"tauon-trainer: error: {err.reason}: {message}", file=sys.stderr, flush=True)
    write_termination_log({"retryable": False, "reason": err.reason, "message": message})
    return EXIT_PERMANENT


def report_retryable(exc: BaseException) -> int:
    """Record an unexpected exception as retryable (the traceback is printed by the caller)."""
    if isinstance(exc, RetryableError):
        reason, message = exc.reason, _one_line(exc.message)
    else:
        reason, message = "TrainerError", _one_line(f"{type(exc).__name__}: {exc}")
    write_termination_log({"retryable": True, "reason": reason, "message": message})
    return EXIT_RETRYABLE
