"""InferenceService rendering: names, labels, replica split, security, probes, storage, HPA, determinism."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest

from tauon.api.finetunejob import FineTuneJob
from tauon.api.inferenceservice import InferenceService
from tauon.api.names import ANN_FINE_TUNE_JOB, ANN_MODEL_SOURCE, ANN_MODEL_TASK, ANN_RUNTIME, ANN_SPEC_HASH
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import (
    ModelLocation,
    Models,
    job_model_location,
    location_from_annotations,
    model_path,
    openai_base_url,
    render,
    render_deployment,
    replica_plan,
    resolve_runtime,
    selector,
    served_model_name,
    served_task,
    spec_hash,
    split_replicas,
    startup_probe_timing,
    url,
    vllm_args,
    vllm_model_arg,
)
from tests.manifests import PVC_MINILM, PVC_SPEC, finetunejob, inferenceservice

CFG = OperatorConfig()
UID = "1234-uid"


def isvc(**spec: Any) -> InferenceService:
    body = inferenceservice(
        "sentiment",
        namespace="ml",
        metadata={"uid": UID, "generation": 1},
        base={"model": {"source": PVC_MINILM}},
        **spec,
    )
    return InferenceService.model_validate(body)


def children(svc: InferenceService, canary: str | None = None, cfg: OperatorConfig = CFG) -> dict[str, Any]:
    src = svc.spec.model.source or "pvc://out/job/model"
    out = render(svc, Models(ModelLocation(src), ModelLocation(canary) if canary else None), cfg)
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in out}


def predictor(svc: InferenceService, cfg: OperatorConfig = CFG, source: str | None = None) -> Any:
    return render_deployment(svc, "predictor", ModelLocation(source or "pvc://models/minilm"), 1, cfg)


def container(dep: Any) -> Any:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(dep: Any) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(dep)["env"]}


# -- split_replicas --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "percent", "expected"),
    [
        (0, 0, (0, 0, 0)),
        (0, 10, (0, 0, 0)),
        (0, 100, (0, 0, 0)),
        (1, 0, (1, 0, 0)),
        (1, 10, (0, 1, 100)),
        (1, 50, (0, 1, 100)),
        (1, 100, (0, 1, 100)),
        (2, 50, (1, 1, 50)),
        (2, 90, (1, 1, 50)),
        (2, 100, (0, 2, 100)),
        (3, 0, (3, 0, 0)),
        (3, 10, (2, 1, 33)),
        (3, 50, (1, 2, 67)),
        (3, 90, (1, 2, 67)),
        (3, 99, (1, 2, 67)),
        (3, 100, (0, 3, 100)),
        (4, 25, (3, 1, 25)),
        (10, 0, (10, 0, 0)),
        (10, 1, (9, 1, 10)),
        (10, 10, (9, 1, 10)),
        (10, 15, (8, 2, 20)),
        (10, 50, (5, 5, 50)),
        (10, 95, (1, 9, 90)),
        (10, 100, (0, 10, 100)),
    ],
)
def test_split_replicas_table(total: int, percent: int, expected: tuple[int, int, int]) -> None:
    assert split_replicas(total, percent) == expected


def test_split_replicas_invariants() -> None:
    for total, percent in itertools.product(range(0, 31), range(0, 101)):
        p, c, eff = split_replicas(total, percent)
        assert p + c == total and p >= 0 and c >= 0
        if percent == 0:
            assert c == 0 and eff == 0
        if percent > 0 and total > 0:
            assert c >= 1
        if total >= 2 and percent < 100:
            assert p >= 1
        if percent == 100:
            assert p == 0
        assert eff == (round(100 * c / total) if total else 0)


@pytest.mark.parametrize(
    ("spec", "with_canary", "expected"),
    [
        ({"replicas": 3}, False, (3, 0, 0, None, None)),
        (
            {"replicas": 3, "canary": {"model": {"source": "hf://a/b"}, "trafficPercent": 10}},
            True,
            (2, 1, 33, None, None),
        ),
        # canary model not known yet: the predictor takes everything
        (
            {"replicas": 3, "canary": {"model": {"source": "hf://a/b"}, "trafficPercent": 10}},
            False,
            (3, 0, 0, None, None),
        ),
        ({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, False, (None, 0, 0, 2, 5)),
        (
            {
                "autoscaling": {"minReplicas": 2, "maxReplicas": 10},
                "canary": {"model": {"source": "hf://a/b"}, "trafficPercent": 10},
            },
            True,
            (None, 1, 50, 1, 9),
        ),
        (
            {
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
                "canary": {"model": {"source": "hf://a/b"}, "trafficPercent": 50},
            },
            True,
            (None, 1, 50, 1, 1),
        ),
    ],
)
def test_replica_plan(spec: dict[str, Any], with_canary: bool, expected: tuple[Any, ...]) -> None:
    plan = replica_plan(isvc(**spec), with_canary)
    assert (plan.predictor, plan.canary, plan.effective_percent, plan.hpa_min, plan.hpa_max) == expected


# -- model_path --------------------------------------------------------------------------------------


FTJ_BODY = finetunejob(
    "sentiment",
    namespace="ml",
    base=PVC_SPEC,
    dataset={"source": "pvc://data/s.jsonl", "format": "jsonl"},
    output={"storage": "pvc://models/sentiment-ft/"},
    numNodes=1,
)


def test_model_path_from_body_and_model() -> None:
    assert model_path(FTJ_BODY) == "pvc://models/sentiment-ft/model"
    assert model_path(FineTuneJob.model_validate(FTJ_BODY)) == "pvc://models/sentiment-ft/model"


def test_model_path_prefers_recorded_output() -> None:
    body = {**FTJ_BODY, "status": {"output": {"model": "pvc://elsewhere/m"}}}
    assert model_path(body) == "pvc://elsewhere/m"


def test_model_path_without_output_is_invalid() -> None:
    with pytest.raises(InvalidSpec, match="spec.output.storage"):
        model_path({"metadata": {"name": "x"}, "spec": {}})


# -- children ------------------------------------------------------------------------------------------


def test_children_names_and_order() -> None:
    assert list(children(isvc())) == ["Service/sentiment", "Deployment/sentiment-predictor"]
    svc = isvc(
        autoscaling={"minReplicas": 1, "maxReplicas": 3},
        canary={"model": {"source": "hf://org/v2"}, "trafficPercent": 10},
    )
    assert list(children(svc, canary="hf://org/v2")) == [
        "Service/sentiment",
        "Deployment/sentiment-predictor",
        "Deployment/sentiment-canary",
        "HorizontalPodAutoscaler/sentiment",
    ]


def test_every_child_is_owned_labelled_and_hashed() -> None:
    svc = isvc(
        autoscaling={"minReplicas": 1, "maxReplicas": 3},
        canary={"model": {"source": "hf://org/v2"}, "trafficPercent": 10},
    )
    for child in children(svc, canary="hf://org/v2").values():
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "tauon"
        assert meta["labels"]["tauon.dev/inference-service"] == "sentiment"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "tauon.dev/v1alpha1",
            "kind": "InferenceService",
            "name": "sentiment",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["annotations"][ANN_SPEC_HASH] == spec_hash(child)


def test_render_is_deterministic_and_hash_tracks_content() -> None:
    a = children(isvc(replicas=2))
    b = children(isvc(replicas=2))
    assert a == b
    c = children(isvc(replicas=3))
    key = "Deployment/sentiment-predictor"
    assert (
        a[key]["metadata"]["annotations"][ANN_SPEC_HASH] != c[key]["metadata"]["annotations"][ANN_SPEC_HASH]
    )
    assert a["Service/sentiment"] == c["Service/sentiment"]


def test_spec_hash_ignores_its_own_annotation() -> None:
    dep = predictor(isvc())
    bare = copy.deepcopy(dep)
    del bare["metadata"]["annotations"][ANN_SPEC_HASH]
    assert spec_hash(bare) == spec_hash(dep)


def test_predictor_deployment_shape() -> None:
    dep = children(isvc(replicas=2, batching={"maxBatchSize": 8, "maxLatencyMilliseconds": 5}))[
        "Deployment/sentiment-predictor"
    ]
    assert dep["apiVersion"] == "apps/v1"
    labels = {
        "tauon.dev/inference-service": "sentiment",
        "tauon.dev/component": "predictor",
        "app.kubernetes.io/name": "tauon-model-server",
        "app.kubernetes.io/instance": "sentiment",
        "app.kubernetes.io/component": "predictor",
    }
    assert labels.items() <= dep["metadata"]["labels"].items()
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {
        "matchLabels": {"tauon.dev/inference-service": "sentiment", "tauon.dev/component": "predictor"}
    }
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    c = container(dep)
    assert c["name"] == "server"
    assert c["image"] == CFG.default_image
    assert c["command"] == ["python", "-m", "tauon_serve.serve"]
    assert c["args"] == [
        "--model",
        "/mnt/tauon/pvc/models/minilm",
        "--name",
        "sentiment",
        "--port",
        "8080",
        "--max-batch-size",
        "8",
        "--max-latency-ms",
        "5",
        "--max-concurrent-sequences",
        "64",
        "--health-port",
        "8081",
    ]  # no generation limits set: the server's own (the model's length), nothing rendered
    assert c["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "health", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert dep["metadata"]["annotations"][ANN_MODEL_SOURCE] == "pvc://models/minilm"
    assert ANN_FINE_TUNE_JOB not in dep["metadata"]["annotations"]


def test_image_override_task_and_fine_tune_job_annotation() -> None:
    svc = isvc(image="registry.local/server:1", model={"fineTuneJobRef": {"name": "ft"}, "task": "causal-lm"})
    dep = render_deployment(svc, "predictor", ModelLocation("pvc://out/ft/model", "ft"), 1, CFG)
    c = container(dep)
    assert c["image"] == "registry.local/server:1"
    assert c["args"][-2:] == ["--task", "causal-lm"]
    assert c["args"][1] == "/mnt/tauon/pvc/out/ft/model"
    assert dep["metadata"]["annotations"][ANN_FINE_TUNE_JOB] == "ft"


def test_probes() -> None:
    c = container(predictor(isvc()))
    ready, live, startup = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    # on the health listener, which the request cap and idle connections never reach
    assert ready["httpGet"] == {"path": "/v2/health/ready", "port": "health", "scheme": "HTTP"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "health", "scheme": "HTTP"}
    assert startup["httpGet"]["port"] == "health"
    assert startup["httpGet"]["path"] == "/v2/health/live"
    # model loading: the default budget is spec.startupTimeoutSeconds' default, 30 minutes
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800
    assert ready["periodSeconds"] <= 10 and ready["failureThreshold"] >= 1
    assert live["failureThreshold"] >= 3


def test_security_contexts() -> None:
    dep = predictor(isvc())
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == CFG.run_as_user
    assert pod["securityContext"]["fsGroup"] == CFG.fs_group
    sc = container(dep)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container(dep)["volumeMounts"]
    assert env_of(dep)["HF_HOME"] == "/tmp/hf"
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_service_account_mounts_token() -> None:
    pod = predictor(isvc(podTemplate={"serviceAccountName": "reader"}))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "reader"
    assert pod["automountServiceAccountToken"] is True


def test_pod_template_overrides() -> None:
    svc = isvc(
        podTemplate={
            "labels": {"team": "a"},
            "annotations": {"prometheus.io/scrape": "true"},
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "priorityClassName": "high",
            "imagePullSecrets": [{"name": "regcred"}],
        }
    )
    dep = predictor(svc)
    tmeta = dep["spec"]["template"]["metadata"]
    assert tmeta["labels"]["team"] == "a"
    assert tmeta["labels"]["tauon.dev/component"] == "predictor"
    assert tmeta["annotations"] == {"prometheus.io/scrape": "true"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_env_user_appended_token_from_secret_and_deduplicated() -> None:
    svc = isvc(
        model={"source": "hf://org/model", "tokenSecretRef": {"name": "hf", "key": "token"}},
        env=[
            {"name": "FOO", "value": "1"},
            {"name": "HF_HOME", "value": "/tmp/x"},
            {"name": "FOO", "value": "2"},
        ],
    )
    dep = predictor(svc, source="hf://org/model")
    env = container(dep)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    assert names[-2:] == ["HF_HOME", "FOO"]  # the user's, after ours
    e = env_of(dep)
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert e["HF_HOME"] == "/tmp/x" and e["FOO"] == "2"
    assert not any(n.startswith("TAUON_") for n in names)


def test_resources_and_gpu_toleration() -> None:
    svc = isvc(resources={"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"nvidia.com/gpu": 1}})
    dep = predictor(svc)
    assert container(dep)["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in dep["spec"]["template"][
        "spec"
    ]["tolerations"]
    plain = predictor(isvc())
    assert "resources" not in container(plain) or container(plain)["resources"] == {}
    assert "tolerations" not in plain["spec"]["template"]["spec"]


# -- storage -----------------------------------------------------------------------------------------


def test_pvc_model_is_mounted_read_only() -> None:
    dep = predictor(isvc(), source="pvc://models/minilm/v1")
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
    assert mounts["pvc-models"] == {  # only the model directory, never the whole claim
        "name": "pvc-models",
        "mountPath": "/mnt/tauon/pvc/models/minilm/v1",
        "subPath": "minilm/v1",
        "readOnly": True,
    }
    assert container(dep)["args"][1] == "/mnt/tauon/pvc/models/minilm/v1"


def test_hf_model_is_passed_through() -> None:
    svc = isvc(model={"source": "hf://sentence-transformers/all-MiniLM-L6-v2"})
    dep = predictor(svc, source="hf://sentence-transformers/all-MiniLM-L6-v2")
    assert container(dep)["args"][1] == "hf://sentence-transformers/all-MiniLM-L6-v2"
    # no claim to mount: the server downloads it into the model cache volume
    assert [v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]] == ["tmp", "model-cache"]


def test_file_model_needs_allow_host_paths() -> None:
    svc = isvc(model={"source": "file:///data/model"})
    with pytest.raises(InvalidSpec, match=r"spec\.model\.source.*--allow-host-paths"):
        predictor(svc, source="file:///data/model")
    dep = predictor(svc, OperatorConfig(allow_host_paths=True), source="file:///data/model")
    pod = dep["spec"]["template"]["spec"]
    assert any(v.get("hostPath") == {"path": "/data/model"} for v in pod["volumes"])
    assert any(m["mountPath"] == "/data/model" and m["readOnly"] for m in container(dep)["volumeMounts"])
    assert container(dep)["args"][1] == "/data/model"


def test_relative_file_and_fine_tune_job_field_names() -> None:
    svc = isvc(model={"source": "file://./model"})
    with pytest.raises(InvalidSpec, match="relative"):
        predictor(svc, OperatorConfig(allow_host_paths=True), source="file://./model")
    ref = isvc(model={"fineTuneJobRef": {"name": "ft"}})
    with pytest.raises(InvalidSpec, match=r"spec\.model\.fineTuneJobRef"):
        render_deployment(ref, "predictor", ModelLocation("file:///out/model", "ft"), 1, CFG)


def test_canary_field_name_in_errors() -> None:
    svc = isvc(canary={"model": {"source": "file:///v2"}, "trafficPercent": 10})
    with pytest.raises(InvalidSpec, match=r"spec\.canary\.model\.source"):
        render_deployment(svc, "canary", ModelLocation("file:///v2"), 1, CFG)


# -- service, HPA, canary --------------------------------------------------------------------------------


def test_service() -> None:
    s = children(isvc())["Service/sentiment"]
    assert s["spec"] == {
        "type": "ClusterIP",
        "selector": {"tauon.dev/inference-service": "sentiment"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    }


def test_autoscaling_hpa_and_no_replicas() -> None:
    # Python field name: the wire name should be docs/api.md's targetCPUUtilizationPercentage (see the model)
    out = children(
        isvc(
            replicas=5,
            autoscaling={"minReplicas": 2, "maxReplicas": 6, "target_cpu_utilization_percentage": 60},
        )
    )
    assert "replicas" not in out["Deployment/sentiment-predictor"]["spec"]
    hpa = out["HorizontalPodAutoscaler/sentiment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sentiment-predictor"},
        "minReplicas": 2,
        "maxReplicas": 6,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}},
            }
        ],
    }


def test_canary_deployment_gets_its_share() -> None:
    svc = isvc(
        replicas=10,
        canary={"model": {"source": "pvc://models/v2", "task": "causal-lm"}, "trafficPercent": 20},
    )
    out = children(svc, canary="pvc://models/v2")
    pred, can = out["Deployment/sentiment-predictor"], out["Deployment/sentiment-canary"]
    assert (pred["spec"]["replicas"], can["spec"]["replicas"]) == (8, 2)
    assert can["spec"]["selector"]["matchLabels"]["tauon.dev/component"] == "canary"
    assert can["spec"]["template"]["metadata"]["labels"]["tauon.dev/inference-service"] == "sentiment"
    c = container(can)
    assert c["args"][1] == "/mnt/tauon/pvc/models/v2"
    assert c["args"][3] == "sentiment"  # same model name: one URL for both versions
    assert c["args"][-2:] == ["--task", "causal-lm"]
    assert "--task" not in container(pred)["args"]
    assert can["metadata"]["annotations"][ANN_MODEL_SOURCE] == "pvc://models/v2"


def test_canary_with_autoscaling_has_fixed_replicas_and_shrinks_hpa() -> None:
    svc = isvc(
        autoscaling={"minReplicas": 2, "maxReplicas": 10},
        canary={"model": {"source": "hf://org/v2"}, "trafficPercent": 10},
    )
    out = children(svc, canary="hf://org/v2")
    assert "replicas" not in out["Deployment/sentiment-predictor"]["spec"]
    assert out["Deployment/sentiment-canary"]["spec"]["replicas"] == 1
    hpa = out["HorizontalPodAutoscaler/sentiment"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 9)


def test_canary_without_known_model_is_not_rendered() -> None:
    svc = isvc(replicas=4, canary={"model": {"fineTuneJobRef": {"name": "v2"}}, "trafficPercent": 50})
    out = children(svc)
    assert "Deployment/sentiment-canary" not in out
    assert out["Deployment/sentiment-predictor"]["spec"]["replicas"] == 4


def test_url_and_selector() -> None:
    assert url(isvc(), CFG) == "http://sentiment.ml.svc.cluster.local"
    assert (
        url(isvc(), OperatorConfig(cluster_domain="corp.internal")) == "http://sentiment.ml.svc.corp.internal"
    )
    assert selector("sentiment") == "tauon.dev/inference-service=sentiment"


# -- runtimes, generation, startup budget (LARGE-MODELS.md) ----------------------------------------------

GPUS = {"requests": {"cpu": "4", "nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}
CAUSAL = {"source": "pvc://models/llama", "task": "causal-lm"}


@pytest.mark.parametrize(
    ("spec", "task", "expected"),
    [
        ({"resources": GPUS}, "causal-lm", "vllm"),
        ({}, "causal-lm", "tauon"),  # no GPUs
        ({"resources": GPUS}, "sequence-classification", "tauon"),
        ({"resources": GPUS}, None, "tauon"),  # task unknown: the tauon server reads it from the model
        ({"resources": GPUS, "runtime": "tauon"}, "causal-lm", "tauon"),
        ({"runtime": "vllm"}, "causal-lm", "vllm"),
    ],
)
def test_resolve_runtime(spec: dict[str, Any], task: str | None, expected: str) -> None:
    assert resolve_runtime(isvc(**spec), task) == expected


def test_auto_serves_s3_models_with_tauon_which_downloads_them() -> None:
    svc = isvc(model={"source": "s3://models/llama", "task": "causal-lm"}, resources=GPUS)
    assert resolve_runtime(svc, "causal-lm", "s3://models/llama") == "tauon"
    assert resolve_runtime(svc, "causal-lm", "hf://org/llama") == "vllm"
    dep = predictor(svc, source="s3://models/llama")
    assert dep["metadata"]["annotations"][ANN_RUNTIME] == "tauon"
    assert container(dep)["command"] == ["python", "-m", "tauon_serve.serve"]


def test_task_comes_from_the_spec_else_from_the_fine_tune_job() -> None:
    svc = isvc(model={"fineTuneJobRef": {"name": "pre"}}, resources=GPUS)
    loc = ModelLocation("pvc://out/pre/model", "pre", "causal-lm")
    assert served_task(svc.spec.model, loc) == "causal-lm"
    assert served_task(svc.spec.model, ModelLocation("pvc://out/pre/model", "pre")) is None
    explicit = isvc(model={"source": "pvc://m/x", "task": "sequence-classification"})
    assert served_task(explicit.spec.model, loc) == "sequence-classification"
    dep = render(svc, Models(loc), CFG)[1]
    assert dep["metadata"]["annotations"][ANN_RUNTIME] == "vllm"
    assert dep["metadata"]["annotations"][ANN_MODEL_TASK] == "causal-lm"


def test_job_model_location_and_annotations_round_trip() -> None:
    body = {
        "metadata": {"name": "pre"},
        "spec": {"model": {"task": "causal-lm"}, "output": {"storage": "pvc://out/pre"}},
    }
    loc = job_model_location(body)
    assert loc == ModelLocation("pvc://out/pre/model", "pre", "causal-lm")
    dep = render(isvc(model={"fineTuneJobRef": {"name": "pre"}}), Models(loc), CFG)[1]
    assert location_from_annotations(dep["metadata"]["annotations"]) == loc
    assert location_from_annotations({}) is None


def flag_of(args: list[str], name: str) -> str | None:
    return str(args[args.index(name) + 1]) if name in args else None


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_vllm_container_follows_generation_and_gpu_count(gpus: int) -> None:
    res = {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}
    gen = {"maxModelLength": 8192, "maxNewTokens": 512, "maxConcurrentSequences": 16}
    svc = isvc(model=CAUSAL, resources=res, generation=gen)
    dep = predictor(svc, source="pvc://models/llama")
    c = container(dep)
    assert c["image"] == CFG.vllm_image
    assert c["command"] == ["vllm"]
    args = c["args"]
    assert args[:2] == ["serve", "/mnt/tauon/pvc/models/llama"]
    assert flag_of(args, "--served-model-name") == "sentiment" == served_model_name(svc)
    assert flag_of(args, "--port") == "8080"
    assert flag_of(args, "--tensor-parallel-size") == str(gpus)
    assert flag_of(args, "--max-model-len") == "8192"
    assert flag_of(args, "--max-num-seqs") == "16"
    assert flag_of(args, "--max-num-batched-tokens") is None  # vLLM's default holds 16 sequences
    assert json.loads(flag_of(args, "--override-generation-config") or "") == {"max_new_tokens": 512}
    assert args == vllm_args(svc, "/mnt/tauon/pvc/models/llama", CFG)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    pod = dep["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert env_of(dep)["HOME"] == "/tmp"
    assert env_of(dep)["HF_HOME"] == "/tmp/hf"  # a pvc:// model: nothing to download, no cache volume
    assert not any(v["name"] == "model-cache" for v in pod["volumes"])
    # same labels as the tauon runtime: the Service, the PodMonitor and the scale selector still match
    assert dep["spec"]["template"]["metadata"]["labels"]["tauon.dev/inference-service"] == "sentiment"


def test_vllm_renders_only_the_generation_limits_the_spec_sets() -> None:
    """Unset maxModelLength: vLLM derives the length from the model (a fixed 4096 made it refuse a
    shorter model and silently cut a longer one). Unset maxNewTokens: no server-wide cap."""
    svc = isvc(model=CAUSAL, resources=GPUS)
    assert svc.spec.generation.max_model_length is None and svc.spec.generation.max_new_tokens is None
    args = container(predictor(svc, source="pvc://models/llama"))["args"]
    assert "--max-model-len" not in args and "--override-generation-config" not in args
    assert flag_of(args, "--max-num-seqs") == "64"
    only_cap = isvc(model=CAUSAL, resources=GPUS, generation={"maxNewTokens": 100})
    args = container(predictor(only_cap, source="pvc://models/llama"))["args"]
    assert "--max-model-len" not in args
    assert flag_of(args, "--override-generation-config") == '{"max_new_tokens":100}'


@pytest.mark.parametrize(("seqs", "batched"), [(2048, None), (2049, "2049"), (4096, "4096")])
def test_vllm_batched_tokens_hold_the_concurrent_sequences(seqs: int, batched: str | None) -> None:
    """vLLM refuses --max-num-seqs above --max-num-batched-tokens, whose default is 2048 on GPUs under
    70 GiB: more concurrent sequences than that raise the batched tokens with them."""
    svc = isvc(model=CAUSAL, resources=GPUS, generation={"maxConcurrentSequences": seqs})
    args = container(predictor(svc, source="pvc://models/llama"))["args"]
    assert flag_of(args, "--max-num-batched-tokens") == batched


def test_vllm_takes_hf_ids_without_the_scheme_and_caches_them_on_the_cache_volume() -> None:
    svc = isvc(
        model={"source": "hf://org/llama-3", "task": "causal-lm"},
        resources=GPUS,
        storage={"modelCacheSize": "40Gi"},
    )
    assert vllm_model_arg("hf://org/llama-3") == "org/llama-3"
    assert vllm_model_arg("/mnt/tauon/pvc/m/x") == "/mnt/tauon/pvc/m/x"
    dep = predictor(svc, source="hf://org/llama-3")
    c = container(dep)
    assert c["args"][:2] == ["serve", "org/llama-3"]
    assert not any(a.startswith("hf://") for a in c["args"])
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {"sizeLimit": "40Gi"}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": "/var/cache/tauon/models"} in c["volumeMounts"]
    assert env_of(dep)["HF_HOME"] == "/var/cache/tauon/models/hf"
    assert "TAUON_MODEL_CACHE_DIR" not in env_of(dep)  # that one is for s3:// downloads


def test_tauon_runtime_caches_hf_models_on_the_cache_volume_too() -> None:
    svc = isvc(model={"source": "hf://org/minilm"})
    dep = predictor(svc, source="hf://org/minilm")
    assert container(dep)["args"][1] == "hf://org/minilm"  # the tauon server reads hf:// itself
    assert env_of(dep)["HF_HOME"] == "/var/cache/tauon/models/hf"
    assert {"name": "model-cache", "emptyDir": {}} in dep["spec"]["template"]["spec"]["volumes"]
    user = isvc(model={"source": "hf://org/minilm"}, env=[{"name": "HF_HOME", "value": "/data/hf"}])
    assert env_of(predictor(user, source="hf://org/minilm"))["HF_HOME"] == "/data/hf"


@pytest.mark.parametrize("runtime", ["tauon", "vllm"])
def test_server_pods_drain_before_they_stop(runtime: str) -> None:
    """A preStop hook keeps the server up while the pod leaves the Service's endpoints; the grace period
    covers the hook and the server's own drain."""
    dep = predictor(isvc(model=CAUSAL, runtime=runtime, resources=GPUS), source="pvc://models/llama")
    pod = dep["spec"]["template"]["spec"]
    hook = container(dep)["lifecycle"]["preStop"]["exec"]["command"]
    grace = pod["terminationGracePeriodSeconds"]
    if runtime == "tauon":
        assert hook == ["sleep", "5"]
        assert grace >= 5 + 25  # + the server's --graceful-timeout-seconds default
    else:
        assert hook[:2] == ["python3", "-c"]
        assert grace >= 5 + 60
        compile(hook[2], "preStop", "exec")  # valid Python
        assert "http://127.0.0.1:8080/metrics" in hook[2] and "vllm:num_requests_running{" in hook[2]


