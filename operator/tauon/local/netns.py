"""Per-pod network namespaces for the process node (`tauon node --network netns`).

Every pod gets a network namespace of its own (loopback + `eth0`, an address from its node's pod
subnet), joined by a veth to one Linux bridge that every process node of this machine shares, so each
node is a "host" and its pods reach the other nodes' pods over the bridge. The bridge carries the
network's first address on the host (its connected route is the only route added): the host (operator,
tests, SDK) reaches pod IPs directly. No NAT, no default route in a pod: traffic stays on the bridge and
the loopbacks. Names resolve through the cluster DNS written into the pod's /etc/resolv.conf; its
hostname is set in a UTS namespace of its own and /etc/hosts carries its FQDN, as a kubelet does.

Pure part (unit-tested): naming, subnet and address allocation, the resolv.conf/hosts texts and the argv
that enters a pod's namespaces. I/O part: `Host` creates and removes bridge, namespaces, veths and the
/etc/netns/<ns> files (which `ip netns exec` bind-mounts over /etc in a mount namespace of the pod's own),
keeping a record of each under a state directory first, so a node restarted after SIGKILL removes its
leftovers (`Host.cleanup_node`). The bridge goes when its last holder (node or DNS server) releases it.

    python -m tauon.local.netns check                      can this machine create namespaces?
    python -m tauon.local.netns hold   --holder ID --pid P  ensure the bridge; P (alive) holds it
    python -m tauon.local.netns release --holder ID         drop a holder; the last one removes the bridge
    python -m tauon.local.netns cleanup --node NAME         remove a node's namespaces (--all: every one)
    python -m tauon.local.netns link   --netns NS up|down   a pod's link (a network partition)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from tauon.api.names import Manifest

DEFAULT_NETWORK = "10.213.0.0/16"  # not a Docker, kind, k3s, Calico or Flannel default
NETWORK_ENV = "TAUON_POD_NETWORK"
STATE_ENV = "TAUON_NETNS_STATE"
DEFAULT_STATE = "/run/tauon-netns"
NETNS_ETC = Path("/etc/netns")
CLUSTER_DOMAIN = "cluster.local"
NETNS_PREFIX = "tauon-"
VETH_PREFIX = "tv"
IFNAMSIZ = 15
# A pod's namespace fails a TCP connection whose peer stopped answering after ~12 s (5 retransmissions)
# instead of the kernel's ~15 min, so a partitioned gang errors out and restarts promptly, as a cluster's
# collective timeout would make it (gloo's own default is 30 min). Per namespace: the host is untouched.
TCP_RETRIES2 = 5


class NetnsError(ValueError):
    """Bad network configuration, or this machine cannot create network namespaces."""


# -- pure: configuration, names, allocation --------------------------------------------------------------
def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_network(text: str, field: str = "network") -> ipaddress.IPv4Network:
    """The bridge's network: an IPv4 CIDR of prefix /8 to /22 (room for /24 node subnets)."""
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as e:
        raise NetnsError(f"{field}: {text!r} is not an IPv4 network in CIDR form ({e})") from None
    if not 8 <= net.prefixlen <= 22:
        raise NetnsError(f"{field}: {text!r} must have a prefix between /8 and /22, got /{net.prefixlen}")
    if net.is_loopback or net.is_link_local or net.is_multicast:
        raise NetnsError(f"{field}: {text!r} is a loopback, link-local or multicast range")
    return net


def parse_pod_cidr(
    text: str, network: ipaddress.IPv4Network, field: str = "--pod-cidr"
) -> ipaddress.IPv4Network:
    """A node's pod subnet: a CIDR of /16 to /28 inside the bridge's network, not the bridge's own."""
    try:
        sub = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as e:
        raise NetnsError(f"{field}: {text!r} is not an IPv4 network in CIDR form ({e})") from None
    if not 16 <= sub.prefixlen <= 28:
        raise NetnsError(f"{field}: {text!r} must have a prefix between /16 and /28, got /{sub.prefixlen}")
    if not sub.subnet_of(network) or sub == network:
        raise NetnsError(f"{field}: {text!r} is not a subnet inside the pod network {network}")
    if gateway(network) in sub:
        raise NetnsError(f"{field}: {text!r} holds the bridge's address {gateway(network)}; pick another")
    return sub


