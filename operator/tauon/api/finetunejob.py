"""FineTuneJob (tauon.dev/v1alpha1): the user-facing training API of docs/api.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, WithJsonSchema, model_validator

from tauon.api.common import (
    DATASET_SOURCE_PATTERN,
    MAX_LIST,
    MAX_LONG_STR,
    MAX_STR,
    MODEL_SOURCE_PATTERN,
    Condition,
    EnvVar,
    KubeModel,
    ObjectMeta,
    PodTemplateOverrides,
    ResourceRequirements,
    SecretKeyRef,
    StatusModel,
    StorageSpec,
    free_form,
    reserved_env_rule,
    source_field,
)
from tauon.api.names import API_VERSION, FINETUNEJOB, ApiVersion, FineTuneJobKind, Task

RESERVED_ENV_PREFIXES = ["PET_", "MASTER_", "TAUON_"]
RESERVED_ENV_NAMES = ["WORLD_SIZE", "RANK", "LOCAL_RANK", "NNODES", "NODE_RANK", "NPROC_PER_NODE"]


SCRATCH = "(has(self.init) && self.init == 'scratch')"
MAX_EVAL_EVERY_STEPS = 2**31 - 1
MAX_EVALUATIONS = 100  # status.progress.evaluations keeps at most this many points


def is_reserved_env(name: str) -> bool:
    return name in RESERVED_ENV_NAMES or any(name.startswith(p) for p in RESERVED_ENV_PREFIXES)


class ModelSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.task != 'sequence-classification' || has(self.numLabels)",
                    "message": "spec.model.numLabels is required when task is sequence-classification",
                },
                {
                    "rule": "self.task != 'causal-lm' || !has(self.numLabels)",
                    "message": "spec.model.numLabels must not be set when task is causal-lm",
                },
                {
                    "rule": f"has(self.source) || {SCRATCH}",
                    "message": "spec.model.source is required unless spec.model.init is scratch",
                },
                {
                    "rule": f"!{SCRATCH} || has(self.config)",
                    "message": "spec.model.config (a Hugging Face config) is required when spec.model.init is scratch",
                },
                {
                    "rule": f"!{SCRATCH} || has(self.tokenizer)",
                    "message": "spec.model.tokenizer is required when spec.model.init is scratch",
                },
                {
                    "rule": f"!has(self.config) || {SCRATCH}",
                    "message": "spec.model.config is only allowed when spec.model.init is scratch",
                },
            ]
        }
    )

    source: str | None = source_field(
        "Where the base model is: pvc://CLAIM/PATH (a Hugging Face model directory on a "
        "PersistentVolumeClaim), hf://ORG/NAME (Hugging Face Hub id), or file:///ABS/PATH and "
        "file://./REL (local runs and clusters whose operator allows host paths). Required unless "
        "init is scratch. Path segments may not be empty, `.` or `..`.",
        MODEL_SOURCE_PATTERN,
        "spec.model.source",
        required=False,
    )
    init: Literal["pretrained", "scratch"] = Field(
        default="pretrained",
        description=(
            "pretrained: start from the weights at source. scratch: random weights built from config "
            "(pre-training); needs config and tokenizer, forbids method.type lora."
        ),
    )
    config: dict[str, Any] | None = free_form(
        "init scratch only (and required there): a Hugging Face model config as an object "
        "(model_type, hidden_size, num_hidden_layers, ...), validated by the trainer (InvalidModelConfig)."
    )
    tokenizer: str | None = source_field(
        "Where the tokenizer is (same schemes as source). Optional: defaults to source; required with "
        "init scratch.",
        MODEL_SOURCE_PATTERN,
        "spec.model.tokenizer",
        required=False,
    )
    task: Task = Field(
        description="sequence-classification (text -> label) or causal-lm (next-token training on text)."
    )
    num_labels: int | None = Field(
        default=None,
        ge=2,
        le=100000,
        description="Number of classes. Required for sequence-classification, forbidden for causal-lm.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face token for hf:// sources. Never put a token in the spec.",
    )


def _only_for_type(field: str, dtype: str) -> Any:
    return {
        "rule": f"!has(self.{field}) || (has(self.type) && self.type == '{dtype}')",
        "message": f"spec.dataset.{field} is only allowed when spec.dataset.type is {dtype}",
    }


DATASET_TYPES_DOC = (
    "text (default): plain text (textField). chat: OpenAI-shaped messages (messagesField), loss on "
    "assistant turns only. prompt-completion: loss on the completion only. chat and prompt-completion "
    "need model.task causal-lm."
)


class DatasetCache(KubeModel):
    storage: str | None = source_field(
        "Where the tokenized dataset is kept: pvc://CLAIM/PATH, file:// or s3://BUCKET/PREFIX. Entries "
        "live under a key derived from the content (shard sizes/etags), the tokenizer, dataset.type and "
        "its fields, maxSeqLength and packing: a restart, a resume at another world size or another job "
        "with the same key reuses them. Default: <output.storage>/data-cache. With numNodes > 1 every node "
        "must reach it (ReadWriteMany, or object storage). causal-lm only.",
        DATASET_SOURCE_PATTERN,
        "spec.dataset.cache.storage",
        required=False,
    )


class DatasetSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.textField) || !has(self.type) || self.type == 'text'",
                    "message": "spec.dataset.textField is only allowed when spec.dataset.type is text",
                },
                _only_for_type("messagesField", "chat"),
                _only_for_type("promptField", "prompt-completion"),
                _only_for_type("completionField", "prompt-completion"),
            ]
        }
    )

    source: str = source_field(
        "Training data: one file or object, or a directory or prefix of shards (a trailing / is allowed "
        "for s3://): pvc://CLAIM/PATH, file:// or s3://BUCKET/KEY (credentials and endpoint from "
        "spec.storage.s3). Under a directory or prefix every object ending in the format's suffixes "
        "(.jsonl/.jsonl.gz, .csv/.csv.gz or .parquet) is a shard, in name order. No hf:// datasets in v1alpha1. "
        "Path segments may not be empty, `.` or `..`.",
        DATASET_SOURCE_PATTERN,
        "spec.dataset.source",
    )
    format: Literal["jsonl", "csv", "parquet"] = Field(
        default="jsonl",
        description=(
            "File format: jsonl, csv or parquet. jsonl and csv shards may be gzipped (.jsonl.gz, .csv.gz); "
            "parquet is read one record batch at a time (its own compression, never .gz)."
        ),
    )
    type: Literal["text", "chat", "prompt-completion"] = Field(default="text", description=DATASET_TYPES_DOC)
    text_field: str = Field(
        default="text",
        description="Column/key holding the input text (type text only).",
        min_length=1,
        max_length=MAX_STR,
    )
    messages_field: str | None = Field(
        default=None,
        description=(
            "type chat only: key holding the messages, a list of {role, content} (system, user, assistant); "
            "rendered with the tokenizer's chat template. Defaults to messages."
        ),
        min_length=1,
        max_length=MAX_STR,
    )
    prompt_field: str | None = Field(
        default=None,
        description="type prompt-completion only: key holding the prompt. Defaults to prompt.",
        min_length=1,
        max_length=MAX_STR,
    )
    completion_field: str | None = Field(
        default=None,
        description="type prompt-completion only: key holding the completion. Defaults to completion.",
        min_length=1,
        max_length=MAX_STR,
    )
    packing: bool = Field(
        default=False,
        description=(
            "causal-lm only: pack examples into maxSeqLength blocks; attention never crosses example "
            "boundaries."
        ),
    )
    cache: DatasetCache | None = Field(
        default=None, description="The tokenized-data cache (causal-lm): tokenize once, reuse across jobs."
    )
    label_field: str | None = Field(
        default=None,
        description=(
            "Column/key holding the integer label (0..numLabels-1). sequence-classification only; "
            "defaults to `label` there; forbidden for causal-lm."
        ),
        min_length=1,
        max_length=MAX_STR,
    )
    validation_split: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction held out for evaluation, 0 <= x < 1."
    )


class LoraSpec(KubeModel):
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=16, ge=1, le=65536, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA layers.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="Names of the modules that get LoRA adapters (e.g. query, value for BERT).",
        min_length=1,
        max_length=MAX_LIST,
        json_schema_extra={"items": {"type": "string", "maxLength": MAX_STR}},
    )


class MethodSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.lora) || (has(self.type) && self.type == 'lora')",
                    "message": "spec.method.lora is only allowed when spec.method.type is lora",
                }
            ]
        }
    )

    type: Literal["full", "lora"] = Field(
        default="full",
        description="full fine-tuning, or lora (low-rank adapters; the saved model is merged, see docs).",
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings; only with type lora.")


class Hyperparameters(KubeModel):
    epochs: int = Field(default=3, ge=1, le=100000, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Optimizer steps to run; overrides epochs when set."
    )
    batch_size_per_device: int = Field(default=16, ge=1, le=65536, description="Micro-batch per process.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=65536, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(default=5.0e-5, gt=0, lt=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Fraction of steps with linear warmup; then linear decay."
    )
    max_seq_length: int = Field(default=128, ge=8, le=32768, description="Tokens per example (truncated).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 on GPUs that support it, else fp32. fp32, bf16 or fp16 force a precision.",
    )
    seed: int = Field(default=42, ge=0, description="Seed for data order, splits and initialisation.")
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_EVAL_EVERY_STEPS,
        description=(
            "Evaluate on the validation split every N optimizer steps (besides the initial and final "
            "evaluations); the history goes to status.progress.evaluations (at most 100 points, older "
            "ones thinned). Unset: no periodic evaluation. Needs dataset.validationSplit > 0."
        ),
    )


EVAL_NEEDS_VALIDATION = "spec.hyperparameters.evalEverySteps needs spec.dataset.validationSplit > 0"


class OutputSpec(KubeModel):
    storage: str = source_field(
        "Where results go: pvc://CLAIM/PATH, file:// or s3://BUCKET/PREFIX (credentials and endpoint from "
        "spec.storage.s3). Holds model/ (Hugging Face format, safetensors; on s3:// visible only once its "
        "marker .tauon-complete.json is written, last), checkpoints/, metrics.json, progress.json and "
        ".tauon-owner.json (the owning job's uid: another job's output is refused with OutputInUse). Path "
        "segments may not be empty, `.` or `..`.",
        DATASET_SOURCE_PATTERN,
        "spec.output.storage",
    )
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Checkpoint interval in optimizer steps (and always at the end)."
    )


class RunPolicy(KubeModel):
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Gang restarts caused by failures before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, description="Seconds the job may run, counted from the latest start or resume."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this many seconds after it finished."
    )
    suspend: bool = Field(default=False, description="true deletes the pods (Suspended); false resumes.")
    schedule_timeout_seconds: int = Field(
        default=300,
        ge=1,
        description=(
            "Gang not fully scheduled in time -> Warning event and reason Unschedulable; keeps waiting. "
            "Also the rendezvous timeout (+60 s)."
        ),
    )
    startup_timeout_seconds: int = Field(
        default=600,
        ge=1,
        description="Scheduled pods not all running in time (image pull errors, bad config) -> Failed.",
    )
    termination_grace_period_seconds: int = Field(
        default=30,
        ge=1,
        le=86400,
        description=(
            "Seconds a trainer pod gets between SIGTERM and SIGKILL (pod terminationGracePeriodSeconds): "
            "enough for a SIGTERM checkpoint of the model. Applies to pods created after a change."
        ),
    )


# true, false or "auto": a boolean-or-string node. Structural schemas have no bool-or-string type, so the
# node is untyped (preserve-unknown-fields); the API server cannot compile a CEL rule on an untyped node
# (it refuses the whole CRD), so other values are refused by the operator (InvalidSpec), not at admission.
COMPILE_SCHEMA: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class ParallelismSpec(KubeModel):
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description=(
            "ddp: replicated weights. fsdp: PyTorch FSDP2, weights, gradients and optimizer state sharded "
            "over all ranks. auto: fsdp when the estimated replicated training state exceeds 60% of one "
            "device's memory, else ddp; the choice goes to status.resolved.strategy."
        ),
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer block's activations in the backward pass (less memory, more compute).",
    )
    compile: Annotated[Literal["auto"] | StrictBool, WithJsonSchema(COMPILE_SCHEMA)] = Field(
        default="auto",
        description=(
            "torch.compile each transformer block (after activation checkpointing, before fsdp sharding or "
            "the ddp wrapper): true, false or auto (on for CUDA GPUs, off on CPU). metrics.json reports the "
            "choice (compile) and compileSeconds (the extra time of the steps that compiled). With it on, "
            "batches are padded to a multiple of 64 tokens (at most maxSeqLength), so a few shapes compile "
            "once each instead of one per batch length."
        ),
    )


class TrainerEnvVar(EnvVar):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [reserved_env_rule(RESERVED_ENV_PREFIXES, RESERVED_ENV_NAMES)]
        }
    )


IMMUTABLE_SPEC_FIELDS = [
    "model",
    "dataset",
    "method",
    "hyperparameters",
    "output",
    "numNodes",
    "nprocPerNode",
    "resources",
    "image",
    "env",
    "podTemplate",
    "parallelism",
    "storage",
]


def immutable_rules(fields: list[str], where: str) -> Any:
    """Transition rules on the parent so adding or removing a field is caught too."""
    return [
        {
            "rule": f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
            "message": f"{where}.{f}: field is immutable",
        }
        for f in fields
    ]


class FineTuneJobSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.model.task != 'causal-lm' || !has(self.dataset.labelField)",
                    "message": "spec.dataset.labelField must not be set when spec.model.task is causal-lm",
                },
                {
                    "rule": "!has(self.dataset.type) || self.dataset.type == 'text' || self.model.task == 'causal-lm'",
                    "message": "spec.dataset.type chat and prompt-completion need spec.model.task causal-lm",
                },
                {
                    "rule": "!has(self.dataset.packing) || !self.dataset.packing || self.model.task == 'causal-lm'",
                    "message": "spec.dataset.packing needs spec.model.task causal-lm",
                },
                {
                    "rule": (
                        "!(has(self.model.init) && self.model.init == 'scratch') || !has(self.method) || "
                        "!has(self.method.type) || self.method.type != 'lora'"
                    ),
                    "message": "spec.method.type lora is not allowed when spec.model.init is scratch "
                    "(there are no pretrained weights to adapt)",
                },
                {
                    "rule": (
                        "!has(self.hyperparameters) || !has(self.hyperparameters.evalEverySteps) || "
                        "!has(self.dataset.validationSplit) || self.dataset.validationSplit > 0.0"
                    ),
                    "message": EVAL_NEEDS_VALIDATION,
                },
                *immutable_rules(IMMUTABLE_SPEC_FIELDS, "spec"),
            ]
        }
    )

    model: ModelSpec = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training (and held-out validation) data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="full or LoRA fine-tuning.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    output: OutputSpec = Field(description="Where the model, checkpoints and metrics are written.")
    storage: StorageSpec | None = Field(
        default=None, description="Object storage settings for s3:// sources (endpoint, region, credentials)."
    )
    num_nodes: int = Field(default=1, ge=1, le=1024, description="Pods in the gang (one per node).")
    nproc_per_node: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "Processes per pod: auto (the pod's nvidia.com/gpu request when > 0, else 1) or an integer >= 1."
        ),
        json_schema_extra={
            "x-tauon-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? self >= 1 : self == 'auto'",
                    "message": "spec.nprocPerNode must be 'auto' or an integer >= 1",
                }
            ],
        },
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="Resources of each pod (Kubernetes ResourceRequirements shape).",
    )
    image: str | None = Field(
        default=None,
        description="Trainer image; defaults to the operator's configured image (frozen in status.resolved).",
        max_length=MAX_LONG_STR,
    )
    env: list[TrainerEnvVar] = Field(
        default_factory=list,
        description="Extra environment for the trainer. PET_*, MASTER_*, TAUON_* and torchrun's names are reserved.",
        max_length=MAX_LIST,
    )
    pod_template: PodTemplateOverrides = Field(
        default_factory=PodTemplateOverrides, description="Bounded overrides applied to every pod."
    )
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="How the model is spread over the ranks (ddp or fsdp)."
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Restart, deadline, TTL, suspend and grace period policy (mutable).",
    )

    @model_validator(mode="after")
    def _periodic_eval_needs_validation(self) -> FineTuneJobSpec:
        # the CEL rule above, for what admission does not see (local runs, the SDK, old CRDs)
        if self.hyperparameters.eval_every_steps is not None and self.dataset.validation_split <= 0:
            raise ValueError(EVAL_NEEDS_VALIDATION)
        return self


class PodCounts(StatusModel):
    active: int = Field(default=0, description="Pods of the current attempt not finished.")
    ready: int = Field(default=0, description="Pods of the current attempt running and ready.")
    succeeded: int = Field(default=0, description="Pods of the current attempt that succeeded.")
    failed: int = Field(default=0, description="Pods of the current attempt that failed.")


class LastFailure(StatusModel):
    pod: str | None = Field(default=None, description="Pod whose failure ended the attempt.")
    exit_code: int | None = Field(default=None, description="Exit code of its trainer container.")
    reason: str | None = Field(default=None, description="Kubernetes or trainer reason.")
    message: str | None = Field(default=None, description="Termination message or pod message.")
    time: datetime | None = Field(default=None, description="When the failure was observed.")


class StrategyEstimate(StatusModel):
    state_bytes_per_rank: int | None = Field(
        default=None,
        description=(
            "Estimated replicated training state per rank in bytes (weights + gradients + AdamW moments, "
            "+ fp32 master weights under bf16; LoRA counts trainable parameters for the last three)."
        ),
    )
    device_memory_bytes: int | None = Field(
        default=None,
        description="Memory of one device (GPU memory, or host memory / local processes on CPU) in bytes.",
    )


class ResolvedDataset(StatusModel):
    shards: int | None = Field(default=None, description="Raw shards the dataset is made of.")
    documents: int | None = Field(default=None, description="Documents (rows) in the dataset.")
    tokens: int | None = Field(default=None, description="Tokens after tokenization (causal-lm).")
    cache_key: str | None = Field(default=None, description="Key of the tokenized-data cache entry.")
    cache_hit: bool | None = Field(
        default=None, description="Whether the first attempt found the dataset already tokenized."
    )


class Resolved(StatusModel):
    image: str | None = Field(default=None, description="Trainer image used for every attempt.")
    nproc_per_node: int | None = Field(default=None, description="Processes per pod after resolving auto.")
    backend: Literal["nccl", "gloo"] | None = Field(default=None, description="torch.distributed backend.")
    strategy: Literal["ddp", "fsdp"] | None = Field(
        default=None,
        description="Parallelism strategy the trainer chose (rank 0 reports it); kept for the job's life.",
    )
    estimate: StrategyEstimate | None = Field(
        default=None, description="The memory estimate behind strategy auto, as rank 0 reported it."
    )
    dataset: ResolvedDataset | None = Field(
        default=None, description="What the dataset turned out to be, as rank 0 reported it (written once)."
    )
    compile: bool | None = Field(
        default=None,
        description=(
            "Whether the trainer compiled the transformer blocks (parallelism.compile resolved), as rank 0 "
            "reported it; kept for the job's life."
        ),
    )


class Evaluation(StatusModel):
    step: int = Field(description="Optimizer step after which the validation split was evaluated.")
    train_loss: float | None = Field(default=None, description="Training loss of that step.")
    eval_loss: float | None = Field(default=None, description="Validation loss.")
    eval_accuracy: float | None = Field(
        default=None, description="Validation accuracy (sequence-classification)."
    )


class Progress(StatusModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    percent: int = Field(default=0, description="step / totalSteps in percent.")
    epoch: float = Field(default=0, description="Current epoch (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to finish.")
    updated_at: datetime | None = Field(default=None, description="When the trainer reported this.")
    evaluations: list[Evaluation] | None = Field(
        default=None,
        description=(
            "Periodic evaluations (hyperparameters.evalEverySteps), ascending by step, at most 100 (older "
            "points thinned); kept across restarts, a later report wins for the same step."
        ),
    )


class Output(StatusModel):
    model: str | None = Field(default=None, description="Location of the final model (storage URI).")
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Final metrics from metrics.json (evalAccuracy, evalLoss, trainLoss, ...).",
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )


class FineTuneJobStatus(StatusModel):
    phase: Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"] = Field(
        default="Pending", description="Summary derived from conditions; for display only."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Created, Running, Restarting, Suspended, Succeeded, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="Generation the status describes.")
    pods: PodCounts = Field(default_factory=PodCounts, description="Pods of the current attempt.")
    attempt: int = Field(default=0, description="Current gang attempt; pod names carry it.")
    created_attempt: int | None = Field(
        default=None,
        description="Attempt whose whole gang was observed; a pod of it missing later is a disruption.",
    )
    restarts: int = Field(default=0, description="All gang restarts.")
    restarts_count_towards_limit: int = Field(
        default=0, description="Restarts caused by failures (not disruptions); compared to backoffLimit."
    )
    last_failure: LastFailure | None = Field(
        default=None, description="First failure of the last failed attempt."
    )
    start_time: datetime | None = Field(default=None, description="Latest start or resume.")
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    resolved: Resolved = Field(default_factory=Resolved, description="Defaults frozen at creation.")
    progress: Progress = Field(default_factory=Progress, description="Training progress from rank 0.")
    output: Output = Field(default_factory=Output, description="Final model location and metrics.")


class FineTuneJob(KubeModel):
    model_config = ConfigDict(extra="ignore")

    api_version: ApiVersion = Field(default=API_VERSION, description="API version.")
    kind: FineTuneJobKind = Field(default=FINETUNEJOB, description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired training run.")
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus, description="Observed state.")
