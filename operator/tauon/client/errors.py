"""Errors the SDK raises. Every message is one line a person can act on."""

from __future__ import annotations


class TauonError(Exception):
    """Base class of every SDK error (the CLI prints its message, not a traceback)."""


class SpecError(TauonError, ValueError):
    """The object would be invalid: raised before anything is sent. `fields` maps field path -> message."""

    def __init__(self, kind: str, name: str, fields: dict[str, str]):
        self.kind = kind
        self.name = name
        self.fields = fields
        detail = "; ".join(f"{path}: {msg}" for path, msg in fields.items())
        super().__init__(f"invalid {kind} {name!r}: {detail}")


class NotFound(TauonError, LookupError):
    """`where` says where it was looked for: "namespace 'ns'" or "local run directory /path"."""

    def __init__(self, kind: str, name: str, where: str):
        self.kind = kind
        self.name = name
        self.where = where
        super().__init__(f"{kind} {name!r} not found in {where}")


class AlreadyExists(TauonError):
    def __init__(self, kind: str, name: str, where: str):
        super().__init__(
            f"{kind} {name!r} already exists in {where} "
            "(delete it first, or get a handle with job()/service())"
        )


class JobFailed(TauonError):
    """The FineTuneJob ended Failed; `reason` and `message` come from its Failed condition."""

    def __init__(self, name: str, reason: str, message: str):
        self.name = name
        self.reason = reason
        self.message = message
        super().__init__(f"FineTuneJob {name!r} failed: {reason}: {message}")


class SweepFailed(TauonError):
    """The FineTuneSweep ended Failed; `reason` and `message` come from its Failed condition."""

    def __init__(self, name: str, reason: str, message: str):
        self.name = name
        self.reason = reason
        self.message = message
        super().__init__(f"FineTuneSweep {name!r} failed: {reason}: {message}")


class NotReady(TauonError):
    """The object is not in a state that allows the call (e.g. serving a job that has not succeeded)."""


class ServiceFailed(TauonError):
    """The InferenceService (or the local model server) failed."""


class ClusterUnreachable(TauonError):
    """The Kubernetes API server cannot be reached, or no configuration points at one."""


class Forbidden(TauonError):
    """The API server refused the request (RBAC)."""


class MissingDependency(TauonError, ImportError):
    def __init__(self, package: str, purpose: str):
        super().__init__(f"{purpose} needs the {package!r} package: pip install {package}")
