"""The KServe V1 and Open Inference Protocol (V2) data model of the model server: request parsing and
validation, the V2 schema of each task's inputs and outputs, and the rendering of results into V1
predictions, V2 output tensors and V2 model metadata.

The V2 schema is written once, here: :class:`TensorSpec` per input/output (``CLASSIFICATION_SCHEMA``,
``GENERATION_SCHEMA``). Each task's result type (:class:`Classification`, :class:`Generation`) has one
field per output of the same name; a V2 output tensor is that field of every result, the model metadata
lists the specs, ``outputs[].name`` in a request is checked against them, and a V1 prediction is the
result's fields with camelCase keys (``label_name`` -> ``labelName``).

Pure functions with no torch/FastAPI dependency so they can be unit-tested directly. Every problem
raises :class:`RequestError` carrying the HTTP status and a message that says what was wrong and where
(``inputs[0].datatype must be BYTES, got 'FP32'``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

MODEL_VERSION = "1"  # the only version of the served model (V2 ``versions``, ``/versions/1/`` URLs)
TEXT_INPUT = "text"

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


# -- the V2 schema -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One V2 input or output: one element per instance (shape ``[n]``), or with ``row`` a row of a
    fixed length k per instance (shape ``[n, k]``)."""

    name: str
    datatype: str
    row: bool = False

    def metadata(self, row_length: int = 0) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, row_length] if self.row else [-1]}

    def tensor(self, results: Sequence[Any]) -> dict[str, Any]:
        """The output tensor of a batch of results: each result's field named like this output."""
        name = self.name
        column = [getattr(r, name) for r in results]
        if self.row:
            k = len(column[0]) if column else 0
            return {
                "name": name,
                "datatype": self.datatype,
                "shape": [len(column), k],
                "data": [x for row in column for x in row],
            }
        return {"name": name, "datatype": self.datatype, "shape": [len(column)], "data": column}


TEXT_INPUT_SPEC = TensorSpec(TEXT_INPUT, "BYTES")
CLASSIFICATION_SCHEMA = (
    TensorSpec("label", "INT64"),
    TensorSpec("probabilities", "FP32", row=True),  # k = the number of labels
    TensorSpec("label_name", "BYTES"),
)
GENERATION_SCHEMA = (TensorSpec("generated_text", "BYTES"),)
CLASSIFICATION_OUTPUTS = tuple(o.name for o in CLASSIFICATION_SCHEMA)
GENERATION_OUTPUTS = tuple(o.name for o in GENERATION_SCHEMA)


@dataclass(frozen=True)
class Classification:
    """One instance's result of a sequence classifier: the fields are its V2 outputs (in V1 order)."""

    label: int
    label_name: str
    probabilities: list[float]


@dataclass(frozen=True)
class Generation:
    """One instance's result of a causal LM on V1/V2 (a greedy continuation of the text)."""

    generated_text: str


def v2_outputs(schema: Sequence[TensorSpec], results: Sequence[Any], names: list[str] | None) -> list[Any]:
    """The response's ``outputs``: the requested names in request order, or every output of the schema."""
    if names is None:
        return [spec.tensor(results) for spec in schema]
    by_name = {spec.name: spec for spec in schema}
    return [by_name[name].tensor(results) for name in names]


def model_metadata(
    name: str, schema: Sequence[TensorSpec], row_length: int, parameters: dict[str, Any]
) -> dict[str, Any]:
    """``GET /v2/models/NAME``: ``row_length`` is k of the ``[n, k]`` outputs (the number of labels)."""
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": [TEXT_INPUT_SPEC.metadata()],
        "outputs": [spec.metadata(row_length) for spec in schema],
        "parameters": parameters,
    }


def v1_prediction(result: Any) -> dict[str, Any]:
    """One V1 ``predictions[]`` entry: the result's fields, camelCase (``labelName``, ``generatedText``)."""
    keys = _V1_KEYS.get(type(result))
    if keys is None:
        keys = _V1_KEYS[type(result)] = tuple((f.name, _camel(f.name)) for f in fields(result))
    return {key: getattr(result, name) for name, key in keys}


_V1_KEYS: dict[type, tuple[tuple[str, str], ...]] = {}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


# -- requests ------------------------------------------------------------------------------------


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

    idx, inp = _text_input(body)
    where = f"inputs[{idx}]"
    datatype = inp.get("datatype")
    if datatype != TEXT_INPUT_SPEC.datatype:
        got = repr(datatype) if isinstance(datatype, str) else _type_name(datatype)
        raise RequestError(400, f"{where}.datatype must be BYTES, got {got}")
    shape = _input_shape(inp.get("shape"), where)
    texts = _input_texts(inp, shape, where, limits)
    outputs = _parse_requested_outputs(body.get("outputs"), output_names)
    return V2Request(texts=texts, id=req_id, outputs=outputs, input_shape=list(shape))


def _text_input(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The one input, named ``text``: its index in ``inputs`` and the input object."""
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
    return found


def _input_shape(shape: Any, where: str) -> list[int]:
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
    return shape


def _input_texts(inp: dict[str, Any], shape: list[int], where: str, limits: Limits) -> list[str]:
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
    return texts


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
