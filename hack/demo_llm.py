#!/usr/bin/env python3
"""`make demo-llm`: pre-train a tiny Llama from its Hugging Face config (random weights) with FSDP2 on 2
CPU ranks, on the shipped corpus and tokenizer, and print the falling loss.

The job is examples/pretrain-tiny-llama.yaml, turned into the trainer's job.json the way the operator
does it and run with torchrun (2 processes, gloo), so it needs no control plane:

    python hack/demo_llm.py [--epochs N] [--keep]

Output: runs/demo-llm/ (checkpoints, the final model in safetensors, metrics.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "examples" / "pretrain-tiny-llama.yaml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def local(uri: str) -> str:
    """file://./REL (relative to the manifest) -> an absolute path."""
    path = uri.removeprefix("file://")
    return str((MANIFEST.parent / path).resolve()) if not path.startswith("/") else path


def job_json(spec: dict[str, Any], out: Path, epochs: int | None) -> dict[str, Any]:
    m, ds, hp = spec["model"], spec["dataset"], dict(spec.get("hyperparameters", {}))
    if epochs is not None:
        hp["epochs"] = epochs
    hp.setdefault("precision", "fp32")
    return {
        "name": "pretrain-tiny-llama",
        "namespace": "default",
        "uid": "demo-llm",
        "attempt": 0,
        "model": {
            "task": m["task"],
            "init": m["init"],
            "config": m["config"],
            "tokenizer": m["tokenizer"],
            "tokenizerPath": local(m["tokenizer"]),
        },
        "dataset": {**ds, "path": local(ds["source"]), "format": "jsonl"},
        "method": {"type": "full"},
        "hyperparameters": hp,
        "parallelism": spec.get("parallelism", {}),
        "output": {"path": str(out), "checkpointEverySteps": 10_000},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help="override the manifest's epochs")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo-llm")
    args = ap.parse_args()
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    cfg_path = args.out.parent / "demo-llm.job.json"
    cfg_path.write_text(json.dumps(job_json(spec, args.out, args.epochs), indent=1))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TAUON_METRICS_PORT": "0",
        "TAUON_PROGRESS_INTERVAL": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
    }
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TAUON_TERMINATION_LOG"):
        env.pop(k, None)
    cmd = [TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "tauon_train.train", "--config", str(cfg_path)]
    print(f"pre-training a tiny Llama from {MANIFEST.relative_to(REPO)} with FSDP on 2 CPU ranks ...")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    first: float | None = None
    last_epoch = -1
    for line in proc.stdout:
        if line.startswith("tauon-progress "):
            rec = json.loads(line.removeprefix("tauon-progress "))
            if rec["loss"] is None:
                continue
            first = rec["loss"] if first is None else first
            if rec["epoch"] != last_epoch or rec["step"] == rec["totalSteps"]:
                last_epoch = rec["epoch"]
                bar = "#" * max(1, int(40 * rec["loss"] / first))
                print(
                    f"  step {rec['step']:4d}/{rec['totalSteps']}  epoch {rec['epoch']:3d}  loss {rec['loss']:.3f}  {bar}"
                )
        elif line.startswith("tauon-trainer: strategy=") or "error" in line.lower():
            print("  " + line.rstrip())
    rc = proc.wait()
    if rc != 0:
        print(f"training failed (exit {rc})", file=sys.stderr)
        return rc
    m = json.loads((args.out / "metrics.json").read_text())
    print(
        f"done in {time.monotonic() - t0:.0f} s: strategy={m['strategy']} steps={m['steps']} "
        f"train loss {first:.3f} -> {m['trainLoss']:.3f} (mean), eval loss {m['initialEvalLoss']:.3f} -> "
        f"{m['evalLoss']:.3f}; model in {args.out / 'model'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
