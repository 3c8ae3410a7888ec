"""Parse and validate the job configuration (``/etc/tauon/job.json``, written by the operator).

The file is camelCase JSON (see trainer_image/README.md). The operator fills every default, but the
trainer applies docs/api.md's defaults itself too, so a hand-written file may leave keys out. Anything wrong
raises ``PermanentError("InvalidConfig", <message naming the field>)``. Unknown keys are ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from tauon_core.errors import INVALID_CONFIG, PermanentError

TASKS = ("sequence-classification", "causal-lm")
METHODS = ("full", "lora")
FORMATS = ("jsonl", "csv", "parquet")


def format_of(path: str) -> str:
    """The format a path implies when ``dataset.format`` is not set."""
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    return "csv" if name.endswith(".csv") else "jsonl"


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INITS = ("pretrained", "scratch")
DATASET_TYPES = ("text", "chat", "prompt-completion")
STRATEGIES = ("auto", "ddp", "fsdp")
COMPILE_MODES = ("auto", "true", "false")  # parallelism.compile: "auto", true or false
MAX_EVAL_EVERY_STEPS = 2**31 - 1  # hyperparameters.evalEverySteps, as the API bounds it

Json = dict[str, object]  # a JSON object as json.loads returns it


@dataclass(frozen=True)
class ModelConfig:
    source: str
    path: str  # absolute local directory, or hf://ORG/NAME; "" with init scratch and no source
    task: str
    num_labels: int | None
    init: str = "pretrained"  # pretrained | scratch (random weights from ``config``)
    config: Json | None = None  # scratch: a Hugging Face config (free-form)
    tokenizer_source: str = ""  # model.tokenizer as written in the spec ("" -> the model's)
    tokenizer_path: str = ""  # local directory or hf:// of the tokenizer ("" -> ``path``)


@dataclass(frozen=True)
class DatasetConfig:
    source: str
    path: str  # absolute local file or directory of shards, or an s3:// object or prefix
    format: str
    text_field: str
    label_field: str | None
    validation_split: float
    type: str = "text"  # text | chat | prompt-completion (the last two: causal-lm only)
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    packing: bool = False  # causal-lm: pack examples into maxSeqLength blocks, no cross-example attention
    # causal-lm: where tokenized shards are kept (dataset.cache.storage: s3:// or a local directory);
    # "" means the default, <output.path>/data-cache (data.default_cache_root)
    cache_storage: str = ""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: peft's default for the architecture


@dataclass(frozen=True)
class MethodConfig:
    type: str = "full"
    lora: LoraConfig | None = None


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 3
    max_steps: int | None = None
    batch_size_per_device: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_seq_length: int = 128
    precision: str = "auto"
    seed: int = 42
    eval_every_steps: int | None = None  # evaluate every N optimizer steps (None: only initial and final)


@dataclass(frozen=True)
class OutputConfig:
    storage: str
    path: str  # absolute local directory
    checkpoint_every_steps: int = 200


@dataclass(frozen=True)
class ParallelismConfig:
    strategy: str = "auto"  # auto | ddp | fsdp
    activation_checkpointing: bool = False
    compile: str = "auto"  # auto | true | false (torch.compile per transformer block; auto: on CUDA)


@dataclass(frozen=True)
class JobConfig:
    name: str
    namespace: str
    model: ModelConfig
    dataset: DatasetConfig
    method: MethodConfig
    hyperparameters: Hyperparameters
    output: OutputConfig
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    uid: str = ""  # the FineTuneJob's metadata.uid (owner of the output); "" for hand-written files
    attempt: int = 0  # the gang attempt (fences writers of the output)
    raw: Json = field(default_factory=dict, compare=False, repr=False)


# --- small typed getters that name the field on error ------------------------------------------


def _fail(where: str, what: str, got: object) -> PermanentError:
    return PermanentError(INVALID_CONFIG, f"{where} {what} (got {json.dumps(got, default=str)})")


def _section(d: Json, key: str, where: str, required: bool = True) -> Json:
    v = d.get(key)
    if v is None:
        if required:
            raise PermanentError(INVALID_CONFIG, f"{where}{key} is required")
        return {}
    if not isinstance(v, dict):
        raise _fail(f"{where}{key}", "must be an object", v)
    return v


def _str(d: Json, key: str, where: str, default: str | None = None, required: bool = False) -> str | None:
    v = d.get(key, None)
    if v is None:
        if required and default is None:
            raise PermanentError(INVALID_CONFIG, f"{where}{key} is required")
        return default
    if not isinstance(v, str) or not v.strip():
        raise _fail(f"{where}{key}", "must be a non-empty string", v)
    return v


def _int(
    d: Json,
    key: str,
    where: str,
    default: int | None,
    lo: int | None = None,
    hi: int | None = None,
    nullable: bool = False,
) -> int | None:
    v = d.get(key, None)
    if v is None:
        if nullable:
            return None
        if default is None:
            raise PermanentError(INVALID_CONFIG, f"{where}{key} is required")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise _fail(f"{where}{key}", "must be an integer", v)
    v = int(v)
    if lo is not None and v < lo:
        raise _fail(f"{where}{key}", f"must be >= {lo}", v)
    if hi is not None and v > hi:
        raise _fail(f"{where}{key}", f"must be <= {hi}", v)
    return v


def _float(
    d: Json,
    key: str,
    where: str,
    default: float,
    lo: float,
    hi: float,
    lo_open: bool = False,
    hi_open: bool = True,
) -> float:
    v = d.get(key, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise _fail(f"{where}{key}", "must be a number", v)
    v = float(v)
    if (v <= lo) if lo_open else (v < lo):
        raise _fail(f"{where}{key}", f"must be {'>' if lo_open else '>='} {lo:g}", v)
    if (v >= hi) if hi_open else (v > hi):
        raise _fail(f"{where}{key}", f"must be {'<' if hi_open else '<='} {hi:g}", v)
    return v


def _bool(d: Json, key: str, where: str, default: bool) -> bool:
    v = d.get(key, None)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _fail(f"{where}{key}", "must be true or false", v)
    return v


def _enum(d: Json, key: str, where: str, choices: tuple[str, ...], default: str | None) -> str:
    v = d.get(key, None)
    if v is None:
        if default is None:
            raise PermanentError(INVALID_CONFIG, f"{where}{key} is required (one of {', '.join(choices)})")
        return default
    if v not in choices:
        raise _fail(f"{where}{key}", f"must be one of {', '.join(choices)}", v)
    return str(v)


def local_path(path: str | None, source: str | None, where: str) -> str:
    """Map the operator's resolved ``path`` (or, when absent, a file:// ``source``) to a local path."""
    p = path or source
    if not p:
        raise PermanentError(INVALID_CONFIG, f"{where}.path is required")
    if p.startswith("file://"):
        p = p[len("file://") :]
        return os.path.abspath(p)
    if p.startswith("pvc://"):
        raise PermanentError(
            INVALID_CONFIG, f"{where}.path must be a local path (the operator maps {p} to a mount), got {p}"
        )
    if "://" in p:
        return p  # hf:// for models: resolved later
    return os.path.abspath(p)


