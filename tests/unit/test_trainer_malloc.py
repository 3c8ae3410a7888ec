"""The trainer's host-allocator tuning (runtime.tune_malloc, called first by train.main): on by default, off
on request."""

from __future__ import annotations

import pytest

from tauon_train import runtime


def test_malloc_tuning_can_be_turned_off_and_yields_to_glibc_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAUON_MALLOC_TUNE", "0")
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("TAUON_MALLOC_TUNE")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user tunes glibc themselves: leave it alone
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert runtime.tune_malloc() is True  # glibc (this machine and the image)
