"""The tests' one builder of tauon manifests (FineTuneJob and InferenceService as the plain dicts a user
writes by hand), with the models, data and base specs that several test files share.

Specs are given section by section in the manifest's own (camelCase) keys: ``finetunejob("ft",
numNodes=2, model={...})``. ``base`` is a spec to start from; a keyword section replaces the base's
section of that name whole (``deep_merge`` it first where a test patches inside a section).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.kube import REPO

Manifest = dict[str, Any]
API_VERSION = "tauon.dev/v1alpha1"

MINILM = "hf://sentence-transformers/all-MiniLM-L6-v2"
SENTIMENT = REPO / "examples" / "data" / "sentiment.jsonl"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
TINY_TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
# a tiny random Llama built from its config (no download): the model of the short pre-training runs
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}

PROCESS_NODE = {"tauon.dev/node-agent": "process"}  # the node selector of `tauon node` (tests/kube.py)
MINILM_CLASSIFIER: dict[str, Any] = {"source": MINILM, "task": "sequence-classification", "numLabels": 2}
PVC_MINILM = "pvc://models/minilm"
# the FineTuneJob spec of the pure (unit) planner and renderer tests: everything on PVCs, a gang of two
PVC_SPEC: dict[str, Any] = {
    "model": {"source": PVC_MINILM, "task": "sequence-classification", "numLabels": 2},
    "dataset": {"source": "pvc://data/sentiment.jsonl"},
    "output": {"storage": "pvc://results/sentiment-ft"},
    "numNodes": 2,
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base with over merged in, dicts key by key, anything else replaced; neither argument is changed."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def manifest(
    kind: str,
    name: str,
    *,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    **spec: Any,
) -> Manifest:
    """A tauon object of ``kind``: metadata name (and namespace, and ``metadata``'s other fields), spec
    ``base`` with the keyword sections (a copy: the caller's dicts, the constants here, are never shared)."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta.update(metadata or {})
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": meta,
        "spec": copy.deepcopy({**(base or {}), **spec}),
    }


def finetunejob(name: str, **kw: Any) -> Manifest:
    """A FineTuneJob manifest; the keywords are ``manifest``'s (namespace, metadata, base, spec sections)."""
    return manifest("FineTuneJob", name, **kw)


def inferenceservice(name: str, **kw: Any) -> Manifest:
    """An InferenceService manifest; the keywords are ``manifest``'s."""
    return manifest("InferenceService", name, **kw)


def on_process_nodes(nodes: int = 2, backoff: int = 2) -> dict[str, Any]:
    """Spec sections of a gang on the process-backed node (`tauon node`): one rank a pod, a CPU and 1Gi
    each, a bounded wait for scheduling."""
    return {
        "numNodes": nodes,
        "nprocPerNode": 1,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "podTemplate": {"nodeSelector": PROCESS_NODE},
        "runPolicy": {"backoffLimit": backoff, "scheduleTimeoutSeconds": 60},
    }


def fine_tune_kwargs(dataset: str | Path, **over: Any) -> dict[str, Any]:
    """Keyword arguments of ``Client.fine_tune``: MiniLM classifying dataset into two labels, a gang of two
    ranks of one process each; ``over`` adds or replaces keywords."""
    return {
        "model": MINILM,
        "dataset": str(dataset),
        "num_labels": 2,
        "num_nodes": 2,
        "nproc_per_node": 1,
        **over,
    }


def sentiment_fine_tune(**over: Any) -> dict[str, Any]:
    """``fine_tune_kwargs`` of the sentiment run the SDK tests train end to end: the shipped sentiment data
    and a recipe that learns in two epochs."""
    recipe: dict[str, Any] = {
        "label_field": "label",
        "validation_split": 0.15,
        "epochs": 2,
        "batch_size_per_device": 16,
        "learning_rate": 1e-4,
        "max_seq_length": 48,
        "warmup_ratio": 0.1,
        "env": {"LOGLEVEL": "INFO"},  # torchrun's agent logs on every node, so rank 1 has lines too
    }
    return fine_tune_kwargs(SENTIMENT, **{**recipe, **over})
