"""torch.distributed plumbing: the environment torchrun gives each worker, backend and device choice, the
few collectives the trainer calls itself (barrier, sum, object broadcast) and rank-0 logging."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launched: bool = False  # started by torchrun (RANK/LOCAL_RANK set)

    @property
    def distributed(self) -> bool:
        """A process group (and DDP) whenever torchrun launched us, even with one process: a 1-node 1-GPU
        job then runs the same NCCL/DDP code path as a 64-GPU one."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @staticmethod
    def from_env(env: dict[str, str] | None = None) -> DistEnv:
        """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE per worker. Without RANK and LOCAL_RANK this is a plain
        single process (the pod's informational WORLD_SIZE is ignored then)."""
        e = os.environ if env is None else env
        if "RANK" not in e or "LOCAL_RANK" not in e:
            return DistEnv(node_rank=int(e.get("NODE_RANK", "0") or 0))
        world = int(e.get("WORLD_SIZE", "1"))
        return DistEnv(
            rank=int(e["RANK"]),
            world_size=world,
            local_rank=int(e["LOCAL_RANK"]),
            local_world_size=int(e.get("LOCAL_WORLD_SIZE", "1")),
            node_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", "0")) or 0),
            launched=True,
        )


def choose_backend(env: dict[str, str] | None = None, cuda: bool | None = None) -> str:
    e = os.environ if env is None else env
    explicit = (e.get("TAUON_DIST_BACKEND") or "").strip().lower()
    if explicit:
        return explicit
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    return "nccl" if has_cuda else "gloo"


def choose_device(d: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if d.local_rank >= n:
            print(
                f"tauon-trainer: warning: local rank {d.local_rank} shares cuda:{d.local_rank % n} "
                f"({n} GPU(s) visible)",
                file=sys.stderr,
                flush=True,
            )
        dev = torch.device("cuda", d.local_rank % n)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def init(d: DistEnv, backend: str, device: torch.device) -> None:
    if not d.distributed or tdist.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    tdist.init_process_group(backend=backend, rank=d.rank, world_size=d.world_size, **kwargs)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:
            pass


def barrier(d: DistEnv, device: torch.device) -> None:
    if d.distributed:
        if device.type == "cuda" and tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[device.index])
        else:
            tdist.barrier()


def all_reduce_sum(d: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if d.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_object(d: DistEnv, obj: T) -> list[T]:
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(d: DistEnv, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (the others pass a placeholder of the same type, usually None)."""
    if not d.distributed:
        return obj
    box: list[T] = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def log(d: DistEnv, msg: str) -> None:
    """One ``tauon-trainer:`` line on stdout, from global rank 0 only."""
    if d.is_main:
        print(f"tauon-trainer: {msg}", flush=True)
