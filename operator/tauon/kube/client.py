"""Thin async API layer (kubernetes_asyncio): generic REST by kind, idempotent by construction.

- create: 409 means it already exists; then we read it and check it is ours (else a conflict).
- delete: 404 means already gone.
- apply: server-side apply with field manager `tauon` (force), for children whose content we own.
Every request has a timeout (REQUEST_TIMEOUT): a black-holed connection fails the reconcile, which is
retried, instead of parking that object forever. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tauon.api.names import (
    API_VERSION,
    FINETUNEJOB,
    FINETUNEJOBS,
    FINETUNESWEEP,
    FINETUNESWEEPS,
    INFERENCESERVICE,
    INFERENCESERVICES,
    POD_GROUP_API_VERSIONS,
    Manifest,
)

log = logging.getLogger("tauon.kube")
FIELD_MANAGER = "tauon"
COMPONENT = "tauon"  # Event source.component / reportingComponent
REQUEST_TIMEOUT = 30.0  # seconds per API request, connecting included
PVC_CACHE_SECONDS = 10.0  # how long a claim's access modes are reused (they are immutable once bound)

# kind -> (api prefix, plural)
KINDS: dict[str, tuple[str, str]] = {
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    FINETUNEJOB: (f"/apis/{API_VERSION}", FINETUNEJOBS),
    INFERENCESERVICE: (f"/apis/{API_VERSION}", INFERENCESERVICES),
    FINETUNESWEEP: (f"/apis/{API_VERSION}", FINETUNESWEEPS),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
}
# PodGroup apiVersion -> api prefix (the plural is podgroups for every gang scheduler)
POD_GROUPS = {v: f"/apis/{v}" for v in POD_GROUP_API_VERSIONS.values()}


class Conflict(Exception):
    """A child with our name exists and is not controlled by our object."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name} exists and is not owned by tauon")
        self.kind = kind
        self.name = name


class Invalid(Exception):
    """The API server refused a child (422): a spec problem the user must fix."""


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing can be created there any more."""

    def __init__(self, namespace: str):
        super().__init__(f"namespace {namespace} is being deleted")
        self.namespace = namespace


class Stale(Exception):
    """A write was based on an old version of the object (409 on its resourceVersion precondition)."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name} changed since it was read")


class Forbidden(Exception):
    """The API server forbade creating a child (403: a ResourceQuota, PodSecurity admission, RBAC)."""

    def __init__(self, kind: str, name: str, message: str):
        super().__init__(f"{kind} {name}: {message}")
        self.kind = kind
        self.name = name
        self.message = message

    @property
    def quota(self) -> bool:
        return "exceeded quota" in self.message


async def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()


def path(
    kind: str, namespace: str, name: str | None = None, api_version: str | None = None, sub: str = ""
) -> str:
    if kind == "PodGroup":
        prefix, plural = POD_GROUPS[api_version or POD_GROUP_API_VERSIONS["volcano"]], "podgroups"
    else:
        prefix, plural = KINDS[kind]
    p = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


