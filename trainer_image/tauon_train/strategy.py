"""Data-parallel strategy: the ``auto`` memory estimate, the plan, and ``parallelize``.

- ``ddp``: every rank holds the whole model, its gradients and optimizer state (DistributedDataParallel).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) on every transformer block and on the root, over a 1-D device
  mesh created explicitly (``cpu`` + gloo or ``cuda`` + nccl). On GPUs with bf16: parameters and compute
  in bf16, gradient reduction and the sharded fp32 master weights / AdamW state in fp32. On CPU: fp32.
- ``auto``: fsdp when the replicated training state per rank would exceed ``AUTO_FSDP_FRACTION`` of one
  device's memory (GPU memory; on CPU host memory divided by the local processes).

``make_plan`` decides (strategy, why, the estimate, the precision it allows: fsdp has no fp16) and
``parallelize(model, mesh, plan, weights)`` is the one step that applies it to the model skeleton built
on the meta device: activation checkpointing, sharding (fsdp), materializing this rank's part on the
device with global rank 0's weights (``RankZeroWeights``, received by broadcast), and the DDP wrapper.
With ``parallelism.compile`` resolved on (``resolve_compile``: ``auto`` is on for CUDA), each block is
``torch.compile``d between activation checkpointing and sharding (``compile_blocks``).
It returns a ``Parallelized`` whose ``gradient_sync`` and ``precision`` are all the training loop needs
to know, so the loop never branches on the strategy.
"""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .config import ParallelismConfig
from .dist import DistEnv, broadcast_object, log

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import DictValueType
    from torch.distributed.device_mesh import DeviceMesh

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


# --- precision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16 (what is actually used)
    dtype: torch.dtype | None  # autocast dtype, None for fp32 (and under fsdp, whose policy casts)

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


FP32 = Precision("fp32", None)
BF16 = Precision("bf16", torch.bfloat16)


def resolve_precision(requested: str, device: torch.device, d: DistEnv) -> Precision:
    """``hyperparameters.precision`` on this device: ``auto`` is bf16 where the GPU supports it; what the
    device cannot do falls back to fp32 with a warning."""
    cuda = device.type == "cuda"
    if requested == "auto":
        return BF16 if cuda and torch.cuda.is_bf16_supported() else FP32
    if requested == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            log(d, "warning: bf16 not supported by this GPU; using fp32")
            return FP32
        return BF16
    if requested == "fp16":
        if not cuda:
            log(d, "warning: fp16 needs a GPU; using fp32 on CPU")
            return FP32
        return Precision("fp16", torch.float16)
    return FP32


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What ``parallelize`` does: the resolved strategy, why, and the facts it was decided on."""

    strategy: str  # ddp | fsdp
    why: str
    estimate: Estimate
    precision: Precision  # the precision to train in (fsdp: fp16 replaced)
    device: torch.device
    dist: DistEnv
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (resolve_compile)

    def mesh(self) -> DeviceMesh | None:
        """The device mesh the model is sharded over (fsdp); None when it is replicated."""
        return device_mesh(self.device, self.dist.world_size) if self.strategy == "fsdp" else None

    def describe(self) -> str:
        est = self.estimate
        return (
            f"strategy={self.strategy} ({self.why}); params={est.params} trainable={est.trainable} "
            f"replicated={gib(est.replicated_bytes)} sharded={gib(est.sharded_bytes)} "
            f"compile={'on' if self.compile else 'off'}"
        )


def make_plan(
    model: nn.Module, par: ParallelismConfig, precision: Precision, device: torch.device, d: DistEnv
) -> Plan:
    """Estimate the replicated training state of ``model`` (meta device is fine) and resolve
    ``parallelism.strategy``; fsdp cannot train in fp16, so it gets bf16 (or fp32) with a warning."""
    params, trainable = count_params(model)
    est = estimate(
        params,
        trainable,
        precision.name == "bf16",
        d.world_size,
        device_memory_bytes(device, d.local_world_size),
    )
    strategy, why = resolve(par.strategy, est, d.distributed, d.world_size)
    if strategy == "fsdp" and precision.name == "fp16":
        precision = BF16 if torch.cuda.is_bf16_supported() else FP32
        log(d, f"warning: fp16 is not supported with fsdp; using {precision.name}")
    compiled = resolve_compile(par.compile, device)
    return Plan(strategy, why, est, precision, device, d, par.activation_checkpointing, compiled)


def resolve_compile(requested: str, device: torch.device) -> bool:
    """``parallelism.compile``: ``auto`` compiles on CUDA GPUs only (on CPU the compile time, tens of
    seconds per block class, is rarely won back); ``true`` and ``false`` are followed as given."""
    if requested == "auto":
        return device.type == "cuda"
    return requested == "true"


# --- applying it ---------------------------------------------------------------------------------


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


COMPILE_RECOMPILE_LIMIT = 16  # graphs per block code: train/eval x static/dynamic shapes x mask kinds


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer block in place (``Module.compile``: state_dict names keep no
    ``_orig_mod.`` prefix), torchtitan-style: after activation checkpointing (whose per-layer wrapper
    stays outside the compiled region), before ``fully_shard`` or DDP. Blocks of one class share their
    compiled graphs. The backend is inductor (``$TAUON_COMPILE_BACKEND`` overrides it, e.g. aot_eager
    for debugging). Returns the number of blocks compiled."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    backend = os.environ.get("TAUON_COMPILE_BACKEND", "").strip() or "inductor"
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a step that adds some compiled); 0
    without importing dynamo when nothing compiled."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.type == "cuda" else "cpu", (world_size,), mesh_dim_names=("dp",))


def shard_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> nn.Module:
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


@dataclass
class RankZeroWeights:
    """Global rank 0's full state dict (CPU) and non-persistent buffers; None on the other ranks."""

    state_dict: DictValueType | None
    buffers: dict[str, torch.Tensor] | None

    def load_into(self, model: nn.Module, d: DistEnv) -> None:
        """Every rank (collective): this rank's part of rank 0's weights, then rank 0's buffers. The full
        state dict is dropped as soon as it is loaded."""
        full, self.state_dict = self.state_dict, None
        if not d.distributed:
            assert full is not None
            model.load_state_dict(full, strict=True)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                model,
                full if d.is_main and full is not None else {},
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
            )
        del full
        # non-persistent buffers (e.g. rotary frequencies) are not in state dicts: copy rank 0's
        buffers, self.buffers = self.buffers, None
        for name, value in (broadcast_object(d, buffers) or {}).items():
            model.get_buffer(name).copy_(value)


