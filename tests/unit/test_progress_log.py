"""Handler wiring without a cluster: a failing rank 0 is logged once per job and change, and the echo of
our own status write waits for the children that pass created."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tauon.handlers import finetunejob as ftj
from tauon.handlers import indexes as ix
from tauon.handlers import progress
from tauon.handlers.indexes import Indexes
from tauon.handlers.runtime import RT


@pytest.fixture
async def rank0(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[tuple[int, Any]]]:
    """A rank 0 answering /progress with the queued (status, body) pairs, indexed as a Running job."""
    answers: list[tuple[int, Any]] = []

    async def handle(_: web.Request) -> web.Response:
        status, payload = answers.pop(0) if answers else (404, None)
        return web.json_response(payload, status=status)

    app = web.Application()
    app.router.add_get("/progress", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    job = {"metadata": {"name": "ft", "namespace": "ns", "uid": "u"}, "status": {"phase": "Running"}}
    pod = {
        "metadata": {
            "name": "ft-r0-node-0",
            "labels": {"tauon.dev/attempt": "0"},
            "annotations": {progress.METRICS_ADDRESS_ANNOTATION: f"127.0.0.1:{port}"},
            "ownerReferences": [{"uid": "u", "controller": True}],
        }
    }
    indexes = Indexes()
    indexes.capture({ix.FTJ: {("ns", "ft"): [job]}, ix.FTJ_PODS: {("ns", "ft"): [pod]}})
    triggered: list[tuple[Any, ...]] = []
    monkeypatch.setattr(RT, "indexes", indexes)
    monkeypatch.setattr(RT, "trust_metrics_address", True)
    monkeypatch.setattr(RT, "progress_period_seconds", 0.0)  # no backoff between passes here
    monkeypatch.setattr(RT, "progress", {})
    monkeypatch.setattr(RT, "trigger", lambda *a: triggered.append(a))
    monkeypatch.setattr(ftj, "_backoff", progress.Backoff())
    monkeypatch.setattr(ftj, "_reported", {})
    try:
        yield answers
    finally:
        await runner.cleanup()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failing_rank0_is_logged_once_per_change(
    rank0: list[tuple[int, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tauon.finetunejob")
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await ftj.fetch_progress(session)
        assert warnings(caplog) == ["FineTuneJob ns/ft: ignoring rank 0's /progress: HTTP 404"]
        rank0 += [(500, None), (500, None)]
        await ftj.fetch_progress(session)
        await ftj.fetch_progress(session)
        assert len(warnings(caplog)) == 2 and warnings(caplog)[-1].endswith("HTTP 500"), "a change is logged"
        rank0.append((200, {"step": 3}))
        await ftj.fetch_progress(session)
        assert RT.progress[("ns", "ft")] == {"step": 3}
        assert "answers again" in caplog.records[-1].getMessage()
        await ftj.fetch_progress(session)  # 404 again after recovering: logged again
        assert len(warnings(caplog)) == 3


async def test_the_echo_of_our_own_status_write_waits_for_the_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    triggered: list[tuple[Any, ...]] = []
    monkeypatch.setattr(RT, "trigger", lambda *a: triggered.append(a))
    monkeypatch.setattr(RT, "indexes", Indexes())
    mine = {"metadata": {"name": "ft", "namespace": "ns", "uid": "u", "resourceVersion": "7"}}
    monkeypatch.setattr(RT, "written", {(ftj.CONTROLLER, "ns", "ft"): mine})
    on_job: Any = ftj.on_job  # typed by kopf's decorator as its WatchingFn protocol
    await on_job(type="MODIFIED", namespace="ns", name="ft", body=mine)
    other = {"metadata": {**mine["metadata"], "resourceVersion": "8"}}  # someone else's change
    await on_job(type="MODIFIED", namespace="ns", name="ft", body=other)
    assert triggered == [
        (ftj.CONTROLLER, "ns", "ft", RT.child_coalesce_seconds),
        (ftj.CONTROLLER, "ns", "ft", 0.0),
    ]
