"""The continuous-batching engine under a KV budget (issue 22, N3): admission bounded by
``max_batched_tokens`` (rows x padded width), long prompts prefilled alone, and free cache slots reused
instead of copying the whole cache on every admit and finish. Tiny models, no timing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tauon_serve.scheduler import SamplingParams, Scheduler, Sequence_
from tests.unit.test_engine_faults import FakeBackend, _prompt, _reference, _run, _tiny_llama, _Tok


def _seqs(lengths: Sequence[int], max_tokens: int) -> list[Sequence_]:
    return [
        Sequence_(_prompt(i, n), SamplingParams(max_tokens=max_tokens), lambda e: None)
        for i, n in enumerate(lengths)
    ]


def test_a_long_prompt_does_not_pad_the_whole_batch() -> None:
    """One 1900-token prompt beside 32 short ones: the padded batch stays within the budget, the long
    prompt is prefilled alone, and everyone finishes."""
    be = FakeBackend()
    be.max_model_length = 4096
    s = Scheduler(be, max_running=64, max_waiting=64, max_batched_tokens=8192)
    seqs = _seqs([1900] + [20] * 32, max_tokens=16)
    for q in seqs:
        s.submit(q)
    slots = []
    for _ in range(1000):
        if not s.running and not s.waiting:
            break
        s.step()
        slots.append(len(s.running) * max((q.span for q in s.running), default=0))
    assert all(q.finish_reason == "length" and len(q.generated) == 16 for q in seqs)
    assert max(slots) <= 8192
    assert [1900] in be.prefills and all(len(p) == 1 for p in be.prefills if 1900 in p)
    # without a budget, the 33 rows would have been padded to the long prompt: 33 x 1916 slots
    assert 33 * 1916 > 8192


def test_a_prompt_over_the_budget_runs_alone() -> None:
    be = FakeBackend()
    s = Scheduler(be, max_running=8, max_waiting=8, max_batched_tokens=100)
    big, small = _seqs([500, 5], max_tokens=3)
    s.submit(big)
    s.submit(small)
    s.step()
    assert s.running == [big] and list(s.waiting) == [small]  # FIFO: the small one waits its turn
    _run(s)
    assert big.finish_reason == small.finish_reason == "length"


def test_prefill_groups_sequences_of_similar_length() -> None:
    be = FakeBackend()
    s = Scheduler(be, max_running=64, max_waiting=64, max_batched_tokens=1 << 20, max_prefill_tokens=64)
    for q in _seqs([4, 30, 5, 6, 31, 3], max_tokens=1):
        s.submit(q)
    s.step()
    assert be.prefills == [[3, 4, 5, 6], [30, 31]]


def test_free_slots_are_reused_and_tokens_match_generate() -> None:
    """A finished row's slot is freed without copying the cache, and the next prompt that fits is
    written into it; every sequence still generates what model.generate gives."""
    from tauon_serve.generation import HFBackend

    model = _tiny_llama()
    be = HFBackend(model, _Tok(), "cpu", 256)
    s = Scheduler(be, max_running=3, max_waiting=20)
    a, b, c = (
        Sequence_(_prompt(i, 10), SamplingParams(max_tokens=m), lambda e: None)
        for i, m in enumerate((20, 5, 20))
    )
    for q in (a, b, c):
        s.submit(q)
    while not b.done:
        s.step()
    assert s.running == [a, c] and be.mask.shape[0] == 3 and be.free == [1]  # no copy when b left
    d = Sequence_(_prompt(3, 8), SamplingParams(max_tokens=6), lambda e: None)
    s.submit(d)
    s.step()
    assert s.running == [a, c, d] and be.mask.shape[0] == 3 and be.slots == [0, 2, 1]  # d took b's slot
    e = Sequence_(_prompt(4, 120), SamplingParams(max_tokens=5), lambda e: None)  # wider than the batch
    s.submit(e)
    more = [
        Sequence_(_prompt(5 + i, 3 + 7 * i), SamplingParams(max_tokens=4 + i), lambda e: None)
        for i in range(6)
    ]
    for q in more:
        s.submit(q)
    _run(s)
    for q in (a, b, c, d, e, *more):
        assert q.finish_reason == "length" and q.generated == _reference(model, q)
    assert be.cache is None and be.mask is None and be.batch_rows() == 0


def test_half_free_cache_is_compacted() -> None:
    from tauon_serve.generation import HFBackend

    model = _tiny_llama()
    be = HFBackend(model, _Tok(), "cpu", 256)
    s = Scheduler(be, max_running=4, max_waiting=20)
    seqs = [
        Sequence_(_prompt(i, 6), SamplingParams(max_tokens=m), lambda e: None)
        for i, m in enumerate((3, 4, 5, 30))
    ]
    for q in seqs:
        s.submit(q)
    shapes: list[Any] = []
    while not seqs[2].done:
        s.step()
        shapes.append((be.mask.shape[0], len(be.free)))
    assert (4, 2) in shapes  # two of four slots free: kept
    assert shapes[-1] == (1, 0)  # three of four free: compacted to the running row
    _run(s)
    assert seqs[3].generated == _reference(model, seqs[3])
