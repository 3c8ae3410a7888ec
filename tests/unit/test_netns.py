"""The pure part of `tauon node --network netns` (tauon.local.netns) and the netns mode of process.prepare."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tauon.local import netns as nn
from tauon.local import process as lp

NET = ipaddress.IPv4Network("10.213.0.0/16")


def pod(name: str = "job-a0-r0", uid: str = "u-1", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": uid},
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "command": ["torchrun"],
                    "args": ["-m", "tauon_train.train"],
                    "env": [
                        {"name": "MASTER_ADDR", "value": "job-a0-r0.job"},
                        {"name": "PET_MASTER_ADDR", "value": "job-a0-r0.job"},
                        {"name": "MASTER_PORT", "value": "29500"},
                        {"name": "PET_MASTER_PORT", "value": "29500"},
                        {"name": "TAUON_METRICS_PORT", "value": "9090"},
                    ],
                    "ports": [
                        {"name": "dist", "containerPort": 29500},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                }
            ],
            **spec,
        },
    }


def test_network_parsing_names_the_field() -> None:
    assert nn.parse_network("10.213.0.0/16") == NET
    with pytest.raises(nn.NetnsError, match="TAUON_POD_NETWORK: 'nope' is not an IPv4 network"):
        nn.parse_network("nope", "TAUON_POD_NETWORK")
    with pytest.raises(nn.NetnsError, match="prefix between /8 and /22"):
        nn.parse_network("10.0.0.0/24")
    with pytest.raises(nn.NetnsError, match="loopback"):
        nn.parse_network("127.0.0.0/8")
    with pytest.raises(nn.NetnsError, match="--pod-cidr: '10.9.1.0/24' is not a subnet inside"):
        nn.parse_pod_cidr("10.9.1.0/24", NET)
    with pytest.raises(nn.NetnsError, match="holds the bridge's address 10.213.0.1"):
        nn.parse_pod_cidr("10.213.0.0/24", NET)
    assert nn.parse_pod_cidr("10.213.7.0/24", NET) == ipaddress.IPv4Network("10.213.7.0/24")


def test_network_for_env_then_pod_cidr_then_default() -> None:
    assert nn.network_for(None, {}) == NET
    assert nn.network_for("10.77.3.0/24", {}) == ipaddress.IPv4Network("10.77.0.0/16")
    assert nn.network_for("10.77.3.0/24", {nn.NETWORK_ENV: "10.80.0.0/12"}) == ipaddress.IPv4Network(
        "10.80.0.0/12"
    )
    with pytest.raises(nn.NetnsError, match="--pod-cidr"):
        nn.network_for("x", {})


def test_gateway_and_bridge_name() -> None:
    assert str(nn.gateway(NET)) == "10.213.0.1"
    b = nn.bridge_name(NET)
    assert b == nn.bridge_name(ipaddress.IPv4Network("10.213.0.0/16")) and len(b) <= nn.IFNAMSIZ
    assert b != nn.bridge_name(ipaddress.IPv4Network("10.214.0.0/16"))


def test_subnets_are_stable_per_node_and_never_shared() -> None:
    a = nn.pick_subnet(NET, "node-a", {})
    assert a == nn.pick_subnet(NET, "node-a", {}) and a.prefixlen == 24
    assert nn.gateway(NET) not in a
    # another node holding a's subnet pushes a to its next candidate; its own claim is kept
    b = nn.pick_subnet(NET, "node-a", {str(a): "node-b"})
    assert b != a
    assert nn.pick_subnet(NET, "node-a", {str(a): "node-a"}) == a
    small = ipaddress.IPv4Network("10.1.0.0/22")  # four /24s, one holds the bridge: three to give
    taken: dict[str, str] = {}
    for i in range(3):
        taken[str(nn.pick_subnet(small, f"n{i}", taken))] = f"n{i}"
    assert len(taken) == 3
    with pytest.raises(nn.NetnsError, match="every /24 is taken"):
        nn.pick_subnet(small, "n3", taken)


def test_pod_ips_are_derived_from_the_uid_and_collision_free() -> None:
    sub = ipaddress.IPv4Network("10.213.5.0/24")
    ip = nn.pick_ip(sub, "uid-1", set())
    assert ip == nn.pick_ip(sub, "uid-1", set()) and ipaddress.IPv4Address(ip) in sub
    assert nn.pick_ip(sub, "uid-1", {ip}) != ip
    tiny = ipaddress.IPv4Network("10.213.5.0/30")  # two hosts
    used: set[str] = set()
    for i in range(2):
        used.add(nn.pick_ip(tiny, f"u{i}", used))
    assert used == {"10.213.5.1", "10.213.5.2"}
    with pytest.raises(nn.NetnsError, match="is full"):
        nn.pick_ip(tiny, "u3", used)
    assert nn.pick_ip(tiny, "u", set(), avoid={"10.213.5.1"}) == "10.213.5.2"


def test_names_fit_the_kernel_limits_and_carry_the_node_prefix() -> None:
    n = nn.pod_names("tauon-node-with-a-very-long-name", "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab")
    ns_prefix, veth_prefix = nn.node_prefixes("tauon-node-with-a-very-long-name")
    assert len(n.veth) <= nn.IFNAMSIZ and n.veth.startswith(veth_prefix)
    assert n.netns.startswith(ns_prefix) and "/" not in n.netns
    assert n != nn.pod_names("tauon-node-with-a-very-long-name", "another-uid")
    assert nn.node_prefixes("a") != nn.node_prefixes("b")


def test_resolv_conf_is_a_cluster_first_pods() -> None:
    text = nn.resolv_conf("10.213.0.1", "team")
    assert text.splitlines() == [
        "search team.svc.cluster.local svc.cluster.local cluster.local",
        "nameserver 10.213.0.1",
        "options ndots:5",
    ]
    with pytest.raises(ValueError):
        nn.resolv_conf("not-an-ip", "team")


def test_hosts_file_carries_the_pods_fqdn() -> None:
    text = nn.hosts_file(pod(hostname="job-a0-r0", subdomain="job"), "10.213.5.9")
    assert "10.213.5.9\tjob-a0-r0.job.team.svc.cluster.local\tjob-a0-r0" in text
    assert "127.0.0.1\tlocalhost" in text
    assert nn.hosts_file(pod(name="plain"), "10.213.5.9").splitlines()[-1] == "10.213.5.9\tplain"
    assert nn.pod_hostname(pod(name="x" * 70)) == "x" * 63


def test_enter_argv_execs_the_container_in_the_pods_namespaces() -> None:
    argv = nn.enter_argv("tauon-abcde-01234567", "job-a0-r0", ["/venv/bin/torchrun", "-m", "x"])
    assert argv[:4] == ["ip", "netns", "exec", "tauon-abcde-01234567"]
    assert argv[4:6] == ["unshare", "--uts"]
    assert "exec" in argv[8] and argv[9] == "job-a0-r0" and argv[-3:] == ["/venv/bin/torchrun", "-m", "x"]


def test_prepare_netns_keeps_env_and_ports_as_rendered(tmp_path: Path) -> None:
    prep = lp.prepare(pod(), {}, tmp_path, lp.PortMap(), network="netns")
    assert prep.env["MASTER_ADDR"] == "job-a0-r0.job" and prep.env["PET_MASTER_ADDR"] == "job-a0-r0.job"
    assert prep.env["MASTER_PORT"] == "29500" and prep.env["TAUON_METRICS_PORT"] == "9090"
    assert prep.ports == {"dist": 29500, "metrics": 9090}
    shared = lp.prepare(pod(), {}, tmp_path / "s", lp.PortMap())
    assert shared.env["MASTER_ADDR"] == "127.0.0.1" and shared.ports["dist"] != 29500
    with pytest.raises(ValueError, match="network: 'bogus'"):
        lp.prepare(pod(), {}, tmp_path, lp.PortMap(), network="bogus")


def test_prepare_netns_keeps_the_servers_port_flags(tmp_path: Path) -> None:
    p = pod()
    c = p["spec"]["containers"][0]
    c["command"], c["args"] = (
        ["python", "-m", "tauon_serve.serve"],
        ["--port", "8080", "--health-port", "8081"],
    )
    c["ports"] = [{"name": "http", "containerPort": 8080}, {"name": "health", "containerPort": 8081}]
    prep = lp.prepare(p, {}, tmp_path, lp.PortMap(), network="netns")
    assert prep.argv[-4:] == ["--port", "8080", "--health-port", "8081"]
    assert prep.ports == {"http": 8080, "health": 8081}
