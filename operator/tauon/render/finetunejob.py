"""FineTuneJob -> children, exactly per docs/api.md's pod contract. Pure and deterministic.

`resolve` fills status.resolved (tauon.api's `Resolved`, the one definition) with the defaults frozen at
creation; the planner writes what it returns into the status. Label keys are tauon.api.names'."""

from __future__ import annotations

import json

from tauon.api.finetunejob import FineTuneJob, LoraSpec, Resolved
from tauon.api.names import (
    FINETUNEJOB,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_RANK,
    POD_GROUP_API_VERSIONS,
    Manifest,
)
from tauon.render.common import (
    InvalidSpec,
    Storage,
    apply_overrides,
    check_reserved_keys,
    child_meta,
    container_resources,
    container_security,
    covering_mount,
    env_list,
    gpu_count,
    merge_env,
    pod_security,
    s3_env,
)
from tauon.render.config import OperatorConfig

CONFIG_DIR = "/etc/tauon"
CONFIG_PATH = f"{CONFIG_DIR}/job.json"
CONTAINER = "trainer"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


DATASET_FIELD_DEFAULTS = [
    ("messagesField", "chat", "messages"),
    ("promptField", "prompt-completion", "prompt"),
    ("completionField", "prompt-completion", "completion"),
]
DEFAULT_SHM_SIZE = "2Gi"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def service_name(job: str) -> str:
    return f"{job}-nodes"


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-r{attempt}-node-{rank}"


def pod_group_name(job: str, attempt: int) -> str:
    return f"{job}-r{attempt}"


def resolve(job: FineTuneJob, cfg: OperatorConfig, frozen: Resolved | None = None) -> Resolved:
    """status.resolved (`frozen`, by default the job's) with the defaults frozen at creation filled in:
    image, processes per node and backend. What is already frozen wins; the other fields are kept."""
    st = job.status.resolved if frozen is None else frozen
    gpus = gpu_count(job.spec.resources)
    nproc = job.spec.nproc_per_node
    computed_nproc = (gpus if gpus > 0 else 1) if nproc == "auto" else int(nproc)
    return st.model_copy(
        update={
            "image": st.image or job.spec.image or cfg.default_image,
            "nproc_per_node": st.nproc_per_node or computed_nproc,
            "backend": st.backend or ("nccl" if gpus > 0 else "gloo"),
        }
    )


def _frozen(r: Resolved) -> tuple[str, int, str]:
    """(image, nproc_per_node, backend) of a `resolve` result, which always sets them."""
    if r.image is None or r.nproc_per_node is None or r.backend is None:
        raise ValueError("status.resolved without image, nprocPerNode or backend: call resolve() first")
    return r.image, r.nproc_per_node, r.backend


def validate(job: FineTuneJob, cfg: OperatorConfig) -> None:
    """Rules the schema cannot check; raises InvalidSpec naming the field."""
    gpus = gpu_count(job.spec.resources)
    nproc = job.spec.nproc_per_node
    if nproc != "auto" and gpus > 0 and int(nproc) > gpus:
        raise InvalidSpec(
            f"spec.nprocPerNode ({nproc}) is larger than the GPUs requested per node "
            f"(spec.resources nvidia.com/gpu: {gpus})"
        )
    limits = job.spec.resources.limits.get("nvidia.com/gpu")
    requests = job.spec.resources.requests.get("nvidia.com/gpu")
    if limits is not None and requests is not None and str(limits) != str(requests):
        raise InvalidSpec("spec.resources: nvidia.com/gpu requests and limits must be equal")
    check_reserved_keys(job.spec.pod_template, "spec.podTemplate")
    model = job.spec.model
    if model.init == "scratch" and (model.config is None or model.tokenizer is None):
        raise InvalidSpec("spec.model: init scratch needs spec.model.config and spec.model.tokenizer")
    if model.init == "pretrained" and model.source is None:
        raise InvalidSpec("spec.model.source is required unless spec.model.init is scratch")
    _storage(job, cfg)  # raises on unusable URIs


def _storage(job: FineTuneJob, cfg: OperatorConfig) -> tuple[Storage, dict[str, str]]:
    s = Storage()
    model = job.spec.model
    paths: dict[str, str] = {}
    if model.source is not None:
        paths["model"] = s.add(model.source, "spec.model.source", cfg)
    if model.tokenizer is not None:
        paths["tokenizer"] = s.add(model.tokenizer, "spec.model.tokenizer", cfg)
    paths["dataset"] = s.add(job.spec.dataset.source, "spec.dataset.source", cfg)
    cache = job.spec.dataset.cache
    if cache is not None and cache.storage is not None:
        paths["cache"] = s.add(cache.storage, "spec.dataset.cache.storage", cfg, write=True)
    paths["output"] = s.add(job.spec.output.storage, "spec.output.storage", cfg, write=True)
    s.finish()
    return s, paths


