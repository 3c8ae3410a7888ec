"""Model loading and batched prediction for the model server (torch + transformers).

``resolve_model_source`` and ``detect_task`` are import-light; everything that touches torch imports it
inside the function so that ``serve --help`` and argument errors stay fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tauon_core.sources import resolve_source

log = logging.getLogger("tauon.serve.model")

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)


@dataclass(frozen=True)
class Classification:
    label: int
    probabilities: list[float]


def resolve_model_source(source: str) -> str:
    """Map ``--model`` to something ``from_pretrained`` accepts (a directory or a hub repo id), offline.
    See ``tauon_core.sources``; raises ``ModelSourceError``."""
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


class Predictor:
    """A loaded model. ``predict`` is called from ONE worker thread only (never concurrently)."""

    def __init__(
        self,
        *,
        task: str,
        model: Any,
        tokenizer: Any,
        device: str,
        max_length: int,
        max_new_tokens: int,
        id2label: dict[int, str],
    ) -> None:
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.id2label = id2label
        self.num_labels = len(id2label)
        self.model_length = 0  # causal-lm: the model's position limit (prompt + generated tokens)

    def label_name(self, index: int) -> str:
        return self.id2label.get(index, f"LABEL_{index}")

    def predict(self, texts: list[str]) -> list[Any]:
        import torch

        with torch.inference_mode():
            if self.task == SEQUENCE_CLASSIFICATION:
                return self._classify(texts)
            return self._generate(texts)

    def _classify(self, texts: list[str]) -> list[Classification]:
        import torch

        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        logits = self.model(**enc).logits.float()
        probs = torch.softmax(logits, dim=-1).cpu()
        labels = probs.argmax(dim=-1).tolist()
        return [Classification(int(lbl), row) for lbl, row in zip(labels, probs.tolist(), strict=True)]

    def _generate(self, texts: list[str]) -> list[str]:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.generate(
            **enc,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return [str(t) for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def load_predictor(
    source: str,
    *,
    task: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_seq_length: int = 0,
    max_new_tokens: int = 32,
) -> Predictor:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_source(source)
    config = AutoConfig.from_pretrained(path)
    resolved_task, trained_head = detect_task(getattr(config, "architectures", None), task)
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev)

    tokenizer = AutoTokenizer.from_pretrained(path)
    # A newly initialised head must be the same on every replica: seed before building the model.
    torch.manual_seed(0)
    if resolved_task == SEQUENCE_CLASSIFICATION:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype)
        if not trained_head:
            log.warning(
                "%s has architectures %s, not *ForSequenceClassification: serving it with a NEWLY "
                "INITIALISED (seeded, untrained) classification head",
                source,
                getattr(config, "architectures", None),
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # keep the end of a long prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(dev)
    model.eval()

    positions = (
        getattr(model.config, "max_position_embeddings", None)
        or getattr(model.config, "n_positions", None)
        or 512
    )
    tok_max = getattr(tokenizer, "model_max_length", None) or positions
    max_length = min(int(positions), int(tok_max) if tok_max < 1_000_000 else int(positions))
    if resolved_task == CAUSAL_LM:
        max_length = max(1, max_length - max_new_tokens)
    if max_seq_length > 0:
        max_length = min(max_length, max_seq_length)

    id2label: dict[int, str] = {}
    if resolved_task == SEQUENCE_CLASSIFICATION:
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        if not id2label:
            id2label = {i: f"LABEL_{i}" for i in range(int(model.config.num_labels))}
    predictor = Predictor(
        task=resolved_task,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        id2label=id2label,
    )
    predictor.model_length = int(positions)
    log.info(
        "loaded %s (%s) task=%s device=%s dtype=%s max_length=%d threads=%d pid=%d",
        source,
        path,
        resolved_task,
        dev,
        str(torch_dtype).removeprefix("torch."),
        max_length,
        torch.get_num_threads(),
        os.getpid(),
    )
    return predictor
