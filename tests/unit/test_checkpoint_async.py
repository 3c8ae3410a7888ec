"""Asynchronous checkpoints in one process (no process group): the switch, the test hook's parsing, the
hashing writer, and a background save whose failure surfaces at the next save. The 2-rank behaviour
(ddp, fsdp, LoRA, Superseded, SIGKILL mid-save) is in tests/workload/test_async_checkpoint.py."""

from __future__ import annotations

import errno
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tauon_core.errors import PermanentError
from tauon_train import checkpoint as ckpt
from tauon_train import dist
from tauon_train import output as out_mod


def _checkpointer(out: Path, background: bool = True) -> ckpt.Checkpointer:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(2, 4)).sum().backward()
    opt.step()
    return ckpt.Checkpointer(
        str(out), 0, dist.DistEnv(), module, opt, torch.device("cpu"), lora=False, background=background
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    out_mod.claim(str(o), "uid-a", "ns/a", 0)
    return o


@pytest.mark.parametrize(
    ("value", "on"), [(None, True), ("", True), ("0", True), ("1", False), ("true", False), (" YES ", False)]
)
def test_background_saves_are_the_default_and_the_env_var_forces_sync(value: str | None, on: bool) -> None:
    assert ckpt.async_enabled({} if value is None else {ckpt.SYNC_ENV: value}) is on


def test_the_write_delay_hook_applies_from_its_step_and_rejects_garbage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ckpt._test_write_delay(5) == 0.0
    monkeypatch.setenv(ckpt.TEST_WRITE_DELAY_ENV, "4:2.5")
    assert ckpt._test_write_delay(3) == 0.0 and ckpt._test_write_delay(4) == 2.5
    monkeypatch.setenv(ckpt.TEST_WRITE_DELAY_ENV, "soon")
    with pytest.raises(ValueError, match=ckpt.TEST_WRITE_DELAY_ENV):
        ckpt._test_write_delay(4)


def test_the_hashing_stream_hashes_exactly_what_reaches_the_file() -> None:
    raw = io.BytesIO()
    s = ckpt._HashingStream(raw)
    s.write(b"abc")
    s.write(memoryview(b"defgh"))
    torch.save(torch.arange(5), s)  # how DCP writes a tensor item (through its NoCloseWriter)
    assert s.tell() == len(raw.getvalue())
    assert s.hexdigest() == hashlib.sha256(raw.getvalue()).hexdigest()
    assert not s.seekable()


def test_a_background_save_commits_with_the_writers_checksums_and_reads_nothing_back(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _checkpointer(out)
    reads: list[str] = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda uri: reads.append(uri) or real(uri))
    c.save(ckpt.TrainState(step=3, owner_uid="uid-a"))
    assert c.pending
    path = c.wait()
    assert path == str(out / "checkpoints" / "step-3") and not c.pending
    assert reads == []  # the commit hashed nothing by reading
    sums = json.loads((Path(path) / ckpt.COMPLETE).read_text())[ckpt.SUMS]
    files = sorted(
        str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file() and p.name != ckpt.COMPLETE
    )
    assert sorted(sums) == files
    assert all(sums[rel] == hashlib.sha256((Path(path) / rel).read_bytes()).hexdigest() for rel in files)
    assert ckpt.validate(path) is None and reads  # verification on resume still reads every file
    assert c.close() is None


def test_a_background_failure_fails_the_next_save_and_leaves_the_previous_checkpoint(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _checkpointer(out)
    c.save(ckpt.TrainState(step=1, owner_uid="uid-a"))
    c.wait()

    def refuse(self: ckpt._HashingStream, b: bytes) -> int:
        raise OSError(errno.ENOSPC, "injected: no space left on device")

    monkeypatch.setattr(ckpt._HashingStream, "write", refuse)
    c.save(ckpt.TrainState(step=2, owner_uid="uid-a"))  # returns; the write fails in the background
    with pytest.raises(OSError, match="no space left") as err:
        c.save(ckpt.TrainState(step=3, owner_uid="uid-a"))
    assert not isinstance(err.value, PermanentError)  # main() reports it retryable
    assert ckpt.latest_complete(c.dir) == (1, str(out / "checkpoints" / "step-1"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert not c.pending and c.close() is None


def test_close_returns_the_failure_of_the_save_in_flight_without_raising(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _checkpointer(out)
    monkeypatch.setattr(
        ckpt, "write_rng", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "injected EIO"))
    )
    c.save(ckpt.TrainState(step=1, owner_uid="uid-a"))
    failure = c.close()
    assert isinstance(failure, OSError) and "injected EIO" in str(failure)
    assert ckpt.latest_complete(c.dir) is None


def test_the_synchronous_mode_writes_the_same_marker_before_returning(out: Path) -> None:
    c = _checkpointer(out, background=False)
    c.save(ckpt.TrainState(step=2, owner_uid="uid-a"))
    assert not c.pending and ckpt.latest_complete(c.dir) == (2, str(out / "checkpoints" / "step-2"))
    assert ckpt.validate(str(out / "checkpoints" / "step-2")) is None
