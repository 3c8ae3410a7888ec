"""Outputs in object storage: checkpoints, the final model and the owner file under ``s3://`` on a real
SeaweedFS, the real trainer under torchrun.

A 2-rank fsdp job reads the corpus as 4 shards (one gzipped) from the store, tokenizes it into a cache in
the store, writes a checkpoint at every step into the store and is SIGKILLed mid-epoch; the prefix
is copied once, then relaunched at 2 ranks on one copy and at 1 rank on the other. Both resume from the
newest complete checkpoint in the store and, with the steps the killed run had checkpointed, train on
every sample of the epoch exactly once (``$TAUON_TRACE_SAMPLES``). The model is published with its marker
last (a reader never sees a partial or mixed model), the owner file is claimed with conditional writes
(another job's uid is ``OutputInUse``), and an unreachable store is a retryable ``StorageUnreachable``.
Three torchrun launches, about 20-30 s each on the 2-core dev machine.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tauon_core import storage
from tauon_core.errors import PermanentError, RetryableError, report_retryable
from tests.net import free_port
from tests.s3store import S3Store, seaweedfs
from tests.workload.helpers import CORPUS, PYTHON, env, kill_tree, llama_job, torchrun_cmd, write_job

pytestmark = pytest.mark.slow

BUCKET = "outputs"


@pytest.fixture(scope="module")
def store() -> Iterator[S3Store]:
    with seaweedfs() as s:
        s.client().create_bucket(Bucket=BUCKET)
        _upload_corpus(s)
        yield s


@pytest.fixture
def use_store(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    return store


CORPUS_URI = f"s3://{BUCKET}/corpus/"


def _upload_corpus(store: S3Store) -> None:
    """The shipped corpus as 4 shards of 50 lines in the store, the third gzipped."""
    lines = CORPUS.read_text().splitlines(keepends=True)
    for i in range(4):
        body = "".join(lines[i * 50 : (i + 1) * 50]).encode()
        key = f"corpus/part-{i}.jsonl" + (".gz" if i == 2 else "")
        store.client().put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(body) if i == 2 else body)


def _job(prefix: str) -> dict[str, Any]:
    """One epoch (180 samples, 23 steps at 2 ranks) over the corpus in the store, tokenized into the
    default cache (``<output>/data-cache``, in the store too), a checkpoint at every step into ``prefix``."""
    uri = f"s3://{BUCKET}/{prefix}"
    return llama_job(
        Path("/nonexistent"),  # replaced: the output is the prefix
        "fsdp",
        hyperparameters={"maxSteps": None, "epochs": 1},
        output={"storage": uri, "path": uri, "checkpointEverySteps": 1},
        dataset={"source": CORPUS_URI, "path": CORPUS_URI},
    )


def _cmd(tmp: Path, cfg: dict[str, Any], nproc: int) -> list[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_job(tmp / "job.json", cfg)
    return torchrun_cmd(path, nproc) if nproc else [PYTHON, "-m", "tauon_train.train", "--config", str(path)]


def _launch(tmp: Path, cfg: dict[str, Any], nproc: int, store: S3Store) -> str:
    """Run to the end (cwd ``tmp``: nothing the trainer writes relative to it lands in the repo)."""
    e = env(tmp, TAUON_TRACE_SAMPLES=str(tmp / "trace"), **store.env())
    res = subprocess.run(
        _cmd(tmp, cfg, nproc), env=e, cwd=tmp, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout


def _trace(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(tmp.glob("trace.rank*")):
        rows += [json.loads(x) for x in f.read_text().splitlines()]
    return rows


def _keys(store: S3Store, prefix: str) -> dict[str, int]:
    s3 = store.client()
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        out.update({o["Key"][len(prefix) + 1 :]: o["Size"] for o in page.get("Contents", [])})
    return out


def _get_json(store: S3Store, key: str) -> dict[str, Any]:
    body = store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return cast(dict[str, Any], json.loads(body))


def _steps(keys: dict[str, int]) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps among the keys of an output prefix."""
    dirs = {k.split("/")[1] for k in keys if k.startswith("checkpoints/step-")}
    done = sorted(int(d[5:]) for d in dirs if f"checkpoints/{d}/complete" in keys)
    return done, sorted(int(d[5:]) for d in dirs if int(d[5:]) not in done)


