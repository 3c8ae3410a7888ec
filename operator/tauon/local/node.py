"""`tauon node`: a process-backed node agent for the local control plane (development and tests only).

It registers a Node (label tauon.dev/node-agent=process), renews its Lease, and runs every pod bound to
it as a local process (see tauon.local.process), reporting status as a kubelet would: Pending -> Running
(Ready when the readiness probe passes) -> Succeeded/Failed with the exit code and termination message.
Deleting a pod kills its processes, then the agent finishes the deletion. activeDeadlineSeconds is
enforced. Where the pod's ports really listen is published in annotations tauon.dev/<port>-address.

Networks: `--network shared` (default) runs pods in the host's network with addresses and ports rewritten
(pods of one gang must share this node). `--network netns` gives each pod a network namespace and IP of
its own on a bridge every process node of the machine shares (tauon.local.netns): env and ports stay as
rendered, status.podIP is the real address (Services, EndpointSlices and cluster DNS work), and a gang
can span nodes. What the namespaces create is removed when the node stops, and on its next start after
a SIGKILL.

Limits (it is not a kubelet): no images, no resource limits, no PVCs, no `kubectl logs` (logs are files
under --root), no exec, secrets in env are not injected. It polls the API server once a second.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tauon.api.names import ANN_LOG_FILE, LABEL_NODE_AGENT, Manifest, address_annotation
from tauon.local import netns as nn
from tauon.local import process as lp

log = logging.getLogger("tauon.node")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Run:
    prep: lp.Prepared
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    readiness: Manifest | None = None
    restarts: int = 0
    exited_at: float = 0.0
    net: nn.PodNet | None = None

    @property
    def ip(self) -> str:
        return self.net.ip if self.net else "127.0.0.1"


@dataclass
class NetnsConfig:
    """`--network netns`: the machine's pod network, this node's pod subnet, the cluster DNS."""

    host: nn.Host
    pod_cidr: str | None  # None: one derived from the node's name
    dns: str | None  # None: the bridge's address (where hack/cluster runs CoreDNS)
    subnet: Any = None  # claimed at start


class NodeAgent:
    def __init__(
        self,
        name: str,
        root: Path,
        cpus: int,
        memory_gi: int,
        heartbeat: float = 10.0,
        netns: NetnsConfig | None = None,
    ):
        self.name = name
        self.netns = netns
        self.root = root
        self.cpus = cpus
        self.memory_gi = memory_gi
        self.heartbeat = heartbeat
        self.core = client.CoreV1Api()
        self.coord = client.CoordinationV1Api()
        self.runs: dict[tuple[str, str], Run] = {}
        self.ports = lp.PortMap()
        self.stopping = threading.Event()

    # -- node registration -------------------------------------------------------------------------
    def _conditions(self) -> list[Manifest]:
        t = now()
        return [
            {
                "type": "Ready",
                "status": "True",
                "reason": "TauonNodeReady",
                "message": "process-backed node agent",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            },
            *(
                {
                    "type": c,
                    "status": "False",
                    "reason": "AgentHasNo" + c,
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
                for c in ("MemoryPressure", "DiskPressure", "PIDPressure")
            ),
        ]

    def register(self) -> None:
        capacity = {
            "cpu": str(self.cpus),
            "memory": f"{self.memory_gi}Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        body = client.V1Node(
            api_version="v1",
            kind="Node",
            metadata=client.V1ObjectMeta(
                name=self.name,
                labels={
                    LABEL_NODE_AGENT: "process",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                },
            ),
        )
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self._node_status(capacity)

    def _node_status(self, capacity: Manifest | None = None) -> None:
        status: Manifest = {
            "conditions": self._conditions(),
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "kubeletVersion": "tauon-node",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://",
                "kernelVersion": "",
                "osImage": "",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        if capacity:
            status["capacity"] = capacity
            status["allocatable"] = capacity
        self.core.patch_node_status(self.name, {"status": status})
        self._lease()

    def _lease(self) -> None:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace="kube-node-lease"),
            spec=client.V1LeaseSpec(
                holder_identity=self.name, lease_duration_seconds=40, renew_time=dt.datetime.now(dt.UTC)
            ),
        )
        try:
            self.coord.patch_namespaced_lease(self.name, "kube-node-lease", body)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    @property
    def host_ip(self) -> str:
        return self.netns.host.gateway if self.netns else "127.0.0.1"

    def setup_network(self) -> None:
        """netns: remove what a SIGKILLed run of this node left, then hold the bridge and a pod subnet."""
        if self.netns is None:
            return
        gone = self.netns.host.cleanup_node(self.name)
        if gone:
            log.info("removed %d network namespaces left by a previous run: %s", len(gone), " ".join(gone))
        self.netns.subnet = self.netns.host.hold(self.name, os.getpid(), self.netns.pod_cidr or "auto")
        log.info(
            "pod network: bridge %s (%s), this node's pods in %s, DNS %s",
            self.netns.host.bridge,
            self.netns.host.network,
            self.netns.subnet,
            self.netns.dns or self.netns.host.gateway,
        )

    def teardown_network(self) -> None:
        if self.netns is None:
            return
        self.netns.host.cleanup_node(self.name)
        if self.netns.host.release(self.name):
            log.info("removed bridge %s (no other holder)", self.netns.host.bridge)

    def _drop(self, key: tuple[str, str], grace: float) -> Run | None:
        """Stop a pod's processes and remove its network namespace."""
        run = self.runs.pop(key, None)
        if run is None:
            return None
        lp.stop(run.proc, grace=grace)
        if run.net is not None and self.netns is not None:
            self.netns.host.teardown_pod(run.net.names)
        return run

    # -- pods ---------------------------------------------------------------------------------------
    def _pod_dir(self, ns: str, name: str, uid: str) -> Path:
        return self.root / ns / f"{name}-{uid[:8]}"

    def _patch_status(self, ns: str, name: str, status: Manifest) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status})
        except ApiException as e:
            if e.status != 404:
                raise

    def _running_status(self, pod: Manifest, run: Run) -> Manifest:
        t = now()
        c = pod["spec"]["containers"][0]
        ready = "True" if run.ready else "False"
        return {
            "phase": "Running",
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": pod.get("status", {}).get("startTime") or t,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                {"type": "Ready", "status": ready, "lastTransitionTime": t},
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": run.ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": t}},
                }
            ],
        }

    def _finished_status(self, pod: Manifest, code: int, message: str, reason: str | None = None) -> Manifest:
        t = now()
        c = pod["spec"]["containers"][0]
        term = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "message": message,
            "startedAt": pod.get("status", {}).get("startTime") or t,
            "finishedAt": t,
        }
        status: Manifest = {
            "phase": "Succeeded" if code == 0 and reason is None else "Failed",
            "conditions": [
                {
                    "type": "ContainersReady",
                    "status": "False",
                    "reason": "PodCompleted",
                    "lastTransitionTime": t,
                },
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": t},
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": term},
                }
            ],
        }
        if reason == "DeadlineExceeded":
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        return status

    def _configmaps(self, pod: Manifest) -> dict[str, Manifest]:
        out = {}
        for vol in pod["spec"].get("volumes") or []:
            if "configMap" in vol:
                cm_name = vol["configMap"]["name"]
                try:
                    cm = self.core.read_namespaced_config_map(cm_name, pod["metadata"]["namespace"])
                    out[cm_name] = {"data": cm.data or {}}
                except ApiException as e:
                    if e.status != 404:
                        raise
        return out

    def _start(self, pod: Manifest) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        root = self._pod_dir(ns, name, meta["uid"])
        net: nn.PodNet | None = None
        try:
            if self.netns is None:
                prep = lp.prepare(pod, self._configmaps(pod), root, self.ports)
            else:
                prep = lp.prepare(pod, self._configmaps(pod), root, self.ports, network="netns")
                net = self.netns.host.setup_pod(self.name, pod, self.netns.subnet, self.netns.dns)
                prep.enter = nn.enter_argv(net.names.netns, nn.pod_hostname(pod), [])
            proc = lp.start(prep, root / "container.log")
        except (lp.Unsupported, nn.NetnsError) as e:
            if net is not None and self.netns is not None:
                self.netns.host.teardown_pod(net.names)
            log.warning("pod %s/%s cannot run here: %s", ns, name, e)
            self._patch_status(ns, name, self._finished_status(pod, 128, str(e), reason="Unsupported"))
            return
        c = pod["spec"]["containers"][0]
        run = Run(prep, proc, time.monotonic(), readiness=c.get("readinessProbe"), net=net)
        run.ready = run.readiness is None
        self.runs[(ns, name)] = run
        annotations = {address_annotation(p): f"{run.ip}:{port}" for p, port in prep.ports.items()}
        # There is no kubelet to serve pods/log: publish where the container's output goes (the SDK and
        # `tauon logs` read it from there for pods on this dev node).
        annotations[ANN_LOG_FILE] = str(root / "container.log")
        if annotations:
            try:
                self.core.patch_namespaced_pod(name, ns, {"metadata": {"annotations": annotations}})
            except ApiException as e:
                if e.status != 404:
                    raise
        self._patch_status(ns, name, self._running_status(pod, run))
        log.info("started %s/%s (pid %d, IP %s): %s", ns, name, proc.pid, run.ip, " ".join(prep.argv))

    def _restart(self, pod: Manifest, run: Run, code: int) -> None:
        """restartPolicy Always/OnFailure: restart the container in place with a growing back-off."""
        backoff = min(2.0 * (2**run.restarts), 60.0)
        if time.monotonic() - run.exited_at < backoff if run.exited_at else False:
            return
        if not run.exited_at:
            run.exited_at = time.monotonic()
            log.info(
                "pod %s/%s container exited with %d; restarting in %.0fs",
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                code,
                backoff,
            )
            return
        run.restarts += 1
        run.exited_at = 0.0
        run.proc = lp.start(run.prep, run.prep.workdir / "container.log")
        run.started = time.monotonic()
        run.ready = run.readiness is None
        status = self._running_status(pod, run)
        status["containerStatuses"][0]["restartCount"] = run.restarts
        status["containerStatuses"][0]["lastState"] = {"terminated": {"exitCode": code, "reason": "Error"}}
        self._patch_status(pod["metadata"]["namespace"], pod["metadata"]["name"], status)

    def _probe(self, run: Run) -> bool:
        probe = run.readiness or {}
        http = probe.get("httpGet")
        if not http:
            return True
        port = http.get("port")
        local = run.prep.ports.get(str(port)) if isinstance(port, str) else None
        if local is None:
            local = next(iter(run.prep.ports.values()), None)
        if local is None:
            return False
        try:
            with urllib.request.urlopen(f"http://{run.ip}:{local}{http.get('path', '/')}", timeout=1) as r:
                return bool(200 <= r.status < 400)
        except OSError:
            return False

    def sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items
        seen = set()
        api = client.ApiClient()
        for obj in pods:
            pod: Manifest = api.sanitize_for_serialization(obj)
            meta = pod["metadata"]
            key = (meta["namespace"], meta["name"])
            seen.add(key)
            run = self.runs.get(key)
            phase = (pod.get("status") or {}).get("phase")
            if meta.get("deletionTimestamp"):
                if run is not None:
                    self._drop(key, grace=float(pod["spec"].get("terminationGracePeriodSeconds") or 10))
                try:
                    self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0)
                except ApiException as e:
                    if e.status != 404:
                        raise
                continue
            if run is None:
                if phase not in ("Succeeded", "Failed"):
                    self._start(pod)
                continue
            rc = run.proc.poll()
            if (
                rc is not None
                and pod["spec"].get("restartPolicy", "Always") != "Never"
                and not (pod["spec"].get("restartPolicy") == "OnFailure" and rc == 0)
            ):
                self._restart(pod, run, lp.exit_code(rc))
                continue
            if rc is not None:
                code = lp.exit_code(rc)
                self._patch_status(*key, self._finished_status(pod, code, lp.termination_message(run.prep)))
                self._drop(key, grace=0)
                log.info("pod %s/%s exited with %d", *key, code)
                continue
            deadline = pod["spec"].get("activeDeadlineSeconds")
            if deadline and time.monotonic() - run.started >= deadline:
                self._drop(key, grace=5)
                self._patch_status(*key, self._finished_status(pod, 137, "", reason="DeadlineExceeded"))
                continue
            ready = self._probe(run)
            if ready != run.ready or phase != "Running":
                run.ready = ready
                status = self._running_status(pod, run)
                status["containerStatuses"][0]["restartCount"] = run.restarts
                self._patch_status(*key, status)
        for key in list(self.runs):
            if key not in seen:  # deleted with grace 0 by someone else
                self._drop(key, grace=5)

    def run(self) -> None:
        self.setup_network()
        self.register()
        last_beat = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.sync()
                if time.monotonic() - last_beat >= self.heartbeat:
                    self._node_status()
                    last_beat = time.monotonic()
            except Exception:
                log.exception("node sync failed")
            self.stopping.wait(1.0)
        self.shutdown()

    def shutdown(self) -> None:
        for key in list(self.runs):
            self._drop(key, grace=5)
        try:
            self.core.delete_node(self.name)
        except ApiException:
            pass
        self.teardown_network()