def test_vllm_drain_hook_waits_for_running_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM preStop script against a fake /metrics: it polls until no request runs or waits."""
    import time as real_time
    import urllib.request

    pages = iter(
        [
            'vllm:num_requests_running{engine="0",model_name="m"} 2.0\nvllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n',
            '# HELP x\nvllm:num_requests_running{engine="0",model_name="m"} 0.0\nvllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n',
        ]
    )
    polls: list[str] = []

    class Page:
        def __init__(self, text: str) -> None:
            self.text = text

        def read(self) -> bytes:
            return self.text.encode()

    def urlopen(url: str, timeout: float) -> Page:
        polls.append(url)
        return Page(next(pages))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(real_time, "sleep", lambda s: None)
    hook = container(predictor(isvc(model=CAUSAL, runtime="vllm", resources=GPUS)))["lifecycle"]
    exec(hook["preStop"]["exec"]["command"][2], {})
    assert polls == ["http://127.0.0.1:8080/metrics"] * 2


def test_vllm_image_from_operator_config_and_spec_image_wins() -> None:
    svc = isvc(model=CAUSAL, runtime="vllm", resources=GPUS)
    assert container(predictor(svc, OperatorConfig(vllm_image="reg/vllm:1")))["image"] == "reg/vllm:1"
    svc = isvc(model=CAUSAL, runtime="vllm", image="reg/mine:2")  # its own build: no GPU needed
    assert container(predictor(svc))["image"] == "reg/mine:2"


@pytest.mark.parametrize(
    "resources",
    [{}, {"requests": {"cpu": "4"}}, {"limits": {"nvidia.com/gpu": "0"}}],
)
def test_vllm_image_without_a_gpu_is_invalid(resources: dict[str, Any]) -> None:
    """The operator's vLLM image (CUDA) stops at once without a GPU ("Failed to infer device type")."""
    svc = isvc(model=CAUSAL, runtime="vllm", resources=resources)
    with pytest.raises(InvalidSpec, match=r"spec.resources: runtime vllm .* request nvidia.com/gpu"):
        predictor(svc)
    mig = isvc(model=CAUSAL, runtime="vllm", resources={"limits": {"nvidia.com/mig-1g.10gb": "1"}})
    assert container(predictor(mig))["command"] == ["vllm"]


