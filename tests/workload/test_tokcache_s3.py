"""The tokenized-data cache with an ``s3://`` cache root (and an ``s3://`` dataset), against moto's S3 on
loopback: the same items as the in-memory path, read back through ranged reads; a second build that
neither tokenizes nor writes; two ranks that build one entry; a failing shard that fails both ranks the
same way. Seconds."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tauon_core.errors import MISSING_COLUMN, PermanentError
from tauon_train import data, tokcache
from tests.s3store import S3Store, moto_server
from tests.unit.test_tokcache import (
    assert_same,
    count_encodes,
    in_threads,
    job_cfg,
    load_tokenizer,
    make_shards,
)


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    return count_encodes(monkeypatch)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3Store]:
    with moto_server() as s:
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)
        import tempfile

        spool = tmp_path / "spool"
        spool.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where arrays wait for their upload
        yield s


def upload_dir(store: S3Store, local: Path, bucket: str, prefix: str) -> str:
    s3 = store.client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local)}", Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}/"


def objects(store: S3Store, bucket: str) -> dict[str, tuple[str, Any]]:
    s3 = store.client()
    out: dict[str, tuple[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"])
    return out


def s3_cfg(uri: str, tmp_path: Path, kind: str, packing: bool = False, **extra: Any) -> Any:
    cfg = job_cfg(
        tmp_path / "unused", tmp_path / "out", kind, packing, cache={"storage": "s3://cache/tok/"}, **extra
    )
    ds = cfg.dataset
    from dataclasses import replace

    return replace(cfg, dataset=replace(ds, source=uri, path=uri))


@pytest.mark.parametrize("kind,packing", [("chat", True), ("prompt-completion", False)])
def test_s3_cache_gives_the_in_memory_items_and_a_read_only_hit(
    tmp_path: Path,
    store: S3Store,
    encodes: dict[str, int],
    kind: str,
    packing: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.client().create_bucket(Bucket="data")
    store.client().create_bucket(Bucket="cache")
    uri = upload_dir(store, make_shards(tmp_path, kind), "data", "corpus")
    cfg = s3_cfg(uri, tmp_path, kind, packing)
    assert cfg.dataset.cache_storage == "s3://cache/tok/"
    tok = load_tokenizer()
    monkeypatch.setattr(tokcache, "_BLOCK", 256)  # documents straddle blocks; few blocks kept
    monkeypatch.setattr(tokcache, "_BLOCKS", 4)
    train, val = data.build_datasets(cfg, tok)
    assert encodes[kind] == 68 and train.report is not None and not train.report.cache_hit
    mem_train, mem_val = data.build_datasets(cfg, tok, use_cache=False)
    assert_same(train, mem_train)
    assert_same(val, mem_val)
    assert isinstance(train, data.CorpusDataset) and isinstance(train.corpus.arrays, tokcache._RemoteArrays)
    assert len(train.corpus.arrays.blocks) <= 4
    key = train.report.cache_key
    before = objects(store, "cache")
    assert f"tok/{key}/index.json" in before and f"tok/{key}/shard-000002.targets" in before
    assert not [k for k in before if ".tmp-" in k or k.endswith(".progress.json")]
    assert not list((tmp_path / "spool").iterdir())  # the local spool is cleaned up

    encodes[kind] = 0
    again, again_val = data.build_datasets(cfg, load_tokenizer())
    assert encodes[kind] == 0 and again.report is not None and again.report.cache_hit
    assert objects(store, "cache") == before  # nothing written
    assert_same(again, mem_train)
    assert_same(again_val, mem_val)
    index = json.loads(store.client().get_object(Bucket="cache", Key=f"tok/{key}/index.json")["Body"].read())
    assert index["documents"] == 68 and [s["name"] for s in index["shards"]][-1] == "sub/part-4.jsonl"


def test_two_ranks_share_an_s3_entry_and_fail_alike(
    tmp_path: Path, store: S3Store, encodes: dict[str, int]
) -> None:
    store.client().create_bucket(Bucket="data")
    store.client().create_bucket(Bucket="cache")
    uri = upload_dir(store, make_shards(tmp_path, "text"), "data", "corpus")
    cfg = s3_cfg(uri, tmp_path, "text", packing=True)
    results = in_threads(
        *(lambda r=r: data.build_datasets(cfg, load_tokenizer(), rank=r, world=2) for r in range(2))
    )
    assert all(isinstance(r, tuple) for r in results), results
    assert encodes["text"] == 68
    mem = data.build_datasets(cfg, load_tokenizer(), use_cache=False)
    for train, val in results:
        assert_same(train, mem[0])
        assert_same(val, mem[1])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "p0.jsonl").write_text('{"text": "the cat sat"}\n' * 3)
    (bad / "p1.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a dog"}\n{"nope": 1}\n'))
    (bad / "p2.jsonl").write_text('{"text": "the sun"}\n')
    bad_uri = upload_dir(store, bad, "data", "bad")
    bad_cfg = s3_cfg(bad_uri, tmp_path, "text")
    errors = in_threads(
        *(lambda r=r: data.build_datasets(bad_cfg, load_tokenizer(), rank=r, world=2) for r in range(2))
    )
    assert all(isinstance(e, PermanentError) for e in errors), errors
    assert {(e.reason, e.message) for e in errors} == {
        (MISSING_COLUMN, "s3://data/bad/p1.jsonl.gz:2: field 'text' missing")
    }
    assert any(k.endswith("shard-000001.error.json") for k in objects(store, "cache"))
