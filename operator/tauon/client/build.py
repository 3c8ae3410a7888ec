"""Build FineTuneJob, FineTuneSweep and InferenceService objects from Python keywords, through the API
models.

The objects are validated by the same pydantic models the CRDs are generated from, so a field the API
does not have is an error here, before anything is sent. What is sent (`manifest`) holds exactly the
fields the caller set, as a hand-written manifest would; defaults stay the operator's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from tauon.api import FineTuneJob, FineTuneSweep, InferenceService
from tauon.api.common import NAME_MAX, NAME_PATTERN
from tauon.api.finetunejob import Hyperparameters
from tauon.api.finetunesweep import SWEEP_NAME_MAX, SWEEPABLE
from tauon.api.names import (
    API_VERSION,
    CAUSAL_LM,
    FINETUNEJOB,
    FINETUNESWEEP,
    INFERENCESERVICE,
    SEQUENCE_CLASSIFICATION,
    Manifest,
)
from tauon.client.errors import SpecError

_ALIASES = {"targetCpuUtilizationPercentage": "targetCPUUtilizationPercentage"}


def _camel(value: Any) -> Any:
    """snake_case keys of a structured setting (lora, autoscaling, generation, ...) -> camelCase."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = to_camel(str(k)) if "_" in str(k) else str(k)
            out[_ALIASES.get(key, key)] = _camel(v)
        return out
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value


def source_uri(source: str, base: Path | None = None) -> str:
    """pvc://, hf:// and file:///ABS unchanged; file://./REL and plain paths -> file:///ABS (from base or cwd)."""
    if source.startswith(("pvc://", "hf://", "file:///")):
        return source
    rel = source.removeprefix("file://") if source.startswith("file://") else source
    if "://" in rel:
        return source  # an unknown scheme: let the model's pattern reject it with the field path
    return "file://" + str(((base or Path.cwd()) / rel).resolve())


def _errors(e: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for err in e.errors():
        # unions and Literals add type names to the location; keep the path of fields only
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in ("int", "str"))]
        out.setdefault(".".join(loc) or "<root>", err["msg"])
    return out


def _check_name(kind: str, name: str) -> None:
    if not re.match(NAME_PATTERN, name or "") or len(name) > NAME_MAX:
        raise SpecError(
            kind,
            name,
            {
                "metadata.name": f"must be a DNS-1035 label of at most {NAME_MAX} characters "
                "(lower-case letters, digits and '-', starting with a letter)"
            },
        )


def _validate(model: type[BaseModel], doc: Manifest) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise SpecError(doc["kind"], doc["metadata"]["name"], _errors(e)) from None


def manifest(obj: BaseModel) -> Manifest:
    """What is sent to the API server: only the fields that were set, camelCase, no None values."""
    return obj.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


def _shallow(value: Mapping[str, Any] | None) -> Manifest:
    """camelCase only the top-level keys (pod_template: label and selector keys stay as given)."""
    out: Manifest = {}
    for k, v in (value or {}).items():
        key = to_camel(k) if "_" in k else k
        out[key] = v
    return out


def _meta(name: str, namespace: str, labels: Mapping[str, str] | None) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return meta


def _env(env: Mapping[str, str] | list[Manifest] | None) -> list[Manifest] | None:
    if env is None:
        return None
    if isinstance(env, Mapping):
        return [{"name": k, "value": str(v)} for k, v in env.items()]
    return list(env)


def hyperparameters(values: Mapping[str, Any], kind: str, name: str) -> Manifest:
    """snake_case hyperparameter keywords -> the CRD's camelCase keys; unknown names are an error."""
    fields = Hyperparameters.model_fields
    by_alias = {f.alias or n: n for n, f in fields.items()}
    out: Manifest = {}
    bad: dict[str, str] = {}
    for key, value in values.items():
        field = fields.get(key)
        if field is None and key in by_alias:
            field = fields[by_alias[key]]
        if field is None:
            known = ", ".join(sorted(fields))
            bad[key] = f"unknown keyword (not a hyperparameter either; hyperparameters: {known})"
            continue
        out[field.alias or key] = value
    if bad:
        raise SpecError(kind, name, bad)
    return out


