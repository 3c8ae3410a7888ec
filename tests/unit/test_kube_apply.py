"""The kube layer against an in-process HTTP server speaking the API server's REST answers (no process,
no cluster): apply_plan's ordering and refusals, request timeouts, uid preconditions, 403s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from tauon.kube.apply import apply_plan
from tauon.kube.client import Forbidden, Kube
from tauon.reconcile.plan import Event, Plan

NS = "team-a"
JOB = {
    "metadata": {"name": "ft", "namespace": NS, "uid": "job-uid", "resourceVersion": "41"},
    "status": {"phase": "Running"},
}


class FakeApiServer:
    """Records requests; answers by rules keyed on (method, path)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.rules: dict[tuple[str, str], tuple[int, Any]] = {}
        self.hang = False
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        payload = json.loads(raw) if raw else None
        self.requests.append((request.method, request.path, payload))
        if self.hang:
            await self.release.wait()
        status, answer = self.rules.get((request.method, request.path), (200, payload or {}))
        if request.method == "POST" and (request.method, request.path) not in self.rules:
            status = 201
        return web.json_response(answer, status=status)

    def calls(self, method: str | None = None) -> list[str]:
        return [f"{m} {p}" for m, p, _ in self.requests if method is None or m == method]


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, Kube]]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    conf = client.Configuration(host=f"http://127.0.0.1:{port}")
    kube = Kube(client.ApiClient(conf), timeout=1.0)
    try:
        yield fake, kube
    finally:
        fake.release.set()
        await kube.close()
        await runner.cleanup()


