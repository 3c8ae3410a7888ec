"""Dataset loading, validation, the train/validation split, tokenization, packing and the sample order.

Reading (``load_rows``, ``load_records``)
    Every shard of the dataset (one file or object, or a directory or ``s3://`` prefix of shards: see
    ``shards``), in URI order: jsonl (one JSON object per line, blank lines skipped) or csv (header row),
    ``.gz`` allowed, or parquet (one row per row, read by record batch: ``shards.iter_parquet``; a row is
    numbered within its shard and messages say ``SHARD: row N``; every row counts, none is skipped; a
    chat column may be a list of ``{role, content}`` structs or JSON text). Text is strict UTF-8 (a leading BOM is ignored); undecodable bytes, lone surrogates
    (``"\\ud800"`` in JSON), duplicate csv column names, labels that are not ASCII-decimal integers in
    range, and oversized numbers all raise ``PermanentError`` naming the shard, line and field: bad data
    is never retried. A row's identity (``Row.line``) counts lines across the shards in order.

    The cache path (``shard_encoder``) streams each shard instead (``shards.iter_lines``): the same checks
    and messages, the first bad row of a shard wins (the in-memory path parses every row before encoding).

Tokenized once (``build_datasets`` for causal-lm; ``tokcache``)
    Rows become documents (token ids, targets for chat/prompt-completion, the row's line) in the data
    cache (``dataset.cache.storage``, default ``<output>/data-cache``), tokenized once across the ranks
    and reused by every later start, resume or job with the same key. ``CorpusDataset`` then reads items
    from it: the same items, in the same order and split, as the in-memory path (``use_cache=False``:
    ``causal_examples`` + ``_causal_dataset``) builds; a row with nothing to learn stays a zero-length
    document so the split sees the same rows. Sequence-classification keeps the in-memory path.

Split
    ``split_indices`` shuffles with a generator seeded by the job's seed BEFORE any sharding, so every
    rank computes the same split (``split_arrays``: the same split as int64 arrays).

Dataset types (``build_datasets``; causal-lm unless noted)
    - ``text``: loss on every token of ``textField`` (sequence-classification: ``textField`` + label).
    - ``prompt-completion``: ``promptField + completionField`` (concatenated as written, no separator)
      then the tokenizer's eos token (when it has one and did not add it already); loss on the completion
      and eos only. The prompt part is the longest common token prefix of the encoded prompt and the
      encoded whole, so a token that straddles the boundary counts as completion.
    - ``chat``: ``messagesField`` is an OpenAI-shaped list of ``{"role", "content"}`` with roles
      system/user/assistant and string content (in csv: a JSON string). Rendered with the tokenizer's
      chat template (``apply_chat_template``, text then tokenized without extra special tokens). Loss on
      assistant turns only: each assistant span runs from the end of the prefix rendered with
      ``add_generation_prompt=True`` to the end of the prefix that includes the turn (so the template's
      end-of-turn marker is learned too); tokens overlapping a span are targets, all others ``-100``.
      A tokenizer without a chat template gets ``DEFAULT_CHAT_TEMPLATE`` (ChatML-like, set on the
      tokenizer so it is saved with the model and used when serving)::

          <|im_start|>{role}\\n{content}<|im_end|>\\n   ... per message
          <|im_start|>assistant\\n                      ... with add_generation_prompt

      The markers are plain text (no tokens are added to the vocabulary).
    In every causal example the first token is never a target (nothing predicts it), examples are cut
    at ``maxSeqLength`` tokens, and an example left without a target token is dropped.

Packing (``dataset.packing``)
    Tokenized examples are packed greedily, in split order, into blocks of at most ``maxSeqLength``
    tokens; an example never spans two blocks (``pack``; ``pack_bounds`` computes the same blocks from
    the lengths alone). ``position_ids`` restart at 0 at every example start and
    batches carry no ``attention_mask``: transformers (masking_utils.find_packed_sequence_indices)
    then builds a block-diagonal causal mask, so attention never crosses examples. That detection only
    runs when no KV cache exists: call the model with ``use_cache=False`` (or set
    ``model.config.use_cache = False``, see ``disable_kv_cache``) or examples attend to each other.

Sample order (``epoch_order``, ``rank_slice``, ``batches_of``, ``position_after``)
    The global order of an epoch depends only on seed and epoch (an ``EpochOrder``: one int64 array,
    8 bytes per sample; only a rank's own micro-batches become lists of ints). Each global batch is
    ``world_size x batch_per_rank`` consecutive samples of the order; rank r takes its contiguous
    share. The last, ragged global batch (T < world_size x batch_per_rank samples) is split into
    world_size contiguous shares whose sizes differ by at most one; when T < world_size those T samples
    are dropped for this epoch (so every rank has the same number of non-empty batches and no sample is
    ever seen twice). ``batches_of`` groups a rank's micro-batches into optimizer steps (gradient
    accumulation); ``position_after`` is the global sample position a checkpoint records after some of them.
"""

from __future__ import annotations