def shared_claims(job: FineTuneJob) -> dict[str, str]:
    """claim -> the access it needs when numNodes > 1 ('write' for output, else 'read')."""
    out: dict[str, str] = {}
    for uri, mode in (
        (job.spec.model.source, "read"),
        (job.spec.model.tokenizer, "read"),
        (job.spec.dataset.source, "read"),
        (job.spec.dataset.cache.storage if job.spec.dataset.cache else None, "write"),
        (job.spec.output.storage, "write"),
    ):
        if uri is not None and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            out[claim] = "write" if mode == "write" or out.get(claim) == "write" else "read"
    return out


def job_config(job: FineTuneJob, cfg: OperatorConfig) -> dict[str, object]:
    """The trainer's /etc/tauon/job.json (camelCase, defaults filled, local paths resolved).

    Top-level `uid` is the job's metadata.uid: the trainer refuses a config whose uid differs from
    TAUON_JOB_UID and records it as the output's owner. The attempt is not here (the ConfigMap is
    immutable and shared by all attempts): it comes from TAUON_ATTEMPT."""
    storage, paths = _storage(job, cfg)
    spec = job.spec
    model = spec.model.dump()
    model.pop("tokenSecretRef", None)
    if "model" in paths:
        model["path"] = paths["model"]
    if "tokenizer" in paths:
        model["tokenizerPath"] = paths["tokenizer"]
    dataset = spec.dataset.dump()
    if spec.model.task == "sequence-classification" and spec.dataset.label_field is None:
        dataset["labelField"] = "label"
    for key, dtype, default in DATASET_FIELD_DEFAULTS:
        if spec.dataset.type == dtype:
            dataset.setdefault(key, default)
    if spec.dataset.type != "text":
        dataset.pop("textField", None)
    dataset["path"] = paths["dataset"]
    cache = spec.dataset.cache
    if cache is not None and cache.storage is not None:
        dataset["cache"] = {"storage": cache.storage, "path": paths["cache"]}
    method = spec.method.dump()
    if spec.method.type == "lora" and spec.method.lora is None:
        method["lora"] = LoraSpec().dump()
    hp = spec.hyperparameters.model_dump(by_alias=True, mode="json")  # keep maxSteps: null
    output = spec.output.dump()
    output["path"] = paths["output"]
    # The volume mount that holds the output: the trainer refuses a path that resolves outside it.
    output["mountPath"] = covering_mount(storage, paths["output"])
    return {
        "name": job.metadata.name,
        "namespace": job.metadata.namespace,
        "uid": job.metadata.uid,
        "model": model,
        "dataset": dataset,
        "method": method,
        "hyperparameters": hp,
        "output": output,
        "parallelism": spec.parallelism.dump(),
    }


def render_config_map(job: FineTuneJob, cfg: OperatorConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_meta(
            FINETUNEJOB, job.metadata, config_map_name(job.metadata.name), {LABEL_JOB: job.metadata.name}
        ),
        # immutable: a pod can never read a config other than the one rendered for this job (uid)
        "immutable": True,
        "data": {"job.json": json.dumps(job_config(job, cfg), indent=2, sort_keys=True)},
    }


def render_service(job: FineTuneJob, cfg: OperatorConfig) -> Manifest:
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_meta(FINETUNEJOB, job.metadata, service_name(name), {LABEL_JOB: name}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name},
            "ports": [
                {"name": "dist", "port": cfg.master_port, "targetPort": cfg.master_port, "protocol": "TCP"}
            ],
        },
    }


def pod_labels(job: FineTuneJob, attempt: int, rank: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tauon-trainer",
        LABEL_JOB: job.metadata.name,
        LABEL_ATTEMPT: str(attempt),
        LABEL_RANK: str(rank),
    }


def trainer_env(
    job: FineTuneJob, cfg: OperatorConfig, attempt: int, rank: int, nproc: int, backend: str
) -> list[Manifest]:
    spec = job.spec
    name = job.metadata.name
    master = f"{pod_name(name, attempt, 0)}.{service_name(name)}"
    values = {
        "PET_NNODES": spec.num_nodes,
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": rank,
        "PET_MASTER_ADDR": master,
        "PET_MASTER_PORT": cfg.master_port,
        "PET_RDZV_CONF": f"timeout={spec.run_policy.schedule_timeout_seconds + 60}",
        "MASTER_ADDR": master,
        "MASTER_PORT": cfg.master_port,
        "NODE_RANK": rank,
        "NNODES": spec.num_nodes,
        "NPROC_PER_NODE": nproc,
        "WORLD_SIZE": spec.num_nodes * nproc,
        "TAUON_DIST_BACKEND": backend,
        "TAUON_JOB_NAME": name,
        "TAUON_JOB_UID": job.metadata.uid,
        "TAUON_ATTEMPT": attempt,
        "TAUON_CONFIG": CONFIG_PATH,
        "TAUON_METRICS_PORT": cfg.metrics_port,
        "HF_HOME": "/tmp/hf-home",
    }
    env: list[Manifest] = [{"name": k, "value": str(v)} for k, v in values.items()]
    if backend == "nccl":
        env += [
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
            {"name": "NCCL_DEBUG", "value": "WARN"},
        ]
    ref = spec.model.token_secret_ref
    if ref is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env += s3_env(spec.storage)
    # user env may override NCCL_* and our other non-reserved defaults (one definition per name)
    return merge_env(env, env_list(list(spec.env)), overridable_prefix=("NCCL_", "TORCH_NCCL_", "HF_"))