def child(kind: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": NS}}


def foreign(kind: str, name: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": name, "ownerReferences": [{"uid": "other", "controller": True}]},
    }


async def test_no_pods_while_the_config_map_is_in_conflict(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    fake.rules[("POST", f"/api/v1/namespaces/{NS}/configmaps")] = (409, {"reason": "AlreadyExists"})
    fake.rules[("GET", f"/api/v1/namespaces/{NS}/configmaps/ft-config")] = (
        200,
        foreign("ConfigMap", "ft-config"),
    )
    plan = Plan(
        creates=[child("ConfigMap", "ft-config"), child("Pod", "ft-r0-node-0"), child("Pod", "ft-r0-node-1")]
    )
    result = await apply_plan(kube, "FineTuneJob", JOB, plan)
    assert result.conflicts == ["ConfigMap/ft-config"]
    assert not [c for c in fake.calls("POST") if c.endswith("/pods")], "pods created with a foreign ConfigMap"
    assert result.skipped_pods == 2


async def test_pods_created_once_the_config_map_is_ours(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    plan = Plan(creates=[child("ConfigMap", "ft-config"), child("Pod", "ft-r0-node-0")])
    result = await apply_plan(kube, "FineTuneJob", JOB, plan)
    assert result.conflicts == [] and result.skipped_pods == 0
    assert fake.calls("POST") == [
        f"POST /api/v1/namespaces/{NS}/configmaps",
        f"POST /api/v1/namespaces/{NS}/pods",
    ]


async def test_terminal_plan_writes_status_before_stopping_pods(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    plan = Plan(stops=["ft-r0-node-1"], status={"phase": "Failed"}, status_first=True)
    await apply_plan(kube, "FineTuneJob", JOB, plan)
    patches = fake.calls("PATCH")
    assert patches[0].endswith("/finetunejobs/ft/status") and patches[1].endswith("/pods/ft-r0-node-1")


async def test_forbidden_create_is_reported(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    fake.rules[("POST", f"/api/v1/namespaces/{NS}/pods")] = (
        403,
        {"kind": "Status", "reason": "Forbidden", "message": 'pods "p" is forbidden: exceeded quota: gpu'},
    )
    result = await apply_plan(kube, "FineTuneJob", JOB, Plan(creates=[child("Pod", "p")]))
    assert len(result.forbidden) == 1 and result.forbidden[0].quota
    with pytest.raises(Forbidden):
        await kube.create(child("Pod", "p"), "job-uid")


async def test_ttl_delete_carries_a_uid_precondition(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    # a newer job of the same name: the API server refuses the precondition with 409
    fake.rules[("DELETE", f"/apis/tauon.dev/v1alpha1/namespaces/{NS}/finetunejobs/ft")] = (409, {})
    await apply_plan(kube, "FineTuneJob", JOB, Plan(delete_self=True))
    (method, _, payload) = fake.requests[-1]
    assert method == "DELETE" and payload["preconditions"] == {"uid": "job-uid"}


async def test_a_black_holed_request_times_out(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    fake.hang = True
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await kube.get("Pod", NS, "p")
    assert time.monotonic() - t0 < 20  # the timeout is 1 s; generous margin on a loaded machine


async def test_status_patch_carries_the_resource_version(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    path = f"/apis/tauon.dev/v1alpha1/namespaces/{NS}/finetunejobs/ft/status"
    await apply_plan(kube, "FineTuneJob", JOB, Plan(status={"phase": "Failed"}))
    (method, p, payload) = fake.requests[-1]
    assert (method, p) == ("PATCH", path) and payload["metadata"] == {"resourceVersion": "41"}


async def test_stale_or_ghost_body_writes_nothing(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    path = f"/apis/tauon.dev/v1alpha1/namespaces/{NS}/finetunejobs/ft/status"
    fake.rules[("PATCH", path)] = (
        409,
        {"kind": "Status", "reason": "Conflict", "message": "the object has been modified"},
    )
    posted: list[Any] = []

    async def post(ev: Any) -> None:
        posted.append(ev)

    plan = Plan(stops=["ft-r0-node-1"], status={"phase": "Failed"}, status_first=True)
    plan.events.append(Event("Warning", "DeadlineExceeded", "late"))
    result = await apply_plan(kube, "FineTuneJob", JOB, plan, post)
    assert result.stale and fake.calls("PATCH") == [f"PATCH {path}"], "a stale plan must not stop pods"
    assert posted == []


async def test_namespace_being_deleted_gets_no_creates_status_or_events(
    api: tuple[FakeApiServer, Kube],
) -> None:
    fake, kube = api
    fake.rules[("POST", f"/api/v1/namespaces/{NS}/configmaps")] = (
        403,
        {
            "kind": "Status",
            "reason": "Forbidden",
            "message": f"configmaps is forbidden: unable to create new content in namespace {NS} because it is being terminated",
            "details": {"causes": [{"reason": "NamespaceTerminating"}]},
        },
    )
    posted: list[Any] = []

    async def post(ev: Any) -> None:
        posted.append(ev)

    plan = Plan(
        creates=[child("ConfigMap", "ft-config"), child("Pod", "ft-r1-node-0")],
        status={"phase": "Restarting"},
    )
    plan.events.append(Event("Warning", "Restarting", "gang restarts"))
    result = await apply_plan(kube, "FineTuneJob", JOB, plan, post)
    assert result.namespace_terminating
    assert fake.calls("POST") == [f"POST /api/v1/namespaces/{NS}/configmaps"], (
        "no pod create after the refusal"
    )
    assert fake.calls("PATCH") == [] and posted == []


def test_runtime_skips_a_terminating_namespace_for_a_while() -> None:
    from tauon.handlers.runtime import Runtime

    rt = Runtime(terminating_recheck_seconds=3600)
    assert not rt.namespace_terminating(NS)
    rt.terminating[NS] = time.monotonic()
    assert rt.namespace_terminating(NS) and not rt.namespace_terminating("other")
    rt.terminating_recheck_seconds = 0  # checked again later: the namespace may have been re-created
    assert not rt.namespace_terminating(NS) and NS not in rt.terminating


async def test_ghost_found_gone_does_nothing_else(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    path = f"/apis/tauon.dev/v1alpha1/namespaces/{NS}/finetunejobs/ft/status"
    fake.rules[("PATCH", path)] = (404, {"kind": "Status", "reason": "NotFound"})
    plan = Plan(stops=["ft-r0-node-1"], status={"phase": "Failed"}, status_first=True, delete_self=True)
    result = await apply_plan(kube, "FineTuneJob", JOB, plan)
    assert result.gone
    assert fake.calls() == [f"PATCH {path}"], "a ghost must not stop pods or delete by name"


async def test_reconcile_from_a_plain_task_posts_its_event(api: tuple[FakeApiServer, Kube]) -> None:
    """The work queue and the periodic pass run reconciles in plain asyncio tasks, outside any Kopf
    handler: the Event must still reach the API server (as a core/v1 Event from component tauon)."""
    from tauon.handlers.runtime import Runtime

    fake, kube = api
    rt = Runtime(kube=kube)
    plan = Plan(status={"phase": "Succeeded"})
    plan.events.append(Event("Normal", "Succeeded", "training finished"))
    task = asyncio.get_running_loop().create_task(rt.apply("finetunejob", "FineTuneJob", JOB, plan))
    result = await task
    assert not result.stale and not result.namespace_terminating
    events = [p for m, path, p in fake.requests if m == "POST" and path == f"/api/v1/namespaces/{NS}/events"]
    assert len(events) == 1, fake.calls()
    ev = events[0]
    assert ev["involvedObject"] == {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "ft",
        "namespace": NS,
        "uid": "job-uid",
        "resourceVersion": "41",
    }
    assert (ev["type"], ev["reason"], ev["message"]) == ("Normal", "Succeeded", "training finished")
    assert ev["source"] == {"component": "tauon"} and ev["count"] == 1
    assert ev["firstTimestamp"] == ev["lastTimestamp"] and ev["metadata"]["name"].startswith("ft.")


async def test_event_into_a_terminating_namespace_stops_posting(api: tuple[FakeApiServer, Kube]) -> None:
    from tauon.handlers.runtime import Runtime

    fake, kube = api
    fake.rules[("POST", f"/api/v1/namespaces/{NS}/events")] = (
        403,
        {
            "kind": "Status",
            "reason": "Forbidden",
            "details": {"causes": [{"reason": "NamespaceTerminating"}]},
        },
    )
    rt = Runtime(kube=kube)
    plan = Plan(status={"phase": "Failed"})
    plan.events += [Event("Warning", "A", "a"), Event("Warning", "B", "b")]
    result = await rt.apply("finetunejob", "FineTuneJob", JOB, plan)
    assert result.namespace_terminating and rt.namespace_terminating(NS)
    assert fake.calls("POST") == [f"POST /api/v1/namespaces/{NS}/events"], "one refusal, then no more"


async def test_claim_access_modes_are_read_once_for_a_while(api: tuple[FakeApiServer, Kube]) -> None:
    fake, kube = api
    path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims/data"
    fake.rules[("GET", path)] = (200, {"spec": {"accessModes": ["ReadWriteMany"]}})
    assert await kube.pvc_access_modes(NS, "data") == ["ReadWriteMany"]
    assert await kube.pvc_access_modes(NS, "data") == ["ReadWriteMany"]
    assert fake.calls("GET") == [f"GET {path}"], "the second pass reuses the answer"
    fake.rules[("GET", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/none")] = (404, {"kind": "Status"})
    assert await kube.pvc_access_modes(NS, "none") is None
    assert await kube.pvc_access_modes(NS, "none") is None
    assert len(fake.calls("GET")) == 3, "a missing claim is not remembered: it may be created next"
