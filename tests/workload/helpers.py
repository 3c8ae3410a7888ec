"""Helpers for the trainer tests: job.json builder, environment, torchrun launcher, process-tree kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.net import free_port

REPO = Path(__file__).resolve().parents[2]
SENTIMENT = REPO / "examples" / "data" / "sentiment.jsonl"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
MINILM = "hf://sentence-transformers/all-MiniLM-L6-v2"


def job(out: Path, **over: Any) -> dict[str, Any]:
    """A job.json like the operator writes (camelCase, defaults filled); ``over`` patches sections."""
    cfg: dict[str, Any] = {
        "name": "sentiment",
        "namespace": "default",
        "model": {"source": MINILM, "path": MINILM, "task": "sequence-classification", "numLabels": 2},
        "dataset": {
            "source": "file://./examples/data/sentiment.jsonl",
            "path": str(SENTIMENT),
            "format": "jsonl",
            "textField": "text",
            "labelField": "label",
            "validationSplit": 0.1,
        },
        "method": {"type": "full"},
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": None,
            "batchSizePerDevice": 16,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-4,
            "weightDecay": 0.01,
            "warmupRatio": 0.0,
            "maxSeqLength": 64,
            "precision": "auto",
            "seed": 42,
        },
        "output": {"storage": "pvc://models/ft", "path": str(out), "checkpointEverySteps": 200},
    }
    for section, patch in over.items():
        if isinstance(patch, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **patch}
        else:
            cfg[section] = patch
    return cfg


def write_job(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg, indent=1))
    return path


def env(tmp: Path, **extra: str) -> dict[str, str]:
    e = dict(os.environ)
    for k in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TAUON_DIST_BACKEND",
    ):
        e.pop(k, None)
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TAUON_METRICS_PORT": "0",
            "TAUON_PROGRESS_INTERVAL": "0",
            "TAUON_TERMINATION_LOG": str(tmp / "termination-log"),
            "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), e.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
    )
    e.update(extra)
    return e


def torchrun_cmd(config: Path, nproc: int = 2) -> list[str]:
    return [
        TORCHRUN,
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "tauon_train.train",
        "--config",
        str(config),
    ]


def run(cmd: list[str], e: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (torchrun starts each worker in its own session, so a process-group
    kill of torchrun does not reach them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in parents.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process we started and every descendant of it (like a container being killed)."""
    victims = children_of(proc.pid)
    for p in [proc.pid, *victims]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        os.path.exists(f"/proc/{p}") and not _zombie(p) for p in victims
    ):
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def metrics(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "metrics.json").read_text()))


TINY_TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def llama_job(out: Path, strategy: str = "fsdp", **over: Any) -> dict[str, Any]:
    """A pre-training job: a tiny random Llama from a config (no download) on the shipped corpus."""
    cfg = job(
        out,
        name="tiny-llama",
        hyperparameters={
            "epochs": 1,
            "maxSteps": 10,
            "batchSizePerDevice": 4,
            "learningRate": 3e-3,
            "weightDecay": 0.0,
            "maxSeqLength": 64,
            "precision": "fp32",
            "seed": 7,
        },
        parallelism={"strategy": strategy, "activationCheckpointing": False},
        uid="uid-tiny",
        attempt=0,
    )
    cfg["model"] = {
        "task": "causal-lm",
        "init": "scratch",
        "config": dict(TINY_LLAMA),
        "tokenizer": f"file://{TINY_TOKENIZER}",
        "tokenizerPath": str(TINY_TOKENIZER),
    }
    cfg["dataset"] = {
        "source": "file://./examples/data/corpus.jsonl",
        "path": str(CORPUS),
        "format": "jsonl",
        "textField": "text",
        "validationSplit": 0.1,
    }
    for section, patch in over.items():
        if isinstance(patch, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **patch}
        else:
            cfg[section] = patch
    return cfg
