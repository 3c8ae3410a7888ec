"""OpenAI-compatible routes: ``GET /v1/models`` (served by :mod:`.v1`, whose body is also OpenAI's list)
and ``POST /v1/completions``, ``/v1/chat/completions``, for a causal LM's
:class:`~tauon_serve.llm.LLMService`; any other model answers 404 ``model_not_found``. Only ``/v1``, as
vLLM serves it, so that a client's base URL is the same on both runtimes.

A body is limited to --max-openai-body-bytes, and its sizes (prompt tokens, messages, characters) are
checked against the model length before anything walks it (:func:`~tauon_serve.openai_api.check_sizes`).
Non-streaming answers wait for the sequence's end; streaming answers wait for its first token (so queue
and length errors are still HTTP statuses), then send one SSE frame per step. A client that disconnects
cancels its sequence, which leaves the running batch at the next decode step. At the graceful shutdown's
deadline a stream still running ends with an error frame and ``[DONE]``. Errors have OpenAI's shape
(:class:`~tauon_serve.openai_api.OpenAIError`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..llm import Completion, LLMService
from ..openai_api import OpenAIError, check_sizes, shutdown_frame
from ..protocol import RequestError
from ..scheduler import Event
from ..state import ServerState
from .common import (
    RETRY_AFTER_SECONDS,
    SHUTDOWN_CUT,
    BodyCap,
    json_body,
    on_set,
    until_cut,
    watch_disconnect,
)


async def _openai_request(state: ServerState, request: Request, kind: str) -> tuple[LLMService, Any]:
    """The LLM service and the parsed body, or an OpenAI-shaped error."""
    try:
        predictor = state.check_ready()
        if predictor.openai is None:
            raise OpenAIError(
                404,
                f"model {state.config.name!r} is a {predictor.task} model; the OpenAI API serves causal LMs",
                param="model",
                code="model_not_found",
            )
        cap = BodyCap(state.config.max_openai_body_bytes, "--max-openai-body-bytes")
        body = await json_body(request, cap, state.body_budget)
    except RequestError as exc:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if exc.status == 503 else None
        raise OpenAIError(
            exc.status, exc.message, param="body" if exc.status in (400, 413) else None, headers=headers
        ) from None
    check_sizes(kind, body, predictor.openai.max_model_length)
    return predictor.openai, body


async def _respond(state: ServerState, request: Request, kind: str) -> Response:
    llm, body = await _openai_request(state, request, kind)
    call = await llm.open(kind, body)
    watcher: asyncio.Task[None] | None = asyncio.create_task(watch_disconnect(request, call.seq.cancel))
    try:
        first = await until_cut(call.first(), state.cut, call.seq.cancel)
        if call.req.stream:
            assert watcher is not None
            stream = _stream(call, first, watcher, state.cut)
            watcher = None  # owned by the stream now
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(await until_cut(call.body(first), state.cut, call.seq.cancel))
    finally:
        if watcher is not None:
            watcher.cancel()
            call.seq.cancel()


async def _stream(
    call: Completion, first: Event, watcher: asyncio.Task[None], cut: asyncio.Event
) -> AsyncIterator[bytes]:
    cut_now = False

    def on_cut() -> None:  # the shutdown deadline: the sequence ends (cancelled) at the next step
        nonlocal cut_now
        cut_now = True
        call.seq.cancel()

    cutter = asyncio.create_task(on_set(cut, on_cut))
    frames = call.frames(first)
    try:
        async for frame in frames:
            yield frame
        if cut_now:  # a frame the client reads instead of a cut connection
            yield shutdown_frame(SHUTDOWN_CUT)
    finally:
        cutter.cancel()
        await frames.aclose()
        watcher.cancel()
        call.seq.cancel()


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(state, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _respond(state, request, "chat")
