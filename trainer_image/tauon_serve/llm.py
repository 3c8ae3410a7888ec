"""The causal-LM back-end: a Hugging Face causal LM behind the continuous-batching engine, serving V1/V2
(:class:`CausalLM`) and the OpenAI completions and chat API (:class:`LLMService`).

V1/V2: every text is a greedy sequence of ``--max-new-tokens`` (``DEFAULT_V1_NEW_TOKENS`` when 0; fewer
when the model length leaves less room) in the continuous batch; the prompt is truncated from the left. The texts of one request
succeed or fail together: when one is refused or fails, the others are cancelled.

``--max-new-tokens`` is a server-wide cap on both APIs (as vLLM's ``--override-generation-config
{"max_new_tokens": N}``): an OpenAI request without ``max_tokens`` gets min(cap, room left by the
model length), one that asks for more than the cap is clamped to it silently, and one whose
``max_tokens`` exceeds the room left by the model length is refused (400). 0 (the default) means no cap:
a request without ``max_tokens`` may use the whole room, as on vLLM; V1/V2 texts then generate
``DEFAULT_V1_NEW_TOKENS``.

OpenAI: requests are validated (:mod:`tauon_serve.openai_api`), tokenized, checked against the model
length, and submitted to :class:`tauon_serve.generation.GenerationEngine`; :meth:`LLMService.open`
returns the request in flight (:class:`Completion`), whose answer is one JSON body
(:meth:`Completion.body`) or Server-Sent-Event frames (:meth:`Completion.frames`). The HTTP side (the
response types, cancelling the sequence when the client disconnects) is :mod:`tauon_serve.rest.openai`;
nothing here imports FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ServerConfig
from .detokenizer import stop_error
from .generation import AsyncSequence, GenerationEngine
from .openai_api import (
    ChunkWriter,
    Defaults,
    GenerationRequest,
    OpenAIError,
    chat_prompt_ids,
    new_id,
    parse_chat,
    parse_completion,
    response_body,
)
from .predictor import CAUSAL_LM, Predictor
from .protocol import GENERATION_SCHEMA, Generation, RequestError
from .scheduler import EngineClosed, Event, QueueFull, SamplingParams

if TYPE_CHECKING:
    from .metrics import ServerMetrics

log = logging.getLogger("tauon.serve.llm")

# A prompt longer than this many characters per token of the model length is refused before it is
# tokenized (no tokenizer averages more; it keeps a huge prompt from tying up a thread).
CHARS_PER_TOKEN_BOUND = 64
RETRY_AFTER_SECONDS = "1"


class CausalLM(Predictor):
    task = CAUSAL_LM
    schema = GENERATION_SCHEMA

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        max_length: int,
        positions: int,
        config: ServerConfig,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length  # the longest warm-up prompt
        self.config = config
        self.labels = []
        model_length = positions
        if config.max_model_length > 0:
            model_length = (
                min(model_length, config.max_model_length) if model_length else config.max_model_length
            )
        self.max_model_length = model_length  # prompt + generated tokens per sequence
        self.engine: GenerationEngine | None = None

    def warm_up(self) -> None:
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(
                ["warm up"], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            # Only what a causal LM takes: a BERT-style tokenizer also returns token_type_ids, which
            # generate() refuses ("model_kwargs are not used by the model").
            self.model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=self.config.v1_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def start(self, executor: Executor, metrics: ServerMetrics) -> None:
        cfg = self.config
        self.engine = GenerationEngine(
            self.model,
            self.tokenizer,
            device=self.device,
            max_model_length=self.max_model_length,
            max_running=cfg.max_concurrent_sequences,
            max_waiting=cfg.max_queued_sequences,
            max_queue_wait_s=cfg.max_queue_wait_seconds or None,
            metrics=metrics.engine_metrics(),
            max_batched_tokens=cfg.max_batched_tokens,
        )
        self.engine.start()
        self.openai = LLMService(
            self.engine,
            self.tokenizer,
            served_name=cfg.name,
            max_new_tokens=cfg.max_new_tokens,
            max_model_length=self.max_model_length,
        )

    def begin_drain(self) -> None:
        pass  # new work is refused by the state; the engine finishes its sequences in close()

    def health_error(self) -> str | None:
        return self.engine.health_error() if self.engine is not None else None

    async def close(self, grace_seconds: float) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close, grace_seconds)

    def check_inputs(self, texts: Sequence[str], where: Callable[[int], str]) -> None:
        for i, t in enumerate(texts):
            if t == "":
                raise RequestError(400, f"{where(i)} is empty; a causal-lm prompt must not be empty")

    async def infer(self, texts: list[str]) -> Sequence[Generation]:
        """One greedy generation per text. All or nothing: when one sequence is refused (queue full,
        shutting down) or fails, its siblings are cancelled and the request gets that error."""
        engine = self.engine
        assert engine is not None
        seqs: list[AsyncSequence] = []
        try:
            for text in texts:
                ids = list(self.tokenizer(text)["input_ids"])[-(engine.max_model_length - 1) :]
                room = engine.max_model_length - len(ids)
                params = SamplingParams(max_tokens=max(1, min(self.config.v1_new_tokens, room)))
                seqs.append(engine.submit(ids, params))
            texts_out = await asyncio.gather(*(_collect(seq) for seq in seqs))
        except QueueFull as exc:
            raise RequestError(503, f"the server is overloaded: {exc}; retry later") from None
        except EngineClosed:
            raise RequestError(503, "the server is shutting down") from None
        finally:
            for seq in seqs:
                seq.cancel()  # a no-op for the finished ones
        return [Generation(text) for text in texts_out]

    def describe(self) -> str:
        return (
            f"continuous batching: max_concurrent_sequences={self.config.max_concurrent_sequences} "
            f"max_model_length={self.max_model_length}"
        )


# -- the OpenAI API ------------------------------------------------------------------------------


@dataclass(eq=False)
class Completion:
    """One OpenAI request in flight: its parsed request, its sequence in the engine, its response id."""

    req: GenerationRequest
    seq: AsyncSequence
    rid: str
    served_name: str

    async def first(self) -> Event:
        """Wait for the first token (queue and prompt errors are still HTTP statuses then)."""
        event = await self.seq.next_event()
        _raise_for(event)
        return event

    async def body(self, first: Event) -> dict[str, Any]:
        """The non-streaming answer: waits for the sequence's end."""
        parts = [first.text]
        event = first
        while event.finish_reason is None:
            event = await self.seq.next_event()
            parts.append(event.text)
        _raise_for(event)
        return response_body(
            self.req.kind,
            self.rid,
            self.served_name,
            "".join(parts),
            _finish(event),
            event.prompt_tokens,
            event.completion_tokens,
        )

    async def frames(self, first: Event) -> AsyncGenerator[bytes, None]:
        """The streaming answer: one SSE frame per step, then the finish (and usage) frames and [DONE]."""
        writer = ChunkWriter(self.req.kind, self.rid, self.served_name, self.req.include_usage)
        event = first
        while True:
            if event.finish_reason is not None:
                if event.finish_reason in ("stop", "length"):
                    yield writer.finish(
                        event.text, event.finish_reason, event.prompt_tokens, event.completion_tokens
                    )
                elif event.finish_reason != "cancelled":
                    yield writer.error(_event_error(event))
                return
            if event.text:
                yield writer.delta(event.text)
            event = await self.seq.next_event()


