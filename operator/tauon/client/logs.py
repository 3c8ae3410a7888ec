"""Merged logs of a gang: every line prefixed with its node rank, `[rank N] ...`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path


def prefix(rank: int | str, line: str) -> str:
    return f"[rank {rank}] {line}"


class _Tail:
    """Reads whole lines appended to a file (a partial last line waits for its newline)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        parts = data.split(b"\n")
        self.partial = parts.pop()
        if final and self.partial:
            parts.append(self.partial)
            self.partial = b""
        return [p.decode(errors="replace").rstrip("\r") for p in parts]


def merge_files(
    files: dict[int, Path], follow: bool, running: Callable[[], bool], poll: float = 0.3
) -> Iterator[str]:
    """Lines of every rank's log file. Without follow: each rank's file in turn. With follow: new lines
    of all ranks as they are written, until `running()` is false (then whatever is left)."""
    tails = {rank: _Tail(path) for rank, path in sorted(files.items())}
    if not follow:
        for rank, tail in tails.items():
            for line in tail.lines(final=True):
                yield prefix(rank, line)
        return
    while True:
        alive = running()
        idle = True
        for rank, tail in tails.items():
            for line in tail.lines(final=not alive):
                idle = False
                yield prefix(rank, line)
        if not alive:
            return
        if idle:
            time.sleep(poll)
