"""Checkpoints as untrusted input (issue 22): DCP metadata is unpickled only into DCP's own types, every file
of a checkpoint is checked against the sha256 recorded at commit, only data errors move a checkpoint aside
(never the last one), transient load errors keep it, and another job's checkpoint is never resumed.

One process, no process group: DCP saves and loads a tiny model + AdamW in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tauon_core.errors import PermanentError, RetryableError
from tauon_train import checkpoint as ckpt
from tauon_train import dist
from tauon_train import output as out_mod


def _checkpointer(out: Path, seed: int = 0) -> ckpt.Checkpointer:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(2, 4)).sum().backward()
    opt.step()
    return ckpt.Checkpointer(str(out), 0, dist.DistEnv(), module, opt, torch.device("cpu"), lora=False)


def _save(c: ckpt.Checkpointer, step: int, uid: str = "uid-a") -> Path:
    c.save(ckpt.TrainState(step=step, total_steps=10, owner_uid=uid))
    return Path(c.dir) / f"step-{step}"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    out_mod.claim(str(o), "uid-a", "ns/a", 0)
    return o


class _Payload:
    """Unpickling this runs ``os.system`` (it would create ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _rehash(step_dir: Path) -> None:
    """What an attacker who can write the output does too: make the recorded checksums match again."""
    marker = step_dir / ckpt.COMPLETE
    data = json.loads(marker.read_text())
    sums = data.get("sha256")
    if isinstance(sums, dict):
        for rel in sums:
            sums[rel] = hashlib.sha256((step_dir / rel).read_bytes()).hexdigest()
        marker.write_text(json.dumps(data))


def _plant(step_dir: Path, marker: Path, rehash: bool) -> None:
    (step_dir / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    if rehash:
        _rehash(step_dir)


@pytest.mark.parametrize("rehash", [False, True], ids=["checksum-stale", "checksum-forged"])
def test_a_metadata_pickle_that_runs_code_is_refused_and_never_runs(
    out: Path, tmp_path: Path, rehash: bool
) -> None:
    c = _checkpointer(out)
    _save(c, 2)
    newest = _save(c, 4)
    marker = tmp_path / "PWNED"
    _plant(newest, marker, rehash)
    problem = ckpt.validate(str(newest))
    assert problem is not None
    assert ("UnsafeCheckpoint" in problem) if rehash else ("checksum" in problem)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="posix.system|os.system"):
        ckpt.read_metadata(str(newest / "dcp"))
    with pytest.raises(Exception) as info:  # DCP's own read of .metadata goes through the same unpickler
        ckpt.load_shards(str(newest), c._app_state())
    assert "UnsafeCheckpoint" in repr(info.value) or isinstance(info.value, ckpt.UnsafeCheckpoint)
    state = _checkpointer(out, seed=1).resume()  # falls back to the previous checkpoint
    assert state is not None and state.step == 2
    assert not marker.exists(), "the planted pickle ran"
    assert newest.is_dir()


def test_a_tampered_shard_is_detected_before_loading(out: Path) -> None:
    c = _checkpointer(out)
    _save(c, 2)
    newest = _save(c, 4)
    shard = max((newest / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    problem = ckpt.validate(str(newest))
    assert problem is not None and "checksum" in problem and shard.name in problem
    state = _checkpointer(out, seed=1).resume()
    assert state is not None and state.step == 2


def _fail_reads(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    def boom(self: Any, plan: Any, planner: Any) -> Any:
        raise exc

    monkeypatch.setattr(FileSystemReader, "read_data", boom)


def _names(ckdir: Path) -> list[str]:
    return sorted(p.name for p in ckdir.iterdir())


def test_a_transient_load_error_keeps_the_checkpoint_and_is_retryable(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _checkpointer(out)
    _save(c, 2)
    _save(c, 4)
    before = _names(Path(c.dir))
    _fail_reads(monkeypatch, OSError(5, "Input/output error"))
    with pytest.raises(RetryableError):
        _checkpointer(out, seed=1).resume()
    assert _names(Path(c.dir)) == before == ["step-2", "step-4"]
    monkeypatch.undo()
    state = _checkpointer(out, seed=1).resume()
    assert state is not None and state.step == 4


def test_a_data_error_moves_the_newest_aside_but_never_the_last(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _checkpointer(out)
    _save(c, 2)
    _save(c, 4)
    ckdir = Path(c.dir)
    _fail_reads(monkeypatch, pickle.UnpicklingError("corrupt tensor data"))
    with pytest.raises(RetryableError, match="moved aside"):
        _checkpointer(out, seed=1).resume()
    assert [n for n in _names(ckdir) if not n.startswith(".corrupt-")] == ["step-2"]
    with pytest.raises(PermanentError, match="only checkpoint") as info:
        _checkpointer(out, seed=1).resume()
    assert info.value.reason == "CheckpointCorrupt"
    assert (ckdir / "step-2" / ckpt.COMPLETE).is_file(), "the last checkpoint was moved aside"


def test_no_loadable_checkpoint_left_fails_instead_of_restarting_from_zero(out: Path) -> None:
    c = _checkpointer(out)
    only = _save(c, 2)
    shard = max((only / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(PermanentError, match="truncated") as info:
        _checkpointer(out, seed=1).resume()
    assert info.value.reason == "CheckpointCorrupt"
    assert (only / ckpt.COMPLETE).is_file()


def test_a_checkpoint_of_another_job_is_not_resumed(out: Path) -> None:
    c = _checkpointer(out)
    other = _save(c, 2, uid="uid-b")
    with pytest.raises(PermanentError, match="uid-b") as info:
        _checkpointer(out, seed=1).resume()
    assert info.value.reason == "OutputInUse"
    assert (other / ckpt.COMPLETE).is_file()