# --- the parser: one helper per section, in the order the errors are reported ---------------------


def parse_config(data: object) -> JobConfig:
    if not isinstance(data, dict):
        raise _fail("job config", "must be a JSON object", type(data).__name__)
    model_d = _section(data, "model", "")
    ds_d = _section(data, "dataset", "")
    method_d = _section(data, "method", "", required=False)
    hp_d = _section(data, "hyperparameters", "", required=False)
    out_d = _section(data, "output", "")

    model = _model(model_d)
    dataset = _dataset(ds_d, model.task)
    method = _method(method_d)
    hp = _hyperparameters(hp_d)
    output = _output(out_d)
    parallelism = _parallelism(_section(data, "parallelism", "", required=False))
    if model.init == "scratch" and method.type == "lora":
        raise PermanentError(INVALID_CONFIG, "method.type lora is not allowed with model.init: scratch")

    return JobConfig(
        name=_str(data, "name", "", default="job") or "job",
        namespace=_str(data, "namespace", "", default="default") or "default",
        model=model,
        dataset=dataset,
        method=method,
        hyperparameters=hp,
        output=output,
        parallelism=parallelism,
        uid=_str(data, "uid", "", default="") or "",
        attempt=_int(data, "attempt", "", 0, lo=0) or 0,
        raw=data,
    )


