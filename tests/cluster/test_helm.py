"""The Helm chart (helm/tauon) against the real control plane: lint, render, server-side validation, install,
least-privilege RBAC, and the operator reconciling with EXACTLY the chart's permissions (a ServiceAccount
token, not the admin certificate)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Operator
from tests.cluster.test_finetunejob_controller import (
    job,
    pods,
    running_gang,
    shared_volume,
    status,
    wait_phase,
)
from tests.cluster.test_inferenceservice_controller import cond_status, deployment, tis
from tests.kube import REPO, Cluster, wait_until
from tests.net import free_port

pytestmark = pytest.mark.cluster
CHART = REPO / "helm" / "tauon"
T = 90
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def kube_version() -> str:
    """The control plane's version (hack/cluster/versions.env), for `helm template --kube-version`."""
    text = (REPO / "hack" / "cluster" / "versions.env").read_text()
    m = re.search(r"^K8S_VERSION=v?(\S+)$", text, re.M)
    assert m, "K8S_VERSION missing from hack/cluster/versions.env"
    return m.group(1)


Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def helm(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """`helm` from the control plane's bin dir, with its cache/config/data in a temporary directory."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **cluster.env,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(cluster.bin_dir / "helm"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    return run


def sets(values: dict[str, Any]) -> list[str]:
    """--set-json flags for nested values (exact types: lists, booleans, numbers)."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def render(helm: Helm, release: str, namespace: str, values: dict[str, Any] | None = None) -> list[dict]:
    r = helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version(),
        *sets(values or {}),
    )
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def dump(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_dry_run(cluster: Cluster, docs: list[dict]) -> None:
    r = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=dump(docs), check=False, timeout=120)
    assert r.returncode == 0, f"server-side validation failed:\n{r.stderr}"


# -- lint and render ---------------------------------------------------------------------------------


def test_lint(helm: Helm):
    helm("lint", "--strict", str(CHART))
    helm(
        "lint",
        "--strict",
        str(CHART),
        *sets(
            {
                "rbac.scope": "namespace",
                "watchNamespaces": ["team-a", "team-b"],
                "operator.gangScheduler": "volcano",
                "metrics.serviceMonitor.enabled": True,
                "metrics.podMonitor.enabled": True,
                "grafanaDashboard.enabled": True,
            }
        ),
    )


def test_schema_rejects_bad_values(helm: Helm):
    for bad in (
        {"rbac.scope": "everywhere"},
        {"operator.gangScheduler": "kueue"},
        {"unknownTopLevel": 1},
        {"metrics.port": 0},
        {"watchNamespaces": ["Not_A_Namespace"]},
    ):
        r = helm("template", "x", str(CHART), "--kube-version", kube_version(), *sets(bad), check=False)
        assert r.returncode != 0, f"{bad} was accepted"
        assert "schema" in r.stderr, r.stderr