def netns_config(pod_cidr: str | None, dns: str | None, env: dict[str, str]) -> NetnsConfig:
    """Validate the netns options (a clear error naming the option) and check this machine can create
    namespaces: where it cannot, say so and point at --network shared."""
    network = nn.network_for(pod_cidr, env)
    if pod_cidr:
        nn.parse_pod_cidr(pod_cidr, network)
    if dns:
        try:
            ipaddress.IPv4Address(dns)
        except ValueError:
            raise nn.NetnsError(f"--dns: {dns!r} is not an IPv4 address") from None
    why = nn.check_support()
    if why:
        raise nn.NetnsError(f"--network netns is not available on this machine: {why}; use --network shared")
    return NetnsConfig(nn.Host(network), pod_cidr, dns)


def main(
    name: str,
    root: str,
    cpus: int | None,
    memory_gi: int,
    network: str = "shared",
    pod_cidr: str | None = None,
    dns: str | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if network not in lp.NETWORKS:
        log.error("--network: %r is not one of %s", network, ", ".join(lp.NETWORKS))
        return 2
    if network == "shared" and (pod_cidr or dns):
        log.error("--pod-cidr and --dns apply to --network netns only")
        return 2
    netns: NetnsConfig | None = None
    if network == "netns":
        try:
            netns = netns_config(pod_cidr, dns, dict(os.environ))
        except nn.NetnsError as e:
            log.error("%s", e)
            return 2
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    agent = NodeAgent(name, Path(root), cpus or os.cpu_count() or 2, memory_gi, netns=netns)

    def on_signal(signum: int, _frame: Any) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0
