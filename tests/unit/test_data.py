"""Unit tests of tauon_train.data: chat / prompt-completion examples, packing, the sample order and
bad rows (in-process, tiny tokenizers and a tiny random Llama; seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tauon_core.errors import (
    EMPTY_DATASET,
    INVALID_DATASET,
    INVALID_LABEL,
    MISSING_COLUMN,
    PermanentError,
)
from tauon_core.sources import bundled_minilm_dir
from tauon_train.config import JobConfig, parse_config
from tauon_train.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    NO_CHAT_TEMPLATE,
    Collator,
    build_datasets,
    disable_kv_cache,
    encode_chat,
    encode_prompt_completion,
    ensure_chat_template,
    epoch_order,
    load_records,
    num_batches,
    parse_label,
    position_after,
    rank_slice,
)

WORDS = (
    "the a cat dog sat ran on under mat rug river hill sun rain red blue green small big quick slow "
    "and then it was very not who what why where is are answer question tell me about"
).split()


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_minilm_dir())


def word_tokenizer() -> Any:
    """A tiny word-level fast tokenizer with an eos token and no special tokens added around text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def job_cfg(data: Path, tmp_path: Path, task: str = "causal-lm", **dataset: Any) -> JobConfig:
    model: dict[str, Any] = {"source": str(tmp_path / "model"), "task": task}
    if task == "sequence-classification":
        model["numLabels"] = 3
    return parse_config(
        {
            "model": model,
            "dataset": {"source": f"file://{data}", "validationSplit": 0.0, **dataset},
            "hyperparameters": {"maxSeqLength": 64, "seed": 7},
            "output": {"storage": str(tmp_path / "out")},
        }
    )


CHAT = [
    {"role": "system", "content": "who is red"},
    {"role": "user", "content": "tell me about the cat"},
    {"role": "assistant", "content": "the cat sat on the mat"},
    {"role": "user", "content": "and the dog"},
    {"role": "assistant", "content": "the dog ran under the hill"},
]


# --- chat ---------------------------------------------------------------------------------------------


def test_default_chat_template_is_set_and_renders_chatml(minilm: Any) -> None:
    tok = minilm
    tok.chat_template = None
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nwho is red<|im_end|>\n"
        "<|im_start|>user\ntell me about the cat<|im_end|>\n"
        "<|im_start|>assistant\nthe cat sat on the mat<|im_end|>\n"
    )
    assert ensure_chat_template(tok) is False  # an existing template is kept


def test_chat_labels_mask_every_non_assistant_token(minilm: Any) -> None:
    tok = minilm
    tok.chat_template = None
    ensure_chat_template(tok)
    ex = encode_chat(tok, CHAT, max_len=512, line=3)
    assert ex is not None
    text = tok.apply_chat_template(CHAT, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]
    # character ranges of the assistant contents and their end-of-turn markers
    allowed: list[tuple[int, int]] = []
    for m in CHAT:
        if m["role"] == "assistant":
            a = text.index(m["content"])
            allowed.append((a, text.index("<|im_end|>\n", a) + len("<|im_end|>\n")))
    contents = [
        (a, a + len(m["content"]))
        for m, (a, _) in zip([m for m in CHAT if m["role"] == "assistant"], allowed, strict=True)
    ]
    for tid, lab, (s, e) in zip(ex.input_ids, ex.labels, enc["offset_mapping"], strict=True):
        inside = any(a <= s and e <= b for a, b in allowed)
        in_content = any(a <= s and e <= b for a, b in contents)
        if not inside:
            assert lab == IGNORE, f"non-assistant token {text[s:e]!r} is a target"
        if in_content:
            assert lab == tid, f"assistant token {text[s:e]!r} is masked"
    kept = tok.decode([t for t in ex.labels if t != IGNORE])
    assert "the cat sat on the mat" in kept and "the dog ran under the hill" in kept
    assert "tell" not in kept and "who" not in kept and "system" not in kept and "user" not in kept


