"""Control-plane scale benchmark: the operator against a plain script creating the same pods, same run.

    .venv/bin/python bench/scale/run.py [--nodes 50] [--jobs 200] [--pods-per-job 4] [--rate 20]
                                        [--max-pods 2000] [--converged-seconds 60]

Starts its own control plane (hack/cluster/cluster.py, in a temporary state directory) with --nodes extra
kwok CPU nodes, applies the CRDs, and gives the operator and the plain script their own client
certificates (users bench-operator and bench-plain, bound to cluster-admin). One API Priority-and-Fairness
FlowSchema per (user, verb), all on the exempt priority level (so nothing is throttled), makes the API
server count every request each of them sends: apiserver_flowcontrol_dispatched_requests_total by
flow_schema. Then, in this order:

1. baseline (namespace bench-plain): --jobs "jobs" at --rate jobs/s; for each, a plain asyncio script
   (kubernetes_asyncio, same default client settings and request timeout as the operator) creates what
   `tauon render` produces for that FineTuneJob: ConfigMap and Service, then the pods, concurrently (without
   ownerReferences: there is no FineTuneJob to own them). The namespace is deleted before step 2.
2. operator (namespace bench-op): `tauon operator` is started; --jobs FineTuneJobs of --pods-per-job pods
   are created at --rate jobs/s. Per job: apply -> all pods created, apply -> all pods Running (watch events
   seen by this script), pods created per second overall, the operator's CPU seconds, and its requests.
3. converged: once every job is Running, the operator's requests are counted for --converged-seconds
   (target: 0 writes).
4. memory curve: more jobs at the same rate until --max-pods pods run; the operator's RSS is sampled
   against the number of running pods; its RSS at the largest size is compared with the Helm chart's
   default memory limit (helm/tauon/values.yaml).

Pods request 10m CPU and 16Mi; kwok runs them (Running as soon as bound). FineTuneJobs read and write a
pre-bound ReadWriteMany PVC, as a real cluster would. Everything runs on this machine (the API server,
etcd, scheduler, kwok, the operator and this script share its CPUs), so the JSON records the load average.
The control plane and the operator are always stopped (try/finally, SIGINT/SIGTERM).

Writes bench/results/scale.json and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
GROUP_PATH = "/apis/tauon.dev/v1alpha1"
VERBS = ("create", "update", "patch", "delete", "deletecollection", "get", "list", "watch")
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
USERS = ("bench-operator", "bench-plain")
REQUEST_TIMEOUT = 30.0  # the operator's per-request timeout (tauon.kube.client.REQUEST_TIMEOUT)
JOB_LABEL = "tauon.dev/job-name"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_cluster_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tauon_dev_cluster", REPO / "hack" / "cluster" / "cluster.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def quantiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))], 3)

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(s[-1], 3)}


# --- the control plane: nodes, identities, FlowSchemas ---------------------------------------------------


@dataclass
class Plane:
    mod: Any
    dir: Path
    kubeconfig: Path
    bin_dir: Path
    server: str = ""
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        return str(self.mod.kubectl(self.bin_dir, self.kubeconfig, *args, stdin=stdin, check=check))

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))

    def ssl_context(self) -> ssl.SSLContext:
        pki = self.dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx


def add_nodes(plane: Plane, n: int, pods_per_node: int) -> int:
    nodes = []
    for i in range(n):
        node = plane.mod.node_manifest(f"bench-node-{i}", 0)
        node["status"]["capacity"]["pods"] = str(pods_per_node)
        node["status"]["allocatable"]["pods"] = str(pods_per_node)
        nodes.append(node)
    for i in range(0, n, 100):
        plane.apply(nodes[i : i + 100])
    want = n + plane.mod.GPU_NODES + plane.mod.CPU_NODES
    deadline = time.time() + 120 + n
    while time.time() < deadline:
        items = json.loads(plane.kubectl("get", "nodes", "-o", "json"))["items"]
        ready = sum(
            1
            for it in items
            for c in it.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        )
        if ready >= want:
            return ready
        time.sleep(1)
    raise SystemExit(f"only {ready} of {want} nodes Ready after adding {n} kwok nodes")


def make_identity(plane: Plane, user: str) -> Path:
    """A client certificate for `user` (no groups: not system:masters, so our FlowSchemas match it)."""
    pki = plane.dir / "pki"
    run = [["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={user}", "-keyout",
            f"{user}.key", "-out", f"{user}.csr"],
           ["openssl", "x509", "-req", "-in", f"{user}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{user}.crt"]]  # fmt: skip
    for cmd in run:
        subprocess.run(cmd, cwd=pki, check=True, capture_output=True)
    cfg = json.loads(plane.kubeconfig.read_text())
    import base64

    cfg["users"] = [
        {
            "name": user,
            "user": {
                "client-certificate-data": base64.b64encode((pki / f"{user}.crt").read_bytes()).decode(),
                "client-key-data": base64.b64encode((pki / f"{user}.key").read_bytes()).decode(),
            },
        }
    ]
    cfg["contexts"][0]["context"]["user"] = user
    path = plane.dir / f"kubeconfig-{user}"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def identities_and_flowschemas(plane: Plane) -> None:
    docs: list[dict[str, Any]] = []
    for user in USERS:
        plane.kubeconfigs[user] = make_identity(plane, user)
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": user},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "cluster-admin",
                },
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }
        )
        subject = [{"kind": "User", "user": {"name": user}}]
        for verb in VERBS:
            rule = {
                "verbs": [verb],
                "apiGroups": ["*"],
                "resources": ["*"],
                "namespaces": ["*"],
                "clusterScope": True,
            }
            docs.append(flowschema(f"{user}-{verb}", {"subjects": subject, "resourceRules": [rule]}))
        docs.append(
            flowschema(
                f"{user}-nonresource",
                {"subjects": subject, "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]},
            )
        )
    plane.apply(docs)


def flowschema(name: str, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": name},
        "spec": {"priorityLevelConfiguration": {"name": "exempt"}, "matchingPrecedence": 50, "rules": [rule]},
    }


def namespace_with_claim(plane: Plane, ns: str) -> None:
    """The namespace and a pre-bound ReadWriteMany PVC `bench` (no provisioner needed)."""
    pv = f"bench-{ns}"
    plane.apply(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "hostPath": {"path": f"/tmp/tauon-bench-pv/{pv}"},
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {"namespace": ns, "name": "bench"},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "bench", "namespace": ns},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                    "storageClassName": "",
                    "volumeName": pv,
                },
            },
        ]
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        sa = plane.kubectl("get", "serviceaccount", "default", "-n", ns, "--ignore-not-found", "-o", "name")
        phase = plane.kubectl("get", "pvc", "bench", "-n", ns, "-o", "jsonpath={.status.phase}")
        if sa.strip() and phase == "Bound":
            return
        time.sleep(0.5)
    raise SystemExit(f"namespace {ns}: default ServiceAccount or PVC bench not ready after 90s")


# --- the job ---------------------------------------------------------------------------------------------


def job_manifest(name: str, ns: str, pods: int) -> dict[str, Any]:
    return {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {
                "source": "hf://sentence-transformers/all-MiniLM-L6-v2",
                "task": "sequence-classification",
                "numLabels": 2,
            },
            "dataset": {"source": "pvc://bench/data/train.jsonl"},
            "output": {"storage": f"pvc://bench/out/{name}"},
            "numNodes": pods,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        },
    }


def rendered_children(name: str, ns: str, pods: int) -> list[dict[str, Any]]:
    """What `tauon render` produces for the job (attempt 0), less the ownerReferences (no owner exists)."""
    from tauon.api import FineTuneJob
    from tauon.render.config import OperatorConfig
    from tauon.render.finetunejob import render_attempt

    doc = job_manifest(name, ns, pods)
    doc["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    children: list[dict[str, Any]] = render_attempt(FineTuneJob.model_validate(doc), OperatorConfig(), 0)
    for c in children:
        c["metadata"].pop("ownerReferences", None)
    return children


# --- watching pods ---------------------------------------------------------------------------------------


@dataclass
class Tracker:
    """First time each pod is seen (created) and seen Running, by job, from one watch on the namespace."""

    created: dict[str, dict[str, float]] = field(default_factory=dict)
    running: dict[str, dict[str, float]] = field(default_factory=dict)
    n_created: int = 0
    n_running: int = 0
    watch_restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def see(self, obj: dict[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        if not job:
            return
        pod = meta["name"]
        if pod not in self.created.setdefault(job, {}):
            self.created[job][pod] = now
            self.n_created += 1
        if (obj.get("status") or {}).get("phase") == "Running" and pod not in self.running.setdefault(
            job, {}
        ):
            self.running[job][pod] = now
            self.n_running += 1


async def watch_pods(http: aiohttp.ClientSession, server: str, ns: str, tracker: Tracker) -> None:
    """List, then watch from the list's resourceVersion; a watch that ends or fails (the API server drops a
    watcher that falls behind) is counted and resumed by listing again, so no pod is ever missed (pods
    first seen by a re-list are timed at the re-list: an overestimate, and `watch_restarts` says so)."""
    base = f"{server}/api/v1/namespaces/{ns}/pods"
    forever = aiohttp.ClientTimeout(total=None, sock_read=None)
    while True:
        try:
            async with http.get(base) as resp:
                resp.raise_for_status()
                listed = await resp.json()
            now = time.monotonic()
            for obj in listed["items"]:
                tracker.see(obj, now)
            rv = listed["metadata"]["resourceVersion"]
            url = f"{base}?watch=true&allowWatchBookmarks=true&timeoutSeconds=3600&resourceVersion={rv}"
            async with http.get(url, timeout=forever) as resp:
                resp.raise_for_status()
                tracker.ready.set()
                await _consume(resp, tracker)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, ValueError, KeyError) as e:
            log(f"pod watch on {ns} failed ({type(e).__name__}: {e}); listing again")
            await asyncio.sleep(0.5)
        tracker.watch_restarts += 1


async def _consume(resp: aiohttp.ClientResponse, tracker: Tracker) -> None:
    buf = b""
    async for chunk in resp.content.iter_any():
        now = time.monotonic()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev.get("type") in ("ADDED", "MODIFIED"):
                tracker.see(ev["object"], now)
            elif ev.get("type") == "ERROR":
                return


# --- operator process and its footprint ------------------------------------------------------------------


@dataclass
class Operator:
    kubeconfig: Path
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int, int, float]] = field(
        default_factory=list
    )  # (t, running pods, rss, cpu s)

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        cmd = [str(BIN / "tauon"), "operator", "--metrics-port", str(self.metrics_port),
               "--metrics-address", "127.0.0.1", "--health-port", "0"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def usage(self) -> tuple[int, float, int]:
        """(RSS bytes, CPU seconds user+system, peak RSS bytes from VmHWM)."""
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        t = p.cpu_times()
        hwm = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        return p.memory_info().rss, t.user + t.system, hwm

    def metrics(self) -> dict[str, float]:
        """tauon_api_writes_total by (controller, verb)."""
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        )
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("tauon_api_writes_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels.removeprefix("tauon_api_writes_total")] = float(value)
        return out


async def sample(op: Operator, tracker: Tracker, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            rss, cpu, _ = op.usage()
        except (psutil.Error, OSError):
            return
        op.samples.append((time.monotonic(), tracker.n_running, rss, cpu))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def wait_operator_ready(op: Operator, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert op.proc is not None
        if op.proc.poll() is not None:
            raise SystemExit(f"operator exited ({op.proc.returncode}); see {op.log_path}")
        try:
            op.metrics()
            await asyncio.sleep(3)  # its watches start right after the metrics server
            return
        except OSError:
            await asyncio.sleep(0.5)
    raise SystemExit(f"operator metrics not up after {limit_s}s; see {op.log_path}")


# --- API server counters ---------------------------------------------------------------------------------


async def requests_by_user(http: aiohttp.ClientSession, server: str) -> dict[str, dict[str, float]]:
    """apiserver_flowcontrol_dispatched_requests_total for our per-(user, verb) FlowSchemas."""
    async with http.get(f"{server}/metrics") as resp:
        text = await resp.text()
    out: dict[str, dict[str, float]] = {u: {} for u in USERS}
    prefix = "apiserver_flowcontrol_dispatched_requests_total{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, value = line.rsplit(" ", 1)
        fs = labels.split('flow_schema="', 1)[1].split('"', 1)[0]
        for user in USERS:
            if fs.startswith(user + "-"):
                out[user][fs.removeprefix(user + "-")] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def writes(d: dict[str, int]) -> int:
    return sum(v for k, v in d.items() if k in WRITE_VERBS)


# --- one phase: submit jobs at a fixed rate, wait until every pod runs ------------------------------------


async def wait_running(tracker: Tracker, names: list[str], pods: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    last_log = time.monotonic()
    while time.monotonic() < deadline:
        if all(len(tracker.running.get(n, {})) >= pods for n in names):
            return True
        if time.monotonic() - last_log > 15:
            last_log = time.monotonic()
            log(
                f"  {tracker.n_created} pods created, {tracker.n_running} running in the namespace ({len(names) * pods} in this phase)"
            )
        await asyncio.sleep(0.25)
    log(f"  gave up after {limit_s:.0f}s: {tracker.n_created} pods created, {tracker.n_running} running")
    return False


def phase_figures(
    tracker: Tracker, names: list[str], pods: int, submitted: dict[str, float]
) -> dict[str, Any]:
    created, running = [], []
    done_created = [t for n in names for t in tracker.created.get(n, {}).values()]
    for n in names:
        c, r = tracker.created.get(n, {}), tracker.running.get(n, {})
        if len(c) >= pods:
            created.append(max(c.values()) - submitted[n])
        if len(r) >= pods:
            running.append(max(r.values()) - submitted[n])
    start = min(submitted[n] for n in names)
    span = (max(done_created) - start) if done_created else float("nan")
    all_running = [t for n in names for t in tracker.running.get(n, {}).values()]
    return {
        "jobs": len(names),
        "pods": len(done_created),
        "jobs_all_created": len(created),
        "jobs_all_running": len(running),
        "apply_to_all_pods_created_s": quantiles(created),
        "apply_to_all_pods_running_s": quantiles(running),
        "pods_created_per_s": round(len(done_created) / span, 2) if span > 0 else None,
        "submit_span_s": round(max(submitted[n] for n in names) - start, 2),
        "first_submit_to_last_pod_created_s": round(span, 2),
        "first_submit_to_last_pod_running_s": round(max(all_running) - start, 2) if all_running else None,
        "watch_restarts": tracker.watch_restarts,
        "cdf_running_s": sorted(round(x, 3) for x in running),
        "cdf_created_s": sorted(round(x, 3) for x in created),
    }


PATHS = {
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "FineTuneJob": GROUP_PATH + "/namespaces/{ns}/finetunejobs",
}


class Api:
    """Raw REST through kubernetes_asyncio's ApiClient, as the operator's tauon.kube layer calls it."""

    def __init__(self, api: Any):
        self.api = api

    async def create(self, manifest: dict[str, Any]) -> None:
        await self.api.call_api(
            PATHS[manifest["kind"]].format(ns=manifest["metadata"]["namespace"]),
            "POST",
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=manifest,
            query_params=[],
            auth_settings=["BearerToken"],
            response_types_map={200: "object", 201: "object", 202: "object"},
            _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT,
        )


async def plain_client(kubeconfig: Path) -> Any:
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.ApiClient(cfg)


# --- the submitter: its own process (like the operator), so the watch here is never starved by it ---------


async def submitter(spec: dict[str, Any]) -> dict[str, float]:
    """Create each job at its slot of a fixed rate, once everything is rendered and the client is ready
    (times are CLOCK_MONOTONIC, shared by all processes here). mode 'operator': the FineTuneJob; mode 'plain': its rendered children (ConfigMap and
    Service, then the pods, concurrently: the order the operator uses). Returns name -> submit time."""
    ns, names, pods = spec["namespace"], spec["names"], spec["pods_per_job"]
    if spec["mode"] == "plain":
        work = {n: rendered_children(n, ns, pods) for n in names}
    else:
        work = {n: [job_manifest(n, ns, pods)] for n in names}
    api = await plain_client(Path(spec["kubeconfig"]))
    raw, submitted = Api(api), {}

    async def one(name: str) -> None:
        submitted[name] = time.monotonic()
        children = work[name]
        await asyncio.gather(*(raw.create(c) for c in children if c["kind"] != "Pod"))
        await asyncio.gather(*(raw.create(c) for c in children if c["kind"] == "Pod"))

    tasks, start = [], time.monotonic()
    try:
        for i, name in enumerate(names):
            delay = start + i / spec["rate"] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(name)))
        await asyncio.gather(*tasks)
    finally:
        await api.close()
    return submitted


def submitter_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    submitted = asyncio.run(submitter(spec))
    Path(spec["out"]).write_text(json.dumps(submitted))
    return 0


async def submit_at_rate(
    ctx: Ctx, mode: str, kubeconfig: Path, ns: str, names: list[str]
) -> dict[str, float]:
    """Run the submitter process; returns name -> submit time."""
    d = Path(tempfile.mkdtemp(prefix="submit-", dir=ctx.plane.dir))
    spec = {
        "mode": mode,
        "kubeconfig": str(kubeconfig),
        "namespace": ns,
        "names": names,
        "pods_per_job": ctx.args.pods_per_job,
        "rate": ctx.args.rate,
        "out": str(d / "submitted.json"),
    }
    (d / "spec.json").write_text(json.dumps(spec))
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--submitter", str(d / "spec.json"))
    try:
        rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if rc != 0:
        raise SystemExit(f"submitter ({mode}, {ns}) exited {rc}")
    return {k: float(v) for k, v in json.loads((d / "submitted.json").read_text()).items()}


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    plane: Plane
    http: aiohttp.ClientSession
    op: Operator | None = None


async def run_baseline(ctx: Ctx, names: list[str]) -> dict[str, Any]:
    a, ns = ctx.args, "bench-plain"
    tracker = Tracker()
    watcher = asyncio.create_task(watch_pods(ctx.http, ctx.plane.server, ns, tracker))
    await asyncio.wait_for(tracker.ready.wait(), 30)
    before = await requests_by_user(ctx.http, ctx.plane.server)
    try:
        submitted = await submit_at_rate(ctx, "plain", ctx.plane.kubeconfigs["bench-plain"], ns, names)
        ok = await wait_running(tracker, names, a.pods_per_job, a.phase_timeout)
    finally:
        watcher.cancel()
    after = await requests_by_user(ctx.http, ctx.plane.server)
    fig = phase_figures(tracker, names, a.pods_per_job, submitted)
    fig["completed"] = ok
    fig["requests_by_verb"] = delta(after["bench-plain"], before["bench-plain"])
    return fig


async def delete_namespace(ctx: Ctx, ns: str, limit_s: float) -> float:
    t0 = time.monotonic()
    ctx.plane.kubectl("delete", "namespace", ns, "--wait=false")
    while time.monotonic() - t0 < limit_s:
        async with ctx.http.get(f"{ctx.plane.server}/api/v1/namespaces/{ns}") as resp:
            if resp.status == 404:
                return time.monotonic() - t0
        await asyncio.sleep(1)
    raise SystemExit(f"namespace {ns} still there after {limit_s}s")


async def jobs_running(ctx: Ctx, ns: str, want: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        async with ctx.http.get(f"{ctx.plane.server}{GROUP_PATH}/namespaces/{ns}/finetunejobs") as resp:
            items = (await resp.json())["items"]
        if sum(1 for it in items if (it.get("status") or {}).get("phase") == "Running") >= want:
            return True
        await asyncio.sleep(2)
    return False


async def run_operator(ctx: Ctx, names: list[str], extra: list[str]) -> dict[str, Any]:
    a, ns, op = ctx.args, "bench-op", ctx.op
    assert op is not None
    tracker = Tracker()
    watcher = asyncio.create_task(watch_pods(ctx.http, ctx.plane.server, ns, tracker))
    await asyncio.wait_for(tracker.ready.wait(), 30)
    op.start()
    await wait_operator_ready(op)
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample(op, tracker, stop_sampling))
    out: dict[str, Any] = {}
    try:
        cpu0 = op.usage()[1]
        req0, w0 = await requests_by_user(ctx.http, ctx.plane.server), op.metrics()
        submitted = await submit_at_rate(ctx, "operator", ctx.plane.kubeconfig, ns, names)
        ok = await wait_running(tracker, names, a.pods_per_job, a.phase_timeout)
        ok = await jobs_running(ctx, ns, len(names), a.phase_timeout) and ok
        cpu1 = op.usage()[1]
        req1, w1 = await requests_by_user(ctx.http, ctx.plane.server), op.metrics()
        fig = phase_figures(tracker, names, a.pods_per_job, submitted)
        fig.update(
            completed=ok,
            operator_cpu_s=round(cpu1 - cpu0, 2),
            requests_by_verb=delta(req1["bench-operator"], req0["bench-operator"]),
            tauon_api_writes=delta(w1, w0),
        )
        # creates sent beyond the children the jobs need: each is a 409 (a pass that re-created a child
        # its index had not seen yet), answered by a GET of the existing object
        children = len(names) * len(rendered_children("j", ns, a.pods_per_job))
        fig["creates_beyond_children"] = fig["tauon_api_writes"].get(CREATE_WRITES, 0) - children
        out["operator"] = fig
        log(f"operator phase: {summary(fig)}; converged window {a.converged_seconds}s")
        out["converged"] = await converged_window(ctx, ns, a.converged_seconds)
        if extra:
            out["memory_curve_phase"] = await grow(ctx, ns, tracker, extra, names)
        await asyncio.sleep(5)
        rss, cpu, hwm = op.usage()
        out["operator_totals"] = {
            "cpu_s": round(cpu, 2),
            "rss_mib_at_end": round(rss / 2**20, 1),
            "peak_rss_mib": round(hwm / 2**20, 1),
            "running_pods_at_end": tracker.n_running,
        }
    finally:
        stop_sampling.set()
        await sampler
        watcher.cancel()
    return out


CREATE_WRITES = '{controller="finetunejob",verb="create"}'


async def converged_window(ctx: Ctx, ns: str, seconds: float) -> dict[str, Any]:
    op = ctx.op
    assert op is not None
    # what the operator still writes between "every job Running" and quiet: which status fields, and
    # whether the pods themselves were still changing (Running but not Ready yet)
    jobs_a, w_a, not_ready = await list_jobs(ctx, ns), op.metrics(), (await readiness(ctx, ns))["pods"]
    settle_s = await settle(op)
    jobs0 = await list_jobs(ctx, ns)
    cpu0, req0, w0 = op.usage()[1], await requests_by_user(ctx.http, ctx.plane.server), op.metrics()
    settling = {
        "tauon_api_writes": delta(w0, w_a),
        "pods_running_not_ready_at_start": not_ready,
        "finetunejob_status_fields_changed": status_changes(jobs_a, jobs0),
    }
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, req1, w1 = op.usage()[1], await requests_by_user(ctx.http, ctx.plane.server), op.metrics()
    span = time.monotonic() - t0
    jobs1 = await list_jobs(ctx, ns)
    d = delta(req1["bench-operator"], req0["bench-operator"])
    return {
        "settled_after_s": settle_s,
        "settling": settling,
        "window_s": round(span, 1),
        "requests_by_verb": d,
        "requests_per_minute": round(sum(d.values()) * 60 / span, 2),
        "writes_per_minute": round(writes(d) * 60 / span, 2),
        "tauon_api_writes": delta(w1, w0),
        "operator_cpu_s": round(cpu1 - cpu0, 2),
        "finetunejob_status_fields_changed": status_changes(jobs0, jobs1),
        "readiness_at_end": await readiness(ctx, ns),
    }


def status_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Status path -> number of jobs whose value differs between two listings."""
    changed: dict[str, int] = {}
    for key, obj in after.items():
        for path in changed_paths((before.get(key) or {}).get("status"), obj.get("status"), "status"):
            changed[path] = changed.get(path, 0) + 1
    return dict(sorted(changed.items()))


