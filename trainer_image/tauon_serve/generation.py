"""Continuous batching for causal LMs: the model side (torch + transformers) and the asyncio bridge.

:class:`HFBackend` keeps ONE batched KV cache (a transformers ``DynamicCache``) for all running
sequences, left-padded to a common length with a 2-D attention mask:

* ``prefill``: the new prompts are run together (left-padded) into a fresh cache, which is then
  concatenated to the running batch along the batch axis (the shorter of the two is left-padded with
  masked zeros along the time axis);
* ``decode``: one forward pass for every running row with its last token, ``position_ids`` from the
  mask (each row counts its own positions);
* ``remove``: ``index_select`` of the rows that stay, then the time columns that no remaining row
  uses are trimmed from the left.

Sampling is per row: temperature 0 is greedy (argmax); otherwise temperature, top-p and a per-sequence
``torch.Generator`` (seeded when the request gives ``seed``). ``detokenize`` decodes the short windows of
the scheduler's incremental detokenizer (:mod:`tauon_serve.detokenizer`), never a whole output.

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

from .scheduler import EngineMetrics, Event, SamplingParams, Scheduler, Sequence_

log = logging.getLogger("tauon.serve.generation")


class HFBackend:
    def __init__(self, model: Any, tokenizer: Any, device: str, max_model_length: int) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_length = max_model_length
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, time] 1 = real token
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

    def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
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
        cache = DynamicCache()
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._merge(out.past_key_values, mask)
        for s in seqs:
            s.generator = self._generator(s.params)
        return self._sample(out.logits[:, -1, :], seqs)

    def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
        import torch

        assert self.mask is not None and self.cache is not None
        last = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long, device=self.device)
        ones = torch.ones((len(seqs), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        with torch.inference_mode():
            out = self.model(
                input_ids=last,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return self._sample(out.logits[:, -1, :], seqs)

    def remove(self, rows: Sequence[int]) -> None:
        import torch

        if self.mask is None:
            return
        drop = set(rows)
        keep = [i for i in range(self.mask.shape[0]) if i not in drop]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]

    # -- internals ------------------------------------------------------------------------------

    def _merge(self, cache: Any, mask: Any) -> None:
        import torch

        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def pad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([pad(old_layer.keys, t_old, 2), pad(new_layer.keys, t_new, 2)], dim=0)
            old_layer.values = torch.cat(
                [pad(old_layer.values, t_old, 2), pad(new_layer.values, t_new, 2)], dim=0
            )
        self.mask = torch.cat([pad(self.mask, t_old, 1), pad(mask, t_new, 1)], dim=0)

    def _generator(self, params: SamplingParams) -> Any:
        import torch

        if params.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        return gen

    def _sample(self, logits: Any, seqs: Sequence[Sequence_]) -> list[int]:
        import torch

        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature == 0:
                tokens.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                cum = sorted_probs.cumsum(-1)
                cut = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix reaching top_p
                sorted_probs[cut] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            tokens.append(int(torch.multinomial(probs, 1, generator=s.generator).item()))
        return tokens


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
