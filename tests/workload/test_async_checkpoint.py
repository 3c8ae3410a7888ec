"""Asynchronous DCP checkpoints (issue 23): the step waits only for the copy of the state to host memory;
the write, the agreement and rank 0's commit run in the background on a gloo group of their own, and the
``complete`` marker keeps its guarantees.

Two kinds of test, both with 2 gloo ranks under torchrun on CPU:

- ``_WORKER``: the ``Checkpointer`` alone on a tiny model (ddp, fsdp, LoRA-like frozen parameters), a few
  seconds each: a background save keeps the state of the step it was taken at while training goes on, and
  resumes to exactly that state; a failure of one rank's background write fails the next ``save`` (or
  ``wait``) on every rank; a newer attempt taking over mid-save fails it ``Superseded`` on every rank; the
  checksums in ``complete`` are those of the files on disk and the commit reads no file back.
- the real trainer (tiny Llama): a run SIGKILLed while the background write of its second checkpoint is in
  progress (``TAUON_TEST_CHECKPOINT_WRITE_DELAY`` holds it) leaves the first as the newest complete one,
  and a new run resumes from it and finishes (metrics.json reports the stall and the checkpoint time).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.net import free_port
from tests.workload.helpers import (
    TORCHRUN,
    env,
    kill_tree,
    llama_job,
    metrics,
    run,
    torchrun_cmd,
    write_job,
)

_WORKER = r'''
import errno, json, os, sys, time
import torch, torch.distributed as tdist
from torch import nn
from tauon_train import checkpoint as ckpt, dist
from tauon_train import output as out_mod
from tauon_core.errors import PermanentError, RetryableError

strategy, lora, scenario, out = sys.argv[1], sys.argv[2] == "lora", sys.argv[3], sys.argv[4]
d = dist.DistEnv.from_env()
dist.init(d, "gloo", torch.device("cpu"))
if d.is_main:
    out_mod.claim(out, "uid-a", "ns/a", 0)
tdist.barrier()


def build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if lora:  # only the trainable parameters are stored
        for p in model[0].parameters():
            p.requires_grad_(False)
    module = model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (d.world_size,)))
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    c = ckpt.Checkpointer(out, 0, d, module, opt, torch.device("cpu"), lora, background=True)
    return model, module, opt, c


def train(model, opt, n):
    for _ in range(n):
        x = torch.randn(4, 8)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def local(c):
    """This rank's stored state (local shards), flattened: what a resume must reproduce exactly."""
    from torch.distributed.tensor import DTensor
    flat = {}
    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, DTensor):
            flat[prefix] = v.to_local().detach().clone()
        elif isinstance(v, torch.Tensor):
            flat[prefix] = v.detach().clone()
    walk("", c._app_state())
    return flat


def report(**kw):
    with open(os.path.join(os.path.dirname(out), f"result-{d.rank}.json"), "w") as f:
        json.dump({"rank": d.rank, **kw}, f)


model, module, opt, c = build(0)
train(model, opt, 2)
if scenario == "resume":
    torch.manual_seed(100 + d.rank)
    expected = local(c)
    c.save(ckpt.TrainState(step=2, total_steps=9, world_size=d.world_size, strategy=strategy, owner_uid="uid-a"))
    in_flight = c.pending
    train(model, opt, 3)  # mutates parameters and optimizer state while the save may still be writing
    changed = any(not torch.equal(v, local(c)[k]) for k, v in expected.items())
    path = c.wait()
    c.close()
    _, module2, opt2, c2 = build(1)  # other initial weights
    before = local(c2)
    st = c2.resume()
    got = local(c2)
    same = sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    differed = any(not torch.equal(expected[k], before[k]) for k in expected)
    names = sorted(json.loads(open(os.path.join(path, "complete")).read())["sha256"])
    report(in_flight=in_flight, changed=changed, same=same, differed=differed, step=st.step, path=path,
           keys=sorted(expected), names=names, latest=ckpt.latest_complete(c.dir)[1])
