"""Continuous batching for causal LMs: the scheduler (no torch).

Sequences wait in a FIFO queue and join the running batch between decode steps, up to
``max_running`` at once; a sequence leaves the batch at the step where it finishes (EOS, a stop
string, its own ``max_tokens``, the model length) or where its client went away (``cancel``). One
engine thread runs ``step()`` in a loop; the event loop only submits, cancels and reads events.
Admission is also bounded by a KV budget (``max_batched_tokens``: rows x the longest sequence), and the
admitted sequences are prefilled in groups of similar length. Every step also answers the waiting
sequences that were cancelled or passed ``max_queue_wait_s``, so the deadline holds while the batch is
full. A prefill that raises leaves the batch as it was; its sequences are retried one at a time so only
the one that fails gets the error. After each step the backend's rows are checked against the running
sequences (:meth:`Scheduler.health_error` reports what cannot be repaired).

The model work is behind :class:`Backend` (``prefill`` new sequences into the batch, ``decode`` one
token for every running row, ``remove`` rows); :mod:`tauon_serve.generation` implements it with a
Hugging Face model and a KV cache. Tests drive the scheduler with a fake backend as well as the real one.

Text: every sequence has an :class:`~tauon_serve.detokenizer.IncrementalDetokenizer` over the backend's
``detokenize``, so a step decodes a few tokens per sequence, not its whole output; stop strings are
looked for only where the step's text can complete one. Text that may be the start of a stop string, or
an incomplete UTF-8 character, is held back until the next token decides it; a step looks only at that
held tail and its new text (stop strings are bounded, :func:`~tauon_serve.detokenizer.stop_error`).

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

from .detokenizer import IncrementalDetokenizer, find_stop, stop_error, stop_prefix_len

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
    sent: list[str] = field(default_factory=list)  # the text pieces already sent, in order
    held: str = ""  # decoded text not sent yet (it may start a stop string); bounded by the longest stop
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    generator: Any = None  # the backend's per-sequence RNG (sampling)
    detokenizer: IncrementalDetokenizer | None = None  # set by the scheduler at the first token

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The decoded generated text (complete characters), stop strings applied (joined on demand)."""
        return "".join(self.sent) + self.held

    @property
    def span(self) -> int:
        """Tokens this sequence has in the KV cache."""
        return len(self.prompt_ids) + len(self.generated)


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


DEFAULT_MAX_BATCHED_TOKENS = 16384
DEFAULT_MAX_PREFILL_TOKENS = 4096


