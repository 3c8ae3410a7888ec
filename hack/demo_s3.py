#!/usr/bin/env python3
"""`make demo-s3`: pre-train the tiny Llama from a corpus of shards in object storage.

Starts SeaweedFS (`weed mini`, built from the Go module proxy by hack/s3/build.sh, cached outside git) on
loopback, uploads examples/data/corpus.jsonl to s3://corpora/tiny/ as 4 shards (the third gzipped), runs
examples/pretrain-tiny-llama-s3.yaml with `tauon run --local` (2 CPU nodes, fsdp; credentials and endpoint
from this process's environment, as a user's shell would give them), prints the job's status and metrics,
and stops the store.

    python hack/demo_s3.py [--max-steps N] [--output DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TAUON = str(Path(sys.executable).parent / "tauon")
EXAMPLE = REPO / "examples" / "pretrain-tiny-llama-s3.yaml"
sys.path.insert(0, str(REPO / "hack" / "s3"))

import store  # noqa: E402  (hack/s3/store.py: SeaweedFS on loopback)


def upload_corpus(s3: store.S3Store, bucket: str = "corpora", prefix: str = "tiny") -> list[str]:
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    lines = (REPO / "examples" / "data" / "corpus.jsonl").read_text().splitlines(keepends=True)
    per = -(-len(lines) // 4)
    keys = []
    for i in range(4):
        body = "".join(lines[i * per : (i + 1) * per]).encode()
        key = f"{prefix}/part-{i}.jsonl" + (".gz" if i == 2 else "")
        client.put_object(Bucket=bucket, Key=key, Body=gzip.compress(body) if i == 2 else body)
        keys.append(f"s3://{bucket}/{key}")
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--max-steps", type=int, default=None, help="stop after N steps (default: the example's epochs)"
    )
    ap.add_argument("--output", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    with store.seaweedfs() as s3, tempfile.TemporaryDirectory(prefix="tauon-demo-s3-") as tmp:
        for uri in upload_corpus(s3):
            print(f"[demo-s3] uploaded {uri}", flush=True)
        doc = yaml.safe_load(EXAMPLE.read_text())
        if args.max_steps is not None:
            doc["spec"]["hyperparameters"]["maxSteps"] = args.max_steps
        manifest = EXAMPLE.parent / f".demo-s3-{os.getpid()}.yaml"  # beside the example: its ./ paths hold
        manifest.write_text(yaml.safe_dump(doc))
        out = Path(args.output or Path(tmp) / "out")
        env = {**os.environ, **s3.env()}
        try:
            r = subprocess.run(
                [TAUON, "run", str(manifest), "--local", "--quiet", "--output", str(out)], env=env
            )
        finally:
            manifest.unlink(missing_ok=True)
        status = json.loads((out / "status.json").read_text())
        print(f"[demo-s3] phase {status['phase']}; dataset {doc['spec']['dataset']['source']}")
        if (out / "metrics.json").exists():
            m = json.loads((out / "metrics.json").read_text())
            keys = ("steps", "trainSamples", "evalSamples", "trainLoss", "evalLoss", "worldSize", "strategy")
            print("[demo-s3] " + ", ".join(f"{k} {m.get(k)}" for k in keys))
        return r.returncode


if __name__ == "__main__":
    sys.exit(main())
