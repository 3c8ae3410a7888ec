#!/usr/bin/env python3
"""A real local Kubernetes control plane without Docker: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (fake nodes), built from the Go module proxy by build.sh.

    cluster.py up   [--dir .cluster] [--process-nodes N]   build (first time), start, wait healthy,
                                                           write DIR/kubeconfig
    cluster.py down [--dir .cluster]   stop what `up` started (by PID) and remove DIR
    cluster.py env  [--dir .cluster]   print KUBECONFIG=... and PATH=... for a shell

Everything listens on 127.0.0.1 on free ports, so several clusters (a developer's and the tests') can run
side by side. Standard library only: the pytest fixture imports this module.

--process-nodes N (make cluster-up PROCESS_NODES=N) also starts CoreDNS (hack/dns/build.sh; its
kubernetes plugin watches this API server) on the pod network's bridge address and N process nodes
`tauon node --network netns` (tauon-node-0..N-1): every pod gets a network namespace and an IP of its
own on the bridge (pod network $TAUON_POD_NETWORK, default 10.213.0.0/16), so a gang spans nodes and
rendezvous through cluster DNS. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Fake nodes: GPU nodes advertise 8 GPUs and carry the usual taint; CPU nodes are plain.
GPU_NODES = 4
CPU_NODES = 2
FAKE_ANNOTATION = "kwok.x-k8s.io/node"
POD_NETWORK = os.environ.get("TAUON_POD_NETWORK") or "10.213.0.0/16"  # tauon.local.netns.DEFAULT_NETWORK
VENV_BIN = REPO / ".venv" / "bin"


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build() -> Path:
    out = subprocess.run(["bash", str(HERE / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_dns() -> Path:
    """hack/dns/build.sh: CoreDNS at the pinned version, cached outside git. Returns its bin dir."""
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "dns" / "build.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def tauon_python() -> str:
    """The interpreter with tauon installed (the repo's venv; `make cluster-down` runs system python3)."""
    return str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable


def netns(network: str, *args: str, check: bool = True) -> str:
    """`python -m tauon.local.netns --network NETWORK ARGS` (bridge holders, cleanup)."""
    r = subprocess.run(
        [tauon_python(), "-m", "tauon.local.netns", "--network", network, *args],
        capture_output=True,
        text=True,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"tauon.local.netns {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def dns_holder(d: Path) -> str:
    return "dns-" + hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:8]


def corefile(gateway: str, kubeconfig: Path, ready_port: int) -> str:
    """CoreDNS serving cluster.local (Services, headless Services' pods, pod A records) from the API
    server, on the bridge's address only; nothing is forwarded (pods have no way out anyway)."""
    return (
        ".:53 {\n"
        f"    bind {gateway}\n"
        "    errors\n"
        f"    ready 127.0.0.1:{ready_port}\n"
        "    kubernetes cluster.local in-addr.arpa {\n"
        f"        kubeconfig {kubeconfig} tauon-local\n"
        "        pods verified\n"
        "        ttl 5\n"
        "    }\n"
        "}\n"
    )


def start_dns(d: Path, kubeconfig: Path, network: str = POD_NETWORK) -> tuple[int, str]:
    """Start CoreDNS for this control plane on the pod network's bridge address (port 53), holding the
    bridge while it runs. Returns (pid, the DNS address for pods). Stop it with stop_dns."""
    d = d.resolve()
    (d / "logs").mkdir(parents=True, exist_ok=True)
    dns_bin = build_dns() / "coredns"
    holder = dns_holder(d)
    gateway = netns(network, "hold", "--holder", holder, "--pid", str(os.getpid()))
    ready_port = free_port()
    (d / "Corefile").write_text(corefile(gateway, kubeconfig, ready_port))
    logf = open(d / "logs" / "coredns.log", "ab")
    p = subprocess.Popen(
        [str(dns_bin), "-conf", str(d / "Corefile"), "-dns.port", "53"],
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=d,
    )
    netns(network, "hold", "--holder", holder, "--pid", str(p.pid))
    wait_for(
        "coredns",
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/ready", timeout=2).status == 200,
        60,
        d,
        "coredns.log",
    )
    return p.pid, gateway


def stop_dns(d: Path, pid: int, network: str = POD_NETWORK) -> None:
    _stop_pids([pid], 10)
    netns(network, "release", "--holder", dns_holder(d), check=False)


def sh(*args: str, cwd: Path) -> None:
    subprocess.run(list(args), check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_pki(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=tauon-local-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    (pki / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    for name, subj, ext in (
        ("server", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=admin", None),
    ):
        sh(
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subj,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=pki,
        )
        cmd = [
            "openssl",
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            f"{name}.crt",
        ]
        if ext:
            cmd += ["-extfile", ext]
        sh(*cmd, cwd=pki)
    sh("openssl", "genrsa", "-out", "sa.key", "2048", cwd=pki)
    sh("openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, pki: Path, server: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tauon-local",
                "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")},
            }
        ],
        "contexts": [{"name": "tauon-local", "context": {"cluster": "tauon-local", "user": "admin"}}],
        "current-context": "tauon-local",
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)


class State:
    def __init__(self, d: Path):
        self.dir = d
        self.file = d / "state.json"

    def load(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.exists() else {"pids": {}}

    def save(self, data: dict) -> None:
        self.file.write_text(json.dumps(data, indent=2))


def start(name: str, cmd: list[str], d: Path, st: dict, state: State, env: dict | None = None) -> None:
    logf = open(d / "logs" / f"{name}.log", "ab")
    p = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
    )
    st["pids"][name] = p.pid
    state.save(st)


def wait_for(what: str, check, timeout: float, d: Path, logname: str | None = None) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:
            last = e
        time.sleep(0.3)
    tail = ""
    if logname and (d / "logs" / logname).exists():
        tail = "\n".join((d / "logs" / logname).read_text(errors="replace").splitlines()[-30:])
    raise SystemExit(f"{what} not healthy after {timeout:.0f}s ({last})\n{tail}")


def kubectl(bin_dir: Path, kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(
        [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def node_manifest(name: str, gpus: int) -> dict:
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        "tauon.dev/test-node": "true",
    }
    spec: dict = {}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {FAKE_ANNOTATION: "fake"}},
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def up(d: Path, process_nodes: int = 0, network: str = POD_NETWORK) -> Path:
    d = d.resolve()
    kubeconfig = d / "kubeconfig"
    state = State(d)
    if state.file.exists() and all(_alive(p) for p in state.load()["pids"].values()):
        log(f"already running: {kubeconfig}")
        return kubeconfig
    if d.exists():
        down(d)
    t0 = time.time()
    bin_dir = build()
    log(f"binaries ready in {time.time() - t0:.1f}s ({bin_dir})")
    (d / "logs").mkdir(parents=True, exist_ok=True)
    pki = d / "pki"
    make_pki(pki)
    st = {"pids": {}, "bin": str(bin_dir)}
    state.save(st)

    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    start(
        "etcd",
        [
            str(bin_dir / "etcd"),
            "--name",
            "tauon",
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster",
            f"tauon=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
            "--quota-backend-bytes",
            str(2 * 1024**3),
        ],
        d,
        st,
        state,
    )
    wait_for(
        "etcd",
        lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=2).status == 200,
        60,
        d,
        "etcd.log",
    )

    server = f"https://127.0.0.1:{api_port}"
    start(
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            "--etcd-servers",
            etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(api_port),
            "--tls-cert-file",
            str(pki / "server.crt"),
            "--tls-private-key-file",
            str(pki / "server.key"),
            "--client-ca-file",
            str(pki / "ca.crt"),
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(pki / "sa.pub"),
            "--service-account-signing-key-file",
            str(pki / "sa.key"),
            "--service-cluster-ip-range",
            "10.96.0.0/16",
            "--authorization-mode",
            "RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            "--cert-dir",
            str(d / "apiserver-certs"),
        ],
        d,
        st,
        state,
    )
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    wait_for(
        "kube-apiserver",
        lambda: urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=3).status == 200,
        120,
        d,
        "kube-apiserver.log",
    )
    write_kubeconfig(kubeconfig, pki, server)

    start(
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            "--kubeconfig",
            str(kubeconfig),
            "--authentication-kubeconfig",
            str(kubeconfig),
            "--authorization-kubeconfig",
            str(kubeconfig),
            "--service-account-private-key-file",
            str(pki / "sa.key"),
            "--root-ca-file",
            str(pki / "ca.crt"),
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=false",
            "--concurrent-gc-syncs=5",
            "--node-monitor-grace-period=120s",
            "--horizontal-pod-autoscaler-sync-period=5s",
            "--v=1",
        ],
        d,
        st,
        state,
    )
    start(
        "kube-scheduler",
        [
            str(bin_dir / "kube-scheduler"),
            "--kubeconfig",
            str(kubeconfig),
            "--authentication-kubeconfig",
            str(kubeconfig),
            "--authorization-kubeconfig",
            str(kubeconfig),
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ],
        d,
        st,
        state,
    )
    start(
        "kwok",
        [
            str(bin_dir / "kwok"),
            "--kubeconfig",
            str(kubeconfig),
            "--config",
            str(HERE / "kwok-stages.yaml"),
            "--manage-all-nodes=false",
            # kwok renews each node's Lease (cheap) so the node controller sees heartbeats even when the
            # API server is slow under load; without, node status updates lagged past the 120 s grace
            # period in bench/scale and every pod on the node flipped to NotReady
            "--node-lease-duration-seconds=40",
            f"--manage-nodes-with-annotation-selector={FAKE_ANNOTATION}=fake",
            "--cidr=10.244.0.1/16",
            "--node-ip=10.0.0.1",
            "--server-address",
            f"127.0.0.1:{free_port()}",
        ],
        d,
        st,
        state,
    )

    nodes = [node_manifest(f"gpu-node-{i}", 8) for i in range(GPU_NODES)]
    nodes += [node_manifest(f"cpu-node-{i}", 0) for i in range(CPU_NODES)]
    kubectl(bin_dir, kubeconfig, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(n) for n in nodes))

    def nodes_ready() -> bool:
        out = kubectl(bin_dir, kubeconfig, "get", "nodes", "-o", "json")
        items = json.loads(out)["items"]
        ready = [
            n
            for n in items
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        ]
        return len(ready) >= GPU_NODES + CPU_NODES

    wait_for("kwok nodes", nodes_ready, 60, d, "kwok.log")

    def default_sa() -> bool:
        kubectl(bin_dir, kubeconfig, "get", "serviceaccount", "default", "-n", "default")
        return True

    wait_for("default ServiceAccount", default_sa, 60, d, "kube-controller-manager.log")
    if process_nodes:
        start_process_nodes(d, kubeconfig, bin_dir, process_nodes, network, st, state)
    log(f"control plane up in {time.time() - t0:.1f}s: export KUBECONFIG={kubeconfig}")
    return kubeconfig


