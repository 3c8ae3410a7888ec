"""FineTuneSweep controller against a real control plane, the operator as a subprocess, and kwok pods.

kwok pods run no trainer: each trial's pod exits 0 after a short while with the termination message the
trainer would write (`{"metrics": {...}}`), set through the template's podTemplate annotations
(`kwok.tauon.dev/termination-message`, see hack/cluster/kwok-stages.yaml). The FineTuneJob controller
copies it into the trial's status.output.metrics, exactly as it does for a real trainer, and the sweep
reads its objective from there: no test-only path in the product. Every trial reports the same evalLoss,
so the best trial is the lowest index (ties go to it)."""

from __future__ import annotations

import json
import time

import pytest

from tests.kube import Cluster, condition, wait_until
from tests.manifests import API_VERSION, MINILM_CLASSIFIER

pytestmark = pytest.mark.cluster
T = 120  # seconds: every wait is bounded
LOSS = 0.42


def sweep(name: str) -> dict:
    message = json.dumps({"metrics": {"evalLoss": LOSS, "trainLoss": 0.5}})
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "model": MINILM_CLASSIFIER,
                    "dataset": {"source": "file:///tmp/tauon-test-data/train.jsonl"},
                    "method": {"type": "lora"},
                    "output": {"storage": f"file:///tmp/tauon-test-out/{name}"},
                    "numNodes": 1,
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "podTemplate": {
                        "annotations": {
                            "kwok.tauon.dev/exit-code": "0",
                            "kwok.tauon.dev/exit-after-ms": "2s",
                            "kwok.tauon.dev/termination-message": message,
                        }
                    },
                }
            },
            "parameters": [
                {"name": "learningRate", "type": "float", "min": 1e-5, "max": 1e-3, "log": True},
                {"name": "method.lora.rank", "type": "int", "values": [4, 8, 16]},
            ],
            "objective": {"metric": "evalLoss", "goal": "minimize"},
            "algorithm": {"type": "tpe", "seed": 3},
            "maxTrials": 3,
            "parallelTrials": 2,
        },
    }


