"""CustomResourceDefinitions generated from the pydantic models (the single source of truth).

Pydantic emits JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 subset. The transform:
inline `$ref`s (field description wins over the model's), drop titles and defaults (defaults live in
the models and are documented in the description instead), fold `Optional[X]` into X (nulls are
pruned by the API server, so `has()` in CEL sees absence), turn numeric exclusive bounds into the v3.0
boolean form, mark int-or-string fields, and keep `x-kubernetes-*` extensions from `json_schema_extra`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from tauon.api.common import NAME_MAX, NAME_PATTERN
from tauon.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus
from tauon.api.finetunesweep import SWEEP_NAME_MAX, FineTuneSweepSpec, FineTuneSweepStatus
from tauon.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tauon.api.names import (
    API_VERSION,
    FINETUNEJOB,
    FINETUNEJOBS,
    FINETUNESWEEP,
    FINETUNESWEEPS,
    GROUP,
    INFERENCESERVICE,
    INFERENCESERVICES,
    READY,
    VERSION,
)

CATEGORIES = ["tauon", "ml"]


def _default_text(value: Any) -> str | None:
    if value is None or value == {} or value == [] or value == "":
        return None
    return json.dumps(value) if not isinstance(value, str) else value


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = dict(defs[node.pop("$ref").split("/")[-1]])
        target.pop("description", None) if "description" in node else None
        target.update(node)
        node = target
    if "anyOf" in node:
        choices = [c for c in node["anyOf"] if c.get("type") != "null"]
        if (
            node.pop("x-tauon-int-or-string", False)
            or all(c.get("type") in ("integer", "string") for c in choices)
            and {c.get("type") for c in choices} == {"integer", "string"}
        ):
            node.pop("anyOf")
            node["x-kubernetes-int-or-string"] = True
        elif len(choices) == 1:
            node.pop("anyOf")
            choice = choices[0]
            if "$ref" in choice:
                choice = _convert(choice, defs)
                choice.pop("description", None) if "description" in node else None
            merged = dict(choice)
            merged.update(node)
            node = merged
        else:
            raise ValueError(f"cannot express union in a structural schema: {node}")
    node.pop("title", None)
    node.pop("x-tauon-int-or-string", None)
    if node.pop("x-tauon-quantity-map", False):
        node["additionalProperties"] = {"x-kubernetes-int-or-string": True}
    if "default" in node:
        text = _default_text(node.pop("default"))
        if text is not None and "description" in node:
            node["description"] = node["description"].rstrip() + f" Defaults to {text}."
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("additionalProperties") is True:
        # `additionalProperties: true` gives every value an empty schema, and the API server then prunes
        # (or, strictly decoding, refuses) fields nested in them: keep free-form subtrees whole
        node.pop("additionalProperties")
    if node.get("format") == "date-time":
        node["type"] = "string"
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {k: _convert(v, defs) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _convert(node[key], defs)
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    return node


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (validation mode, camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = json.loads(json.dumps(_convert(raw, defs)))  # no shared sub-objects
    return schema


def _root_schema(
    kind: str, spec: type[BaseModel], status: type[BaseModel], description: str
) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"APIVersion of the object ({API_VERSION})."},
            "kind": {"type": "string", "description": f"Kind of the object ({kind})."},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec),
            "status": openapi_schema(status),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}') && size(self.metadata.name) <= {NAME_MAX}",
                "message": (
                    f"metadata.name must be a DNS-1035 label of at most {NAME_MAX} characters "
                    "(lower-case letters, digits and '-', starting with a letter): child names derive from it"
                ),
            }
        ],
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "tauon", "app.kubernetes.io/part-of": "tauon"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def finetunejob_crd() -> dict[str, Any]:
    schema = _root_schema(
        FINETUNEJOB,
        FineTuneJobSpec,
        FineTuneJobStatus,
        "FineTuneJob fine-tunes a model with a gang of torch.distributed pods (NCCL on GPUs, gloo on CPUs), "
        "restarting the whole gang from the latest checkpoint on failure.",
    )
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Derived phase."},
        {
            "name": "Nodes",
            "type": "integer",
            "jsonPath": ".spec.numNodes",
            "description": "Pods in the gang.",
        },
        {
            "name": "Restarts",
            "type": "integer",
            "jsonPath": ".status.restarts",
            "description": "Gang restarts.",
        },
        {
            "name": "Progress",
            "type": "string",
            "jsonPath": ".status.progress.percent",
            "description": "Percent of optimizer steps done.",
        },
        _age(),
        {
            "name": "Loss",
            "type": "number",
            "jsonPath": ".status.progress.loss",
            "priority": 1,
            "description": "Latest training loss.",
        },
        {
            "name": "Model",
            "type": "string",
            "jsonPath": ".status.output.model",
            "priority": 1,
            "description": "Final model location.",
        },
    ]
    return _crd(FINETUNEJOB, FINETUNEJOBS, "ftj", schema, columns, {"status": {}})


def inferenceservice_crd() -> dict[str, Any]:
    schema = _root_schema(
        INFERENCESERVICE,
        InferenceServiceSpec,
        InferenceServiceStatus,
        "InferenceService serves a model (a FineTuneJob's output or a model directory) behind a Service, "
        "with dynamic batching, autoscaling and an optional canary.",
    )
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Derived phase."},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": f'.status.conditions[?(@.type=="{READY}")].status',
            "description": "The Ready condition.",
        },
        {
            "name": "Replicas",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "description": "Ready server replicas (predictor + canary).",
        },
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "description": "In-cluster URL."},
        _age(),
    ]
    subresources = {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    return _crd(INFERENCESERVICE, INFERENCESERVICES, "tis", schema, columns, subresources)


def finetunesweep_crd() -> dict[str, Any]:
    schema = _root_schema(
        FINETUNESWEEP,
        FineTuneSweepSpec,
        FineTuneSweepStatus,
        "FineTuneSweep searches hyperparameters (Optuna: TPE, random or grid): each trial is a FineTuneJob "
        "<sweep>-t<k> made from spec.template, and status.best names the best one.",
    )
    schema["x-kubernetes-validations"].append(
        {
            "rule": f"size(self.metadata.name) <= {SWEEP_NAME_MAX}",
            "message": (
                f"a FineTuneSweep's name is at most {SWEEP_NAME_MAX} characters: its trials are named "
                "<sweep>-t<k>"
            ),
        }
    )
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Derived phase."},
        {
            "name": "Trials",
            "type": "integer",
            "jsonPath": ".status.finishedTrials",
            "description": "Trials finished.",
        },
        {"name": "Best", "type": "string", "jsonPath": ".status.best.trial", "description": "Best trial."},
        {
            "name": "Objective",
            "type": "number",
            "jsonPath": ".status.best.objective",
            "description": "The best trial's objective metric.",
        },
        _age(),
        {
            "name": "Model",
            "type": "string",
            "jsonPath": ".status.best.model",
            "priority": 1,
            "description": "The best trial's model location.",
        },
    ]
    return _crd(FINETUNESWEEP, FINETUNESWEEPS, "ftsweep", schema, columns, {"status": {}})


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD."""
    return {
        f"{FINETUNEJOBS}.{GROUP}.yaml": finetunejob_crd(),
        f"{INFERENCESERVICES}.{GROUP}.yaml": inferenceservice_crd(),
        f"{FINETUNESWEEPS}.{GROUP}.yaml": finetunesweep_crd(),
    }


HEADER = "# Generated by `tauon crds` from operator/tauon/api (pydantic models). Do not edit.\n"


def render_yaml(crd: dict[str, Any]) -> str:
    import yaml

    return HEADER + yaml.safe_dump(crd, sort_keys=True, width=110)
