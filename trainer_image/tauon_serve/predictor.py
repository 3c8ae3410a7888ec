"""The predictor interface of the model server, and the task of a model directory.

A :class:`Predictor` is one loaded model as the protocols see it: texts in, one result per text out
(:class:`~tauon_serve.protocol.Classification` or :class:`~tauon_serve.protocol.Generation`), its V2
output schema, and its life cycle (warm up in the worker thread, start on the event loop, drain, close).
Two back-ends implement it, as KServe's model servers implement ``Model``:

* :class:`tauon_serve.classifier.SequenceClassifier`: a Hugging Face sequence classifier behind the
  dynamic batcher (:mod:`tauon_serve.batching`);
* :class:`tauon_serve.llm.CausalLM`: a Hugging Face causal LM behind the continuous-batching engine
  (:mod:`tauon_serve.generation`); it also serves the OpenAI API (``openai``).

The server state and the route modules talk to this interface only, so nothing outside the back-ends
branches on the task. :func:`tauon_serve.loading.load_predictor` builds the right one for a model.

``resolve_model_source`` and ``detect_task`` are import-light; nothing here imports torch, so that
``serve --help`` and argument errors stay fast. An ``s3://`` model is only checked for its form here (the
fail-fast check before the socket listens); :func:`tauon_serve.loading.model_path` downloads it
(:mod:`tauon_serve.download`) in the inference thread, after the socket listens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from tauon_core.sources import INVALID_SOURCE, ModelSourceError, resolve_source

from .protocol import TensorSpec

if TYPE_CHECKING:
    from .llm import LLMService
    from .metrics import ServerMetrics

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)


class Predictor(ABC):
    """One served model. Methods marked "worker thread" run on the server's single inference thread;
    the others on the event loop."""

    task: str
    schema: tuple[TensorSpec, ...]  # the V2 outputs, in default order
    labels: list[str]  # label names by index (classification); [] for other tasks
    openai: LLMService | None = None  # the OpenAI API over this model, once started (causal LMs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.schema)

    @abstractmethod
    def warm_up(self) -> None:
        """Worker thread, before readiness: one small pass, so first-call allocations happen here."""

    @abstractmethod
    def start(self, executor: Executor, metrics: ServerMetrics) -> None:
        """Start taking work; ``executor`` is the single inference thread the model was loaded in."""

    @abstractmethod
    def begin_drain(self) -> None:
        """Shutdown has begun: run what is queued without waiting for more."""

    @abstractmethod
    async def close(self, grace_seconds: float) -> None:
        """Finish queued and running work (within ``grace_seconds`` where that is bounded), then stop."""

    @abstractmethod
    def check_inputs(self, texts: Sequence[str], where: Callable[[int], str]) -> None:
        """Refuse texts this model cannot take (RequestError 400); ``where(i)`` names text i."""

    @abstractmethod
    async def infer(self, texts: list[str]) -> Sequence[Any]:
        """One result per text, in order. RequestError 503 when overloaded or shutting down, 500 when
        the model failed."""

    @abstractmethod
    def describe(self) -> str:
        """How the model is batched, for the "ready" log line."""

    def health_error(self) -> str | None:
        """Why this model can no longer serve (the liveness probe fails with it), or None when healthy.
        Called on the event loop; must be cheap and must not block."""
        return None


def resolve_model_source(source: str) -> str:
    """Map ``--model`` to something ``from_pretrained`` accepts (a directory or a hub repo id), offline.
    See ``tauon_core.sources``; raises ``ModelSourceError``. ``s3://BUCKET[/PREFIX]`` is returned as it
    is once it names a bucket: it is downloaded when the model loads (``loading.model_path``)."""
    if source.startswith("s3://"):
        if not source[len("s3://") :].split("/", 1)[0]:
            raise ModelSourceError(INVALID_SOURCE, f"--model {source!r} names no bucket")
        return source
    resolved = resolve_source(source, what="--model")
    return resolved.path if resolved.path is not None else str(resolved.repo)


def detect_task(architectures: Sequence[str] | None, requested: str = "auto") -> tuple[str, bool]:
    """Return ``(task, has_trained_head)``.

    ``requested`` other than ``auto`` wins. Otherwise ``*ForSequenceClassification`` means
    classification and ``*ForCausalLM`` / ``*LMHeadModel`` means generation. A bare encoder
    (``BertModel``, e.g. the base MiniLM) falls back to classification with a newly initialised,
    seeded head (``has_trained_head`` False; the server logs a warning).
    """
    archs = list(architectures or [])
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    is_lm = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    if requested != "auto":
        if requested not in TASKS:
            raise ValueError(f"unknown task {requested!r}; expected auto or one of {', '.join(TASKS)}")
        return requested, (is_cls if requested == SEQUENCE_CLASSIFICATION else is_lm)
    if is_cls:
        return SEQUENCE_CLASSIFICATION, True
    if is_lm:
        return CAUSAL_LM, True
    return SEQUENCE_CLASSIFICATION, False
