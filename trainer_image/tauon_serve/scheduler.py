"""Continuous batching for causal LMs: the scheduler (no torch).

Sequences wait in a FIFO queue and join the running batch between decode steps, up to
``max_running`` at once; a sequence leaves the batch at the step where it finishes (EOS, a stop
string, its own ``max_tokens``, the model length) or where its client went away (``cancel``). One
engine thread runs ``step()`` in a loop; the event loop only submits, cancels and reads events.

The model work is behind :class:`Backend` (``prefill`` new sequences into the batch, ``decode`` one
token for every running row, ``remove`` rows); :mod:`tauon_serve.generation` implements it with a
Hugging Face model and a KV cache. Tests drive the scheduler with a fake backend as well as the real one.

Text: every sequence has an :class:`~tauon_serve.detokenizer.IncrementalDetokenizer` over the backend's
``detokenize``, so a step decodes a few tokens per sequence, not its whole output; stop strings are
looked for only where the step's text can complete one. Text that may be the start of a stop string, or
an incomplete UTF-8 character, is held back until the next token decides it.

This module imports neither torch nor FastAPI (an import-linter contract checks it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .detokenizer import IncrementalDetokenizer, find_stop, stop_prefix_len

log = logging.getLogger("tauon.serve.scheduler")


class QueueFull(Exception):
    """Too many sequences are waiting; the client should retry later (429)."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Event:
    """What a sequence produced at one step: new text, and the finish reason on its last event."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "timeout"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence_:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded generated text (complete characters), stop strings applied
    emitted: int = 0  # characters of ``text`` already sent
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    generator: Any = None  # the backend's per-sequence RNG (sampling)
    detokenizer: IncrementalDetokenizer | None = None  # set by the scheduler at the first token

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Backend(Protocol):
    """Model operations. Row ``i`` of the running batch is ``running[i]``."""

    max_model_length: int

    def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
        """Add ``seqs`` as new rows at the end of the batch; return each one's first token."""

    def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
        """Feed every running row its last token; return the next token of each row."""

    def remove(self, rows: Sequence[int]) -> None:
        """Drop these rows from the batch (others keep their order)."""

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def is_eos(self, token: int) -> bool: ...


