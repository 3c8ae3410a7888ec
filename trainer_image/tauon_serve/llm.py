"""The OpenAI-compatible endpoints of the model server, over the continuous-batching engine.

Requests are validated (:mod:`tauon_serve.openai_api`), tokenized, checked against the model length,
and submitted to :class:`tauon_serve.generation.GenerationEngine`. Non-streaming answers wait for the
sequence's end; streaming answers wait for its first token (so queue and length errors are still
HTTP statuses), then send one SSE frame per step. A client that disconnects cancels its sequence,
which leaves the running batch at the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .generation import AsyncSequence, GenerationEngine
from .openai_api import (
    ChunkWriter,
    Defaults,
    GenerationRequest,
    OpenAIError,
    chat_prompt,
    new_id,
    parse_chat,
    parse_completion,
    response_body,
)
from .scheduler import EngineClosed, Event, QueueFull, SamplingParams

log = logging.getLogger("tauon.serve.llm")

# A prompt longer than this many characters per token of the model length is refused before it is
# tokenized (no tokenizer averages more; it keeps a huge prompt from tying up a thread).
CHARS_PER_TOKEN_BOUND = 64
RETRY_AFTER_SECONDS = "1"


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call ``on_disconnect`` once the client has gone (the request body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready (nobody reads the response)."""


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it and raise :class:`ClientGone` if the client disconnects first (work
    still queued is then dropped before it is computed)."""
    task = asyncio.ensure_future(work)
    gone = False

    def on_gone() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch_disconnect(request, on_gone))
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


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
            templated = bool(getattr(self.tokenizer, "chat_template", None))
            text = chat_prompt(self.tokenizer, req.messages)
            return await self._encode_async(text, not templated, "messages")
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
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.defaults.max_new_tokens, room)
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

    # -- endpoints -------------------------------------------------------------------------------

    async def handle(self, kind: str, body: Any, request: Request) -> Response:
        req = parse_chat(body, self.defaults) if kind == "chat" else parse_completion(body, self.defaults)
        ids = await self.prompt_ids(req)
        params = self.sampling(req, len(ids))
        seq = self.submit(ids, params)
        rid = new_id(kind)
        watcher: asyncio.Task[None] | None = asyncio.create_task(watch_disconnect(request, seq.cancel))
        try:
            first = await seq.next_event()
            _raise_for(first)
            if req.stream:
                writer = ChunkWriter(kind, rid, self.defaults.served_name, req.include_usage)
                assert watcher is not None
                stream = self._stream(seq, first, writer, watcher)
                watcher = None  # owned by the stream now
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
                )
            parts = [first.text]
            event = first
            while event.finish_reason is None:
                event = await seq.next_event()
                parts.append(event.text)
            _raise_for(event)
            return JSONResponse(
                response_body(
                    kind,
                    rid,
                    self.defaults.served_name,
                    "".join(parts),
                    _finish(event),
                    event.prompt_tokens,
                    event.completion_tokens,
                )
            )
        finally:
            if watcher is not None:
                watcher.cancel()
                seq.cancel()

    async def _stream(
        self, seq: AsyncSequence, first: Event, writer: ChunkWriter, watcher: asyncio.Task[None]
    ) -> AsyncIterator[bytes]:
        try:
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
                event = await seq.next_event()
        finally:
            watcher.cancel()
            seq.cancel()


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