def _put(d: Manifest, key: str, value: Any) -> None:
    if value is not None:
        d[key] = value


def _model(
    model: str | os.PathLike[str] | None,
    task: str,
    num_labels: int | None,
    init: str | None,
    model_config: Mapping[str, Any] | None,
    tokenizer: str | None,
    base: Path | None,
) -> Manifest:
    """spec.model of a FineTuneJob."""
    m: Manifest = {} if model is None else {"source": source_uri(os.fspath(model), base)}
    m["task"] = task
    _put(m, "numLabels", num_labels)
    _put(m, "init", init)
    _put(m, "config", dict(model_config) if model_config is not None else None)  # HF keys stay as they are
    _put(m, "tokenizer", source_uri(tokenizer, base) if tokenizer else None)
    return m


def _dataset(
    dataset: str | os.PathLike[str] | Mapping[str, Any], fields: Mapping[str, Any], base: Path | None
) -> Manifest:
    """spec.dataset of a FineTuneJob: a source (or a whole dataset mapping) and the fields set as keywords."""
    if isinstance(dataset, str | os.PathLike):
        d: Manifest = {"source": source_uri(os.fspath(dataset), base)}
    else:
        d = _camel(dict(dataset))
        if isinstance(d.get("source"), str):
            d["source"] = source_uri(d["source"], base)
    for key, value in fields.items():
        _put(d, key, value)
    return d


def _pods(
    spec: Manifest,
    resources: Mapping[str, Any] | None,
    image: str | None,
    env: Mapping[str, str] | list[Manifest] | None,
    node_selector: Mapping[str, str] | None,
    pod_template: Mapping[str, Any] | None,
) -> None:
    """The pod settings both kinds share (resources, image, env, podTemplate), into `spec`."""
    _put(spec, "resources", dict(resources) if resources else None)
    _put(spec, "image", image)
    _put(spec, "env", _env(env))
    pt = _shallow(pod_template)
    if node_selector:
        pt["nodeSelector"] = dict(node_selector)
    _put(spec, "podTemplate", pt or None)


def _document(
    kind: str, name: str, namespace: str, labels: Mapping[str, str] | None, spec: Manifest
) -> Manifest:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": _meta(name, namespace, labels), "spec": spec}


def finetunejob(
    name: str,
    *,
    model: str | os.PathLike[str] | None,
    dataset: str | os.PathLike[str] | Mapping[str, Any],
    output: str | None,
    namespace: str = "default",
    task: str | None = None,
    num_labels: int | None = None,
    num_nodes: int | None = None,
    nproc_per_node: int | str | None = None,
    method: str | None = None,
    lora: Mapping[str, Any] | None = None,
    strategy: str | None = None,
    parallelism: Mapping[str, Any] | None = None,
    init: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    dataset_format: str | None = None,
    dataset_type: str | None = None,
    messages_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    packing: bool | None = None,
    validation_split: float | None = None,
    checkpoint_every_steps: int | None = None,
    resources: Mapping[str, Any] | None = None,
    image: str | None = None,
    env: Mapping[str, str] | list[Manifest] | None = None,
    node_selector: Mapping[str, str] | None = None,
    pod_template: Mapping[str, Any] | None = None,
    run_policy: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    base: Path | None = None,
    **hyper: Any,
) -> FineTuneJob:
    """A validated FineTuneJob. `task` defaults to sequence-classification when num_labels is given,
    else causal-lm. Hyperparameters are keywords by their snake_case names (max_steps=, learning_rate=)."""
    kind = FINETUNEJOB
    _check_name(kind, name)
    task = task or (SEQUENCE_CLASSIFICATION if num_labels is not None else CAUSAL_LM)
    dataset_fields = {
        "format": dataset_format,
        "type": dataset_type,
        "textField": text_field,
        "labelField": label_field,
        "messagesField": messages_field,
        "promptField": prompt_field,
        "completionField": completion_field,
        "packing": packing,
        "validationSplit": validation_split,
    }
    spec: Manifest = {
        "model": _model(model, task, num_labels, init, model_config, tokenizer, base),
        "dataset": _dataset(dataset, dataset_fields, base),
    }
    if method is not None or lora is not None:
        meth: Manifest = {"type": method or "lora"}
        _put(meth, "lora", _camel(lora) if lora is not None else None)
        spec["method"] = meth
    if hyper:
        spec["hyperparameters"] = hyperparameters(hyper, kind, name)
    if strategy is not None or parallelism is not None:
        par = _camel(dict(parallelism or {}))
        _put(par, "strategy", strategy)
        spec["parallelism"] = par
    if output is not None:
        out: Manifest = {"storage": source_uri(output, base)}
        _put(out, "checkpointEverySteps", checkpoint_every_steps)
        spec["output"] = out
    _put(spec, "numNodes", num_nodes)
    _put(spec, "nprocPerNode", nproc_per_node)
    _pods(spec, resources, image, env, node_selector, pod_template)
    _put(spec, "runPolicy", _camel(run_policy) if run_policy else None)
    job: FineTuneJob = _validate(FineTuneJob, _document(kind, name, namespace, labels, spec))
    _check_task_rules(job)
    return job