@dataclass
class EngineMetrics:
    on_first_token: Callable[[float], None] | None = None
    on_finish: Callable[[int, float], None] | None = None  # tokens, seconds per output token
    on_tokens: Callable[[int], None] | None = None
    on_running: Callable[[int], None] | None = None
    on_waiting: Callable[[int], None] | None = None


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_running: int,
        max_waiting: int,
        max_queue_wait_s: float | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics or EngineMetrics()
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        # Called by the engine thread after every step (e.g. to hand the step's events to an event loop
        # in one wake-up instead of one per sequence).
        self.after_step: Callable[[], None] | None = None

    # -- called from any thread ------------------------------------------------------------------

    def submit(self, seq: Sequence_) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting; the limit is {self.max_waiting}")
            self.waiting.append(seq)
            self._report_gauges()
            self._wakeup.notify()

    def cancel(self, seq: Sequence_) -> None:
        """The client went away: the sequence leaves at the next step (or never starts)."""
        with self._lock:
            seq.cancelled = True
            self._wakeup.notify()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tauon-generate", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued and running, stop the engine thread."""
        with self._lock:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_now(self) -> None:
        with self._lock:
            self._closed = True
            self._stopped = True
            self._wakeup.notify()

    # -- engine thread ---------------------------------------------------------------------------

    def _report_gauges(self) -> None:
        if self.metrics.on_running is not None:
            self.metrics.on_running(len(self.running))
        if self.metrics.on_waiting is not None:
            self.metrics.on_waiting(len(self.waiting))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.waiting and not self.running and not self._closed:
                    self._wakeup.wait()
                if self._stopped or (self._closed and not self.waiting and not self.running):
                    return
            try:
                self.step()
            except Exception as exc:  # a model error fails the batch, never the server
                log.exception("generation step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
            finally:
                if self.after_step is not None:
                    self.after_step()

    def _fail_all(self, message: str) -> None:
        rows = list(range(len(self.running)))
        for seq in self.running:
            self._finish(seq, "error", error=message)
        self.running = []
        try:
            self.backend.remove(rows)
        except Exception:
            log.exception("cannot reset the batch")
        self._report_gauges()

    def _admit(self) -> list[Sequence_]:
        now = time.monotonic()
        admitted: list[Sequence_] = []
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_running:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                elif self.max_queue_wait_s is not None and now - seq.enqueued_at > self.max_queue_wait_s:
                    self._finish(seq, "timeout", error=f"waited {now - seq.enqueued_at:.1f}s in the queue")
                else:
                    admitted.append(seq)
        return admitted

    def step(self) -> None:
        """One scheduling step: drop cancelled rows, decode one token for every running row, drop the
        finished ones, then admit waiting sequences into the free slots (their prefill gives their first
        token; they decode with everyone else from the next step on)."""
        self._drop(lambda s: s.cancelled, "cancelled")
        if self.running:
            tokens = self.backend.decode(self.running)
            for seq, tok in zip(self.running, tokens, strict=True):
                self._append(seq, tok)
            self._drop(lambda s: s.done, None)
        admitted = self._admit()
        if admitted:
            try:
                first = self.backend.prefill(admitted)
            except Exception as exc:  # the batch is untouched: only the joining sequences fail
                log.exception("prefill of %d sequences failed", len(admitted))
                for seq in admitted:
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self._report_gauges()
                return
            self.running.extend(admitted)
            now = time.monotonic()
            for seq, tok in zip(admitted, first, strict=True):
                seq.first_token_at = now
                if self.metrics.on_first_token is not None:
                    self.metrics.on_first_token(now - seq.enqueued_at)
                self._append(seq, tok)
            self._drop(lambda s: s.done, None)
        self._report_gauges()
        self.steps += 1

    def _drop(self, pred: Callable[[Sequence_], bool], reason: str | None) -> None:
        rows = [i for i, s in enumerate(self.running) if pred(s)]
        if not rows:
            return
        for i in rows:
            if reason is not None:
                self._finish(self.running[i], reason)
        self.backend.remove(rows)
        keep = set(rows)
        self.running = [s for i, s in enumerate(self.running) if i not in keep]
        self._report_gauges()

    def _append(self, seq: Sequence_, token: int) -> None:
        if seq.done:
            return
        if self.metrics.on_tokens is not None:
            self.metrics.on_tokens(1)
        detok = seq.detokenizer
        if detok is None:
            detok = seq.detokenizer = IncrementalDetokenizer(self.backend.detokenize)
        if self.backend.is_eos(token):
            seq.text += detok.flush(seq.generated)
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        start = len(seq.text)
        seq.text += detok.step(seq.generated)
        stops = seq.params.stop
        cut = find_stop(seq.text, stops, start) if stops and len(seq.text) > start else None
        if cut is not None:
            seq.text = seq.text[:cut]
            self._finish(seq, "stop")
            return
        total = len(seq.prompt_ids) + len(seq.generated)
        if len(seq.generated) >= seq.params.max_tokens or total >= self.backend.max_model_length:
            seq.text += detok.flush(seq.generated)
            self._finish(seq, "length")
            return
        # Hold back a possible start of a stop string (the detokenizer holds an incomplete character).
        ready = len(seq.text) - stop_prefix_len(seq.text, stops) if stops else len(seq.text)
        if ready > seq.emitted:
            delta = seq.text[seq.emitted : ready]
            seq.emitted = ready
            seq.on_event(Event(delta, None, len(seq.prompt_ids), len(seq.generated)))

    def _finish(self, seq: Sequence_, reason: str, error: str | None = None) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        delta = seq.text[seq.emitted :] if reason in ("stop", "length") else ""
        seq.emitted = len(seq.text)
        n = len(seq.generated)
        if seq.first_token_at is not None and self.metrics.on_finish is not None and n > 1:
            self.metrics.on_finish(n, (time.monotonic() - seq.first_token_at) / (n - 1))
        seq.on_event(Event(delta, reason, len(seq.prompt_ids), n, error))
