"""Dynamic batching for the model server.

Requests (each a list of instances) go into one FIFO queue. A single batcher task collects instances
(see the modes below for when it waits), then runs ONE call of ``run_batch`` (the forward pass) in an executor thread so the
event loop stays free, and hands each request its slice of the results. A request with more instances
than ``max_batch_size`` is split across consecutive batches; its future resolves when every slice is
done, with results in request order.

Batching modes (exact semantics):

* ``max_batch_size > 1`` and ``max_latency > 0``: adaptive batching; instances of different requests
  are merged into one forward pass. Work that arrives while the model is idle runs at once (with
  whatever else is already queued); the window (``max_latency`` from the oldest queued instance, or
  until ``max_batch_size`` instances are queued) applies only to a backlog, i.e. to work that queued
  while a forward pass was running. One exception keeps closed-loop clients together: right after a
  pass of n > 1 instances, idle-model work waits (at most the window) for n instances, the clients of
  that pass sending their next requests.
* ``max_latency == 0``: no waiting and no merging across requests: a forward pass holds instances of
  exactly one request (at most ``max_batch_size`` of them; larger requests are split).
* ``max_batch_size == 1``: every forward pass holds exactly one instance.

If a merged forward pass raises, each request of that batch is retried alone so one bad request cannot
fail its neighbours; a request whose own pass fails gets the exception.

This module does not import torch; ``run_batch`` is any ``Callable[[list[T]], list[R]]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("tauon.serve.batching")


class BatcherClosed(Exception):
    """The server is shutting down and takes no new work."""


class QueueFull(Exception):
    """More instances are queued than ``max_queued_items``."""


class QueueTimeout(Exception):
    """A request waited longer than ``max_queue_wait_s`` before its first forward pass."""


@dataclass(eq=False)
class PendingRequest(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]]
    enqueued_at: float
    results: list[Any]
    remaining: int


@dataclass(eq=False)
class Segment(Generic[T, R]):
    """Instances ``[start, stop)`` of one request."""

    request: PendingRequest[T, R]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def take_batch(
    queue: deque[Segment[T, R]], max_items: int, single_request: bool = False
) -> list[Segment[T, R]]:
    """Pop up to ``max_items`` instances from the head of ``queue`` (pure; no I/O).

    A head segment larger than the room left is split: the part that fits goes into the batch, the
    rest stays at the head of the queue. Segments of requests that are already done (cancelled by the
    client or failed in an earlier slice) are dropped. With ``single_request`` only segments of the
    first live request are taken.
    """
    batch: list[Segment[T, R]] = []
    room = max_items
    while queue and room > 0:
        seg = queue[0]
        if seg.request.future.done():
            queue.popleft()
            continue
        if single_request and batch and seg.request is not batch[0].request:
            break
        if seg.size <= room:
            queue.popleft()
            batch.append(seg)
            room -= seg.size
        else:
            batch.append(Segment(seg.request, seg.start, seg.start + room))
            seg.start += room
            room = 0
    return batch


def batch_items(batch: Sequence[Segment[T, R]]) -> list[T]:
    return [seg.request.items[i] for seg in batch for i in range(seg.start, seg.stop)]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int,
        max_latency_s: float,
        executor: Executor | None = None,
        max_queued_items: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        max_queue_wait_s: float | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_latency_s < 0:
            raise ValueError("max_latency_s must be >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.merging = max_batch_size > 1 and max_latency_s > 0
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(1, thread_name_prefix="tauon-infer")
        self._max_queued = max_queued_items
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._queue: deque[Segment[T, R]] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._draining = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._backlog = False
        self._max_wait_s = max_queue_wait_s
        self._last_items = 0  # instances in the last forward pass
        self._last_end = float("-inf")  # loop time when it ended
        # How long after a pass its clients count as "about to send again" (their next requests follow
        # the responses by a round trip): ten windows, at least 50 ms.
        self._recent_s = max(10 * max_latency_s, 0.05)

    @property
    def queued(self) -> int:
        """Instances waiting for a forward pass (not counting the one running)."""
        return self._queued

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="tauon-batcher")

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and wait for their results (in order)."""
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        n = len(items)
        if n == 0:
            return []
        if self._max_queued is not None and self._queued + n > self._max_queued:
            raise QueueFull(f"{self._queued} instances are queued; the limit is {self._max_queued}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[R]] = loop.create_future()
        req: PendingRequest[T, R] = PendingRequest(items, fut, loop.time(), [None] * n, n)
        self._queue.append(Segment(req, 0, n))
        self._set_queued(self._queued + n)
        self._wakeup.set()
        return await fut

    def begin_drain(self) -> None:
        """Stop waiting for batches to fill: run what is queued right away (shutdown has begun)."""
        self._draining = True
        self._wakeup.set()

    async def close(self) -> None:
        """Refuse new work, finish everything already queued, then stop the batcher task."""
        self._closed = True
        self.begin_drain()
        if self._task is not None:
            await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------------

    def _set_queued(self, n: int) -> None:
        self._queued = n
        if self._on_queue_depth is not None:
            self._on_queue_depth(n)

    def _prune_head(self) -> None:
        while self._queue and self._queue[0].request.future.done():
            self._queue.popleft()
        self._set_queued(sum(seg.size for seg in self._queue))

    def _expire(self, now: float) -> None:
        """Fail requests that waited longer than ``max_queue_wait_s`` for their first pass."""
        if self._max_wait_s is None:
            return
        for seg in self._queue:
            req = seg.request
            if not req.future.done() and req.remaining == len(req.items):
                if now - req.enqueued_at > self._max_wait_s:
                    req.future.set_exception(
                        QueueTimeout(
                            f"waited {now - req.enqueued_at:.1f}s in the queue (limit {self._max_wait_s:g}s)"
                        )
                    )

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._prune_head()
            if not self._queue:
                if self._closed:
                    return
                self._backlog = False  # the model is idle: the next arrival runs at once
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            target = self._fill_target(loop.time()) if self.merging and not self._draining else 0
            if target > self._queued:
                # Adaptive: wait (up to the window from the oldest queued instance) only for work that
                # is known to be coming: a backlog, or the clients of a multi-instance pass just ended.
                deadline = self._queue[0].request.enqueued_at + self.max_latency_s
                while self._queued < target and not self._draining:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        async with asyncio.timeout(remaining):
                            await self._wakeup.wait()
                    except TimeoutError:
                        break
            self._expire(loop.time())
            batch = take_batch(self._queue, self.max_batch_size, single_request=not self.merging)
            self._set_queued(sum(seg.size for seg in self._queue))
            if not batch:
                continue
            try:
                await self._execute(batch)
                self._backlog = True  # whatever is queued now arrived while the model was busy
                self._last_items = sum(seg.size for seg in batch)
                self._last_end = loop.time()
            except Exception as exc:  # a bug here must not leave requests hanging forever
                log.exception("batcher failed")
                for seg in batch:
                    if not seg.request.future.done():
                        seg.request.future.set_exception(exc)

    def _fill_target(self, now: float) -> int:
        """How many instances to wait for before the next pass (0: run what is queued at once).

        A backlog (work that queued while a pass ran) waits for a full batch. Work that finds the model
        idle runs at once, unless the last pass held several instances and ended moments ago: then its
        clients are answering their responses with new requests, and running the first arrival alone
        would split closed-loop load into alternating passes of 1 and n-1 instances. It waits for as
        many as that pass held (never longer than the window). A lone client's passes hold one
        instance, so it never waits."""
        if self._backlog:
            return self.max_batch_size
        if self._last_items > 1 and now - self._last_end <= self._recent_s:
            return min(self._last_items, self.max_batch_size)
        return 0

    async def _run(self, items: list[T]) -> list[R]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, items)
        finally:
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - t0)
        if len(outputs) != len(items):
            raise RuntimeError(f"the model returned {len(outputs)} results for {len(items)} inputs")
        return outputs

    async def _execute(self, batch: list[Segment[T, R]]) -> None:
        try:
            outputs = await self._run(batch_items(batch))
        except Exception as exc:
            requests = list(dict.fromkeys(seg.request for seg in batch))
            if len(requests) == 1:
                self._fail(requests[0], exc)
                return
            log.warning("a batch of %d requests failed (%s); retrying each request alone", len(requests), exc)
            for req in requests:
                segs = [seg for seg in batch if seg.request is req]
                try:
                    self._deliver(segs, await self._run(batch_items(segs)))
                except Exception as one_exc:
                    self._fail(req, one_exc)
            return
        self._deliver(batch, outputs)

    @staticmethod
    def _deliver(batch: Sequence[Segment[T, R]], outputs: Sequence[R]) -> None:
        k = 0
        for seg in batch:
            req = seg.request
            req.results[seg.start : seg.stop] = outputs[k : k + seg.size]
            k += seg.size
            req.remaining -= seg.size
            if req.remaining == 0 and not req.future.done():
                req.future.set_result(req.results)

    @staticmethod
    def _fail(req: PendingRequest[T, R], exc: BaseException) -> None:
        if not req.future.done():
            req.future.set_exception(exc)
