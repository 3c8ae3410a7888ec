"""The trainer's point-to-point all-gather and reduce-scatter (tauon_train.gloo_comm) against gloo's own
collectives, on real gloo process groups of 2 and 3 ranks, and inside FSDP2."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)


def _collectives(rank: int, size: int, port: int, results: Any) -> None:
    from tauon_train.gloo_comm import P2PAllGather, P2PReduceScatter

    _init(rank, size, port)
    group = dist.group.WORLD
    n = 1001  # odd per-rank length: nothing relies on even sizes
    g = torch.Generator().manual_seed(rank)
    # integer-valued floats: sums are exact whatever the order, so equality is exact
    shard = torch.randint(-1000, 1000, (n,), generator=g).float()
    full = torch.randint(-1000, 1000, (n * size,), generator=g).float()
    errors: list[str] = []

    want = torch.empty(n * size)
    dist.all_gather_into_tensor(want, shard)
    got = torch.full((n * size,), float("nan"))
    work = P2PAllGather()(got, shard, group, async_op=True)
    # a reduce-scatter issued while the all-gather is still in flight (FSDP's forward prefetch)
    rs = torch.empty(n)
    P2PReduceScatter()(rs, full, group, dist.ReduceOp.SUM)
    assert work is not None
    work.wait()
    if not torch.equal(got, want):
        errors.append("all-gather differs from gloo's")
    want_rs = torch.empty(n)
    dist.reduce_scatter_tensor(want_rs, full.clone(), op=dist.ReduceOp.SUM)
    if not torch.equal(rs, want_rs):
        errors.append("reduce-scatter (SUM) differs from gloo's")
    avg = torch.empty(n)
    P2PReduceScatter()(avg, full, group, dist.ReduceOp.AVG)
    if not torch.allclose(avg, want_rs / size):
        errors.append("reduce-scatter (AVG) is not the SUM divided by the world size")
    # the all-gather's input may already sit in its slot of the output (FSDP's copy-in does that)
    out = torch.zeros(n * size)
    out.view(size, n)[rank].copy_(shard)
    P2PAllGather()(out, out.view(size, n)[rank], group)
    if not torch.equal(out, want):
        errors.append("in-place all-gather differs from gloo's")
    results[rank] = errors
    dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_p2p_collectives_equal_gloo(size: int) -> None:
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(size, _port(), results), nprocs=size, join=True)
    assert dict(results) == {r: [] for r in range(size)}


def _fsdp_step(rank: int, size: int, port: int, results: Any) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    from tauon_train import strategy
    from tauon_train.gloo_comm import P2PAllGather

    _init(rank, size, port)
    mesh = strategy.device_mesh(torch.device("cpu"), size)
    out: dict[str, Any] = {}
    for p2p in (False, True):
        os.environ["TAUON_GLOO_P2P"] = "1" if p2p else "0"
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(33, 33) for _ in range(4)))
        for block in model:
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
        if p2p:
            from tauon_train import gloo_comm

            assert gloo_comm.install(model) == 5
            assert isinstance(model[0]._get_fsdp_state()._fsdp_param_group._all_gather_comm, P2PAllGather)
        else:
            assert isinstance(model[0]._get_fsdp_state()._fsdp_param_group._all_gather_comm, DefaultAllGather)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        x = torch.randn(8, 33, generator=torch.Generator().manual_seed(rank))
        for _ in range(3):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[str(p2p)] = losses
    results[rank] = out
    dist.destroy_process_group()


def test_fsdp_with_p2p_collectives_trains_like_gloo() -> None:
    """Three steps of a small FSDP2 model: the same losses with gloo's collectives and with ours."""
    results = mp.Manager().dict()
    mp.spawn(_fsdp_step, args=(2, _port(), results), nprocs=2, join=True)
    for rank, out in dict(results).items():
        assert out["True"] == pytest.approx(out["False"], rel=1e-6, abs=1e-7), rank