@pytest.fixture(scope="module")
def killed(store: S3Store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The 2-rank job SIGKILLed once step 4 is complete in the store; its prefix ``a`` copied to ``b``.
    Returns the trace's directory and the newest complete step the kill left."""
    tmp = tmp_path_factory.mktemp("killed")
    s3 = store.client()
    e = env(tmp, TAUON_TRACE_SAMPLES=str(tmp / "trace"), **store.env())
    proc = subprocess.Popen(
        _cmd(tmp, _job("a"), 2), env=e, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if s3.list_objects_v2(Bucket=BUCKET, Prefix="a/checkpoints/step-4/complete").get("KeyCount"):
            break
        time.sleep(0.05)
    kill_tree(proc)
    keys = _keys(store, "a")
    assert "checkpoints/step-4/complete" in keys, f"first checkpoint never appeared: {sorted(keys)}"
    assert "metrics.json" not in keys and not any(k.startswith("model/") for k in keys), "finished already"
    done, _ = _steps(keys)
    # retention keeps two (a third while killed between a commit and its pruning); the epoch not over
    assert len(done) <= 3 and max(done) < 23
    for key in keys:
        s3.copy_object(Bucket=BUCKET, Key=f"b/{key}", CopySource={"Bucket": BUCKET, "Key": f"a/{key}"})
    return tmp, max(done)


def _assert_each_sample_once(first: Path, later: Path, m: dict[str, Any]) -> None:
    resumed = m["resumedFromStep"]
    before = [i for r in _trace(first) if r["step"] <= resumed for i in r["indices"]]
    rows = _trace(later)
    assert rows and min(r["step"] for r in rows) == resumed + 1 and all(r["epoch"] == 0 for r in rows)
    both = before + [i for r in rows for i in r["indices"]]
    assert len(both) == len(set(both)), "a sample of the epoch was trained on twice"
    assert sorted(both) == list(range(m["trainSamples"])), "a sample of the epoch was never trained on"


@pytest.fixture(scope="module")
def resumed_two(store: S3Store, killed: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("resumed-two")
    stdout = _launch(tmp, _job("a"), 2, store)
    first, newest = killed
    assert f"resuming from s3://{BUCKET}/a/checkpoints/step-{newest} " in stdout
    assert "written by 2 rank(s) under fsdp" in stdout
    m = _get_json(store, "a/metrics.json")
    assert m["resumedFromStep"] == newest and m["steps"] == 23 and m["worldSize"] == 2
    _assert_each_sample_once(first, tmp, m)
    return stdout


def test_two_ranks_resume_from_the_store_and_keep_the_newest_two(store: S3Store, resumed_two: str) -> None:
    keys = _keys(store, "a")
    assert _steps(keys) == ([22, 23], [])  # retention; incomplete prefixes of the kill removed
    assert {k.split("/", 3)[2] for k in keys if k.startswith("checkpoints/step-23/")} == {
        "complete",
        "dcp",
        "rng",
        "state.json",
    }
    assert {k for k in keys if k.startswith("checkpoints/step-23/dcp/")} >= {
        "checkpoints/step-23/dcp/.metadata",
        "checkpoints/step-23/dcp/__0_0.distcp",
        "checkpoints/step-23/dcp/__1_0.distcp",  # every rank its shards
    }
    st = _get_json(store, "a/checkpoints/step-23/state.json")
    assert st["step"] == 23 and st["world_size"] == 2 and st["strategy"] == "fsdp"
    assert _get_json(store, "a/.tauon-owner.json")["uid"] == "uid-tiny"


def test_the_published_model_loads(use_store: S3Store, resumed_two: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = storage.published(f"s3://{BUCKET}/a/model")
    assert record is not None
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["files"])
    s3 = use_store.client()
    for name in record["files"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, f"a/model/{name}", str(tmp_path / name))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size


def test_progress_json_is_in_the_prefix(store: S3Store, resumed_two: str) -> None:
    assert "progress.json" in _keys(store, "a")


def test_one_rank_resumes_the_two_rank_checkpoint_from_the_store(
    store: S3Store, killed: tuple[Path, int], tmp_path: Path
) -> None:
    first, newest = killed
    stdout = _launch(tmp_path, _job("b"), 0, store)
    assert f"resuming from s3://{BUCKET}/b/checkpoints/step-{newest} " in stdout
    assert "written by 2 rank(s) under fsdp" in stdout
    m = _get_json(store, "b/metrics.json")
    assert m["resumedFromStep"] == newest and m["worldSize"] == 1
    # the copied prefix holds the killed run's tokenized cache: another world size reuses it
    assert m["dataset"]["cacheHit"] is True and m["dataset"]["shards"] == 4
    _assert_each_sample_once(first, tmp_path, m)
    assert "model/.tauon-complete.json" in _keys(store, "b")


# --- the model's visibility (in process, against the same store) --------------------------------


def _model_dir(root: Path, version: str, names: list[str]) -> Path:
    """A model directory whose files have the same sizes in every version (so sizes cannot tell them
    apart: only the marker can)."""
    root.mkdir(parents=True)
    for name in names:
        (root / name).write_bytes((version * 4096)[:4096].encode())
    return root


def test_the_model_prefix_has_no_readable_model_before_its_marker(
    use_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tauon_train import output as out_mod

    uri = f"s3://{BUCKET}/visibility/model"
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    out_mod.publish_model(str(_model_dir(tmp_path / "v1", "1", names)), uri)
    assert set((storage.published(uri) or {})["files"]) == set(names)

    seen: list[tuple[str, object]] = []
    real_upload = storage.upload_file
    fail_at = [2]

    def upload(local: str, dest: str) -> None:
        seen.append((dest.rsplit("/", 1)[1], storage.published(uri)))  # what a reader gets right now
        if len(seen) == fail_at[0]:
            raise storage.StorageUnreachable(dest, "injected")
        real_upload(local, dest)

    monkeypatch.setattr(storage, "upload_file", upload)
    # v2: the same names and sizes as v1, so only the marker tells the versions apart
    with pytest.raises(storage.StorageUnreachable):
        out_mod.publish_model(str(_model_dir(tmp_path / "v2", "2", names)), uri)
    assert all(record is None for _, record in seen), "a reader saw a model while it was being replaced"
    assert storage.published(uri) is None  # v1 is no longer readable, v2 is incomplete: no model at all
    seen.clear()
    fail_at[0] = 0
    out_mod.publish_model(str(tmp_path / "v2"), uri)
    assert [name for name, _ in seen] == names
    assert all(record is None for _, record in seen), "a reader saw a model while it was being written"
    assert set((storage.published(uri) or {})["files"]) == set(names)
    assert storage.read_bytes(storage.join(uri, "config.json")).startswith(b"2222")

    # v3 sharded: the index after the shards, v2's files that v3 lacks deleted before anything is uploaded
    sharded = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    sharded.append("model.safetensors.index.json")
    seen.clear()
    out_mod.publish_model(str(_model_dir(tmp_path / "v3", "3", sharded)), uri)
    assert [name for name, _ in seen] == sharded and all(record is None for _, record in seen)
    left = {o.uri.rsplit("/", 1)[1] for o in storage.list_tree(uri)}
    assert left == {*sharded, storage.PUBLISHED_MARKER}


# --- ownership (in process, against the same store) --------------------------------------------


def test_the_store_honours_conditional_writes(use_store: S3Store) -> None:
    uri = f"s3://{BUCKET}/cond/object"
    assert storage.write_bytes_if(uri, b"first", absent=True)
    assert not storage.write_bytes_if(uri, b"second", absent=True)
    tag = storage.stat(uri).etag
    assert not storage.write_bytes_if(uri, b"third", etag="0" * 32)
    assert storage.write_bytes_if(uri, b"fourth", etag=tag)
    assert storage.read_bytes(uri) == b"fourth"


def test_another_job_on_the_same_prefix_is_output_in_use(
    use_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tauon_train import output as out_mod

    prefix = f"s3://{BUCKET}/owned"
    out_mod.claim(prefix, "u1", "ns/a", 0)
    out_mod.claim(prefix, "u1", "ns/a", 3)  # a restart raises the attempt (If-Match)
    before = storage.read_bytes(f"{prefix}/.tauon-owner.json")
    with pytest.raises(PermanentError) as e:
        out_mod.claim(prefix, "u2", "ns/b", 0)
    assert e.value.reason == "OutputInUse" and prefix in e.value.message and "u1" in e.value.message
    assert storage.read_bytes(f"{prefix}/.tauon-owner.json") == before
    assert json.loads(before)["attempt"] == 3
    with pytest.raises(out_mod.Superseded):
        out_mod.check_fence(prefix, 2)

    # a job that read "no owner file" just before u1 created it: its create (If-None-Match) fails, it
    # reads u1's and stops; an unconditional write would have taken the prefix over
    real = out_mod._read_owner_remote
    reads: list[bool] = []

    def first_read_is_stale(output: str, tagged: bool = False) -> tuple[dict[str, Any] | None, str]:
        reads.append(tagged)
        return (None, "") if len(reads) == 1 else real(output, tagged)

    monkeypatch.setattr(out_mod, "_read_owner_remote", first_read_is_stale)
    with pytest.raises(PermanentError) as e:
        out_mod.claim(prefix, "u3", "ns/c", 0)
    assert e.value.reason == "OutputInUse" and len(reads) == 2
    assert storage.read_bytes(f"{prefix}/.tauon-owner.json") == before
    monkeypatch.setattr(out_mod, "_read_owner_remote", real)

    # a store without conditional writes let u9 overwrite the owner file after u1 claimed it: u1's next
    # fence check (before every checkpoint and the model) stops it
    storage.write_bytes(f"{prefix}/.tauon-owner.json", b'{"uid": "u9", "attempt": 0}')
    with pytest.raises(PermanentError) as e:
        out_mod.check_fence(prefix, 3)
    assert e.value.reason == "OutputInUse" and "u9" in e.value.message

    # checkpoints without an owner file (another job's, or an older tauon's) are not adopted
    storage.write_bytes(f"s3://{BUCKET}/orphan/checkpoints/step-3/complete", b"{}")
    with pytest.raises(PermanentError) as e:
        out_mod.claim(f"s3://{BUCKET}/orphan", "u1", "ns/a", 0)
    assert e.value.reason == "OutputInUse" and not storage.exists(f"s3://{BUCKET}/orphan/.tauon-owner.json")


def _race(prefix: str, uids: list[str]) -> dict[str, str]:
    """Every uid claims ``prefix`` at the same moment, each in its own thread: uid -> owner or reason."""
    from tauon_train import output as out_mod

    gate = threading.Barrier(len(uids))
    results: dict[str, str] = {}

    def claim(uid: str) -> None:
        gate.wait()
        try:
            out_mod.claim(prefix, uid, f"ns/{uid}", 0)
            results[uid] = "owner"
        except PermanentError as e:
            results[uid] = e.reason

    threads = [threading.Thread(target=claim, args=(uid,)) for uid in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_jobs_claiming_one_empty_prefix_at_once_leave_one_owner(use_store: S3Store) -> None:
    for round_ in range(4):
        prefix = f"s3://{BUCKET}/race-{round_}"
        results = _race(prefix, ["u0", "u1", "u2"])
        assert sorted(results.values()) == ["OutputInUse", "OutputInUse", "owner"], results
        owner = json.loads(storage.read_bytes(f"{prefix}/.tauon-owner.json"))
        assert results[owner["uid"]] == "owner"


def test_an_unreachable_store_is_a_retryable_termination(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tauon_train.config import parse_config
    from tauon_train.dist import DistEnv
    from tauon_train.prepare import Prepared, claim_output

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("TAUON_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("TAUON_TERMINATION_LOG", str(tmp_path / "termination-log"))
    cfg = parse_config(_job("gone"))
    none: Any = None
    prep = Prepared(
        cfg=cfg,
        tokenizer=none,
        hf_config=none,
        model_dir="",
        train_ds=none,
        val_ds=None,
        max_len=64,
        output=cfg.output.path,
        attempt=0,
    )
    with pytest.raises(RetryableError) as e:
        claim_output(prep, DistEnv())
    assert e.value.reason == "StorageUnreachable" and f"s3://{BUCKET}/gone/" in e.value.message
    report_retryable(e.value)
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["retryable"] is True and term["reason"] == "StorageUnreachable"


def test_a_failed_shard_write_is_the_named_error_with_the_uri(
    use_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store lost while DCP writes the shards (its failure arrives inside ``CheckpointException``):
    a retryable ``StorageUnreachable`` naming the checkpoint, nothing committed, the checkpoints already
    there still loadable."""
    import fsspec
    import torch

    from tauon_train import checkpoint as ckpt
    from tauon_train.dist import DistEnv

    out = f"s3://{BUCKET}/failing"
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    c = ckpt.Checkpointer(out, 0, DistEnv(), model, opt, torch.device("cpu"), lora=False)
    c.save(ckpt.TrainState(step=1))
    dead = fsspec.filesystem(
        "s3",
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{free_port()}"},
        config_kwargs={"retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )
    real = ckpt._share_filesystem

    def lost(dcp_io: Any, path: str) -> Any:
        dcp_io.fs.fs = dead  # only the shard writer loses the store
        return dcp_io

    monkeypatch.setattr(ckpt, "_share_filesystem", lost)
    with pytest.raises(RetryableError) as e:
        c.save(ckpt.TrainState(step=2))
    assert e.value.reason == "StorageUnreachable"
    assert e.value.message.startswith(f"{out}/checkpoints/step-2/dcp: object storage unreachable")
    monkeypatch.setattr(ckpt, "_share_filesystem", real)
    assert [s for s, _ in ckpt.list_complete(ckpt.checkpoints_dir(out))] == [1]
    state = c.resume()
    assert state is not None and state.step == 1
