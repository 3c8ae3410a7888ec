#!/usr/bin/env python3
"""`make bench` part: the data path at scale (issue 20) with the real trainer on 2 CPU ranks.

Generates jsonl corpora of SMALL and LARGE MB of text (8 MB shards, the last of them gzipped) and
pre-trains the tiny Llama on each for 2 steps (torchrun, gloo, ddp, packing), first with an empty
tokenized-data cache (cold: the ranks tokenize their shares) and then again on the same cache (warm).
Measured in the same run, so the figures are ratios on this shared machine:

- peak RSS of the largest rank (VmHWM of every trainer process, polled while it runs): LARGE vs SMALL,
  cold and warm (target: within 1.25x: a rank's memory does not grow with the corpus);
- time from launch to the first optimizer step with a warm cache: LARGE vs SMALL (target within 1.25x);
- tokenization throughput (tokens/s of the cold build, from metrics.json ``dataset``) with 2 ranks vs
  1 rank on the same corpus (target >= 1.7x on 2 idle cores; this machine's cores are shared);
- loader throughput: tokens/s one rank reads from the cached entry through ``build_datasets`` items,
  from local disk (target >= 1M tokens/s) and from SeaweedFS on loopback (reported), in the trainer's
  pattern (one item at a time, shuffled). From SeaweedFS three ways in the same run: the reader's
  previous settings (1 MiB blocks, no read-ahead: ``loaderTokensPerSecondS3Before``), its current ones
  (``loaderTokensPerSecondS3``), and micro-batches of 4 with the next one prefetched
  (``CorpusDataset.prefetch``: ``loaderTokensPerSecondS3Prefetch``).

Writes bench/results/data.json. ``--loader-only`` builds the LARGE corpus's cache in this process and
measures only the loader figures, updating them in an existing data.json (the other figures are kept).

    python bench/data.py [--small 8] [--large 128] [--no-s3] [--loader-only]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
SHARD_MB = 8
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def make_corpus(root: Path, mb: int) -> Path:
    """``mb`` MB of jsonl documents (~600 characters each) in 8 MB shards; the last shard gzipped."""
    sentences = [json.loads(x)["text"] for x in CORPUS.read_text().splitlines() if x.strip()]
    rng = random.Random(mb)
    d = root / f"corpus-{mb}mb"
    d.mkdir(parents=True)
    n_shards = max(1, mb // SHARD_MB)
    for i in range(n_shards):
        out = bytearray()
        while len(out) < SHARD_MB * 2**20 * (mb / (n_shards * SHARD_MB)):
            doc = " ".join(rng.choice(sentences) for _ in range(6))
            out += json.dumps({"text": doc}).encode() + b"\n"
        name = f"part-{i:04d}.jsonl"
        if i == n_shards - 1 and n_shards > 1:
            (d / (name + ".gz")).write_bytes(gzip.compress(bytes(out), compresslevel=1))
        else:
            (d / name).write_bytes(bytes(out))
    return d


def job(data: Path, out: Path, cache: Path) -> dict[str, Any]:
    return {
        "name": "bench-data",
        "namespace": "default",
        "uid": "uid-bench-data",
        "attempt": 0,
        "model": {
            "task": "causal-lm",
            "init": "scratch",
            "config": TINY,
            "tokenizer": f"file://{TOKENIZER}",
            "tokenizerPath": str(TOKENIZER),
        },
        "dataset": {
            "source": f"file://{data}",
            "path": str(data),
            "format": "jsonl",
            "textField": "text",
            "packing": True,
            "validationSplit": 0.001,
            "cache": {"storage": f"file://{cache}", "path": str(cache)},
        },
        "method": {"type": "full"},
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": 2,
            "batchSizePerDevice": 4,
            "learningRate": 1e-3,
            "maxSeqLength": 128,
            "precision": "fp32",
            "seed": 1,
        },
        "parallelism": {"strategy": "ddp"},
        "output": {"storage": f"file://{out}", "path": str(out), "checkpointEverySteps": 1000},
    }


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _hwm_kib(pid: int) -> int:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def run_trainer(tmp: Path, cfg: dict[str, Any], nproc: int) -> dict[str, Any]:
    """Launch the real trainer; peak RSS per process (VmHWM) and the time to the first step."""
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "job.json"
    conf.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TAUON_METRICS_PORT": "0",
        "TAUON_PROGRESS_INTERVAL": "0",
        "TAUON_TERMINATION_LOG": str(tmp / "termination-log"),
    }
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "tauon_train.train", "--config", str(conf)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    first_step: list[float] = []
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not first_step and line.startswith("tauon-progress ") and '"step": 1' in line:
                first_step.append(time.monotonic() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        for p in _descendants(proc.pid):
            peaks[p] = max(peaks.get(p, 0), _hwm_kib(p))
        time.sleep(0.05)
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError("trainer failed:\n" + "".join(lines[-40:]))
    metrics = json.loads((Path(cfg["output"]["path"]) / "metrics.json").read_text())
    return {
        "peakRssMiB": round(max(peaks.values(), default=0) / 1024, 1),
        "firstStepSeconds": round(first_step[0], 2) if first_step else None,
        "wallSeconds": round(time.monotonic() - t0, 2),
        "dataset": metrics.get("dataset"),
    }


# the s3 reader's settings before the read-ahead (issue 20): 1 MiB blocks, 64 of them, nothing ahead
BEFORE = {"_BLOCK": 1 << 20, "_BLOCKS": 64, "_AHEAD": 0}
S3_WARMUP = 15.0


def loader_tokens_per_second(
    cfg: dict[str, Any],
    seconds: float = 3.0,
    batch: int = 0,
    settings: dict[str, int] | None = None,
    warmup: float = 0.0,
    shuffled: bool = True,
) -> float:
    """One rank reading training items from the cached entry (what each step's batches are made of), in
    a shuffled order: one item at a time as the trainer reads them (``batch`` 0), or micro-batches of
    ``batch`` items with the next one prefetched. ``settings`` override the s3 reader's (tokcache).
    The rate over ``seconds`` after ``warmup`` seconds of reading (the block cache filled: steady state).
    ``shuffled=False``: the items in order (a scan, as an evaluation pass reads its split)."""
    sys.path.insert(0, str(REPO / "trainer_image"))
    from transformers import AutoTokenizer

    from tauon_train import data, tokcache
    from tauon_train.config import parse_config

    saved = {k: getattr(tokcache, k) for k in settings or {}}
    for k, v in (settings or {}).items():
        setattr(tokcache, k, v)
    try:
        jc = parse_config(cfg)
        tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
        train, _ = data.build_datasets(jc, tok)
    finally:
        for k, v in saved.items():
            setattr(tokcache, k, v)
    assert isinstance(train, data.CorpusDataset)
    n, tokens, t0 = len(train), 0, time.monotonic()
    order = list(range(n))
    if shuffled:
        random.Random(0).shuffle(order)
    i, t1 = 0, None
    while time.monotonic() - t0 < warmup + seconds:
        if t1 is None and time.monotonic() - t0 >= warmup:
            tokens, t1 = 0, time.monotonic()
        if batch:
            nxt = [order[(i + batch + k) % n] for k in range(batch)]
            train.prefetch(nxt)
            items = train.__getitems__([order[(i + k) % n] for k in range(batch)])
            tokens += sum(len(it["input_ids"]) for it in items)
            i += batch
        else:
            tokens += len(train[order[i % n]]["input_ids"])
            i += 1
    rate = tokens / (time.monotonic() - (t1 or t0))
    train.corpus.close()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=8, help="MB of text of the small corpus")
    ap.add_argument("--large", type=int, default=128, help="MB of text of the large corpus")
    ap.add_argument("--no-s3", action="store_true", help="skip the loader figure from SeaweedFS")
    ap.add_argument("--loader-only", action="store_true", help="only the loader figures (see above)")
    args = ap.parse_args()
    if args.loader_only:
        return loader_only(args.large, not args.no_s3)
    res: dict[str, Any] = {"benchmark": "data path at scale (issue 20)", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="tauon-bench-data-") as t:
        tmp = Path(t)
        for mb in (args.small, args.large):
            corpus = make_corpus(tmp, mb)
            cache = tmp / f"cache-{mb}"
            for phase in ("cold", "warm"):
                out = tmp / f"out-{mb}-{phase}"
                r = run_trainer(tmp / f"run-{mb}-{phase}", job(corpus, out, cache), 2)
                res["runs"][f"{mb}mb-{phase}"] = r
                print(f"[bench-data] {mb} MB {phase}: {r}", flush=True)
            if mb == args.large:
                one = tmp / f"cache-{mb}-1rank"
                r1 = run_trainer(tmp / f"run-{mb}-1rank", job(corpus, tmp / f"out-{mb}-1", one), 1)
                res["runs"][f"{mb}mb-cold-1rank"] = r1
                print(f"[bench-data] {mb} MB cold, 1 rank: {r1}", flush=True)
                res["loaderTokensPerSecondLocal"] = round(loader_tokens_per_second(job(corpus, out, cache)))
                if not args.no_s3:
                    res.update(_s3_loader(tmp, corpus, cache))
        runs = res["runs"]
        small, large = args.small, args.large

        def tps(key: str) -> float:
            ds = runs[key]["dataset"]
            return float(ds["tokens"]) / max(float(ds["tokenizeSeconds"]), 1e-9)

        res["ratios"] = {
            "peakRssColdLargeOverSmall": round(
                runs[f"{large}mb-cold"]["peakRssMiB"] / runs[f"{small}mb-cold"]["peakRssMiB"], 3
            ),
            "peakRssWarmLargeOverSmall": round(
                runs[f"{large}mb-warm"]["peakRssMiB"] / runs[f"{small}mb-warm"]["peakRssMiB"], 3
            ),
            "firstStepWarmLargeOverSmall": round(
                runs[f"{large}mb-warm"]["firstStepSeconds"] / runs[f"{small}mb-warm"]["firstStepSeconds"], 3
            ),
            "tokenizeTwoRanksOverOne": round(tps(f"{large}mb-cold") / tps(f"{large}mb-cold-1rank"), 3),
        }
    res["machine"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["ratios"], indent=1))
    print(
        f"loader: {res.get('loaderTokensPerSecondLocal')} tokens/s local, {res.get('loaderTokensPerSecondS3')} from S3"
    )
    return 0


def loader_only(mb: int, s3: bool) -> int:
    """The loader figures alone: the LARGE corpus tokenized here (one process), then read back."""
    path = RESULTS / "data.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="tauon-bench-data-") as t:
        tmp = Path(t)
        corpus, cache = make_corpus(tmp, mb), tmp / f"cache-{mb}"
        cfg = job(corpus, tmp / "out", cache)
        res["loaderTokensPerSecondLocal"] = round(loader_tokens_per_second(cfg))
        if s3:
            res.update(_s3_loader(tmp, corpus, cache))
    res["loaderMachine"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "corpusMB": mb}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k.startswith("loader") or k == "s3Reader"}, indent=1))
    return 0


def _s3_loader(tmp: Path, corpus: Path, cache: Path) -> dict[str, Any]:
    """Upload the cached entry to SeaweedFS and read the same items through ranged reads (the key is the
    local corpus's, so the entry is found under the bucket prefix as it is on disk): with the reader's
    earlier settings, its current ones, and micro-batches with the next one prefetched."""
    from tauon_train import tokcache

    sys.path.insert(0, str(REPO / "hack" / "s3"))
    import store

    with store.seaweedfs() as s3:
        os.environ.update(s3.env())
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for f in sorted(cache.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), "bench", f"cache/{f.relative_to(cache)}")
        cfg = job(corpus, tmp / "out-s3", cache)
        cfg["dataset"]["cache"] = {"storage": "s3://bench/cache", "path": "s3://bench/cache"}
        try:  # alternated, so that a change in the machine's load falls on both
            before, after, prefetch, cold_before, cold_after = [], [], [], [], []
            scan_before, scan = [], []
            for _ in range(2):
                scan_before.append(loader_tokens_per_second(cfg, settings=BEFORE, shuffled=False))
                scan.append(loader_tokens_per_second(cfg, shuffled=False))
                cold_before.append(loader_tokens_per_second(cfg, settings=BEFORE))
                cold_after.append(loader_tokens_per_second(cfg))
                before.append(loader_tokens_per_second(cfg, 5.0, settings=BEFORE, warmup=S3_WARMUP))
                after.append(loader_tokens_per_second(cfg, 5.0, warmup=S3_WARMUP))
                prefetch.append(loader_tokens_per_second(cfg, 5.0, batch=4, warmup=S3_WARMUP))
        finally:
            shutil.rmtree(tmp / "out-s3", ignore_errors=True)
    mean = lambda xs: round(sum(xs) / len(xs))  # noqa: E731
    return {
        "loaderTokensPerSecondS3Before": mean(before),
        "loaderTokensPerSecondS3": mean(after),
        "loaderTokensPerSecondS3Prefetch": mean(prefetch),
        "loaderTokensPerSecondS3ColdBefore": mean(cold_before),
        "loaderTokensPerSecondS3Cold": mean(cold_after),
        "loaderTokensPerSecondS3ScanBefore": mean(scan_before),
        "loaderTokensPerSecondS3Scan": mean(scan),
        "s3Loader": {
            "method": f"one rank, shuffled items; steady state: 5 s after {S3_WARMUP:.0f} s of reading "
            "(the block cache filled); cold: the first 3 s; scan: the items in order, the first 3 s (an "
            "evaluation pass's pattern); each the mean of 2 alternated runs",
            "runs": {
                k: [round(x) for x in v]
                for k, v in [
                    ("before", before),
                    ("now", after),
                    ("prefetch", prefetch),
                    ("coldBefore", cold_before),
                    ("cold", cold_after),
                    ("scanBefore", scan_before),
                    ("scan", scan),
                ]
            },
        },
        "s3Reader": {
            "before": {"blockKiB": BEFORE["_BLOCK"] >> 10, "blocksKept": BEFORE["_BLOCKS"], "aheadBlocks": 0},
            "now": {
                "blockKiB": tokcache._BLOCK >> 10,
                "blocksKept": tokcache._BLOCKS,
                "aheadBlocks": tokcache._AHEAD,
                "threads": tokcache._WORKERS,
                "blocksInFlight": tokcache._PENDING,
            },
        },
    }


if __name__ == "__main__":
    sys.exit(main())