def _check_task_rules(job: FineTuneJob) -> None:
    """The CRD's CEL rules that the pydantic models leave to the API server, checked before sending."""
    spec, bad = job.spec, {}
    model = spec.model
    scratch = model.init == "scratch"
    if model.task == SEQUENCE_CLASSIFICATION and model.num_labels is None:
        bad["spec.model.numLabels"] = "required when task is sequence-classification (num_labels=)"
    if model.source is None and not scratch:
        bad["spec.model.source"] = "required unless init is scratch (model=)"
    if scratch and model.config is None:
        bad["spec.model.config"] = "a Hugging Face config is required when init is scratch (model_config=)"
    if scratch and model.tokenizer is None:
        bad["spec.model.tokenizer"] = "required when init is scratch (tokenizer=)"
    if not scratch and model.config is not None:
        bad["spec.model.config"] = "only allowed when init is scratch (use pretrain())"
    if spec.model.task == CAUSAL_LM and spec.model.num_labels is not None:
        bad["spec.model.numLabels"] = "must not be set when task is causal-lm"
    if spec.model.task == CAUSAL_LM and spec.dataset.label_field is not None:
        bad["spec.dataset.labelField"] = "must not be set when task is causal-lm"
    if spec.method.lora is not None and spec.method.type != "lora":
        bad["spec.method.lora"] = "only allowed when method is lora"
    if bad:
        raise SpecError(FINETUNEJOB, job.metadata.name, bad)