async def readiness(ctx: Ctx, ns: str) -> dict[str, Any]:
    """Running pods whose Ready condition is not True (and why, for the first), and nodes not Ready."""

    def not_ready(obj: dict[str, Any]) -> dict[str, Any] | None:
        conds = (obj.get("status") or {}).get("conditions") or []
        ready = next((c for c in conds if c.get("type") == "Ready"), None)
        return None if ready is not None and ready.get("status") == "True" else (ready or {})

    async with ctx.http.get(f"{ctx.plane.server}/api/v1/namespaces/{ns}/pods") as resp:
        resp.raise_for_status()
        pods = [p for p in (await resp.json())["items"] if (p.get("status") or {}).get("phase") == "Running"]
    async with ctx.http.get(f"{ctx.plane.server}/api/v1/nodes") as resp:
        resp.raise_for_status()
        nodes = (await resp.json())["items"]
    bad_pods = [c for p in pods if (c := not_ready(p)) is not None]
    bad_nodes = [c for n in nodes if (c := not_ready(n)) is not None]
    return {
        "pods": len(bad_pods),
        "nodes": len(bad_nodes),
        "first_pod_condition": bad_pods[0] if bad_pods else None,
        "first_node_condition": bad_nodes[0] if bad_nodes else None,
    }


async def settle(op: Operator, quiet_s: float = 10, limit_s: float = 180) -> float | None:
    """Wait until the operator has written nothing for quiet_s (it may still be catching up with the watch
    events of the last pods); None if it never went quiet within limit_s (the window then starts anyway)."""
    t0 = time.monotonic()
    last, last_change = sum(op.metrics().values()), time.monotonic()
    while time.monotonic() - t0 < limit_s:
        await asyncio.sleep(1)
        now = sum(op.metrics().values())
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return round(time.monotonic() - t0, 1)
    return None


