"""Sharded checkpoints (torch.distributed.checkpoint) that resume at any world size, under either strategy.

``Checkpointer`` owns the checkpoints of a run: ``save`` (the attempt fence, every rank's shards, rank 0's
commit), ``resume`` (the newest checkpoint that validates, older ones as fallback, a checkpoint that fails
to load moved aside) and ``check_fence``. The functions below it are the on-disk layout.

Layout under ``<output>/checkpoints/``::

    step-N/                  a finished checkpoint (renamed into place in one os.rename by global rank 0)
      dcp/                   torch.distributed.checkpoint: {"model": ..., "optim": ...}; every rank writes
                             its own shards (FSDP: its DTensor shards; DDP: rank 0 writes the replicated
                             tensors once). For LoRA only the trainable parameters are stored.
      rng/rank-R.pt          RNG states of rank R (restored when the world size is unchanged)
      state.json             step, epoch, global sample position in the epoch, world size, strategy,
                             owner uid, running loss sums
      complete               written last; a directory without it is never loaded
    .tmp-step-N-<random>/    being written (or left by a crash; removed at the next start)

Parameter names are those of ``get_state_dict`` (wrapper prefixes removed), so a checkpoint written
under ddp loads under fsdp and the other way round, at any world size (DCP reshards on load). The
learning-rate schedule is a function of the step and is recomputed, not stored.

Only the newest ``KEEP`` complete checkpoints are kept. ``validate`` checks a checkpoint without loading
it (metadata readable, every shard file present and long enough), so a truncated newest checkpoint
falls back to the previous one before any tensor is touched. A checkpoint that validates but still
fails to load is quarantined (``.corrupt-step-N-*``) and the run fails retryably: the restart resumes
from the previous one.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import dist
from .output import Superseded, fence_status, fsync_dir, fsync_tree

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

KEEP = 2
COMPLETE = "complete"
STATE = "state.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step-(\d+)$")


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


def remove_stale(ckdir: str) -> list[str]:
    """Remove temporary dirs left by a crash and step dirs without the ``complete`` marker."""
    removed: list[str] = []
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


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# --- writing (tmp dir -> every rank's shards -> rank 0 commits) ---------------------------------


def new_tmp_dir(ckdir: str, step: int) -> str:
    """Rank 0: a fresh temporary directory for step ``step`` (its name is broadcast to every rank)."""
    os.makedirs(ckdir, exist_ok=True)
    tmp = os.path.join(ckdir, f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}")
    os.makedirs(os.path.join(tmp, DCP_DIR))
    os.makedirs(os.path.join(tmp, RNG_DIR))
    return tmp


def write_shards(tmp: str, app_state: dict[str, Any], rank: int, rng: dict[str, Any]) -> None:
    """Every rank (collective): its DCP shards of ``app_state`` and its RNG state."""
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    state_dict_saver.save(
        app_state, storage_writer=FileSystemWriter(os.path.join(tmp, DCP_DIR), sync_files=True)
    )
    with open(os.path.join(tmp, RNG_DIR, f"rank-{rank}.pt"), "wb") as f:
        torch.save(rng, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: str, ckdir: str, state: TrainState, keep: int = KEEP) -> str:
    """Rank 0, after a barrier: state.json, the ``complete`` marker, fsync, rename into place, prune."""
    name = step_dir_name(state.step)
    try:
        _write_json(os.path.join(tmp, STATE), asdict(state))
        _write_json(os.path.join(tmp, COMPLETE), {"step": state.step, "time": time.time()})
        fsync_tree(tmp)
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


# --- reading ----------------------------------------------------------------------------------


def read_state(path: str) -> TrainState:
    with open(os.path.join(path, STATE), encoding="utf-8") as f:
        raw = json.load(f)
    if "sample_pos" not in raw and "batches_in_epoch" in raw:  # checkpoints of older trainers
        raw["sample_pos"] = 0
    known = {k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw}
    return TrainState(**known)


def validate(path: str) -> str | None:
    """None when ``path`` looks loadable; else what is wrong (read without loading any tensor)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    try:
        read_state(path)
    except (OSError, ValueError, TypeError) as e:
        return f"{STATE} unreadable: {e}"
    dcp_dir = os.path.join(path, DCP_DIR)
    try:
        md = FileSystemReader(dcp_dir).read_metadata()
    except Exception as e:
        return f"DCP metadata unreadable: {type(e).__name__}: {e}"
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = info.relative_path
        need = int(info.offset) + int(info.length)
        sizes[rel] = max(sizes.get(rel, 0), need)
    for rel, need in sorted(sizes.items()):
        try:
            have = os.path.getsize(os.path.join(dcp_dir, rel))
        except OSError:
            return f"shard {rel} missing"
        if have < need:
            return f"shard {rel} truncated ({have} of {need} bytes)"
    return None