elif scenario == "fail":
    c.save(ckpt.TrainState(step=1, owner_uid="uid-a"))
    c.wait()
    if d.rank == 1:  # rank 1's storage refuses the shard write (an unwritable target)
        def refuse(self, b):
            raise OSError(errno.EROFS, "injected: read-only file system")
        ckpt._HashingStream.write = refuse
    c.save(ckpt.TrainState(step=2, owner_uid="uid-a"))  # returns: the write fails in the background
    returned = True
    errors = []
    for call in ("save", "wait"):
        try:
            if call == "save":
                c.save(ckpt.TrainState(step=3, owner_uid="uid-a"))
            else:
                c.wait()
            errors.append(None)
        except BaseException as e:
            errors.append([type(e).__name__, isinstance(e, PermanentError), str(e)[:300]])
    tdist.barrier()  # rank 0 has dropped the failed save's directory
    report(returned=returned, errors=errors, latest=ckpt.latest_complete(c.dir)[0],
           left=sorted(os.listdir(c.dir)), close=repr(c.close()))
elif scenario == "superseded":
    os.environ[ckpt.TEST_WRITE_DELAY_ENV] = "2:2"  # hold the write of step 2 for 2 s
    c.save(ckpt.TrainState(step=2, owner_uid="uid-a"))
    if d.is_main:  # a newer attempt takes over the output while the shards are written
        out_mod.claim(out, "uid-a", "ns/a", 1)
    try:
        c.wait()
        err = None
    except BaseException as e:
        err = type(e).__name__
    tdist.barrier()
    report(err=err, latest=ckpt.latest_complete(c.dir), left=sorted(os.listdir(c.dir)))
elif scenario == "checksums":
    reads = []
    real = ckpt._sha256
    def counting(uri):
        reads.append(uri)
        return real(uri)
    ckpt._sha256 = counting
    for step in (1, 2):
        c.save(ckpt.TrainState(step=step, owner_uid="uid-a"))
        train(model, opt, 1)
    c.wait()
    commit_reads = list(reads)
    path = ckpt.latest_complete(c.dir)[1]
    problem = ckpt.validate(path) if d.is_main else None
    report(commit_reads=commit_reads, path=path, problem=problem, validate_reads=len(reads) - len(commit_reads))