def network_for(pod_cidr: str | None, env: dict[str, str]) -> ipaddress.IPv4Network:
    """The bridge's network: $TAUON_POD_NETWORK, else the /16 around --pod-cidr, else the default."""
    if env.get(NETWORK_ENV):
        return parse_network(env[NETWORK_ENV], NETWORK_ENV)
    if pod_cidr:
        try:
            sub = ipaddress.IPv4Network(pod_cidr.strip(), strict=False)
        except ValueError as e:
            raise NetnsError(f"--pod-cidr: {pod_cidr!r} is not an IPv4 network in CIDR form ({e})") from None
        return sub.supernet(new_prefix=16) if sub.prefixlen > 16 else sub
    return parse_network(DEFAULT_NETWORK)


def gateway(network: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The bridge's address on the host (also where the cluster DNS listens): the network's first host."""
    return network.network_address + 1


def bridge_name(network: ipaddress.IPv4Network) -> str:
    """One bridge per pod network, shared by every node of the machine that uses that network."""
    return f"tauon{_digest(str(network))[:8]}"


def node_tag(node: str) -> str:
    return _digest(node)[:5]


def subnet_candidates(
    network: ipaddress.IPv4Network, node: str, prefix: int = 24
) -> list[ipaddress.IPv4Network]:
    """A node's possible /24s, in an order derived from its name (so a restarted node gets its own back);
    the subnet holding the bridge's address is never offered."""
    subs = [s for s in network.subnets(new_prefix=prefix) if gateway(network) not in s]
    if not subs:
        raise NetnsError(f"pod network {network} has no /{prefix} subnet besides the bridge's")
    start = int(_digest(node), 16) % len(subs)
    return subs[start:] + subs[:start]


def pick_subnet(
    network: ipaddress.IPv4Network, node: str, taken: dict[str, str], prefix: int = 24
) -> ipaddress.IPv4Network:
    """The first candidate subnet not taken by another node (taken: subnet -> node holding it)."""
    for sub in subnet_candidates(network, node, prefix):
        if taken.get(str(sub), node) == node:
            return sub
    raise NetnsError(f"pod network {network}: every /{prefix} is taken by another node")


def pick_ip(
    subnet: ipaddress.IPv4Network, uid: str, used: Collection[str], avoid: Collection[str] = ()
) -> str:
    """A pod's address: derived from its uid (stable), the next free one on a collision."""
    hosts = [str(h) for h in subnet.hosts() if str(h) not in avoid]
    if not hosts:
        raise NetnsError(f"pod subnet {subnet} has no host addresses")
    start = int(_digest(uid), 16) % len(hosts)
    for i in range(len(hosts)):
        ip = hosts[(start + i) % len(hosts)]
        if ip not in used:
            return ip
    raise NetnsError(f"pod subnet {subnet} is full ({len(hosts)} pods)")


@dataclass(frozen=True)
class PodNames:
    netns: str  # /run/netns/<netns>, /etc/netns/<netns>
    veth: str  # the host side, enslaved to the bridge; the pod side is eth0 in the namespace


def pod_names(node: str, uid: str) -> PodNames:
    """Deterministic names with the node's tag as a prefix, so a node finds its own leftovers."""
    tag, pod = node_tag(node), _digest(uid)[:8]
    veth = f"{VETH_PREFIX}{tag}{pod}"
    assert len(veth) <= IFNAMSIZ
    return PodNames(netns=f"{NETNS_PREFIX}{tag}-{pod}", veth=veth)


def node_prefixes(node: str) -> tuple[str, str]:
    """(netns name prefix, host veth prefix) of every namespace and veth this node creates."""
    tag = node_tag(node)
    return f"{NETNS_PREFIX}{tag}-", f"{VETH_PREFIX}{tag}"


def pod_hostname(pod: Manifest) -> str:
    """spec.hostname, else the pod's name (at most 63 characters), as a kubelet sets it."""
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")


def resolv_conf(dns: str, namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    """A ClusterFirst pod's resolv.conf."""
    ipaddress.IPv4Address(dns)
    return f"search {namespace}.svc.{domain} svc.{domain} {domain}\nnameserver {dns}\noptions ndots:5\n"


def hosts_file(pod: Manifest, ip: str, domain: str = CLUSTER_DOMAIN) -> str:
    """The kubelet-managed /etc/hosts: localhost and the pod's own name(s) at its IP."""
    host = pod_hostname(pod)
    sub = pod["spec"].get("subdomain")
    ns = pod["metadata"].get("namespace", "default")
    names = f"{host}.{sub}.{ns}.svc.{domain}\t{host}" if sub else host
    return (
        "# Kubernetes-managed hosts file (tauon node).\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"{ip}\t{names}\n"
    )


def enter_argv(netns: str, hostname: str, argv: list[str]) -> list[str]:
    """argv run inside the pod's network namespace (and, through `ip netns exec`, a mount namespace with
    /etc/netns/<netns>/{resolv.conf,hosts} over /etc) and a UTS namespace named after the pod. Every step
    execs, so the process started is the container's process."""
    return [
        "ip",
        "netns",
        "exec",
        netns,
        "unshare",
        "--uts",
        "sh",
        "-c",
        'printf %s "$0" > /proc/sys/kernel/hostname && exec "$@"',
        hostname,
        *argv,
    ]


# -- I/O ---------------------------------------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


def check_support() -> str | None:
    """None when this machine lets us create network namespaces and bridges; else why not."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "the `ip` (iproute2) and `unshare` (util-linux) commands are needed"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return (
            f"cannot create a network namespace ({r.stderr.strip()}): needs CAP_NET_ADMIN and CAP_SYS_ADMIN"
        )
    try:
        r = _ip("link", "add", f"{VETH_PREFIX}probe{os.getpid() % 10**6}", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge ({r.stderr.strip()}): needs CAP_NET_ADMIN"
        _ip("link", "del", f"{VETH_PREFIX}probe{os.getpid() % 10**6}", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class PodNet:
    names: PodNames
    ip: str
    node: str


class Host:
    """The namespaces of one pod network on this machine, with their records under state/<bridge>/."""

    def __init__(self, network: ipaddress.IPv4Network, state: Path | None = None):
        self.network = network
        self.bridge = bridge_name(network)
        self.gateway = str(gateway(network))
        root = state or Path(os.environ.get(STATE_ENV) or DEFAULT_STATE)
        self.dir = root / self.bridge
        (self.dir / "holders").mkdir(parents=True, exist_ok=True)
        (self.dir / "pods").mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # holders of the bridge (nodes with their subnet, the DNS server)
    def _holders(self) -> dict[str, Manifest]:
        out = {}
        for p in (self.dir / "holders").glob("*.json"):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return out

    def _ensure_bridge(self) -> None:
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
        addrs = _ip("-o", "-4", "addr", "show", "dev", self.bridge).stdout
        if f" {self.gateway}/" not in addrs:
            _ip("addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def hold(self, holder: str, pid: int, subnet: str | None = None) -> ipaddress.IPv4Network | None:
        """Ensure the bridge and record that pid (while alive) holds it. For a node (subnet "auto" or a
        CIDR) also claim its pod subnet: its previous one after a restart, never another node's."""
        with self._lock():
            holders = self._holders()
            live = {h: v for h, v in holders.items() if _alive(int(v["pid"]), v.get("start"))}
            claimed: ipaddress.IPv4Network | None = None
            if subnet is not None:
                taken = {str(v["subnet"]): h for h, v in live.items() if v.get("subnet") and h != holder}
                if subnet == "auto":
                    prev = (holders.get(holder) or {}).get("subnet")
                    if prev and str(prev) not in taken:
                        claimed = ipaddress.IPv4Network(prev)
                    else:
                        claimed = pick_subnet(self.network, holder, taken)
                else:
                    claimed = parse_pod_cidr(subnet, self.network)
                    clash = [h for s, h in taken.items() if ipaddress.IPv4Network(s).overlaps(claimed)]
                    if clash:
                        raise NetnsError(f"--pod-cidr: {subnet} overlaps node {clash[0]}'s pod subnet")
            self._ensure_bridge()
            rec: Manifest = {"pid": pid, "start": _start_time(pid)}
            if claimed is not None:
                rec["subnet"] = str(claimed)
            _write_json(self.dir / "holders" / f"{holder}.json", rec)
            return claimed

    def release(self, holder: str) -> bool:
        """Drop a holder; the bridge is removed when no live holder remains. True when it was removed."""
        with self._lock():
            (self.dir / "holders" / f"{holder}.json").unlink(missing_ok=True)
            live = [v for v in self._holders().values() if _alive(int(v["pid"]), v.get("start"))]
            if live or any((self.dir / "pods").glob("*.json")):
                return False
            _ip("link", "del", self.bridge, check=False)
            return True

    # pods
    def used_ips(self) -> set[str]:
        used = set()
        for p in (self.dir / "pods").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                used.add(str(json.loads(p.read_text())["ip"]))
        return used

    def setup_pod(self, node: str, pod: Manifest, subnet: ipaddress.IPv4Network, dns: str | None) -> PodNet:
        """Create the pod's namespace, veth on the bridge and address, and its /etc/netns files. The record
        is written before anything is created, so a crash at any point leaves nothing unremovable."""
        uid = pod["metadata"]["uid"]
        names = pod_names(node, uid)
        with self._lock():
            self._teardown(names)  # a leftover of the same pod (its node restarted)
            ip = pick_ip(subnet, uid, self.used_ips(), avoid={self.gateway})
            _write_json(
                self.dir / "pods" / f"{names.netns}.json",
                {"node": node, "netns": names.netns, "veth": names.veth, "ip": ip, "pod": pod_key(pod)},
            )
        etc = NETNS_ETC / names.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file(pod, ip))
        (etc / "resolv.conf").write_text(
            resolv_conf(dns or self.gateway, pod["metadata"].get("namespace", "default"))
        )
        try:
            _ip("netns", "add", names.netns)
            _ip("link", "add", names.veth, "type", "veth", "peer", "name", "eth0", "netns", names.netns)
            _ip("link", "set", names.veth, "master", self.bridge, "up")
            _ip("-n", names.netns, "addr", "add", f"{ip}/{self.network.prefixlen}", "dev", "eth0")
            _ip("-n", names.netns, "link", "set", "lo", "up")
            _ip("-n", names.netns, "link", "set", "eth0", "up")
            r = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    names.netns,
                    "sysctl",
                    "-qw",
                    f"net.ipv4.tcp_retries2={TCP_RETRIES2}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode != 0:
                raise NetnsError(f"net.ipv4.tcp_retries2 in {names.netns}: {r.stderr.strip()}")
        except NetnsError:
            self.teardown_pod(names)
            raise
        return PodNet(names, ip, node)

    def _teardown(self, names: PodNames) -> None:
        r = _ip("netns", "pids", names.netns, check=False)
        pids = [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []
        for pid in pids:  # processes left in the namespace (their node was SIGKILLed) go with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and any(_start_time(p) for p in pids):
            time.sleep(0.05)
        _ip("netns", "del", names.netns, check=False)
        _ip("link", "del", names.veth, check=False)  # gone with the namespace, unless its deletion lags
        shutil.rmtree(NETNS_ETC / names.netns, ignore_errors=True)
        (self.dir / "pods" / f"{names.netns}.json").unlink(missing_ok=True)

    def teardown_pod(self, names: PodNames) -> None:
        with self._lock():
            self._teardown(names)

    def cleanup_node(self, node: str | None) -> list[str]:
        """Remove every namespace and veth of node (None: of every node) that records or names show:
        what a SIGKILLed node left behind. Returns the namespaces removed."""
        ns_prefix, veth_prefix = node_prefixes(node) if node else (NETNS_PREFIX, VETH_PREFIX)
        found: dict[str, PodNames] = {}
        for p in (self.dir / "pods").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(p.read_text())
                if node is None or rec["node"] == node:
                    found[rec["netns"]] = PodNames(rec["netns"], rec["veth"])
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(ns_prefix) and not name.startswith(f"{NETNS_PREFIX}probe-"):
                tag_pod = name[len(NETNS_PREFIX) :].replace("-", "")
                found.setdefault(name, PodNames(name, f"{VETH_PREFIX}{tag_pod}"))
        with self._lock():
            for names in found.values():
                self._teardown(names)
            for line in _ip("-o", "link", "show", "master", self.bridge, check=False).stdout.splitlines():
                parts = line.split(":")
                dev = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
                if dev.startswith(veth_prefix):
                    _ip("link", "del", dev, check=False)
        if node is not None:
            with contextlib.suppress(OSError):
                for d in NETNS_ETC.glob(f"{ns_prefix}*"):
                    shutil.rmtree(d, ignore_errors=True)
        return sorted(found)

    def set_link(self, netns: str, up: bool) -> None:
        """A pod's link up or down (down = the pod is partitioned from every other pod and the host)."""
        rec = self.dir / "pods" / f"{netns}.json"
        if not rec.exists():
            raise NetnsError(f"--netns: no pod namespace {netns} on bridge {self.bridge}")
        veth = json.loads(rec.read_text())["veth"]
        _ip("link", "set", veth, "up" if up else "down")

    def pods(self) -> list[Manifest]:
        out = []
        for p in sorted((self.dir / "pods").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(p.read_text()))
        return out


def pod_key(pod: Manifest) -> str:
    return f"{pod['metadata'].get('namespace', 'default')}/{pod['metadata']['name']}"


def _write_json(path: Path, data: Manifest) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauon.local.netns", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--network", default=None, help=f"the pod network (default ${NETWORK_ENV} or {DEFAULT_NETWORK})"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    h = sub.add_parser("hold")
    h.add_argument("--holder", required=True)
    h.add_argument("--pid", type=int, required=True)
    r = sub.add_parser("release")
    r.add_argument("--holder", required=True)
    c = sub.add_parser("cleanup")
    c.add_argument("--node")
    c.add_argument("--all", action="store_true")
    ln = sub.add_parser("link")
    ln.add_argument("--netns", required=True)
    ln.add_argument("state", choices=("up", "down"))
    a = p.parse_args(argv)
    try:
        if a.cmd == "check":
            why = check_support()
            print(why or "ok")
            return 1 if why else 0
        net = parse_network(a.network, "--network") if a.network else network_for(None, dict(os.environ))
        host = Host(net)
        if a.cmd == "hold":
            host.hold(a.holder, a.pid)
            print(host.gateway)
        elif a.cmd == "release":
            host.release(a.holder)
        elif a.cmd == "cleanup":
            if not a.all and not a.node:
                p.error("cleanup: give --node NAME or --all")
            for name in host.cleanup_node(None if a.all else a.node):
                print(name)
            if a.all:
                host.release("")
        else:
            host.set_link(a.netns, a.state == "up")
    except NetnsError as e:
        print(f"tauon netns: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
