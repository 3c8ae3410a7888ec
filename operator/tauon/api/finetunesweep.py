"""FineTuneSweep (tauon.dev/v1alpha1): a hyperparameter search whose trials are FineTuneJobs.

Each trial is a FineTuneJob `<sweep>-t<k>` made from `spec.template.spec` with the trial's parameters set
(see `SWEEPABLE` for the names a parameter may have) and its output under `<output.storage>/<trial>`.
The admission rules live here twice: as CEL (the API server checks them) and as pydantic validators
(`FineTuneSweepSpec`, which the operator and `tauon` check too, including what CEL cannot: that a range
fits the field it sets).
"""

from __future__ import annotations

import copy
import itertools
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from tauon.api.common import MAX_STR, NAME_MAX, Condition, KubeModel, ObjectMeta, StatusModel
from tauon.api.finetunejob import FineTuneJobSpec, Hyperparameters, LoraSpec, immutable_rules
from tauon.api.names import (
    API_VERSION,
    FINETUNESWEEP,
    SEQUENCE_CLASSIFICATION,
    ApiVersion,
    FineTuneSweepKind,
)

MAX_PARAMETERS = 16
MAX_VALUES = 64
MAX_TRIALS = 1000  # trial names end in -t0 .. -t999
# a trial's name (<sweep>-t<k>) is a FineTuneJob name: at most NAME_MAX characters
SWEEP_NAME_MAX = NAME_MAX - len(f"-t{MAX_TRIALS - 1}")
MAX_GRID = 10000

ParameterKind = Literal["float", "int", "categorical"]
Metric = Literal["evalLoss", "evalAccuracy", "trainLoss"]
EVAL_METRICS: tuple[Metric, ...] = ("evalLoss", "evalAccuracy")


