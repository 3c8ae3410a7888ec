"""Datasets of shards in object storage: a real SeaweedFS on loopback, the real trainer under torchrun.

The shipped corpus is cut into 4 shards (one gzipped) and uploaded; a 2-rank fsdp pre-training job reads
them from the store and must see exactly the samples, in exactly the order, that the same job sees from
the single local file. Bad shards fail with the named error, the shard and the line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tauon_core.errors import EMPTY_DATASET, INVALID_DATASET, PermanentError
from tauon_train import data
from tauon_train.config import DatasetConfig
from tests.s3store import S3Store, seaweedfs
from tests.workload.helpers import CORPUS, PYTHON, env, llama_job, metrics, run, torchrun_cmd, write_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store() -> Iterator[S3Store]:
    with seaweedfs() as s:
        yield s


def _upload_shards(store: S3Store, bucket: str, prefix: str) -> list[str]:
    """corpus.jsonl cut into 4 shards of 50 lines, the third gzipped, plus a README that is not data."""
    s3 = store.client()
    s3.create_bucket(Bucket=bucket)
    lines = CORPUS.read_text().splitlines(keepends=True)
    keys = []
    for i in range(4):
        body = "".join(lines[i * 50 : (i + 1) * 50]).encode()
        key = f"{prefix}/part-{i}.jsonl" + (".gz" if i == 2 else "")
        s3.put_object(Bucket=bucket, Key=key, Body=gzip.compress(body) if i == 2 else body)
        keys.append(key)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/README.md", Body=b"# not a shard\n")
    return keys


def _trace(path: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(path.parent.glob(path.name + ".rank*")):
        rows += [json.loads(x) for x in f.read_text().splitlines()]
    return rows


def _launch(tmp: Path, cfg: dict[str, Any], **extra: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    res = run(torchrun_cmd(write_job(tmp / "job.json", cfg), 2), env(tmp, **extra), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout


def test_two_ranks_train_from_shards_in_the_store_as_from_the_file(tmp_path: Path, store: S3Store) -> None:
    _upload_shards(store, "corpora", "tiny/v1")
    hp = {"maxSteps": None, "epochs": 1}
    s3_cfg = llama_job(
        tmp_path / "s3" / "out",
        hyperparameters=hp,
        dataset={"source": "s3://corpora/tiny/v1/", "path": "s3://corpora/tiny/v1/"},
    )
    _launch(tmp_path / "s3", s3_cfg, TAUON_TRACE_SAMPLES=str(tmp_path / "s3" / "trace"), **store.env())
    file_cfg = llama_job(tmp_path / "file" / "out", hyperparameters=hp)
    _launch(tmp_path / "file", file_cfg, TAUON_TRACE_SAMPLES=str(tmp_path / "file" / "trace"))

    from_s3, from_file = metrics(tmp_path / "s3" / "out"), metrics(tmp_path / "file" / "out")
    assert from_s3["trainSamples"] == from_file["trainSamples"] > 0
    assert from_s3["evalSamples"] == from_file["evalSamples"]
    steps = lambda p: sorted((r["step"], r["indices"]) for r in _trace(p))  # noqa: E731
    assert steps(tmp_path / "s3" / "trace") == steps(tmp_path / "file" / "trace")
    seen = [i for r in _trace(tmp_path / "s3" / "trace") for i in r["indices"]]
    assert sorted(seen) == list(range(from_s3["trainSamples"]))  # every sample of the epoch once
    assert from_s3["trainLoss"] == pytest.approx(from_file["trainLoss"], rel=1e-4)


def test_corrupt_gzip_shard_names_shard_and_line(tmp_path: Path, store: S3Store) -> None:
    s3 = store.client()
    s3.create_bucket(Bucket="broken")
    good = b"".join(b'{"text": "line %d of a fine shard"}\n' % i for i in range(40))
    s3.put_object(Bucket="broken", Key="c/part-0.jsonl", Body=good)
    packed = gzip.compress(good)
    s3.put_object(Bucket="broken", Key="c/part-1.jsonl.gz", Body=packed[: len(packed) // 2])
    cfg = llama_job(tmp_path / "out", dataset={"source": "s3://broken/c/", "path": "s3://broken/c/"})
    cfg_path = write_job(tmp_path / "job.json", cfg)
    res = run(
        [PYTHON, "-m", "tauon_train.train", "--config", str(cfg_path)], env(tmp_path, **store.env()), 120
    )
    assert res.returncode == 2, res.stderr[-3000:]
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["retryable"] is False and term["reason"] == INVALID_DATASET
    assert term["message"].startswith("s3://broken/c/part-1.jsonl.gz:")
    assert "truncated gzip" in term["message"] or "corrupt gzip" in term["message"]
    assert store.secret_key not in res.stderr + res.stdout


def _cfg(path: str) -> DatasetConfig:
    return DatasetConfig(
        source=path, path=path, format="jsonl", text_field="text", label_field=None, validation_split=0.1
    )


def test_bad_locations_get_named_errors(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    s3 = store.client()
    s3.create_bucket(Bucket="shelf")
    s3.put_object(Bucket="shelf", Key="empty/notes.txt", Body=b"no shards here")
    s3.put_object(Bucket="shelf", Key="blank/part-0.jsonl", Body=b"\n\n")
    cases = {
        "s3://no-such-bucket/x/": "BucketNotFound",
        "s3://shelf/empty/": "ObjectNotFound",
        "s3://shelf/missing.jsonl": "ObjectNotFound",
        "s3://shelf/blank/": EMPTY_DATASET,
    }
    for uri, reason in cases.items():
        with pytest.raises(PermanentError) as e:
            data.load_rows(_cfg(uri), ["text"])
        assert e.value.reason == reason, (uri, e.value)
        assert uri.rstrip("/") in e.value.message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-this-store")
    with pytest.raises(PermanentError) as e:
        data.load_rows(_cfg("s3://shelf/blank/"), ["text"])
    assert e.value.reason == "StorageAccessDenied" and "wrong-secret" not in e.value.message


def test_shard_deleted_after_listing_is_object_not_found(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    s3 = store.client()
    s3.create_bucket(Bucket="vanish")
    for i in range(2):
        s3.put_object(Bucket="vanish", Key=f"d/part-{i}.jsonl", Body=b'{"text": "x"}\n')
    from tauon_train import shards

    listed = shards.list_shards("s3://vanish/d/", "jsonl")
    s3.delete_object(Bucket="vanish", Key="d/part-1.jsonl")
    with pytest.raises(PermanentError) as e:
        shards.read_text(listed[1])
    assert e.value.reason == "ObjectNotFound" and "s3://vanish/d/part-1.jsonl" in e.value.message


def test_parquet_shard_in_the_store_reads_as_its_jsonl_twins(
    tmp_path: Path, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One prefix holding jsonl shards and a parquet shard of the same rows (several row groups): each
    format reads only its own shards, and the parquet one, streamed from the store by ranged reads and
    tokenized into a cache in the store, gives the jsonl shards' documents token for token. A corrupt
    parquet object is InvalidDataset naming it."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from tauon_train import tokcache
    from tauon_train.config import parse_config
    from tests.workload.helpers import TINY_TOKENIZER

    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    s3 = store.client()
    s3.create_bucket(Bucket="mixed")
    lines = [x for x in CORPUS.read_text().splitlines(keepends=True) if x.strip()][:120]
    s3.put_object(Bucket="mixed", Key="c/part-0.jsonl", Body="".join(lines[:60]).encode())
    s3.put_object(Bucket="mixed", Key="c/part-1.jsonl.gz", Body=gzip.compress("".join(lines[60:]).encode()))
    local = tmp_path / "part-2.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(x) for x in lines]), local, row_group_size=16)
    s3.upload_file(str(local), "mixed", "c/part-2.parquet")
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))

    def corpus(fmt: str) -> tokcache.TokenizedCorpus:
        ds = {"source": "s3://mixed/c/", "path": "s3://mixed/c/", "cache": {"storage": "s3://mixed/cache/"}}
        cfg = parse_config(llama_job(tmp_path / "out", dataset=ds))
        cfg = replace(cfg, dataset=replace(cfg.dataset, format=fmt))
        rows = data.load_rows(cfg.dataset, ["text"])
        assert [r.fields["text"] for r in rows] == [json.loads(x)["text"] for x in lines]
        built, report = data.tokenized_corpus(cfg, tok, 64, "s3://mixed/cache/")
        assert report.shards == (1 if fmt == "parquet" else 2) and not report.cache_hit
        return built

    docs = lambda c: [d.tolist() for d, _, _ in tokcache.iter_documents(c)]  # noqa: E731
    from_parquet, from_jsonl = corpus("parquet"), corpus("jsonl")
    assert from_parquet.entry.remote and from_parquet.documents == 120
    assert docs(from_parquet) == docs(from_jsonl)
    s3.put_object(Bucket="mixed", Key="bad/part-0.parquet", Body=local.read_bytes()[:-40])
    bad = replace(_cfg("s3://mixed/bad/"), format="parquet")
    with pytest.raises(PermanentError) as e:
        data.load_rows(bad, ["text"])
    assert e.value.reason == INVALID_DATASET
    assert e.value.message.startswith("s3://mixed/bad/part-0.parquet: not a readable parquet file")
