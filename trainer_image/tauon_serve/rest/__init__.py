"""The HTTP side of the model server, one route module per protocol (as KServe's ``protocol/rest``):
:mod:`.v1` (KServe V1), :mod:`.v2` (Open Inference Protocol: health, metadata, inference) and
:mod:`.openai` (OpenAI completions, chat completions, models), over :mod:`.common` (JSON bodies, error
shapes, client disconnects); :mod:`.metrics` is the request middleware and ``GET /metrics``.

Each module's ``add_routes(app, ...)`` registers its routes; they reach the model only through the
:class:`~tauon_serve.predictor.Predictor` the state holds. This package (and ``tauon_serve.serve``, which
assembles the app) is the only part of the server that imports FastAPI or starlette.
"""
