"""The tokenized-data cache (tauon_train.tokcache) against the in-memory path of tauon_train.data: the same
items in the same order and split, a second build that reads only, ranks that build one entry together
(threads with rank/world arguments), failures every rank reports the same way, and partial entries that
are rebuilt (local disk; the s3:// cache is tests/workload/test_tokcache_s3.py). Seconds."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tauon_core.errors import EMPTY_DATASET, INVALID_DATASET, MISSING_COLUMN, PermanentError, RetryableError
from tauon_train import data, shards, tokcache
from tauon_train.config import JobConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
WORDS = (
    "the a cat dog sat ran on under mat rug river hill sun rain red blue green small big quick slow "
    "and then it was very not who what why where is are answer question tell me about"
).split()
MAX_LEN = 48


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer()


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _row(kind: str, rng: random.Random, i: int) -> dict[str, Any]:
    if kind == "text":
        return {"text": _words(rng, 1, 30), "id": i}
    if kind == "prompt-completion":
        long = i % 9 == 4  # a prompt past maxSeqLength: nothing to learn, a zero-length document
        return {
            "prompt": _words(rng, 60 if long else 1, 70 if long else 12) + " ",
            "completion": _words(rng, 1, 10),
        }
    turns = [{"role": "system", "content": _words(rng, 1, 4)}] if i % 3 == 0 else []
    for _ in range(rng.randint(1, 2)):
        turns.append({"role": "user", "content": _words(rng, 1, 8 if i % 7 else 60)})
        turns.append({"role": "assistant", "content": _words(rng, 1, 8)})
    return {"messages": turns}


def make_shards(root: Path, kind: str, seed: int = 0) -> Path:
    """A directory of 5 shards: plain, blank lines, two gzip members, no trailing newline, a nested one."""
    rng = random.Random(seed)
    rows = iter(_row(kind, rng, i) for i in range(10_000))

    def lines(n: int) -> bytes:
        return b"".join(json.dumps(next(rows)).encode() + b"\n" for _ in range(n))

    d = root / f"data-{kind}"
    (d / "sub").mkdir(parents=True)
    (d / "part-0.jsonl").write_bytes(lines(17))
    (d / "part-1.jsonl").write_bytes(b"\n" + lines(5) + b"\n\n" + lines(9))
    (d / "part-2.jsonl.gz").write_bytes(gzip.compress(lines(11)) + gzip.compress(lines(6)))
    (d / "part-3.jsonl").write_bytes(lines(12).rstrip(b"\n"))
    (d / "sub" / "part-4.jsonl").write_bytes(lines(8))
    (d / "README.md").write_text("not a shard")
    return d


def job_cfg(src: Path, out: Path, kind: str = "text", packing: bool = False, **dataset: Any) -> JobConfig:
    return parse_config(
        {
            "model": {"source": str(out / "model"), "task": "causal-lm"},
            "dataset": {
                "source": f"file://{src}",
                "type": kind,
                "packing": packing,
                "validationSplit": 0.2,
                **dataset,
            },
            "hyperparameters": {"maxSeqLength": MAX_LEN, "seed": 11},
            "output": {"storage": str(out)},
        }
    )


def assert_same(a: data.SequenceDataset | None, b: data.SequenceDataset | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys(), i
        for k in x:
            assert x[k].dtype == y[k].dtype == torch.long, (i, k)
            assert torch.equal(x[k], y[k]), (i, k)
    assert a.lines == b.lines and a.dropped == b.dropped and a.num_tokens() == b.num_tokens()


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    return count_encodes(monkeypatch)


def count_encodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times data's encode_* functions run (every thread counted); short waits for other ranks."""
    counts = {"text": 0, "chat": 0, "prompt-completion": 0}
    lock = threading.Lock()

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(data, "encode_text", counting("text", data.encode_text))
    monkeypatch.setattr(data, "encode_chat", counting("chat", data.encode_chat))
    monkeypatch.setattr(
        data, "encode_prompt_completion", counting("prompt-completion", data.encode_prompt_completion)
    )
    monkeypatch.setattr(tokcache, "_POLL_S", 0.05)
    monkeypatch.setenv("TAUON_DATA_CACHE_TIMEOUT", "20")  # a rank that waits in vain fails the test soon
    return counts


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` concurrently; each result, or the exception it raised."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except BaseException as e:  # returned to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# --- equivalence with the in-memory path --------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("kind", ["text", "chat", "prompt-completion"])
def test_cached_items_split_and_order_equal_the_in_memory_path(
    tmp_path: Path, tok: Any, kind: str, packing: bool
) -> None:
    src = make_shards(tmp_path, kind)
    cfg = job_cfg(src, tmp_path / "out", kind, packing)
    mem_train, mem_val = data.build_datasets(cfg, tok, use_cache=False)
    train, val = data.build_datasets(cfg, tok)
    assert isinstance(train, data.CorpusDataset) and not isinstance(mem_train, data.CorpusDataset)
    assert_same(train, mem_train)
    assert_same(val, mem_val)
    report = train.report
    assert report is not None and report.shards == 5 and report.documents == 68 and not report.cache_hit
    assert report.tokens == sum(len(train.corpus.ids(i)) for i in range(train.corpus.documents))
    if kind == "prompt-completion":
        assert train.dropped + (val.dropped if val else 0) > 0  # zero-length documents kept their place
    # rows keep their identity: lines counted across the shards as load_rows counts them
    rows = data.load_rows(cfg.dataset, data._causal_fields(cfg.dataset))
    assert [train.corpus.line(i) for i in range(train.corpus.documents)] == [r.line for r in rows]


def test_text_corpus_stores_no_targets_and_csv_shards_match(tmp_path: Path, tok: Any) -> None:
    src = tmp_path / "csv"
    src.mkdir()
    (src / "a.csv").write_bytes(
        b'text,n\r\n"the cat\r\nsat on the mat",1\r\nthe dog ran,2\r\n\r\nred sun,3\r\n'
    )
    (src / "b.csv.gz").write_bytes(
        gzip.compress('\ufefftext\n"a ""quoted"" hill",1\nblue rain\rand sun\n'.encode())
    )
    cfg = job_cfg(src, tmp_path / "out", "text", validationSplit=0.0, format="csv")
    train, _ = data.build_datasets(cfg, tok)
    mem, _ = data.build_datasets(cfg, tok, use_cache=False)
    assert_same(train, mem)
    assert isinstance(train, data.CorpusDataset) and train.corpus.targets(0) is None
    entry = next((tmp_path / "out" / "data-cache").iterdir())
    assert not list(entry.glob("*.targets")) and len(list(entry.glob("*.ids"))) == 2


def test_split_arrays_equal_split_indices() -> None:
    for n, split, seed in [(1, 0.0, 1), (2, 0.5, 3), (10, 0.1, 42), (1000, 0.25, 7), (12345, 0.01, 9)]:
        tr, va = data.split_arrays(n, split, seed)
        assert (tr.tolist(), va.tolist()) == data.split_indices(n, split, seed)
    with pytest.raises(PermanentError) as e:
        data.split_arrays(1, 1.0, 0, "p")
    assert e.value.reason == EMPTY_DATASET


def test_pack_bounds_equal_pack() -> None:
    rng = random.Random(5)
    lengths = [rng.randint(1, 40) for _ in range(500)] + [90, 3]  # one longer than a block
    examples = [data.Example(list(range(n)), list(range(n)), 0) for n in lengths]
    blocks = data.pack(examples, 64)
    bounds = data.pack_bounds(np.array(lengths), 64)
    assert len(bounds) == len(blocks) + 1
    assert [len(b["input_ids"]) for b in blocks] == [
        sum(lengths[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    assert data.pack_bounds(np.array([], dtype=np.int64), 64).tolist() == [0]  # no block


def test_streamed_lines_equal_the_whole_text(tmp_path: Path) -> None:
    body = '\ufeff{"a": 1}\r\n\n{"b": "é\u2028x"}\nlast'.encode()
    for name, raw in [("p.jsonl", body), ("p.jsonl.gz", gzip.compress(body[:9]) + gzip.compress(body[9:]))]:
        (tmp_path / name).write_bytes(raw)
        shard = shards.list_shards(str(tmp_path / name), "jsonl")[0]
        streamed = list(shards.iter_lines(shard))
        assert "".join(streamed) == shards.read_text(shard)
        assert [x.removesuffix("\n") for x in streamed] == shards.read_text(shard).split("\n")
    text = 'h\r\n"x\ry"\r\na\rb\n\nc\r\r\nend'
    lines = [x + "\n" for x in text.split("\n")[:-1]] + [text.split("\n")[-1]]
    assert list(data._csv_lines(lines)) == list(io.StringIO(text, newline=""))


def test_streamed_utf8_errors_name_shard_line_and_byte(tmp_path: Path) -> None:
    raw = b'\xef\xbb\xbf{"text": "fine"}\n{"text": "ok"}\n{"text": "\xff"}\n'
    (tmp_path / "u.jsonl").write_bytes(raw)
    shard = shards.list_shards(str(tmp_path / "u.jsonl"), "jsonl")[0]
    with pytest.raises(PermanentError) as whole:
        shards.read_text(shard)
    with pytest.raises(PermanentError) as streamed:
        list(shards.iter_lines(shard))
    assert streamed.value.message == whole.value.message
    assert whole.value.message.startswith(f"{tmp_path / 'u.jsonl'}:3: not UTF-8 text")


def test_gzip_bomb_is_streamed_in_bounded_pieces(tmp_path: Path) -> None:
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b"\n" * (40 << 20)))
    shard = shards.list_shards(str(tmp_path / "z.jsonl.gz"), "jsonl")[0]
    sizes = [len(c) for c in shards.iter_bytes(shard)]
    assert sum(sizes) == 40 << 20 and max(sizes) <= 4 << 20


# --- hits and partial entries ----------------------------------------------------------------------


def test_second_build_is_a_hit_that_writes_and_tokenizes_nothing(
    tmp_path: Path, tok: Any, encodes: dict[str, int]
) -> None:
    src = make_shards(tmp_path, "chat")
    cfg = job_cfg(src, tmp_path / "out", "chat", packing=True)
    first, _ = data.build_datasets(cfg, tok)
    assert encodes["chat"] == 68 and first.report is not None and not first.report.cache_hit
    cache = tmp_path / "out" / "data-cache"
    before = tree(cache)
    assert {Path(p).name for p in before} >= {"index.json", "shard-000004.done.json", "shard-000004.targets"}
    assert not [p for p in before if ".tmp-" in p or p.endswith(".progress.json")]
    again, val = data.build_datasets(cfg, tok)
    assert encodes["chat"] == 68  # nothing tokenized
    assert tree(cache) == before  # nothing written: same files, bytes and mtimes
    report = again.report
    assert report is not None and report.cache_hit and report.tokenize_seconds == 0
    assert report.cache_key == first.report.cache_key and report.metrics()["cacheHit"] is True
    assert_same(again, first)
    # another split, seed or world size reuses the entry; another maxSeqLength does not
    other = job_cfg(src, tmp_path / "out", "chat", packing=True, validationSplit=0.5)
    data.build_datasets(other, tok, rank=1, world=3)
    assert encodes["chat"] == 68
    data.build_datasets(job_cfg(src, tmp_path / "out", "chat", packing=True), tok, max_len=40)
    assert encodes["chat"] == 2 * 68 and len(list(cache.iterdir())) == 2


def test_key_follows_content_tokenizer_and_fields(tmp_path: Path) -> None:
    src = make_shards(tmp_path, "text")
    cfg = job_cfg(src, tmp_path / "out")
    tok = load_tokenizer()

    def key(c: JobConfig, t: Any = tok) -> str | None:
        report = data.build_datasets(c, t)[0].report
        assert report is not None
        return report.cache_key

    k0 = key(cfg)
    tok.backend_tokenizer.enable_truncation(7)  # state a call leaves behind is not part of the key
    assert key(cfg) == k0
    assert key(job_cfg(src, tmp_path / "elsewhere")) == k0  # the cache root is not part of the key
    assert key(job_cfg(src, tmp_path / "out", packing=True)) != k0
    assert key(job_cfg(src, tmp_path / "out"), load_tokenizer()) == k0  # the same files, the same key
    other = load_tokenizer()
    other.add_tokens(["zebra"])
    assert key(cfg, other) != k0
    (src / "part-0.jsonl").write_bytes((src / "part-0.jsonl").read_bytes() + b'{"text": "one more row"}\n')
    assert key(cfg) != k0


def test_partially_written_entry_is_rebuilt(tmp_path: Path, tok: Any, encodes: dict[str, int]) -> None:
    src = make_shards(tmp_path, "prompt-completion")
    cfg = job_cfg(src, tmp_path / "out", "prompt-completion")
    good, good_val = data.build_datasets(cfg, tok)
    entry = next((tmp_path / "out" / "data-cache").iterdir())
    # a crash after shard 1's arrays and before its marker (and before the index)
    (entry / "index.json").unlink()
    (entry / "shard-000001.done.json").unlink()
    (entry / "shard-000001.ids").write_bytes(b"\x00" * 6)
    (entry / ".shard-000001.ids.tmp-1-dead").write_bytes(b"junk")
    encodes["prompt-completion"] = 0
    again, val = data.build_datasets(cfg, tok)
    assert encodes["prompt-completion"] == 14  # shard 1 only
    assert again.report is not None and not again.report.cache_hit
    assert_same(again, good)
    assert_same(val, good_val)
    # an index that is not this entry's is not trusted either
    (entry / "index.json").write_text('{"format": 1, "key": "another"}')
    data.build_datasets(cfg, tok)
    assert json.loads((entry / "index.json").read_text())["key"] == entry.name


# --- ranks ---------------------------------------------------------------------------------------------


def test_two_ranks_build_one_entry_each_shard_once(tmp_path: Path, encodes: dict[str, int]) -> None:
    src = make_shards(tmp_path, "text")
    cfg = job_cfg(src, tmp_path / "out", packing=True)
    results = in_threads(
        *(lambda r=r: data.build_datasets(cfg, load_tokenizer(), rank=r, world=2) for r in range(2))
    )
    assert all(isinstance(r, tuple) for r in results), results
    assert encodes["text"] == 68  # every shard tokenized by one rank
    mem = data.build_datasets(cfg, load_tokenizer(), use_cache=False)
    for train, val in results:
        assert_same(train, mem[0])
        assert_same(val, mem[1])
    entries = list((tmp_path / "out" / "data-cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "index.json").exists()


def test_concurrent_writers_of_every_shard_leave_one_valid_entry(
    tmp_path: Path, encodes: dict[str, int]
) -> None:
    """Two jobs (each a single rank) with the same key write the same files at the same time."""
    src = make_shards(tmp_path, "chat")
    cfg = job_cfg(src, tmp_path / "out", "chat")
    results = in_threads(*(lambda: data.build_datasets(cfg, load_tokenizer()) for _ in range(3)))
    assert all(isinstance(r, tuple) for r in results), results
    mem = data.build_datasets(cfg, load_tokenizer(), use_cache=False)
    for train, val in results:
        assert_same(train, mem[0])
        assert_same(val, mem[1])
    entry = next((tmp_path / "out" / "data-cache").iterdir())
    assert not [p for p in entry.iterdir() if ".tmp-" in p.name]
    hit, _ = data.build_datasets(cfg, load_tokenizer())
    assert hit.report is not None and hit.report.cache_hit


def _bad_shards(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(4):
        rows = [{"text": f"the cat sat {j}"} for j in range(6)]
        if i == 1:
            rows[3] = {"txt": "no text field"}
        if i == 2:
            rows[1] = {"text": 5}
        (d / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_a_failing_shard_fails_every_rank_identically(tmp_path: Path, encodes: dict[str, int]) -> None:
    src = _bad_shards(tmp_path)
    cfg = job_cfg(src, tmp_path / "out")
    results = in_threads(
        *(lambda r=r: data.build_datasets(cfg, load_tokenizer(), rank=r, world=3) for r in range(3))
    )
    assert all(isinstance(r, PermanentError) for r in results), results
    # the lowest-numbered failed shard decides (shard 2 fails too, on rank 2)
    assert {(e.reason, e.message) for e in results} == {
        (MISSING_COLUMN, f"{src / 'part-1.jsonl'}:4: field 'text' missing")
    }
    with pytest.raises(PermanentError) as mem:
        data.build_datasets(cfg, load_tokenizer(), use_cache=False)
    assert mem.value.reason == MISSING_COLUMN and "part-1.jsonl:4" in mem.value.message
    entry = next((tmp_path / "out" / "data-cache").iterdir())
    assert not (entry / "index.json").exists() and (entry / "shard-000001.error.json").exists()
    # fixed data is another key; an error marker of the data is trusted by a rank that waits on it
    marker = json.loads((entry / "shard-000001.error.json").read_text())
    assert marker["deterministic"] is True and marker["reason"] == MISSING_COLUMN


def test_run_scoped_error_markers_are_retried_by_a_new_run(
    tmp_path: Path, tok: Any, encodes: dict[str, int]
) -> None:
    src = make_shards(tmp_path, "text")
    cfg = job_cfg(src, tmp_path / "out")
    train, _ = data.build_datasets(cfg, tok)
    assert train.report is not None
    entry = tmp_path / "out" / "data-cache" / train.report.cache_key
    (entry / "index.json").unlink()
    (entry / "shard-000001.done.json").unlink()
    stale = {
        "format": 1,
        "key": entry.name,
        "shard": 1,
        "name": "part-1.jsonl",
        "reason": "StorageAccessDenied",
        "message": "old credentials",
        "retryable": False,
        "deterministic": False,
        "run": "u:0::",
    }
    (entry / "shard-000001.error.json").write_text(json.dumps(stale))
    # rank 0 of 2 waits for shard 1 (rank 1's): it does not trust another run's storage error...
    with pytest.raises(RetryableError) as e:
        tokcache.build(
            str(tmp_path / "out" / "data-cache"),
            entry.name,
            shards.list_shards(str(src), "jsonl"),
            [f"part-{i}.jsonl" for i in range(4)] + ["sub/part-4.jsonl"],
            data.shard_encoder(cfg.dataset, tok, MAX_LEN),
            False,
            rank=0,
            world=2,
            run="u:1::",
            poll_s=0.05,
            timeout_s=1.0,
        )
    assert e.value.reason == tokcache.DATA_CACHE_TIMEOUT
    # ...while the same run's marker decides at once
    with pytest.raises(PermanentError) as p:
        tokcache.build(
            str(tmp_path / "out" / "data-cache"),
            entry.name,
            shards.list_shards(str(src), "jsonl"),
            [f"part-{i}.jsonl" for i in range(4)] + ["sub/part-4.jsonl"],
            data.shard_encoder(cfg.dataset, tok, MAX_LEN),
            False,
            rank=0,
            world=2,
            run="u:0::",
            poll_s=0.05,
            timeout_s=30.0,
        )
    assert (p.value.reason, p.value.message) == ("StorageAccessDenied", "old credentials")
    # the shard's owner retries it whatever the marker says, and clears it
    again, _ = data.build_datasets(cfg, tok, attempt=1)
    assert again.report is not None and not again.report.cache_hit
    assert not (entry / "shard-000001.error.json").exists() and (entry / "index.json").exists()


def test_errors_match_the_in_memory_path(tmp_path: Path, tok: Any) -> None:
    data_file = tmp_path / "t.jsonl"
    data_file.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    for use_cache in (True, False):
        with pytest.raises(PermanentError) as e:
            data.build_datasets(job_cfg(data_file, tmp_path / "out"), tok, use_cache=use_cache)
        assert e.value.reason == INVALID_DATASET and f"{data_file}:2" in e.value.message
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.jsonl").write_text("\n\n")
    (blank / "b.jsonl").write_text("")
    for use_cache in (True, False):
        with pytest.raises(PermanentError) as e:
            data.build_datasets(job_cfg(blank, tmp_path / "out"), tok, use_cache=use_cache)
        assert (e.value.reason, e.value.message) == (EMPTY_DATASET, f"{blank}: no rows")


def test_remote_style_block_reads_match_local_reads(
    tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranged-read reader (s3 entries) on a local entry, with blocks small enough to split documents."""
    src = make_shards(tmp_path, "chat")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out", "chat"), tok)
    assert isinstance(train, data.CorpusDataset)
    corpus = train.corpus
    monkeypatch.setattr(tokcache, "_BLOCK", 64)
    monkeypatch.setattr(tokcache, "_BLOCKS", 3)
    remote = tokcache._RemoteArrays(corpus.entry)
    local = corpus.arrays
    for d in range(corpus.documents):
        s, a, b = corpus._locate(d)
        for kind in ("ids", "targets"):
            name = f"shard-{s:06d}.{kind}"
            assert remote.slice(name, kind, a, b).tolist() == local.slice(name, kind, a, b).tolist()
    assert len(remote.blocks) <= 3


def iter_docs(corpus: tokcache.TokenizedCorpus) -> Iterator[list[int]]:
    for d in range(corpus.documents):
        yield corpus.ids(d).tolist()


def test_documents_survive_reopening_from_the_index(tmp_path: Path, tok: Any) -> None:
    src = make_shards(tmp_path, "text")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out"), tok)
    assert isinstance(train, data.CorpusDataset)
    entry = train.corpus.entry
    index = json.loads(Path(entry.path("index.json")).read_text())
    reopened = tokcache.TokenizedCorpus(tokcache.Entry(entry.root, entry.key), index)
    assert list(iter_docs(reopened)) == list(iter_docs(train.corpus))
    assert index["documents"] == 68 and index["tokens"] == reopened.tokens
    assert sorted(os.listdir(entry.uri))[:3] == ["index.json", "shard-000000.done.json", "shard-000000.ids"]


def test_dataset_cache_storage_is_parsed(tmp_path: Path) -> None:
    from tauon_core.errors import INVALID_CONFIG

    def cache(value: Any) -> str:
        return job_cfg(tmp_path, tmp_path / "out", cache=value).dataset.cache_storage

    assert job_cfg(tmp_path, tmp_path / "out").dataset.cache_storage == ""  # the default, under the output
    assert data.default_cache_root(job_cfg(tmp_path, tmp_path / "out")) == str(
        tmp_path / "out" / "data-cache"
    )
    assert cache({"storage": "s3://corpora/tauon-cache/"}) == "s3://corpora/tauon-cache/"
    assert cache({"storage": f"file://{tmp_path}/c"}) == f"{tmp_path}/c"
    assert cache({"storage": "s3://b/c", "path": "/mnt/cache"}) == "/mnt/cache"  # the operator's mount wins
    assert cache({}) == ""
    for bad in ["s3://b/c", {"storage": "gs://b/c"}, {"storage": ""}, {"storage": "pvc://claim/c"}]:
        with pytest.raises(PermanentError) as e:
            cache(bad)
        assert e.value.reason == INVALID_CONFIG and "dataset.cache" in e.value.message


def _parquet(cfg: JobConfig) -> JobConfig:
    from dataclasses import replace

    return replace(cfg, dataset=replace(cfg.dataset, format="parquet"))


@pytest.mark.parametrize("kind", ["text", "chat", "prompt-completion"])
def test_parquet_shards_tokenize_as_the_same_rows_in_jsonl(
    tmp_path: Path, tok: Any, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rows as jsonl shards and as parquet shards (several row groups, record batches smaller
    than a row group): the same documents, token for token, target for target; and the parquet entry
    gives the in-memory path's items."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    rows = [_row(kind, rng, i) for i in range(40)]
    jd, pd = tmp_path / "jsonl", tmp_path / "parquet"
    jd.mkdir()
    pd.mkdir()
    for k, (a, b, group) in enumerate([(0, 25, 4), (25, 40, 6)]):
        (jd / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[a:b]))
        pq.write_table(pa.Table.from_pylist(rows[a:b]), pd / f"part-{k}.parquet", row_group_size=group)
    assert pq.ParquetFile(pd / "part-0.parquet").num_row_groups == 7
    monkeypatch.setattr(shards, "PARQUET_BATCH_ROWS", 3)
    jcfg = job_cfg(jd, tmp_path / "out-j", kind, validationSplit=0.0)
    pcfg = _parquet(job_cfg(pd, tmp_path / "out-p", kind, validationSplit=0.2))
    jtrain, _ = data.build_datasets(jcfg, tok)
    ptrain, pval = data.build_datasets(pcfg, tok)
    assert isinstance(jtrain, data.CorpusDataset) and isinstance(ptrain, data.CorpusDataset)

    def docs(c: tokcache.TokenizedCorpus) -> list[tuple[list[int], list[int] | None]]:
        return [(i.tolist(), None if t is None else t.tolist()) for i, t, _ in tokcache.iter_documents(c)]

    assert ptrain.corpus.documents == 40 and docs(ptrain.corpus) == docs(jtrain.corpus)
    assert [ptrain.corpus.line(d) for d in range(40)] == list(range(1, 41))  # rows counted across shards
    mem_train, mem_val = data.build_datasets(pcfg, tok, use_cache=False)
    assert_same(ptrain, mem_train)
    assert_same(pval, mem_val)


def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tauon-readahead")]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks small enough that documents straddle them and a scan crosses many."""
    monkeypatch.setattr(tokcache, "_BLOCK", 64)
    monkeypatch.setattr(tokcache, "_BLOCKS", 8)
    monkeypatch.setattr(tokcache, "_AHEAD", 3)
    monkeypatch.setattr(tokcache, "_PENDING", 6)


def test_read_ahead_gives_the_bytes_of_direct_reads_and_close_joins_its_threads(
    tmp_path: Path, tok: Any, small_blocks: None
) -> None:
    """The ranged-read reader (s3 entries) on a local entry: sequential runs (read ahead), random jumps,
    multi-block reads and explicit prefetches, all compared with positioned reads of the same files."""
    src = make_shards(tmp_path, "chat")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out", "chat"), tok)
    assert isinstance(train, data.CorpusDataset)
    corpus, local = train.corpus, train.corpus.arrays
    remote = tokcache._RemoteArrays(corpus.entry, corpus.limits)
    background = []
    fetch = remote._fetch_run

    def counted(name: str, first: int, last: int) -> dict[tuple[str, int], bytes]:
        if threading.current_thread().name.startswith("tauon-readahead"):
            background.append((name, first, last))
        return fetch(name, first, last)

    remote._fetch_run = counted  # type: ignore[method-assign]
    try:
        _random_and_sequential_reads(corpus, local, remote, random.Random(1))
        assert _readahead_threads()
    finally:
        remote.close()
    assert any(last > first for _, first, last in background), "nothing was read ahead in runs"
    assert all(first * 64 < corpus.limits[name] for name, first, _ in background)  # never past the end
    assert not _readahead_threads()
    s, a, b = corpus._locate(corpus.documents - 1)
    assert (
        remote.slice(f"shard-{s:06d}.ids", "ids", a, b).tolist() == corpus.ids(corpus.documents - 1).tolist()
    )
    assert not _readahead_threads()  # reads after close work, without threads


def _random_and_sequential_reads(
    corpus: tokcache.TokenizedCorpus, local: Any, remote: tokcache._RemoteArrays, rng: random.Random
) -> None:
    for _ in range(60):
        d = rng.randrange(corpus.documents)
        for doc in range(d, min(d + rng.randint(1, 12), corpus.documents)):  # a run, then a jump
            s, a, b = corpus._locate(doc)
            if rng.random() < 0.2:
                remote.prefetch(f"shard-{s:06d}.ids", "ids", a, b)
            for kind in ("ids", "targets"):
                name = f"shard-{s:06d}.{kind}"
                assert remote.slice(name, kind, a, b).tolist() == local.slice(name, kind, a, b).tolist()
        s = rng.randrange(corpus.num_shards)
        n = corpus.limits[f"shard-{s:06d}.ids"] // 4
        a = rng.randrange(n)
        b = rng.randint(a, n)
        name = f"shard-{s:06d}.ids"
        assert remote.slice(name, "ids", a, b).tolist() == local.slice(name, "ids", a, b).tolist()
        assert len(remote.blocks) <= 8 and len(remote.pending) <= 6


def test_a_failed_read_ahead_raises_on_the_read_that_needs_its_block(
    tmp_path: Path, tok: Any, small_blocks: None
) -> None:
    from tauon_core import storage

    src = make_shards(tmp_path, "text")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out"), tok)
    assert isinstance(train, data.CorpusDataset)
    corpus = train.corpus
    ids = "shard-000000.ids"
    assert corpus.limits[ids] >= 64 * 8
    entry = tokcache.Entry(corpus.entry.root, corpus.entry.key)
    read = entry.read

    def failing(name: str, start: int | None = None, end: int | None = None) -> bytes | None:
        background = threading.current_thread().name.startswith("tauon-readahead")
        if background and name == ids and (start or 0) <= 3 * 64 < (end or 0):  # a read of block 3
            raise storage.StorageUnreachable(entry.path(name), "ConnectionResetError")
        return read(name, start, end)

    def same(a: int, b: int) -> bool:
        return bool(remote.slice(ids, "ids", a, b).tolist() == corpus.arrays.slice(ids, "ids", a, b).tolist())

    entry.read = failing  # type: ignore[method-assign]
    remote = tokcache._RemoteArrays(entry, corpus.limits)
    try:
        assert same(0, 16) and same(16, 32)  # blocks 0, 1 in order: 1 continues 0, so 2..4 are read ahead
        assert {(ids, 2), (ids, 3), (ids, 4)} <= set(remote.pending) | set(remote.blocks)
        with pytest.raises(RetryableError) as e:
            remote.slice(ids, "ids", 48, 50)  # block 3 (a jump: nothing new is read ahead): its fetch failed
        assert e.value.reason == storage.STORAGE_UNREACHABLE and entry.path(ids) in e.value.message
        # raised once: the next reads of the failed run's blocks ask the store again (and get them)
        assert same(48, 50) and same(32, 34) and same(64, 66)
    finally:
        remote.close()
    assert not _readahead_threads()


def test_prefetched_items_are_the_items(tmp_path: Path, tok: Any, small_blocks: None) -> None:
    """``CorpusDataset.__getitems__`` (prefetch, then read) on an s3-style reader: the same items."""
    src = make_shards(tmp_path, "prompt-completion")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out", "prompt-completion", True), tok)
    assert isinstance(train, data.CorpusDataset) and train.blocks is not None
    expected = [train[i] for i in range(len(train))]
    train.corpus.arrays = tokcache._RemoteArrays(train.corpus.entry, train.corpus.limits)
    order = list(range(len(train)))
    random.Random(2).shuffle(order)
    for k in range(0, len(order), 3):
        train.prefetch(order[k + 3 : k + 6])  # the next micro-batch, as a loader would
        got = train.__getitems__(order[k : k + 3])
        for i, item in zip(order[k : k + 3], got, strict=True):
            assert item.keys() == expected[i].keys()
            assert all(torch.equal(item[key], expected[i][key]) for key in item)
    train.corpus.close()
    assert not _readahead_threads()


def test_a_forked_child_never_waits_for_its_parents_read_ahead(
    tmp_path: Path, tok: Any, small_blocks: None
) -> None:
    """A DataLoader worker forked while blocks were in flight: those fetches run in the parent only."""
    from concurrent.futures import Future, ThreadPoolExecutor

    src = make_shards(tmp_path, "text")
    train, _ = data.build_datasets(job_cfg(src, tmp_path / "out"), tok)
    assert isinstance(train, data.CorpusDataset)
    corpus = train.corpus
    remote = tokcache._RemoteArrays(corpus.entry, corpus.limits)
    ids = "shard-000000.ids"
    never: Future[bytes] = Future()  # the parent's fetch: never completes in the child
    parent = ThreadPoolExecutor(1)
    remote.pool, remote.pool_pid, remote.pending = parent, -1, {(ids, 0): never}
    try:
        assert remote.slice(ids, "ids", 0, 5).tolist() == corpus.arrays.slice(ids, "ids", 0, 5).tolist()
        assert remote.pending == {} and remote.pool is None
    finally:
        parent.shutdown()
        remote.close()
