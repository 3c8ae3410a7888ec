"""Loading a Hugging Face model directory into a :class:`~tauon_serve.predictor.Predictor` (torch +
transformers, imported inside the functions so that ``serve --help`` stays fast).

:func:`load_predictor` runs in the server's inference thread: it resolves ``--model`` (:func:`model_path`:
an ``s3://`` model is downloaded into ``--model-cache-dir`` first, :mod:`tauon_serve.download`, so the
server stays not ready until the download is done and verified), reads
``config.json`` to pick the task (:func:`~tauon_serve.predictor.detect_task`), loads the tokenizer and
the model for that task on the chosen device and dtype, works out the longest input, and hands them to
the task's back-end (:class:`~tauon_serve.classifier.SequenceClassifier` or
:class:`~tauon_serve.llm.CausalLM`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .classifier import SequenceClassifier
from .config import ServerConfig
from .llm import CausalLM
from .predictor import CAUSAL_LM, SEQUENCE_CLASSIFICATION, Predictor, detect_task, resolve_model_source

log = logging.getLogger("tauon.serve.model")


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


def _load_model(task: str, path: str, torch_dtype: Any, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == SEQUENCE_CLASSIFICATION:
        return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the end of a long prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    _only_model_inputs(model, tokenizer)
    return model


def _only_model_inputs(model: Any, tokenizer: Any) -> None:
    """A causal LM trained with a BERT-style tokenizer: the tokenizer returns ``token_type_ids``, which
    the model's forward does not take (``generate`` refuses them). Ask the tokenizer for only the inputs
    the forward names."""
    import inspect

    names = list(getattr(tokenizer, "model_input_names", None) or [])
    accepted = inspect.signature(model.forward).parameters
    kept = [n for n in names if n in accepted]
    if kept != names and "input_ids" in kept:
        log.info("the tokenizer's %s are not inputs of the model: not passed", sorted(set(names) - set(kept)))
        tokenizer.model_input_names = kept


def _lengths(model: Any, tokenizer: Any, task: str, cfg: ServerConfig) -> tuple[int, int]:
    """``(positions, max_length)``: the model's position limit, and the longest input it is given
    (causal-lm: leaving room for ``--max-new-tokens``; at most ``--max-seq-length``)."""
    positions = (
        getattr(model.config, "max_position_embeddings", None)
        or getattr(model.config, "n_positions", None)
        or 512
    )
    tok_max = getattr(tokenizer, "model_max_length", None) or positions
    max_length = min(int(positions), int(tok_max) if tok_max < 1_000_000 else int(positions))
    if task == CAUSAL_LM:
        max_length = max(1, max_length - cfg.v1_new_tokens)
    if cfg.max_seq_length > 0:
        max_length = min(max_length, cfg.max_seq_length)
    return int(positions), max_length


def model_path(cfg: ServerConfig) -> str:
    """The local directory (or hub id) to load ``--model`` from. An ``s3://`` model is downloaded (or a
    complete, current copy in ``--model-cache-dir`` reused); its errors keep their named reasons
    (``tauon_serve.download``, ``tauon_core.storage``)."""
    if cfg.model.startswith("s3://"):
        from .download import download_model  # fsspec/s3fs only when a model is in object storage

        return download_model(
            cfg.model,
            cfg.model_cache_dir,
            cfg.model_download_timeout_seconds,
            concurrency=cfg.model_download_concurrency,
        )
    return resolve_model_source(cfg.model)


def load_predictor(cfg: ServerConfig) -> Predictor:
    source = cfg.model
    path = model_path(cfg)  # before importing torch: a missing or partial model fails fast

    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(path)
    task, trained_head = detect_task(getattr(config, "architectures", None), cfg.task)
    dev = _pick_device(cfg.device)
    torch_dtype = _pick_dtype(cfg.dtype, dev)

    tokenizer = AutoTokenizer.from_pretrained(path)
    # A newly initialised head must be the same on every replica: seed before building the model.
    torch.manual_seed(0)
    model = _load_model(task, path, torch_dtype, tokenizer)
    if task == SEQUENCE_CLASSIFICATION and not trained_head:
        log.warning(
            "%s has architectures %s, not *ForSequenceClassification: serving it with a NEWLY "
            "INITIALISED (seeded, untrained) classification head",
            source,
            getattr(config, "architectures", None),
        )
    model.to(dev)
    model.eval()
    positions, max_length = _lengths(model, tokenizer, task, cfg)
    log.info(
        "loaded %s (%s) task=%s device=%s dtype=%s max_length=%d threads=%d pid=%d",
        source,
        path,
        task,
        dev,
        str(torch_dtype).removeprefix("torch."),
        max_length,
        torch.get_num_threads(),
        os.getpid(),
    )
    if task == SEQUENCE_CLASSIFICATION:
        return SequenceClassifier(model, tokenizer, device=dev, max_length=max_length, config=cfg)
    return CausalLM(model, tokenizer, device=dev, max_length=max_length, positions=positions, config=cfg)
