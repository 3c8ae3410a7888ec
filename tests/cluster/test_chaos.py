"""Chaos on a real control plane (its own, in a temporary directory, because the API server is restarted
here): the operator SIGKILLed while jobs are created, the API server restarted under running jobs, a kwok
node deleted under a running gang, a namespace deleted with the operator stopped, a planted token that
must never leak, and two operator replicas with leader election. kwok pods stand in for trainers."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Operator
from tests.kube import Cluster, control_plane, load_cluster_module, wait_until
from tests.manifests import MINILM_CLASSIFIER, finetunejob, inferenceservice

pytestmark = pytest.mark.cluster
T = 120  # seconds: every wait is bounded, generously (the machine is shared)
CHAOS_DIR = Path(tempfile.gettempdir()) / "tauon-chaos-cluster"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A control plane of our own: restarting its API server must not disturb other test sessions."""
    with control_plane(CHAOS_DIR) as c:
        yield c


def job(name: str, nodes: int = 2, run_ms: int = 3000, **extra: Any) -> dict[str, Any]:
    return finetunejob(
        name,
        model={**MINILM_CLASSIFIER, **extra.pop("model", {})},
        dataset={"source": "file:///tmp/tauon-test-data/train.jsonl"},
        output={"storage": f"file:///tmp/tauon-test-out/{name}"},
        numNodes=nodes,
        resources={"requests": {"cpu": "100m", "memory": "64Mi"}},
        podTemplate={
            # a Go duration: kwok parses the annotation with time.ParseDuration and silently falls back
            # to 0 (exit at once) for a bare number
            "annotations": {
                "kwok.tauon.dev/exit-code": "0",
                "kwok.tauon.dev/exit-after-ms": f"{run_ms}ms",
            }
        },
        **extra,
    )


def apply_all(cluster: Cluster, ns: str, objs: list[dict[str, Any]]) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": objs}, "-n", ns)


def jobs(cluster: Cluster, ns: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in cluster.list("ftj", ns)}


def phases(cluster: Cluster, ns: str) -> dict[str, str]:
    return {n: (j.get("status") or {}).get("phase", "") for n, j in jobs(cluster, ns).items()}


def all_in(cluster: Cluster, ns: str, phase: str, n: int) -> bool:
    got = phases(cluster, ns)
    return len(got) == n and all(p == phase for p in got.values())


def children_consistent(cluster: Cluster, ns: str) -> None:
    """Every child is owned by a live job of its name; one ConfigMap, one Service, one gang per job."""
    js = jobs(cluster, ns)
    uids = {j["metadata"]["uid"]: n for n, j in js.items()}
    for kind in ("pods", "configmaps", "services"):
        per_job: dict[str, list[str]] = {}
        for obj in cluster.list(kind, ns, "tauon.dev/job-name"):
            owner = [r["uid"] for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")]
            assert owner and owner[0] in uids, f"orphaned {kind} {obj['metadata']['name']}"
            per_job.setdefault(uids[owner[0]], []).append(obj["metadata"]["name"])
        for name, j in js.items():
            got = sorted(per_job.get(name, []))
            if kind == "pods":
                attempt = j["status"]["attempt"]
                want = sorted(f"{name}-r{attempt}-node-{i}" for i in range(j["spec"]["numNodes"]))
                assert got == want, f"{name}: pods {got} != {want}"
            else:
                assert len(got) == 1, f"{name}: {kind} {got}"


# -- the operator SIGKILLed while jobs are created -----------------------------------------------------


def failing_job(name: str, run_ms: int = 1500) -> dict[str, Any]:
    """Every attempt exits 1 after run_ms; backoffLimit 1: one counted restart, then Failed."""
    j = job(name, run_ms=run_ms)
    j["spec"]["podTemplate"]["annotations"]["kwok.tauon.dev/exit-code"] = "1"
    j["spec"]["runPolicy"] = {"backoffLimit": 1}
    return j


def test_operator_sigkilled_twice_while_50_jobs_are_created(cluster: Cluster, operator: Operator) -> None:
    ns = cluster.create_namespace("chaos")
    rng = random.Random(int(os.environ.get("TAUON_CHAOS_SEED", "0")) or None)
    names = [f"j{i:02d}" for i in range(50)]
    failing = set(names[4::10])  # one per batch: its restart must be counted exactly once across the kills
    batches = [names[i : i + 10] for i in range(0, 50, 10)]
    kill_after = sorted(rng.sample(range(1, len(batches)), 2))  # between batches, at random moments
    for b, batch in enumerate(batches):
        apply_all(cluster, ns, [failing_job(n) if n in failing else job(n, run_ms=4000) for n in batch])
        if b in kill_after:
            time.sleep(rng.uniform(0.2, 2.5))
            operator.kill(signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 1.5))
            operator.start()
    want = {n: "Failed" if n in failing else "Succeeded" for n in names}
    wait_until(lambda: phases(cluster, ns) == want, 240, "45 jobs Succeeded and 5 Failed", interval=2)
    for name, j in jobs(cluster, ns).items():
        st = j["status"]
        if name in failing:
            # attempt 0 failed -> one counted restart -> attempt 1 failed -> backoffLimit used up
            assert (st["attempt"], st["restarts"], st["restartsCountTowardsLimit"]) == (1, 1, 1), (name, st)
            assert st["pods"]["failed"] == 2 and st["lastFailure"]["pod"].startswith(f"{name}-r1-"), (
                name,
                st,
            )
        else:
            assert (st["attempt"], st["restarts"], st["restartsCountTowardsLimit"]) == (0, 0, 0), (name, st)
            assert st["pods"]["succeeded"] == 2, (name, st["pods"])
    children_consistent(cluster, ns)