def _model(model_d: Json) -> ModelConfig:
    task = _enum(model_d, "task", "model.", TASKS, None)
    num_labels = _int(model_d, "numLabels", "model.", None, lo=2, hi=100_000, nullable=True)
    if task == "sequence-classification" and num_labels is None:
        raise PermanentError(INVALID_CONFIG, "model.numLabels is required (>= 2) for sequence-classification")
    if task == "causal-lm" and num_labels is not None:
        raise PermanentError(INVALID_CONFIG, "model.numLabels must not be set for causal-lm")
    init = _enum(model_d, "init", "model.", INITS, "pretrained")
    model_source = _str(model_d, "source", "model.", default="")
    model_config = model_d.get("config")
    if init == "scratch":
        if not isinstance(model_config, dict) or not model_config:
            raise _fail(
                "model.config",
                "must be a non-empty object (a Hugging Face config) with init scratch",
                model_config,
            )
    elif model_config is not None:
        raise PermanentError(INVALID_CONFIG, "model.config is only allowed with model.init: scratch")
    tok_source = _str(model_d, "tokenizer", "model.", default="") or ""
    tok_path_raw = _str(model_d, "tokenizerPath", "model.")
    if init == "scratch" and not (tok_source or tok_path_raw):
        raise PermanentError(INVALID_CONFIG, "model.tokenizer is required with model.init: scratch")
    path = (
        local_path(_str(model_d, "path", "model."), model_source, "model")
        if (model_source or model_d.get("path") or init == "pretrained")
        else ""
    )
    tok_path = local_path(tok_path_raw, tok_source, "model.tokenizer") if (tok_source or tok_path_raw) else ""
    return ModelConfig(
        source=model_source or "",
        path=path,
        task=task,
        num_labels=num_labels,
        init=init,
        config=model_config if isinstance(model_config, dict) and init == "scratch" else None,
        tokenizer_source=tok_source,
        tokenizer_path=tok_path,
    )


def _dataset(ds_d: Json, task: str) -> DatasetConfig:
    ds_source = _str(ds_d, "source", "dataset.", default="")
    ds_path = local_path(_str(ds_d, "path", "dataset."), ds_source, "dataset")
    if "://" in ds_path and not ds_path.startswith("s3://"):
        raise PermanentError(
            INVALID_CONFIG, f"dataset.path must be a local file or directory or s3://, got {ds_path}"
        )
    default_format = format_of(ds_path)
    label_field = _str(ds_d, "labelField", "dataset.", default="label")
    dataset = DatasetConfig(
        source=ds_source or "",
        path=ds_path,
        format=_enum(ds_d, "format", "dataset.", FORMATS, default_format),
        text_field=_str(ds_d, "textField", "dataset.", default="text") or "text",
        # causal-lm trains on the text only; a label field (forbidden by the API) is ignored here.
        label_field=label_field if task == "sequence-classification" else None,
        validation_split=_float(ds_d, "validationSplit", "dataset.", 0.1, 0.0, 1.0),
        type=_enum(ds_d, "type", "dataset.", DATASET_TYPES, "text"),
        messages_field=_str(ds_d, "messagesField", "dataset.", default="messages") or "messages",
        prompt_field=_str(ds_d, "promptField", "dataset.", default="prompt") or "prompt",
        completion_field=_str(ds_d, "completionField", "dataset.", default="completion") or "completion",
        packing=_bool(ds_d, "packing", "dataset.", False),
        cache_storage=_dataset_cache(ds_d),
    )
    if task != "causal-lm" and (dataset.type != "text" or dataset.packing):
        raise PermanentError(
            INVALID_CONFIG,
            "dataset.type chat/prompt-completion and dataset.packing need model.task causal-lm",
        )
    return dataset


def _dataset_cache(ds_d: Json) -> str:
    """``dataset.cache``: ``storage`` (s3://, file:// or a local path) or ``path`` (the local directory the
    operator mounted it at, which wins); "" when absent (the default under the output)."""
    cache_d = ds_d.get("cache")
    if cache_d is None:
        return ""
    if not isinstance(cache_d, dict):
        raise _fail("dataset.cache", "must be an object", cache_d)
    storage = _str(cache_d, "storage", "dataset.cache.", default="")
    path = _str(cache_d, "path", "dataset.cache.", default="")
    if not storage and not path:
        return ""
    resolved = local_path(path, storage, "dataset.cache")
    if "://" in resolved and not resolved.startswith("s3://"):
        raise PermanentError(
            INVALID_CONFIG, f"dataset.cache.storage must be s3://, file:// or a local path, got {resolved}"
        )
    return resolved