def test_vllm_with_a_classifier_is_invalid() -> None:
    svc = isvc(model={"source": "pvc://m/x", "task": "sequence-classification"}, runtime="vllm")
    with pytest.raises(InvalidSpec, match="vllm serves causal-lm models only"):
        predictor(svc)


def test_tauon_runtime_renders_generation_limits_only_when_set() -> None:
    args = container(predictor(isvc(model=CAUSAL)))["args"]
    assert "--max-model-length" not in args and "--max-new-tokens" not in args
    assert flag_of(args, "--max-concurrent-sequences") == "64"


def test_tauon_runtime_gets_the_generation_flags() -> None:
    gen = {"maxModelLength": 2048, "maxNewTokens": 100, "maxConcurrentSequences": 8}
    args = container(predictor(isvc(model=CAUSAL, generation=gen)))["args"]
    for name, value in (
        ("--max-model-length", "2048"),
        ("--max-new-tokens", "100"),
        ("--max-concurrent-sequences", "8"),
        ("--task", "causal-lm"),
    ):
        assert args[args.index(name) + 1] == value


@pytest.mark.parametrize("timeout", [1, 7, 30, 95, 301, 1800, 86400])
@pytest.mark.parametrize("runtime", ["tauon", "vllm"])
def test_startup_probe_budget_is_the_startup_timeout(timeout: int, runtime: str) -> None:
    svc = isvc(model=CAUSAL, runtime=runtime, startupTimeoutSeconds=timeout, resources=GPUS)
    c = container(predictor(svc))
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == timeout
    assert 1 <= probe["periodSeconds"] <= 10
    assert startup_probe_timing(timeout) == (probe["periodSeconds"], probe["failureThreshold"])