class LLMService:
    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer: Any,
        *,
        served_name: str,
        max_new_tokens: int,
        max_model_length: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.defaults = Defaults(served_name=served_name, max_new_tokens=max_new_tokens)
        self.max_model_length = max_model_length
        self.vocab_size = len(tokenizer)

    # -- prompts ---------------------------------------------------------------------------------

    def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        if len(text) > self.max_model_length * CHARS_PER_TOKEN_BOUND:
            raise self._too_long(f"{len(text)} characters", param)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _too_long(self, what: str, param: str) -> OpenAIError:
        return OpenAIError(
            400,
            f"This model's maximum context length is {self.max_model_length} tokens; the prompt is {what} "
            "(--max-model-length)",
            param=param,
            code="context_length_exceeded",
        )

    async def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.kind == "chat":
            # content is plain text (a special token's text cannot forge a turn); rest/openai.py already
            # bounded the characters (check_sizes), and templating runs off the event loop
            return await asyncio.to_thread(chat_prompt_ids, self.tokenizer, req.messages)
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if t >= self.vocab_size]
            if bad:
                raise OpenAIError(
                    400, f"prompt token id {bad[0]} is outside the vocabulary ({self.vocab_size})", "prompt"
                )
            return list(req.prompt)
        return await self._encode_async(req.prompt, True, "prompt")

    async def _encode_async(self, text: str, add_special: bool, param: str) -> list[int]:
        if len(text) > 16384:
            return await asyncio.to_thread(self._encode, text, add_special, param)
        return self._encode(text, add_special, param)

    def sampling(self, req: GenerationRequest, n_prompt: int) -> SamplingParams:
        param = "messages" if req.kind == "chat" else "prompt"
        room = self.max_model_length - n_prompt
        if room < 1:
            raise self._too_long(f"{n_prompt} tokens", param)
        if req.max_tokens is not None and req.max_tokens > room:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.max_model_length} tokens; the prompt is "
                f"{n_prompt} tokens and max_tokens asks for {req.max_tokens} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        cap = self.defaults.max_new_tokens or room  # --max-new-tokens: a server-wide cap (0: none)
        max_tokens = min(req.max_tokens, cap) if req.max_tokens is not None else min(cap, room)
        problem = stop_error(req.stop)  # openai_api validates it; the engine's bound, checked again
        if problem is not None:
            raise OpenAIError(400, problem, param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
        )

    def submit(self, ids: list[int], params: SamplingParams) -> AsyncSequence:
        try:
            return self.engine.submit(ids, params)
        except QueueFull as exc:
            raise OpenAIError(
                429,
                f"the server is busy: {exc}; retry later",
                code="queue_full",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            ) from None
        except EngineClosed:
            raise OpenAIError(503, "the server is shutting down", code="unavailable") from None

    # -- requests --------------------------------------------------------------------------------

    async def open(self, kind: str, body: Any) -> Completion:
        """Validate a ``completion`` or ``chat`` request body, tokenize it and submit its sequence."""
        req = parse_chat(body, self.defaults) if kind == "chat" else parse_completion(body, self.defaults)
        ids = await self.prompt_ids(req)
        params = self.sampling(req, len(ids))
        seq = self.submit(ids, params)
        return Completion(req, seq, new_id(kind), self.defaults.served_name)


async def _collect(seq: AsyncSequence) -> str:
    """The whole text of one V1/V2 sequence; RequestError 503 (queue timeout) or 500 (failed)."""
    parts: list[str] = []
    while True:
        event = await seq.next_event()
        parts.append(event.text)
        if event.finish_reason == "timeout":
            raise RequestError(503, f"the server is overloaded: {event.error}; retry later")
        if event.finish_reason in ("error", "cancelled"):
            raise RequestError(500, f"inference failed: {event.error or event.finish_reason}")
        if event.finish_reason is not None:
            return "".join(parts)


def _finish(event: Event) -> str:
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


def _event_error(event: Event) -> OpenAIError:
    if event.finish_reason == "timeout":
        return OpenAIError(
            503, f"the request timed out in the queue ({event.error}); retry later", code="queue_timeout"
        )
    if event.finish_reason == "cancelled":
        return OpenAIError(499, "the request was cancelled", code="cancelled")
    return OpenAIError(
        500, f"generation failed: {event.error}", code="generation_failed", type_="server_error"
    )


def _raise_for(event: Event) -> None:
    if event.finish_reason not in (None, "stop", "length"):
        raise _event_error(event)