def test_default_render_validates_on_the_server(cluster: Cluster, helm: Helm, namespace: str):
    docs = render(helm, "dflt", namespace)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", "Deployment", "Service", "ClusterRoleBinding"]
        + ["ClusterRole"] * 3  # the operator's, and the aggregated -edit/-view for users
        + ["CustomResourceDefinition"] * 3  # FineTuneJob, InferenceService, FineTuneSweep
        + ["Role", "RoleBinding"]  # leader election: the Lease in the release namespace
    )
    (lease_role,) = by_kind(docs, "Role")
    assert lease_role["metadata"]["namespace"] == namespace
    assert {r for rule in lease_role["rules"] for r in rule["resources"]} == {"leases"}
    server_dry_run(cluster, docs)

    # CRDs: identical to crds/ (the generated source of truth), kept on uninstall
    for crd in by_kind(docs, "CustomResourceDefinition"):
        src = yaml.safe_load((REPO / "crds" / f"{crd['metadata']['name']}.yaml").read_text())
        assert crd["spec"] == src["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert src["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()

    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--namespace" not in " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_rendered_args_are_the_operator_cli(helm: Helm):
    """Every flag the chart renders is one `tauon operator` accepts, with the value it means."""
    from tauon.cli import build_parser
    from tauon.render.config import OperatorConfig

    docs = render(
        helm,
        "cli",
        "tauon-system",
        {
            "watchNamespaces": ["a", "b"],
            "operator.gangScheduler": "volcano",
            "operator.gangSchedulerName": "vc",
            "operator.clusterDomain": "corp.local",
            "operator.allowHostPaths": True,
            "operator.period": 2.5,
            "operator.verbose": True,
            "operator.defaultImage": "r/t:1",
            "operator.vllmImage": "r/vllm:2",
        },
    )
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container  # the image's ENTRYPOINT is ["tauon", "operator"]
    args = build_parser().parse_args(["operator", *container["args"]])
    assert args.namespace == ["a", "b"]
    assert (args.metrics_port, args.metrics_address) == (8080, "0.0.0.0")
    assert (args.health_port, args.health_address) == (8081, "0.0.0.0")
    assert (args.gang_scheduler, args.gang_scheduler_name) == ("volcano", "vc")
    assert args.cluster_domain == "corp.local" and args.allow_host_paths and args.verbose
    assert args.period == 2.5 and args.default_image == "r/t:1"
    assert args.vllm_image == "r/vllm:2"
    defaults = build_parser().parse_args(
        [
            "operator",
            *one(render(helm, "cli", "tauon-system"), "Deployment")["spec"]["template"]["spec"]["containers"][
                0
            ]["args"],
        ]
    )
    assert defaults.namespace is None and defaults.gang_scheduler is None and not defaults.allow_host_paths
    assert defaults.default_image == "ghcr.io/tauon-dev/trainer:0.1.0"
    assert defaults.vllm_image == OperatorConfig().vllm_image  # empty value: the operator's pinned default


def test_namespace_scoped_render_validates_on_the_server(cluster: Cluster, helm: Helm, namespace: str):
    other = cluster.create_namespace("helm")
    try:
        docs = render(
            helm,
            "nsd",
            namespace,
            {
                "rbac.scope": "namespace",
                "watchNamespaces": [namespace, other],
                "operator.gangScheduler": "scheduler-plugins",
                "operator.defaultImage": "registry.example/trainer:1",
                "operator.allowHostPaths": True,
                "crds.install": False,
                "grafanaDashboard.enabled": True,
            },
        )
        assert not by_kind(docs, "CustomResourceDefinition")
        # one Role/RoleBinding per watched namespace, plus the leader-election pair in the release namespace
        roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted([namespace, other])
        bindings = [
            b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")
        ]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted([namespace, other])
        for b in bindings:
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": "nsd-tauon", "namespace": namespace}]
        # Only the read-only discovery rules (and the users' aggregated roles) are cluster-wide.
        assert sorted(c["metadata"]["name"] for c in by_kind(docs, "ClusterRole")) == [
            "nsd-tauon-discovery",
            "nsd-tauon-edit",
            "nsd-tauon-view",
        ]
        for role in roles:
            groups = {g for rule in role["rules"] for g in rule["apiGroups"]}
            assert "scheduling.x-k8s.io" in groups and "scheduling.volcano.sh" not in groups
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={namespace}" in args and f"--namespace={other}" in args
        assert "--gang-scheduler=scheduler-plugins" in args and "--allow-host-paths" in args
        assert "--default-image=registry.example/trainer:1" in args
        dash = one(docs, "ConfigMap")
        assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
        board = json.loads(dash["data"]["tauon-overview.json"])
        exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
        for metric in (
            "tauon_finetunejobs",
            "tauon_finetunejob_gang_restarts_total",
            "controller_runtime_reconcile_time_seconds_bucket",
            "tauon_server_request_duration_seconds_bucket",
        ):
            assert metric in exprs
        server_dry_run(cluster, docs)
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_monitors_select_the_pods_tauon_creates(helm: Helm):
    """The cluster has no Prometheus Operator CRDs: check the monitors structurally, against pods that the
    operator's own renderer produces (labels and port names)."""
    from tauon.api import FineTuneJob, InferenceService
    from tauon.render.config import OperatorConfig
    from tauon.render.finetunejob import render_attempt
    from tauon.render.inferenceservice import ModelLocation, Models
    from tauon.render.inferenceservice import render as render_isvc

    docs = render(
        helm,
        "mon",
        "monitoring",
        {
            "metrics.serviceMonitor.enabled": True,
            "metrics.podMonitor.enabled": True,
            "watchNamespaces": ["ml"],
        },
    )
    cfg = OperatorConfig()
    meta = {"namespace": "ml", "uid": "00000000-0000-0000-0000-000000000001"}
    ftj = FineTuneJob.model_validate(
        {
            **job("mon", nodes=2, data="pvc://data/train.jsonl", output="pvc://out/mon"),
            "metadata": {"name": "mon", **meta},
        }
    )
    trainer_pods = [c for c in render_attempt(ftj, cfg, 0) if c["kind"] == "Pod"]
    isvc = InferenceService.model_validate({**tis("mon"), "metadata": {"name": "mon", **meta}})
    server = next(
        c
        for c in render_isvc(isvc, Models(ModelLocation("hf://org/model"), None), cfg)
        if c["kind"] == "Deployment"
    )
    server_pods = [
        {"metadata": server["spec"]["template"]["metadata"], "spec": server["spec"]["template"]["spec"]}
    ]

    def selects(selector: dict, labels: dict[str, str]) -> bool:
        ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
        for e in selector.get("matchExpressions") or []:
            assert e["operator"] in ("Exists", "In")
            ok = ok and (
                e["key"] in labels if e["operator"] == "Exists" else labels.get(e["key"]) in e["values"]
            )
        return ok

    monitors = {m["metadata"]["name"]: m for m in by_kind(docs, "PodMonitor")}
    assert set(monitors) == {"mon-tauon-trainer", "mon-tauon-server"}
    for name, targets, others in (
        ("mon-tauon-trainer", trainer_pods, server_pods),
        ("mon-tauon-server", server_pods, trainer_pods),
    ):
        pm = monitors[name]
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
        for pod in targets:
            assert selects(pm["spec"]["selector"], pod["metadata"]["labels"]), (
                name,
                pod["metadata"]["labels"],
            )
            ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports and ep["path"] == "/metrics"
        for pod in others:
            assert not selects(pm["spec"]["selector"], pod["metadata"]["labels"])

    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["monitoring"]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert (
        sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["honorLabels"] is True
    )


# -- RBAC ----------------------------------------------------------------------------------------------

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespace": {"rbac.scope": "namespace", "watchNamespaces": ["a", "b"]},
    "volcano": {"operator.gangScheduler": "volcano"},
    "scheduler-plugins": {"rbac.scope": "namespace", "operator.gangScheduler": "scheduler-plugins"},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_least_privilege(helm: Helm, scenario: str):
    docs = render(helm, "rb", "tauon-system", SCENARIOS[scenario])
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    assert roles
    operator_rules: list[dict] = []
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"wildcard {key} in {role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if not role["metadata"]["name"].endswith(("-edit", "-view")):
                operator_rules.append(rule)
    granted = {
        (g, r, v)
        for rule in operator_rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    resources = {(g, r) for g, r, _ in granted}
    # never secrets (tokens reach pods through secretKeyRef; the operator does not read them), never RBAC
    assert not any(r == "secrets" or g == "rbac.authorization.k8s.io" for g, r in resources)
    # user objects: read + status only; no writes to spec. FineTuneJobs: the TTL delete, and a sweep's
    # trials (created, deleted when the sweep fails, read after a 409 on create)
    assert {v for g, r, v in granted if r in ("inferenceservices", "finetunesweeps")} == {"list", "watch"}
    assert {v for g, r, v in granted if r == "finetunejobs"} == {"list", "watch", "get", "create", "delete"}
    assert ("tauon.dev", "inferenceservices", "delete") not in granted
    assert {v for g, r, v in granted if r.endswith("/status")} == {"patch"}
    podgroups = {g for g, r in resources if r == "podgroups"}
    expected = {"volcano": {"scheduling.volcano.sh"}, "scheduler-plugins": {"scheduling.x-k8s.io"}}
    assert podgroups == expected.get(scenario, set())


# -- install -----------------------------------------------------------------------------------------


def test_helm_install_creates_a_hardened_operator(cluster: Cluster, helm: Helm, namespace: str):
    release = f"i{namespace[-8:]}"
    helm("install", release, str(CHART), "--namespace", namespace, "--set", "crds.install=false")
    try:
        st = json.loads(helm("status", release, "--namespace", namespace, "-o", "json").stdout)
        assert st["info"]["status"] == "deployed"
        dep = cluster.get("deployment", f"{release}-tauon", namespace)
        assert dep is not None
        spec = dep["spec"]["template"]["spec"]
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        assert spec["serviceAccountName"] == f"{release}-tauon"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health", "scheme": "HTTP"}
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
        assert "--metrics-port=8080" in c["args"] and "--health-port=8081" in c["args"]
        assert cluster.get("serviceaccount", f"{release}-tauon", namespace) is not None
        assert cluster.get("clusterrole", f"{release}-tauon") is not None
        assert cluster.get("service", f"{release}-tauon-metrics", namespace) is not None
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)
    wait_until(lambda: cluster.get("clusterrole", f"{release}-tauon") is None, 30, "ClusterRole removed")


def test_crds_installed_by_the_chart_are_kept_on_uninstall(cluster: Cluster, helm: Helm, namespace: str):
    """crds.install=true over CRDs that already exist (as here: applied by the session fixture) needs Helm's
    adoption metadata; the release then owns them, and `helm uninstall` keeps them (resource-policy keep)."""
    release = f"c{namespace[-8:]}"
    crds = ["finetunejobs.tauon.dev", "inferenceservices.tauon.dev", "finetunesweeps.tauon.dev"]
    r = helm("install", release, str(CHART), "--namespace", namespace, check=False)
    assert r.returncode != 0 and "exists and cannot be imported" in r.stderr  # no silent takeover
    for crd in crds:
        cluster.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate",
            "crd",
            crd,
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
            "--overwrite",
        )
    try:
        helm("install", release, str(CHART), "--namespace", namespace)
        for crd in crds:
            obj = cluster.get("crd", crd)
            assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)
    for crd in crds:
        obj = cluster.get("crd", crd)
        assert obj is not None and not obj["metadata"].get("deletionTimestamp"), f"{crd} was deleted"
    assert cluster.kubectl("get", "ftj", "-A").returncode == 0