def start_process_nodes(
    d: Path, kubeconfig: Path, bin_dir: Path, n: int, network: str, st: dict, state: State
) -> None:
    """CoreDNS and n `tauon node --network netns` (tauon-node-<i>), Ready on return."""
    why = netns(network, "check", check=False)
    if why != "ok":
        raise SystemExit(f"--process-nodes needs network namespaces, which this machine refuses: {why}")
    pid, gateway = start_dns(d, kubeconfig, network)
    st["pids"]["coredns"] = pid
    st["netns"] = {"network": network, "holder": dns_holder(d), "nodes": []}
    state.save(st)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TAUON_POD_NETWORK": network}
    tauon = str(VENV_BIN / "tauon") if (VENV_BIN / "tauon").exists() else "tauon"
    for i in range(n):
        name = f"tauon-node-{i}"
        st["netns"]["nodes"].append(name)
        cmd = [tauon, "node", "--network", "netns", "--name", name, "--root", str(d / "nodes" / name)]
        start(name, [*cmd, "--dns", gateway], d, st, state, env=env)

    def ready() -> bool:
        out = json.loads(
            kubectl(bin_dir, kubeconfig, "get", "nodes", "-l", "tauon.dev/node-agent=process", "-o", "json")
        )
        names = {
            n["metadata"]["name"]
            for n in out["items"]
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        }
        return set(st["netns"]["nodes"]) <= names

    wait_for(f"{n} process nodes", ready, 90, d, "tauon-node-0.log")
    log(f"{n} process nodes on pod network {network}, cluster DNS at {gateway}")


