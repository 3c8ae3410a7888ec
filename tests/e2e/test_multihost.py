"""Multi-node for real: process nodes as separate hosts (`tauon node --network netns`).

Part 1 (no control plane): tauon.local.netns on this machine - two pods on two "nodes" talk over the
shared bridge by IP, see their own hostname and FQDN, the host reaches them, a pod's link down partitions
it, and what a SIGKILLed node left behind (processes, namespaces, veths) is removed by a cleanup.
Part 2 (control plane + CoreDNS + operator + two netns process nodes): a 2-node FineTuneJob whose ranks
land on different nodes (anti-affinity) rendezvous through cluster DNS and trains; its pods' IPs differ
and are not loopback and their env keeps the DNS MASTER_ADDR; an InferenceService is reached by a
Service name from another pod's namespace; a partition mid-run restarts the gang, which resumes and
succeeds once healed (5 times in a row); a SIGKILLed node leaves nothing behind after its restart.
Every test skips, saying why, where this machine cannot create network namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tauon.local import netns as nn
from tests.kube import TAUON, Cluster, condition, load_cluster_module, wait_until

pytestmark = [pytest.mark.e2e]
WHY_NOT = nn.check_support()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")
NET = ipaddress.IPv4Network("10.231.0.0/16")  # the tests' own pod network (a dev cluster uses the default)


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _pod(name: str, uid: str, hostname: str, subdomain: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": uid},
        "spec": {"hostname": hostname, "subdomain": subdomain, "containers": [{"name": "c"}]},
    }


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
"""

CLIENT = """
import socket, sys
me = socket.gethostname()
mine = socket.getaddrinfo(socket.getfqdn(), None, socket.AF_INET)[0][4][0]
c = socket.create_connection((sys.argv[1], 8000), timeout=2)
print(me, socket.getfqdn(), mine, c.recv(100).decode())
"""