def test_sweep_runs_three_trials_two_at_a_time_to_succeeded(cluster: Cluster, operator, namespace: str):
    wait_until(
        lambda: cluster.kubectl("get", "ftsweep", "-A", check=False).returncode == 0, 30, "sweep CRD served"
    )
    name = "sw"
    cluster.apply(sweep(name), "-n", namespace)
    most_unfinished = 0

    def done() -> dict | None:
        nonlocal most_unfinished
        trials = cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}")
        unfinished = [
            t for t in trials if (t.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        most_unfinished = max(most_unfinished, len(unfinished))
        obj = cluster.get("ftsweep", name, namespace) or {}
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    t0 = time.monotonic()
    obj = wait_until(done, T, f"sweep {name} finished\n{operator.tail()}", interval=0.5)
    st = obj["status"]
    assert st["phase"] == "Succeeded", (st, operator.tail())
    assert 1 <= most_unfinished <= 2  # parallelTrials (sampled: an upper bound is what can fail)
    succeeded = condition(obj, "Succeeded")
    assert succeeded is not None and succeeded["reason"] == "AllTrialsFinished"
    assert st["observedGeneration"] == obj["metadata"]["generation"]

    trials = {
        t["metadata"]["name"]: t for t in cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}")
    }
    assert sorted(trials) == [f"{name}-t0", f"{name}-t1", f"{name}-t2"]
    params = []
    for tname, t in trials.items():
        (ref,) = t["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("FineTuneSweep", name, obj["metadata"]["uid"])
        p = json.loads(t["metadata"]["annotations"]["tauon.dev/trial-parameters"])
        assert t["spec"]["hyperparameters"]["learningRate"] == p["learningRate"]
        assert t["spec"]["method"]["lora"]["r"] == p["method.lora.rank"]
        assert t["spec"]["output"]["storage"] == f"file:///tmp/tauon-test-out/{name}/{tname}"
        assert t["status"]["output"]["metrics"]["evalLoss"] == LOSS
        params.append(p)
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 3
    assert [(t["name"], t["phase"], t["objective"]) for t in st["trials"]] == [
        (f"{name}-t{k}", "Succeeded", LOSS) for k in range(3)
    ]
    best = st["best"]
    assert (best["trial"], best["objective"]) == (f"{name}-t0", LOSS)
    assert best["parameters"] == json.loads(
        trials[f"{name}-t0"]["metadata"]["annotations"]["tauon.dev/trial-parameters"]
    )
    assert best["model"] == f"file:///tmp/tauon-test-out/{name}/{name}-t0/model"
    assert time.monotonic() - t0 < T

    # converged: the sweep's resourceVersion stays put (no status writes) over a few periodic passes
    rv = obj["metadata"]["resourceVersion"]
    time.sleep(3)
    assert (cluster.get("ftsweep", name, namespace) or {})["metadata"]["resourceVersion"] == rv


def patch_evaluations(cluster: Cluster, namespace: str, name: str, points: dict[int, float]) -> None:
    """What the trainer's periodic evaluations become in the trial's status (kwok pods run no trainer)."""
    evaluations = [
        {"step": s, "trainLoss": v, "evalLoss": v, "evalAccuracy": None} for s, v in points.items()
    ]
    body = {"status": {"progress": {"step": max(points), "evaluations": evaluations}}}
    cluster.kubectl(
        "patch", "ftj", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(body)
    )


def test_asha_annotates_the_worse_running_trial(cluster: Cluster, operator, namespace: str):
    """Two running trials report their rung-0 evaluation one after the other: the sweep records the
    first (promoted: it is alone there), then annotates the second, which is not in the best third."""
    name = "asha"
    body = sweep(name)
    template = body["spec"]["template"]["spec"]
    template["hyperparameters"] = {"evalEverySteps": 10}
    template["podTemplate"]["annotations"]["kwok.tauon.dev/exit-after-ms"] = "600s"  # they keep running
    body["spec"].update(
        earlyStopping={"type": "asha", "minSteps": 10}, maxTrials=2, parallelTrials=2, maxFailedTrials=2
    )
    cluster.apply(body, "-n", namespace)

    def trials_running() -> list[dict] | None:
        trials = cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}")
        phases = [(t.get("status") or {}).get("phase") for t in trials]
        return trials if len(trials) == 2 and phases == ["Running", "Running"] else None

    wait_until(trials_running, T, f"two running trials\n{operator.tail()}", interval=0.5)

    def recorded(trial: str, step: int) -> dict | None:
        st = (cluster.get("ftsweep", name, namespace) or {}).get("status") or {}
        rec = next((t for t in st.get("trials") or [] if t["name"] == trial), {})
        return rec if rec.get("intermediateStep") == step else None

    patch_evaluations(cluster, namespace, f"{name}-t0", {10: 0.3})
    t0 = wait_until(lambda: recorded(f"{name}-t0", 10), T, f"t0's evaluation in status\n{operator.tail()}")
    assert (t0["phase"], t0["intermediate"]) == ("Running", 0.3)
    patch_evaluations(cluster, namespace, f"{name}-t1", {10: 0.9})

    def annotated() -> str | None:
        job = cluster.get("ftj", f"{name}-t1", namespace) or {}
        return (job["metadata"].get("annotations") or {}).get("tauon.dev/prune")

    message = wait_until(annotated, T, f"t1 annotated\n{operator.tail()}", interval=0.5)
    assert message.startswith("asha: evalLoss 0.9 at step 10 is not in the best 1 of 2 trials at rung 0")
    job0 = cluster.get("ftj", f"{name}-t0", namespace) or {}
    assert "tauon.dev/prune" not in (job0["metadata"].get("annotations") or {})
    t1 = wait_until(lambda: recorded(f"{name}-t1", 10), T, "t1's evaluation in status")
    assert t1["intermediate"] == 0.9 and t1["message"] == message
    events = cluster.list("events", namespace)
    assert any(e.get("reason") == "TrialPruned" and f"{name}-t1" in e.get("message", "") for e in events)

    # the FineTuneJob side: the annotated trial ends Failed/Pruned (pods gone), the sweep counts it Pruned
    def pruned_job() -> dict | None:
        job = cluster.get("ftj", f"{name}-t1", namespace) or {}
        failed = condition(job, "Failed")
        return job if failed is not None and failed["status"] == "True" else None

    job1 = wait_until(pruned_job, T, f"t1 ended\n{operator.tail()}", interval=0.5)
    failed = condition(job1, "Failed")
    assert failed is not None and failed["reason"] == "Pruned", failed
    assert failed["message"] == f"pruned by its FineTuneSweep: {message}"
    wait_until(
        lambda: not cluster.list("pods", namespace, f"tauon.dev/job-name={name}-t1"), T, "t1's pods deleted"
    )
    t1 = wait_until(
        lambda: next(
            (
                t
                for t in ((cluster.get("ftsweep", name, namespace) or {}).get("status") or {}).get("trials")
                or []
                if t["name"] == f"{name}-t1" and t["phase"] == "Pruned"
            ),
            None,
        ),
        T,
        f"t1 Pruned in the sweep's status\n{operator.tail()}",
    )
    assert t1["intermediate"] == 0.9


def test_operator_sigkilled_mid_sweep_creates_no_duplicate_and_trials_go_with_the_sweep(
    cluster: Cluster, operator, namespace: str
):
    """The operator is SIGKILLed while two trials run and restarted: the sweep goes on from its trials
    (the same two FineTuneJobs, by uid; the next ones t2, t3 created once each) to Succeeded; deleting the
    sweep garbage-collects its trials (ownerReferences, the control plane's garbage collector)."""
    name = "kill"
    body = sweep(name)
    body["spec"]["template"]["spec"]["podTemplate"]["annotations"]["kwok.tauon.dev/exit-after-ms"] = "6s"
    body["spec"].update(maxTrials=4, parallelTrials=2)
    cluster.apply(body, "-n", namespace)

    def two_trials() -> list[dict] | None:
        trials = cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}")
        return trials if len(trials) == 2 else None

    first = {t["metadata"]["name"]: t["metadata"]["uid"] for t in wait_until(two_trials, T, "two trials")}
    assert sorted(first) == [f"{name}-t0", f"{name}-t1"]
    operator.kill()
    time.sleep(2)
    operator.start()

    def finished() -> dict | None:
        obj = cluster.get("ftsweep", name, namespace) or {}
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    obj = wait_until(finished, 2 * T, f"sweep {name} finished\n{operator.tail()}", interval=0.5)
    assert obj["status"]["phase"] == "Succeeded", (obj["status"], operator.tail())
    trials = {
        t["metadata"]["name"]: t for t in cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}")
    }
    assert sorted(trials) == [f"{name}-t{k}" for k in range(4)]
    assert {n: trials[n]["metadata"]["uid"] for n in first} == first  # not recreated
    assert [t["name"] for t in obj["status"]["trials"]] == [f"{name}-t{k}" for k in range(4)]

    cluster.kubectl("delete", "ftsweep", name, "-n", namespace, "--wait=false")
    wait_until(
        lambda: not cluster.list("ftj", namespace, f"tauon.dev/sweep-name={name}"),
        T,
        f"trials garbage-collected\n{operator.tail()}",
        interval=0.5,
    )
