"""Creates this operator made whose watch events have not arrived yet ("expectations", as in Kubernetes'
job controller).

A pass plans from the indexes, and the indexes lag the API server: right after a pass created a gang, the
next pass (triggered by its own status write, or by the first pods' events) can still miss some of those
pods and create them again (409, then a GET to check the owner). So each create the operator sends is
remembered here, per owner, until the watch delivers that child (any event of it: added, modified, even
deleted) or the index holds it, or EXPECTATION_TTL_SECONDS pass. Until then the planner treats the child
as existing when it decides what to create, and nothing else.

Level-triggered and idempotent: nothing here is needed to converge. A restarted operator has no
expectations and re-plans from the cluster (a create of something that exists is a 409, which is fine);
an expectation the watch never confirms expires, and the child is created again if it is still missing;
a child deleted before the index saw it is observed by its DELETED event (it then counts as missing).
A create that failed is dropped at once (`lower`): there is nothing to wait for.
Expectations are keyed by the owner's uid too, so a re-created owner of the same name inherits none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

Owner = tuple[str, str, str]  # (controller, namespace, name)
Child = tuple[str, str]  # (kind, name)

EXPECTATION_TTL_SECONDS = 300.0  # as Kubernetes' controllers (ExpectationsTimeout)


class Expectations:
    def __init__(
        self, ttl: float = EXPECTATION_TTL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"expectation ttl must be positive, got {ttl}")
        self.ttl = ttl
        self._clock = clock
        # owner -> child -> (owner uid, monotonic time the create was sent)
        self._pending: dict[Owner, dict[Child, tuple[str, float]]] = {}

    def expect(self, owner: Owner, uid: str, children: Iterable[Child]) -> None:
        """Creates about to be sent for the owner with this uid (call before sending them, so that no
        watch event can arrive before its expectation)."""
        now = self._clock()
        mine = self._pending.setdefault(owner, {})
        for child in children:
            mine[child] = (uid, now)
        if not mine:
            del self._pending[owner]

    def observe(self, owner: Owner, child: Child) -> None:
        """The watch delivered an event of this child: the indexes know it (or know it is gone)."""
        self.lower(owner, [child])

    def lower(self, owner: Owner, children: Iterable[Child]) -> None:
        """Drop expectations: observed, or their create failed."""
        mine = self._pending.get(owner)
        if mine is None:
            return
        for child in children:
            mine.pop(child, None)
        if not mine:
            del self._pending[owner]

    def pending(self, owner: Owner, uid: str, seen: Iterable[Child] = ()) -> frozenset[Child]:
        """Children of this owner (this uid) created but not yet seen. `seen` are the children the
        indexes hold now: they are observed. Expired expectations, and those of an older owner with the
        same name, are dropped."""
        self.lower(owner, seen)
        mine = self._pending.get(owner)
        if mine is None:
            return frozenset()
        now = self._clock()
        for child, (child_uid, since) in list(mine.items()):
            if child_uid != uid or now - since >= self.ttl:
                del mine[child]
        if not mine:
            del self._pending[owner]
            return frozenset()
        return frozenset(mine)

    def forget(self, owner: Owner) -> None:
        """The owner is gone."""
        self._pending.pop(owner, None)

    def count(self) -> int:
        """Children expected over all owners (expired ones included until their owner is planned)."""
        return sum(len(m) for m in self._pending.values())
