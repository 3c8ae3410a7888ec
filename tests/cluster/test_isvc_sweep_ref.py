"""InferenceService `spec.model.fineTuneSweepRef` on a real control plane: the operator (a subprocess) drives a
FineTuneSweep whose kwok trials exit with the metrics the trainer would report (see
test_finetunesweep_controller.py), and a service that references the sweep waits for it, then serves the best
trial's model; a failed sweep fails the service."""

from __future__ import annotations

import time

import pytest

from tests.cluster.test_finetunesweep_controller import sweep
from tests.kube import Cluster, condition, wait_until
from tests.manifests import deep_merge, inferenceservice

pytestmark = pytest.mark.cluster
T = 120  # seconds: every wait is bounded


def served_from(name: str, sweep_name: str) -> dict:
    return inferenceservice(name, model={"fineTuneSweepRef": {"name": sweep_name}})


def model_ready(cluster: Cluster, ns: str, name: str) -> dict:
    return condition(cluster.get("tis", name, ns), "ModelReady") or {}


def test_service_waits_for_the_sweep_then_serves_its_best_trial(cluster: Cluster, operator, namespace: str):
    wait_until(
        lambda: cluster.kubectl("get", "ftsweep", "-A", check=False).returncode == 0, 30, "sweep CRD served"
    )
    sw = "pick"
    # the service first: its sweep does not exist yet
    cluster.apply(served_from("best", sw), "-n", namespace)
    waiting = wait_until(
        lambda: (
            (c := model_ready(cluster, namespace, "best")).get("reason") == "WaitingForFineTuneSweep" and c
        ),
        T,
        f"ModelReady False/WaitingForFineTuneSweep\n{operator.tail()}",
    )
    assert (
        waiting["status"] == "False"
        and waiting["message"] == f"FineTuneSweep {sw} does not exist yet; waiting for it"
    )
    assert cluster.get("tis", "best", namespace)["status"]["phase"] == "Pending"

    cluster.apply(sweep(sw), "-n", namespace)

    def sweep_done() -> dict | None:
        # the Deployment is read before the sweep: a Deployment seen while the sweep (read after it) has
        # not Succeeded was made before the sweep's best was final
        dep = cluster.get("deployment", "best-predictor", namespace)
        obj = cluster.get("ftsweep", sw, namespace) or {}
        phase = (obj.get("status") or {}).get("phase")
        assert dep is None or phase == "Succeeded", f"predictor Deployment while the sweep is {phase}"
        if phase not in (None, "Succeeded"):
            c = model_ready(cluster, namespace, "best")
            assert c.get("status") != "True", c
        return obj if phase in ("Succeeded", "Failed") else None

    obj = wait_until(sweep_done, T, f"sweep {sw} finished\n{operator.tail()}", interval=0.5)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    best = obj["status"]["best"]
    assert best["trial"] == f"{sw}-t0"  # every trial reports the same loss: ties go to the lowest index
    model = best["model"]
    assert model == f"file:///tmp/tauon-test-out/{sw}/{sw}-t0/model"

    dep = wait_until(
        lambda: cluster.get("deployment", "best-predictor", namespace), T, f"predictor\n{operator.tail()}"
    )
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"/tmp/tauon-test-out/{sw}/{sw}-t0/model" in " ".join(args)
    assert "sequence-classification" in args  # the sweep template's task, passed to the server
    ann = dep["metadata"]["annotations"]
    assert ann["tauon.dev/fine-tune-job"] == f"{sw}-t0" and ann["tauon.dev/fine-tune-sweep"] == sw
    wait_until(
        lambda: (condition(cluster.get("tis", "best", namespace), "Ready") or {}).get("status") == "True",
        T,
        f"Ready True\n{operator.tail()}",
    )
    st = cluster.get("tis", "best", namespace)["status"]
    assert st["phase"] == "Ready"
    assert st["model"] == {
        "source": model,
        "fineTuneJob": f"{sw}-t0",
        "fineTuneSweep": sw,
        "task": "sequence-classification",
    }
    ready = condition(cluster.get("tis", "best", namespace), "ModelReady") or {}
    assert (ready.get("status"), ready.get("reason")) == ("True", "ModelResolved")
    assert f"from FineTuneSweep {sw} (best trial {sw}-t0, evalLoss 0.42)" in ready["message"]

    # converged: no status writes over a few periodic passes
    rv = cluster.get("tis", "best", namespace)["metadata"]["resourceVersion"]
    time.sleep(3)
    assert cluster.get("tis", "best", namespace)["metadata"]["resourceVersion"] == rv


def test_a_failed_sweep_fails_the_service(cluster: Cluster, operator, namespace: str):
    sw = "doomed"
    failing = deep_merge(
        sweep(sw),
        {
            "spec": {
                "template": {
                    "spec": {
                        "podTemplate": {"annotations": {"kwok.tauon.dev/exit-code": "1"}},
                        "runPolicy": {"backoffLimit": 0},
                    }
                },
                "maxTrials": 2,
                "parallelTrials": 1,
                "maxFailedTrials": 1,
            }
        },
    )
    cluster.apply(failing, "-n", namespace)
    cluster.apply(served_from("never", sw), "-n", namespace)
    c = wait_until(
        lambda: (c := model_ready(cluster, namespace, "never")).get("reason") == "FineTuneSweepFailed" and c,
        T,
        f"ModelReady False/FineTuneSweepFailed\n{operator.tail()}",
    )
    assert c["status"] == "False" and c["message"].startswith(
        f"FineTuneSweep {sw} failed (TooManyFailedTrials"
    )
    assert cluster.get("tis", "never", namespace)["status"]["phase"] == "Failed"
    assert cluster.get("deployment", "never-predictor", namespace) is None