def test_chat_uses_the_tokenizers_own_template(minilm: Any) -> None:
    tok = minilm
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} | {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert ensure_chat_template(tok) is False
    ex = encode_chat(tok, CHAT[1:3], max_len=512)
    assert ex is not None
    kept = tok.decode([t for t in ex.labels if t != IGNORE])
    assert kept.startswith("the cat sat on the mat") and "assistant" not in kept and "tell" not in kept


def test_tokenizer_that_cannot_render_chats_is_permanent() -> None:
    from tokenizers import Tokenizer, models

    raw = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    with pytest.raises(PermanentError) as e:
        ensure_chat_template(raw)
    assert e.value.reason == NO_CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ([{"role": "user", "content": "the cat"}], "no assistant message"),
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "tool"),
        (
            [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}],
            "content must be a string",
        ),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "\ud800"}], "lone surrogate"),
        ("not a list", "not a JSON list"),
        ([], "non-empty list"),
    ],
)
def test_bad_chat_rows_name_their_line(tmp_path: Path, minilm: Any, bad: Any, needle: str) -> None:
    rows = [{"messages": CHAT}, {"messages": CHAT}, {"messages": bad}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(PermanentError) as e:
        build_datasets(job_cfg(data, tmp_path, type="chat"), minilm)
    assert e.value.reason == INVALID_DATASET
    assert f"{data}:4" in e.value.message and needle in e.value.message


def test_chat_missing_field_is_missing_column(tmp_path: Path, minilm: Any) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"msgs": CHAT}])
    with pytest.raises(PermanentError) as e:
        build_datasets(job_cfg(data, tmp_path, type="chat"), minilm)
    assert e.value.reason == MISSING_COLUMN and f"{data}:2" in e.value.message


def test_chat_dataset_items_and_collated_batch(tmp_path: Path, minilm: Any) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    minilm.chat_template = None
    train, val = build_datasets(job_cfg(data, tmp_path, type="chat"), minilm, max_len=512)
    assert val is None and len(train) == 2
    item = train[0]
    assert set(item) == {"input_ids", "labels"} and item["input_ids"].dtype == torch.long
    batch = Collator(minilm.pad_token_id, "causal-lm", False)([train[0], train[1]])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    short = len(train[1]["input_ids"])
    assert (batch["labels"][1, short:] == IGNORE).all() and (batch["attention_mask"][1, short:] == 0).all()


# --- prompt-completion ------------------------------------------------------------------------


def test_prompt_completion_masks_the_prompt_and_appends_eos() -> None:
    tok = word_tokenizer()
    ex = encode_prompt_completion(tok, "tell me about the cat ", "the cat sat on the mat", max_len=64)
    assert ex is not None
    prompt = tok("tell me about the cat ")["input_ids"]
    completion = tok("the cat sat on the mat")["input_ids"]
    assert ex.input_ids == prompt + completion + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt) + completion + [tok.eos_token_id]


def test_prompt_completion_rows_and_truncation(tmp_path: Path) -> None:
    rows = [
        {"prompt": "who sat ", "completion": "the cat"},
        {"prompt": " ".join(["big"] * 80), "completion": "red"},  # completion cut away at maxSeqLength
        {"prompt": "", "completion": "the dog ran"},
    ]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    train, _ = build_datasets(job_cfg(data, tmp_path, type="prompt-completion"), word_tokenizer())
    assert len(train) == 2 and train.dropped == 1 and train.lines == [1, 3]
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "x", "completion": 3}])
    with pytest.raises(PermanentError) as e:
        build_datasets(job_cfg(bad, tmp_path, type="prompt-completion"), word_tokenizer())
    assert e.value.reason == INVALID_DATASET and f"{bad}:2" in e.value.message


# --- packing --------------------------------------------------------------------------------------