import array
import csv
import io
import json
import random
import re
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch

from tauon_core import storage
from tauon_core.errors import (
    EMPTY_DATASET,
    INVALID_DATASET,
    INVALID_LABEL,
    MISSING_COLUMN,
    PermanentError,
)

from . import tokcache
from .config import DatasetConfig
from .shards import Shard, iter_lines, iter_parquet, list_shards, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import JobConfig

NO_CHAT_TEMPLATE = "NoChatTemplate"
IGNORE = -100
CHAT_ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
_MAX_LABEL_DIGITS = 9  # numLabels is at most 100,000; longer strings are out of range without int()
_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_PACK_CHUNK = 1 << 16
_CSV_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Record:
    text: str
    label: int | None
    line: int  # 1-based line in the source file (for messages)


# --- labels and strings ------------------------------------------------------------------------


def _label_error(where: str, field: str, num_labels: int, value: object) -> PermanentError:
    shown = json.dumps(value, default=str)
    if len(shown) > 60:
        shown = shown[:60] + "..."
    return PermanentError(
        INVALID_LABEL, f"{where}: field '{field}' must be an integer label 0..{num_labels - 1}, got {shown}"
    )


def parse_label(value: object, num_labels: int, where: str, field: str) -> int:
    """Labels are integers 0..num_labels-1; ASCII-decimal strings and integral floats are accepted.

    Booleans, non-ASCII digits (``"²"``, Arabic-Indic digits) and anything else raise InvalidLabel;
    huge values (thousands of digits) are reported as out of range without converting them.
    """
    label: int | None = None
    if isinstance(value, bool):
        raise _label_error(where, field, num_labels, value)
    if isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if not _ASCII_INT.fullmatch(s):
            raise _label_error(where, field, num_labels, value)
        digits = s.lstrip("+-").lstrip("0") or "0"
        if len(digits) > _MAX_LABEL_DIGITS:
            raise PermanentError(
                INVALID_LABEL,
                f"{where}: field '{field}' ({len(digits)} digits) is outside 0..{num_labels - 1}"
                f" (numLabels={num_labels})",
            )
        label = int(s)
    if label is None:
        raise _label_error(where, field, num_labels, value)
    if not 0 <= label < num_labels:
        shown = (
            str(label)
            if abs(label) < 10**12
            else f"a number of about {int(label.bit_length() * 0.30103) + 1} digits"
        )
        raise PermanentError(
            INVALID_LABEL,
            f"{where}: field '{field}' = {shown} is outside 0..{num_labels - 1} (numLabels={num_labels})",
        )
    return label


