"""The sequence-classification back-end: a Hugging Face ``*ForSequenceClassification`` model behind the
dynamic batcher.

Requests' texts are queued in one :class:`~tauon_serve.batching.DynamicBatcher`, which runs one forward
pass (:meth:`SequenceClassifier.predict`: tokenize, logits, softmax) at a time in the server's single
inference thread and hands each request its slice of the results. ``predict`` is never called
concurrently. torch is imported inside the methods that use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from .batching import BatcherClosed, DynamicBatcher, QueueFull, QueueTimeout
from .config import ServerConfig
from .predictor import SEQUENCE_CLASSIFICATION, Predictor
from .protocol import CLASSIFICATION_SCHEMA, Classification, RequestError

if TYPE_CHECKING:
    from .metrics import ServerMetrics

log = logging.getLogger("tauon.serve")


class SequenceClassifier(Predictor):
    task = SEQUENCE_CLASSIFICATION
    schema = CLASSIFICATION_SCHEMA

    def __init__(
        self, model: Any, tokenizer: Any, *, device: str, max_length: int, config: ServerConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self.config = config
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        if not id2label:
            id2label = {i: f"LABEL_{i}" for i in range(int(model.config.num_labels))}
        self.id2label = id2label
        self.labels = [self.label_name(i) for i in range(len(id2label))]
        self.batcher: DynamicBatcher[str, Classification] | None = None

    def label_name(self, index: int) -> str:
        return self.id2label.get(index, f"LABEL_{index}")

    def predict(self, texts: list[str]) -> list[Classification]:
        """One forward pass over ``texts`` (worker thread)."""
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            probs = torch.softmax(logits, dim=-1).cpu()
            labels = probs.argmax(dim=-1).tolist()
        return [
            Classification(int(lbl), self.label_name(int(lbl)), row)
            for lbl, row in zip(labels, probs.tolist(), strict=True)
        ]

    def warm_up(self) -> None:
        self.predict(["warm up"])

    def start(self, executor: Executor, metrics: ServerMetrics) -> None:
        cfg = self.config
        self.batcher = DynamicBatcher(
            self.predict,
            max_batch_size=cfg.max_batch_size,
            max_latency_s=cfg.max_latency_ms / 1000.0,
            executor=executor,
            max_queued_items=cfg.max_queued_instances,
            on_batch=metrics.observe_batch,
            on_queue_depth=metrics.queue_depth.set,
            max_queue_wait_s=cfg.max_queue_wait_seconds or None,
        )
        self.batcher.start()

    def begin_drain(self) -> None:
        if self.batcher is not None:
            self.batcher.begin_drain()

    async def close(self, grace_seconds: float) -> None:
        if self.batcher is not None:
            await self.batcher.close()  # drains what is still queued

    def check_inputs(self, texts: Sequence[str], where: Callable[[int], str]) -> None:
        pass  # any text: an empty one classifies like any other

    async def infer(self, texts: list[str]) -> Sequence[Classification]:
        assert self.batcher is not None
        try:
            return await self.batcher.submit(texts)
        except BatcherClosed:
            raise RequestError(503, "the server is shutting down") from None
        except (QueueFull, QueueTimeout) as exc:
            raise RequestError(503, f"the server is overloaded: {exc}; retry later") from None
        except Exception as exc:
            log.exception("inference failed")
            raise RequestError(500, f"inference failed: {type(exc).__name__}: {exc}") from None

    def describe(self) -> str:
        cfg = self.config
        merging = self.batcher is not None and self.batcher.merging
        return f"max_batch_size={cfg.max_batch_size} max_latency_ms={cfg.max_latency_ms:g}; batching " + (
            "on" if merging else "off"
        )