def _method(method_d: Json) -> MethodConfig:
    mtype = _enum(method_d, "type", "method.", METHODS, "full")
    lora_d = method_d.get("lora")
    if mtype == "full" and lora_d is not None:
        raise PermanentError(INVALID_CONFIG, "method.lora is only allowed when method.type is lora")
    return MethodConfig(type=mtype, lora=_lora({} if lora_d is None else lora_d) if mtype == "lora" else None)


def _lora(lora_d: object) -> LoraConfig:
    if not isinstance(lora_d, dict):
        raise _fail("method.lora", "must be an object", lora_d)
    tm = lora_d.get("targetModules")
    if tm is not None:
        if not isinstance(tm, list) or not tm or not all(isinstance(x, str) and x for x in tm):
            raise _fail("method.lora.targetModules", "must be a non-empty list of module names", tm)
        tm = tuple(tm)
    return LoraConfig(
        r=_int(lora_d, "r", "method.lora.", 8, lo=1, hi=4096) or 8,
        alpha=_int(lora_d, "alpha", "method.lora.", 16, lo=1, hi=1_000_000) or 16,
        dropout=_float(lora_d, "dropout", "method.lora.", 0.05, 0.0, 1.0),
        target_modules=tm,
    )


def _hyperparameters(hp_d: Json) -> Hyperparameters:
    w = "hyperparameters."
    return Hyperparameters(
        epochs=_int(hp_d, "epochs", w, 3, lo=1, hi=1_000_000) or 3,
        max_steps=_int(hp_d, "maxSteps", w, None, lo=1, nullable=True),
        batch_size_per_device=_int(hp_d, "batchSizePerDevice", w, 16, lo=1, hi=1_000_000) or 16,
        gradient_accumulation_steps=_int(hp_d, "gradientAccumulationSteps", w, 1, lo=1, hi=1_000_000) or 1,
        learning_rate=_float(hp_d, "learningRate", w, 5e-5, 0.0, 1.0, lo_open=True),
        weight_decay=_float(hp_d, "weightDecay", w, 0.0, 0.0, math.inf),
        warmup_ratio=_float(hp_d, "warmupRatio", w, 0.0, 0.0, 1.0),
        max_seq_length=_int(hp_d, "maxSeqLength", w, 128, lo=8, hi=32768) or 128,
        precision=_enum(hp_d, "precision", w, PRECISIONS, "auto"),
        seed=_int(hp_d, "seed", w, 42, lo=0, hi=2**32 - 1) or 0,
        eval_every_steps=_int(hp_d, "evalEverySteps", w, None, lo=1, hi=MAX_EVAL_EVERY_STEPS, nullable=True),
    )


def _output(out_d: Json) -> OutputConfig:
    out_source = _str(out_d, "storage", "output.", default="")
    out_path = local_path(_str(out_d, "path", "output."), out_source, "output")
    if "://" in out_path and not out_path.startswith("s3://"):  # s3://: checked by output.check_output_path
        raise PermanentError(
            INVALID_CONFIG, f"output.path must be a local directory or s3://bucket/prefix, got {out_path}"
        )
    return OutputConfig(
        storage=out_source or "",
        path=out_path,
        checkpoint_every_steps=_int(out_d, "checkpointEverySteps", "output.", 200, lo=1) or 200,
    )


def _parallelism(par_d: Json) -> ParallelismConfig:
    return ParallelismConfig(
        strategy=_enum(par_d, "strategy", "parallelism.", STRATEGIES, "auto"),
        activation_checkpointing=_bool(par_d, "activationCheckpointing", "parallelism.", False),
        compile=_compile(par_d),
    )


def _compile(par_d: Json) -> str:
    """``parallelism.compile``: true, false or "auto" (the strings "true" and "false" are accepted too)."""
    v = par_d.get("compile")
    if v is None:
        return "auto"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v not in COMPILE_MODES:
        raise _fail("parallelism.compile", "must be true, false or auto", v)
    return str(v)


def load_config(path: str) -> JobConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PermanentError(INVALID_CONFIG, f"config file {path} not found") from None
    except OSError as e:
        raise PermanentError(INVALID_CONFIG, f"config file {path} unreadable: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PermanentError(INVALID_CONFIG, f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    return parse_config(data)