def _kind_of(annotation: Any) -> ParameterKind:
    """What a model field can be swept as: int, float, or only from values (Literal, str)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    return "categorical"


def _sweepable() -> dict[str, tuple[tuple[str, ...], ParameterKind]]:
    """Parameter name -> (path in the FineTuneJob spec, what it can be swept as)."""
    out: dict[str, tuple[tuple[str, ...], ParameterKind]] = {}
    for field_name, info in Hyperparameters.model_fields.items():
        alias = info.alias or field_name
        entry = (("hyperparameters", alias), _kind_of(info.annotation))
        out[alias] = entry
        out[f"hyperparameters.{alias}"] = entry
    for field_name, info in LoraSpec.model_fields.items():
        if get_origin(info.annotation) is list:
            continue  # targetModules: lists are not swept
        alias = info.alias or field_name
        out[f"method.lora.{alias}"] = (("method", "lora", alias), _kind_of(info.annotation))
    out["method.lora.rank"] = out["method.lora.r"]  # the design's name for LoRA's rank
    return out


# name -> (path in the FineTuneJob spec, kind)
SWEEPABLE: dict[str, tuple[tuple[str, ...], ParameterKind]] = _sweepable()

PARAMETER_NAMES_DOC = (
    "A field of the template: a `hyperparameters` field by its camelCase name (learningRate, or "
    "hyperparameters.learningRate), or method.lora.<field> (r, alias method.lora.rank; alpha; dropout; "
    "needs template method.type lora)."
)

NAME_ENUM: Any = {"enum": sorted(SWEEPABLE)}

# a value: a number or a string. The item stays untyped in the CRD (a structural schema cannot type a union,
# and the API server gives CEL no declaration for an untyped node), so no CEL rule reads `values`: its
# rules are checked by the models (the operator fails a sweep that breaks them with InvalidSpec).
VALUE_SCHEMA: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
Value = Annotated[StrictInt | StrictFloat | StrictStr, WithJsonSchema(VALUE_SCHEMA)]


class SweepParameter(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type != 'categorical' || (!has(self.min) && !has(self.max))",
                    "message": "a categorical parameter has values, not min and max",
                },
                {
                    "rule": "has(self.min) == has(self.max)",
                    "message": "a parameter has either values, or min and max",
                },
                {
                    "rule": "!has(self.min) || !has(self.max) || self.min < self.max",
                    "message": "a parameter's min must be less than its max",
                },
                {
                    "rule": "!has(self.log) || !self.log || (has(self.min) && self.min > 0.0)",
                    "message": "log needs a range (min and max) with min > 0",
                },
            ]
        }
    )

    name: str = Field(
        description=PARAMETER_NAMES_DOC,
        max_length=MAX_STR,
        json_schema_extra=NAME_ENUM,
    )
    type: ParameterKind = Field(
        description=(
            "float or int: a range (min, max, log) or a list of values; categorical: values (numbers or "
            "strings, e.g. a precision)."
        )
    )
    min: float | None = Field(default=None, description="Lower bound (inclusive), with max.")
    max: float | None = Field(default=None, description="Upper bound (inclusive), with min.")
    log: bool = Field(default=False, description="Sample the range on a log scale; needs min > 0.")
    values: list[Value] | None = Field(
        default=None,
        description="The values to choose from (instead of min and max).",
        min_length=1,
        max_length=MAX_VALUES,
    )

    @model_validator(mode="after")
    def _shape(self) -> SweepParameter:
        if self.type == "categorical" and self.values is None:
            raise ValueError(f"parameter {self.name}: a categorical parameter needs values")
        if (self.values is None) == (self.min is None or self.max is None) or (
            self.values is not None and (self.min is not None or self.max is not None)
        ):
            raise ValueError(f"parameter {self.name}: set either values, or min and max")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"parameter {self.name}: min must be less than max")
        if self.log and (self.min is None or self.min <= 0):
            raise ValueError(f"parameter {self.name}: log needs a range with min > 0")
        if self.type == "int" and self.values is None and not (_integral(self.min) and _integral(self.max)):
            raise ValueError(f"parameter {self.name}: an int range needs integer min and max")
        if self.type in ("int", "float") and any(isinstance(v, str) for v in self.values or []):
            raise ValueError(f"parameter {self.name}: values of a {self.type} parameter are numbers")
        if self.type == "int" and not all(_integral(v) for v in self.values or []):
            raise ValueError(f"parameter {self.name}: values of an int parameter are integers")
        if self.values is not None and len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"parameter {self.name}: values must be distinct")
        return self

    def candidates(self) -> list[Any]:
        """The values admission tries on the template: the bounds of a range, or every value."""
        if self.values is not None:
            return list(self.values)
        lo, hi = self.min, self.max
        return [int(lo), int(hi)] if self.type == "int" else [lo, hi]  # type: ignore[arg-type]

    def grid(self) -> list[Any] | None:
        """Every value of a finite parameter (values, or an int range), in order; None when infinite."""
        if self.values is not None:
            return list(self.values)
        if self.type == "int" and self.min is not None and self.max is not None:
            return list(range(int(self.min), int(self.max) + 1))
        return None


def _integral(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer()


class SweepTemplate(KubeModel):
    spec: FineTuneJobSpec = Field(
        description=(
            "A FineTuneJob spec: every trial is a FineTuneJob made from it, with the trial's parameters set "
            "and output.storage extended by /<trial name>."
        )
    )


class Objective(KubeModel):
    metric: Metric = Field(
        default="evalLoss",
        description=(
            "The final metric of a trial (its FineTuneJob's status.output.metrics) to optimise: evalLoss, "
            "evalAccuracy (sequence-classification only) or trainLoss. evalLoss and evalAccuracy need "
            "dataset.validationSplit > 0. A trial that succeeds without it counts as failed."
        ),
    )
    goal: Literal["minimize", "maximize"] = Field(default="minimize", description="minimize or maximize.")


class Algorithm(KubeModel):
    type: Literal["tpe", "random", "grid"] = Field(
        default="tpe",
        description=(
            "tpe: Optuna's TPE sampler (random for the first 10 trials); random: Optuna's random sampler; "
            "grid: every combination of the parameters' values in order (first parameter slowest), "
            "needs finite parameters (values, or int ranges), ends early when the grid is covered."
        ),
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the sampler: the same sweep and the same finished trials sample the same parameters.",
    )


class EarlyStopping(KubeModel):
    type: Literal["none", "median", "asha"] = Field(
        default="none",
        description=(
            "none: every trial runs to its end. median: Optuna's MedianPruner, a running trial whose best "
            "intermediate objective so far is worse than the median of the succeeded trials at the same "
            "step is pruned. asha: Optuna's SuccessiveHalvingPruner (asynchronous successive halving, "
            "reduction factor 3, rungs at minSteps, 3*minSteps, 9*minSteps, ...): a trial not in the best "
            "third of the trials at a rung is pruned. The intermediate objective is the metric of the "
            "trial's status.progress.evaluations, so the trials must evaluate periodically: the template "
            "(or a parameter) must set hyperparameters.evalEverySteps."
        ),
    )
    min_steps: int = Field(
        default=1,
        ge=1,
        description=(
            "Optimizer steps a trial runs before it may be pruned (median: the pruner's warmup steps; "
            "asha: the first rung)."
        ),
    )
    min_trials: int = Field(
        default=3,
        ge=1,
        le=MAX_TRIALS,
        description=(
            "median: succeeded trials (with an evaluation at the step judged) needed before the rule "
            "prunes anything. asha ignores it."
        ),
    )


EVAL_EVERY_STEPS = ("hyperparameters", "evalEverySteps")
EARLY_STOPPING_NEEDS_EVAL = (
    "spec.earlyStopping needs periodic evaluations: set spec.template.spec.hyperparameters.evalEverySteps "
    "(or sweep it as a parameter)"
)


IMMUTABLE_SWEEP_FIELDS = ["parameters", "objective", "algorithm"]


class FineTuneSweepSpec(KubeModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.parallelTrials <= self.maxTrials",
                    "message": "spec.parallelTrials must not exceed spec.maxTrials",
                },
                {
                    "rule": (
                        "!has(self.algorithm) || !has(self.algorithm.type) || self.algorithm.type != 'grid' || "
                        "self.parameters.all(p, p.type == 'int' || !has(p.min))"
                    ),
                    "message": "algorithm grid needs finite parameters: values, or int ranges",
                },
                {
                    "rule": (
                        "!has(self.objective) || !has(self.objective.metric) || "
                        "self.objective.metric != 'evalAccuracy' || "
                        f"self.template.spec.model.task == '{SEQUENCE_CLASSIFICATION}'"
                    ),
                    "message": "objective evalAccuracy needs template task sequence-classification",
                },
                {
                    "rule": (
                        "!has(self.objective) || !has(self.objective.metric) || "
                        "self.objective.metric == 'trainLoss' || "
                        "!has(self.template.spec.dataset.validationSplit) || "
                        "self.template.spec.dataset.validationSplit > 0.0"
                    ),
                    "message": "objectives evalLoss and evalAccuracy need template dataset.validationSplit > 0",
                },
                {
                    "rule": (
                        "self.parameters.all(p, !p.name.startsWith('method.lora.') || "
                        "(has(self.template.spec.method) && has(self.template.spec.method.type) && "
                        "self.template.spec.method.type == 'lora'))"
                    ),
                    "message": "method.lora.* parameters need template method.type lora",
                },
                {
                    "rule": (
                        "!has(self.earlyStopping) || !has(self.earlyStopping.type) || "
                        "self.earlyStopping.type == 'none' || "
                        "(has(self.template.spec.hyperparameters) && "
                        "has(self.template.spec.hyperparameters.evalEverySteps)) || "
                        "self.parameters.exists(p, p.name == 'evalEverySteps' || "
                        "p.name == 'hyperparameters.evalEverySteps')"
                    ),
                    "message": EARLY_STOPPING_NEEDS_EVAL,
                },
                *immutable_rules(IMMUTABLE_SWEEP_FIELDS, "spec"),
            ]
        }
    )

    template: SweepTemplate = Field(description="The FineTuneJob every trial is made from.")
    parameters: list[SweepParameter] = Field(
        description="The search space: the fields each trial sets (immutable).",
        min_length=1,
        max_length=MAX_PARAMETERS,
    )
    objective: Objective = Field(
        default_factory=Objective, description="What the search optimises (immutable)."
    )
    algorithm: Algorithm = Field(
        default_factory=Algorithm, description="How parameters are sampled (immutable)."
    )
    early_stopping: EarlyStopping = Field(
        default_factory=EarlyStopping,
        description=(
            "Pruning of unpromising trials by their intermediate objective (status.progress.evaluations); "
            "needs hyperparameters.evalEverySteps."
        ),
    )
    max_trials: int = Field(
        default=10, ge=1, le=MAX_TRIALS, description="Trials to run in all (failed and pruned ones count)."
    )
    parallel_trials: int = Field(
        default=1, ge=1, le=MAX_TRIALS, description="Trials running at once, at most maxTrials."
    )
    max_failed_trials: int = Field(
        default=3,
        ge=1,
        le=MAX_TRIALS,
        description="Failed trials at which the sweep fails (TooManyFailedTrials) and its running trials are deleted.",
    )

    @model_validator(mode="after")
    def _admission(self) -> FineTuneSweepSpec:
        if self.parallel_trials > self.max_trials:
            raise ValueError("parallelTrials must not exceed maxTrials")
        task = self.template.spec.model.task
        if self.objective.metric == "evalAccuracy" and task != SEQUENCE_CLASSIFICATION:
            raise ValueError(f"objective evalAccuracy needs task sequence-classification (template: {task})")
        if self.objective.metric in EVAL_METRICS and self.template.spec.dataset.validation_split <= 0:
            raise ValueError(f"objective {self.objective.metric} needs dataset.validationSplit > 0")
        paths = [check_parameter(self.template.spec, p) for p in self.parameters]
        if len(set(paths)) != len(paths):
            raise ValueError("two parameters set the same field")
        if self.early_stopping.type != "none" and not evaluates_periodically(self):
            raise ValueError(EARLY_STOPPING_NEEDS_EVAL)
        if self.algorithm.type == "grid":
            size = grid_size(self.parameters)
            if size is None:
                raise ValueError("algorithm grid needs finite parameters: values, or int ranges")
            if size > MAX_GRID:
                raise ValueError(f"the grid has {size} points, more than {MAX_GRID}")
        return self


def evaluates_periodically(spec: FineTuneSweepSpec) -> bool:
    """Whether every trial sets hyperparameters.evalEverySteps: the template does, or a parameter."""
    if template_dict(spec.template.spec).get("hyperparameters", {}).get("evalEverySteps") is not None:
        return True
    return any(p.name in SWEEPABLE and SWEEPABLE[p.name][0] == EVAL_EVERY_STEPS for p in spec.parameters)


def check_parameter(template: FineTuneJobSpec, p: SweepParameter) -> tuple[str, ...]:
    """The path a parameter sets; raises ValueError when it cannot set it (unknown name, wrong type, a value
    the field refuses)."""
    if p.name not in SWEEPABLE:
        raise ValueError(f"parameter {p.name}: not a sweepable field ({PARAMETER_NAMES_DOC})")
    path, kind = SWEEPABLE[p.name]
    if path[0] == "method" and template.method.type != "lora":
        raise ValueError(f"parameter {p.name}: needs template method.type lora")
    if kind == "categorical" and p.type != "categorical":
        raise ValueError(f"parameter {p.name}: a {kind} field is swept with type categorical")
    if kind == "int" and p.type == "float":
        raise ValueError(f"parameter {p.name}: an integer field is swept with type int or categorical")
    base = template_dict(template)
    for value in p.candidates():
        try:
            FineTuneJobSpec.model_validate(apply_parameters(base, {p.name: value}))
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"parameter {p.name}: {value!r} is not a valid value: {first['msg']}") from None
    return path


def template_dict(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The template as the user wrote it (camelCase; defaults left out, as a FineTuneJob would be)."""
    return spec.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


