"""Stop strings and incremental detokenization stay bounded per step (issue 22, N4): at most 4 stop
strings of at most 256 characters, a hold-back of at most the longest stop less one character, and a
detokenizer window that does not grow on bytes that never form a character."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tauon_serve.scheduler import Event, SamplingParams, Scheduler, Sequence_
from tests.unit.test_engine_faults import FakeBackend

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"


def test_stop_strings_are_bounded() -> None:
    from tauon_serve.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, stop_error

    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS) == (4, 256)
    assert stop_error(("a" * 256, "b", "c", "d")) is None
    assert stop_error(tuple("abcde")) == "stop has 5 entries; at most 4 are allowed"
    assert stop_error(("a" * 257,)) == "a stop string has 257 characters; at most 256 are allowed"
    assert stop_error(("",)) == "stop strings must not be empty"
    s = Scheduler(FakeBackend(), max_running=1, max_waiting=4)
    with pytest.raises(ValueError, match="257 characters"):
        s.submit(Sequence_([1], SamplingParams(max_tokens=2, stop=("x" * 257,)), lambda e: None))
    with pytest.raises(ValueError, match="5 entries"):
        s.submit(Sequence_([1], SamplingParams(max_tokens=2, stop=tuple("vwxyz")), lambda e: None))
    assert not s.waiting


def test_openai_stop_over_the_bound_is_a_400() -> None:
    from transformers import AutoTokenizer

    from tauon_serve.generation import GenerationEngine
    from tauon_serve.llm import LLMService
    from tauon_serve.openai_api import Defaults, OpenAIError, parse_completion
    from tests.unit.test_engine_faults import _tiny_llama

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    engine = GenerationEngine(
        _tiny_llama(), tok, device="cpu", max_model_length=64, max_running=1, max_waiting=1
    )
    llm = LLMService(engine, tok, served_name="m", max_new_tokens=8, max_model_length=64)
    with pytest.raises(OpenAIError) as parsed:  # the request parser refuses it first ...
        parse_completion({"model": "m", "prompt": "hi", "stop": ["y" * 100_000]}, Defaults("m", 8))
    assert parsed.value.status == 400 and parsed.value.param == "stop"
    assert "at most 256" in parsed.value.message
    req = parse_completion({"model": "m", "prompt": "hi", "stop": ["y"]}, Defaults("m", 8))
    req = dataclasses.replace(req, stop=("y" * 100_000,))
    with pytest.raises(OpenAIError) as err:  # ... and the engine's side checks it again
        llm.sampling(req, 2)
    assert err.value.status == 400 and err.value.param == "stop"


class Letters(FakeBackend):
    """Every token is the letter 'a' (id 1), then 'b' (id 2) at position ``b_at``."""

    def __init__(self, b_at: int) -> None:
        super().__init__()
        self.b_at = b_at

    def prefill(self, seqs: Sequence[Sequence_]) -> list[int]:
        super().prefill(seqs)
        return [1 for _ in seqs]

    def decode(self, seqs: Sequence[Sequence_]) -> list[int]:
        return [2 if len(q.generated) + 1 == self.b_at else 1 for q in seqs]


def test_hold_back_is_bounded_by_the_longest_stop() -> None:
    """A stream that keeps looking like the start of a 256-character stop string: at most 255
    characters are held, everything else is sent as it comes, and the text adds up."""
    stop = "a" * 255 + "b"
    for b_at, reason in ((2000, "length"), (700, "stop")):
        be = Letters(b_at)
        be.max_model_length = 4096
        events: list[Event] = []
        s = Scheduler(be, max_running=1, max_waiting=1)
        q = Sequence_([1], SamplingParams(max_tokens=1000, stop=(stop,)), events.append)
        s.submit(q)
        held = []
        while s.running or s.waiting:
            s.step()
            held.append(len(q.held))
        assert max(held) <= 255 and q.finish_reason == reason
        sent = "".join(e.text for e in events)
        if reason == "length":
            assert sent == q.text == "a" * 1000
            assert len([e for e in events if e.text]) > 700  # streamed, not held to the end
        else:
            assert sent == q.text == "a" * (700 - 1 - 255)


def test_stop_prefix_scan_matches_a_naive_one_on_long_stops() -> None:
    import random

    from tauon_serve.detokenizer import stop_prefix_len

    rng = random.Random(5)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 40))) for _ in range(4))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 60)))
        naive = max(
            [k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])],
            default=0,
        )
        assert stop_prefix_len(text, stops) == naive


def test_detokenizer_window_stays_bounded_on_bytes_that_never_form_a_character() -> None:
    from transformers import AutoTokenizer

    from tauon_serve.detokenizer import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    byte = next(i for i in range(len(tok)) if tok.decode([i] * 5) == "\ufffd" * 5)  # a continuation byte
    calls = [0]

    def decode(x: Sequence[int]) -> Any:
        calls[0] += len(x)
        return tok.decode(list(x), skip_special_tokens=True)

    for ids in ([byte] * 300, [byte] * 100 + tok("héllo €uro", add_special_tokens=False)["input_ids"] * 5):
        calls[0] = 0
        detok = IncrementalDetokenizer(decode)
        out = "".join(detok.step(ids[: i + 1]) for i in range(len(ids))) + detok.flush(ids)
        assert out == tok.decode(ids, skip_special_tokens=True)
        assert calls[0] <= 40 * len(ids), "each step decodes a bounded window"
