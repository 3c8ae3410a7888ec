"""Data-parallel strategy: the ``auto`` memory estimate, DDP or FSDP2 wrapping, activation checkpointing.

- ``ddp``: every rank holds the whole model, its gradients and optimizer state (DistributedDataParallel).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) on every transformer block and on the root, over a 1-D device
  mesh created explicitly (``cpu`` + gloo or ``cuda`` + nccl). On GPUs with bf16: parameters and compute
  in bf16, gradient reduction and the sharded fp32 master weights / AdamW state in fp32. On CPU: fp32.
- ``auto``: fsdp when the replicated training state per rank would exceed ``AUTO_FSDP_FRACTION`` of one
  device's memory (GPU memory; on CPU host memory divided by the local processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

AUTO_FSDP_FRACTION = 0.6


@dataclass(frozen=True)
class Estimate:
    params: int
    trainable: int
    replicated_bytes: int  # per rank under ddp
    sharded_bytes: int  # per rank under fsdp
    device_bytes: int  # memory of one device (GPU, or host / local processes)


def count_params(model: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def state_bytes(params: int, trainable: int, bf16: bool) -> int:
    """Replicated training state: weights + gradients + 2 AdamW moments (fp32) (+ fp32 master under bf16).
    Frozen parameters (LoRA) have no gradients or optimizer state."""
    if bf16:
        return 2 * params + 2 * trainable + 8 * trainable + 4 * trainable
    return 4 * params + 4 * trainable + 8 * trainable


def device_memory_bytes(device: torch.device, local_world_size: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        host = int(pages * size)
    except (ValueError, OSError):
        host = 0
    return host // max(1, local_world_size)


def estimate(params: int, trainable: int, bf16: bool, world_size: int, device_bytes: int) -> Estimate:
    rep = state_bytes(params, trainable, bf16)
    return Estimate(params, trainable, rep, -(-rep // max(1, world_size)), device_bytes)


def resolve(requested: str, est: Estimate, distributed: bool, world_size: int) -> tuple[str, str]:
    """(strategy, why). A single process without a process group is always ``ddp`` (plain training)."""
    if not distributed:
        return "ddp", "single process (no process group): nothing to shard"
    if requested in ("ddp", "fsdp"):
        return requested, "requested"
    limit = AUTO_FSDP_FRACTION * est.device_bytes
    if est.device_bytes > 0 and est.replicated_bytes > limit and world_size > 1:
        return "fsdp", (
            f"replicated state {gib(est.replicated_bytes)} > {int(AUTO_FSDP_FRACTION * 100)}% of "
            f"{gib(est.device_bytes)} per device"
        )
    return "ddp", (
        f"replicated state {gib(est.replicated_bytes)} <= {int(AUTO_FSDP_FRACTION * 100)}% of "
        f"{gib(est.device_bytes)} per device"
    )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in ``_no_split_modules`` of the
    (innermost) Hugging Face model, else the children of the longest ModuleList."""
    names: set[str] = set()
    for m in model.modules():
        ns = getattr(m, "_no_split_modules", None)
        if ns:
            names.update(ns)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists: list[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    longest = max(lists, key=lambda m: len(m))
    return list(longest)


def enable_activation_checkpointing(model: nn.Module) -> bool:
    """Recompute each block's activations in backward (non-reentrant; parameter names unchanged)."""
    target: Any = model
    while not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "base_model"):
        target = target.base_model
    fn = getattr(target, "gradient_checkpointing_enable", None)
    if fn is None:
        base = getattr(getattr(model, "base_model", None), "model", None)
        fn = getattr(base, "gradient_checkpointing_enable", None)
    if fn is None:
        return False
    fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def device_mesh(device: torch.device, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.type == "cuda" else "cpu", (world_size,), mesh_dim_names=("dp",))


def shard_fsdp(model: nn.Module, mesh: Any, bf16: bool) -> nn.Module:
    """``fully_shard`` every block, then the root (which takes the embeddings, norm and head); each block
    prefetches the next one's all-gather in forward (and, when blocks reshard, the previous one's in
    backward), so a collective runs while the current block computes.

    - GPUs (nccl): blocks free their gathered parameters after forward and gather them again in backward
      (the lowest memory), except the last one, which backward needs right away.
    - CPU (gloo): blocks keep their gathered parameters from forward to backward (the sharded gradients
      and AdamW state still halve the training state per rank). Measured with bench/memory.py (100M
      Llama, 2 ranks): re-gathering in backward on gloo left fsdp at about 0.4x ddp's samples/s; keeping
      them and prefetching forward brought it to about ddp's. Their all-gathers and reduce-scatters run
      as point-to-point exchanges (``gloo_comm``): 0.73x -> 0.94x ddp's samples/s there."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = getattr(mesh, "device_type", "cpu") != "cpu"
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        prev.set_modules_to_forward_prefetch([nxt])  # type: ignore[operator]
        if reshard:
            nxt.set_modules_to_backward_prefetch([prev])  # type: ignore[operator]
    if not reshard and os.environ.get("TAUON_GLOO_P2P", "1") != "0":
        from tauon_train import gloo_comm

        gloo_comm.install(model)  # gloo's reduce-scatter is a full all-reduce: see gloo_comm
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return DDP(model, **kwargs)


def _local_bytes(t: Any) -> int:
    from torch.distributed.tensor import DTensor

    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return int(t.numel() * t.element_size())


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the training state after an optimizer step: parameters, optimizer state,
    and gradients (the size of the trainable parameters: they exist from backward to ``zero_grad``)."""
    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
    optim = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values())
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
