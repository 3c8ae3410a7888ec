"""Open Inference Protocol (KServe V2) routes: server metadata and health (``/v2``,
``/v2/health/live``, ``/v2/health/ready``), model metadata and readiness (``/v2/models/NAME[/versions/1]``,
``.../ready``) and inference (``POST /v2/models/NAME[/versions/1]/infer``). Inputs, outputs and metadata
follow the predictor's V2 schema (:mod:`tauon_serve.protocol`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..config import SERVER_NAME
from ..predictor import Predictor
from ..protocol import MODEL_VERSION, model_metadata, parse_v2_infer, v2_outputs
from ..state import ServerState
from .common import BodyCap, json_body, until_disconnect

LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("tauon")
    except Exception:
        return "0.1.0"


def _metadata(state: ServerState, predictor: Predictor) -> dict[str, Any]:
    cfg = state.config
    parameters = {
        "task": predictor.task,
        "labels": predictor.labels,
        "max_batch_size": cfg.max_batch_size,
        "max_latency_ms": cfg.max_latency_ms,
    }
    return model_metadata(cfg.name, predictor.schema, len(predictor.labels), parameters)


def live(state: ServerState) -> JSONResponse:
    """``/v2/health/live``: 503 with the reason once the model is loaded but unhealthy (its engine
    stopped), so the kubelet restarts the container."""
    error = state.health_error()
    if error is not None:
        return JSONResponse({"live": False, "error": error}, status_code=503)
    return JSONResponse({"live": True})


def ready(state: ServerState) -> JSONResponse:
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


def add_health_routes(app: Any, state: ServerState) -> None:
    """The probes: on the main app, and alone on the --health-port app."""

    async def live_route(request: Request) -> JSONResponse:
        return live(state)

    async def ready_route(request: Request) -> JSONResponse:
        return ready(state)

    app.add_route(LIVE_PATH, live_route, methods=["GET"])
    app.add_route(READY_PATH, ready_route, methods=["GET"])


def add_routes(app: FastAPI, state: ServerState) -> None:
    cap = BodyCap(state.config.max_body_bytes, "--max-body-bytes")

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": []}

    add_health_routes(app, state)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        state.check_model(name, version)
        return _metadata(state, state.check_ready())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        state.check_model(name, version)
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    # A plain Starlette route, like V1's predict (see there).
    async def infer(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        state.check_model(name, request.path_params.get("version"))
        predictor = state.check_ready()
        body = await json_body(request, cap, state.body_budget)
        req = parse_v2_infer(body, state.limits, predictor.output_names)
        predictor.check_inputs(req.texts, lambda i: f"inputs[0].data[{i}]")
        results = await until_disconnect(request, predictor.infer(req.texts), state.cut)
        response: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
        if req.id is not None:
            response["id"] = req.id
        response["outputs"] = v2_outputs(predictor.schema, results, req.outputs)
        return JSONResponse(response)

    app.add_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])
