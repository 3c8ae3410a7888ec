"""Pieces shared by both renderers: owner references, storage URIs -> volumes, container resources, pod
overrides, security."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from tauon.api.common import (
    BAD_SEGMENT_RE,
    EnvVar,
    KubeModel,
    ObjectMeta,
    PodTemplateOverrides,
    ResourceRequirements,
    StorageSpec,
)
from tauon.api.names import API_VERSION, LABEL_MANAGED_BY, MANAGER, RESERVED_KEY_PREFIX, Manifest
from tauon.render.config import OperatorConfig

PVC_ROOT = "/mnt/tauon/pvc"


class InvalidSpec(ValueError):
    """The object passed admission but cannot be rendered; the message names the field."""


def owner_reference(kind: str, meta: ObjectMeta) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_meta(kind: str, meta: ObjectMeta, name: str, labels: dict[str, str]) -> Manifest:
    return {
        "name": name,
        "namespace": meta.namespace,
        "labels": {LABEL_MANAGED_BY: MANAGER, **labels},
        "ownerReferences": [owner_reference(kind, meta)],
    }


def _volume_name(prefix: str, raw: str) -> str:
    """A DNS-1123 label for `raw`; lossy slugs (dots, slashes, long names) get a hash so two claims or
    paths never share a volume name (`my.models` vs `my-models`, `/data/a` vs `/data-a`)."""
    slug = re.sub(r"[^a-z0-9-]", "-", raw.lower()).strip("-")
    if slug == raw and len(slug) <= 50:
        return f"{prefix}-{slug}"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    slug = slug[:40].strip("-")
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


def check_segments(uri: str, where: str) -> None:
    """Refuse empty, `.` and `..` path segments (the CRD does too; objects admitted before that rule, or
    `tauon run --local`, reach here): `pvc://claim/../../tmp/x` must never escape its mount."""
    if re.search(BAD_SEGMENT_RE, uri):
        raise InvalidSpec(f'{where}: empty, "." and ".." path segments are not allowed (got {uri})')


def check_reserved_keys(tpl: PodTemplateOverrides, where: str) -> None:
    """podTemplate labels/annotations may not use the operator's tauon.dev/ keys."""
    for kind, keys in (("labels", tpl.labels), ("annotations", tpl.annotations)):
        bad = sorted(k for k in keys if k.startswith(RESERVED_KEY_PREFIX))
        if bad:
            raise InvalidSpec(
                f"{where}.{kind}: keys under {RESERVED_KEY_PREFIX} are reserved for the operator: {', '.join(bad)}"
            )


@dataclass
class _ClaimUse:
    sub: str  # path inside the claim, "" for the claim root
    write: bool


def _covers(outer: str, inner: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + "/")


@dataclass
class Storage:
    """Volumes and mounts for the storage URIs of one pod, and where each URI lands inside it.

    `pvc://CLAIM/PATH` is one volume per claim, mounted with `subPath: PATH` at `PVC_ROOT/CLAIM/PATH`
    (the rest of the claim is not visible). Paths nested in another one on the same claim share the outer
    mount; a mount is writable only when something inside it is written."""

    volumes: list[Manifest] = field(default_factory=list)
    mounts: list[Manifest] = field(default_factory=list)
    claims: dict[str, bool] = field(default_factory=dict)  # claim -> needs write
    _uses: dict[str, list[_ClaimUse]] = field(default_factory=dict)

    def add(self, uri: str, where: str, cfg: OperatorConfig, write: bool = False) -> str:
        """Mount what `uri` needs and return the local path (hf:// ids and s3:// URIs pass through)."""
        check_segments(uri, where)
        if uri.startswith(("hf://", "s3://")):
            return uri  # read by the workload itself (hf:// ids, s3:// through spec.storage.s3)
        if uri.startswith("pvc://"):
            claim, _, sub = uri.removeprefix("pvc://").partition("/")
            self._uses.setdefault(claim, []).append(_ClaimUse(sub, write))
            self.claims[claim] = self.claims.get(claim, False) or write
            return f"{PVC_ROOT}/{claim}/{sub}".rstrip("/")
        if uri.startswith("file://"):
            path = uri.removeprefix("file://")
            if not path.startswith("/"):
                raise InvalidSpec(
                    f"{where}: relative file:// paths ({uri}) only work with `tauon run --local`; "
                    "use pvc:// on a cluster"
                )
            if not cfg.allow_host_paths:
                raise InvalidSpec(
                    f"{where}: file:// sources need the operator's --allow-host-paths (dev clusters only); "
                    "use pvc:// instead"
                )
            name = _volume_name("host", path)
            existing = next((v for v in self.volumes if v["name"] == name), None)
            if existing is None:
                self.volumes.append(
                    {"name": name, "hostPath": {"path": path, "type": "DirectoryOrCreate" if write else ""}}
                )
                self.mounts.append({"name": name, "mountPath": path})
            elif write:
                existing["hostPath"]["type"] = "DirectoryOrCreate"
            return path
        raise InvalidSpec(f"{where}: unsupported storage URI {uri!r}")

    def finish(self) -> None:
        """Add the claims' volumes and subPath mounts (read-only unless written); settle hostPath types."""
        for claim, uses in self._uses.items():
            name = _volume_name("pvc", claim)
            self.volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
            outer = sorted(
                {u.sub for u in uses if not any(_covers(o.sub, u.sub) and o.sub != u.sub for o in uses)}
            )
            for sub in outer:
                mount: Manifest = {"name": name, "mountPath": f"{PVC_ROOT}/{claim}/{sub}".rstrip("/")}
                if sub:
                    mount["subPath"] = sub
                mount["readOnly"] = not any(u.write for u in uses if _covers(sub, u.sub))
                self.mounts.append(mount)
        self._uses = {}
        for v in self.volumes:
            hp = v.get("hostPath")
            if hp is not None and not hp["type"]:
                del hp["type"]