def _in_pod(
    net: nn.PodNet, hostname: str, code: str, *args: str, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    argv = nn.enter_argv(net.names.netns, hostname, [sys.executable, "-c", code, *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@needs_netns
def test_pods_on_two_nodes_talk_over_the_bridge_and_a_partition_cuts_one_off(tmp_path: Path) -> None:
    host = nn.Host(NET, state=tmp_path / "state")
    server: subprocess.Popen[bytes] | None = None
    try:
        sub_a = host.hold("node-a", os.getpid(), "auto")
        sub_b = host.hold("node-b", os.getpid(), "auto")
        assert sub_a and sub_b and sub_a != sub_b
        a = host.setup_pod("node-a", _pod("srv", "uid-a", "srv-0", "svc"), sub_a, None)
        b = host.setup_pod("node-b", _pod("cli", "uid-b", "cli-0", "svc"), sub_b, None)
        assert ipaddress.IPv4Address(a.ip) in sub_a and ipaddress.IPv4Address(b.ip) in sub_b
        assert (nn.NETNS_ETC / a.names.netns / "resolv.conf").read_text().startswith("search team.svc.")
        server = subprocess.Popen(
            nn.enter_argv(a.names.netns, "srv-0", [sys.executable, "-u", "-c", SERVER]),
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == b"listening"
        r = _in_pod(b, "cli-0", CLIENT, a.ip)
        assert r.returncode == 0, r.stderr
        # the pod's own hostname and FQDN (what gloo binds to) resolve to its pod IP; the server says its name
        assert r.stdout.split() == ["cli-0", "cli-0.svc.team.svc.cluster.local", b.ip, "srv-0"]
        # the host reaches pod IPs over the bridge (no NAT, only the bridge's connected route)
        import socket

        with socket.create_connection((a.ip, 8000), timeout=2) as s:
            assert s.recv(100) == b"srv-0"
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert f"{NET} dev {host.bridge}" in routes
        inside = subprocess.run(
            ["ip", "-n", b.names.netns, "-4", "route"], capture_output=True, text=True
        ).stdout
        assert "default" not in inside  # traffic stays on the bridge
        # partition: the server pod's link down; healed: up again
        host.set_link(a.names.netns, up=False)
        assert _in_pod(b, "cli-0", CLIENT, a.ip).returncode != 0
        host.set_link(a.names.netns, up=True)
        r = wait_until(
            lambda: (x := _in_pod(b, "cli-0", CLIENT, a.ip)).returncode == 0 and x, 20, "healed link"
        )
        assert r.stdout.split()[-1] == "srv-0"
        # node-a "SIGKILLed": its pod's process still runs in its namespace; a cleanup removes it all
        removed = host.cleanup_node("node-a")
        assert removed == [a.names.netns]
        server.wait(timeout=10)
        assert a.names.netns not in _netns_list() and a.names.veth not in _links()
        assert not (nn.NETNS_ETC / a.names.netns).exists()
        assert b.names.netns in _netns_list()  # the other node's pods are untouched
        # the bridge stays while a holder lives and pods remain; goes with the last
        host.cleanup_node("node-b")
        assert not host.release("node-a")  # node-b still holds it
        assert host.release("node-b")
        assert host.bridge not in _links()
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        host.cleanup_node(None)
        host.release("node-a")
        host.release("node-b")


@needs_netns
def test_a_subnet_claim_survives_a_restart_and_is_never_shared(tmp_path: Path) -> None:
    host = nn.Host(NET, state=tmp_path / "state")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        first = host.hold("node-a", sleeper.pid, "auto")
        assert host.hold("node-a", os.getpid(), "auto") == first  # restarted: its subnet back
        with pytest.raises(nn.NetnsError, match="overlaps node node-a"):
            host.hold("node-b", os.getpid(), str(first))
        sleeper.kill()
        sleeper.wait()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        host.release("node-a")
        host.release("node-b")
    assert host.bridge not in _links()


# -- part 2: a control plane, CoreDNS, the operator and two netns process nodes ----------------------------
NODES = ("mh-node-a", "mh-node-b")
CIDRS = ("10.231.1.0/24", "10.231.2.0/24")


@pytest.fixture(scope="module")
def dns(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """CoreDNS (hack/dns) watching the test control plane, on the tests' pod network's bridge address."""
    if WHY_NOT is not None:
        pytest.skip(f"no network namespaces here: {WHY_NOT}")
    mod = load_cluster_module()
    d = tmp_path_factory.mktemp("dns")
    pid, gateway = mod.start_dns(d, cluster.kubeconfig, str(NET))
    try:
        yield gateway
    finally:
        mod.stop_dns(d, pid, str(NET))


class NetnsNode:
    """`tauon node --network netns` as a process this test can SIGKILL and restart."""

    def __init__(self, cluster: Cluster, name: str, cidr: str, dns: str, root: Path):
        self.cluster, self.name, self.root = cluster, name, root
        self.argv = [TAUON, "node", "--network", "netns", "--name", name, "--root", str(root / "pods")]
        self.argv += ["--pod-cidr", cidr, "--dns", dns, "--cpus", "4"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.root / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(lambda: condition(self.cluster.get("node", self.name), "Ready"), 60, f"{self.name} Ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def nodes(cluster: Cluster, dns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NetnsNode]]:
    out = [
        NetnsNode(cluster, n, c, dns, tmp_path_factory.mktemp(n)) for n, c in zip(NODES, CIDRS, strict=True)
    ]
    try:
        for n in out:
            n.start()
        yield out
    finally:
        for n in out:
            n.stop()
        for n in NODES:  # a test that failed half-way may have SIGKILLed one
            nn.Host(NET).cleanup_node(n)
            nn.Host(NET).release(n)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, nodes: list[NetnsNode], tmp_path_factory: pytest.TempPathFactory):
    from tests.cluster.conftest import Operator

    op = Operator(cluster, tmp_path_factory.mktemp("op") / "operator.log")
    op.start()
    yield op
    op.stop()


def spread_job(name: str, out: Path, steps: int, every: int) -> dict[str, Any]:
    """The chaos tests' tiny Llama gang of two, one rank on each netns node (required anti-affinity)."""
    from tests.e2e.test_chaos import tiny_job

    job = tiny_job(name, out, steps=steps, every=every)
    job["spec"]["podTemplate"] = {
        "nodeSelector": {"tauon.dev/node-agent": "process"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": list(NODES)}
                            ]
                        }
                    ]
                }
            },
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"tauon.dev/job-name": name}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            },
        },
    }
    return job


def job_pods(cluster: Cluster, ns: str, job: str) -> list[dict[str, Any]]:
    return cluster.list("pods", ns, f"tauon.dev/job-name={job}")