def _check_str(value: object, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise PermanentError(
            INVALID_DATASET, f"{where}: field '{field}' must be a string, got {type(value).__name__}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PermanentError(
            INVALID_DATASET,
            f"{where}: field '{field}' contains a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}",
        ) from None
    if not allow_empty and not value.strip():
        raise PermanentError(INVALID_DATASET, f"{where}: field '{field}' is empty")
    return value


# --- reading rows ------------------------------------------------------------------------------


def _rows_jsonl(path: str, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, object]]]:
    """``lines``: the shard split at ``\\n`` (with or without it)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PermanentError(INVALID_DATASET, f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer over Python's 4300-digit limit
            raise PermanentError(
                INVALID_DATASET, f"{path}:{lineno}: invalid JSON: {str(e).splitlines()[0][:200]}"
            ) from None
        if not isinstance(obj, dict):
            raise PermanentError(INVALID_DATASET, f"{path}:{lineno}: expected a JSON object per line")
        yield lineno, obj


def _rows_csv(
    path: str, lines: Iterable[str], needed: Sequence[str]
) -> Iterator[tuple[int, dict[str, object]]]:
    """``lines``: the shard split as ``io.StringIO(text, newline="")`` splits it (see ``_csv_lines``)."""
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise PermanentError(INVALID_DATASET, f"{path}:1: invalid csv header: {e}") from None
    if header is None:
        return
    seen: set[str] = set()
    for col in header:
        if col in seen:
            raise PermanentError(INVALID_DATASET, f"{path}:1: duplicate csv column '{col}' in the header")
        seen.add(col)
    for col in needed:
        if col not in header:
            raise PermanentError(
                MISSING_COLUMN,
                f"{path}:1: column '{col}' not in the csv header (columns: {', '.join(header)})",
            )
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise PermanentError(INVALID_DATASET, f"{path}:{start}: invalid csv: {e}") from None
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        yield start, row


@dataclass(frozen=True)
class Row:
    """One row of the dataset: ``line`` is its identity (1-based, counted across the shards in order, so
    a single-file dataset keeps its file's line numbers); ``where`` is ``SHARD:LINE`` for messages."""

    line: int
    where: str
    fields: dict[str, object]


def _needed_present(fields: dict[str, object], needed: Sequence[str], where: str) -> None:
    for col in needed:
        if col not in fields or fields[col] is None:
            raise PermanentError(MISSING_COLUMN, f"{where}: field '{col}' missing")


def _csv_lines(lines: Iterable[str]) -> Iterator[str]:
    """Lines split at ``\\n`` re-split as ``io.StringIO(text, newline="")`` does (also at a lone ``\\r``)."""
    for line in lines:
        if "\r" not in line:
            if line:
                yield line
            continue
        yield from (m.group() for m in _CSV_LINE.finditer(line))


def row_where(uri: str, fmt: str, n: int) -> str:
    """Where a row is, for messages: ``SHARD:LINE`` (jsonl, csv) or ``SHARD: row N`` (parquet)."""
    return f"{uri}: row {n}" if fmt == "parquet" else f"{uri}:{n}"


def _parquet_rows(
    shard: Shard, needed: Sequence[str], seen: list[int]
) -> Iterator[tuple[int, dict[str, object]]]:
    """A parquet shard's rows; ``seen[0]`` counts them (the shard's "lines" for row identity)."""
    for n, fields in iter_parquet(shard, needed):
        seen[0] = n
        yield n, fields


def load_rows(cfg: DatasetConfig, needed: Sequence[str]) -> list[Row]:
    """Rows of every shard (jsonl, csv or parquet, see ``shards``); ``needed`` fields must be present and
    not null."""
    rows: list[Row] = []
    offset = 0
    for shard in list_shards(cfg.path, cfg.format, cfg.source):
        uri = shard.uri
        seen = [0]  # the shard's lines (parquet: rows), for the identity of the next shard's rows
        if cfg.format == "parquet":
            parsed: Iterator[tuple[int, dict[str, object]]] = _parquet_rows(shard, needed, seen)
        else:
            text = read_text(shard)
            seen[0] = text.count("\n") + 1
            parsed = (
                _rows_jsonl(uri, text.split("\n"))
                if cfg.format == "jsonl"
                else _rows_csv(uri, io.StringIO(text, newline=""), needed)
            )
        for lineno, fields in parsed:
            where = row_where(uri, cfg.format, lineno)
            _needed_present(fields, needed, where)
            rows.append(Row(offset + lineno, where, fields))
        offset += seen[0]
    if not rows:
        raise PermanentError(EMPTY_DATASET, f"{cfg.path}: no rows")
    return rows


def load_records(cfg: DatasetConfig, num_labels: int | None) -> list[Record]:
    """Rows of a ``text`` dataset (text + optional label), validated."""
    needed = [cfg.text_field] + ([cfg.label_field] if cfg.label_field else [])
    records: list[Record] = []
    for row in load_rows(cfg, needed):
        text = _check_str(row.fields[cfg.text_field], row.where, cfg.text_field)
        label = None
        if cfg.label_field:
            assert num_labels is not None
            label = parse_label(row.fields[cfg.label_field], num_labels, row.where, cfg.label_field)
        records.append(Record(text=text, label=label, line=row.line))
    return records


# --- split ---------------------------------------------------------------------------------------


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


def split_arrays(
    n: int, validation_split: float, seed: int, path: str = ""
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """``split_indices`` as int64 arrays (8 bytes per row instead of a list of ints): the same shuffle
    (``random.Random(seed).shuffle`` over an array) and so the same split."""
    n_train, n_val = split_sizes(n, validation_split)
    if n_train <= 0:
        split_indices(n, validation_split, seed, path)  # raises EmptyDataset with its message
    order = array.array("q", range(n))
    random.Random(seed).shuffle(order)  # any mutable sequence: the same permutation as on a list
    arr = np.frombuffer(order, dtype=np.int64)
    return np.sort(arr[n_val:]), np.sort(arr[:n_val])


# --- the existing (text-only) tokenized path, kept for train.py ------------------------------------


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


def tokenize(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_len: int, with_labels: bool
) -> TokenizedDataset:
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


# --- causal-lm examples ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized causal-lm example; ``labels[i]`` is the target at position i or -100."""

    input_ids: list[int]
    labels: list[int]
    line: int


def _finish(ids: list[int], labels: list[int], max_len: int, line: int) -> Example | None:
    """Cut at max_len, never target the first token; None when no target is left."""
    ids, labels = ids[:max_len], labels[:max_len]
    if labels:
        labels[0] = IGNORE
    if not any(x != IGNORE for x in labels):
        return None
    return Example(ids, labels, line)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int, line: int = 0) -> Example | None:
    ids = list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"])
    return _finish(ids, list(ids), max_len, line)


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_len: int, line: int = 0
) -> Example | None:
    """prompt + completion + eos; targets: the completion and eos."""
    full = list(tokenizer(prompt + completion)["input_ids"])
    head = list(tokenizer(prompt)["input_ids"])
    k = 0
    while k < min(len(full), len(head)) and full[k] == head[k]:
        k += 1
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and (not full or full[-1] != eos):
        full.append(eos)
    labels = [IGNORE] * k + full[k:]
    return _finish(full, labels, max_len, line)


