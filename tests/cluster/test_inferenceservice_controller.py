"""InferenceService controller on a real control plane: the real controller-manager turns Deployments into
ReplicaSets and pods, kwok makes them ready, the operator runs as a subprocess."""

from __future__ import annotations

import pytest

from tests.cluster.test_finetunejob_controller import job, running_gang, wait_phase
from tests.kube import Cluster, condition, wait_until
from tests.manifests import MINILM, inferenceservice

pytestmark = pytest.mark.cluster
T = 90


def tis(name: str, **spec: object) -> dict:
    return inferenceservice(name, base={"model": {"source": MINILM}}, **spec)


def cond_status(cluster: Cluster, ns: str, name: str, ctype: str) -> tuple[str | None, str | None]:
    c = condition(cluster.get("tis", name, ns), ctype)
    return (c or {}).get("status"), (c or {}).get("reason")


def deployment(cluster: Cluster, ns: str, name: str) -> dict | None:
    return cluster.get("deployment", name, ns)


def test_waits_for_running_job_then_serves_its_output(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("train", nodes=2), "-n", namespace)
    running_gang(cluster, namespace, "train", 0, 2)
    cluster.apply(tis("served", model={"fineTuneJobRef": {"name": "train"}}), "-n", namespace)
    wait_until(
        lambda: cond_status(cluster, namespace, "served", "ModelReady") == ("False", "WaitingForFineTuneJob"),
        T,
        "ModelReady False/WaitingForFineTuneJob",
    )
    assert deployment(cluster, namespace, "served-predictor") is None
    assert cluster.get("tis", "served", namespace)["status"]["phase"] == "Pending"

    for i in range(2):
        cluster.kubectl(
            "annotate", "pod", f"train-r0-node-{i}", "-n", namespace, "kwok.tauon.dev/exit-code=0"
        )
    wait_phase(cluster, namespace, "train", "Succeeded")
    dep = wait_until(lambda: deployment(cluster, namespace, "served-predictor"), T, "predictor Deployment")
    args = " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "/tmp/tauon-test-out/train/model" in args
    wait_until(lambda: cond_status(cluster, namespace, "served", "Ready")[0] == "True", T, "Ready True")
    st = cluster.get("tis", "served", namespace)["status"]
    assert st["phase"] == "Ready" and st["readyReplicas"] == 1
    assert st["url"] == f"http://served.{namespace}.svc.cluster.local"
    assert st["model"] == {
        "source": "file:///tmp/tauon-test-out/train/model",
        "fineTuneJob": "train",
        "task": "sequence-classification",  # the job's task, passed on to the server (--task)
    }
    assert st["resolved"] == {"runtime": "tauon"} and not (st.get("openai") or {}).get("baseURL")
    svc = cluster.get("service", "served", namespace)
    assert svc and svc["spec"]["selector"] == {"tauon.dev/inference-service": "served"}


def test_failed_job_fails_the_service(cluster: Cluster, operator, namespace: str):
    cluster.apply(
        job("bad", nodes=1, annotations={"kwok.tauon.dev/exit-code": "1"}, backoffLimit=0), "-n", namespace
    )
    cluster.apply(tis("waits", model={"fineTuneJobRef": {"name": "bad"}}), "-n", namespace)
    wait_until(
        lambda: cond_status(cluster, namespace, "waits", "ModelReady") == ("False", "FineTuneJobFailed"),
        T,
        "ModelReady False/FineTuneJobFailed",
    )
    assert cluster.get("tis", "waits", namespace)["status"]["phase"] == "Failed"


def test_kubectl_scale_changes_the_deployment(cluster: Cluster, operator, namespace: str):
    cluster.apply(tis("scaled"), "-n", namespace)
    wait_until(lambda: cond_status(cluster, namespace, "scaled", "Ready")[0] == "True", T, "Ready")
    cluster.kubectl("scale", "tis/scaled", "--replicas=3", "-n", namespace)
    wait_until(
        lambda: (
            (deployment(cluster, namespace, "scaled-predictor") or {}).get("spec", {}).get("replicas") == 3
        ),
        T,
        "Deployment scaled to 3",
    )
    wait_until(
        lambda: cluster.get("tis", "scaled", namespace)["status"].get("readyReplicas") == 3, T, "3 ready"
    )
    out = cluster.kubectl("get", "tis", "scaled", "-n", namespace).stdout
    assert "Ready" in out.splitlines()[1]


def test_autoscaling_creates_hpa(cluster: Cluster, operator, namespace: str):
    cluster.apply(
        tis("auto", autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60}),
        "-n",
        namespace,
    )
    hpa = wait_until(lambda: cluster.get("hpa", "auto", namespace), T, "HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "auto-predictor"
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60


def test_canary_gets_its_share(cluster: Cluster, operator, namespace: str):
    cluster.apply(
        tis(
            "split",
            replicas=10,
            canary={"model": {"source": "file:///tmp/tauon-test-out/v2/model"}, "trafficPercent": 20},
        ),
        "-n",
        namespace,
    )
    wait_until(lambda: deployment(cluster, namespace, "split-canary"), T, "canary Deployment")
    pred = deployment(cluster, namespace, "split-predictor")
    can = deployment(cluster, namespace, "split-canary")
    assert pred["spec"]["replicas"] == 8 and can["spec"]["replicas"] == 2
    wait_until(lambda: cond_status(cluster, namespace, "split", "CanaryReady")[0] == "True", T, "CanaryReady")
    st = wait_until(
        lambda: (
            cluster.get("tis", "split", namespace)["status"]
            if cluster.get("tis", "split", namespace)["status"].get("readyReplicas") == 10
            else None
        ),
        T,
        "10 ready replicas",
    )
    assert st["canary"] == {"replicas": 2, "effectiveTrafficPercent": 20}


def test_deletion_garbage_collects(cluster: Cluster, operator, namespace: str):
    cluster.apply(tis("gone"), "-n", namespace)
    wait_until(lambda: deployment(cluster, namespace, "gone-predictor"), T, "Deployment")
    cluster.kubectl("delete", "tis", "gone", "-n", namespace, "--timeout=30s")
    wait_until(
        lambda: (
            deployment(cluster, namespace, "gone-predictor") is None
            and cluster.get("service", "gone", namespace) is None
            and not cluster.list("pods", namespace, "tauon.dev/inference-service=gone")
        ),
        T,
        "children garbage-collected",
    )


def test_conflicting_child_is_reported_not_adopted(cluster: Cluster, operator, namespace: str):
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "taken"},
            "spec": {"ports": [{"port": 1}], "selector": {"app": "other"}},
        },
        "-n",
        namespace,
    )
    cluster.apply(tis("taken"), "-n", namespace)
    wait_until(
        lambda: cond_status(cluster, namespace, "taken", "Ready") == ("False", "ResourceConflict"),
        T,
        "Ready False/ResourceConflict",
    )
    svc = cluster.get("service", "taken", namespace)
    assert svc["spec"]["selector"] == {"app": "other"} and not svc["metadata"].get("ownerReferences")
    # once the user removes the foreign Service, tauon creates its own and the service becomes Ready
    cluster.kubectl("delete", "service", "taken", "-n", namespace)
    wait_until(
        lambda: cond_status(cluster, namespace, "taken", "Ready")[0] == "True", T, "Ready after conflict"
    )
    svc = cluster.get("service", "taken", namespace)
    assert svc["spec"]["selector"] == {"tauon.dev/inference-service": "taken"}
