"""Request parsing and validation for the model server (KServe V1 and Open Inference Protocol V2).

Pure functions with no torch/FastAPI dependency so they can be unit-tested directly. Every problem
raises :class:`RequestError` carrying the HTTP status and a message that says what was wrong and where
(``inputs[0].datatype must be BYTES, got 'FP32'``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TEXT_INPUT = "text"
CLASSIFICATION_OUTPUTS = ("label", "probabilities", "label_name")
GENERATION_OUTPUTS = ("generated_text",)

_JSON_CONTENT_TYPES = ("application/json",)
MAX_SHAPE_RANK = 8  # V2 inputs[].shape: most dimensions (the product is computed only after bounding)


class RequestError(Exception):
    """A client error: ``status`` is the HTTP code (4xx), ``message`` goes to ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_instances: int = 256
    max_text_chars: int = 20000


@dataclass(frozen=True)
class V2Request:
    texts: list[str]
    id: str | None = None
    # None = every output of the model; otherwise the requested names, in request order.
    outputs: list[str] | None = None
    input_shape: list[int] = field(default_factory=list)


def check_content_type(content_type: str | None) -> None:
    """Accept a missing Content-Type, ``application/json`` and ``application/*+json`` (any charset)."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media in _JSON_CONTENT_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise RequestError(415, f"Content-Type must be application/json, got {content_type!r}")


def parse_json_body(body: bytes) -> Any:
    if not body.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts (4300)
        raise RequestError(400, f"request body is not valid JSON: {str(exc)[:120]}") from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(text: str, where: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise RequestError(
            413, f"{where} is {len(text)} characters; the limit is {limits.max_text_chars} (--max-text-chars)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{where} is not valid Unicode (it contains a lone surrogate)") from None


def _check_count(n: int, where: str, limits: Limits) -> None:
    if n == 0:
        raise RequestError(400, f"{where} must not be empty")
    if n > limits.max_instances:
        raise RequestError(
            413, f"{where} has {n} instances; the limit is {limits.max_instances} (--max-instances)"
        )


def parse_v1_predict(body: Any, limits: Limits) -> list[str]:
    """``{"instances": [str | {"text": str}, ...]}`` -> the texts."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {_type_name(body)}")
    if "instances" not in body:
        raise RequestError(400, 'request body must have an "instances" field (a list of texts)')
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError(400, f"instances must be a list, got {_type_name(instances)}")
    _check_count(len(instances), "instances", limits)
    texts: list[str] = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(inst, dict):
            if "text" not in inst:
                raise RequestError(400, f'{where} is an object without a "text" field')
            inst = inst["text"]
            where += ".text"
        if not isinstance(inst, str):
            raise RequestError(
                400,
                f'{where} must be a string or an object with a string "text" field, got {_type_name(inst)}',
            )
        _check_text(inst, where, limits)
        texts.append(inst)
    return texts


def parse_v2_infer(body: Any, limits: Limits, output_names: Sequence[str]) -> V2Request:
    """Open Inference Protocol inference request with one ``BYTES`` input named ``text``."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {_type_name(body)}")

    req_id = body.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise RequestError(400, f"id must be a string, got {_type_name(req_id)}")

    if "inputs" not in body:
        raise RequestError(
            400, f'request body must have an "inputs" field with one input named "{TEXT_INPUT}"'
        )
    inputs = body["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(400, f"inputs must be a list, got {_type_name(inputs)}")
    if not inputs:
        raise RequestError(400, f'inputs must not be empty; expected one input named "{TEXT_INPUT}"')

    found: tuple[int, dict[str, Any]] | None = None
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise RequestError(400, f"inputs[{i}] must be an object, got {_type_name(inp)}")
        name = inp.get("name")
        if not isinstance(name, str):
            raise RequestError(400, f"inputs[{i}].name must be a string, got {_type_name(name)}")
        if name != TEXT_INPUT:
            raise RequestError(
                400,
                f'inputs[{i}].name {name!r} is not an input of this model (its only input is "{TEXT_INPUT}")',
            )
        if found is not None:
            raise RequestError(
                400, f'inputs[{i}] repeats the input "{TEXT_INPUT}" (first at inputs[{found[0]}])'
            )
        found = (i, inp)
    assert found is not None
    idx, inp = found
    where = f"inputs[{idx}]"

    datatype = inp.get("datatype")
    if datatype != "BYTES":
        got = repr(datatype) if isinstance(datatype, str) else _type_name(datatype)
        raise RequestError(400, f"{where}.datatype must be BYTES, got {got}")

    shape = inp.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape[:MAX_SHAPE_RANK])
    ):
        raise RequestError(
            400,
            f"{where}.shape must be a non-empty list of non-negative integers, e.g. [2], got {_short(shape)}",
        )
    if len(shape) > MAX_SHAPE_RANK:
        raise RequestError(400, f"{where}.shape has rank {len(shape)}; at most {MAX_SHAPE_RANK} dimensions")

    if "data" not in inp:
        raise RequestError(400, f"{where}.data is required (a list of strings)")
    data = inp["data"]
    if not isinstance(data, list):
        raise RequestError(400, f"{where}.data must be a list of strings, got {_type_name(data)}")
    _check_count(len(data), f"{where}.data", limits)
    for k, d in enumerate(shape):  # bounded before the product: no big-int arithmetic on the event loop
        if d > limits.max_instances:
            raise RequestError(
                400,
                f"{where}.shape[{k}] is {_short(d, 24)}; no dimension may exceed {limits.max_instances} "
                "(--max-instances)",
            )

    elements = 1
    for d in shape:
        elements *= d
    if elements != len(data):
        raise RequestError(
            400,
            f"{where}.shape {shape} describes {elements} elements but {where}.data has {len(data)}",
        )

    texts: list[str] = []
    for j, item in enumerate(data):
        if not isinstance(item, str):
            raise RequestError(400, f"{where}.data[{j}] must be a string, got {_type_name(item)}")
        _check_text(item, f"{where}.data[{j}]", limits)
        texts.append(item)

    outputs = _parse_requested_outputs(body.get("outputs"), output_names)
    return V2Request(texts=texts, id=req_id, outputs=outputs, input_shape=list(shape))


def _parse_requested_outputs(outputs: Any, output_names: Sequence[str]) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise RequestError(400, f"outputs must be a list, got {_type_name(outputs)}")
    if not outputs:
        return None
    names: list[str] = []
    for k, out in enumerate(outputs):
        if not isinstance(out, dict):
            raise RequestError(400, f"outputs[{k}] must be an object, got {_type_name(out)}")
        name = out.get("name")
        if not isinstance(name, str):
            raise RequestError(400, f"outputs[{k}].name must be a string, got {_type_name(name)}")
        if name not in output_names:
            raise RequestError(
                400,
                f"outputs[{k}].name {name!r} is not an output of this model (outputs: {', '.join(output_names)})",
            )
        if name not in names:
            names.append(name)
    return names