# -- the operator with exactly the chart's permissions -------------------------------------------------


def sa_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token), same server and CA."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server_cfg = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in server_cfg:  # inline the CA so the file stands alone
        ca = Path(server_cfg.pop("certificate-authority")).read_bytes()
        server_cfg["certificate-authority-data"] = base64.b64encode(ca).decode()
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration", "2h").stdout.strip()
    assert token
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": server_cfg}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa}}],
        "current-context": "sa",
    }
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def can_i(cluster: Cluster, who: str, *args: str) -> bool:
    r = cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False)
    return r.stdout.strip() == "yes"


class ChartOperator:
    """The chart's ServiceAccount + RBAC applied for real, and `tauon operator` authenticated as it."""

    def __init__(self, cluster: Cluster, helm: Helm, namespace: str, tmp: Path, values: dict[str, Any]):
        self.cluster = cluster
        self.namespace = namespace
        self.tmp = tmp
        docs = render(helm, f"op{namespace[-8:]}", namespace, {"crds.install": False, **values})
        self.rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
        self.sa = one(docs, "ServiceAccount")["metadata"]["name"]
        self.user = f"system:serviceaccount:{namespace}:{self.sa}"
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        # the chart's --namespace flags as rendered; ports and period are the tests' own
        self.ns_args = [a for a in args if a.startswith("--namespace=")]
        self.health_port = free_port()
        self.op: Operator | None = None

    def start(self) -> None:
        self.cluster.apply(dump(self.rbac))
        kubeconfig = sa_kubeconfig(self.cluster, self.namespace, self.sa, self.tmp / "sa.kubeconfig")
        self.op = Operator(
            Cluster(kubeconfig, self.cluster.bin_dir),
            self.tmp / "operator.log",
            *self.ns_args,
            f"--health-port={self.health_port}",  # after Operator's own --health-port 0: argparse keeps the last
            "--health-address=127.0.0.1",
        )
        self.op.start()
        time.sleep(1)
        assert self.op.alive(), self.op.tail()

    def stop(self) -> None:
        if self.op is not None:
            self.op.stop()
        for d in self.rbac:
            if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                self.cluster.kubectl(
                    "delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False
                )

    def assert_no_forbidden(self) -> None:
        assert self.op is not None
        assert self.op.alive(), self.op.tail()
        log = self.op.log.read_text(errors="replace")
        bad = [
            line
            for line in log.splitlines()
            # (?<![,.]) keeps a log timestamp's milliseconds (",403") from matching
            if re.search(r"(?<![,.])\b403\b|Forbidden|forbidden|Not enough permissions", line)
            # other tests' namespaces being deleted refuse new objects with a 403 too: not RBAC
            and "NamespaceTerminating" not in line
            and "because it is being terminated" not in line
        ]
        assert not bad, "operator hit RBAC denials:\n" + "\n".join(bad[:20])


