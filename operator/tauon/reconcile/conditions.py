"""KEP-1623 conditions: lastTransitionTime moves only when status flips; every condition carries
observedGeneration. Reading them is tauon.api.common's (`find_condition`, `is_true`), shared with the SDK."""

from __future__ import annotations

from datetime import datetime

from tauon.api.common import Condition, ConditionStatus, find_condition


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
    old = find_condition(conds, ctype)
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