# -- the API server restarted under running jobs -------------------------------------------------------


def restart_api_server(down_seconds: float = 3.0) -> None:
    """Stop the kube-apiserver of the chaos control plane and start it again with the same command line
    (hack/cluster/cluster.py records its pid in state.json)."""
    state_file = CHAOS_DIR / "state.json"
    state = json.loads(state_file.read_text())
    pid = state["pids"]["kube-apiserver"]
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    os.killpg(pid, signal.SIGKILL)  # a crash: no graceful close of the watches (and quicker)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break  # our child (cluster.up ran in this process): reaped
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                break
        time.sleep(0.2)
    time.sleep(down_seconds)
    logf = open(CHAOS_DIR / "logs" / "kube-apiserver.log", "ab")
    p = subprocess.Popen(
        [c.decode() for c in cmd],
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    state["pids"]["kube-apiserver"] = p.pid
    state_file.write_text(json.dumps(state, indent=2))


def test_api_server_restarted_under_running_jobs(cluster: Cluster, operator: Operator) -> None:
    ns = cluster.create_namespace("chaos")
    apply_all(cluster, ns, [job(f"long{i}", run_ms=40000) for i in range(3)])
    wait_until(lambda: all_in(cluster, ns, "Running", 3), T, "3 jobs Running")
    t0 = time.monotonic()
    restart_api_server()
    wait_until(
        lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
        T,
        "API server ready again",
    )
    print(f"API server killed and ready again after {time.monotonic() - t0:.1f}s")
    assert operator.alive(), operator.tail()
    assert all_in(cluster, ns, "Running", 3), phases(cluster, ns)  # the restart fell inside the run
    # nothing changes until the pods exit (a quiet period on every watch), then the watches must deliver
    wait_until(lambda: all_in(cluster, ns, "Succeeded", 3), T, "jobs finish after the restart", interval=1)
    time.sleep(10)  # a further quiet period: no event at all
    # the watches still work: a job created now is handled promptly
    t0 = time.monotonic()
    cluster.apply(job("after", run_ms=1000), "-n", ns)
    wait_until(lambda: phases(cluster, ns).get("after") == "Succeeded", 60, "a new job handled")
    print(f"a job created after the restart and a quiet period succeeded in {time.monotonic() - t0:.1f}s")
    for st in (j["status"] for j in jobs(cluster, ns).values()):
        assert st["restarts"] == 0 and st["attempt"] == 0, st
    children_consistent(cluster, ns)


# -- a kwok node deleted under a running gang ----------------------------------------------------------


def test_node_deleted_under_a_running_gang_restarts_the_whole_gang(
    cluster: Cluster, operator: Operator
) -> None:
    ns = cluster.create_namespace("chaos")
    cluster.apply(job("gang", nodes=2, run_ms=600000), "-n", ns)
    wait_until(lambda: phases(cluster, ns).get("gang") == "Running", T, "gang Running")
    pod0 = cluster.get("pod", "gang-r0-node-0", ns)
    assert pod0 is not None
    node_name = pod0["spec"]["nodeName"]
    node = cluster.get("node", node_name)
    assert node is not None
    cluster.kubectl("delete", "node", node_name, "--wait=false")
    try:
        # the pod GC removes pods bound to a missing node; the operator restarts the whole gang
        st = wait_until(
            lambda: (s := jobs(cluster, ns)["gang"]["status"]).get("attempt") == 1 and s or None,
            180,
            "gang restarted as attempt 1",
            interval=1,
        )
        assert st["restarts"] == 1 and st["restartsCountTowardsLimit"] == 0
        wait_until(lambda: phases(cluster, ns).get("gang") == "Running", T, "new gang Running")
        wait_until(lambda: not cluster.list("pods", ns, "tauon.dev/attempt=0"), T, "old gang gone")
        children_consistent(cluster, ns)
    finally:
        mod = load_cluster_module()
        fresh = mod.node_manifest(node_name, int(node["status"]["capacity"].get("nvidia.com/gpu", 0)))
        cluster.apply(fresh)


# -- namespace deletion with the operator stopped ------------------------------------------------------


def test_namespace_deletion_completes_with_the_operator_stopped(cluster: Cluster, operator: Operator) -> None:
    ns = cluster.create_namespace("chaos")
    apply_all(cluster, ns, [job(f"n{i}", run_ms=600000) for i in range(3)])
    wait_until(lambda: all_in(cluster, ns, "Running", 3), T, "jobs Running")
    for j in jobs(cluster, ns).values():
        assert not j["metadata"].get("finalizers"), j["metadata"]
    operator.stop()
    try:
        t0 = time.time()
        cluster.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=150s", timeout=170)
        assert cluster.get("namespace", ns) is None
        print(f"namespace deleted in {time.time() - t0:.1f}s with the operator stopped")
    finally:
        operator.start()


# -- a planted token never leaks -----------------------------------------------------------------------


def test_planted_token_never_appears_in_logs_events_or_status(cluster: Cluster, operator: Operator) -> None:
    ns = cluster.create_namespace("chaos")
    token = f"hf_planted_{uuid.uuid4().hex}"
    cluster.kubectl("create", "secret", "generic", "hf", f"--from-literal=token={token}", "-n", ns)
    ref = {"tokenSecretRef": {"name": "hf", "key": "token"}}
    ok = job("tok", run_ms=2000, model=ref)
    failing = job("tokfail", nodes=1, model=ref)
    failing["spec"]["podTemplate"]["annotations"] = {"kwok.tauon.dev/exit-code": "3"}
    failing["spec"]["runPolicy"] = {"backoffLimit": 0}
    isvc = inferenceservice(
        "toksvc", model={"source": "hf://org/model", "task": "sequence-classification", **ref}
    )
    apply_all(cluster, ns, [ok, failing, isvc])
    wait_until(lambda: phases(cluster, ns).get("tok") == "Succeeded", T, "tok Succeeded")
    wait_until(lambda: phases(cluster, ns).get("tokfail") == "Failed", T, "tokfail Failed")
    wait_until(lambda: cluster.get("deployment", "toksvc-predictor", ns), T, "predictor rendered")
    time.sleep(3)  # let events land
    for kind in ("ftj", "inferenceservices", "events", "pods", "deployments", "configmaps"):
        out = cluster.kubectl("get", kind, "-n", ns, "-o", "json").stdout
        assert token not in out, f"the token leaked into {kind}"
    assert token not in operator.log.read_text(errors="replace"), "the token leaked into the operator log"
    # the pods get it only by reference
    pod = cluster.list("pods", ns, "tauon.dev/job-name=tok")[0]
    env = pod["spec"]["containers"][0]["env"]
    assert any((e.get("valueFrom") or {}).get("secretKeyRef", {}).get("name") == "hf" for e in env)


# -- two operator replicas: one leader -----------------------------------------------------------------


def writes(op: Operator) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tauon_api_writes_total{")
    )


def test_two_operators_one_leader(cluster: Cluster, operator: Operator, tmp_path: Path) -> None:
    lease_ns = cluster.create_namespace("lease")
    operator.stop()  # the module's operator runs without election
    elected = copy.copy(cluster)
    elected.env = {**cluster.env, "TAUON_LEADER_ELECTION_NAMESPACE": lease_ns}
    ops = [Operator(elected, tmp_path / f"op{i}.log") for i in range(2)]
    try:
        for op in ops:
            op.start()
        lease = wait_until(
            lambda: (
                (cluster.get("lease", "tauon-operator", lease_ns) or {}).get("spec", {}).get("holderIdentity")
            ),
            T,
            "a leader",
        )
        ns = cluster.create_namespace("chaos")
        apply_all(cluster, ns, [job(f"l{i}", run_ms=1500) for i in range(5)])
        wait_until(lambda: all_in(cluster, ns, "Succeeded", 5), T, "jobs Succeeded under one leader")
        for op in ops:
            wait_until(partial(_metrics_up, op), 30, "metrics")
        w = [writes(op) for op in ops]
        assert sum(1 for x in w if x > 0) == 1, f"writes per operator: {w}"
        leader = ops[0] if w[0] > 0 else ops[1]
        follower = ops[1] if leader is ops[0] else ops[0]
        leader.kill(signal.SIGKILL)  # no release: the follower waits out the lease
        t0 = time.time()
        apply_all(cluster, ns, [job("after", run_ms=1000)])
        wait_until(lambda: phases(cluster, ns).get("after") == "Succeeded", T, "follower took over")
        took = time.time() - t0
        holder = cluster.get("lease", "tauon-operator", lease_ns)["spec"]["holderIdentity"]  # type: ignore[index]
        assert holder != lease
        assert writes(follower) > 0
        print(f"take-over after SIGKILL of the leader: {took:.1f}s")
        children_consistent(cluster, ns)
    finally:
        for op in ops:
            op.kill(signal.SIGKILL)
        operator.start()


def _metrics_up(op: Operator) -> bool:
    try:
        writes(op)
    except OSError:
        return False
    return True