@pytest.fixture
def chart_operator(
    cluster: Cluster, helm: Helm, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., ChartOperator]]:
    started: list[ChartOperator] = []

    def start(**values: Any) -> ChartOperator:
        op = ChartOperator(cluster, helm, namespace, tmp_path, values)
        started.append(op)  # before start(): stop() also removes the cluster-scoped RBAC
        op.start()
        return op

    yield start
    for op in started:
        op.stop()


def healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_operator_reconciles_with_the_cluster_role_only(cluster: Cluster, chart_operator, namespace: str):
    op = chart_operator()
    who = op.user
    # the liveness endpoint the chart's probes use
    wait_until(lambda: healthz(op.health_port), 30, "/healthz answers 200")
    # the token really is the ServiceAccount, with the chart's permissions and nothing more
    assert can_i(cluster, who, "create", "pods", "-n", "default")
    assert can_i(cluster, who, "patch", "finetunejobs.tauon.dev", "--subresource=status", "-n", "default")
    assert not can_i(cluster, who, "patch", "finetunejobs.tauon.dev", "-n", "default")
    assert not can_i(cluster, who, "get", "secrets", "-n", "default")
    assert not can_i(cluster, who, "create", "clusterroles")
    assert not can_i(cluster, who, "delete", "services", "-n", "default")

    work = cluster.create_namespace("rbac")
    try:
        # FineTuneJob on a shared (RWX) claim: pvc get, ConfigMap/Service/Pod create, status patch, events.
        shared_volume(cluster, work, "shared", ["ReadWriteMany"])
        cluster.apply(job("train", nodes=2, output="pvc://shared/train"), "-n", work)
        running_gang(cluster, work, "train", 0, 2)
        wait_phase(cluster, work, "train", "Running")
        assert cluster.get("configmap", "train-config", work) is not None
        assert cluster.get("service", "train-nodes", work) is not None

        # InferenceService waiting for it, with autoscaling and a canary: Deployments, Service, HPA by SSA.
        cluster.apply(
            tis(
                "served",
                model={"fineTuneJobRef": {"name": "train"}},
                autoscaling={"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70},
                canary={
                    "model": {"source": "hf://sentence-transformers/all-MiniLM-L6-v2"},
                    "trafficPercent": 50,
                },
            ),
            "-n",
            work,
        )
        wait_until(
            lambda: cond_status(cluster, work, "served", "ModelReady") == ("False", "WaitingForFineTuneJob"),
            T,
            "served waits for the job",
        )
        for i in range(2):
            cluster.kubectl("annotate", "pod", f"train-r0-node-{i}", "-n", work, "kwok.tauon.dev/exit-code=0")
        wait_phase(cluster, work, "train", "Succeeded")
        wait_until(lambda: cond_status(cluster, work, "served", "Ready")[0] == "True", T, "served Ready")
        assert deployment(cluster, work, "served-predictor") is not None
        assert deployment(cluster, work, "served-canary") is not None
        assert cluster.get("hpa", "served", work) is not None
        assert cluster.get("service", "served", work) is not None

        # Removing the canary and autoscaling: Deployment and HPA deletes.
        cluster.kubectl(
            "patch",
            "tis",
            "served",
            "-n",
            work,
            "--type=json",
            "-p",
            '[{"op": "remove", "path": "/spec/canary"}, {"op": "remove", "path": "/spec/autoscaling"}]',
        )
        wait_until(lambda: deployment(cluster, work, "served-canary") is None, T, "canary deleted")
        wait_until(lambda: cluster.get("hpa", "served", work) is None, T, "HPA deleted")
        wait_until(
            lambda: cond_status(cluster, work, "served", "Ready")[0] == "True", T, "served Ready again"
        )

        # A retryable failure restarts the gang (pod deletes); a permanent one stops the survivor (pod
        # patch), and the TTL deletes the job (finetunejobs delete).
        cluster.apply(job("retry", nodes=2, backoffLimit=1, ttlSecondsAfterFinished=5), "-n", work)
        running_gang(cluster, work, "retry", 0, 2)
        cluster.kubectl("annotate", "pod", "retry-r0-node-0", "-n", work, "kwok.tauon.dev/exit-code=1")
        wait_until(lambda: status(cluster, work, "retry").get("attempt") == 1, T, "attempt 1")
        running_gang(cluster, work, "retry", 1, 2)
        wait_until(lambda: not pods(cluster, work, "retry", 0), T, "attempt 0 deleted")
        msg = json.dumps({"retryable": False, "reason": "BadConfig", "message": "x"})
        cluster.kubectl(
            "annotate",
            "pod",
            "retry-r1-node-0",
            "-n",
            work,
            f"kwok.tauon.dev/termination-message={msg}",
            "kwok.tauon.dev/exit-code=2",
        )
        wait_until(
            lambda: (
                (cluster.get("pod", "retry-r1-node-1", work) or {})
                .get("spec", {})
                .get("activeDeadlineSeconds")
                == 1
            ),
            T,
            "survivor stopped (activeDeadlineSeconds: 1)",
        )
        wait_until(lambda: cluster.get("ftj", "retry", work) is None, T, "TTL deleted the failed job")

        events = cluster.list("events", work)
        assert any(e["involvedObject"].get("name") == "train" and e["type"] == "Normal" for e in events)
        op.assert_no_forbidden()
    finally:
        cluster.kubectl("delete", "namespace", work, "--wait=false", check=False)


def test_operator_reconciles_with_namespaced_roles_only(cluster: Cluster, chart_operator, namespace: str):
    work = cluster.create_namespace("rbacns")
    outside = cluster.create_namespace("outside")
    try:
        op = chart_operator(**{"rbac.scope": "namespace", "watchNamespaces": [work]})
        assert can_i(cluster, op.user, "create", "pods", "-n", work)
        assert not can_i(cluster, op.user, "create", "pods", "-n", outside)
        assert not can_i(cluster, op.user, "list", "pods", "--all-namespaces")

        cluster.apply(job("nsjob", nodes=2), "-n", work)
        running_gang(cluster, work, "nsjob", 0, 2)
        wait_phase(cluster, work, "nsjob", "Running")
        cluster.apply(tis("nssvc"), "-n", work)
        wait_until(lambda: cond_status(cluster, work, "nssvc", "Ready")[0] == "True", T, "nssvc Ready")
        assert deployment(cluster, work, "nssvc-predictor") is not None

        # objects outside the watched namespaces are not touched
        cluster.apply(job("ignored", nodes=1), "-n", outside)
        time.sleep(3)
        assert not pods(cluster, outside, "ignored")
        assert not (cluster.get("ftj", "ignored", outside) or {}).get("status")
        op.assert_no_forbidden()
    finally:
        for ns in (work, outside):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
