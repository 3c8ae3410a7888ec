"""The trainer process around the run: SIGTERM, the torchrun watchdog, allocator tuning, seeding, quiet
libraries, and the environment-switched debugging files.

- ``StopFlag``: the SIGTERM handler only sets it; the loop all-reduces it with every step's statistics,
  so all ranks stop at the same step boundary (``StopRequested``, exit code ``EXIT_SIGTERM``) after a
  checkpoint.
- ``start_parent_watchdog``: under torchrun, exit when the agent is gone.
- ``tune_malloc``: glibc's mmap and trim thresholds (``TAUON_MALLOC_TUNE=0`` turns it off).
- ``memory_report`` (``$TAUON_MEMORY_REPORT``, bench/memory.py) and ``trace_samples``
  (``$TAUON_TRACE_SAMPLES``, the exactly-once resume tests) write nothing unless their variable is set.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import warnings
from types import FrameType

import numpy as np
import torch

from tauon_core.errors import EXIT_RETRYABLE

from .dist import DistEnv
from .metrics import atomic_write_json


class StopRequested(Exception):
    """SIGTERM seen by some rank; all ranks agreed to stop at this step boundary."""


class StopFlag:
    def __init__(self) -> None:
        self.set = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.set = True


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Under torchrun, exit when the agent dies.

    torchrun starts each worker in its own session, so killing only torchrun (SIGKILL, a crashed agent)
    would leave workers training and writing checkpoints next to the next attempt's. A container kill takes
    everything down anyway; this covers process-backed runs (``tauon run --local``, the dev node).
    """
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print("tauon-trainer: torchrun agent is gone; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_RETRYABLE)

    threading.Thread(target=watch, name="tauon-parent-watchdog", daemon=True).start()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def quiet_libraries() -> None:
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> bool:
    """Keep the host allocator from returning and re-faulting the training step's large buffers.

    glibc serves blocks above its mmap threshold with fresh mmaps and gives freed heap back to the
    kernel, so every step's activations, gradients and (under fsdp) collective buffers come back as
    new zeroed pages. Serving up to 32 MiB from the heap and never trimming it made the CPU steps of
    bench/memory 10 % (ddp) and 18 % (fsdp) faster; the heap stays at its peak, which a training
    process reaches every step anyway. Off with ``TAUON_MALLOC_TUNE=0`` or when glibc's own
    ``MALLOC_*`` variables are set; a no-op outside glibc."""
    if os.environ.get("TAUON_MALLOC_TUNE", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)
    except (OSError, AttributeError):
        return False


def progress_interval() -> float:
    """Seconds between progress lines and progress.json writes (``$TAUON_PROGRESS_INTERVAL``, 2)."""
    raw = os.environ.get("TAUON_PROGRESS_INTERVAL", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else 2.0
    except ValueError:
        return 2.0


def memory_report(d: DistEnv, **values: int | dict[str, int] | None) -> None:
    """``$TAUON_MEMORY_REPORT=PATH``: merge ``values`` into ``PATH.rank<R>.json`` (bench/memory.py)."""
    path = os.environ.get("TAUON_MEMORY_REPORT", "")
    if not path:
        return
    f = f"{path}.rank{d.rank}.json"
    old = json.loads(open(f, encoding="utf-8").read()) if os.path.exists(f) else {}
    atomic_write_json(f, {**old, **values})


def trace_samples(d: DistEnv, step: int, epoch: int, group: list[list[int]]) -> None:
    """``$TAUON_TRACE_SAMPLES``: append the training-set indices of each step to ``<path>.rank<R>``
    (one JSON line per step; a debugging aid, used by the tests to prove exactly-once resumes)."""
    path = os.environ.get("TAUON_TRACE_SAMPLES", "")
    if not path:
        return
    with open(f"{path}.rank{d.rank}", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "indices": [i for mb in group for i in mb]}) + "\n")
