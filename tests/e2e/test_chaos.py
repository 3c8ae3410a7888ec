"""Chaos end to end (control plane + operator + process node; trainers really run): a trainer rank
SIGKILLed mid-run restarts the whole gang, which resumes from its checkpoint and saves one final model;
a job deleted and re-created with the same name and output is refused (OutputInUse) instead of resuming
the old job's checkpoints. A tiny random Llama (built from a config, no download) keeps each run short."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Operator
from tests.e2e import test_e2e
from tests.e2e.test_e2e import _trainer_pids, st, wait_phase
from tests.kube import Cluster, wait_until
from tests.manifests import CORPUS, TINY_LLAMA, TINY_TOKENIZER, finetunejob, on_process_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# the same module-scoped operator and process node as test_e2e (started again for this module)
operator = test_e2e.operator
node = test_e2e.node


def tiny_job(name: str, out: Path, steps: int, every: int, nodes: int = 2) -> dict[str, Any]:
    return finetunejob(
        name,
        model={
            "init": "scratch",
            "config": TINY_LLAMA,
            "tokenizer": f"file://{TINY_TOKENIZER}",
            "task": "causal-lm",
        },
        dataset={"source": f"file://{CORPUS}", "textField": "text", "validationSplit": 0.1},
        hyperparameters={
            "maxSteps": steps,
            "batchSizePerDevice": 4,
            "learningRate": 3e-3,
            "maxSeqLength": 64,
            "precision": "fp32",
        },
        output={"storage": f"file://{out}", "checkpointEverySteps": every},
        **on_process_nodes(nodes=nodes, backoff=2),
    )


def complete_checkpoints(out: Path) -> list[Path]:
    ck = out / "checkpoints"
    return sorted(ck.glob("step-*/complete")) if ck.is_dir() else []


def tree(root: Path) -> dict[str, str]:
    """Every file under root with a digest of its content (what "nothing overwritten" compares)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sigkilled_rank_restarts_the_gang_which_resumes_into_one_model(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    steps = 400
    cluster.apply(tiny_job("chaos-kill", out, steps=steps, every=10), "-n", namespace)
    pids = wait_until(
        lambda: _trainer_pids("chaos-kill", 1) if complete_checkpoints(out) else None,
        180,
        "a complete checkpoint and rank 1's trainer process",
        interval=0.2,
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert st(cluster, namespace, "chaos-kill").get("phase") != "Succeeded", "killed after it finished"
    final = wait_phase(cluster, namespace, "chaos-kill", "Succeeded", 240)
    assert final["restarts"] == 1 and final["restartsCountTowardsLimit"] == 1, final
    assert final["attempt"] == 1 and final["lastFailure"]["pod"].startswith("chaos-kill-r0-node-"), final
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumedFromStep"] > 0, metrics  # attempt 1 continued from a checkpoint, not step 0
    assert metrics["steps"] == steps and metrics["worldSize"] == 2, metrics
    # one final model, no temporary or leftover copy next to it; the owner file names attempt 1
    assert (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == ["model"], list(out.iterdir())
    owner = json.loads((out / ".tauon-owner.json").read_text())
    job = cluster.get("ftj", "chaos-kill", namespace)
    assert job is not None and owner["uid"] == job["metadata"]["uid"] and owner["attempt"] == 1, owner


def test_recreated_job_does_not_resume_the_old_jobs_checkpoints(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cluster.apply(tiny_job("reuse", out, steps=6, every=3, nodes=1), "-n", namespace)
    wait_phase(cluster, namespace, "reuse", "Succeeded", 180)
    old = cluster.get("ftj", "reuse", namespace)
    assert old is not None and complete_checkpoints(out)
    before = tree(out)
    cluster.kubectl("delete", "ftj", "reuse", "-n", namespace, "--wait=true", "--timeout=60s", timeout=90)
    wait_until(lambda: not cluster.list("pods", namespace, "tauon.dev/job-name=reuse"), 60, "old pods gone")

    cluster.apply(tiny_job("reuse", out, steps=6, every=3, nodes=1), "-n", namespace)
    final = wait_phase(cluster, namespace, "reuse", "Failed", 180)
    new = cluster.get("ftj", "reuse", namespace)
    assert new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
    assert final["restarts"] == 0, final  # permanent: no restart
    assert final["lastFailure"]["reason"] == "OutputInUse", final["lastFailure"]
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError" and old["metadata"]["uid"] in failed["message"], failed
    assert tree(out) == before, "the re-created job wrote into the old job's output"