def tiny_llama(vocab: int, attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(tmp_path: Path, attn: str) -> None:
    import random

    rng = random.Random(3)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))} for _ in range(12)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    tok = word_tokenizer()
    plain, _ = build_datasets(job_cfg(data, tmp_path), tok, max_len=32)
    packed, _ = build_datasets(job_cfg(data, tmp_path, packing=True), tok, max_len=32)
    assert len(packed) < len(plain) == 12
    for i in range(len(packed)):
        it = packed[i]
        assert len(it["input_ids"]) <= 32 and it["position_ids"][0] == 0
        starts = (it["position_ids"] == 0).nonzero().flatten()
        assert (it["labels"][starts] == IGNORE).all()  # no target across an example boundary
    model = tiny_llama(len(tok), attn)
    disable_kv_cache(model)
    b_plain = Collator(tok.pad_token_id, "causal-lm", False)([plain[i] for i in range(len(plain))])
    b_packed = Collator(tok.pad_token_id, "causal-lm", True)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in b_packed
    n_plain = int((b_plain["labels"][:, 1:] != IGNORE).sum())
    assert n_plain == int((b_packed["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        loss_plain = model(**b_plain).loss
        loss_packed = model(**b_packed).loss
    assert abs(float(loss_plain) - float(loss_packed)) < 1e-4, (float(loss_plain), float(loss_packed))


def test_collator_accepts_the_old_form() -> None:
    items = [{"input_ids": [5, 6, 7]}, {"input_ids": [5]}]
    b = Collator(pad_token_id=0, causal_lm=True)(items)
    assert b["labels"].tolist() == [[5, 6, 7], [5, IGNORE, IGNORE]]
    c = Collator(0, False)([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}])
    assert c["labels"].tolist() == [1, 0] and c["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_classification_items_keep_an_int_label(tmp_path: Path, minilm: Any) -> None:
    data = write_jsonl(
        tmp_path / "s.jsonl", [{"text": "the cat", "label": 2}, {"text": "a dog", "label": "1"}]
    )
    train, val = build_datasets(job_cfg(data, tmp_path, task="sequence-classification"), minilm)
    assert val is None and [train[i]["label"] for i in range(2)] == [2, 1]
    b = Collator(minilm.pad_token_id, "sequence-classification", False)([train[0], train[1]])
    assert b["labels"].tolist() == [2, 1] and b["input_ids"].shape[0] == 2


# --- sample order -----------------------------------------------------------------------------------


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a = epoch_order(50, seed=11, epoch=2)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, 11, 2)
    assert a != epoch_order(50, 11, 3) and a != epoch_order(50, 12, 2)
    # every world size consumes the same global order
    for w in (1, 2, 3, 5):
        flat = [
            i
            for step in zip(*[rank_slice(a, 0, w, r, 2) for r in range(w)], strict=True)
            for b in step
            for i in b
        ]
        dropped = 50 % (2 * w) if 50 % (2 * w) < w else 0
        assert flat == a[: 50 - dropped]


def test_epoch_order_is_an_int64_array_with_the_same_permutation_and_json_batches() -> None:
    for n, seed, epoch in [(0, 1, 0), (1, 1, 0), (1000, 7, 3), (70_001, 11, 2)]:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        expected = torch.randperm(n, generator=g).tolist()  # the order as it was drawn before
        order = epoch_order(n, seed, epoch)
        assert order.array.dtype == np.int64 and order.array.nbytes == 8 * n
        assert order == expected and list(order) == expected and len(order) == n
        if n:
            assert order[n // 2] == expected[n // 2] and type(order[0]) is int
            assert order[3:9] == expected[3:9]
        batches = rank_slice(order, n // 3, 3, 1, 4)
        assert batches == rank_slice(expected, n // 3, 3, 1, 4)
        assert all(type(i) is int for b in batches for i in b)
        assert json.loads(json.dumps(batches)) == batches  # what the sample trace writes
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1) and epoch_order(10, 1, 0) != list(range(10))


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_resume_at_another_world_size_sees_each_remaining_sample_once(new_world: int) -> None:
    n, batch = 38, 3
    order = epoch_order(n, seed=5, epoch=0)
    seen: list[int] = []
    old = [rank_slice(order, 0, 2, r, batch) for r in range(2)]
    done = 4  # batches per rank before the "checkpoint"
    for r in range(2):
        for b in old[r][:done]:
            seen += b
    pos = position_after(0, done, n, 2, batch)
    assert pos == 24 and sorted(seen) == sorted(order[:pos])
    new = [rank_slice(order, pos, new_world, r, batch) for r in range(new_world)]
    assert len({len(x) for x in new}) == 1 and len(new[0]) == num_batches(n - pos, new_world, batch)
    for r in range(new_world):
        for b in new[r]:
            assert b, "no empty batch"
            seen += b
    assert len(seen) == len(set(seen)) == n  # 14 remaining: no tail smaller than the world size
    assert position_after(pos, len(new[0]), n, new_world, batch) == n


def test_ragged_tail_smaller_than_world_size_is_dropped() -> None:
    order = list(range(9))
    slices = [rank_slice(order, 0, 4, r, 2) for r in range(4)]
    assert [len(s) for s in slices] == [1, 1, 1, 1] and num_batches(9, 4, 2) == 1
    assert sorted(i for s in slices for b in s for i in b) == list(range(8))
    tail = [rank_slice(order, 0, 2, r, 4) for r in range(2)]  # 9 = 8 + a tail of 1 < 2
    assert sum(len(b) for s in tail for b in s) == 8
    ragged = [rank_slice(list(range(11)), 0, 2, r, 4) for r in range(2)]  # tail of 3: shares 2 + 1
    assert ragged[0][-1] == [8, 9] and ragged[1][-1] == [10]


# --- labels and files (issue 13) -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "٣", "1" * 5000, True, False, "1.5", "", "0x1", 1.5, [1], {"a": 1}])
def test_bad_labels_are_permanent(value: Any) -> None:
    with pytest.raises(PermanentError) as e:
        parse_label(value, 3, "f.jsonl:9", "label")
    assert e.value.reason == INVALID_LABEL and "f.jsonl:9" in e.value.message and len(e.value.message) < 300


def test_good_labels() -> None:
    assert [parse_label(v, 3, "f:1", "label") for v in (" 2 ", "+1", "00", 2.0, 1)] == [2, 1, 0, 2, 1]


def test_label_rows_in_files(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "²"}\n', encoding="utf-8")
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path, task="sequence-classification").dataset, 3)
    assert e.value.reason == INVALID_LABEL and f"{data}:2" in e.value.message
    data.write_text(
        '{"text": "a", "label": 1}\n{"text": "b", "label": ' + "7" * 5000 + "}\n", encoding="utf-8"
    )
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path, task="sequence-classification").dataset, 3)
    assert e.value.reason == INVALID_DATASET and f"{data}:2" in e.value.message


