"""InferenceService (tauon.dev/v1alpha1): the user-facing serving API of docs/api.md."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from tauon.api.common import (
    MAX_LIST,
    MAX_LONG_STR,
    MAX_STR,
    SERVED_MODEL_SOURCE_PATTERN,
    Condition,
    EnvVar,
    KubeModel,
    LocalObjectReference,
    ObjectMeta,
    PodTemplateOverrides,
    ResourceRequirements,
    SecretKeyRef,
    StatusModel,
    StorageSpec,
    reserved_env_rule,
    source_field,
)
from tauon.api.names import API_VERSION, INFERENCESERVICE, ApiVersion, InferenceServiceKind, Task

RESERVED_SERVER_ENV_PREFIXES = ["TAUON_"]


MODEL_REFS = ("fineTuneJobRef", "fineTuneSweepRef", "source")
EXACTLY_ONE_MODEL = "exactly one of model.fineTuneJobRef, model.fineTuneSweepRef and model.source must be set"


class ServedModelSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in MODEL_REFS) + " == 1",
                    "message": EXACTLY_ONE_MODEL,
                }
            ]
        }
    )

    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None,
        description="A FineTuneJob in the same namespace; served once it Succeeded (its output model).",
    )
    fine_tune_sweep_ref: LocalObjectReference | None = Field(
        default=None,
        description=(
            "A FineTuneSweep in the same namespace; served once it Succeeded: the model of its best trial "
            "(status.best.model), with the task of its template (spec.template.spec.model.task)."
        ),
    )
    source: str | None = source_field(
        "A Hugging Face model directory: pvc://CLAIM/PATH, hf://ORG/NAME (downloaded by the server into "
        "the model cache), s3://BUCKET/PREFIX (downloaded into the model cache before the server starts; "
        "tauon runtime only; credentials from spec.storage.s3) or file:// (dev only). Path segments may "
        "not be empty, `.` or `..`.",
        SERVED_MODEL_SOURCE_PATTERN,
        "model.source",
        required=False,
    )
    task: Task | None = Field(
        default=None,
        description=(
            "sequence-classification or causal-lm. When unset: the referenced FineTuneJob's "
            "spec.model.task (a FineTuneSweep's: its template's), else read from the model by the server "
            "(runtime auto then picks tauon)."
        ),
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key with a Hugging Face token, for hf:// sources."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ServedModelSpec:
        chosen = [self.fine_tune_job_ref, self.fine_tune_sweep_ref, self.source]
        if sum(x is not None for x in chosen) != 1:
            raise ValueError(EXACTLY_ONE_MODEL)
        return self


class Autoscaling(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                }
            ]
        }
    )

    min_replicas: int = Field(default=1, ge=1, le=10000, description="Lower bound for the HPA.")
    max_replicas: int = Field(ge=1, le=10000, description="Upper bound for the HPA.")
    target_cpu_utilization_percentage: int = Field(
        default=70,
        alias="targetCPUUtilizationPercentage",
        ge=1,
        le=100,
        description="Average CPU utilisation the HPA aims for, 1..100.",
    )


class Batching(KubeModel):
    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="Most instances in one forward pass; 1 turns batching off."
    )
    max_latency_milliseconds: int = Field(
        default=10, ge=0, le=60000, description="Longest wait for a batch to fill; 0 turns batching off."
    )


class Canary(KubeModel):
    model: ServedModelSpec = Field(
        description="The canary's model (fineTuneJobRef, fineTuneSweepRef or source)."
    )
    traffic_percent: int = Field(
        ge=0, le=100, description="Share of traffic for the canary, split by replica ratio (see docs)."
    )


class Generation(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!has(self.maxNewTokens) || !has(self.maxModelLength) || "
                        "self.maxNewTokens < self.maxModelLength"
                    ),
                    "message": "spec.generation.maxNewTokens must be smaller than spec.generation.maxModelLength",
                }
            ]
        }
    )

    max_model_length: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description=(
            "Longest sequence, prompt plus generated tokens; a longer request gets 400. Unset: the "
            "model's own (max_position_embeddings in its config.json). vllm: --max-model-len, and vLLM "
            "refuses to start when it exceeds the model's positions; tauon: at most the model's."
        ),
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1048576,
        description=(
            "Server-wide cap on the tokens generated for one request, on both runtimes: a request's "
            "max_tokens above it is lowered to it, and a request without max_tokens generates at most "
            "this many (vllm: --override-generation-config max_new_tokens). Unset: no cap but the "
            "model length (vllm) or the tauon server's default."
        ),
    )
    max_concurrent_sequences: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Sequences decoded together (continuous batching); vllm --max-num-seqs.",
    )


class ServerEnvVar(EnvVar):
    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [reserved_env_rule(RESERVED_SERVER_ENV_PREFIXES, [])]}
    )


class ServingStorage(StorageSpec):
    model_cache_size: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$",
        max_length=32,
        description=(
            "Size limit of the model cache volume (an emptyDir at /var/cache/tauon/models that survives "
            "container restarts): an s3:// model is downloaded into it before the server starts, and "
            "hf:// models are downloaded into it (HF_HOME) by either runtime; e.g. 20Gi for a 7B model "
            "in bf16. Unset: no limit beyond the node's ephemeral storage."
        ),
    )


class InferenceServiceSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!(has(self.runtime) && self.runtime == 'vllm') || "
                        "!has(self.model.task) || self.model.task == 'causal-lm'"
                    ),
                    "message": "spec.runtime vllm serves causal-lm models only",
                },
                {
                    "rule": (
                        "!(has(self.runtime) && self.runtime == 'vllm') || "
                        "((!has(self.model.source) || !self.model.source.startsWith('s3://')) && "
                        "(!has(self.canary) || !has(self.canary.model.source) || "
                        "!self.canary.model.source.startsWith('s3://')))"
                    ),
                    "message": (
                        "spec.runtime vllm cannot serve s3:// models (vLLM reads local directories and "
                        "hf:// ids only): set spec.runtime tauon, which downloads them, or copy the model "
                        "to a pvc:// volume"
                    ),
                },
            ]
        }
    )

    model: ServedModelSpec = Field(
        description="What to serve: exactly one of fineTuneJobRef, fineTuneSweepRef or source."
    )
    replicas: int = Field(
        default=1, ge=0, le=10000, description="Predictor replicas; with autoscaling the HPA owns them."
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="HorizontalPodAutoscaler v2 on CPU targeting <name>-predictor."
    )
    runtime: Literal["auto", "tauon", "vllm"] = Field(
        default="auto",
        description=(
            "Model server: tauon (python -m tauon_serve.serve: KServe V1/V2 and, for causal-lm, the OpenAI "
            "API) or vllm (vllm serve, the operator's --vllm-image; causal-lm only; not s3:// models; "
            "the pods must request nvidia.com/gpu unless spec.image is set). "
            "auto: vllm when the served task is causal-lm, the pods request nvidia.com/gpu and the model "
            "is not in s3://, tauon otherwise. The choice is reported in status.resolved.runtime."
        ),
    )
    generation: Generation = Field(
        default_factory=Generation, description="Text generation limits (causal-lm), for both runtimes."
    )
    startup_timeout_seconds: int = Field(
        default=1800,
        ge=1,
        le=86400,
        description=(
            "Seconds a server may take to load its model before Kubernetes restarts it (the startupProbe's "
            "failureThreshold x periodSeconds)."
        ),
    )
    batching: Batching = Field(
        default_factory=Batching, description="Dynamic batching in the tauon model server (non-generative)."
    )
    canary: Canary | None = Field(default=None, description="A second version behind the same Service.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Resources of each server pod."
    )
    image: str | None = Field(
        default=None,
        description="Server image; defaults to the operator's configured image.",
        max_length=MAX_LONG_STR,
    )
    env: list[ServerEnvVar] = Field(
        default_factory=list,
        description="Extra environment for the server. TAUON_* is reserved.",
        max_length=MAX_LIST,
    )
    pod_template: PodTemplateOverrides = Field(
        default_factory=PodTemplateOverrides, description="Bounded overrides applied to every server pod."
    )
    storage: ServingStorage | None = Field(
        default=None,
        description=(
            "Object storage settings for s3:// models (endpoint, region, credentials) and the size of "
            "the model cache volume (s3:// and hf:// models)."
        ),
    )


class ResolvedModel(StatusModel):
    source: str | None = Field(default=None, description="Resolved model location (storage URI).")
    fine_tune_job: str | None = Field(
        default=None,
        description="The FineTuneJob it came from, if any (with fineTuneSweepRef: the sweep's best trial).",
    )
    fine_tune_sweep: str | None = Field(default=None, description="The FineTuneSweep it came from, if any.")
    task: Task | None = Field(
        default=None,
        description="The served task (spec.model.task, or the FineTuneJob's or FineTuneSweep's), when known.",
    )


class ResolvedServing(StatusModel):
    runtime: Literal["tauon", "vllm"] | None = Field(
        default=None, description="The predictor's model server after resolving spec.runtime auto."
    )


class OpenAIStatus(StatusModel):
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        description="OpenAI-compatible base URL (causal-lm): http://<service>.<namespace>.svc.<domain>/v1.",
        max_length=MAX_STR,
    )
    model: str | None = Field(
        default=None,
        description="The model name OpenAI requests must send (the InferenceService's name).",
        max_length=MAX_STR,
    )


class CanaryStatus(StatusModel):
    replicas: int = Field(default=0, description="Canary replicas.")
    effective_traffic_percent: int = Field(
        default=0, description="Canary share implied by the replica ratio (what traffic really sees)."
    )


class InferenceServiceStatus(StatusModel):
    phase: Literal["Pending", "Ready", "NotReady", "Failed"] = Field(
        default="Pending", description="Summary derived from conditions; for display only."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="ModelReady, PredictorReady, CanaryReady (with a canary) and Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="Generation the status describes.")
    url: str | None = Field(default=None, description="In-cluster URL of the Service.", max_length=MAX_STR)
    replicas: int = Field(
        default=0, description="Server replicas, predictor plus canary (scale subresource)."
    )
    ready_replicas: int = Field(default=0, description="Ready server replicas, predictor plus canary.")
    selector: str = Field(
        default="", description="Label selector of the server pods, predictor and canary (scale subresource)."
    )
    model: ResolvedModel = Field(default_factory=ResolvedModel, description="Resolved model location.")
    canary: CanaryStatus = Field(default_factory=CanaryStatus, description="Canary replicas and share.")
    resolved: ResolvedServing = Field(
        default_factory=ResolvedServing, description="Choices the operator made (runtime)."
    )
    openai: OpenAIStatus = Field(
        default_factory=OpenAIStatus,
        description="How to call the service with an OpenAI client (causal-lm models only).",
    )


class InferenceService(KubeModel):
    model_config = ConfigDict(extra="ignore")

    api_version: ApiVersion = Field(default=API_VERSION, description="API version.")
    kind: InferenceServiceKind = Field(default=INFERENCESERVICE, description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: InferenceServiceSpec = Field(description="Desired serving setup.")
    status: InferenceServiceStatus = Field(
        default_factory=InferenceServiceStatus, description="Observed state."
    )