def load_shards(path: str, app_state: dict[str, Any]) -> None:
    """Every rank (collective): fill ``app_state`` in place from the checkpoint (resharding as needed)."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    state_dict_loader.load(app_state, storage_reader=FileSystemReader(os.path.join(path, DCP_DIR)))


def quarantine(path: str) -> str:
    """Move a checkpoint that failed to load out of the way (``.corrupt-step-N-*``, removed at the next
    start), so the restart falls back to the previous one instead of failing on it forever."""
    parent, name = os.path.split(path)
    dest = os.path.join(parent, f".corrupt-{name}-{secrets.token_hex(4)}")
    os.rename(path, dest)
    fsync_dir(parent)
    return dest


def load_rng(path: str, rank: int) -> dict[str, Any] | None:
    f = os.path.join(path, RNG_DIR, f"rank-{rank}.pt")
    if not os.path.isfile(f):
        return None
    loaded: dict[str, Any] = torch.load(f, map_location="cpu", weights_only=True)
    return loaded


# --- the checkpointer -------------------------------------------------------------------------


class Checkpointer:
    """The checkpoints of one run under ``<output>/checkpoints``, for every rank (the methods are
    collective). ``module`` has the model's state_dict names (no wrapper); LoRA stores only the trainable
    parameters. Writes are fenced: a newer attempt owning the output raises ``Superseded`` on every rank."""

    def __init__(
        self,
        output: str,
        attempt: int,
        d: dist.DistEnv,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        lora: bool,
    ) -> None:
        self.output = output
        self.attempt = attempt
        self.d = d
        self.module = module
        self.optimizer = optimizer
        self.device = device
        self.lora = lora
        self.dir = checkpoints_dir(output)

    def check_fence(self) -> None:
        """Rank 0 reads the owner file; every rank stops (``Superseded``) if a newer attempt took over."""
        fence = dist.broadcast_object(
            self.d, fence_status(self.output, self.attempt) if self.d.is_main else None
        )
        if fence is not None:
            raise Superseded(fence)

    def save(self, state: TrainState) -> None:
        """Every rank writes its shards into rank 0's temp dir; rank 0 commits after a barrier."""
        d = self.d
        self.check_fence()
        tmp = dist.broadcast_object(d, new_tmp_dir(self.dir, state.step) if d.is_main else None)
        assert tmp is not None
        write_shards(tmp, self._app_state(), d.rank, capture_rng(self.device))
        dist.barrier(d, self.device)
        if d.is_main:
            commit(tmp, self.dir, state)
        dist.barrier(d, self.device)

    def resume(self) -> TrainState | None:
        """Load the newest complete checkpoint that validates (logging each one skipped); None when there
        is none. One that fails to load anyway is quarantined and the run fails (retryable)."""
        d = self.d
        found = dist.broadcast_object(d, self._newest_valid() if d.is_main else None)
        if found is None:
            return None
        path, state = found
        from torch.distributed.checkpoint.state_dict import set_state_dict

        st = self._app_state()
        try:
            load_shards(path, st)  # DCP gathers errors: every rank raises together
        except Exception as e:
            moved = quarantine(path) if d.is_main else ""
            dist.barrier(d, self.device)
            raise RuntimeError(
                f"checkpoint {path} failed to load ({type(e).__name__}: {e}); moved aside to {moved or 'a .corrupt- dir'}"
                "; the restart resumes from the previous checkpoint"
            ) from e
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=st["model"],
            optim_state_dict=st["optim"],
            options=self._options(),
        )
        rng = load_rng(path, d.rank) if state.world_size == d.world_size else None
        if rng is not None:
            restore_rng(rng, self.device)
        dist.log(
            d,
            f"resuming from {path} (step {state.step}, epoch {state.epoch}, sample {state.sample_pos}; "
            f"written by {state.world_size} rank(s) under {state.strategy})",
        )
        return state

    def _newest_valid(self) -> tuple[str, TrainState] | None:
        """Rank 0: the newest complete checkpoint that ``validate`` accepts, and its state."""
        for step, path in reversed(list_complete(self.dir)):
            problem = validate(path)
            if problem is None:
                return path, read_state(path)
            dist.log(
                self.d,
                f"warning: checkpoint {path} (step {step}) is not loadable ({problem}); trying an older one",
            )
        return None

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
