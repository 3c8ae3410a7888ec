"""The one planning context both planners (FineTuneJob, InferenceService) work in, and the one rule for
events.

Event rule: an event accompanies a transition, never a steady state. A transition is a condition whose
status or reason changed (`Context.transition`), or the start of a new gang attempt (restart, resume),
which the FineTuneJob planner announces with `Context.event` itself. Re-planning a converged object
therefore posts nothing.

Messages are bounded: a condition message or event message longer than MAX_MESSAGE bytes is cut (the API
server refuses a status over its limits and a reconcile that cannot write its status never converges).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, Protocol, TypeVar

from tauon.api.common import Condition, ConditionStatus, find_condition
from tauon.reconcile.conditions import set_condition
from tauon.reconcile.plan import Event, Plan

MAX_MESSAGE = 1024  # bytes (UTF-8) of a condition or event message
EventType = Literal["Normal", "Warning"]
EventSpec = tuple[EventType, str, str]  # (type, reason, message)


class _Meta(Protocol):
    @property
    def generation(self) -> int: ...


class _Status(Protocol):
    conditions: list[Condition]


class _Object(Protocol):
    @property
    def metadata(self) -> _Meta: ...


ObjT = TypeVar("ObjT", bound=_Object)
StatusT = TypeVar("StatusT", bound=_Status)


def cap(message: str, limit: int = MAX_MESSAGE) -> str:
    """At most `limit` UTF-8 bytes; a cut message ends with an ellipsis."""
    raw = message.encode()
    if len(raw) <= limit:
        return message
    return raw[: limit - 3].decode(errors="ignore") + "..."


def summarise(items: list[str], what: str = "more") -> str:
    """'first item' or 'first item, and N more': lists of refusals grow with the gang, messages must not."""
    if not items:
        return ""
    first = cap(items[0], MAX_MESSAGE // 2)
    return first if len(items) == 1 else f"{first}, and {len(items) - 1} {what}"


@dataclass
class Context(Generic[ObjT, StatusT]):
    """One planning pass: the object, the clock, the status being built (a copy) and the plan."""

    obj: ObjT
    now: datetime
    st: StatusT
    plan: Plan = field(default_factory=Plan)

    @classmethod
    def start(cls, obj: ObjT, status: StatusT, now: datetime) -> Context[ObjT, StatusT]:
        return cls(obj, now, copy.deepcopy(status))

    @property
    def gen(self) -> int:
        return self.obj.metadata.generation

    def cond(self, ctype: str, status: bool, reason: str, message: str = "") -> bool:
        """Set a condition; True when its status or its reason changed (a transition)."""
        old = find_condition(self.st.conditions, ctype)
        old_reason = old.reason if old is not None else None
        s: ConditionStatus = "True" if status else "False"
        flipped = set_condition(self.st.conditions, ctype, s, reason, cap(message), self.gen, self.now)
        return flipped or old_reason != reason

    def transition(
        self,
        ctype: str,
        status: bool,
        reason: str,
        message: str,
        event: EventSpec | None = None,
    ) -> bool:
        """Set a condition and, on a transition, post `event` (type, reason, message) with it."""
        changed = self.cond(ctype, status, reason, message)
        if changed and event is not None:
            self.event(*event)
        return changed

    def event(self, type_: EventType, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, cap(message)))

    def drop(self, ctype: str) -> None:
        self.st.conditions = [c for c in self.st.conditions if c.type != ctype]