def shm_size_limit(job: FineTuneJob) -> str:
    """sizeLimit of the memory-backed /dev/shm: the pod's memory limit (else request) when set, so a
    runaway writer is evicted instead of starving the node; else DEFAULT_SHM_SIZE."""
    res = job.spec.resources
    mem = res.limits.get("memory", res.requests.get("memory"))
    return str(mem) if mem is not None else DEFAULT_SHM_SIZE


def render_pod(job: FineTuneJob, cfg: OperatorConfig, attempt: int, rank: int) -> Manifest:
    spec = job.spec
    name = job.metadata.name
    image, nproc, backend = _frozen(resolve(job, cfg))
    storage, _ = _storage(job, cfg)
    tpl = spec.pod_template
    labels = {**tpl.labels, **pod_labels(job, attempt, rank)}
    annotations = dict(tpl.annotations)
    if KUEUE_QUEUE in tpl.labels:
        labels["kueue.x-k8s.io/pod-group-name"] = pod_group_name(name, attempt)
        annotations["kueue.x-k8s.io/pod-group-total-count"] = str(spec.num_nodes)
    if cfg.gang_scheduler == "volcano":
        annotations["scheduling.k8s.io/group-name"] = pod_group_name(name, attempt)
    elif cfg.gang_scheduler == "scheduler-plugins":
        labels["scheduling.x-k8s.io/pod-group"] = pod_group_name(name, attempt)

    container: Manifest = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun"],
        "args": ["--max-restarts=0", "-m", "tauon_train.train", "--config", CONFIG_PATH],
        "env": trainer_env(job, cfg, attempt, rank, nproc, backend),
        "ports": [
            {"name": "dist", "containerPort": cfg.master_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": cfg.metrics_port, "protocol": "TCP"},
        ],
        "resources": container_resources(spec.resources),
        "securityContext": container_security(),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *storage.mounts,
        ],
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "hostname": pod_name(name, attempt, rank),
        "subdomain": service_name(name),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "securityContext": pod_security(cfg),
        "containers": [container],
        "volumes": [
            {"name": "job-config", "configMap": {"name": config_map_name(name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size_limit(job)}},
            *storage.volumes,
        ],
    }
    apply_overrides(pod_spec, tpl, [GPU_TOLERATION] if backend == "nccl" else [])
    gang_scheduler = cfg.scheduler_for_gang()
    if gang_scheduler and "schedulerName" not in pod_spec:
        pod_spec["schedulerName"] = gang_scheduler
    meta = child_meta(FINETUNEJOB, job.metadata, pod_name(name, attempt, rank), labels)
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def render_pod_group(job: FineTuneJob, cfg: OperatorConfig, attempt: int) -> Manifest | None:
    name = job.metadata.name
    labels = {LABEL_JOB: name, LABEL_ATTEMPT: str(attempt)}
    meta = child_meta(FINETUNEJOB, job.metadata, pod_group_name(name, attempt), labels)
    if cfg.gang_scheduler == "volcano":
        return {
            "apiVersion": POD_GROUP_API_VERSIONS["volcano"],
            "kind": "PodGroup",
            "metadata": meta,
            "spec": {"minMember": job.spec.num_nodes},
        }
    if cfg.gang_scheduler == "scheduler-plugins":
        return {
            "apiVersion": POD_GROUP_API_VERSIONS["scheduler-plugins"],
            "kind": "PodGroup",
            "metadata": meta,
            "spec": {
                "minMember": job.spec.num_nodes,
                "scheduleTimeoutSeconds": job.spec.run_policy.schedule_timeout_seconds,
            },
        }
    return None


def render_attempt(job: FineTuneJob, cfg: OperatorConfig, attempt: int) -> list[Manifest]:
    """Everything one attempt needs: ConfigMap, headless Service, PodGroup (if any), the gang's pods."""
    validate(job, cfg)
    out = [render_config_map(job, cfg), render_service(job, cfg)]
    pg = render_pod_group(job, cfg, attempt)
    if pg is not None:
        out.append(pg)
    out += [render_pod(job, cfg, attempt, i) for i in range(job.spec.num_nodes)]
    return out


__all__ = [
    "InvalidSpec",
    "config_map_name",
    "job_config",
    "pod_name",
    "render_attempt",
    "render_pod",
    "resolve",
    "service_name",
    "shared_claims",
    "validate",
]