def covering_mount(storage: Storage, path: str) -> str:
    """The deepest mountPath of `storage` that contains `path` (the path itself when none does)."""
    best = ""
    for m in storage.mounts:
        mp = str(m["mountPath"]).rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and len(mp) > len(best):
            best = mp
    return best or path


def env_list(items: list[EnvVar]) -> list[Manifest]:
    return [e.dump() for e in items]


def merge_env(
    ours: list[Manifest], user: list[Manifest], overridable_prefix: str | tuple[str, ...] | None = None
) -> list[Manifest]:
    """Our variables then the user's; the user's win only for names under overridable_prefix (one
    prefix or a tuple of them)."""
    user_names = {e["name"] for e in user}
    kept = [
        e
        for e in ours
        if not (overridable_prefix and e["name"].startswith(overridable_prefix) and e["name"] in user_names)
    ]
    return kept + user


def pod_security(cfg: OperatorConfig) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": cfg.run_as_user,
        "runAsGroup": cfg.run_as_user,
        "fsGroup": cfg.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def apply_overrides(pod_spec: Manifest, tpl: PodTemplateOverrides, extra_tolerations: list[Manifest]) -> None:
    """podTemplate's bounded overrides onto a pod spec (in place)."""
    if tpl.node_selector:
        pod_spec["nodeSelector"] = dict(tpl.node_selector)
    tolerations = [t.dump() for t in tpl.tolerations]
    for t in extra_tolerations:
        if t not in tolerations:
            tolerations.append(t)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if tpl.affinity:
        pod_spec["affinity"] = tpl.affinity
    if tpl.priority_class_name:
        pod_spec["priorityClassName"] = tpl.priority_class_name
    if tpl.scheduler_name:
        pod_spec["schedulerName"] = tpl.scheduler_name
    if tpl.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.dump() for s in tpl.image_pull_secrets]
    if tpl.service_account_name:
        pod_spec["serviceAccountName"] = tpl.service_account_name
        pod_spec["automountServiceAccountToken"] = True
    else:
        pod_spec["automountServiceAccountToken"] = False


def container_resources(resources: ResourceRequirements) -> Manifest:
    """A container's resources: quantities as strings, extended resources (nvidia.com/gpu) with a limit
    equal to the request (the API server refuses them otherwise), empty sections left out."""
    out = {k: {q: str(v) for q, v in getattr(resources, k).items()} for k in ("requests", "limits")}
    for q, v in out["requests"].items():
        if "/" in q and not q.split("/", 1)[0].endswith("kubernetes.io"):
            out["limits"].setdefault(q, v)
    return {k: v for k, v in out.items() if v}


def gpu_count(resources: Any) -> int:
    """nvidia.com/gpu requested (requests, else limits: Kubernetes defaults requests to limits)."""
    raw = resources.requests.get("nvidia.com/gpu", resources.limits.get("nvidia.com/gpu", 0))
    try:
        return int(str(raw))
    except ValueError as e:
        raise InvalidSpec(f"spec.resources: nvidia.com/gpu must be a whole number, got {raw!r}") from e


def dump(model: KubeModel) -> Manifest:
    return model.dump()


S3_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))


def s3_env(storage: StorageSpec | None) -> list[Manifest]:
    """spec.storage.s3 as container env: endpoint and region as values, the credentials only as
    secretKeyRef (AWS_SESSION_TOKEN optional), so no credential is ever rendered into a manifest."""
    s3 = storage.s3 if storage is not None else None
    if s3 is None:
        return []
    env: list[Manifest] = []
    if s3.endpoint:
        env.append({"name": "TAUON_S3_ENDPOINT", "value": s3.endpoint})
    if s3.region:
        env.append({"name": "AWS_REGION", "value": s3.region})
    if s3.secret_ref is not None:
        for key, optional in S3_SECRET_KEYS:
            ref: Manifest = {"name": s3.secret_ref.name, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env
