"""Dataset loading, validation, the train/validation split and tokenization.

- ``load_records`` reads jsonl (one JSON object per line, blank lines skipped) or csv (header row) and
  validates every row, raising ``PermanentError`` with a message naming the file, line and field.
- ``split_indices`` splits with a generator seeded by the job's seed BEFORE any sharding, so every rank
  computes the same split; the DistributedSampler shards only the training part.
- ``tokenize`` pre-tokenizes once (the datasets are small); ``Collator`` pads each batch to its longest
  sequence (dynamic padding). For causal-lm, labels are the input ids with padding set to -100.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tauon_core.errors import (
    DATASET_NOT_FOUND,
    EMPTY_DATASET,
    INVALID_DATASET,
    INVALID_LABEL,
    MISSING_COLUMN,
    PermanentError,
)

from .config import DatasetConfig


@dataclass(frozen=True)
class Record:
    text: str
    label: int | None
    line: int  # 1-based line in the source file (for messages)


def parse_label(value: Any, num_labels: int, where: str, field: str) -> int:
    """Labels are integers 0..num_labels-1; strings of integers (and integral floats) are accepted."""
    label: int | None = None
    if isinstance(value, bool):
        label = None
    elif isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if s.lstrip("+-").isdigit():
            label = int(s)
    if label is None:
        raise PermanentError(
            INVALID_LABEL,
            f"{where}: field '{field}' must be an integer label 0..{num_labels - 1}, got {json.dumps(value)}",
        )
    if not 0 <= label < num_labels:
        raise PermanentError(
            INVALID_LABEL,
            f"{where}: field '{field}' = {label} is outside 0..{num_labels - 1} (numLabels={num_labels})",
        )
    return label


def _rows_jsonl(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PermanentError(INVALID_DATASET, f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise PermanentError(INVALID_DATASET, f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def _rows_csv(path: str, needed: Sequence[str]) -> Any:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None:
            return
        for col in needed:
            if col not in header:
                raise PermanentError(
                    MISSING_COLUMN,
                    f"{path}:1: column '{col}' not in the csv header (columns: {', '.join(header)})",
                )
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            yield reader.line_num, row


def load_records(cfg: DatasetConfig, num_labels: int | None) -> list[Record]:
    path = cfg.path
    if not os.path.exists(path):
        raise PermanentError(
            DATASET_NOT_FOUND, f"dataset file {path} not found (dataset.source={cfg.source})"
        )
    if not os.path.isfile(path):
        raise PermanentError(
            DATASET_NOT_FOUND, f"dataset path {path} is not a file (dataset.source={cfg.source})"
        )
    needed = [cfg.text_field] + ([cfg.label_field] if cfg.label_field else [])
    records: list[Record] = []
    try:
        rows = _rows_jsonl(path) if cfg.format == "jsonl" else _rows_csv(path, needed)
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            for col in needed:
                if col not in row or row[col] is None:
                    raise PermanentError(MISSING_COLUMN, f"{where}: field '{col}' missing")
            text = row[cfg.text_field]
            if not isinstance(text, str):
                raise PermanentError(
                    INVALID_DATASET,
                    f"{where}: field '{cfg.text_field}' must be a string, got {json.dumps(text)}",
                )
            if not text.strip():
                raise PermanentError(INVALID_DATASET, f"{where}: field '{cfg.text_field}' is empty")
            label = None
            if cfg.label_field:
                assert num_labels is not None
                label = parse_label(row[cfg.label_field], num_labels, where, cfg.label_field)
            records.append(Record(text=text, label=label, line=lineno))
    except UnicodeDecodeError as e:
        raise PermanentError(
            INVALID_DATASET, f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except csv.Error as e:
        raise PermanentError(INVALID_DATASET, f"{path}: invalid csv: {e}") from None
    except IsADirectoryError:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset path {path} is not a file") from None
    except PermanentError:
        raise
    except OSError as e:
        raise PermanentError(DATASET_NOT_FOUND, f"dataset file {path} unreadable: {e.strerror}") from None
    if not records:
        raise PermanentError(EMPTY_DATASET, f"{path}: no rows")
    return records


def split_sizes(n: int, validation_split: float) -> tuple[int, int]:
    """(train, validation) sizes. A non-zero split keeps at least one validation row."""
    n_val = int(n * validation_split)
    if validation_split > 0 and n_val == 0 and n >= 2:
        n_val = 1
    return n - n_val, n_val


def split_indices(n: int, validation_split: float, seed: int, path: str = "") -> tuple[list[int], list[int]]:
    """Seeded shuffle then split; identical on every rank. Raises EmptyDataset when train is empty."""
    n_train, n_val = split_sizes(n, validation_split)
    if n_train <= 0:
        raise PermanentError(
            EMPTY_DATASET,
            f"{path}: no training rows left after validationSplit={validation_split} ({n} rows in total)",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


class TokenizedDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, input_ids: list[list[int]], labels: list[int] | None) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


def tokenize(tokenizer: Any, records: Sequence[Record], max_len: int, with_labels: bool) -> TokenizedDataset:
    texts = [r.text for r in records]
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    labels = [int(r.label) for r in records] if with_labels else None  # type: ignore[arg-type]
    return TokenizedDataset(ids, labels)


def drop_short(ds: TokenizedDataset, min_tokens: int = 2) -> TokenizedDataset:
    """Causal-lm needs at least two tokens per sequence (one prediction)."""
    keep = [i for i, x in enumerate(ds.input_ids) if len(x) >= min_tokens]
    return TokenizedDataset(
        [ds.input_ids[i] for i in keep], None if ds.labels is None else [ds.labels[i] for i in keep]
    )


class Collator:
    """Pads a batch to its longest sequence. Causal-lm labels = input ids, padding -> -100."""

    def __init__(self, pad_token_id: int, causal_lm: bool) -> None:
        self.pad = pad_token_id
        self.causal_lm = causal_lm

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, it in enumerate(items):
            seq = it["input_ids"]
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.causal_lm:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        elif "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return batch
