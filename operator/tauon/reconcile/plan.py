"""What a reconcile decides; applied by tauon.kube. An empty plan means zero API writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tauon.api.names import Manifest


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    creates: list[Manifest] = field(default_factory=list)
    # server-side applies (children whose content we own and may change: Deployments, Services, HPAs)
    applies: list[Manifest] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    stops: list[str] = field(default_factory=list)  # pods to stop (activeDeadlineSeconds: 1)
    # JSON merge patches (RFC 7386) of children in the object's namespace: (kind, name, body), e.g.
    # (FineTuneJob, "sw-t3", {"metadata": {"annotations": {ANN_PRUNE: "..."}}}); a child gone is skipped
    patches: list[tuple[str, str, Manifest]] = field(default_factory=list)
    status: Manifest | None = None  # the whole new status when it changed
    status_first: bool = False  # write status before touching children (new attempts)
    events: list[Event] = field(default_factory=list)
    delete_self: bool = False  # ttlSecondsAfterFinished elapsed
    # facts for metrics: e.g. {"restart": "failure"}, {"running_after_seconds": 12.5}
    observations: dict[str, Any] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (
            self.creates
            or self.applies
            or self.deletes
            or self.stops
            or self.patches
            or self.status is not None
            or self.events
            or self.delete_self
        )