def running_pair(cluster: Cluster, ns: str, job: str, attempt: int = 0) -> list[dict[str, Any]] | None:
    pods = [
        p
        for p in job_pods(cluster, ns, job)
        if p["metadata"]["labels"].get("tauon.dev/attempt") == str(attempt)
        and p.get("status", {}).get("phase") == "Running"
        and p["status"].get("podIP")
    ]
    return sorted(pods, key=lambda p: p["metadata"]["name"]) if len(pods) == 2 else None


def process_env(netns_name: str) -> dict[str, str]:
    """The environment of the trainer process in a pod's network namespace."""
    r = subprocess.run(["ip", "netns", "pids", netns_name], capture_output=True, text=True, check=True)
    for pid in r.stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"tauon_train.train" in cmd:
            return dict(kv.decode().split("=", 1) for kv in env.split(b"\0") if b"=" in kv)
    return {}


def _st(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return (cluster.get("ftj", name, ns) or {}).get("status") or {}


def _wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
    return wait_until(
        lambda: (s := _st(cluster, ns, name)).get("phase") == phase and s,
        timeout,
        f"{name} {phase} (now {_st(cluster, ns, name).get('phase')})",
        interval=1,
    )


@needs_netns
def test_two_node_job_rendezvous_through_dns_and_is_reached_by_service_name(
    cluster: Cluster, operator: Any, nodes: list[NetnsNode], namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cluster.apply(spread_job("spread", out, steps=30, every=10), "-n", namespace)
    pods = wait_until(lambda: running_pair(cluster, namespace, "spread"), 120, "both ranks Running")
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2 and all(ipaddress.IPv4Address(ip) in NET for ip in ips), ips
    assert not any(ipaddress.IPv4Address(ip).is_loopback for ip in ips)
    assert {p["spec"]["nodeName"] for p in pods} == set(NODES)  # one rank on each "host"
    master = f"spread-r0-node-0.{pods[0]['spec']['subdomain']}"
    for p in pods:
        names = nn.pod_names(p["spec"]["nodeName"], p["metadata"]["uid"])
        env = wait_until(lambda n=names: process_env(n.netns), 60, "the trainer process")
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == master, env  # not rewritten
        assert env["MASTER_PORT"] == "29500"
    final = _wait_phase(cluster, namespace, "spread", "Succeeded", 300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["worldSize"] == 2 and final["restarts"] == 0
    # nothing of the finished pods' namespaces is left
    assert not any(
        nn.pod_names(p["spec"]["nodeName"], p["metadata"]["uid"]).netns in _netns_list() for p in pods
    )

    # an InferenceService on node a, reached by a Service name from a pod's namespace on node b
    from tests.manifests import inferenceservice

    cluster.apply(
        inferenceservice(
            "chat",
            model={"fineTuneJobRef": {"name": "spread"}},
            podTemplate={"nodeSelector": {"kubernetes.io/hostname": NODES[0]}},
        ),
        "-n",
        namespace,
    )
    # there is no kube-proxy: the rendered ClusterIP Service's VIP routes nowhere; a headless Service
    # with the same selector resolves to the server pods' IPs, which is what a pod then dials
    svc = cluster.get("service", "chat", namespace) or wait_until(
        lambda: cluster.get("service", "chat", namespace), 60, "the rendered Service"
    )
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "chat-pods"},
        "spec": {
            "clusterIP": "None",
            "selector": svc["spec"]["selector"],
            "ports": [{"name": "http", "port": 8080}],
        },
    }
    cluster.apply(headless, "-n", namespace)
    wait_until(
        lambda: (condition(cluster.get("tis", "chat", namespace), "Ready") or {}).get("status") == "True",
        240,
        "InferenceService Ready",
        interval=1,
    )
    probe = """
import socket, sys, urllib.request
for name in ("chat-pods", "chat-pods.%s.svc.cluster.local" % sys.argv[1]):
    ip = socket.gethostbyname(name)
    with urllib.request.urlopen("http://%s:8080/v2/health/ready" % name, timeout=10) as r:
        print(name, ip, r.status, flush=True)
"""
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": NODES[1]},
            "containers": [{"name": "c", "image": "python", "command": ["python", "-c", probe, namespace]}],
        },
    }
    cluster.apply(client, "-n", namespace)
    done = wait_until(
        lambda: (
            (p := cluster.get("pod", "probe", namespace))
            and p["status"].get("phase") in ("Succeeded", "Failed")
            and p
        ),
        90,
        "the probe pod",
    )
    logtext = Path(done["metadata"]["annotations"]["tauon.dev/log-file"]).read_text()
    assert done["status"]["phase"] == "Succeeded", logtext
    server = cluster.list("pods", namespace, "tauon.dev/inference-service=chat")[0]
    lines = [ln.split() for ln in logtext.splitlines() if ln.startswith("chat-pods")]
    assert [ln[1:] for ln in lines] == [[server["status"]["podIP"], "200"]] * 2, logtext
    assert server["spec"]["nodeName"] == NODES[0] and done["spec"]["nodeName"] == NODES[1]
    # the SDK's path (Client.endpoint uses the published address before any port-forward): the real pod
    # IP and container port, which the host reaches over the bridge
    addr = server["metadata"]["annotations"]["tauon.dev/http-address"]
    assert addr == f"{server['status']['podIP']}:8080"
    with urllib.request.urlopen(f"http://{addr}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    cluster.kubectl("delete", "tis", "chat", "-n", namespace, "--wait=false")


# the partition is run PARTITION_RUNS times in a row (5 to check the issue's "5 times in a row"; 1 in the
# default suite, whose time budget a 1-3 min run each would strain)
PARTITION_RUNS = int(os.environ.get("TAUON_PARTITION_RUNS", "1"))


@needs_netns
@pytest.mark.parametrize("run", range(PARTITION_RUNS))
def test_partition_restarts_the_gang_which_resumes_and_succeeds(
    run: int, cluster: Cluster, operator: Any, nodes: list[NetnsNode], namespace: str, tmp_path: Path
) -> None:
    from tests.e2e.test_chaos import complete_checkpoints

    out = tmp_path / "out"
    # ~10-20 s of training here: the partition lands after the first checkpoint, long before the end
    steps = 300
    cluster.apply(spread_job("part", out, steps=steps, every=20), "-n", namespace)
    pods = wait_until(
        lambda: complete_checkpoints(out) and running_pair(cluster, namespace, "part"),
        180,
        "a complete checkpoint with both ranks running",
        interval=0.3,
    )
    rank1 = pods[1]
    assert rank1["metadata"]["labels"]["tauon.dev/node-rank"] == "1"
    victim = nn.pod_names(rank1["spec"]["nodeName"], rank1["metadata"]["uid"]).netns
    host = nn.Host(NET)
    host.set_link(victim, up=False)  # rank 1 is cut off from rank 0 (and from DNS)
    try:
        assert _st(cluster, namespace, "part").get("phase") != "Succeeded", "partitioned after it finished"
        wait_until(lambda: _st(cluster, namespace, "part").get("restarts", 0) >= 1, 120, "a gang restart")
    finally:
        with contextlib.suppress(nn.NetnsError):  # healed (its namespace may already be gone with its pod)
            host.set_link(victim, up=True)
    final = _wait_phase(cluster, namespace, "part", "Succeeded", 240)
    assert final["restarts"] >= 1, final
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumedFromStep"] > 0 and metrics["steps"] == steps, metrics


@needs_netns
def test_a_sigkilled_node_leaves_nothing_behind_after_its_restart(
    cluster: Cluster, nodes: list[NetnsNode], namespace: str
) -> None:
    node = nodes[1]
    sleeper = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node.name},
            "containers": [
                {"name": "c", "image": "python", "command": ["python", "-c", "import time; time.sleep(600)"]}
            ],
        },
    }
    cluster.apply(sleeper, "-n", namespace)
    pod = wait_until(
        lambda: (p := cluster.get("pod", "sleeper", namespace)) and p["status"].get("podIP") and p,
        60,
        "sleeper IP",
    )
    names = nn.pod_names(node.name, pod["metadata"]["uid"])
    old = subprocess.run(["ip", "netns", "pids", names.netns], capture_output=True, text=True).stdout.split()
    assert old and names.veth in _links()
    node.stop(signal.SIGKILL)
    assert names.netns in _netns_list()  # a SIGKILL cleans nothing up...
    cluster.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    node.start()  # ...its next start does, and it finishes the pod's deletion
    wait_until(lambda: cluster.get("pod", "sleeper", namespace) is None, 60, "the pod deleted")
    assert not any(Path(f"/proc/{pid}").exists() for pid in old), "the old pod's processes survived"
    ns_prefix, veth_prefix = nn.node_prefixes(node.name)
    assert ns_prefix not in _netns_list() and veth_prefix not in _links()
    assert not list(nn.NETNS_ETC.glob(f"{ns_prefix}*"))