tdist.barrier()
dist.shutdown()
'''


def _worker(tmp_path: Path, strategy: str, method: str, scenario: str) -> list[dict[str, Any]]:
    script = tmp_path / "ckpt_worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out"
    cmd = [
        TORCHRUN,
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        strategy,
        method,
        scenario,
        str(out),
    ]
    res = run(cmd, env(tmp_path), timeout=240)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    found = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in found] == [0, 1]
    return found


@pytest.mark.parametrize(
    ("strategy", "method"),
    [("ddp", "full"), ("fsdp", "full"), ("fsdp", "lora")],
    ids=["ddp", "fsdp", "fsdp-lora"],
)
def test_a_background_save_resumes_to_the_state_of_its_step(
    tmp_path: Path, strategy: str, method: str
) -> None:
    r0, r1 = _worker(tmp_path, strategy, method, "resume")
    for r in (r0, r1):
        assert r["changed"], "training after save() did not change the state: the test proves nothing"
        assert r["differed"], "the fresh model already had the saved state: the test proves nothing"
        assert r["same"], r  # exactly the state of step 2, not of the steps trained while it was written
        assert r["step"] == 2 and r["latest"] == r["path"]
    if method == "lora":  # the frozen layer is not stored
        assert not any(k.startswith(".model.0.") for k in r0["keys"]), r0["keys"]
        assert any(k.startswith(".model.2.") for k in r0["keys"])
    # the marker names every file of the checkpoint: both ranks' shards and RNG states, metadata, state
    step_dir = Path(str(r0["path"]))
    on_disk = sorted(
        str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != "complete"
    )
    assert r0["names"] == on_disk
    assert {"dcp/.metadata", "rng/rank-0.pt", "rng/rank-1.pt", "state.json"} <= set(on_disk)


def test_a_background_write_failure_fails_the_next_save_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = _worker(tmp_path, "ddp", "full", "fail")
    for r in (r0, r1):
        assert r["returned"]
        save_err, wait_err = r["errors"]
        assert save_err is not None, r  # the next save() raised ...
        assert save_err[1] is False, r  # ... not permanently: main() reports it retryable
        assert "read-only file system" in save_err[2] or "another rank failed" in save_err[2], r
        assert wait_err is None  # raised once; the next wait has nothing in flight
        assert r["latest"] == 1  # step 2 never became visible
        assert r["left"] == ["step-1"], r  # its temporary directory was dropped
        assert r["close"] == "None"
    assert "read-only file system" in r1["errors"][0][2]


def test_a_newer_attempt_taking_over_mid_save_is_superseded_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = _worker(tmp_path, "ddp", "full", "superseded")
    for r in (r0, r1):
        assert r["err"] == "Superseded", r
        assert r["latest"] is None and r["left"] == [], r


def test_marker_checksums_match_the_files_and_the_commit_reads_none_back(tmp_path: Path) -> None:
    r0, _ = _worker(tmp_path, "fsdp", "full", "checksums")
    assert r0["commit_reads"] == [], r0  # no file was hashed by reading it back at commit
    assert r0["problem"] is None and int(r0["validate_reads"]) > 0  # resume verification still reads
    step_dir = Path(str(r0["path"]))
    sums = json.loads((step_dir / "complete").read_text())["sha256"]
    files = sorted(
        str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.name != "complete" and p.is_file()
    )
    assert sorted(sums) == files
    for rel in files:
        assert sums[rel] == hashlib.sha256((step_dir / rel).read_bytes()).hexdigest(), rel


def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """Checkpoints every 2 steps; the write of step 4 (and later) is held for 600 s in the background, so
    training goes on to step 6 and blocks there waiting for it. Killed then: step 2 is the newest complete
    checkpoint, step 4 only a temporary directory; a new run resumes from step 2 and finishes."""
    out = tmp_path / "out"
    cfg = write_job(
        tmp_path / "job.json",
        llama_job(out, "fsdp", hyperparameters={"maxSteps": 8}, output={"checkpointEverySteps": 2}),
    )
    e = env(tmp_path, TAUON_TEST_CHECKPOINT_WRITE_DELAY="4:600")
    proc = subprocess.Popen(
        torchrun_cmd(cfg, 2), env=e, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckdir = out / "checkpoints"

    def writing_step_4() -> bool:
        tmps = list(ckdir.glob(".tmp-step-4-*/dcp/*")) if ckdir.is_dir() else []
        return bool(tmps) and (ckdir / "step-2" / "complete").is_file()

    try:
        deadline = time.monotonic() + 240
        while not writing_step_4() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writing_step_4(), "the background write of step 4 never started"
        time.sleep(1.0)  # let the loop run on (it is not blocked by the held write)
    finally:
        kill_tree(proc)
    from tauon_train import checkpoint as ckpt

    assert ckpt.latest_complete(str(ckdir)) == (2, str(ckdir / "step-2"))
    assert not (ckdir / "step-4").exists() and not (out / "metrics.json").exists()

    res = run(torchrun_cmd(cfg, 2), env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming from {ckdir / 'step-2'} (step 2" in res.stdout
    m = metrics(out)
    assert m["resumedFromStep"] == 2 and m["steps"] == 8
    assert m["checkpointAsync"] is True
    assert 0 <= m["checkpointStallSeconds"] and 0 < m["checkpointSeconds"]
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-6", "step-8"]
