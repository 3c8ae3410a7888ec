"""A spec that does not parse (admission should have caught it, e.g. CRDs older than the operator) fails
clearly and once, for every kind. Pure: raw body + errors -> Plan (status and one Warning event)."""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from tauon.api.names import (
    FAILED,
    FINETUNEJOB,
    FINETUNESWEEP,
    INFERENCESERVICE,
    MODEL_READY,
    READY,
    REASON_INVALID_SPEC,
    Manifest,
)
from tauon.reconcile.context import cap, summarise
from tauon.reconcile.plan import Event, Plan

# kind -> (condition type, status it takes) written for an unparseable spec
CONDITIONS: dict[str, tuple[tuple[str, str], ...]] = {
    FINETUNEJOB: ((FAILED, "True"),),
    FINETUNESWEEP: ((FAILED, "True"),),
    INFERENCESERVICE: ((MODEL_READY, "False"), (READY, "False")),
}


def describe(error: ValidationError) -> str:
    """'spec.a.b: message' per error; the first and a count when there are many."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(x) for x in err["loc"])
        lines.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return summarise(["; ".join(lines[:3])] + lines[3:], "more errors") if lines else str(error)


def invalid_spec_plan(kind: str, body: Manifest, message: str, now: datetime) -> Plan:
    """Phase Failed with reason InvalidSpec on the kind's conditions; empty once recorded."""
    message = cap(message)
    status = dict(body.get("status") or {})
    generation = (body.get("metadata") or {}).get("generation")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    conds: list[Manifest] = [dict(c) for c in status.get("conditions") or [] if isinstance(c, dict)]
    changed = status.get("phase") != "Failed"
    for ctype, cstatus in CONDITIONS[kind]:
        old = next((c for c in conds if c.get("type") == ctype), None)
        new = {
            "type": ctype,
            "status": cstatus,
            "reason": REASON_INVALID_SPEC,
            "message": message,
            "lastTransitionTime": stamp,
            "observedGeneration": generation,
        }
        if old is None:
            conds.append(new)
            changed = True
            continue
        if old.get("status") == cstatus:
            new["lastTransitionTime"] = old.get("lastTransitionTime", stamp)
        if any(old.get(k) != v for k, v in new.items()):
            old.update(new)
            changed = True
    plan = Plan()
    if changed:
        plan.status = {**status, "phase": "Failed", "conditions": conds, "observedGeneration": generation}
        plan.events.append(Event("Warning", REASON_INVALID_SPEC, message))
    return plan
