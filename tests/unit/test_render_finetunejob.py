"""FineTuneJob rendering against docs/api.md's pod contract. Pure: no cluster, no network."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from tauon.api.finetunejob import FineTuneJob
from tauon.render.common import PVC_ROOT, InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import (
    config_map_name,
    job_config,
    pod_name,
    render_attempt,
    render_pod,
    resolve,
    service_name,
    shared_claims,
    validate,
)
from tests.manifests import PVC_SPEC, deep_merge, finetunejob

Manifest = dict[str, Any]
CFG = OperatorConfig()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PET_AND_TORCHRUN = {
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_RDZV_CONF",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "NNODES",
    "NPROC_PER_NODE",
    "WORLD_SIZE",
}


def make_job(spec: dict[str, Any] | None = None, name: str = "ft", **meta: Any) -> FineTuneJob:
    body = finetunejob(
        name,
        namespace="team-a",
        metadata={"uid": "uid-123", "generation": 1, **meta},
        base=deep_merge({**PVC_SPEC, "resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}, spec or {}),
    )
    return FineTuneJob.model_validate(body)


GPU = {"resources": {"requests": {"cpu": "4", "nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}


def pods_of(children: list[Manifest]) -> list[Manifest]:
    return [c for c in children if c["kind"] == "Pod"]


def one(children: list[Manifest], kind: str) -> Manifest:
    found = [c for c in children if c["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def trainer(pod: Manifest) -> Manifest:
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trainer"]
    return dict(containers[0])


def env_of(pod: Manifest) -> dict[str, Any]:
    env = trainer(pod)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


def mounts_of(pod: Manifest) -> dict[str, Manifest]:
    return {m["mountPath"]: m for m in trainer(pod)["volumeMounts"]}


def volumes_of(pod: Manifest) -> dict[str, Manifest]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def mount_of(pod: Manifest, path: str) -> Manifest:
    """The (innermost) mount that holds `path`."""
    hits = [(mp, m) for mp, m in mounts_of(pod).items() if path == mp or path.startswith(mp + "/")]
    assert hits, f"{path} is under no mount"
    return max(hits, key=lambda h: len(h[0]))[1]


def config_of(children: list[Manifest]) -> dict[str, Any]:
    cm = one(children, "ConfigMap")
    assert list(cm["data"]) == ["job.json"]
    return dict(json.loads(cm["data"]["job.json"]))


def walk_strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in walk_strings(k) + walk_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in walk_strings(v)]
    return []


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("attempt", [0, 3])
def test_gang_names_hostnames_and_rank_labels(nodes: int, attempt: int) -> None:
    job = make_job({"numNodes": nodes})
    children = render_attempt(job, CFG, attempt)
    pods = pods_of(children)
    assert [p["metadata"]["name"] for p in pods] == [f"ft-r{attempt}-node-{i}" for i in range(nodes)]
    for i, p in enumerate(pods):
        assert p["apiVersion"] == "v1"
        assert p["metadata"]["namespace"] == "team-a"
        assert p["spec"]["hostname"] == f"ft-r{attempt}-node-{i}"
        assert p["spec"]["subdomain"] == "ft-nodes"
        labels = p["metadata"]["labels"]
        assert labels["tauon.dev/job-name"] == "ft"
        assert labels["tauon.dev/attempt"] == str(attempt)
        assert labels["tauon.dev/node-rank"] == str(i)
        assert labels["app.kubernetes.io/managed-by"] == "tauon"
        env = env_of(p)
        assert env["PET_NODE_RANK"] == env["NODE_RANK"] == str(i)
        assert env["PET_NNODES"] == env["NNODES"] == str(nodes)
        assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"] == f"ft-r{attempt}-node-0.ft-nodes"
        assert env["TAUON_ATTEMPT"] == str(attempt)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "Service"] + ["Pod"] * nodes


def test_name_helpers() -> None:
    assert pod_name("job", 7, 3) == "job-r7-node-3"
    assert service_name("job") == "job-nodes"
    assert config_map_name("job") == "job-config"


def test_longest_names_stay_dns_labels() -> None:
    name = "a" * 40
    job = make_job({"numNodes": 1024}, name=name)
    pod = render_pod(job, CFG, 100, 1023)
    assert pod["metadata"]["name"] == f"{name}-r100-node-1023"
    for n in (pod["metadata"]["name"], pod["spec"]["hostname"], pod["spec"]["subdomain"]):
        assert len(n) <= 63 and DNS_LABEL.match(n)
    for v in pod["spec"]["volumes"]:
        assert len(v["name"]) <= 63 and DNS_LABEL.match(v["name"]), v["name"]


# -------------------------------------------------------------------------------------------- service


def test_headless_service_publishes_not_ready_addresses() -> None:
    job = make_job()
    children = render_attempt(job, CFG, 0)
    svc = one(children, "Service")
    assert svc["apiVersion"] == "v1"
    assert svc["metadata"]["name"] == "ft-nodes"
    assert svc["metadata"]["namespace"] == "team-a"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in svc["spec"]["ports"]] == [CFG.master_port]
    selector = svc["spec"]["selector"]
    for p in pods_of(children):
        labels = p["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items())


def test_service_port_follows_operator_config() -> None:
    cfg = OperatorConfig(master_port=23456)
    children = render_attempt(make_job(), cfg, 0)
    assert one(children, "Service")["spec"]["ports"][0]["port"] == 23456
    env = env_of(pods_of(children)[0])
    assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == "23456"
    ports = {p["name"]: p["containerPort"] for p in trainer(pods_of(children)[0])["ports"]}
    assert ports["dist"] == 23456


# ------------------------------------------------------------------------------------- config map


def test_config_map_paths_map_pvc_uris_to_mount_points() -> None:
    job = make_job()
    children = render_attempt(job, CFG, 0)
    cm = one(children, "ConfigMap")
    assert cm["metadata"]["name"] == "ft-config"
    assert cm["metadata"]["namespace"] == "team-a"
    conf = config_of(children)
    assert conf["name"] == "ft"
    assert conf["namespace"] == "team-a"
    assert conf["model"]["path"] == f"{PVC_ROOT}/models/minilm"
    assert conf["dataset"]["path"] == f"{PVC_ROOT}/data/sentiment.jsonl"
    assert conf["output"]["path"] == f"{PVC_ROOT}/results/sentiment-ft"
    # every path lies under one of the pod's mounts of the right claim
    pod = pods_of(children)[0]
    vols = volumes_of(pod)
    for key, claim in (("model", "models"), ("dataset", "data"), ("output", "results")):
        path = conf[key]["path"]
        mount = mount_of(pod, path)
        assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
        # the claim is mounted with subPath: only PATH is visible, never the whole claim
        assert mount["subPath"] == path.removeprefix(f"{PVC_ROOT}/{claim}/")
        assert mount["mountPath"] == path


def test_config_map_mounted_read_only_and_referenced() -> None:
    children = render_attempt(make_job(), CFG, 0)
    pod = pods_of(children)[0]
    env = env_of(pod)
    config_path = env["TAUON_CONFIG"]
    mount = next(m for mp, m in mounts_of(pod).items() if config_path.startswith(mp + "/"))
    assert mount["readOnly"] is True
    assert volumes_of(pod)[mount["name"]]["configMap"]["name"] == "ft-config"
    assert config_path.endswith("/job.json")
    assert config_path in trainer(pod)["args"]


def test_config_defaults_filled_and_secrets_left_out() -> None:
    job = make_job(
        {
            "model": {"source": "hf://org/model", "tokenSecretRef": {"name": "hf", "key": "token"}},
            "method": {"type": "lora"},
            "hyperparameters": {"epochs": 2},
        }
    )
    conf = job_config(job, CFG)
    assert conf["model"]["path"] == "hf://org/model"  # hub ids stay ids
    assert "tokenSecretRef" not in conf["model"]
    assert "token" not in json.dumps(conf).replace("tokenizer", "")
    assert conf["dataset"]["labelField"] == "label"
    assert conf["dataset"]["textField"] == "text"
    assert conf["method"]["lora"] == {
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "targetModules": ["query", "value"],
    }
    assert conf["hyperparameters"]["maxSteps"] is None
    assert conf["hyperparameters"]["epochs"] == 2
    assert conf["output"]["checkpointEverySteps"] == 200


def test_config_causal_lm_has_no_label_field() -> None:
    job = make_job({"model": {"source": "hf://org/gpt", "task": "causal-lm", "numLabels": None}})
    conf = job_config(job, CFG)
    assert "labelField" not in conf["dataset"]
    assert "numLabels" not in conf["model"]
    assert conf["model"]["task"] == "causal-lm"


def test_config_map_json_is_stable() -> None:
    a = one(render_attempt(make_job(), CFG, 0), "ConfigMap")["data"]["job.json"]
    b = one(render_attempt(make_job(), CFG, 5), "ConfigMap")["data"]["job.json"]
    assert a == b  # the config does not depend on the attempt


# ------------------------------------------------------------------------------------ nproc, backend


@pytest.mark.parametrize(
    ("resources", "nproc", "expected", "backend"),
    [
        ({"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}, "auto", 8, "nccl"),
        ({"requests": {"nvidia.com/gpu": 8}, "limits": {"nvidia.com/gpu": 8}}, "auto", 8, "nccl"),
        ({"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}, 4, 4, "nccl"),
        ({"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}, 1, 1, "nccl"),
        ({"limits": {"nvidia.com/gpu": "2"}}, "auto", 2, "nccl"),
        ({"requests": {"cpu": "4"}}, "auto", 1, "gloo"),
        ({"requests": {"cpu": "4"}}, 4, 4, "gloo"),
        ({"requests": {"nvidia.com/gpu": "0"}}, "auto", 1, "gloo"),
        ({}, "auto", 1, "gloo"),
    ],
)
@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_nproc_per_node_and_world_size(
    resources: dict[str, Any], nproc: int | str, expected: int, backend: str, nodes: int
) -> None:
    job = make_job({"numNodes": nodes, "nprocPerNode": nproc})
    job.spec.resources = type(job.spec.resources).model_validate(resources)
    r = resolve(job, CFG)
    assert r.nproc_per_node == expected
    assert r.backend == backend
    children = render_attempt(job, CFG, 0)
    for p in pods_of(children):
        env = env_of(p)
        assert env["PET_NPROC_PER_NODE"] == env["NPROC_PER_NODE"] == str(expected)
        assert env["WORLD_SIZE"] == str(nodes * expected)
        assert env["TAUON_DIST_BACKEND"] == backend
        assert "auto" not in walk_strings(trainer(p)), "the word auto must never be rendered"
        assert not any(s == "auto" or s.endswith("=auto") for s in walk_strings(p))


def test_pet_environment_exactly_per_contract() -> None:
    job = make_job({"numNodes": 3, "nprocPerNode": 2, "runPolicy": {"scheduleTimeoutSeconds": 100}, **GPU})
    pod = render_pod(job, CFG, 4, 2)
    env = env_of(pod)
    got = {k: v for k, v in env.items() if k in PET_AND_TORCHRUN}
    assert got == {
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": "2",
        "PET_MASTER_ADDR": "ft-r4-node-0.ft-nodes",
        "PET_MASTER_PORT": "29500",
        "PET_RDZV_CONF": "timeout=160",
        "MASTER_ADDR": "ft-r4-node-0.ft-nodes",
        "MASTER_PORT": "29500",
        "NODE_RANK": "2",
        "NNODES": "3",
        "NPROC_PER_NODE": "2",
        "WORLD_SIZE": "6",
    }
    # no other PET_ variables, no per-process torchrun values (torchrun sets RANK/LOCAL_RANK itself)
    assert {k for k in env if k.startswith("PET_")} == {k for k in PET_AND_TORCHRUN if k.startswith("PET_")}
    assert "RANK" not in env and "LOCAL_RANK" not in env
    assert env["TAUON_JOB_NAME"] == "ft"
    # every value is a string (EnvVar.value is a string in the Kubernetes API)
    assert all(isinstance(e.get("value", ""), str) for e in trainer(pod)["env"])


@pytest.mark.parametrize("timeout", [1, 300, 3600])
def test_rendezvous_timeout_is_schedule_timeout_plus_60(timeout: int) -> None:
    job = make_job({"runPolicy": {"scheduleTimeoutSeconds": timeout}})
    for p in pods_of(render_attempt(job, CFG, 0)):
        assert env_of(p)["PET_RDZV_CONF"] == f"timeout={timeout + 60}"


def test_gpu_pods_get_nccl_settings_cpu_pods_do_not() -> None:
    gpu = env_of(render_pod(make_job(GPU), CFG, 0, 0))
    assert gpu["TAUON_DIST_BACKEND"] == "nccl"
    assert gpu["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert gpu["NCCL_DEBUG"] == "WARN"
    cpu = env_of(render_pod(make_job(), CFG, 0, 0))
    assert cpu["TAUON_DIST_BACKEND"] == "gloo"
    assert not any("NCCL" in k for k in cpu)


def test_gpu_pods_tolerate_the_gpu_taint_once() -> None:
    pod = render_pod(make_job(GPU), CFG, 0, 0)
    assert pod["spec"]["tolerations"] == [GPU_TOLERATION]
    cpu = render_pod(make_job(), CFG, 0, 0)
    assert "tolerations" not in cpu["spec"]
    # the user's identical toleration is not duplicated; theirs come first
    user = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    job = make_job({**GPU, "podTemplate": {"tolerations": [user, GPU_TOLERATION]}})
    assert render_pod(job, CFG, 0, 0)["spec"]["tolerations"] == [user, GPU_TOLERATION]


def test_gpu_resources_rendered_with_equal_limits() -> None:
    pod = render_pod(make_job(GPU), CFG, 0, 0)
    res = trainer(pod)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == "4"
    assert res["limits"]["nvidia.com/gpu"] == "4"
    assert res["requests"]["cpu"] == "4"


def test_gpu_request_without_limit_gets_the_limit_kubernetes_requires() -> None:
    # Extended resources must carry a limit (the API server refuses a pod with only a request).
    job = make_job({"resources": {"requests": {"nvidia.com/gpu": "2", "memory": "1Gi"}}})
    res = trainer(render_pod(job, CFG, 0, 0))["resources"]
    assert res["requests"]["nvidia.com/gpu"] == "2"
    assert res["limits"]["nvidia.com/gpu"] == "2"
    assert "memory" not in res["limits"]


def test_cpu_resources_rendered_as_strings() -> None:
    job = make_job({"resources": {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"memory": "9Gi"}}})
    res = trainer(render_pod(job, CFG, 0, 0))["resources"]
    assert res == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "9Gi"}}


def test_no_resources_renders_no_empty_maps() -> None:
    job = make_job()
    job.spec.resources = type(job.spec.resources)()
    res = trainer(render_pod(job, CFG, 0, 0))["resources"]
    assert res == {}


# ---------------------------------------------------------------------------------------- user env


def test_user_nccl_variables_override_ours() -> None:
    job = make_job(
        {
            **GPU,
            "env": [
                {"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
                {"name": "FOO", "value": "bar"},
            ],
        }
    )
    pod = render_pod(job, CFG, 0, 0)
    env = env_of(pod)  # also asserts the names are unique
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["FOO"] == "bar"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    names = [e["name"] for e in trainer(pod)["env"]]
    assert names[-3:] == ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "FOO"]  # user variables last


def test_user_may_override_non_reserved_defaults_without_duplicates() -> None:
    job = make_job(
        {
            **GPU,
            "env": [
                {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "3"},
                {"name": "HF_HOME", "value": "/cache/hf"},
            ],
        }
    )
    env = env_of(render_pod(job, CFG, 0, 0))  # asserts unique names
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["HF_HOME"] == "/cache/hf"


def test_user_env_value_from_kept() -> None:
    vf = {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    job = make_job({"env": [{"name": "WANDB_API_KEY", "valueFrom": vf}]})
    env = trainer(render_pod(job, CFG, 0, 0))["env"]
    assert {"name": "WANDB_API_KEY", "valueFrom": vf} in env


def test_hf_token_comes_from_the_secret_reference() -> None:
    job = make_job({"model": {"source": "hf://org/m", "tokenSecretRef": {"name": "hf", "key": "tok"}}})
    env = env_of(render_pod(job, CFG, 0, 0))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert "HF_TOKEN" not in env_of(render_pod(make_job(), CFG, 0, 0))


def test_s3_dataset_passes_through_and_storage_credentials_only_as_secret_refs() -> None:
    spec = {
        "dataset": {"source": "s3://corpora/web/"},
        "storage": {
            "s3": {"endpoint": "http://weed.storage.svc:8333", "region": "eu-1", "secretRef": {"name": "s3c"}}
        },
    }
    job = make_job(spec)
    children = render_attempt(job, CFG, 0)
    assert config_of(children)["dataset"]["path"] == "s3://corpora/web/"
    pod = render_pod(job, CFG, 0, 0)
    env = env_of(pod)
    assert env["TAUON_S3_ENDPOINT"] == "http://weed.storage.svc:8333" and env["AWS_REGION"] == "eu-1"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3c", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3c", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_SESSION_TOKEN"] == {
        "secretKeyRef": {"name": "s3c", "key": "AWS_SESSION_TOKEN", "optional": True}
    }
    # no volume for the dataset; nothing of the store's settings leaks beyond the env
    assert "corpora" not in json.dumps(pod["spec"].get("volumes", []))
    no_storage = env_of(render_pod(make_job({"dataset": {"source": "s3://corpora/web/"}}), CFG, 0, 0))
    assert not {k for k in no_storage if k.startswith(("AWS_", "TAUON_S3"))}


def test_dataset_cache_storage_is_mounted_for_writing_and_named_in_job_json() -> None:
    job = make_job({"dataset": {"source": "pvc://data/c", "cache": {"storage": "pvc://cache/tok"}}})
    conf = job_config(job, CFG)
    assert conf["dataset"]["cache"] == {"storage": "pvc://cache/tok", "path": f"{PVC_ROOT}/cache/tok"}
    assert shared_claims(job)["cache"] == "write"
    s3 = job_config(
        make_job({"dataset": {"source": "s3://corpora/c/", "cache": {"storage": "s3://tok/x/"}}}), CFG
    )
    assert s3["dataset"]["cache"] == {"storage": "s3://tok/x/", "path": "s3://tok/x/"}
    assert "cache" not in job_config(make_job(), CFG)["dataset"]  # default: the trainer's <output>/data-cache


@pytest.mark.parametrize(
    "source", ["s3://Corpora/x", "s3://ab/x", "s3://corpora/a//b", "s3:/corpora/x", "gs://corpora/x"]
)
def test_bad_s3_dataset_sources_are_refused(source: str) -> None:
    with pytest.raises((ValidationError, InvalidSpec)):
        render_attempt(make_job({"dataset": {"source": source}}), CFG, 0)


# -------------------------------------------------------------------------------------- pod shape


def test_pod_security() -> None:
    for job in (make_job(), make_job(GPU)):
        pod = render_pod(job, CFG, 0, 0)
        psc = pod["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] != 0
        assert isinstance(psc["fsGroup"], int)
        csc = trainer(pod)["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in csc["capabilities"]
        assert not csc.get("privileged", False)
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod["spec"]
        assert "hostNetwork" not in pod["spec"] and "hostPID" not in pod["spec"]


def test_pod_security_ids_follow_config() -> None:
    cfg = OperatorConfig(run_as_user=4242, fs_group=5353)
    psc = render_pod(make_job(), cfg, 0, 0)["spec"]["securityContext"]
    assert psc["runAsUser"] == 4242
    assert psc["fsGroup"] == 5353


def test_service_account_enables_token() -> None:
    job = make_job({"podTemplate": {"serviceAccountName": "trainer-sa"}})
    spec = render_pod(job, CFG, 0, 0)["spec"]
    assert spec["serviceAccountName"] == "trainer-sa"
    assert spec["automountServiceAccountToken"] is True


def test_dev_shm_is_memory_backed_and_bounded() -> None:
    pod = render_pod(make_job(), CFG, 0, 0)
    mount = mounts_of(pod)["/dev/shm"]
    assert volumes_of(pod)[mount["name"]] == {
        "name": mount["name"],
        "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"},  # the pod's memory request
    }
    limited = render_pod(make_job({"resources": {"limits": {"memory": "16Gi"}}}), CFG, 0, 0)
    assert volumes_of(limited)["dshm"]["emptyDir"]["sizeLimit"] == "16Gi"
    bare_job = make_job()
    bare_job.spec.resources.requests.pop("memory")
    bare = render_pod(bare_job, CFG, 0, 0)
    assert volumes_of(bare)["dshm"]["emptyDir"]["sizeLimit"] == "2Gi"


def test_restart_policy_never_and_termination_message() -> None:
    pod = render_pod(make_job(), CFG, 0, 0)
    assert pod["spec"]["restartPolicy"] == "Never"
    c = trainer(pod)
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["command"][0] == "torchrun"
    assert "--max-restarts=0" in c["args"]


def test_image_default_spec_and_frozen_status() -> None:
    assert trainer(render_pod(make_job(), CFG, 0, 0))["image"] == CFG.default_image
    cfg = OperatorConfig(default_image="reg/trainer:9")
    assert trainer(render_pod(make_job(), cfg, 0, 0))["image"] == "reg/trainer:9"
    job = make_job({"image": "reg/custom:1"})
    assert trainer(render_pod(job, cfg, 0, 0))["image"] == "reg/custom:1"
    # once resolved into status, the frozen values win over a changed default
    job = make_job({"resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}})
    job.status.resolved.image = "reg/frozen:1"
    job.status.resolved.nproc_per_node = 1
    job.status.resolved.backend = "nccl"
    pod = render_pod(job, cfg, 0, 0)
    assert trainer(pod)["image"] == "reg/frozen:1"
    assert env_of(pod)["PET_NPROC_PER_NODE"] == "1"


def test_owner_references_on_every_child() -> None:
    for cfg in (CFG, OperatorConfig(gang_scheduler="volcano")):
        children = render_attempt(make_job(), cfg, 2)
        assert {c["kind"] for c in children} >= {"ConfigMap", "Service", "Pod"}
        for c in children:
            meta = c["metadata"]
            assert meta["namespace"] == "team-a"
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "tauon"
            assert meta["ownerReferences"] == [
                {
                    "apiVersion": "tauon.dev/v1alpha1",
                    "kind": "FineTuneJob",
                    "name": "ft",
                    "uid": "uid-123",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]


# ------------------------------------------------------------------------------------- podTemplate


def test_pod_template_overrides() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    tol = {
        "key": "dedicated",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoSchedule",
        "tolerationSeconds": 5,
    }
    job = make_job(
        {
            "podTemplate": {
                "labels": {"team": "nlp"},
                "annotations": {"example.com/note": "x"},
                "nodeSelector": {"pool": "train"},
                "tolerations": [tol],
                "affinity": affinity,
                "priorityClassName": "high",
                "schedulerName": "my-scheduler",
                "serviceAccountName": "sa",
                "imagePullSecrets": [{"name": "regcred"}],
            }
        }
    )
    for pod in pods_of(render_attempt(job, CFG, 1)):
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["team"] == "nlp"
        assert meta["labels"]["tauon.dev/job-name"] == "ft"
        assert meta["annotations"] == {"example.com/note": "x"}
        assert spec["nodeSelector"] == {"pool": "train"}
        assert spec["tolerations"] == [tol]
        assert spec["affinity"] == affinity
        assert spec["priorityClassName"] == "high"
        assert spec["schedulerName"] == "my-scheduler"
        assert spec["serviceAccountName"] == "sa"
        assert spec["automountServiceAccountToken"] is True
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_no_overrides_render_no_empty_fields() -> None:
    spec = render_pod(make_job(), CFG, 0, 0)["spec"]
    for key in (
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "schedulerName",
        "imagePullSecrets",
    ):
        assert key not in spec
    assert "annotations" not in render_pod(make_job(), CFG, 0, 0)["metadata"]


def test_pod_template_does_not_leak_into_config_map_or_service() -> None:
    job = make_job({"podTemplate": {"labels": {"team": "nlp"}, "annotations": {"a": "b"}}})
    children = render_attempt(job, CFG, 0)
    for c in children:
        if c["kind"] != "Pod":
            assert "team" not in c["metadata"]["labels"]
            assert "annotations" not in c["metadata"]


# -------------------------------------------------------------------------------------- gang / kueue


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_kueue_pod_group_labels(nodes: int) -> None:
    job = make_job({"numNodes": nodes, "podTemplate": {"labels": {"kueue.x-k8s.io/queue-name": "q"}}})
    pods = pods_of(render_attempt(job, CFG, 3))
    assert len(pods) == nodes
    for p in pods:
        assert p["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
        assert p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "ft-r3"
        assert p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == str(nodes)


def test_no_kueue_without_queue_label() -> None:
    job = make_job({"podTemplate": {"labels": {"team": "x"}}})
    for p in pods_of(render_attempt(job, CFG, 0)):
        assert not any(k.startswith("kueue.x-k8s.io/") for k in p["metadata"]["labels"])
        assert not any(k.startswith("kueue.x-k8s.io/") for k in p["metadata"].get("annotations", {}))


def test_no_pod_group_by_default() -> None:
    children = render_attempt(make_job(), CFG, 0)
    assert not any(c["kind"] == "PodGroup" for c in children)
    for p in pods_of(children):
        assert "scheduling.x-k8s.io/pod-group" not in p["metadata"]["labels"]
        assert "scheduling.k8s.io/group-name" not in p["metadata"].get("annotations", {})
        assert "schedulerName" not in p["spec"]


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_volcano_pod_group(nodes: int) -> None:
    cfg = OperatorConfig(gang_scheduler="volcano")
    children = render_attempt(make_job({"numNodes": nodes}), cfg, 2)
    pg = one(children, "PodGroup")
    assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert pg["metadata"]["name"] == "ft-r2"
    assert pg["spec"]["minMember"] == nodes
    pods = pods_of(children)
    assert len(pods) == nodes
    for p in pods:
        assert p["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "ft-r2"
        assert "scheduling.x-k8s.io/pod-group" not in p["metadata"]["labels"]
        assert p["spec"]["schedulerName"] == "volcano"
    # created before the pods so the scheduler sees the group first
    kinds = [c["kind"] for c in children]
    assert kinds.index("PodGroup") < kinds.index("Pod")


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_scheduler_plugins_pod_group(nodes: int) -> None:
    cfg = OperatorConfig(gang_scheduler="scheduler-plugins")
    job = make_job({"numNodes": nodes, "runPolicy": {"scheduleTimeoutSeconds": 77}})
    children = render_attempt(job, cfg, 0)
    pg = one(children, "PodGroup")
    assert pg["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert pg["metadata"]["name"] == "ft-r0"
    assert pg["spec"]["minMember"] == nodes
    assert pg["spec"]["scheduleTimeoutSeconds"] == 77
    for p in pods_of(children):
        assert p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "ft-r0"
        assert "scheduling.k8s.io/group-name" not in p["metadata"].get("annotations", {})
        assert p["spec"]["schedulerName"] == "scheduler-plugins-scheduler"


def test_gang_scheduler_name_from_config_and_user_choice_wins() -> None:
    cfg = OperatorConfig(gang_scheduler="scheduler-plugins", gang_scheduler_name="sp")
    assert render_pod(make_job(), cfg, 0, 0)["spec"]["schedulerName"] == "sp"
    job = make_job({"podTemplate": {"schedulerName": "mine"}})
    assert render_pod(job, cfg, 0, 0)["spec"]["schedulerName"] == "mine"


# ------------------------------------------------------------------------------------------ storage


def test_source_claims_read_only_output_claim_writable() -> None:
    pod = render_pod(make_job(), CFG, 0, 0)
    vols = volumes_of(pod)
    by_claim = {
        vols[m["name"]]["persistentVolumeClaim"]["claimName"]: m
        for m in trainer(pod)["volumeMounts"]
        if "persistentVolumeClaim" in vols[m["name"]]
    }
    assert set(by_claim) == {"models", "data", "results"}
    assert by_claim["models"]["readOnly"] is True
    assert by_claim["data"]["readOnly"] is True
    assert by_claim["results"]["readOnly"] is False
    assert by_claim["models"]["mountPath"] == f"{PVC_ROOT}/models/minilm"
    assert by_claim["models"]["subPath"] == "minilm"
    assert by_claim["data"]["subPath"] == "sentiment.jsonl"
    assert by_claim["results"]["subPath"] == "sentiment-ft"


def test_claim_shared_by_source_and_output_one_volume_one_subpath_mount_each() -> None:
    job = make_job({"output": {"storage": "pvc://models/out"}, "dataset": {"source": "pvc://models/d.csv"}})
    pod = render_pod(job, CFG, 0, 0)
    pvc_vols = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pvc_vols] == ["models"]
    mounts = {m["subPath"]: m for m in trainer(pod)["volumeMounts"] if m["name"] == pvc_vols[0]["name"]}
    assert set(mounts) == {"minilm", "d.csv", "out"}
    assert [mounts[k]["readOnly"] for k in ("minilm", "d.csv", "out")] == [True, True, False]
    conf = job_config(job, CFG)
    assert conf["dataset"]["path"] == f"{PVC_ROOT}/models/d.csv"
    assert conf["output"]["path"] == f"{PVC_ROOT}/models/out"


def test_nested_paths_on_one_claim_share_the_outer_mount() -> None:
    job = make_job(
        {
            "model": {"source": "pvc://store/exp"},
            "dataset": {"source": "pvc://store/exp/data/train.jsonl"},
            "output": {"storage": "pvc://store/exp/out"},
        }
    )
    pod = render_pod(job, CFG, 0, 0)
    mounts = [m for m in trainer(pod)["volumeMounts"] if m["mountPath"].startswith(PVC_ROOT)]
    assert mounts == [
        {"name": mounts[0]["name"], "mountPath": f"{PVC_ROOT}/store/exp", "subPath": "exp", "readOnly": False}
    ]
    conf = job_config(job, CFG)
    for key in ("model", "dataset", "output"):
        assert mount_of(pod, conf[key]["path"]) is mounts[0]


def test_claim_root_uri() -> None:
    job = make_job({"output": {"storage": "pvc://results"}})
    assert job_config(job, CFG)["output"]["path"] == f"{PVC_ROOT}/results"
    mount = mount_of(render_pod(job, CFG, 0, 0), f"{PVC_ROOT}/results")
    assert "subPath" not in mount and mount["readOnly"] is False


def test_claims_with_similar_names_get_distinct_volumes() -> None:
    job = make_job(
        {
            "model": {"source": "pvc://my.models/base"},
            "dataset": {"source": "pvc://my-models/d.jsonl"},
            "output": {"storage": "pvc://results/o"},
        }
    )
    pod = render_pod(job, CFG, 0, 0)
    names = [v["name"] for v in pod["spec"]["volumes"]]
    assert len(names) == len(set(names)), names
    mount_paths = [m["mountPath"] for m in trainer(pod)["volumeMounts"]]
    assert len(mount_paths) == len(set(mount_paths))
    vols = volumes_of(pod)
    conf = job_config(job, CFG)
    for key, claim in (("model", "my.models"), ("dataset", "my-models")):
        path = conf[key]["path"]
        mount = mount_of(pod, path)
        assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert mount["readOnly"] is True


def test_long_claim_names_stay_distinct_volume_names() -> None:
    a, b = "c" * 60 + "-a", "c" * 60 + "-b"
    job = make_job({"model": {"source": f"pvc://{a}/m"}, "dataset": {"source": f"pvc://{b}/d"}})
    pod = render_pod(job, CFG, 0, 0)
    names = [v["name"] for v in pod["spec"]["volumes"]]
    assert len(names) == len(set(names))
    for n in names:
        assert len(n) <= 63 and DNS_LABEL.match(n)


def test_file_sources_need_allow_host_paths() -> None:
    for field, spec in (
        ("spec.model.source", {"model": {"source": "file:///models/m"}}),
        ("spec.dataset.source", {"dataset": {"source": "file:///data/d.jsonl"}}),
        ("spec.output.storage", {"output": {"storage": "file:///out"}}),
    ):
        job = make_job(spec)
        with pytest.raises(InvalidSpec, match=re.escape(field)) as e:
            render_attempt(job, CFG, 0)
        assert "allow-host-paths" in str(e.value)
        with pytest.raises(InvalidSpec):
            validate(job, CFG)


def test_relative_file_sources_are_invalid_on_a_cluster() -> None:
    cfg = OperatorConfig(allow_host_paths=True)
    for field, spec in (
        ("spec.model.source", {"model": {"source": "file://./models/m"}}),
        ("spec.dataset.source", {"dataset": {"source": "file://./data/d.jsonl"}}),
        ("spec.output.storage", {"output": {"storage": "file://./runs/x"}}),
    ):
        for c in (CFG, cfg):
            with pytest.raises(InvalidSpec, match=re.escape(field)):
                render_attempt(make_job(spec), c, 0)


def test_host_paths_with_allow_host_paths() -> None:
    cfg = OperatorConfig(allow_host_paths=True)
    job = make_job(
        {
            "model": {"source": "file:///srv/models/m"},
            "dataset": {"source": "file:///srv/data/d.jsonl"},
            "output": {"storage": "file:///srv/out"},
        }
    )
    children = render_attempt(job, cfg, 0)
    conf = config_of(children)
    assert conf["model"]["path"] == "/srv/models/m"
    assert conf["dataset"]["path"] == "/srv/data/d.jsonl"
    assert conf["output"]["path"] == "/srv/out"
    pod = pods_of(children)[0]
    host = {v["hostPath"]["path"]: v for v in pod["spec"]["volumes"] if "hostPath" in v}
    assert set(host) == {"/srv/models/m", "/srv/data/d.jsonl", "/srv/out"}
    assert host["/srv/out"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert "type" not in host["/srv/models/m"]["hostPath"]
    mounts = mounts_of(pod)
    for path in host:
        assert mounts[path]["name"] == host[path]["name"]


def test_host_paths_with_similar_names_are_all_mounted() -> None:
    cfg = OperatorConfig(allow_host_paths=True)
    job = make_job(
        {
            "model": {"source": "file:///data/a"},
            "dataset": {"source": "file:///data-a"},
            "output": {"storage": "file:///out"},
        }
    )
    pod = render_pod(job, cfg, 0, 0)
    host = {v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v}
    assert host == {"/data/a", "/data-a", "/out"}
    names = [v["name"] for v in pod["spec"]["volumes"]]
    assert len(names) == len(set(names))
    assert {"/data/a", "/data-a", "/out"} <= set(mounts_of(pod))


def test_host_path_read_and_written_is_created_if_missing() -> None:
    cfg = OperatorConfig(allow_host_paths=True)
    job = make_job({"model": {"source": "file:///srv/run"}, "output": {"storage": "file:///srv/run"}})
    pod = render_pod(job, cfg, 0, 0)
    host = [v for v in pod["spec"]["volumes"] if "hostPath" in v]
    runs = [v for v in host if v["hostPath"]["path"] == "/srv/run"]
    assert len(runs) == 1 and runs[0]["hostPath"]["type"] == "DirectoryOrCreate"
    assert list(mounts_of(pod)).count("/srv/run") == 1


def test_hf_model_needs_no_volume() -> None:
    job = make_job({"model": {"source": "hf://sentence-transformers/all-MiniLM-L6-v2"}})
    pod = render_pod(job, CFG, 0, 0)
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"data", "results"}


def test_shared_claims() -> None:
    assert shared_claims(make_job()) == {"models": "read", "data": "read", "results": "write"}
    job = make_job({"output": {"storage": "pvc://models/o"}})
    assert shared_claims(job) == {"models": "write", "data": "read"}
    job = make_job({"model": {"source": "hf://a/b"}, "dataset": {"source": "pvc://results/d"}})
    assert shared_claims(job) == {"results": "write"}


# -------------------------------------------------------------------------------------- validation


def test_nproc_larger_than_gpus_is_invalid() -> None:
    job = make_job({**GPU, "nprocPerNode": 5})
    with pytest.raises(InvalidSpec, match="spec.nprocPerNode"):
        validate(job, CFG)
    with pytest.raises(InvalidSpec, match="spec.nprocPerNode"):
        render_attempt(job, CFG, 0)
    validate(make_job({**GPU, "nprocPerNode": 4}), CFG)
    validate(make_job({"nprocPerNode": 64}), CFG)  # CPU pods: any process count


def test_gpu_requests_and_limits_must_match() -> None:
    job = make_job({"resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "4"}}})
    with pytest.raises(InvalidSpec, match="nvidia.com/gpu"):
        validate(job, CFG)


def test_fractional_gpu_is_invalid() -> None:
    job = make_job(
        {"resources": {"requests": {"nvidia.com/gpu": "1.5"}, "limits": {"nvidia.com/gpu": "1.5"}}}
    )
    with pytest.raises(InvalidSpec, match="nvidia.com/gpu"):
        validate(job, CFG)


# ------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("cfg", [CFG, OperatorConfig(gang_scheduler="volcano")])
def test_render_is_deterministic_and_does_not_mutate_the_job(cfg: OperatorConfig) -> None:
    spec = {
        **GPU,
        "numNodes": 4,
        "env": [{"name": "B", "value": "1"}, {"name": "A", "value": "2"}],
        "podTemplate": {"labels": {"kueue.x-k8s.io/queue-name": "q", "z": "1", "a": "2"}},
    }
    job = make_job(spec)
    before = job.model_dump(mode="json")
    first = render_attempt(job, cfg, 1)
    second = render_attempt(job, cfg, 1)
    third = render_attempt(make_job(spec), cfg, 1)
    assert first == second == third
    assert json.dumps(first, sort_keys=False) == json.dumps(third, sort_keys=False)  # same key order too
    assert job.model_dump(mode="json") == before
    # mutating one render does not affect the next
    pod = pods_of(first)[0]
    pod["metadata"]["labels"]["x"] = "y"
    pod["spec"]["containers"][0]["env"].append({"name": "X"})
    assert render_attempt(job, cfg, 1) == third


def test_attempts_differ_only_where_they_should() -> None:
    job = make_job()
    a = render_pod(job, CFG, 0, 1)
    b = render_pod(job, CFG, 1, 1)
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert a["spec"]["volumes"] == b["spec"]["volumes"]
    assert trainer(a)["volumeMounts"] == trainer(b)["volumeMounts"]


# -- large models (LARGE-MODELS.md) and issue 13 ---------------------------------------------------------

SCRATCH_MODEL = {
    "init": "scratch",
    "task": "causal-lm",
    "config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2},
    "tokenizer": "pvc://models/tok",
}


def scratch_job(**spec: Any) -> FineTuneJob:
    job = make_job({"model": {"numLabels": None}, **spec})
    body = job.dump()
    body["spec"]["model"] = {**SCRATCH_MODEL, **spec.get("model", {})}
    return FineTuneJob.model_validate(body)


def test_job_json_carries_the_uid_and_env_the_same_uid() -> None:
    children = render_attempt(make_job(), CFG, 3)
    conf = config_of(children)
    assert conf["uid"] == "uid-123"
    assert "attempt" not in conf  # one ConfigMap for all attempts: the attempt comes from TAUON_ATTEMPT
    for pod in pods_of(children):
        env = env_of(pod)
        assert env["TAUON_JOB_UID"] == "uid-123"
        assert env["TAUON_ATTEMPT"] == "3"


def test_config_map_is_immutable() -> None:
    cm = one(render_attempt(make_job(), CFG, 0), "ConfigMap")
    assert cm["immutable"] is True


def test_termination_grace_period_from_run_policy() -> None:
    assert render_pod(make_job(), CFG, 0, 0)["spec"]["terminationGracePeriodSeconds"] == 30
    job = make_job({"runPolicy": {"terminationGracePeriodSeconds": 900}})
    assert render_pod(job, CFG, 0, 0)["spec"]["terminationGracePeriodSeconds"] == 900


def test_scratch_model_without_source_mounts_and_resolves_the_tokenizer() -> None:
    job = scratch_job()
    assert job.spec.model.source is None
    children = render_attempt(job, CFG, 0)
    conf = config_of(children)
    assert conf["model"]["init"] == "scratch"
    assert conf["model"]["config"] == SCRATCH_MODEL["config"]
    assert conf["model"]["tokenizer"] == "pvc://models/tok"
    assert conf["model"]["tokenizerPath"] == f"{PVC_ROOT}/models/tok"
    assert "path" not in conf["model"] and "source" not in conf["model"]
    pod = pods_of(children)[0]
    mount = mount_of(pod, conf["model"]["tokenizerPath"])
    assert mount["subPath"] == "tok" and mount["readOnly"] is True
    assert shared_claims(job)["models"] == "read"


def test_tokenizer_beside_a_pretrained_source() -> None:
    job = make_job({"model": {"tokenizer": "hf://org/tok"}})
    conf = job_config(job, CFG)
    assert conf["model"]["path"] == f"{PVC_ROOT}/models/minilm"
    assert conf["model"]["tokenizerPath"] == "hf://org/tok"
    assert conf["model"]["init"] == "pretrained"


def test_scratch_without_config_or_tokenizer_is_invalid_at_render_too() -> None:
    job = scratch_job()
    job.spec.model.tokenizer = None
    with pytest.raises(InvalidSpec, match="spec.model.tokenizer"):
        validate(job, CFG)
    job = make_job()
    job.spec.model.source = None
    with pytest.raises(InvalidSpec, match="spec.model.source is required"):
        validate(job, CFG)


@pytest.mark.parametrize(
    ("dtype", "fields"),
    [
        ("text", {"textField": "text"}),
        ("chat", {"messagesField": "messages"}),
        ("prompt-completion", {"promptField": "prompt", "completionField": "completion"}),
    ],
)
def test_dataset_type_fields_and_defaults_reach_the_trainer(dtype: str, fields: dict[str, str]) -> None:
    job = make_job(
        {"model": {"task": "causal-lm", "numLabels": None}, "dataset": {"type": dtype, "packing": True}}
    )
    body = job.dump()
    body["spec"]["model"].pop("numLabels", None)
    conf = job_config(FineTuneJob.model_validate(body), CFG)
    ds = conf["dataset"]
    assert ds["type"] == dtype and ds["packing"] is True
    names = {"textField", "messagesField", "promptField", "completionField"}
    assert {k: ds[k] for k in names if k in ds} == fields


def test_custom_chat_field_name_kept() -> None:
    job = make_job({"model": {"task": "causal-lm"}, "dataset": {"type": "chat", "messagesField": "conv"}})
    job.spec.model.num_labels = None
    assert job_config(job, CFG)["dataset"]["messagesField"] == "conv"


def test_parallelism_reaches_the_trainer_with_defaults() -> None:
    assert job_config(make_job(), CFG)["parallelism"] == {
        "strategy": "auto",
        "activationCheckpointing": False,
        "compile": "auto",
    }
    job = make_job({"parallelism": {"strategy": "fsdp", "activationCheckpointing": True}})
    assert job_config(job, CFG)["parallelism"] == {
        "strategy": "fsdp",
        "activationCheckpointing": True,
        "compile": "auto",
    }


@pytest.mark.parametrize(("value", "parsed"), [(True, "true"), (False, "false"), ("auto", "auto")])
def test_parallelism_compile_reaches_the_trainer(value: object, parsed: str) -> None:
    """spec.parallelism.compile (a boolean or "auto") is written to job.json as given and parsed by the
    trainer into its three modes."""
    from tauon_train.config import parse_config

    job = make_job({"parallelism": {"compile": value}})
    rendered = job_config(job, CFG)
    assert rendered["parallelism"]["compile"] == value
    assert parse_config(rendered).parallelism.compile == parsed


@pytest.mark.parametrize("value", ["true", "on", 1, None])
def test_parallelism_compile_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValidationError, match="compile"):
        make_job({"parallelism": {"compile": value}})


@pytest.mark.parametrize(
    ("where", "spec"),
    [
        ("spec.output.storage", {"output": {"storage": "pvc://claim/../../tmp/x"}}),
        ("spec.output.storage", {"output": {"storage": "pvc://claim/out/"}}),
        ("spec.dataset.source", {"dataset": {"source": "pvc://data//train.jsonl"}}),
        ("spec.dataset.source", {"dataset": {"source": "pvc://data/./train.jsonl"}}),
        ("spec.model.source", {"model": {"source": "file:///models/../etc"}}),
        ("spec.model.source", {"model": {"source": "pvc://models/.."}}),
        ("spec.model.tokenizer", {"model": {"tokenizer": "pvc://models/a/../../b"}}),
    ],
)
def test_dot_and_empty_path_segments_are_refused(where: str, spec: dict[str, Any]) -> None:
    job = make_job(spec)
    with pytest.raises(InvalidSpec, match=re.escape(where) + ".*path segments are not allowed"):
        render_attempt(job, OperatorConfig(allow_host_paths=True), 0)


@pytest.mark.parametrize("ok", ["pvc://c/a..b/x", "pvc://c/.hidden/x", "pvc://c/...", "pvc://c"])
def test_dotted_names_that_are_not_dot_segments_are_fine(ok: str) -> None:
    job_config(make_job({"output": {"storage": ok}}), CFG)


@pytest.mark.parametrize("kind", ["labels", "annotations"])
def test_tauon_keys_in_pod_template_are_refused(kind: str) -> None:
    job = make_job({"podTemplate": {kind: {"tauon.dev/metrics-address": "10.0.0.1:80"}}})
    with pytest.raises(InvalidSpec, match=f"spec.podTemplate.{kind}: keys under tauon.dev/ are reserved"):
        render_attempt(job, CFG, 0)


@pytest.mark.parametrize(
    ("model", "output", "mount"),
    [
        ("pvc://models/minilm", "pvc://results/sentiment-ft", f"{PVC_ROOT}/results/sentiment-ft"),
        # the output nested in the model's path on one claim shares the outer (writable) mount
        ("pvc://store/base", "pvc://store/base/ft", f"{PVC_ROOT}/store/base"),
        ("pvc://models/minilm", "pvc://results", f"{PVC_ROOT}/results"),
    ],
)
def test_job_json_names_the_mount_that_holds_the_output(model: str, output: str, mount: str) -> None:
    """The trainer refuses an output path resolving outside this mount (a symlink escape, `..`)."""
    children = render_attempt(make_job({"model": {"source": model}, "output": {"storage": output}}), CFG, 0)
    conf = config_of(children)
    assert conf["output"]["mountPath"] == mount
    mounts = {m["mountPath"] for m in pods_of(children)[0]["spec"]["containers"][0]["volumeMounts"]}
    assert mount in mounts
    assert conf["output"]["path"] == mount or conf["output"]["path"].startswith(mount + "/")
