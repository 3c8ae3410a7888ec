"""Types shared by FineTuneJob and InferenceService, and the one way to read a condition (`find_condition`,
`is_true`) for the planners and the SDK alike. The names on the wire are tauon.api.names'.

Every field carries a description: they become `kubectl explain` text through the generated CRDs.
Defaults live here (applied by the operator when it parses an object), not in the CRD schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tauon.api.names import RESERVED_KEY_PREFIX

# Schema bounds that CEL cost estimation needs on every string/list/map a rule reads.
MAX_STR = 253
MAX_LONG_STR = 1024
MAX_MAP = 64
MAX_LIST = 64

NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX = 40

PVC_URI = r"pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^\s]*)?"
HF_URI = r"hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*"
FILE_URI = r"file://(/|\./)[^\s]*"
# s3://BUCKET[/KEY-OR-PREFIX]; bucket names as S3 allows them (3-63 of [a-z0-9.-])
S3_URI = r"s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/[^\s]*)?"

MODEL_SOURCE_PATTERN = f"^({PVC_URI}|{HF_URI}|{FILE_URI})$"
DATASET_SOURCE_PATTERN = f"^({PVC_URI}|{FILE_URI}|{S3_URI})$"
SERVED_MODEL_SOURCE_PATTERN = f"^({PVC_URI}|{HF_URI}|{FILE_URI}|{S3_URI})$"

# A path segment that is empty, `.` or `..` after the claim (pvc://), the root (file:///) or the leading
# `./` (file://./): `pvc://a/../b`, `pvc://a//b`, `pvc://a/b/` and `file:///x/./y` are refused (RE2).
# An s3:// prefix may end in one `/` (`s3://b/corpus/`); `s3://b/a//c` and `s3://b/../c` are refused.
BAD_SEGMENT_RE = (
    r"^(pvc://[^/]+|file://\.?)(/[^/]*)*/\.{0,2}(/|$)"
    r"|^s3://[^/]+(/[^/]*)*/(\.{1,2}(/|$)|/)"
)


class KubeModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown spec fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, no None values."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(KubeModel):
    """Status tolerates fields it does not know (written by a newer operator)."""

    model_config = ConfigDict(extra="ignore")


def source_rule(where: str) -> Any:
    """CEL on a storage URI string: no empty, `.` or `..` path segments."""
    cel_re = BAD_SEGMENT_RE.replace("\\", "\\\\")
    return {
        "rule": f"!self.matches('{cel_re}')",
        "messageExpression": (
            f"'{where}: empty, \".\" and \"..\" path segments are not allowed (got ' + self + ')'"
        ),
    }


def source_field(description: str, pattern: str, where: str, required: bool = True) -> Any:
    """A storage URI field: scheme pattern, length bound and the path-segment rule."""
    extra: Any = {"x-kubernetes-validations": [source_rule(where)]}
    if required:
        return Field(
            description=description, max_length=MAX_LONG_STR, pattern=pattern, json_schema_extra=extra
        )
    return Field(
        default=None,
        description=description,
        max_length=MAX_LONG_STR,
        pattern=pattern,
        json_schema_extra=extra,
    )


def reserved_keys_rule(where: str) -> Any:
    """CEL on a label/annotation map: keys under tauon.dev/ belong to the operator."""
    return {
        "rule": f"self.all(k, !k.startsWith('{RESERVED_KEY_PREFIX}'))",
        "message": f"{where}: keys under {RESERVED_KEY_PREFIX} are reserved for the operator",
    }


def free_form(description: str) -> Any:
    """A field whose content Kubernetes keeps as-is (e.g. affinity)."""
    return Field(
        default=None,
        description=description,
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )


class SecretKeyRef(KubeModel):
    name: str = Field(description="Name of a Secret in the object's namespace.", max_length=MAX_STR)
    key: str = Field(description="Key inside the Secret that holds the token.", max_length=MAX_STR)


class LocalObjectReference(KubeModel):
    name: str = Field(description="Name of the referenced object (same namespace).", max_length=MAX_STR)


class S3Storage(KubeModel):
    endpoint: str | None = Field(
        default=None,
        description=(
            "URL of an S3-compatible store (SeaweedFS, Ceph, MinIO...), e.g. "
            "http://seaweedfs.storage.svc:8333. Default: AWS S3. Rendered as TAUON_S3_ENDPOINT; with "
            "`tauon run --local` the caller's AWS_ENDPOINT_URL wins."
        ),
        max_length=MAX_LONG_STR,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
    )
    region: str | None = Field(
        default=None,
        description="Region of the store (AWS_REGION), e.g. us-east-1.",
        max_length=MAX_STR,
        pattern=r"^[a-z0-9-]+$",
    )
    secret_ref: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
            "AWS_SESSION_TOKEN). It reaches the pods only as env valueFrom, never a ConfigMap, status, "
            "event or log. Without it the pods use the default AWS credential chain (e.g. a workload "
            "identity); `tauon run --local` always uses the caller's environment."
        ),
    )


class StorageSpec(KubeModel):
    s3: S3Storage | None = Field(
        default=None, description="How the pods (and `tauon run --local`) reach s3:// URIs."
    )


class EnvVar(KubeModel):
    name: str = Field(
        description="Environment variable name.",
        min_length=1,
        max_length=MAX_STR,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
    )
    value: str | None = Field(default=None, description="Literal value.", max_length=32768)
    value_from: dict[str, Any] | None = free_form(
        "Source for the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), "
        "as in a Kubernetes EnvVar."
    )


class Toleration(KubeModel):
    key: str | None = Field(
        default=None, description="Taint key the toleration applies to.", max_length=MAX_STR
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (Kubernetes default Equal)."
    )
    value: str | None = Field(default=None, description="Taint value to match.", max_length=MAX_STR)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


Quantity = int | str


class ResourceRequirements(KubeModel):
    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Minimum resources per node (pod), e.g. cpu, memory, nvidia.com/gpu.",
        max_length=16,
        json_schema_extra={"x-tauon-quantity-map": True},
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Maximum resources per node (pod). GPUs must have equal requests and limits.",
        max_length=16,
        json_schema_extra={"x-tauon-quantity-map": True},
    )


class PodTemplateOverrides(KubeModel):
    """Bounded pod overrides; deliberately not a full PodTemplateSpec."""

    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on every pod. Keys under tauon.dev/ are reserved for the operator.",
        max_length=MAX_MAP,
        json_schema_extra={"x-kubernetes-validations": [reserved_keys_rule("podTemplate.labels")]},
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra annotations on every pod. Keys under tauon.dev/ are reserved for the operator.",
        max_length=MAX_MAP,
        json_schema_extra={"x-kubernetes-validations": [reserved_keys_rule("podTemplate.annotations")]},
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match.", max_length=MAX_MAP
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations added to every pod.", max_length=MAX_LIST
    )
    affinity: dict[str, Any] | None = free_form("Kubernetes Affinity of every pod (free-form subtree).")
    priority_class_name: str = Field(default="", description="PriorityClass of the pods.", max_length=MAX_STR)
    scheduler_name: str = Field(
        default="", description="Scheduler for the pods (empty: the cluster default).", max_length=MAX_STR
    )
    service_account_name: str = Field(
        default="",
        description="ServiceAccount of the pods. When empty, no token is mounted.",
        max_length=MAX_STR,
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the image.", max_length=16
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """metav1.Condition."""

    type: str = Field(description="Condition type, PascalCase.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed (not when the reason or message changed)."
    )
    reason: str = Field(default="", description="CamelCase reason for the last transition.", max_length=1024)
    message: str = Field(default="", description="Human-readable details.", max_length=32768)


def find_condition(conditions: list[Condition], ctype: str) -> Condition | None:
    """The condition of type `ctype` (conditions are a list-map keyed by type: at most one)."""
    return next((c for c in conditions if c.type == ctype), None)


def is_true(conditions: list[Condition], ctype: str) -> bool:
    """Whether the condition of type `ctype` is there with status True."""
    c = find_condition(conditions, ctype)
    return c is not None and c.status == "True"


class ObjectMeta(KubeModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(default="", description="Object name.")
    namespace: str = Field(default="default", description="Namespace.")
    uid: str = Field(default="", description="UID.")
    generation: int = Field(default=0, description="Spec generation.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    creation_timestamp: datetime | None = Field(default=None, description="Creation time.")
    deletion_timestamp: datetime | None = Field(default=None, description="Deletion time.")


def reserved_env_rule(prefixes: list[str], names: list[str]) -> Any:
    """CEL rule on an EnvVar item rejecting reserved names."""
    parts = [f"self.name.startsWith('{p}')" for p in prefixes]
    if names:
        parts.append("self.name in [" + ", ".join(f"'{n}'" for n in names) + "]")
    reserved = ", ".join([p + "*" for p in prefixes] + names)
    return {
        "rule": "!(" + " || ".join(parts) + ")",
        "messageExpression": f"'env name ' + self.name + ' is reserved (reserved: {reserved})'",
    }
