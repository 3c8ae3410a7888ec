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
  from local disk (target >= 1M tokens/s) and from SeaweedFS on loopback (reported).

Writes bench/results/data.json.

    python bench/data.py [--small 8] [--large 128] [--no-s3]
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


def loader_tokens_per_second(cfg: dict[str, Any], seconds: float = 3.0) -> float:
    """One rank reading training items from the cached entry (what each step's batches are made of)."""
    sys.path.insert(0, str(REPO / "trainer_image"))
    from transformers import AutoTokenizer

    from tauon_train import data
    from tauon_train.config import parse_config

    jc = parse_config(cfg)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    train, _ = data.build_datasets(jc, tok)
    n, tokens, t0 = len(train), 0, time.monotonic()
    order = list(range(n))
    random.Random(0).shuffle(order)
    i = 0
    while time.monotonic() - t0 < seconds:
        tokens += len(train[order[i % n]]["input_ids"])
        i += 1
    return tokens / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=8, help="MB of text of the small corpus")
    ap.add_argument("--large", type=int, default=128, help="MB of text of the large corpus")
    ap.add_argument("--no-s3", action="store_true", help="skip the loader figure from SeaweedFS")
    args = ap.parse_args()
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
                    res["loaderTokensPerSecondS3"] = round(_s3_loader(tmp, corpus, cache))
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


def _s3_loader(tmp: Path, corpus: Path, cache: Path) -> float:
    """Upload the cached entry to SeaweedFS and read the same items through ranged reads (the key is the
    local corpus's, so the entry is found under the bucket prefix as it is on disk)."""
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
        try:
            return loader_tokens_per_second(cfg)
        finally:
            shutil.rmtree(tmp / "out-s3", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