def _stop_pids(pids: list[int], grace: float) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True


def down(d: Path) -> None:
    d = d.resolve()
    state = State(d)
    if state.file.exists():
        st = state.load()
        pids = st["pids"]
        # process nodes first, while the API server is up (they stop their pods and remove their
        # namespaces), then the rest in reverse start order: clients first, etcd last
        nodes = (st.get("netns") or {}).get("nodes") or []
        _stop_pids([pids[n] for n in nodes if n in pids], 40)
        _stop_pids([pids[n] for n in reversed(list(pids)) if n not in nodes], 10)
        if st.get("netns"):  # what a node killed on the way left, and the bridge with the last holder
            net = st["netns"]["network"]
            for n in nodes:
                netns(net, "cleanup", "--node", n, check=False)
                netns(net, "release", "--holder", n, check=False)
            netns(net, "release", "--holder", st["netns"]["holder"], check=False)
    shutil.rmtree(d, ignore_errors=True)
    log(f"stopped and removed {d}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "env", "build"])
    p.add_argument("--dir", default=str(REPO / ".cluster"))
    p.add_argument(
        "--process-nodes",
        type=int,
        default=int(os.environ.get("PROCESS_NODES") or 0),
        help="up: also CoreDNS and N `tauon node --network netns` (default $PROCESS_NODES or 0)",
    )
    a = p.parse_args()
    d = Path(a.dir)
    if a.action == "build":
        print(build())
    elif a.action == "up":
        print(up(d, process_nodes=a.process_nodes))
    elif a.action == "down":
        down(d)
    else:
        st = State(d.resolve()).load()
        print(f"export KUBECONFIG={d.resolve() / 'kubeconfig'}\nexport PATH={st.get('bin', '')}:$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
