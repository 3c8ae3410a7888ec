"""HTTP plumbing shared by the route modules: reading a JSON body (limited per route, :class:`BodyCap`,
and by the in-flight budget of all bodies together; a large one is parsed off the event loop), the
exception handlers that give every error its protocol's shape (``{"error": message}`` for KServe/V2,
OpenAI's error object for the OpenAI routes), abandoning work whose client has disconnected
(:func:`until_disconnect`, :class:`ClientGone`, answered 499), and ending work still running at the
graceful shutdown's deadline (:func:`until_cut`, ``state.cut``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..openai_api import OpenAIError
from ..protocol import RequestError, check_content_type, parse_json_body
from ..state import BUDGET_FREE_BYTES, BodyBudget

log = logging.getLogger("tauon.serve")

PARSE_OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a thread, not on the event loop
RETRY_AFTER_SECONDS = "1"


@dataclass(frozen=True)
class BodyCap:
    """A route's body limit and the flag that sets it (named in the 413)."""

    limit: int
    flag: str


class BudgetExhausted(RequestError):
    """503 + Retry-After: the bodies in flight already use --max-inflight-body-bytes."""

    def __init__(self, budget: BodyBudget) -> None:
        super().__init__(
            503,
            f"the server is reading too many large request bodies ({budget.used} bytes of "
            f"{budget.limit}, --max-inflight-body-bytes); retry later",
        )


async def read_body(request: Request, cap: BodyCap, budget: BodyBudget, held: list[int]) -> bytes:
    """The body, refused with 413 past ``cap`` (from Content-Length before any byte is read) and with
    503 when it would overrun ``budget``; ``held[0]`` is what this body holds of the budget."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {declared!r}") from None
        if n > cap.limit:
            raise RequestError(413, f"request body is {n} bytes; the limit is {cap.limit} ({cap.flag})")
        if n > BUDGET_FREE_BYTES and budget.used + n > budget.limit:
            raise BudgetExhausted(budget)  # before reading: the client learns at once
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap.limit:
            raise RequestError(413, f"request body exceeds the limit of {cap.limit} bytes ({cap.flag})")
        if size > BUDGET_FREE_BYTES:
            charge = size - held[0]
            if not budget.take(charge):
                raise BudgetExhausted(budget)
            held[0] += charge
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, cap: BodyCap, budget: BodyBudget) -> Any:
    """The request's JSON body; RequestError 400/413/415, or 503 when the in-flight budget is spent.
    The body's share of the budget is held until it is parsed, and given back on every path."""
    check_content_type(request.headers.get("content-type"))
    held = [0]
    try:
        body = await read_body(request, cap, budget, held)
        if len(body) > PARSE_OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse_json_body, body)
        return parse_json_body(body)
    finally:
        budget.give(held[0])


# -- client disconnects --------------------------------------------------------------------------


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call ``on_disconnect`` once the client has gone (the request body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready (nobody reads the response)."""


SHUTDOWN_CUT = "the server shut down before the request finished (--graceful-timeout-seconds)"


async def until_disconnect(request: Request, work: Awaitable[Any], cut: asyncio.Event | None = None) -> Any:
    """Await ``work``; cancel it and raise :class:`ClientGone` if the client disconnects first (work
    still queued is then dropped before it is computed), or RequestError 503 once ``cut`` is set (the
    graceful shutdown's deadline)."""
    task = asyncio.ensure_future(work)
    why: str | None = None

    def stop(reason: str) -> None:
        nonlocal why
        why = why or reason
        task.cancel()

    watcher = asyncio.create_task(watch_disconnect(request, lambda: stop("gone")))
    cutter = asyncio.create_task(on_set(cut, lambda: stop("cut"))) if cut is not None else None
    try:
        return await task
    except asyncio.CancelledError:
        if why == "gone":
            raise ClientGone() from None
        if why == "cut":
            raise RequestError(503, SHUTDOWN_CUT) from None
        raise
    finally:
        watcher.cancel()
        if cutter is not None:
            cutter.cancel()


async def on_set(event: asyncio.Event, action: Callable[[], None]) -> None:
    await event.wait()
    action()


async def until_cut(work: Awaitable[Any], cut: asyncio.Event, on_cut: Callable[[], None]) -> Any:
    """Await ``work`` (an OpenAI answer); once ``cut`` is set (the graceful shutdown's deadline) call
    ``on_cut``, cancel it and raise OpenAIError 503."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cut.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            on_cut()
            task.cancel()
            raise OpenAIError(503, SHUTDOWN_CUT, code="unavailable")
        return task.result()
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()


# -- errors --------------------------------------------------------------------------------------


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if isinstance(exc, BudgetExhausted) else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; counted in the metrics as 499

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # starlette re-raises the exception after this answer and uvicorn logs its traceback: one line
        # here names the request, without a second traceback.
        log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