def test_csv_with_bom_header_reads(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_bytes("\ufefftext,label\nthe cat,1\na dog,0\n".encode())
    recs = load_records(job_cfg(data, tmp_path, task="sequence-classification").dataset, 3)
    assert [(r.text, r.label, r.line) for r in recs] == [("the cat", 1, 2), ("a dog", 0, 3)]


def test_csv_duplicate_column_is_named(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label,text\na,1,b\n", encoding="utf-8")
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path, task="sequence-classification").dataset, 3)
    assert (
        e.value.reason == INVALID_DATASET and "'text'" in e.value.message and "duplicate" in e.value.message
    )


def test_csv_label_rows_and_multiline_cells_keep_line_numbers(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text('text,label\n"two\nlines",1\nok,²\n', encoding="utf-8")
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path, task="sequence-classification").dataset, 3)
    assert e.value.reason == INVALID_LABEL and f"{data}:4" in e.value.message


def test_lone_surrogate_and_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path).dataset, None)
    assert (
        e.value.reason == INVALID_DATASET
        and f"{data}:2" in e.value.message
        and "surrogate" in e.value.message
    )
    data.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(PermanentError) as e:
        load_records(job_cfg(data, tmp_path).dataset, None)
    assert e.value.reason == INVALID_DATASET and f"{data}:3" in e.value.message and "UTF-8" in e.value.message


def test_empty_dataset_after_dropping(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "cat"}, {"text": "dog"}])  # one token each
    with pytest.raises(PermanentError) as e:
        build_datasets(job_cfg(data, tmp_path), word_tokenizer())
    assert e.value.reason == EMPTY_DATASET


# --- the shipped example data -----------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def test_shipped_chat_and_prompt_completion_data_load(tmp_path: Path, minilm: Any) -> None:
    minilm.chat_template = None
    chat, chat_val = build_datasets(
        job_cfg(EXAMPLES / "chat.jsonl", tmp_path, type="chat", validationSplit=0.1), minilm, max_len=256
    )
    assert len(chat) + len(chat_val or []) == 220 and chat.dropped == 0
    pc, _ = build_datasets(
        job_cfg(EXAMPLES / "prompt_completion.jsonl", tmp_path, type="prompt-completion", packing=True),
        minilm,
        max_len=128,
    )
    assert 0 < len(pc) < 160 and pc.dropped == 0
