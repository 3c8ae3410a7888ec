"""The names tauon puts on the wire, defined once: API group and version, kinds and plurals, the label and
annotation keys of the operator's children, condition types and reasons of both kinds, the tasks.

Used by the operator (handlers, kube, reconcile), the renderer and the SDK (`tauon.client`), which all
import it from here instead of typing the strings again. Every value is part of the wire format: labels
select existing children, annotations are read back from them, condition types and reasons are what users
and the SDK watch. Renaming a constant is free; changing its value is an API change.

Conventions: `LABEL_*` label keys, `ANN_*` annotation keys, condition types without a prefix (`CREATED`,
`READY`), `REASON_*` reasons of conditions and events. `Manifest` is the type of a raw Kubernetes object.
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

Manifest = dict[str, Any]  # a raw Kubernetes object (or part of one), as the API server speaks it

# -- API group, version, kinds -------------------------------------------------------------------------

# pydantic needs the literal itself for the models' apiVersion field: `Literal[API_VERSION]` is not a type
ApiVersion = Literal["tauon.dev/v1alpha1"]
API_VERSION: Final[ApiVersion] = get_args(ApiVersion)[0]
GROUP, VERSION = API_VERSION.split("/")

FineTuneJobKind = Literal["FineTuneJob"]
InferenceServiceKind = Literal["InferenceService"]
FineTuneSweepKind = Literal["FineTuneSweep"]
FINETUNEJOB: Final[FineTuneJobKind] = "FineTuneJob"
INFERENCESERVICE: Final[InferenceServiceKind] = "InferenceService"
FINETUNESWEEP: Final[FineTuneSweepKind] = "FineTuneSweep"
FINETUNEJOBS: Final = "finetunejobs"  # plurals (REST paths, Kopf resources, CRD names)
INFERENCESERVICES: Final = "inferenceservices"
FINETUNESWEEPS: Final = "finetunesweeps"
PLURALS: Final[dict[str, str]] = {
    FINETUNEJOB: FINETUNEJOBS,
    INFERENCESERVICE: INFERENCESERVICES,
    FINETUNESWEEP: FINETUNESWEEPS,
}

# apiVersion of a PodGroup, per gang scheduler (rendered by tauon.render, created by tauon.kube)
POD_GROUP_API_VERSIONS: Final[dict[str, str]] = {
    "volcano": "scheduling.volcano.sh/v1beta1",
    "scheduler-plugins": "scheduling.x-k8s.io/v1alpha1",
}

# -- tasks (spec.model.task) ---------------------------------------------------------------------------

Task = Literal["sequence-classification", "causal-lm"]
TASKS: Final[tuple[Task, ...]] = get_args(Task)
SEQUENCE_CLASSIFICATION: Final[Task] = "sequence-classification"
CAUSAL_LM: Final[Task] = "causal-lm"

# -- labels and annotations ----------------------------------------------------------------------------

RESERVED_KEY_PREFIX: Final = f"{GROUP}/"  # label/annotation keys under it are the operator's
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"  # on every child, value MANAGER
MANAGER: Final = "tauon"

# FineTuneJob children
LABEL_JOB: Final = f"{GROUP}/job-name"  # the owning FineTuneJob (pods, ConfigMap, Service, PodGroup)
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"  # gang attempt of a pod or PodGroup
LABEL_RANK: Final = f"{GROUP}/node-rank"  # node rank of a pod

# InferenceService children
LABEL_ISVC: Final = f"{GROUP}/inference-service"  # the owning InferenceService
LABEL_COMPONENT: Final = f"{GROUP}/component"  # predictor or canary
ANN_SPEC_HASH: Final = f"{GROUP}/spec-hash"  # sha256 of the rendered child (skip applies when equal)
ANN_MODEL_SOURCE: Final = f"{GROUP}/model-source"  # the model a Deployment serves
ANN_FINE_TUNE_JOB: Final = f"{GROUP}/fine-tune-job"  # ... and the FineTuneJob it came from
ANN_FINE_TUNE_SWEEP: Final = f"{GROUP}/fine-tune-sweep"  # ... and the FineTuneSweep whose best trial it is
ANN_MODEL_TASK: Final = f"{GROUP}/model-task"  # ... and that model's task
ANN_RUNTIME: Final = f"{GROUP}/runtime"  # tauon or vllm

# FineTuneSweep children (trials: FineTuneJobs named <sweep>-t<k>)
LABEL_SWEEP: Final = f"{GROUP}/sweep-name"  # the owning FineTuneSweep
LABEL_TRIAL: Final = f"{GROUP}/trial-index"  # k of <sweep>-t<k>
ANN_TRIAL_PARAMETERS: Final = f"{GROUP}/trial-parameters"  # JSON {parameter name: value}, set at creation
ANN_PRUNE: Final = f"{GROUP}/prune"  # set by the sweep on a trial to stop it: the rule's message

# The process-backed dev node (`tauon node`): its Node's label, where a pod's ports really listen
# (`<port name>-address`: the trainer's metrics port, the server's http port) and where its log is.
LABEL_NODE_AGENT: Final = f"{GROUP}/node-agent"
ANN_LOG_FILE: Final = f"{GROUP}/log-file"


def address_annotation(port_name: str) -> str:
    """The annotation in which the dev node publishes where the pod's port `port_name` listens."""
    return f"{GROUP}/{port_name}-address"


