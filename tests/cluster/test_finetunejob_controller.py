"""FineTuneJob controller against a real control plane: real scheduler, controller-manager (garbage
collection), kwok fake GPU/CPU nodes, and the operator running for real as a subprocess."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kube import Cluster, condition, wait_until
from tests.manifests import MINILM, MINILM_CLASSIFIER, finetunejob

pytestmark = pytest.mark.cluster
T = 60  # seconds: every wait is bounded


def job(
    name: str,
    nodes: int = 2,
    gpus: int = 0,
    annotations: dict[str, str] | None = None,
    model: str = MINILM,
    data: str = "file:///tmp/tauon-test-data/train.jsonl",
    output: str | None = None,
    **policy: Any,
) -> dict:
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    tolerations: list[dict[str, str]] = []
    if gpus:
        resources = {
            "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": str(gpus)},
            "limits": {"nvidia.com/gpu": str(gpus)},
        }
    return finetunejob(
        name,
        model={**MINILM_CLASSIFIER, "source": model},
        dataset={"source": data},
        output={"storage": output or f"file:///tmp/tauon-test-out/{name}"},
        numNodes=nodes,
        resources=resources,
        podTemplate={"annotations": annotations or {}, "tolerations": tolerations},
        runPolicy=policy,
    )


def get_job(cluster: Cluster, ns: str, name: str) -> dict:
    obj = cluster.get("ftj", name, ns)
    assert obj is not None
    return obj


def status(cluster: Cluster, ns: str, name: str) -> dict:
    return get_job(cluster, ns, name).get("status") or {}


def pods(cluster: Cluster, ns: str, name: str, attempt: int | None = None) -> list[dict]:
    sel = f"tauon.dev/job-name={name}" + (f",tauon.dev/attempt={attempt}" if attempt is not None else "")
    return cluster.list("pods", ns, sel)


def wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float = T) -> dict:
    return wait_until(
        lambda: status(cluster, ns, name) if status(cluster, ns, name).get("phase") == phase else None,
        timeout,
        f"{name} phase {phase} (now {status(cluster, ns, name).get('phase')})",
    )


def running_gang(cluster: Cluster, ns: str, name: str, attempt: int, n: int) -> None:
    wait_until(
        lambda: (
            len([p for p in pods(cluster, ns, name, attempt) if p["status"].get("phase") == "Running"]) == n
        ),
        T,
        f"{n} running pods of {name} attempt {attempt}",
    )


def shared_volume(cluster: Cluster, ns: str, claim: str, modes: list[str]) -> None:
    """A pre-bound hostPath PV + PVC (no provisioner needed), with the given access modes."""
    pv = f"{ns}-{claim}"
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": modes,
                "hostPath": {"path": f"/tmp/tauon-pv/{pv}"},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "claimRef": {"namespace": ns, "name": claim},
            },
        }
    )
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": ns},
            "spec": {
                "accessModes": modes,
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "",
                "volumeName": pv,
            },
        }
    )


def test_gpu_gang_scheduled_on_gpu_nodes_with_contract_env(cluster: Cluster, operator, namespace: str):
    shared_volume(cluster, namespace, "models", ["ReadWriteMany"])
    shared_volume(cluster, namespace, "data", ["ReadOnlyMany"])
    wait_until(
        lambda: (
            (cluster.get("pvc", "models", namespace) or {}).get("status", {}).get("phase") == "Bound"
            and (cluster.get("pvc", "data", namespace) or {}).get("status", {}).get("phase") == "Bound"
        ),
        T,
        "PVCs bound",
    )
    spec = job(
        "gpu4",
        nodes=4,
        gpus=8,
        model="pvc://models/minilm",
        data="pvc://data/train.jsonl",
        output="pvc://models/gpu4",
    )
    cluster.apply(spec, "-n", namespace)
    st = wait_phase(cluster, namespace, "gpu4", "Running")
    assert st["resolved"] == {
        "image": "ghcr.io/tauon-dev/trainer:0.1.0",
        "nprocPerNode": 8,
        "backend": "nccl",
    }
    got = pods(cluster, namespace, "gpu4")
    assert sorted(p["metadata"]["name"] for p in got) == [f"gpu4-r0-node-{i}" for i in range(4)]
    for p in got:
        assert p["spec"]["nodeName"].startswith("gpu-node-"), p["spec"]["nodeName"]
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        rank = p["metadata"]["labels"]["tauon.dev/node-rank"]
        assert env["PET_NODE_RANK"] == rank and env["NODE_RANK"] == rank
        assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8" and env["WORLD_SIZE"] == "32"
        assert env["PET_MASTER_ADDR"] == "gpu4-r0-node-0.gpu4-nodes" and env["TAUON_DIST_BACKEND"] == "nccl"
        assert p["spec"]["restartPolicy"] == "Never"
    assert condition(get_job(cluster, namespace, "gpu4"), "Running")["status"] == "True"
    svc = cluster.get("service", "gpu4-nodes", namespace)
    assert svc and svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True


def test_exit_1_restarts_whole_gang_exactly_once(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("fail1", nodes=3), "-n", namespace)
    running_gang(cluster, namespace, "fail1", 0, 3)
    cluster.kubectl("annotate", "pod", "fail1-r0-node-1", "-n", namespace, "kwok.tauon.dev/exit-code=1")
    wait_until(lambda: status(cluster, namespace, "fail1").get("attempt") == 1, T, "attempt 1")
    running_gang(cluster, namespace, "fail1", 1, 3)
    st = wait_phase(cluster, namespace, "fail1", "Running")
    assert st["restarts"] == 1 and st["restartsCountTowardsLimit"] == 1
    assert st["lastFailure"]["pod"] == "fail1-r0-node-1" and st["lastFailure"]["exitCode"] == 1
    wait_until(lambda: not pods(cluster, namespace, "fail1", 0), T, "old attempt's pods gone")
    time.sleep(3)  # nothing else happens: exactly one restart
    assert status(cluster, namespace, "fail1")["restarts"] == 1
    assert sorted(p["metadata"]["name"] for p in pods(cluster, namespace, "fail1")) == [
        f"fail1-r1-node-{i}" for i in range(3)
    ]


def test_non_retryable_failure_fails_without_restart(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("perm", nodes=2), "-n", namespace)
    running_gang(cluster, namespace, "perm", 0, 2)
    msg = json.dumps(
        {"retryable": False, "reason": "DatasetNotFound", "message": "/data/x.jsonl does not exist"}
    )
    cluster.kubectl(
        "annotate",
        "pod",
        "perm-r0-node-0",
        "-n",
        namespace,
        f"kwok.tauon.dev/termination-message={msg}",
        "kwok.tauon.dev/exit-code=2",
    )
    st = wait_phase(cluster, namespace, "perm", "Failed")
    failed = condition(get_job(cluster, namespace, "perm"), "Failed")
    assert failed["reason"] == "PermanentError"
    assert "perm-r0-node-0" in failed["message"] and "DatasetNotFound" in failed["message"]
    assert st["restarts"] == 0
    # the survivor is stopped but kept until TTL so its logs stay readable
    survivor = wait_until(lambda: cluster.get("pod", "perm-r0-node-1", namespace), T, "survivor kept")
    assert survivor["spec"].get("activeDeadlineSeconds") == 1


def test_deleted_pod_restarts_without_counting(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("evict", nodes=2), "-n", namespace)
    running_gang(cluster, namespace, "evict", 0, 2)
    cluster.kubectl("delete", "pod", "evict-r0-node-0", "-n", namespace, "--wait=false")
    running_gang(cluster, namespace, "evict", 1, 2)
    st = wait_phase(cluster, namespace, "evict", "Running")
    assert st["restarts"] == 1 and st["restartsCountTowardsLimit"] == 0


def test_backoff_exhaustion(cluster: Cluster, operator, namespace: str):
    ann = {"kwok.tauon.dev/exit-code": "1", "kwok.tauon.dev/exit-after-ms": "1500ms"}
    cluster.apply(job("backoff", nodes=2, annotations=ann, backoffLimit=1), "-n", namespace)
    st = wait_phase(cluster, namespace, "backoff", "Failed", timeout=90)
    assert condition(get_job(cluster, namespace, "backoff"), "Failed")["reason"] == "BackoffLimitExceeded"
    assert st["restarts"] == 1 and st["restartsCountTowardsLimit"] == 1 and st["attempt"] == 1


def set_suspend(cluster: Cluster, ns: str, name: str, suspend: bool) -> None:
    """Merge-patch spec.runPolicy.suspend, as a user would."""
    patch = json.dumps({"spec": {"runPolicy": {"suspend": suspend}}})
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", patch)


def test_suspend_and_resume(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("susp", nodes=2), "-n", namespace)
    running_gang(cluster, namespace, "susp", 0, 2)
    set_suspend(cluster, namespace, "susp", True)
    wait_phase(cluster, namespace, "susp", "Suspended")
    wait_until(lambda: not pods(cluster, namespace, "susp"), T, "pods deleted while suspended")
    set_suspend(cluster, namespace, "susp", False)
    st = wait_phase(cluster, namespace, "susp", "Running")
    assert st["attempt"] == 1 and st["restarts"] == 0
    assert condition(get_job(cluster, namespace, "susp"), "Suspended")["status"] == "False"


def test_output_claim_not_shareable_is_invalid_spec(cluster: Cluster, operator, namespace: str):
    shared_volume(cluster, namespace, "single", ["ReadWriteOnce"])
    cluster.apply(job("rwo", nodes=2, output="pvc://single/out"), "-n", namespace)
    wait_phase(cluster, namespace, "rwo", "Failed")
    failed = condition(get_job(cluster, namespace, "rwo"), "Failed")
    assert (
        failed["reason"] == "InvalidSpec"
        and "single" in failed["message"]
        and "ReadWriteMany" in failed["message"]
    )
    assert not pods(cluster, namespace, "rwo")


def test_active_deadline(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("deadline", nodes=1, activeDeadlineSeconds=4), "-n", namespace)
    wait_phase(cluster, namespace, "deadline", "Failed")
    assert condition(get_job(cluster, namespace, "deadline"), "Failed")["reason"] == "DeadlineExceeded"


def test_image_pull_error_hits_startup_timeout(cluster: Cluster, operator, namespace: str):
    ann = {"kwok.tauon.dev/image-pull-error": "true"}
    cluster.apply(job("badimg", nodes=2, annotations=ann, startupTimeoutSeconds=3), "-n", namespace)
    wait_phase(cluster, namespace, "badimg", "Failed")
    failed = condition(get_job(cluster, namespace, "badimg"), "Failed")
    assert failed["reason"] == "StartupTimeout" and "ErrImagePull" in failed["message"]


def test_success_then_ttl_deletes_job(cluster: Cluster, operator, namespace: str):
    ann = {"kwok.tauon.dev/exit-code": "0", "kwok.tauon.dev/exit-after-ms": "1000ms"}
    cluster.apply(job("done", nodes=2, annotations=ann, ttlSecondsAfterFinished=3), "-n", namespace)
    st = wait_phase(cluster, namespace, "done", "Succeeded")
    assert st["output"]["model"] == "file:///tmp/tauon-test-out/done/model"
    assert condition(get_job(cluster, namespace, "done"), "Succeeded")["status"] == "True"
    wait_until(lambda: cluster.get("ftj", "done", namespace) is None, T, "TTL deletes the finished job")
    wait_until(lambda: not pods(cluster, namespace, "done"), T, "children garbage-collected")


def test_events_once_per_transition(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("events", nodes=1), "-n", namespace)
    wait_phase(cluster, namespace, "events", "Running")
    time.sleep(3)  # several periodic passes
    evs = cluster.list("events", namespace)
    running = [e for e in evs if e["involvedObject"].get("name") == "events" and e["reason"] == "Running"]
    assert len(running) == 1 and running[0].get("count", 1) == 1


def test_metrics_endpoint(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("metrics", nodes=1), "-n", namespace)
    wait_phase(cluster, namespace, "metrics", "Running")
    time.sleep(2)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    )
    names = {f.name for f in text_string_to_metric_families(text)}
    for want in (
        "tauon_finetunejobs",
        "tauon_finetunejob_gang_restarts",
        "tauon_finetunejob_time_to_running_seconds",
        "controller_runtime_reconcile",
        "controller_runtime_reconcile_errors",
        "controller_runtime_reconcile_time_seconds",
    ):
        assert want in names, (want, sorted(names))
    assert 'tauon_finetunejobs{namespace="' + namespace + '",phase="Running"}' in text


def test_delete_with_operator_stopped_garbage_collects(cluster: Cluster, operator, namespace: str):
    cluster.apply(job("gc", nodes=2), "-n", namespace)
    running_gang(cluster, namespace, "gc", 0, 2)
    operator.stop()
    try:
        cluster.kubectl("delete", "ftj", "gc", "-n", namespace, "--timeout=30s")
        assert cluster.get("ftj", "gc", namespace) is None
        wait_until(
            lambda: (
                not pods(cluster, namespace, "gc")
                and cluster.get("configmap", "gc-config", namespace) is None
                and cluster.get("service", "gc-nodes", namespace) is None
            ),
            T,
            "children garbage-collected",
        )
    finally:
        operator.start()


def test_sigkill_during_creation_of_20_jobs_leaves_no_duplicates_or_orphans(
    cluster: Cluster, operator, namespace: str
):
    docs = "\n---\n".join(json.dumps(job(f"bulk-{i}", nodes=2)) for i in range(20))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=docs)
    time.sleep(1.5)  # the operator is mid-way through creating gangs
    operator.kill(signal.SIGKILL)
    operator.start()

    def converged() -> bool:
        items = cluster.list("ftj", namespace)
        return len(items) == 20 and all((i.get("status") or {}).get("phase") == "Running" for i in items)

    wait_until(converged, 120, "20 jobs Running after operator restart")
    all_pods = cluster.list("pods", namespace)
    names = [p["metadata"]["name"] for p in all_pods]
    assert len(names) == len(set(names)) == 40
    assert sorted(names) == sorted(f"bulk-{i}-r0-node-{r}" for i in range(20) for r in range(2))
    for p in all_pods:
        refs = p["metadata"].get("ownerReferences") or []
        assert len(refs) == 1 and refs[0]["kind"] == "FineTuneJob" and refs[0]["controller"] is True
    for i in range(20):
        st = status(cluster, namespace, f"bulk-{i}")
        assert st["restarts"] == 0 and st["attempt"] == 0


def test_foreign_config_map_blocks_pods(cluster: Cluster, operator, namespace: str):
    """A ConfigMap with the job's child name that tauon does not own: no pod may start with it."""
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "foreign-config", "namespace": namespace},
            "data": {"job.json": "{}"},
        }
    )
    cluster.apply(job("foreign", nodes=2), "-n", namespace)
    wait_until(
        lambda: (
            (c := condition(get_job(cluster, namespace, "foreign"), "Created")) is not None
            and c["reason"] == "ResourceConflict"
        ),
        T,
        "Created False/ResourceConflict",
    )
    time.sleep(3)  # several periodic passes
    assert pods(cluster, namespace, "foreign") == [], "pods created beside a foreign ConfigMap"
    cluster.kubectl("delete", "configmap", "foreign-config", "-n", namespace)
    running_gang(cluster, namespace, "foreign", 0, 2)


def test_status_write_from_a_stale_or_ghost_body_is_refused(cluster: Cluster, operator, namespace: str):
    """The API server honours metadata.resourceVersion in a status patch as a precondition: tauon.kube
    relies on it so a stale cache (or a ghost of a deleted job with the same name) never writes status."""
    cluster.apply(job("rvcheck", nodes=1, suspend=True), "-n", namespace)
    wait_phase(cluster, namespace, "rvcheck", "Suspended")

    def patch(rv: str):
        body = json.dumps({"metadata": {"resourceVersion": rv}, "status": {"restarts": 7}})
        return cluster.kubectl(
            "patch",
            "ftj",
            "rvcheck",
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            body,
            check=False,
        )

    wrong = patch("1")
    assert wrong.returncode != 0 and "modified" in (wrong.stderr or ""), wrong.stderr
    rv = get_job(cluster, namespace, "rvcheck")["metadata"]["resourceVersion"]
    assert patch(rv).returncode == 0