def apply_parameters(spec: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (dumped, camelCase) FineTuneJob spec with each parameter's field set."""
    out = copy.deepcopy(spec)
    for name, value in parameters.items():
        path, kind = SWEEPABLE[name]
        node = out
        for key in path[:-1]:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[path[-1]] = int(value) if kind == "int" and _integral(value) else value
    return out


def grid_size(parameters: list[SweepParameter]) -> int | None:
    size = 1
    for p in parameters:
        values = p.grid()
        if values is None:
            return None
        size *= len(values)
    return size


def grid_point(parameters: list[SweepParameter], k: int) -> dict[str, Any] | None:
    """The k-th point of the grid (first parameter slowest), or None past its end."""
    grids = [p.grid() or [] for p in parameters]
    total = 1
    for g in grids:
        total *= len(g)
    if k >= total:
        return None
    point = next(itertools.islice(itertools.product(*grids), k, None))
    return {p.name: v for p, v in zip(parameters, point, strict=True)}


class SweepTrial(StatusModel):
    name: str = Field(description="The trial's FineTuneJob (<sweep>-t<k>).")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="The parameters the trial was created with.",
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"] = Field(
        default="Pending",
        description=(
            "Pending, Running, Succeeded, Failed or Pruned (stopped by spec.earlyStopping; not a failure). "
            "A trial the rule stopped shows Running until its FineTuneJob ended."
        ),
    )
    objective: float | None = Field(default=None, description="The objective metric, once it succeeded.")
    step: int | None = Field(default=None, description="Optimizer steps the trial reported.")
    intermediate: float | None = Field(
        default=None,
        description="The objective metric of the trial's last periodic evaluation (status.progress.evaluations).",
    )
    intermediate_step: int | None = Field(default=None, description="The optimizer step of that evaluation.")
    message: str | None = Field(
        default=None, description="Why it failed, or why the early-stopping rule stopped it."
    )


class SweepBest(StatusModel):
    trial: str | None = Field(default=None, description="The best trial so far.")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Its parameters.",
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    objective: float | None = Field(default=None, description="Its objective metric.")
    model: str | None = Field(default=None, description="Its final model location (status.output.model).")


class FineTuneSweepStatus(StatusModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = Field(
        default="Pending", description="Summary derived from conditions; for display only."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Running, Succeeded, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="Generation the status describes.")
    trials: list[SweepTrial] = Field(default_factory=list, description="Every trial created, by index.")
    finished_trials: int = Field(default=0, description="Trials that ended (succeeded, failed or pruned).")
    best: SweepBest | None = Field(default=None, description="The best succeeded trial so far.")


class FineTuneSweep(KubeModel):
    model_config = ConfigDict(extra="ignore")

    api_version: ApiVersion = Field(default=API_VERSION, description="API version.")
    kind: FineTuneSweepKind = Field(default=FINETUNESWEEP, description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: FineTuneSweepSpec = Field(description="The search.")
    status: FineTuneSweepStatus = Field(default_factory=FineTuneSweepStatus, description="Observed state.")