ANN_METRICS_ADDRESS: Final = address_annotation("metrics")
ANN_HTTP_ADDRESS: Final = address_annotation("http")

# Kopf's own bookkeeping on our objects (the operator configures Kopf to store none; see tauon.handlers)
FINALIZER: Final = f"{GROUP}/finalizer"

# -- FineTuneJob conditions ----------------------------------------------------------------------------

CREATED: Final = "Created"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
FINETUNEJOB_CONDITIONS: Final = (CREATED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED)

# -- InferenceService conditions -----------------------------------------------------------------------

MODEL_READY: Final = "ModelReady"
PREDICTOR_READY: Final = "PredictorReady"
CANARY_READY: Final = "CanaryReady"
READY: Final = "Ready"
INFERENCESERVICE_CONDITIONS: Final = (MODEL_READY, PREDICTOR_READY, CANARY_READY, READY)

# -- FineTuneSweep conditions: Running, Succeeded, Failed (the constants above) ------------------------

FINETUNESWEEP_CONDITIONS: Final = (RUNNING, SUCCEEDED, FAILED)

# -- reasons (conditions and events) -------------------------------------------------------------------

# both kinds
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_RESOURCE_CONFLICT: Final = "ResourceConflict"

# FineTuneJob: Created
REASON_CREATING: Final = "Creating"
REASON_PODS_CREATED: Final = "PodsCreated"
REASON_GANG_SCHEDULED: Final = "GangScheduled"
REASON_GANG_RECREATED: Final = "GangRecreated"
REASON_UNSCHEDULABLE: Final = "Unschedulable"
REASON_QUOTA_EXCEEDED: Final = "QuotaExceeded"
REASON_CREATE_FAILED: Final = "CreateFailed"
# FineTuneJob: Running, Restarting, Suspended, Succeeded
REASON_ALL_PODS_RUNNING: Final = "AllPodsRunning"
REASON_RUNNING: Final = "Running"  # the event when the gang runs
REASON_RESTARTING: Final = "Restarting"
REASON_POD_FAILED: Final = "PodFailed"
REASON_POD_DISRUPTED: Final = "PodDisrupted"
REASON_GANG_RELEASED: Final = "GangReleased"
REASON_SUSPENDED: Final = "Suspended"
REASON_RESUMED: Final = "Resumed"
REASON_SUCCEEDED: Final = "Succeeded"
# FineTuneJob: Failed
REASON_PERMANENT_ERROR: Final = "PermanentError"
REASON_BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
REASON_DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
REASON_STARTUP_TIMEOUT: Final = "StartupTimeout"
REASON_PRUNED: Final = "Pruned"  # a FineTuneSweep stopped this trial early (ANN_PRUNE)

# InferenceService: ModelReady and CanaryReady
REASON_MODEL_RESOLVED: Final = "ModelResolved"
REASON_WAITING_FOR_FINE_TUNE_JOB: Final = "WaitingForFineTuneJob"
REASON_FINE_TUNE_JOB_FAILED: Final = "FineTuneJobFailed"
REASON_MODEL_NOT_FOUND: Final = "ModelNotFound"
# InferenceService: PredictorReady, CanaryReady (the Deployment's rollout) and Ready
REASON_WAITING_FOR_MODEL: Final = "WaitingForModel"
REASON_PROGRESSING: Final = "Progressing"
REASON_PROGRESS_DEADLINE_EXCEEDED: Final = "ProgressDeadlineExceeded"  # as the Deployment says it
REASON_MINIMUM_REPLICAS_AVAILABLE: Final = "MinimumReplicasAvailable"
REASON_SERVING: Final = "Serving"
REASON_READY: Final = "Ready"  # the event when the service becomes Ready

# FineTuneSweep: Running, Succeeded, Failed (and the events of trials)
REASON_TRIALS_RUNNING: Final = "TrialsRunning"
REASON_TRIAL_CREATED: Final = "TrialCreated"
REASON_TRIAL_FINISHED: Final = "TrialFinished"
REASON_ALL_TRIALS_FINISHED: Final = "AllTrialsFinished"
REASON_TOO_MANY_FAILED_TRIALS: Final = "TooManyFailedTrials"
REASON_NO_SUCCESSFUL_TRIAL: Final = "NoSuccessfulTrial"
REASON_TRIAL_PRUNED: Final = "TrialPruned"  # the event when the early-stopping rule stops a trial
# InferenceService: ModelReady while a fineTuneSweepRef's sweep has not succeeded yet
REASON_WAITING_FOR_FINE_TUNE_SWEEP: Final = "WaitingForFineTuneSweep"
REASON_FINE_TUNE_SWEEP_FAILED: Final = "FineTuneSweepFailed"

# -- tauon run --local -----------------------------------------------------------------------------------

# the object's status as the cluster would show it, kept current by `tauon run --local` and read by the
# SDK's local mode: <output>/status.json for a FineTuneJob, <runs>/<name>-server.status.json for a service
LOCAL_STATUS_FILE: Final = "status.json"
# a local FineTuneSweep's own state beside its status.json (<output>/.sweep/): what tells its run
# directory from a FineTuneJob's
LOCAL_SWEEP_STATE_DIR: Final = ".sweep"


def local_service_status_file(name: str) -> str:
    """File name of a local InferenceService's status, beside the runs of the jobs it may serve."""
    return f"{name}-server.status.json"
