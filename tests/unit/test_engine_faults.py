"""Faults of the LLM generation engine (issue 22): sampling that cannot produce NaN, a prefill that leaves
the batch as it was when it raises, the engine's health, the queue-wait deadline while the batch is full,
V1/V2 sibling sequences cancelled together, ``--max-new-tokens`` as a server-wide cap, and a causal LM
whose tokenizer returns ``token_type_ids``.

Tiny random models built from a config (no download), one CPU thread; no timing races.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tauon_serve.scheduler import Event, SamplingParams, Scheduler, Sequence_

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"


class FakeBackend:
    """Token t of a sequence is t+1; text is one letter per token; rows are tracked like a KV cache."""

    max_model_length = 1000

    def __init__(self) -> None:
        self.rows: list[Sequence_] = []
        self.prefills: list[list[int]] = []  # prompt lengths of each prefill call

    def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
        self.prefills.append([len(s.prompt_ids) for s in seqs])
        self.rows.extend(seqs)
        return [len(s.generated) + 1 for s in seqs]

    def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
        assert list(seqs) == self.rows
        return [len(s.generated) + 1 for s in seqs]

    def remove(self, rows: Sequence[int]) -> None:
        drop = set(rows)
        self.rows = [s for i, s in enumerate(self.rows) if i not in drop]

    def batch_rows(self) -> int:
        return len(self.rows)

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + (t - 1) % 26) for t in ids)

    def is_eos(self, token: int) -> bool:
        return token == 0


def _seq(max_tokens: int, events: list[Event] | None = None, prompt: int = 3, **kw: Any) -> Sequence_:
    sink = events if events is not None else []
    return Sequence_(list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw), sink.append)


def _run(s: Scheduler, limit: int = 10000) -> None:
    for _ in range(limit):
        if not s.running and not s.waiting:
            return
        s.step()
    raise AssertionError("the scheduler did not drain")


class _Tok:
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _tiny_llama(positions: int = 256) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _reference(model: Any, q: Sequence_) -> list[int]:
    import torch

    ids = torch.tensor([q.prompt_ids])
    with torch.inference_mode():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=q.params.max_tokens, do_sample=False
        )
    return list(ref[0, ids.shape[1] :].tolist())


def _prompt(i: int, n: int) -> list[int]:
    return [1 + (i * 13 + j) % 290 for j in range(n)]


# -- N1: one bad request must not break the engine --------------------------------------------------


def test_tiny_temperature_and_top_p_never_break_the_batch() -> None:
    """temperature 1e-40 (logits / T overflow to NaN) and top_p 1e-300 (0 in float32: every token cut)
    are sampled without NaN; the sequences around them finish with the tokens generate() gives."""
    from tauon_serve.generation import HFBackend

    model = _tiny_llama()
    be = HFBackend(model, _Tok(), "cpu", 256)
    s = Scheduler(be, max_running=8, max_waiting=20)
    first = Sequence_(_prompt(0, 5), SamplingParams(max_tokens=8), lambda e: None)
    s.submit(first)
    s.step()
    odd = [
        Sequence_(_prompt(1, 4), SamplingParams(max_tokens=6, temperature=1e-40), lambda e: None),
        Sequence_(_prompt(2, 7), SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-300), lambda e: None),
        Sequence_(_prompt(3, 3), SamplingParams(max_tokens=6, temperature=1e30, seed=1), lambda e: None),
    ]
    for q in odd:
        s.submit(q)
    _run(s)
    later = Sequence_(_prompt(4, 6), SamplingParams(max_tokens=5), lambda e: None)
    s.submit(later)
    _run(s)
    for q in [first, *odd, later]:
        assert q.finish_reason == "length" and len(q.generated) == q.params.max_tokens, q.finish_reason
    for q in (first, odd[0], odd[1], later):  # tiny temperature and top-p are greedy
        assert q.generated == _reference(model, q)
    assert be.batch_rows() == 0 and s.health_error() is None


def test_a_prefill_that_raises_leaves_the_batch_unchanged() -> None:
    """Sampling the new rows raises (after the model ran): the batch is as it was, only the joining
    sequence fails, the running one finishes with the tokens generate() gives, later ones work."""
    from tauon_serve.generation import HFBackend

    model = _tiny_llama()
    be = HFBackend(model, _Tok(), "cpu", 256)
    sample = be._sample
    poison: list[Sequence_] = []

    def flaky(*args: Any) -> list[int]:
        if any(q in poison for q in args[1]):
            poison.clear()
            raise RuntimeError("sampling failed")
        return sample(*args)

    be._sample = flaky  # type: ignore[method-assign]
    s = Scheduler(be, max_running=8, max_waiting=20)
    running = Sequence_(_prompt(0, 9), SamplingParams(max_tokens=10), lambda e: None)
    s.submit(running)
    s.step()
    s.step()
    events: list[Event] = []
    bad = Sequence_(_prompt(1, 4), SamplingParams(max_tokens=5), events.append)
    poison.append(bad)
    s.submit(bad)
    s.step()
    assert bad.finish_reason == "error" and events[-1].error == "RuntimeError: sampling failed"
    assert s.running == [running] and be.mask.shape[0] == 1  # the new row was not merged
    later = Sequence_(_prompt(2, 12), SamplingParams(max_tokens=4), lambda e: None)
    s.submit(later)
    _run(s)
    assert running.finish_reason == "length" and running.generated == _reference(model, running)
    assert later.finish_reason == "length" and later.generated == _reference(model, later)
    assert s.health_error() is None


def test_only_the_sequence_that_fails_its_prefill_gets_the_error() -> None:
    """Two sequences join in one prefill and one of them makes it raise: the other still runs."""

    class Picky(FakeBackend):
        def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
            if any(s.params.seed == 666 for s in seqs):
                raise RuntimeError("bad row")
            return super().prefill(seqs)

    be = Picky()
    s = Scheduler(be, max_running=8, max_waiting=8)
    good, bad = _seq(4), _seq(4, seed=666)
    s.submit(good)
    s.submit(bad)
    _run(s)
    assert bad.finish_reason == "error" and good.finish_reason == "length" and good.text == "abcd"


# -- health --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_a_dead_engine_thread_and_a_broken_batch() -> None:
    from tauon_serve.predictor import Predictor

    assert Predictor.health_error(object()) is None  # type: ignore[arg-type]  # the default: healthy

    s = Scheduler(FakeBackend(), max_running=2, max_waiting=2)
    assert s.health_error() is None

    def boom() -> None:
        raise SystemExit("engine thread dies")

    s.after_step = boom
    s.start()
    s.submit(_seq(2))
    assert s.thread is not None
    s.thread.join(10)
    assert not s.thread.is_alive()
    assert s.health_error() == "the generation thread has stopped"

    class Stuck(FakeBackend):
        """Loses a row and cannot be reset: the scheduler fails the batch and reports it."""

        def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
            self.rows = self.rows[1:]
            return [len(q.generated) + 1 for q in seqs]

        def remove(self, rows: Sequence[int]) -> None:
            pass

    s2 = Scheduler(Stuck(), max_running=2, max_waiting=2)
    events: list[Event] = []
    for _ in range(2):
        s2.submit(_seq(5, events))
    s2.step()
    s2.step()
    s2.check_batch()
    assert [e.finish_reason for e in events if e.finish_reason] == ["error", "error"]
    assert "KV cache holds 1 rows for 2 running" in (s2.health_error() or "")


def test_engine_health_delegates_to_the_scheduler() -> None:
    from transformers import AutoTokenizer

    from tauon_serve.config import ServerConfig
    from tauon_serve.generation import GenerationEngine
    from tauon_serve.llm import CausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    lm = CausalLM(
        _tiny_llama(), tok, device="cpu", max_length=32, positions=64, config=ServerConfig("m", "m")
    )
    assert lm.health_error() is None  # not started yet
    lm.engine = GenerationEngine(
        _tiny_llama(), tok, device="cpu", max_model_length=64, max_running=1, max_waiting=1
    )
    assert lm.health_error() is None
    lm.engine.scheduler._fault = "broken"
    assert lm.health_error() == "broken"


# -- N8: the queue-wait deadline holds while the batch is full ---------------------------------------


def test_queue_deadline_holds_while_the_batch_is_full() -> None:
    s = Scheduler(FakeBackend(), max_running=1, max_waiting=4, max_queue_wait_s=0.05)
    busy = _seq(10_000)
    s.submit(busy)
    s.step()
    events: list[Event] = []
    waiting = _seq(2, events)
    s.submit(waiting)
    s.step()
    assert not events  # within its deadline
    time.sleep(0.1)
    s.step()  # the running sequence is far from done: no slot frees, the deadline must still hold
    assert waiting.finish_reason == "timeout" and events[-1].finish_reason == "timeout"
    assert not s.waiting and s.running == [busy]
    cancelled = _seq(2)
    s.submit(cancelled)
    s.cancel(cancelled)
    s.step()
    assert cancelled.finish_reason == "cancelled" and not s.waiting  # its queue place is freed too


# -- V1/V2: sibling sequences share the request's fate -------------------------------------------


def _causal_lm(max_waiting: int) -> Any:
    from transformers import AutoTokenizer

    from tauon_serve.config import ServerConfig
    from tauon_serve.generation import GenerationEngine
    from tauon_serve.llm import CausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model = _tiny_llama()
    lm = CausalLM(model, tok, device="cpu", max_length=32, positions=64, config=ServerConfig("m", "m"))
    # never started: nothing leaves the queue unless the test says so
    lm.engine = GenerationEngine(
        model, tok, device="cpu", max_model_length=64, max_running=1, max_waiting=max_waiting
    )
    return lm


def test_v1_siblings_are_cancelled_when_one_is_refused() -> None:
    from tauon_serve.protocol import RequestError

    async def go() -> None:
        lm = _causal_lm(max_waiting=2)
        with pytest.raises(RequestError) as err:
            await lm.infer(["one", "two", "three"])
        assert err.value.status == 503
        waiting = list(lm.engine.scheduler.waiting)
        assert len(waiting) == 2 and all(q.cancelled for q in waiting)

    asyncio.run(go())


def test_v1_siblings_are_cancelled_when_one_fails() -> None:
    from tauon_serve.protocol import RequestError

    async def go() -> None:
        lm = _causal_lm(max_waiting=4)
        task = asyncio.ensure_future(lm.infer(["one", "two"]))
        while len(lm.engine.scheduler.waiting) < 2:  # noqa: ASYNC110 (the submits happen in the task)
            await asyncio.sleep(0)
        first, second = lm.engine.scheduler.waiting
        lm.engine.scheduler._finish(first, "timeout", error="waited 9.0s in the queue")
        with pytest.raises(RequestError) as err:
            await asyncio.wait_for(task, 5)
        assert err.value.status == 503 and second.cancelled

    asyncio.run(go())


# -- maxNewTokens: a server-wide cap -------------------------------------------------------------


def test_max_new_tokens_is_a_server_wide_cap() -> None:
    from transformers import AutoTokenizer

    from tauon_serve.generation import GenerationEngine
    from tauon_serve.llm import LLMService
    from tauon_serve.openai_api import Defaults, OpenAIError, parse_completion

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    engine = GenerationEngine(
        _tiny_llama(), tok, device="cpu", max_model_length=64, max_running=1, max_waiting=1
    )
    llm = LLMService(engine, tok, served_name="m", max_new_tokens=8, max_model_length=64)
    d = Defaults(served_name="m", max_new_tokens=8)

    def max_tokens(n_prompt: int, **body: Any) -> int:
        return llm.sampling(parse_completion({"model": "m", "prompt": "hi", **body}, d), n_prompt).max_tokens

    assert max_tokens(10) == 8  # omitted: the cap
    assert max_tokens(60) == 4  # omitted: the room left by the model length
    assert max_tokens(10, max_tokens=3) == 3
    assert max_tokens(10, max_tokens=40) == 8  # more than the cap: clamped, no error (as vLLM)
    with pytest.raises(OpenAIError) as err:
        max_tokens(60, max_tokens=5)  # more than the room: refused as before
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"


# -- a causal LM with a BERT-style tokenizer (token_type_ids) -------------------------------------


def test_causal_lm_with_a_tokenizer_that_returns_token_type_ids(tmp_path: Path) -> None:
    """A Llama trained with a BERT-style tokenizer: loading and warming up must not pass token_type_ids
    to generate(), and the V1 path generates."""
    from transformers import BertTokenizerFast

    from tauon_serve.config import ServerConfig
    from tauon_serve.loading import load_predictor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    assert "token_type_ids" in tok("hello world")
    model_dir = tmp_path / "model"
    tok.save_pretrained(model_dir)
    _tiny_llama(positions=64).save_pretrained(model_dir)

    predictor = load_predictor(ServerConfig(model=str(model_dir), name="m", device="cpu", max_new_tokens=4))
    predictor.warm_up()  # raised "model_kwargs are not used by the model: ['token_type_ids']"
    assert list(predictor.tokenizer("hello world")) == ["input_ids", "attention_mask"]

    async def go() -> None:
        from tauon_serve.generation import GenerationEngine

        predictor.engine = GenerationEngine(
            predictor.model,
            predictor.tokenizer,
            device="cpu",
            max_model_length=64,
            max_running=2,
            max_waiting=4,
        )
        predictor.engine.start()
        try:
            out = await predictor.infer(["hello world"])
            assert len(out) == 1 and isinstance(out[0].generated_text, str)
        finally:
            predictor.engine.close(10)

    asyncio.run(go())
