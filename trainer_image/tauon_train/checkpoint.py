"""Atomic checkpoints and resume.

Layout under ``<output>/checkpoints/``::

    step-N/                  a finished checkpoint (renamed into place in one os.rename)
      model.pt               trainable state of the unwrapped model (all weights for full fine-tuning;
                             LoRA weights + modules_to_save for LoRA)
      optimizer.pt           AdamW state
      scheduler.pt           LambdaLR state
      rng.pt                 RNG states of every rank (python, numpy, torch, cuda)
      state.json             step, epoch, position within the epoch, running loss sums, world size
      complete               written last; a directory without it is never loaded
    .tmp-step-N-<random>/    being written (or left behind by a crash; removed at the next start)

Only the newest ``KEEP`` complete checkpoints are kept. Everything here runs on global rank 0 except
``load_checkpoint`` (every rank) and the RNG helpers.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

KEEP = 2
COMPLETE = "complete"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress (or next to start)
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (skipped on resume)
    total_steps: int = 0
    world_size: int = 1
    train_loss_sum: float = 0.0  # sum over optimizer steps of the (global) step loss
    train_loss_count: int = 0
    samples_seen: int = 0  # global training samples processed so far
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoints_dir(output: str) -> str:
    return os.path.join(output, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def list_complete(ckdir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first. Incomplete and temporary dirs are ignored."""
    out: list[tuple[int, str]] = []
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


def _fsync_dir(path: str) -> None:
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


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def remove_stale(ckdir: str) -> None:
    """Remove temporary dirs left by a crash and step dirs without the ``complete`` marker."""
    try:
        names = os.listdir(ckdir)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(ckdir, name)
        if name.startswith(".tmp-") or name.startswith(".old-"):
            shutil.rmtree(path, ignore_errors=True)
        elif _STEP_RE.match(name) and not os.path.isfile(os.path.join(path, COMPLETE)):
            shutil.rmtree(path, ignore_errors=True)


def prune(ckdir: str, keep: int = KEEP) -> None:
    found = list_complete(ckdir)
    for _, path in found[:-keep] if keep > 0 else found:
        # rename first so a half-deleted dir never looks like a checkpoint
        trash = os.path.join(ckdir, f".old-{os.path.basename(path)}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    output: str,
    state: TrainState,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int = KEEP,
) -> str:
    """Write ``step-<state.step>`` atomically (temp dir + rename), prune old ones, return its path."""
    ckdir = checkpoints_dir(output)
    os.makedirs(ckdir, exist_ok=True)
    name = step_dir_name(state.step)
    tmp = os.path.join(ckdir, f".tmp-{name}-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        _torch_save(model_state, os.path.join(tmp, "model.pt"))
        _torch_save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        _torch_save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
        _torch_save(rng_states, os.path.join(tmp, "rng.pt"))
        _write_json(os.path.join(tmp, "state.json"), asdict(state))
        _write_json(os.path.join(tmp, COMPLETE), {"step": state.step, "time": time.time()})
        _fsync_dir(tmp)
        final = os.path.join(ckdir, name)
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): swap it out
            old = os.path.join(ckdir, f".old-{name}-{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckdir, keep)
    return final


@dataclass
class LoadedCheckpoint:
    path: str
    state: TrainState
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: list[dict[str, Any]]


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        raw = json.load(f)
    known = {k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw}
    state = TrainState(**known)

    def load(name: str) -> Any:
        return torch.load(os.path.join(path, name), map_location=map_location, weights_only=True)

    return LoadedCheckpoint(
        path=path,
        state=state,
        model_state=load("model.pt"),
        optimizer_state=load("optimizer.pt"),
        scheduler_state=load("scheduler.pt"),
        rng_states=load("rng.pt"),
    )


# --- RNG state --------------------------------------------------------------------------------


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states, as plain lists/tensors (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
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
