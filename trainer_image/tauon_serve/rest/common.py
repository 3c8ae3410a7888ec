"""HTTP plumbing shared by the route modules: reading a JSON body (size-limited; a large one is parsed
off the event loop), the exception handlers that give every error its protocol's shape (``{"error":
message}`` for KServe/V2, OpenAI's error object for the OpenAI routes), and abandoning work whose
client has disconnected (:func:`until_disconnect`, :class:`ClientGone`, answered 499).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..openai_api import OpenAIError
from ..protocol import RequestError, check_content_type, parse_json_body

log = logging.getLogger("tauon.serve")

PARSE_OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a thread, not on the event loop


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {declared!r}") from None
        if n > limit:
            raise RequestError(413, f"request body is {n} bytes; the limit is {limit} (--max-body-bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:
    """The request's JSON body (``limit``: --max-body-bytes); RequestError 400/413/415 otherwise."""
    check_content_type(request.headers.get("content-type"))
    body = await read_body(request, limit)
    if len(body) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json_body, body)
    return parse_json_body(body)


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


# -- errors --------------------------------------------------------------------------------------


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

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
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
