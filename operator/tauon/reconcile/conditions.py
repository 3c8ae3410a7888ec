"""KEP-1623 conditions: lastTransitionTime moves only when status flips; every condition carries
observedGeneration."""

from __future__ import annotations

from datetime import datetime

from tauon.api.common import Condition, ConditionStatus


def get(conds: list[Condition], ctype: str) -> Condition | None:
    return next((c for c in conds if c.type == ctype), None)


def is_true(conds: list[Condition], ctype: str) -> bool:
    c = get(conds, ctype)
    return c is not None and c.status == "True"


def set_condition(
    conds: list[Condition],
    ctype: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> bool:
    """Set a condition in place; returns True when its status flipped (a transition worth an event)."""
    old = get(conds, ctype)
    if old is None:
        conds.append(
            Condition(
                type=ctype,
                status=status,
                reason=reason,
                message=message,
                observed_generation=generation,
                last_transition_time=now,
            )
        )
        return True
    flipped = old.status != status
    old.status = status
    old.reason = reason
    old.message = message
    old.observed_generation = generation
    if flipped or old.last_transition_time is None:
        old.last_transition_time = now
    return flipped
