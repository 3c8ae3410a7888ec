"""OpenAI-compatible routes: ``GET /openai/v1/models`` and ``POST /v1/completions``,
``/v1/chat/completions`` (each also under ``/openai``), for a causal LM's
:class:`~tauon_serve.llm.LLMService`; any other model answers 404 ``model_not_found``.

Non-streaming answers wait for the sequence's end; streaming answers wait for its first token (so queue
and length errors are still HTTP statuses), then send one SSE frame per step. A client that disconnects
cancels its sequence, which leaves the running batch at the next decode step. Errors have OpenAI's shape
(:class:`~tauon_serve.openai_api.OpenAIError`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..llm import Completion, LLMService
from ..openai_api import OpenAIError, models_list
from ..protocol import RequestError
from ..scheduler import Event
from ..state import ServerState
from .common import json_body, watch_disconnect


async def _openai_request(state: ServerState, request: Request) -> tuple[LLMService, Any]:
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
        return predictor.openai, await json_body(request, state.config.max_body_bytes)
    except RequestError as exc:
        raise OpenAIError(
            exc.status, exc.message, param="body" if exc.status in (400, 413) else None
        ) from None


async def _respond(state: ServerState, request: Request, kind: str) -> Response:
    llm, body = await _openai_request(state, request)
    call = await llm.open(kind, body)
    watcher: asyncio.Task[None] | None = asyncio.create_task(watch_disconnect(request, call.seq.cancel))
    try:
        first = await call.first()
        if call.req.stream:
            assert watcher is not None
            stream = _stream(call, first, watcher)
            watcher = None  # owned by the stream now
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return JSONResponse(await call.body(first))
    finally:
        if watcher is not None:
            watcher.cancel()
            call.seq.cancel()


async def _stream(call: Completion, first: Event, watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
    frames = call.frames(first)
    try:
        async for frame in frames:
            yield frame
    finally:
        await frames.aclose()
        watcher.cancel()
        call.seq.cancel()


def add_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.config

    @app.get("/openai/v1/models")
    async def openai_models() -> dict[str, Any]:
        return models_list(cfg.name, state.created)

    @app.post("/v1/completions")
    @app.post("/openai/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(state, request, "completion")

    @app.post("/v1/chat/completions")
    @app.post("/openai/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _respond(state, request, "chat")