@dataclass
class Parallelized:
    """A model laid out for data-parallel training (what ``parallelize`` returns).

    ``model`` is what forward and backward run on (DDP wrapper, FSDP module or the plain model),
    ``module`` the module whose state_dict names are the model's (checkpoints, the final model)."""

    strategy: str
    model: nn.Module
    module: nn.Module
    precision: Precision  # autocast dtype None under fsdp: its mixed-precision policy casts
    activation_checkpointing: bool | None = None  # None: not requested; False: the model has none
    compiled_blocks: int = 0  # transformer blocks under torch.compile (0: eager)

    def gradient_sync(self, sync: bool) -> AbstractContextManager[object]:
        """Around one micro-batch's forward and backward: reduce gradients only when ``sync`` (the last
        micro-batch of an optimizer step)."""
        return contextlib.nullcontext()


class Replicated(Parallelized):
    def gradient_sync(self, sync: bool) -> AbstractContextManager[object]:
        if not sync and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()


class Sharded(Parallelized):
    def gradient_sync(self, sync: bool) -> AbstractContextManager[object]:
        from torch.distributed.fsdp import FSDPModule

        cast(FSDPModule, self.model).set_requires_gradient_sync(sync)
        return contextlib.nullcontext()


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None, plan: Plan, weights: RankZeroWeights
) -> Parallelized:
    """Apply ``plan`` to ``model``, a skeleton on the meta device: activation checkpointing (when asked
    for), ``torch.compile`` per block (when resolved on), ``fully_shard`` over ``mesh`` (fsdp), then every
    rank materializes its part on the device and receives rank 0's weights; a replicated model is wrapped
    in DDP when there is a process group."""
    ac: bool | None = None
    if plan.activation_checkpointing:
        ac = enable_activation_checkpointing(model)
    compiled = compile_blocks(model) if plan.compile else 0
    if plan.strategy == "fsdp":
        assert mesh is not None
        shard_fsdp(model, mesh, plan.precision.name == "bf16")
    model.to_empty(device=plan.device)
    weights.load_into(model, plan.dist)
    model.train()
    if plan.strategy == "fsdp":
        return Sharded("fsdp", model, model, Precision(plan.precision.name, None), ac, compiled)
    wrapped = wrap_ddp(model, plan.device) if plan.dist.distributed else model
    return Replicated("ddp", wrapped, model, plan.precision, ac, compiled)


# --- memory ------------------------------------------------------------------------------------


def _local_bytes(t: object) -> int:
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
