"""Reading observed pods: phase, readiness, scheduling, failures and their classification."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tauon.api.names import Manifest

# Pod-level reasons that mean the node or the cluster took the pod away (not the trainer's fault).
DISRUPTION_REASONS = {
    "Evicted",
    "Preempting",
    "NodeLost",
    "Terminated",
    "Shutdown",
    "NodeShutdown",
    "UnexpectedAdmissionError",
}
# Kubelet eviction messages for a pod that went over its OWN limits (ephemeral storage, an emptyDir such
# as /dev/shm with a sizeLimit): the trainer caused it, so it is a failure (counts toward backoffLimit),
# not a disruption that would restart forever. Node-pressure evictions ("The node was low on resource")
# stay disruptions.
SELF_EVICTION_MARKERS = (
    "exceeds the limit",
    "exceeded its local ephemeral storage limit",
    "exceeds the total limit",
)
WAITING_STARTUP_ERRORS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


def parse_time(v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v
    return datetime.fromisoformat(str(v).replace("Z", "+00:00"))


def name(pod: Manifest) -> str:
    return str(pod["metadata"]["name"])


def label_int(pod: Manifest, key: str) -> int | None:
    raw = pod["metadata"].get("labels", {}).get(key)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def phase(pod: Manifest) -> str:
    return str(pod.get("status", {}).get("phase") or "Pending")


def deleting(pod: Manifest) -> bool:
    return pod["metadata"].get("deletionTimestamp") is not None


def finished(pod: Manifest) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def pod_condition(pod: Manifest, ctype: str) -> Manifest | None:
    for c in pod.get("status", {}).get("conditions", []) or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def ready(pod: Manifest) -> bool:
    c = pod_condition(pod, "Ready")
    return phase(pod) == "Running" and c is not None and c.get("status") == "True"


def scheduled(pod: Manifest) -> bool:
    if pod.get("spec", {}).get("nodeName"):
        return True
    c = pod_condition(pod, "PodScheduled")
    return c is not None and c.get("status") == "True"


def container_status(pod: Manifest, container: str) -> Manifest | None:
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        if cs.get("name") == container:
            return dict(cs)
    return None


def waiting_error(pod: Manifest, container: str) -> tuple[str, str] | None:
    cs = container_status(pod, container)
    waiting = (cs or {}).get("state", {}).get("waiting")
    if waiting and waiting.get("reason") in WAITING_STARTUP_ERRORS:
        return str(waiting["reason"]), str(waiting.get("message", ""))
    return None


def termination_message(pod: Manifest, container: str) -> dict[str, Any] | None:
    """The trainer's JSON termination message, if it wrote one."""
    cs = container_status(pod, container)
    term = (cs or {}).get("state", {}).get("terminated") or {}
    raw = term.get("message")
    if not raw:
        return None
    try:
        msg = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return msg if isinstance(msg, dict) else None


def self_evicted(pod: Manifest) -> bool:
    """Evicted by the kubelet for exceeding its own limits (see SELF_EVICTION_MARKERS)."""
    st = pod.get("status", {}) or {}
    message = str(st.get("message") or "")
    return st.get("reason") == "Evicted" and any(m in message for m in SELF_EVICTION_MARKERS)


@dataclass(frozen=True)
class Failure:
    pod: str
    time: datetime
    exit_code: int | None
    reason: str
    message: str
    permanent: bool  # termination message says retryable: false
    disruption: bool  # does not count toward backoffLimit


def classify(pod: Manifest, container: str, now: datetime) -> Failure | None:
    """A failure of this pod, or None when it has not failed.

    Deleting counts as failure too: we never delete pods of the current attempt except by starting a
    new attempt, so a current pod being deleted was removed by someone else (a disruption).
    """
    st = pod.get("status", {}) or {}
    disruption_cond = pod_condition(pod, "DisruptionTarget")
    is_disruption_cond = disruption_cond is not None and disruption_cond.get("status") == "True"
    if phase(pod) == "Failed":
        cs = container_status(pod, container)
        term = (cs or {}).get("state", {}).get("terminated") or {}
        finished_at = parse_time(term.get("finishedAt"))
        deleted_at = parse_time(pod["metadata"].get("deletionTimestamp"))
        when = finished_at or deleted_at or now
        msg = termination_message(pod, container) or {}
        permanent = msg.get("retryable") is False
        reason = str(msg.get("reason") or term.get("reason") or st.get("reason") or "Error")
        message = str(msg.get("message") or term.get("message") or st.get("message") or "")
        # deleted by someone else, then killed by the kubelet (exit 143/137): still a disruption
        killed_by_deletion = deleted_at is not None and (finished_at is None or finished_at >= deleted_at)
        disruption = (
            (not permanent)
            and not self_evicted(pod)
            and (is_disruption_cond or st.get("reason") in DISRUPTION_REASONS or killed_by_deletion)
        )
        exit_code = term.get("exitCode")
        return Failure(
            name(pod),
            when,
            int(exit_code) if exit_code is not None else None,
            reason,
            message,
            permanent,
            disruption,
        )
    if deleting(pod) and phase(pod) != "Succeeded":
        when = parse_time(pod["metadata"].get("deletionTimestamp")) or now
        reason = "PodDeleted"
        message = "pod was deleted" + (
            f" ({disruption_cond.get('reason')})" if is_disruption_cond and disruption_cond else ""
        )
        return Failure(name(pod), when, None, reason, message, False, True)
    return None


def missing_failure(pod_name: str, now: datetime) -> Failure:
    return Failure(
        pod_name, now, None, "PodDeleted", "pod disappeared (deleted or its node was lost)", False, True
    )