# --- chat ------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE``; True when it was set.

    PermanentError(NoChatTemplate) when the tokenizer cannot render chats at all."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise PermanentError(
            NO_CHAT_TEMPLATE,
            f"dataset.type chat needs a tokenizer that renders chat templates; {type(tokenizer).__name__} cannot",
        )
    try:
        import jinja2  # noqa: F401  (apply_chat_template renders with jinja2)
    except ImportError:
        raise PermanentError(
            NO_CHAT_TEMPLATE, "dataset.type chat needs jinja2 to render chat templates"
        ) from None
    if getattr(tokenizer, "chat_template", None):
        return False
    try:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    except (AttributeError, TypeError, ValueError) as e:
        raise PermanentError(
            NO_CHAT_TEMPLATE,
            f"the tokenizer has no chat template and the default one cannot be set on it ({e})",
        ) from None
    return True


def validate_messages(value: object, where: str, field: str) -> list[dict[str, str]]:
    """An OpenAI-shaped message list with roles system/user/assistant and string content."""
    if isinstance(value, str):  # csv cells carry the list as JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise PermanentError(
                INVALID_DATASET, f"{where}: field '{field}' is not a JSON list of messages"
            ) from None
    if not isinstance(value, list) or not value:
        raise PermanentError(
            INVALID_DATASET, f"{where}: field '{field}' must be a non-empty list of messages"
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise PermanentError(INVALID_DATASET, f"{at} must be an object with role and content")
        role = m.get("role")
        if role in TOOL_ROLES or "tool_calls" in m or "function_call" in m:
            raise PermanentError(
                INVALID_DATASET,
                f"{at}: tool messages and tool calls are not supported (role {json.dumps(role)})",
            )
        if role not in CHAT_ROLES:
            raise PermanentError(
                INVALID_DATASET,
                f"{at}: unknown role {json.dumps(role)} (expected one of {', '.join(CHAT_ROLES)})",
            )
        if not isinstance(m.get("content"), str):
            raise PermanentError(
                INVALID_DATASET, f"{at}: content must be a string, got {type(m.get('content')).__name__}"
            )
        out.append({"role": str(role), "content": _check_str(m["content"], at, "content", allow_empty=True)})
    if not any(m["role"] == "assistant" for m in out):
        raise PermanentError(INVALID_DATASET, f"{where}: field '{field}' has no assistant message")
    return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja2 errors (raise_exception in templates), ValueError, TypeError
        raise PermanentError(
            INVALID_DATASET, f"{where}: the chat template rejects this conversation: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(text, str):
        raise PermanentError(NO_CHAT_TEMPLATE, f"{where}: the chat template did not render text")
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span starts where the prefix rendered with a generation prompt ends and stops where the prefix
    including the turn ends. Templates whose prefixes are not prefixes of the whole (some drop earlier
    content) fall back to locating the assistant content itself."""
    full = _render(tokenizer, messages, False, where)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, where)
        if i and not full.startswith(before):
            before = ""
        if full.startswith(through) and len(before) <= len(through) and len(through) >= cursor:
            start, end = max(len(before), cursor), len(through)
        else:
            start = full.find(m["content"], cursor)
            if start < 0:
                raise PermanentError(
                    INVALID_DATASET,
                    f"{where}: cannot locate assistant message {i} in the rendered chat template",
                )
            end = start + len(m["content"])
        if end > start:
            spans.append((start, end))
        cursor = end
    return full, spans


def _encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and their targets: ids inside a span, -100 elsewhere."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            t if e > s and any(s < b and e > a for a, b in spans) else IGNORE
            for t, (s, e) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return ids, labels
    ids, labels = [], []
    pos = 0
    for a, b in [*spans, (len(text), len(text))]:
        for seg, target in ((text[pos:a], False), (text[a:b], True)):
            if seg:
                seg_ids = list(tokenizer(seg, add_special_tokens=False)["input_ids"])
                ids += seg_ids
                labels += seg_ids if target else [IGNORE] * len(seg_ids)
        pos = b
    return ids, labels


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_len: int,
    line: int = 0,
    where: str = "",
) -> Example | None:
    text, spans = assistant_spans(tokenizer, messages, where or f"line {line}")
    ids, labels = _encode_spans(tokenizer, text, spans)
    return _finish(ids, labels, max_len, line)


def _causal_fields(ds: DatasetConfig) -> list[str]:
    """The fields a causal-lm row of ``ds.type`` needs."""
    if ds.type == "chat":
        return [ds.messages_field]
    if ds.type == "prompt-completion":
        return [ds.prompt_field, ds.completion_field]
    return [ds.text_field]


def _encode_row(
    ds: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    fields: dict[str, object],
    line: int,
    where: str,
) -> Example | None:
    """One validated causal-lm row as an example (None: nothing to learn within max_len)."""
    if ds.type == "chat":
        msgs = validate_messages(fields[ds.messages_field], where, ds.messages_field)
        return encode_chat(tokenizer, msgs, max_len, line, where)
    if ds.type == "prompt-completion":
        return encode_prompt_completion(
            tokenizer,
            _check_str(fields[ds.prompt_field], where, ds.prompt_field, allow_empty=True),
            _check_str(fields[ds.completion_field], where, ds.completion_field),
            max_len,
            line,
        )
    return encode_text(tokenizer, _check_str(fields[ds.text_field], where, ds.text_field), max_len, line)


def causal_examples(
    cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> list[Example | None]:
    """One entry per row (None: nothing to learn after cutting at max_len), validated with line numbers.

    The in-memory path: every row of every shard parsed first, then encoded (the cache path,
    ``shard_encoder``, streams one shard at a time instead)."""
    if cfg.type == "chat":
        ensure_chat_template(tokenizer)
    if cfg.type == "text":
        records = load_records(cfg, None)
        return [encode_text(tokenizer, r.text, max_len, r.line) for r in records]
    rows = load_rows(cfg, _causal_fields(cfg))
    return [_encode_row(cfg, tokenizer, max_len, row.fields, row.line, row.where) for row in rows]


class _CountedLines:
    """The lines of a shard, counted as they are read (a shard has ``count("\\n") + 1`` lines)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            self.count += 1
            yield line


def shard_encoder(
    ds: DatasetConfig, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tokcache.ShardEncoder:
    """Tokenizes one shard as a stream (the cache path): rows are read, validated (the same checks and
    ``SHARD:LINE`` messages as ``load_rows``/``causal_examples``, the first bad row of the shard wins) and
    encoded one at a time; text's targets are implied, chat's and prompt-completion's are kept."""
    needed = _causal_fields(ds)
    masked = ds.type != "text"

    def encode(shard: Shard) -> Generator[tokcache.Document, None, int]:
        uri = shard.uri
        seen = [0]
        lines = _CountedLines(iter_lines(shard) if ds.format != "parquet" else iter(()))
        parsed = (
            _parquet_rows(shard, needed, seen)
            if ds.format == "parquet"
            else _rows_jsonl(uri, (x.removesuffix("\n") for x in lines))
            if ds.format == "jsonl"
            else _rows_csv(uri, _csv_lines(lines), needed)
        )
        for lineno, fields in parsed:
            where = row_where(uri, ds.format, lineno)
            _needed_present(fields, needed, where)
            ex = _encode_row(ds, tokenizer, max_len, fields, lineno, where)
            if ex is None:
                yield tokcache.Document([], [] if masked else None, lineno)
            else:
                targets = [0 if t == IGNORE else 1 for t in ex.labels] if masked else None
                yield tokcache.Document(ex.input_ids, targets, lineno)
        return seen[0] if ds.format == "parquet" else lines.count

    return encode


# --- packing ------------------------------------------------------------------------------------


def pack(examples: Sequence[Example], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy in-order packing into blocks of at most max_len tokens; position_ids restart per example."""
    blocks: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex.input_ids) > max_len:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex.input_ids
        cur["labels"] += ex.labels
        cur["position_ids"] += list(range(len(ex.input_ids)))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def disable_kv_cache(model: torch.nn.Module) -> None:
    """Packed batches need ``use_cache=False``: with a cache transformers skips packed-mask detection."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        cfg.use_cache = False


# --- datasets -------------------------------------------------------------------------------------


class SequenceDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Items are dicts of 1-D LongTensors (input_ids, labels[, position_ids]) or, for
    sequence-classification, input_ids plus an int ``label``. ``lines`` maps items to source lines
    (packed blocks: the line of their first example); ``dropped`` counts examples with no target;
    ``report`` says what building it did (set on the train dataset by ``build_datasets``).

    This class holds its items in memory (sequence-classification, and causal-lm without a cache);
    ``CorpusDataset`` reads them from a tokenized corpus."""

    report: tokcache.DatasetReport | None = None

    def __init__(self, items: list[dict[str, Any]], lines: list[int], dropped: int = 0) -> None:
        self.items = items
        self._lines = lines
        self.dropped = dropped

    @property
    def lines(self) -> list[int]:
        return self._lines

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            k: (torch.tensor(v, dtype=torch.long) if isinstance(v, list) else v)
            for k, v in self.items[i].items()
        }

    def num_tokens(self) -> int:
        return sum(len(it["input_ids"]) for it in self.items)


def pack_bounds(lengths: np.ndarray[Any, Any], max_len: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``pack`` from lengths alone: block b holds examples ``[bounds[b], bounds[b + 1])`` (greedy, in
    order, at most max_len tokens unless one example is longer)."""
    starts = array.array("q", [0] if len(lengths) else [])
    cur = 0
    for k0 in range(0, len(lengths), _PACK_CHUNK):
        for k, n in enumerate(lengths[k0 : k0 + _PACK_CHUNK].tolist(), start=k0):
            if cur and cur + n > max_len:
                starts.append(k)
                cur = 0
            cur += n
    starts.append(len(lengths))
    return np.frombuffer(starts, dtype=np.int64).copy()


class CorpusDataset(SequenceDataset):
    """A causal-lm split read from a ``tokcache.TokenizedCorpus``: the same items, in the same order, as
    ``_causal_dataset`` builds in memory from the same documents. Memory: a few int64 per document of the
    split (which documents, where blocks start), never the tokens."""

    def __init__(
        self, corpus: tokcache.TokenizedCorpus, docs: np.ndarray[Any, Any], packing: bool, max_len: int
    ) -> None:
        super().__init__([], [], 0)
        self.corpus = corpus
        lengths = corpus.lengths()[docs]
        self.docs = np.ascontiguousarray(docs[lengths > 0], dtype=np.int64)  # kept, in split order
        self.dropped = int(len(docs) - len(self.docs))
        self._tokens = int(lengths.sum())
        self.blocks = pack_bounds(lengths[lengths > 0], max_len) if packing else None

    def __len__(self) -> int:
        return len(self.docs) if self.blocks is None else len(self.blocks) - 1

    def _doc(self, d: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        ids = self.corpus.ids(d).astype(np.int64)
        targets = self.corpus.targets(d)
        labels = ids.copy() if targets is None else np.where(targets != 0, ids, IGNORE)
        labels[0] = IGNORE
        return ids, labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.blocks is None:
            ids, labels = self._doc(int(self.docs[i]))
            return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        parts = [self._doc(int(d)) for d in self._docs_of(i)]
        return {
            "input_ids": torch.from_numpy(np.concatenate([p[0] for p in parts])),
            "labels": torch.from_numpy(np.concatenate([p[1] for p in parts])),
            "position_ids": torch.from_numpy(np.concatenate([np.arange(len(p[0])) for p in parts])),
        }

    def _docs_of(self, i: int) -> np.ndarray[Any, Any]:
        if self.blocks is None:
            return self.docs[i : i + 1]
        return self.docs[self.blocks[i] : self.blocks[i + 1]]

    def prefetch(self, items: Iterable[int]) -> None:
        """Start reading these items' documents in the background (an ``s3://`` cache; see
        ``tokcache``, Read-ahead): call it with the next micro-batches before reading the current one."""
        n = len(self)
        self.corpus.prefetch(int(d) for i in items if 0 <= i < n for d in self._docs_of(int(i)))

    def __getitems__(self, items: list[int]) -> list[dict[str, Any]]:
        """A batch of items, their documents read concurrently (torch's DataLoader calls this)."""
        self.prefetch(items)
        return [self[int(i)] for i in items]

    @property
    def lines(self) -> list[int]:
        first = self.docs if self.blocks is None else self.docs[self.blocks[:-1]]
        return [self.corpus.line(int(d)) for d in first]

    def num_tokens(self) -> int:
        return self._tokens


def _causal_dataset(examples: list[Example | None], packing: bool, max_len: int) -> SequenceDataset:
    kept = [e for e in examples if e is not None]
    dropped = len(examples) - len(kept)
    if not packing:
        items: list[dict[str, Any]] = [{"input_ids": e.input_ids, "labels": e.labels} for e in kept]
        return SequenceDataset(items, [e.line for e in kept], dropped)
    blocks = pack(kept, max_len)
    lines, i = [], 0
    for b in blocks:  # the first example of each block
        lines.append(kept[i].line)
        i += b["position_ids"].count(0)
    return SequenceDataset(list(blocks), lines, dropped)


def default_cache_root(cfg: JobConfig, output: str | None = None) -> str:
    """``dataset.cache.storage``, else ``<output>/data-cache``."""
    return cfg.dataset.cache_storage or storage.join(output or cfg.output.path, "data-cache")


def tokenized_corpus(
    cfg: JobConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    root: str,
    rank: int = 0,
    world: int = 1,
    run: str = "",
) -> tuple[tokcache.TokenizedCorpus, tokcache.DatasetReport]:
    """The causal-lm corpus of ``cfg.dataset`` from the cache under ``root`` (built there first unless
    it is a hit; rank r of W tokenizes every W-th shard, see ``tokcache``)."""
    ds = cfg.dataset
    if ds.type == "chat":
        ensure_chat_template(tokenizer)
    shard_list = list_shards(ds.path, ds.format, ds.source)
    fields = {"type": ds.type, "format": ds.format, "fields": _causal_fields(ds)}
    key = tokcache.cache_key(
        ds.path, shard_list, tokcache.tokenizer_fingerprint(tokenizer), fields, max_len, ds.packing
    )
    names = [tokcache.shard_name(ds.path, s.uri) for s in shard_list]
    encode = shard_encoder(ds, tokenizer, max_len)
    return tokcache.build(
        root, key, shard_list, names, encode, ds.type != "text", rank=rank, world=world, run=run
    )


def _check_train(train: SequenceDataset, path: str, n_max: int) -> None:
    if len(train) == 0:
        raise PermanentError(
            EMPTY_DATASET,
            f"{path}: no training example has a token to learn within maxSeqLength={n_max}"
            f" ({train.dropped} dropped)",
        )


def build_datasets(
    cfg: JobConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int | None = None,
    *,
    cache: str | None = None,
    use_cache: bool = True,
    rank: int = 0,
    world: int = 1,
    attempt: int | None = None,
) -> tuple[SequenceDataset, SequenceDataset | None]:
    """Train and validation datasets (validation None when the split leaves no rows).

    The split is seeded (hyperparameters.seed) and done on rows, before tokenization, packing and any
    sharding. ``max_len`` overrides hyperparameters.maxSeqLength (e.g. capped at the model's limit).

    causal-lm reads a tokenized corpus from the cache (``cache``, default ``default_cache_root``; rank
    and world split the tokenization; the job's uid and ``attempt`` (default: job.json's) tell this run's
    error markers from an earlier run's, see ``tokcache.run_id``);
    ``use_cache=False`` materialises every example in memory instead (the same items).
    Sequence-classification always uses the in-memory path. ``train.report`` says what happened."""
    ds, hp = cfg.dataset, cfg.hyperparameters
    n_max = max_len or hp.max_seq_length
    if cfg.model.task != "causal-lm":
        return _classification_datasets(cfg, tokenizer, n_max)
    if not use_cache:
        return _memory_datasets(cfg, tokenizer, n_max)
    root = cache or default_cache_root(cfg)
    run = tokcache.run_id(cfg.uid, cfg.attempt if attempt is None else attempt)
    corpus, report = tokenized_corpus(cfg, tokenizer, n_max, root, rank, world, run)
    if corpus.documents == 0:
        raise PermanentError(EMPTY_DATASET, f"{ds.path}: no rows")
    tr, va = split_arrays(corpus.documents, ds.validation_split, hp.seed, ds.path)
    train = CorpusDataset(corpus, tr, ds.packing, n_max)
    _check_train(train, ds.path, n_max)
    train.report = report
    val = CorpusDataset(corpus, va, ds.packing, n_max) if len(va) else None
    return train, (val if val is not None and len(val) else None)


def _classification_datasets(
    cfg: JobConfig, tokenizer: PreTrainedTokenizerBase, n_max: int
) -> tuple[SequenceDataset, SequenceDataset | None]:
    ds = cfg.dataset
    records = load_records(ds, cfg.model.num_labels)
    tr, va = split_indices(len(records), ds.validation_split, cfg.hyperparameters.seed, ds.path)

    def cls(idx: list[int]) -> SequenceDataset:
        enc = tokenize(tokenizer, [records[i] for i in idx], n_max, with_labels=True)
        assert enc.labels is not None
        items: list[dict[str, Any]] = [
            {"input_ids": x, "label": y} for x, y in zip(enc.input_ids, enc.labels, strict=True)
        ]
        return SequenceDataset(items, [records[i].line for i in idx])

    train = cls(tr)
    train.report = tokcache.DatasetReport(
        len(list_shards(ds.path, ds.format, ds.source)), len(records), train.num_tokens()
    )
    return train, (cls(va) if va else None)


def _memory_datasets(
    cfg: JobConfig, tokenizer: PreTrainedTokenizerBase, n_max: int
) -> tuple[SequenceDataset, SequenceDataset | None]:
    ds = cfg.dataset
    t0 = time.monotonic()
    examples = causal_examples(ds, tokenizer, n_max)
    seconds = time.monotonic() - t0
    tr, va = split_indices(len(examples), ds.validation_split, cfg.hyperparameters.seed, ds.path)
    train = _causal_dataset([examples[i] for i in tr], ds.packing, n_max)
    _check_train(train, ds.path, n_max)
    tokens = sum(len(e.input_ids) for e in examples if e is not None)
    shards = len(list_shards(ds.path, ds.format, ds.source))
    train.report = tokcache.DatasetReport(shards, len(examples), tokens, tokenize_seconds=seconds)
    val = _causal_dataset([examples[i] for i in va], ds.packing, n_max) if va else None
    return train, (val if val is not None and len(val) else None)


# --- batches --------------------------------------------------------------------------------------


def _as_list(x: torch.Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class Collator:
    """Pads a batch to its longest sequence.

    ``Collator(pad_id, task, packed)``: task is "causal-lm" or "sequence-classification" (a bool is
    accepted for the old ``Collator(pad_id, causal_lm)`` form). Padded batches: input_ids, labels
    (-100 on padding; items without labels learn every token), attention_mask (left out when nothing is
    padded: a causal LM then needs none, and attention keeps its causal fast path). Packed batches:
    input_ids, labels, position_ids and no attention_mask; padding continues as its own segment
    (positions from 0, labels -100) so it never joins an example. Classification: labels = the items'
    int labels."""

    def __init__(
        self,
        pad_id: int | None = None,
        task: str | bool = "causal-lm",
        packed: bool = False,
        *,
        pad_token_id: int | None = None,  # the old keyword names
        causal_lm: bool | None = None,
    ) -> None:
        if pad_id is None:
            pad_id = pad_token_id
        if causal_lm is not None:
            task = causal_lm
        if isinstance(task, bool):
            task = "causal-lm" if task else "sequence-classification"
        self.pad = int(pad_id) if pad_id is not None else 0
        self.task = task
        self.causal_lm = task == "causal-lm"
        self.packed = packed and self.causal_lm

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [_as_list(it["input_ids"]) for it in items]
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(items), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        if not self.causal_lm:
            batch = {"input_ids": ids, "attention_mask": mask}
            if "label" in items[0]:
                batch["labels"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
            return batch
        labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
        for i, (s, it) in enumerate(zip(seqs, items, strict=True)):
            labels[i, : len(s)] = torch.tensor(
                _as_list(it["labels"]) if "labels" in it else s, dtype=torch.long
            )
        if not self.packed:
            if bool(mask.all()):  # no padding: no mask, so attention takes its causal fast path (SDPA
                return {"input_ids": ids, "labels": labels}  # is_causal, flash) with the same result
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pos = torch.zeros((len(items), longest), dtype=torch.long)
        for i, (s, it) in enumerate(zip(seqs, items, strict=True)):
            p = _as_list(it["position_ids"]) if "position_ids" in it else list(range(len(s)))
            pos[i, : len(s)] = torch.tensor(p, dtype=torch.long)
            pos[i, len(s) :] = torch.arange(longest - len(s))
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


# --- sample order -----------------------------------------------------------------------------------


class EpochOrder(Sequence[int]):
    """An epoch's sample order held as one int64 array (8 bytes per sample; a list of Python ints costs
    ~36, and the slices taken from it as much again). Reads as a sequence of Python ints: indexing gives
    an ``int``, a slice a ``list[int]``, and it equals any sequence of the same ints in the same order."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self.array = np.ascontiguousarray(array, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return list(self.array[i].tolist())
        return int(self.array[i])

    def __iter__(self) -> Iterator[int]:
        for k in range(0, len(self.array), _PACK_CHUNK):
            yield from self.array[k : k + _PACK_CHUNK].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpochOrder):
            return bool(np.array_equal(self.array, other.array))
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and bool(np.array_equal(self.array, np.asarray(other)))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EpochOrder({self.array!r})"


def epoch_order(n: int, seed: int, epoch: int) -> EpochOrder:
    """The global sample order of an epoch: a permutation of range(n) from seed and epoch only
    (the same permutation torch's DistributedSampler draws before sharding), as an int64 array."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return EpochOrder(torch.randperm(n, generator=g).numpy())


def _share(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous share [a, b) of rank in ``size`` items; sizes differ by at most one, larger first."""
    q, r = divmod(size, world_size)
    a = rank * q + min(rank, r)
    return a, a + q + (1 if rank < r else 0)


def rank_slice(
    order: Sequence[int] | np.ndarray[Any, Any], start: int, world_size: int, rank: int, batch_per_rank: int
) -> list[list[int]]:
    """This rank's remaining batches of the epoch from global sample position ``start``.

    Global batches are ``world_size * batch_per_rank`` consecutive samples of ``order[start:]``; rank r
    takes ``[r*B, (r+1)*B)`` of each. A ragged last global batch of T samples is shared contiguously
    (sizes differ by at most one); when T < world_size it is dropped for this epoch. Every rank gets the
    same number of batches; together they cover the samples they take exactly once, whatever
    world_size was used before ``start``. The batches are lists of Python ints (only this rank's share
    is ever turned into them; the order itself stays an array)."""
    if world_size < 1 or batch_per_rank < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"bad rank_slice arguments: world_size={world_size} rank={rank} batch={batch_per_rank}"
        )
    arr = order.array if isinstance(order, EpochOrder) else np.asarray(order, dtype=np.int64)
    rest = arr[max(start, 0) :]
    g = world_size * batch_per_rank
    out: list[list[int]] = []
    for k in range(0, len(rest), g):
        chunk = rest[k : k + g]
        if len(chunk) < world_size:
            break
        a, b = (
            (rank * batch_per_rank, (rank + 1) * batch_per_rank)
            if len(chunk) == g
            else _share(len(chunk), world_size, rank)
        )
        out.append(chunk[a:b].tolist())
    return out


def batches_of(items: list[list[int]], size: int) -> list[list[list[int]]]:
    """Micro-batches grouped into optimizer steps of ``size`` (gradient accumulation)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def num_batches(remaining: int, world_size: int, batch_per_rank: int) -> int:
    """len(rank_slice(...)) for ``remaining`` samples left in the epoch (the same on every rank)."""
    g = world_size * batch_per_rank
    full, tail = divmod(max(remaining, 0), g)
    return full + (1 if tail >= world_size else 0)


def position_after(start: int, batches_done: int, n: int, world_size: int, batch_per_rank: int) -> int:
    """The global sample position after ``batches_done`` batches of ``rank_slice(order, start, ...)``
    (n = len(order)); the epoch's end (n) once its last batch, or a dropped tail, is reached."""
    pos = start + batches_done * world_size * batch_per_rank
    return n if pos >= n or batches_done >= num_batches(n - start, world_size, batch_per_rank) else pos