def test_openai_base_url() -> None:
    assert openai_base_url(isvc(), CFG) == "http://sentiment.ml.svc.cluster.local/v1"


@pytest.mark.parametrize(
    "bad", ["pvc://models/../secrets", "pvc://models//m", "pvc://models/m/", "file:///a/./b"]
)
def test_model_path_segments_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSpec, match="path segments are not allowed"):
        predictor(isvc(), OperatorConfig(allow_host_paths=True), source=bad)


def test_tauon_keys_in_pod_template_are_refused() -> None:
    svc = isvc(podTemplate={"annotations": {"tauon.dev/metrics-address": "169.254.169.254:80"}})
    with pytest.raises(InvalidSpec, match="spec.podTemplate.annotations: keys under tauon.dev/"):
        predictor(svc)


def test_server_threads_follow_the_cpu_limit_and_the_user_can_override() -> None:
    """torch's threads = the container's CPU limit (rounded up by Kubernetes), not the node's cores: a
    1-CPU server on a 64-core node would otherwise run 64 threads under a 1-CPU quota."""
    e = env_of(predictor(isvc(resources={"limits": {"cpu": "1"}})))
    assert e["OMP_NUM_THREADS"] == {
        "resourceFieldRef": {"containerName": "server", "resource": "limits.cpu", "divisor": "1"}
    }
    assert container(predictor(isvc()))["name"] == "server"  # the reference names this container
    dep = predictor(isvc(env=[{"name": "OMP_NUM_THREADS", "value": "3"}]))
    names = [x["name"] for x in container(dep)["env"]]
    assert names.count("OMP_NUM_THREADS") == 1 and env_of(dep)["OMP_NUM_THREADS"] == "3"