class Scheduler:
    """``max_batched_tokens`` bounds the KV cache of the running batch, counted in token slots: rows x
    the padded width (the longest sequence). A sequence is admitted only while the batch stays within it
    (a sequence alone is always admitted), so one long prompt does not pad dozens of short rows to its
    length. ``max_prefill_tokens`` bounds one prefill pass (rows x longest prompt): the admitted
    sequences are prefilled in groups of similar length, a long prompt alone."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_running: int,
        max_waiting: int,
        max_queue_wait_s: float | None = None,
        metrics: EngineMetrics | None = None,
        max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> None:
        self.backend = backend
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_queue_wait_s = max_queue_wait_s
        self.max_batched_tokens = max_batched_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics or EngineMetrics()
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._fault: str | None = None  # the batch is inconsistent and could not be reset
        self.steps = 0
        # Called by the engine thread after every step (e.g. to hand the step's events to an event loop
        # in one wake-up instead of one per sequence).
        self.after_step: Callable[[], None] | None = None

    # -- called from any thread ------------------------------------------------------------------

    def submit(self, seq: Sequence_) -> None:
        problem = stop_error(seq.params.stop)
        if problem is not None:
            raise ValueError(problem)
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

    def health_error(self) -> str | None:
        """Why the engine cannot serve any more (its thread died, its batch is broken), or None."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._closed:
            return "the generation thread has stopped"
        return self._fault

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
                self.check_batch()
                if self.after_step is not None:
                    self.after_step()

    def check_batch(self) -> None:
        """After a step: the backend's rows must be the running sequences. If not, fail them all and reset
        the batch; if even that leaves it inconsistent, :meth:`health_error` reports it."""
        rows = getattr(self.backend, "batch_rows", None)
        if rows is None or rows() == len(self.running):
            return
        message = f"the KV cache holds {rows()} rows for {len(self.running)} running sequences"
        log.error("%s: failing them and resetting the batch", message)
        self._fail_all(message)
        if rows() != 0:
            self._fault = message

    def _fail_all(self, message: str) -> None:
        rows = list(range(len(self.running)))
        for seq in self.running:
            self._finish(seq, "error", error=message)
        self.running = []
        try:
            reset = getattr(self.backend, "reset", None)
            if reset is not None:
                reset()
            else:
                self.backend.remove(rows)
        except Exception:
            log.exception("cannot reset the batch")
        self._report_gauges()

    def _expire(self, now: float) -> None:
        """Answer the waiting sequences that were cancelled or waited past the deadline, wherever they are
        in the queue (called at every step, so the deadline holds while the batch is full)."""
        limit = self.max_queue_wait_s
        with self._lock:
            if not any(
                s.cancelled or (limit is not None and now - s.enqueued_at > limit) for s in self.waiting
            ):
                return
            keep: deque[Sequence_] = deque()
            for seq in self.waiting:
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                elif limit is not None and now - seq.enqueued_at > limit:
                    self._finish(seq, "timeout", error=f"waited {now - seq.enqueued_at:.1f}s in the queue")
                else:
                    keep.append(seq)
            self.waiting = keep
            self._report_gauges()

    def _admit(self) -> list[Sequence_]:
        self._expire(time.monotonic())
        admitted: list[Sequence_] = []
        rows = len(self.running)
        width = max((s.span for s in self.running), default=0)
        with self._lock:
            while self.waiting and rows + len(admitted) < self.max_running:
                seq = self.waiting[0]
                wider = max(width, len(seq.prompt_ids) + 1)
                if rows + len(admitted) > 0 and (rows + len(admitted) + 1) * wider > self.max_batched_tokens:
                    break  # over the KV budget: wait for rows to leave (FIFO: no overtaking)
                admitted.append(self.waiting.popleft())
                width = wider
        return admitted

    def _groups(self, seqs: list[Sequence_]) -> list[list[Sequence_]]:
        """Prefill groups: by length, each within ``max_prefill_tokens`` padded tokens and at most twice
        its shortest prompt, so a long prompt is prefilled alone and short ones are not padded to it."""
        groups: list[list[Sequence_]] = []
        for seq in sorted(seqs, key=lambda q: len(q.prompt_ids)):
            n = len(seq.prompt_ids)
            group = groups[-1] if groups else None
            if (
                group is None
                or (len(group) + 1) * n > self.max_prefill_tokens
                or n > 2 * len(group[0].prompt_ids)
            ):
                groups.append([seq])
            else:
                group.append(seq)
        return groups

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
        for group in self._groups(admitted):
            self._prefill(group)
        if admitted:
            self._drop(lambda s: s.done, None)
        self._report_gauges()
        self.steps += 1

    def _prefill(self, group: list[Sequence_]) -> None:
        """Prefill one group into the batch. The backend leaves the batch as it was when it raises: the
        group is retried one sequence at a time, so only the sequence that fails gets the error."""
        try:
            first = self.backend.prefill(group)
        except Exception as exc:
            if len(group) > 1:
                log.warning("prefill of %d sequences failed (%s); one at a time", len(group), exc)
                for seq in group:
                    self._prefill([seq])
                return
            log.exception("prefill failed")
            self._finish(group[0], "error", error=f"{type(exc).__name__}: {exc}")
            return
        self.running.extend(group)
        now = time.monotonic()
        for seq, tok in zip(group, first, strict=True):
            seq.first_token_at = now
            if self.metrics.on_first_token is not None:
                self.metrics.on_first_token(now - seq.enqueued_at)
            self._append(seq, tok)

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
            seq.held += detok.flush(seq.generated)
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        # Only the held tail (at most the longest stop less one character) and this step's text are
        # looked at: a stop string that ends in the new text starts in the held tail.
        old = len(seq.held)
        buf = seq.held + detok.step(seq.generated)
        stops = seq.params.stop
        cut = find_stop(buf, stops, old) if stops and len(buf) > old else None
        if cut is not None:
            seq.held = buf[:cut]
            self._finish(seq, "stop")
            return
        if len(seq.generated) >= seq.params.max_tokens or seq.span >= self.backend.max_model_length:
            seq.held = buf + detok.flush(seq.generated)
            self._finish(seq, "length")
            return
        keep = stop_prefix_len(buf, stops) if stops else 0
        seq.held = buf[len(buf) - keep :]
        if len(buf) > keep:
            self._send(seq, Event(buf[: len(buf) - keep], None, len(seq.prompt_ids), len(seq.generated)))

    def _send(self, seq: Sequence_, event: Event) -> None:
        if event.text:
            seq.sent.append(event.text)
        seq.on_event(event)

    def _finish(self, seq: Sequence_, reason: str, error: str | None = None) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        delta = seq.held if reason in ("stop", "length") else ""
        seq.held = ""
        n = len(seq.generated)
        if seq.first_token_at is not None and self.metrics.on_finish is not None and n > 1:
            self.metrics.on_finish(n, (time.monotonic() - seq.first_token_at) / (n - 1))
        self._send(seq, Event(delta, reason, len(seq.prompt_ids), n, error))
