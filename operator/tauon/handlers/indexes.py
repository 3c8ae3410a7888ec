"""The Kopf indexes the handlers keep, by name, and a typed view over them.

Kopf passes every index to every handler as a keyword argument named after the index handler's id; the
ids below are the only names used anywhere. Each index maps (namespace, owner name) to the bodies Kopf
saw. After a watch re-list an index can still hold an object that is gone, or an old object beside a new
one of the same name: `live` picks the one to act on. Kopf does not diff a re-list (410 Gone): a pod
deleted while the watch was disconnected stays in the pod index, Running, until Kopf restarts. `resync`
compares an index key with a LIST of the same objects and hides the ones the LIST proves gone
(`stale_uids`); the job handler runs it for each job's pods now and then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from tauon.api.names import Manifest

Key = tuple[str, str]  # (namespace, name of the owning FineTuneJob / InferenceService)

FTJ: Final = "tauon_finetunejobs"
FTJ_PODS: Final = "tauon_finetunejob_pods"
FTJ_CONFIGMAPS: Final = "tauon_finetunejob_configmaps"
FTJ_SERVICES: Final = "tauon_finetunejob_services"
ISVC: Final = "tauon_inferenceservices"
ISVC_DEPLOYMENTS: Final = "tauon_inferenceservice_deployments"
ISVC_SERVICES: Final = "tauon_inferenceservice_services"
ISVC_HPAS: Final = "tauon_inferenceservice_hpas"
FTS: Final = "tauon_finetunesweeps"
FTS_TRIALS: Final = "tauon_finetunesweep_trials"  # FineTuneJobs by the sweep that owns them
ALL: Final = (
    FTJ,
    FTJ_PODS,
    FTJ_CONFIGMAPS,
    FTJ_SERVICES,
    ISVC,
    ISVC_DEPLOYMENTS,
    ISVC_SERVICES,
    ISVC_HPAS,
    FTS,
    FTS_TRIALS,
)


# -- projections: what the planners read of each child, not whole bodies -----------------------------
# A pod body is tens of KiB (env, volumes, managedFields); an operator indexing thousands of them would
# run out of memory. Indexes keep only the fields below (the planners and tauon.reconcile.pods read no
# others); the reconciled objects themselves are kept whole but for managedFields.

_META = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "labels",
    "annotations",
    "ownerReferences",
)
_POD_SPEC = ("nodeName", "activeDeadlineSeconds")
_POD_STATUS = ("phase", "reason", "message", "podIP", "conditions", "containerStatuses", "startTime")
_CONTAINER_STATUS = ("name", "state", "lastState", "ready", "restartCount")


def _meta(body: Mapping[str, Any]) -> Manifest:
    meta = body.get("metadata") or {}
    return {k: meta[k] for k in _META if k in meta}


def project_object(body: Mapping[str, Any]) -> Manifest:
    """A FineTuneJob / InferenceService: everything but managedFields (the planner parses it whole)."""
    out = dict(body)
    out["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return out


def project_pod(body: Mapping[str, Any]) -> Manifest:
    spec = body.get("spec") or {}
    status = dict(body.get("status") or {})
    out_status = {k: status[k] for k in _POD_STATUS if k in status}
    if "containerStatuses" in out_status:
        out_status["containerStatuses"] = [
            {k: cs[k] for k in _CONTAINER_STATUS if k in cs} for cs in out_status["containerStatuses"] or []
        ]
    return {
        "kind": "Pod",
        "metadata": _meta(body),
        "spec": {k: spec[k] for k in _POD_SPEC if k in spec},
        "status": out_status,
    }


def project_deployment(body: Mapping[str, Any]) -> Manifest:
    spec = body.get("spec") or {}
    return {
        "kind": "Deployment",
        "metadata": _meta(body),
        "spec": {"replicas": spec["replicas"]} if "replicas" in spec else {},
        "status": dict(body.get("status") or {}),
    }


def project_owned(body: Mapping[str, Any]) -> Manifest:
    """ConfigMaps, Services, HPAs: only who owns them and their annotations matter."""
    return {"kind": body.get("kind"), "metadata": _meta(body)}


def _rv(obj: Manifest) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # resourceVersion is opaque; etcd's are integers
        return 0


def _uid(obj: Manifest) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def stale_uids(indexed: list[Manifest], listed: list[Manifest], list_rv: str) -> set[str]:
    """The uids of ``indexed`` bodies a LIST answered at resourceVersion ``list_rv`` proves gone: not in
    ``listed`` and not newer than the LIST (a body the watch delivered after the LIST was served is not
    in it, and stays). An unparseable ``list_rv`` proves nothing."""
    try:
        at = int(list_rv)
    except ValueError:
        return set()
    present = {_uid(b) for b in listed}
    return {u for b in indexed if (u := _uid(b)) and u not in present and 0 < _rv(b) <= at}


def live(bodies: list[Manifest]) -> Manifest | None:
    """The body to act on: not being deleted if any is not, then the newest (creation, resourceVersion)."""
    if not bodies:
        return None

    def rank(b: Manifest) -> tuple[bool, str, int]:
        meta = b.get("metadata") or {}
        return (meta.get("deletionTimestamp") is None, str(meta.get("creationTimestamp") or ""), _rv(b))

    return max(bodies, key=rank)


class Indexes:
    """Live views of Kopf's indexes, captured from any handler's keyword arguments."""

    def __init__(self) -> None:
        self._views: dict[str, Mapping[Any, Any]] = {}
        self._gone: dict[tuple[str, Key], set[str]] = {}  # (index, key) -> uids a LIST proved gone

    def capture(self, kwargs: Mapping[str, Any]) -> None:
        for name in ALL:
            view = kwargs.get(name)
            if view is not None:
                self._views[name] = view

    def _held(self, index: str, key: Key) -> list[Manifest]:
        view = self._views.get(index)
        if view is None or key not in view:
            return []
        return [dict(v) for v in view[key]]

    def bodies(self, index: str, key: Key) -> list[Manifest]:
        """Copies of what the index holds for key, but for objects a LIST proved gone."""
        gone = self._gone.get((index, key), set())
        return [b for b in self._held(index, key) if _uid(b) not in gone]

    def resync(self, index: str, key: Key, listed: list[Manifest], list_rv: str) -> list[str]:
        """Hide what the index holds for ``key`` that a LIST of the same objects (``listed``, answered at
        ``list_rv``) proves gone; returns their names (newly hidden). Uids Kopf itself has forgotten are
        forgotten here too, so this remembers only ghosts the index still holds."""
        held = self._held(index, key)
        before = self._gone.get((index, key), set())
        still = {_uid(b) for b in held}
        gone = (before & still) | stale_uids(held, listed, list_rv)
        if gone:
            self._gone[(index, key)] = gone
        else:
            self._gone.pop((index, key), None)
        view = self._views.get(index) or {}
        for k in [k for k in self._gone if k[0] == index and k[1] not in view]:
            del self._gone[k]  # the whole key left the index (its job was deleted)
        return sorted(
            str((b.get("metadata") or {}).get("name") or _uid(b)) for b in held if _uid(b) in gone - before
        )

    def gone_count(self) -> int:
        return sum(len(u) for u in self._gone.values())

    def live(self, index: str, key: Key) -> Manifest | None:
        return live(self.bodies(index, key))

    def keys(self, index: str) -> list[Key]:
        view = self._views.get(index)
        return list(view) if view is not None else []

    def phase_counts(self, index: str) -> dict[tuple[str, str], int]:
        """(namespace, phase) -> number of objects, for the phase gauges."""
        counts: dict[tuple[str, str], int] = {}
        for key in self.keys(index):
            body = self.live(index, key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase") or "Pending"
            counts[(key[0], phase)] = counts.get((key[0], phase), 0) + 1
        return counts