class Kube:
    def __init__(self, api: client.ApiClient | None = None, timeout: float = REQUEST_TIMEOUT):
        self.api = api or client.ApiClient()
        self.timeout = timeout
        self._pvc_modes: dict[tuple[str, str], tuple[float, list[str]]] = {}
        self._pvc_reads: dict[tuple[str, str], asyncio.Future[list[str] | None]] = {}

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        p: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        return await self.api.call_api(
            p,
            method,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            query_params=query or [],
            auth_settings=["BearerToken"],
            response_types_map={200: "object", 201: "object", 202: "object"},
            _return_http_data_only=True,
            _request_timeout=self.timeout,
        )

    async def get(
        self, kind: str, namespace: str, name: str, api_version: str | None = None
    ) -> Manifest | None:
        try:
            return dict(await self._call("GET", path(kind, namespace, name, api_version)))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def create(self, manifest: Manifest, owner_uid: str) -> None:
        kind = manifest["kind"]
        meta = manifest["metadata"]
        try:
            await self._call(
                "POST", path(kind, meta["namespace"], api_version=manifest.get("apiVersion")), manifest
            )
        except ApiException as e:
            if e.status == 409:
                existing = await self.get(kind, meta["namespace"], meta["name"], manifest.get("apiVersion"))
                if existing is not None and not owned_by(existing, owner_uid):
                    raise Conflict(kind, meta["name"]) from e
                return
            if e.status == 422:
                raise Invalid(f"{kind} {meta['name']}: {_reason(e)}") from e
            if namespace_terminating(e):
                raise NamespaceTerminating(meta["namespace"]) from e
            if e.status == 403:
                raise Forbidden(kind, meta["name"], _reason(e)) from e
            raise

    async def apply(self, manifest: Manifest, owner_uid: str) -> None:
        """Server-side apply, refusing to take over an object that is not ours."""
        kind, meta = manifest["kind"], manifest["metadata"]
        existing = await self.get(kind, meta["namespace"], meta["name"], manifest.get("apiVersion"))
        if existing is not None and not owned_by(existing, owner_uid):
            raise Conflict(kind, meta["name"])
        try:
            await self._call(
                "PATCH",
                path(kind, meta["namespace"], meta["name"], manifest.get("apiVersion")),
                manifest,
                content_type="application/apply-patch+yaml",
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            )
        except ApiException as e:
            if e.status == 422:
                raise Invalid(f"{kind} {meta['name']}: {_reason(e)}") from e
            if namespace_terminating(e):
                raise NamespaceTerminating(meta["namespace"]) from e
            raise

    async def delete(
        self, kind: str, namespace: str, name: str, grace: int | None = None, uid: str | None = None
    ) -> None:
        """Delete; 404 means already gone. With `uid`, only that object: a newer one of the same name
        (the API server answers 409) is left alone."""
        body: Manifest = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call("DELETE", path(kind, namespace, name), body)
        except ApiException as e:
            if e.status == 404 or (e.status == 409 and uid is not None):
                return
            raise

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Manifest, sub: str = ""
    ) -> Manifest | None:
        try:
            return dict(
                await self._call(
                    "PATCH",
                    path(kind, namespace, name, sub=sub),
                    patch,
                    content_type="application/merge-patch+json",
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def stop_pod(self, namespace: str, name: str) -> None:
        """Stop a pod but keep it (and its logs): the kubelet kills it after activeDeadlineSeconds."""
        await self.patch("Pod", namespace, name, {"spec": {"activeDeadlineSeconds": 1}})

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Manifest, resource_version: str | None = None
    ) -> Manifest | None:
        """Returns the object as the API server stored it (fresher than any watch-fed cache), or None when
        it is gone. With `resource_version` the patch only applies to that version of the object: a plan
        made from a stale cache, or from a ghost of a deleted object with the same name, raises Stale
        (metadata.uid is not checked by the status subresource; the resourceVersion is)."""
        patch: Manifest = {"status": status}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        try:
            return await self.patch(kind, namespace, name, patch, sub="status")
        except ApiException as e:
            if resource_version and e.status == 409:
                raise Stale(kind, name) from e
            raise

    async def create_exclusive(self, manifest: Manifest) -> Manifest:
        """Create; 409 (someone else created it first) raises Stale."""
        meta = manifest["metadata"]
        try:
            return dict(await self._call("POST", path(manifest["kind"], meta["namespace"]), manifest))
        except ApiException as e:
            if e.status == 409:
                raise Stale(manifest["kind"], meta["name"]) from e
            raise

    async def replace(self, manifest: Manifest) -> Manifest:
        """PUT with the manifest's metadata.resourceVersion: 409 (changed since read) or 404 raise Stale."""
        kind, meta = manifest["kind"], manifest["metadata"]
        try:
            return dict(await self._call("PUT", path(kind, meta["namespace"], meta["name"]), manifest))
        except ApiException as e:
            if e.status in (404, 409):
                raise Stale(kind, meta["name"]) from e
            raise

    async def post_event(self, involved: Manifest, type: str, reason: str, message: str) -> None:
        """Create a core/v1 Event about `involved` (a namespaced object: kind, apiVersion, metadata).
        A namespace being deleted raises NamespaceTerminating; nothing is posted there."""
        meta = involved["metadata"]
        ns = meta["namespace"]
        event = event_manifest(involved, type, reason, message, dt.datetime.now(dt.UTC))
        try:
            await self._call("POST", path("Event", ns), event)
        except ApiException as e:
            if namespace_terminating(e):
                raise NamespaceTerminating(ns) from e
            raise

    async def pvc_access_modes(self, namespace: str, claim: str) -> list[str] | None:
        """A claim's access modes (None: no such claim). Found claims are remembered for
        PVC_CACHE_SECONDS: every pass of every multi-node job on a shared claim would read it again; and
        passes that miss the cache together share one read (when it expires, every job planning at that
        moment would otherwise read it at once)."""
        key = (namespace, claim)
        hit = self._pvc_modes.get(key)
        if hit is not None and time.monotonic() - hit[0] < PVC_CACHE_SECONDS:
            return list(hit[1])
        read = self._pvc_reads.get(key)
        if read is None:
            read = asyncio.ensure_future(self._read_pvc_modes(namespace, claim))
            self._pvc_reads[key] = read
            read.add_done_callback(lambda _: self._pvc_reads.pop(key, None))
        modes = await asyncio.shield(read)  # one waiter cancelled does not cancel the others' read
        return list(modes) if modes is not None else None

    async def _read_pvc_modes(self, namespace: str, claim: str) -> list[str] | None:
        pvc = await self.get("PersistentVolumeClaim", namespace, claim)
        if pvc is None:
            self._pvc_modes.pop((namespace, claim), None)
            return None
        modes = list(pvc.get("spec", {}).get("accessModes") or [])
        self._pvc_modes[(namespace, claim)] = (time.monotonic(), modes)
        return modes


def event_manifest(involved: Manifest, type: str, reason: str, message: str, now: dt.datetime) -> Manifest:
    """A core/v1 Event (count 1, first = last timestamp) from the tauon component."""
    meta = involved["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    ref = {
        "apiVersion": involved.get("apiVersion", ""),
        "kind": involved.get("kind", ""),
        "name": meta["name"],
        "namespace": meta["namespace"],
        "uid": meta.get("uid", ""),
        "resourceVersion": meta.get("resourceVersion", ""),
    }
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {k: v for k, v in ref.items() if v},
        "type": type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
    }


def owned_by(obj: Manifest, uid: str) -> bool:
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj.get("metadata", {}).get("ownerReferences") or []
    )


def namespace_terminating(e: ApiException) -> bool:
    """A 403 because the namespace is being deleted: nothing to create there, and not an RBAC problem."""
    return e.status == 403 and "NamespaceTerminating" in str(e.body or "")


def _reason(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or b"").get("message", e.reason))
    except (ValueError, TypeError, AttributeError):
        return str(e.reason)