async def list_jobs(ctx: Ctx, ns: str) -> dict[str, dict[str, Any]]:
    async with ctx.http.get(f"{ctx.plane.server}{GROUP_PATH}/namespaces/{ns}/finetunejobs") as resp:
        resp.raise_for_status()
        return {it["metadata"]["name"]: it for it in (await resp.json())["items"]}


def changed_paths(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted paths that differ (conditions compared by type), to say what a converged write changed."""
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and all(isinstance(x, dict) and "type" in x for x in old + new)
    ):
        old, new = {x["type"]: x for x in old}, {x["type"]: x for x in new}
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(old.keys() | new.keys()):
            out += changed_paths(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


async def grow(ctx: Ctx, ns: str, tracker: Tracker, extra: list[str], first: list[str]) -> dict[str, Any]:
    a, op = ctx.args, ctx.op
    assert op is not None
    log(f"memory curve: {len(extra)} more jobs up to {(len(first) + len(extra)) * a.pods_per_job} pods")
    cpu0 = op.usage()[1]
    submitted = await submit_at_rate(ctx, "operator", ctx.plane.kubeconfig, ns, extra)
    ok = await wait_running(tracker, extra, a.pods_per_job, a.phase_timeout)
    ok = await jobs_running(ctx, ns, len(first) + len(extra), a.phase_timeout) and ok
    fig = phase_figures(tracker, extra, a.pods_per_job, submitted)
    fig.pop("cdf_running_s")
    fig.pop("cdf_created_s")
    fig.update(completed=ok, operator_cpu_s=round(op.usage()[1] - cpu0, 2))
    return fig


def summary(fig: dict[str, Any]) -> str:
    r = fig["apply_to_all_pods_running_s"]
    return (
        f"{fig['pods']} pods, {fig['pods_created_per_s']} pods/s created, "
        f"apply->Running p50 {r['p50']} p90 {r['p90']} p99 {r['p99']} s"
    )


def memory_curve(op: Operator, points: int = 40) -> list[dict[str, float]]:
    """Peak RSS seen so far at each running-pod count, thinned to about `points` points."""
    best: dict[int, int] = {}
    for _, pods, rss, _ in op.samples:
        best[pods] = max(best.get(pods, 0), rss)
    curve, peak = [], 0
    for pods in sorted(best):
        peak = max(peak, best[pods])
        curve.append((pods, peak))
    if not curve:
        return []
    step = max(1, len(curve) // points)
    kept = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    return [{"running_pods": p, "rss_mib": round(r / 2**20, 1)} for p, r in kept]


def chart_memory_limit_mib() -> float | None:
    values = yaml.safe_load((REPO / "helm" / "tauon" / "values.yaml").read_text())
    limit = str(((values.get("resources") or {}).get("limits") or {}).get("memory") or "")
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, f in units.items():
        if limit.endswith(suffix):
            return float(limit.removesuffix(suffix)) * f
    return None


def machine() -> dict[str, Any]:
    cpu_model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "",
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "hack" / "cluster" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.lower()] = v
    for pkg in ("tauon", "kopf", "kubernetes_asyncio", "aiohttp"):
        out[pkg] = md.version(pkg)
    return out


async def bench(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    names = [f"j{i}" for i in range(a.jobs)]
    total_jobs = max(a.jobs, math.ceil(a.max_pods / a.pods_per_job))
    extra = [f"j{i}" for i in range(a.jobs, total_jobs)]
    results: dict[str, Any] = {}
    if not a.skip_baseline:
        namespace_with_claim(ctx.plane, "bench-plain")
        log(f"baseline: {a.jobs} jobs x {a.pods_per_job} pods at {a.rate}/s by a plain script")
        results["baseline"] = await run_baseline(ctx, names)
        log(f"baseline: {summary(results['baseline'])}")
        results["baseline"]["namespace_delete_s"] = round(await delete_namespace(ctx, "bench-plain", 300), 1)
    namespace_with_claim(ctx.plane, "bench-op")
    log(f"operator: {a.jobs} FineTuneJobs x {a.pods_per_job} pods at {a.rate}/s")
    results.update(await run_operator(ctx, names, extra))
    return results


def figures(res: dict[str, Any], op: Operator) -> dict[str, Any]:
    limit = chart_memory_limit_mib()
    curve = memory_curve(op)
    top = curve[-1] if curve else None
    out: dict[str, Any] = {"memory_curve": curve, "chart_memory_limit_mib": limit}
    if top:
        out["rss_mib_at_max_pods"] = top["rss_mib"]
        out["max_running_pods"] = top["running_pods"]
        out["within_chart_limit"] = limit is None or top["rss_mib"] < limit
    base, oper = res.get("baseline"), res.get("operator")
    if base and oper and base.get("pods_created_per_s") and oper.get("pods_created_per_s"):
        out["ratio_operator_to_plain_pods_per_s"] = round(
            oper["pods_created_per_s"] / base["pods_created_per_s"], 3
        )
    conv = res.get("converged") or {}
    out["targets"] = {
        "ratio_ge_0.8": (out.get("ratio_operator_to_plain_pods_per_s") or 0) >= 0.8,
        "zero_writes_converged": conv.get("writes_per_minute") == 0,
        # writes that only followed the pods' own Ready flips (the cluster's, e.g. its node controller
        # marking pods NotReady when kwok's node heartbeats lag under load), not the operator's churn
        "converged_writes_only_follow_pod_readiness": set(conv.get("finetunejob_status_fields_changed") or {})
        <= {"status.pods.ready"}
        and bool((conv.get("readiness_at_end") or {}).get("pods")),
        "rss_within_chart_limit": out.get("within_chart_limit"),
    }
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for key, label, color in (
        ("baseline", "plain script", "tab:orange"),
        ("operator", "tauon operator", "tab:blue"),
    ):
        ph = results.get(key)
        if not ph:
            continue
        for series, style, what in (
            ("cdf_created_s", "--", "all pods created"),
            ("cdf_running_s", "-", "all pods Running"),
        ):
            xs = ph[series]
            if xs:
                ax1.plot(
                    xs,
                    [(i + 1) / len(xs) for i in range(len(xs))],
                    style,
                    color=color,
                    label=f"{label}: {what}",
                )
    ax1.set_xlabel("seconds from apply (per job)")
    ax1.set_ylabel("fraction of jobs")
    p = results["parameters"]
    ratio = results["figures"].get("ratio_operator_to_plain_pods_per_s")
    ax1.set_title(
        f"{p['jobs']} jobs x {p['pods_per_job']} pods at {p['rate']} jobs/s; pods/s ratio {ratio}", fontsize=9
    )
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    curve = results["figures"]["memory_curve"]
    if curve:
        ax2.plot(
            [c["running_pods"] for c in curve], [c["rss_mib"] for c in curve], "o-", color="tab:blue", ms=3
        )
    limit = results["figures"].get("chart_memory_limit_mib")
    if limit:
        ax2.axhline(limit, color="tab:red", ls="--", label=f"Helm chart memory limit ({limit:.0f} MiB)")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("running pods (FineTuneJob children)")
    ax2.set_ylabel("operator RSS (MiB)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("operator memory", fontsize=9)
    ax2.grid(True, alpha=0.3)
    m = results["machine"]
    fig.suptitle(
        f"tauon control-plane scale, {p['nodes']} kwok nodes, k8s {results['versions']['k8s_version']}; "
        f"{m['cpus_usable']} CPUs shared by the whole control plane, load avg {m['load_average_at_start'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=50, help="kwok CPU nodes added for the benchmark")
    p.add_argument("--jobs", type=int, default=200, help="FineTuneJobs in the measured phase")
    p.add_argument("--pods-per-job", type=int, default=4, help="numNodes of each FineTuneJob")
    p.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="jobs submitted per second (default: more than this machine can create)",
    )
    p.add_argument(
        "--max-pods", type=int, default=2000, help="memory curve: grow to this many pods (10000: 10k)"
    )
    p.add_argument("--converged-seconds", type=float, default=60.0)
    p.add_argument("--phase-timeout", type=float, default=300.0, help="seconds to wait for all pods Running")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--state-dir", type=Path, default=None, help="control plane state (default: a temp dir)")
    p.add_argument("--output-name", default="scale", help="bench/results/NAME.json and NAME.png")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args()
    for name in ("nodes", "jobs", "pods_per_job"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.rate <= 0:
        p.error("--rate must be > 0")
    return a


def _raise_exit(signum: int, _: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


async def amain(ctx_args: argparse.Namespace, plane: Plane, op: Operator) -> dict[str, Any]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=plane.ssl_context(), limit=50)
    ) as http:
        return await bench(Ctx(ctx_args, plane, http, op))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--submitter":
        return submitter_main(sys.argv[2])
    a = parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    mod = load_cluster_module()
    state = (a.state_dir or Path(tempfile.mkdtemp(prefix="tauon-bench-scale-"))).resolve()
    results: dict[str, Any] = {
        "benchmark": "scale",
        "machine": machine(),
        "versions": versions(),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    t_start = time.monotonic()
    op: Operator | None = None
    try:
        kubeconfig = mod.up(state)
        plane = Plane(mod, state, kubeconfig, mod.build())
        plane.server = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        total_pods = max(a.jobs * a.pods_per_job, a.max_pods)
        per_node = max(110, math.ceil(total_pods * 1.2 / a.nodes))
        results["parameters"]["pods_per_node_capacity"] = per_node
        results["parameters"]["nodes_ready"] = add_nodes(plane, a.nodes, per_node)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in ("finetunejobs.tauon.dev", "inferenceservices.tauon.dev"):
            plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        identities_and_flowschemas(plane)
        op = Operator(plane.kubeconfigs["bench-operator"], state / "logs" / "operator.log")
        log(f"control plane up with {a.nodes} kwok nodes in {time.monotonic() - t_start:.0f}s ({state})")
        results.update(asyncio.run(amain(a, plane, op)))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if op is not None:
            op.stop()
            oplog = op.log_path.read_text(errors="replace").splitlines()[-15:] if op.log_path.exists() else []
            errors = [ln for ln in oplog if "ERROR" in ln or "Traceback" in ln]
            if errors:
                log("operator log tail:\n" + "\n".join(oplog))
        mod.down(state)
    assert op is not None
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_bench_seconds"] = round(time.monotonic() - t_start, 1)
    results["figures"] = figures(results, op)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = a.results_dir / f"{a.output_name}.json", a.results_dir / f"{a.output_name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    log(f"wrote {json_path} and {png_path} in {results['total_bench_seconds']} s")
    print(json.dumps({k: v for k, v in results["figures"].items() if k != "memory_curve"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
