"""Continuous batching for causal LMs: the model side (torch + transformers) and the asyncio bridge.

:class:`HFBackend` keeps ONE batched KV cache (a transformers ``DynamicCache``) for all running
sequences, each row right-aligned (left-padded) in a common width with a 2-D attention mask. Row ``i`` of
the scheduler's running list lives in cache slot ``slots[i]``:

* ``prefill``: the new prompts are run together (left-padded) into a fresh cache and their first tokens
  sampled; only then are they placed in the batch (so a prefill that raises leaves the batch as it
  was): into free slots wide enough for them (an in-place copy of those rows), the rest concatenated
  along the batch axis (the shorter of the two left-padded with masked zeros along the time axis);
* ``decode``: one forward pass for every slot with its last token (a free slot decodes a pad token,
  unused), ``position_ids`` from the mask (each row counts its own positions);
* ``remove``: the rows' slots become free (their mask zeroed, no copy); the cache is compacted
  (``index_select``) only when more than half of it is free, and the time columns that no running row
  uses are cut from the left (a view).

Sampling is per row: a temperature below ``MIN_TEMPERATURE`` is greedy (argmax); otherwise temperature,
top-p (always keeping the most likely token) and a per-sequence ``torch.Generator`` (seeded when the
request gives ``seed``); a row whose probabilities are not finite falls back to argmax, so sampling never
raises on NaN. ``detokenize`` decodes the short windows of the scheduler's incremental detokenizer
(:mod:`tauon_serve.detokenizer`), never a whole output.

:class:`GenerationEngine` runs the scheduler in its own thread and hands each step's events to the
event loop in one wake-up; :class:`AsyncSequence` is one sequence seen from the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

from .scheduler import (
    DEFAULT_MAX_BATCHED_TOKENS,
    EngineMetrics,
    Event,
    SamplingParams,
    Scheduler,
    Sequence_,
)

log = logging.getLogger("tauon.serve.generation")


MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (dividing by it would overflow to NaN)


class HFBackend:
    def __init__(self, model: Any, tokenizer: Any, device: str, max_model_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_length = max_model_length
        self.cache: Any = None  # layers' keys/values: [slots, heads, time, dim]
        self.mask: Any = None  # [slots, time] 1 = real token; rows are right-aligned
        self.slots: list[int] = []  # the cache slot of running row i
        self.free: list[int] = []  # slots whose sequence left (reused by the next prefill)
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos = eos

    # -- Backend protocol -----------------------------------------------------------------------

    def is_eos(self, token: int) -> bool:
        return token in self.eos

    def detokenize(self, ids: Sequence[int]) -> str:
        # Called on a few tokens at a time (the scheduler's IncrementalDetokenizer window).
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def batch_rows(self) -> int:
        """Running rows in the cache (the scheduler checks it against its running sequences)."""
        if self.mask is not None and self.mask.shape[0] != len(self.slots) + len(self.free):
            return -1
        return len(self.slots)

    def reset(self) -> None:
        self.cache, self.mask, self.slots, self.free = None, None, [], []

    def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
        """Run the prompts in a cache of their own and sample their first tokens; only then place them in
        the batch. Whatever raises before that leaves the batch as it was."""
        import torch
        from transformers import DynamicCache

        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.prompt_ids)
            ids[i, longest - n :] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[i, longest - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=DynamicCache(),
                use_cache=True,
                logits_to_keep=1,
            )
            generators = [self._generator(s.params) for s in seqs]
            tokens = self._sample(out.logits[:, -1, :], seqs, generators)
            self._place(out.past_key_values, mask, [len(s.prompt_ids) for s in seqs])
        for s, gen in zip(seqs, generators, strict=True):
            s.generator = gen
        return tokens

    def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
        import torch

        assert self.mask is not None and self.cache is not None and len(seqs) == len(self.slots)
        rows = self.mask.shape[0]  # free slots decode a pad token; their output is not used
        last = torch.zeros((rows, 1), dtype=torch.long)
        last[self.slots, 0] = torch.tensor([s.generated[-1] for s in seqs], dtype=torch.long)
        ones = torch.ones((rows, 1), dtype=self.mask.dtype, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=last.to(self.device),
                attention_mask=mask,
                position_ids=mask.sum(dim=1, keepdim=True) - 1,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.mask = out.past_key_values, mask
        index = torch.tensor(self.slots, dtype=torch.long, device=self.device)
        return self._sample(out.logits[:, -1, :].index_select(0, index), seqs, [s.generator for s in seqs])

    def remove(self, rows: Sequence[int]) -> None:
        """The rows' slots become free (no copy); the cache is compacted only when more than half of it
        is free, and the time columns no running row uses are cut from the left (a view)."""
        import torch

        if self.mask is None:
            return
        drop = set(rows)
        gone = [slot for i, slot in enumerate(self.slots) if i in drop]
        self.slots = [slot for i, slot in enumerate(self.slots) if i not in drop]
        if not self.slots:
            self.reset()
            return
        self.free.extend(gone)
        with torch.inference_mode():
            self.mask[gone] = 0
        if len(self.free) > len(self.slots):
            index = torch.tensor(self.slots, dtype=torch.long, device=self.device)
            self._select(lambda x: x.index_select(0, index))
            self.slots, self.free = list(range(len(self.slots))), []
        used = self.mask[self.slots].any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if start > 0:
            self._select(lambda x: x[:, start:] if x.dim() == 2 else x[:, :, start:, :])

    # -- internals ------------------------------------------------------------------------------

    def _select(self, fn: Any) -> None:
        layers = [(fn(layer.keys), fn(layer.values)) for layer in self.cache.layers]
        mask = fn(self.mask)
        for layer, (k, v) in zip(self.cache.layers, layers, strict=True):
            layer.keys, layer.values = k, v
        self.mask = mask

    def _place(self, cache: Any, mask: Any, lengths: list[int]) -> None:
        """Put the new rows (right-aligned, ``lengths`` real tokens each) into free slots that are wide
        enough (an in-place copy of the row), the others at the end (the one whole-cache copy)."""
        import torch

        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            self.slots, self.free = list(range(len(lengths))), []
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        free = list(self.free)
        reuse: dict[int, int] = {}  # new row -> free slot
        for j, n in enumerate(lengths):
            if free and n <= t_old:
                reuse[j] = free.pop(0)
        append = [j for j in range(len(lengths)) if j not in reuse]
        keys = [(layer.keys, layer.values) for layer in self.cache.layers]
        width, new_mask = t_old, self.mask
        if append:
            width = max(t_old, t_new)
            index = torch.tensor(append, dtype=torch.long, device=mask.device)
            keys = [
                (
                    _join(k, new.keys.index_select(0, index), width),
                    _join(v, new.values.index_select(0, index), width),
                )
                for (k, v), new in zip(keys, cache.layers, strict=True)
            ]
            new_mask = _join(self.mask, mask.index_select(0, index), width)
        for j, slot in reuse.items():
            n = lengths[j]
            for (k, v), new in zip(keys, cache.layers, strict=True):
                k[slot, :, width - n :, :] = new.keys[j, :, t_new - n :, :]
                v[slot, :, width - n :, :] = new.values[j, :, t_new - n :, :]
            new_mask[slot] = 0
            new_mask[slot, width - n :] = 1
        rows = self.mask.shape[0]
        for layer, (k, v) in zip(self.cache.layers, keys, strict=True):
            layer.keys, layer.values = k, v
        self.mask = new_mask
        self.free = [s for s in self.free if s not in reuse.values()]
        placed = dict(reuse)
        placed.update({j: rows + i for i, j in enumerate(append)})
        self.slots.extend(placed[j] for j in range(len(lengths)))

    def _generator(self, params: SamplingParams) -> Any:
        import torch

        if params.temperature < MIN_TEMPERATURE:
            return None
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        return gen

    def _sample(self, logits: Any, seqs: Sequence[Sequence_], generators: Sequence[Any]) -> list[int]:
        """One token per row. Never NaN: a temperature below MIN_TEMPERATURE is greedy, top-p keeps at
        least the most likely token, and a row whose probabilities are not finite falls back to argmax."""
        import torch

        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature < MIN_TEMPERATURE or generators[i] is None:
                tokens.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                cut = (
                    sorted_probs.cumsum(-1) - sorted_probs
                ) >= p.top_p  # the smallest prefix reaching top_p
                cut[0] = False  # always keep the most likely token
                sorted_probs[cut] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            total = float(probs.sum())
            if not (total > 0 and torch.isfinite(probs).all()):
                tokens.append(int(greedy[i]))
                continue
            tokens.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
        return tokens


def _join(old: Any, new: Any, width: int) -> Any:
    """Concatenate along the batch axis, left-padding each with zeros to ``width`` time columns (axis 1
    of a mask, axis 2 of keys/values)."""
    import torch

    dim = 1 if old.dim() == 2 else 2

    def pad(x: Any) -> Any:
        t = x.shape[dim]
        if t == width:
            return x
        shape = list(x.shape)
        shape[dim] = width - t
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    return torch.cat([pad(old), pad(new)], dim=0)


def _deliver(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class AsyncSequence:
    """One request's sequence seen from the event loop: an async iterator of :class:`Event`."""

    def __init__(self, engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seq = Sequence_(prompt_ids, params, self._on_event)
        self.finished = False

    def _on_event(self, event: Event) -> None:  # engine thread
        self.engine.post(self.loop, self.queue, event)

    async def next_event(self) -> Event:
        event = await self.queue.get()
        if event.finish_reason is not None:
            self.finished = True
        return event

    def cancel(self) -> None:
        if not self.finished:
            self.engine.scheduler.cancel(self.seq)


class GenerationEngine:
    """A scheduler over an :class:`HFBackend`, run by one engine thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        max_model_length: int,
        max_running: int,
        max_waiting: int,
        max_queue_wait_s: float | None = None,
        metrics: EngineMetrics | None = None,
        max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    ) -> None:
        self.tokenizer = tokenizer
        # The engine thread decodes with its own copy: a Rust tokenizer whose settings the event loop
        # changes (truncation on/off) while another thread uses it raises "Already borrowed".
        self.backend = HFBackend(model, copy.deepcopy(tokenizer), device, max_model_length)
        self.max_model_length = max_model_length
        self.scheduler = Scheduler(
            self.backend,
            max_running=max_running,
            max_waiting=max_waiting,
            max_queue_wait_s=max_queue_wait_s,
            metrics=metrics,
            max_batched_tokens=max_batched_tokens,
        )
        self.scheduler.after_step = self.flush
        self._pending: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event], Event]] = []
        self._pending_lock = threading.Lock()

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event], event: Event) -> None:
        """Queue an event for its sequence; the engine thread hands them over after each step."""
        with self._pending_lock:
            self._pending.append((loop, queue, event))
        if threading.current_thread() is not self.scheduler.thread:
            self.flush()  # not from a step (e.g. a test driving the scheduler by hand)

    def flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for loop, queue, event in pending:
            by_loop.setdefault(loop, []).append((queue, event))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, items)

    def start(self) -> None:
        self.scheduler.start()

    def health_error(self) -> str | None:
        return self.scheduler.health_error()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncSequence:
        seq = AsyncSequence(self, prompt_ids, params)
        self.scheduler.submit(seq.seq)
        return seq

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, Event]:
        """Run one sequence to its end; returns (text, final event). Cancelled if the caller is."""
        seq = self.submit(prompt_ids, params)
        parts: list[str] = []
        try:
            while True:
                event = await seq.next_event()
                parts.append(event.text)
                if event.finish_reason is not None:
                    return "".join(parts), event
        finally:
            seq.cancel()

    def close(self, timeout: float | None = None) -> None:
        self.scheduler.close(timeout)
