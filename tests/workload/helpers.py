"""Helpers for the trainer and model-server tests: job.json builder, environment, torchrun launcher,
process-tree kill; a model server process (``python -m tauon_serve.serve``) started, awaited, stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kube import REPO
from tests.manifests import CORPUS, MINILM, SENTIMENT, TINY_LLAMA, TINY_TOKENIZER
from tests.net import free_port

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


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
    return patched(cfg, over)


def patched(cfg: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """cfg with each section of ``over`` merged in (one level deep: a dict updates a dict section, anything
    else replaces it)."""
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
    return patched(cfg, over)


# -- the model server ------------------------------------------------------------------------------

_VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SERVER_PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    server: Server | None = None,
    interval: float = 0.1,
) -> Any:
    """Poll predicate until truthy (returned); fail the test after timeout, or at once when ``server``
    exits meanwhile, with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if server is not None and server.proc.poll() is not None:
            pytest.fail(f"server exited ({server.proc.returncode}) while waiting for {what}:\n{server.log()}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{server.log()}" if server else ""))


def http_status(url: str) -> int | None:
    """The status code of a GET of url, None while nothing answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def launch_server(
    model: Path | str, log_dir: Path, *args: str, name: str, env: dict[str, str] | None = None
) -> Server:
    """Start a server process for ``model`` served as ``name`` on a free port, its log in log_dir; the
    caller must ``stop_server`` it (``running_server`` does)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    proc_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        **(env or {}),
    }
    cmd = [SERVER_PYTHON, "-m", "tauon_serve.serve", "--model", str(model), "--name", name]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", "1", *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=proc_env)
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def wait_ready(server: Server, timeout: float = 180) -> Server:
    wait_for(lambda: http_status(server.url + "/v2/health/ready") == 200, timeout, "readiness", server)
    return server


@contextmanager
def running_server(
    model: Path | str, log_dir: Path, *args: str, name: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    server = launch_server(model, log_dir, *args, name=name, env=env)
    try:
        yield server
    finally:
        stop_server(server.proc)


def save_tiny_llama(path: Path, max_positions: int = 2048) -> Path:
    """A tiny random Llama with the repo's tiny BPE tokenizer (and its chat template), saved to ``path``:
    the special tokens' rows of ``lm_head`` are zeroed and the others scaled up, so decoding never picks
    EOS (lengths are exact) and sampling at T<1 stays far from them (as tests/workload/test_openai.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight *= 100
        for special in tok.all_special_ids:
            model.lm_head.weight[special].zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def rss_high_water_mib(pid: int) -> float:
    """The peak resident set size of a process so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
