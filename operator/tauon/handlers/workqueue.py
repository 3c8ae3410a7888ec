"""Per-object work queue with coalescing: at most one reconcile per object runs at a time, and any
number of triggers that arrive while it runs collapse into one more pass. Different objects reconcile
concurrently. A failing reconcile is logged and counted; the next trigger (an event or the periodic
pass) retries it. Every pass has a deadline: a reconcile stuck on I/O is cancelled and counted as a
failure instead of parking its object forever; `stuck_for` lets liveness notice a pass that outlives
its deadline anyway (a blocked event loop).

At most `max_concurrent` passes run at once (as controller-runtime's MaxConcurrentReconciles): a pass
holds the gang it rendered while its requests wait for a connection, so a burst of thousands of new
objects, reconciled all at once, held thousands of gangs in memory (the operator went past its chart's
memory limit at 10k pods); waiting objects cost only their key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("tauon.workqueue")
Key = tuple[str, str, str]  # (controller, namespace, name)
Reconciler = Callable[[str, str], Awaitable[None]]
Observer = Callable[[str, bool, float], None]  # (controller, succeeded, seconds)


DEADLINE_SECONDS = 300.0
MAX_CONCURRENT = 64  # passes at once; the API client has 100 connections, a pass uses up to a gang's


class WorkQueue:
    def __init__(
        self,
        observe: Observer | None = None,
        deadline: float = DEADLINE_SECONDS,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._reconcilers: dict[str, Reconciler] = {}
        self._observe = observe
        self.deadline = deadline
        self._started: dict[Key, float] = {}  # key -> monotonic start of its current pass
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, controller: str, reconciler: Reconciler) -> None:
        self._reconcilers[controller] = reconciler

    def trigger(self, controller: str, namespace: str, name: str, delay: float = 0.0) -> None:
        """Reconcile soon; bursts of triggers for one object collapse into at most one extra pass. With
        `delay`, an idle object waits that long first, so that a burst arriving within it (the watch
        events of a gang's pods) is one pass, not one per event."""
        if controller not in self._reconcilers:
            raise KeyError(f"no reconciler registered for controller {controller!r}")
        key = (controller, namespace, name)
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def busy(self) -> int:
        """Objects with a reconcile running or pending."""
        return len(self._running)

    async def _run(self, key: Key, delay: float = 0.0) -> None:
        controller, ns, name = key
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            while True:
                async with self._slots:
                    self._dirty.discard(key)
                    await self._pass(controller, ns, name)
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)

    async def _pass(self, controller: str, ns: str, name: str) -> None:
        key = (controller, ns, name)
        t0 = time.perf_counter()
        self._started[key] = time.monotonic()
        ok = False
        try:
            async with asyncio.timeout(self.deadline):
                await self._reconcilers[controller](ns, name)
            ok = True
        except TimeoutError:
            log.error(
                "reconcile %s %s/%s exceeded its %.0fs deadline; will retry",
                controller,
                ns,
                name,
                self.deadline,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile %s %s/%s failed; will retry", controller, ns, name)
        finally:
            self._started.pop(key, None)
            if self._observe is not None:
                self._observe(controller, ok, time.perf_counter() - t0)

    def stuck_for(self) -> float:
        """Seconds the oldest running pass has run beyond its deadline (0 when none has)."""
        if not self._started:
            return 0.0
        oldest = min(self._started.values())
        return max(0.0, time.monotonic() - oldest - self.deadline)

    async def drain(self) -> None:
        """Wait until nothing runs (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
