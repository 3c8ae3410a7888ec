"""The one reconcile both kinds go through:

  leading (tauon.handlers.leader) -> namespace not being deleted -> live body from the index -> freshest (our own status write)
  -> skip if being deleted or known gone (a ghost an index kept after a re-list) -> parse
  (failure: Failed / InvalidSpec, once) -> observe children -> pure planner -> apply the plan.

A kind plugs in with a `Controller`: its index, its parse, how it observes, how it plans, and what it
records after a plan was applied. Everything specific to a kind stays in its handler module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import ValidationError

from tauon.api.names import Manifest
from tauon.handlers.runtime import RT
from tauon.reconcile.invalid import describe, invalid_spec_plan
from tauon.reconcile.plan import Plan

T = TypeVar("T")  # the parsed object (FineTuneJob, InferenceService)


@dataclass(frozen=True)
class Controller(Generic[T]):
    name: str  # controller label in metrics, work queue key
    kind: str  # API kind of the reconciled object
    index: str  # tauon.handlers.indexes name holding the objects
    parse: Callable[[Manifest], T]  # raises pydantic.ValidationError
    # (object, body, uid, now) -> plan: observes the cluster (I/O) and calls the pure planner
    plan: Callable[[T, Manifest, str, dt.datetime], Awaitable[Plan]]
    after: Callable[[Manifest, Plan], None] | None = None  # metrics from plan.observations
    # kinds of watched children whose creates are expected until their watch events arrive
    # (tauon.handlers.expectations); the kind's plan reads RT.expectations.pending
    expect: frozenset[str] = frozenset()


async def reconcile_object(ctl: Controller[T], namespace: str, name: str) -> None:
    key = (ctl.name, namespace, name)
    if not RT.leading():
        return  # a follower observes only; the leader reconciles
    if RT.namespace_terminating(namespace):
        return  # no creates, no status, no events, no restarts counted while it is being deleted
    live = RT.indexes.live(ctl.index, (namespace, name))
    if live is None:
        return
    body = RT.freshest(key, live)
    if body["metadata"].get("deletionTimestamp") or body["metadata"].get("uid") in RT.gone:
        return
    now = dt.datetime.now(dt.UTC)
    try:
        obj = ctl.parse(body)
    except ValidationError as e:
        # admission should have caught this (e.g. CRDs older than the operator): fail clearly, once
        plan = invalid_spec_plan(ctl.kind, body, describe(e), now)
    else:
        plan = await ctl.plan(obj, body, body["metadata"]["uid"], now)
    if plan.is_empty() or not RT.leading():  # leadership may have been lost while observing
        return
    result = await RT.apply(ctl.name, ctl.kind, body, plan, ctl.expect)
    if ctl.after is not None and not result.stale:  # a stale plan did nothing: nothing to count
        ctl.after(body, plan)


def register(ctl: Controller[T]) -> None:
    async def run(namespace: str, name: str) -> None:
        await reconcile_object(ctl, namespace, name)

    RT.queue.register(ctl.name, run)