def inferenceservice(
    name: str,
    *,
    fine_tune_job: str | None = None,
    source: str | None = None,
    namespace: str = "default",
    task: str | None = None,
    replicas: int | None = None,
    fine_tune_sweep: str | None = None,
    autoscaling: Mapping[str, Any] | None = None,
    batching: Mapping[str, Any] | None = None,
    runtime: str | None = None,
    generation: Mapping[str, Any] | None = None,
    canary: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    image: str | None = None,
    env: Mapping[str, str] | list[Manifest] | None = None,
    node_selector: Mapping[str, str] | None = None,
    pod_template: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> InferenceService:
    """A validated InferenceService serving a FineTuneJob's output (fine_tune_job=) or a model (source=)."""
    kind = INFERENCESERVICE
    _check_name(kind, name)
    if sum(x is not None for x in (fine_tune_job, fine_tune_sweep, source)) != 1:
        raise SpecError(
            kind, name, {"spec.model": "give exactly one of fine_tune_job=, fine_tune_sweep= and source="}
        )
    m: Manifest
    if fine_tune_job is not None:
        m = {"fineTuneJobRef": {"name": fine_tune_job}}
    elif fine_tune_sweep is not None:
        m = {"fineTuneSweepRef": {"name": fine_tune_sweep}}
    else:
        m = {"source": source_uri(str(source), base)}
    _put(m, "task", task)
    spec: Manifest = {"model": m}
    _put(spec, "replicas", replicas)
    _put(spec, "autoscaling", _camel(autoscaling) if autoscaling is not None else None)
    _put(spec, "batching", _camel(batching) if batching is not None else None)
    _put(spec, "runtime", runtime)
    _put(spec, "generation", _camel(generation) if generation is not None else None)
    _put(spec, "canary", _camel(canary) if canary is not None else None)
    _pods(spec, resources, image, env, node_selector, pod_template)
    isvc: InferenceService = _validate(InferenceService, _document(kind, name, namespace, labels, spec))
    return isvc


def _parameter(p: Any) -> Any:
    """A sweep parameter: a SweepParameter, or a mapping with snake_case or camelCase keys; a hyperparameter
    may be named by its snake_case keyword (learning_rate) as well as its CRD name (learningRate)."""
    if isinstance(p, BaseModel):
        return p.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
    if not isinstance(p, Mapping):
        return p  # the model says what is wrong with it, with its path
    out = _camel(dict(p))
    name = out.get("name")
    if isinstance(name, str) and name not in SWEEPABLE and to_camel(name) in SWEEPABLE:
        out["name"] = to_camel(name)
    return out


def _setting(value: str | Mapping[str, Any] | None, key: str) -> Manifest | None:
    """objective=, algorithm=, early_stopping=: a string (the metric or the type) or a mapping."""
    if value is None:
        return None
    if isinstance(value, str):
        return {key: to_camel(value) if key == "metric" and "_" in value else value}
    out: Manifest = _camel(dict(value))
    return out


def finetunesweep(
    name: str,
    *,
    template: FineTuneJob,
    parameters: list[Any],
    objective: str | Mapping[str, Any] | None = None,
    goal: str | None = None,
    algorithm: str | Mapping[str, Any] | None = None,
    seed: int | None = None,
    early_stopping: str | Mapping[str, Any] | None = None,
    max_trials: int | None = None,
    parallel_trials: int | None = None,
    max_failed_trials: int | None = None,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
) -> FineTuneSweep:
    """A validated FineTuneSweep whose trials are made from `template` (a FineTuneJob built by
    `finetunejob`: its spec, as set). objective: a metric (evalLoss, evalAccuracy, trainLoss) or
    {metric, goal}; goal= minimize|maximize; algorithm: tpe|random|grid or {type, seed}; early_stopping:
    none|median|asha or {type, min_steps}."""
    kind = FINETUNESWEEP
    _check_name(kind, name)
    if len(name) > SWEEP_NAME_MAX:
        raise SpecError(
            kind,
            name,
            {"metadata.name": f"at most {SWEEP_NAME_MAX} characters (its trials are named <name>-t<k>)"},
        )
    spec: Manifest = {
        "template": {"spec": manifest(template)["spec"]},
        "parameters": [_parameter(p) for p in parameters] if isinstance(parameters, list) else parameters,
    }
    obj = _setting(objective, "metric")
    if goal is not None:
        obj = {**(obj or {}), "goal": goal}
    _put(spec, "objective", obj)
    alg = _setting(algorithm, "type")
    if seed is not None:
        alg = {**(alg or {}), "seed": seed}
    _put(spec, "algorithm", alg)
    _put(spec, "earlyStopping", _setting(early_stopping, "type"))
    _put(spec, "maxTrials", max_trials)
    _put(spec, "parallelTrials", parallel_trials)
    _put(spec, "maxFailedTrials", max_failed_trials)
    sweep: FineTuneSweep = _validate(FineTuneSweep, _document(kind, name, namespace, labels, spec))
    return sweep
