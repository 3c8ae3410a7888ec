"""A real FineTuneSweep run locally: trials of MiniLM + LoRA on the shipped sentiment data (a few steps each)
through `tauon run --local`, then the same through the SDK's local mode."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tauon.api import FineTuneSweepStatus
from tauon.client import Client
from tests.kube import TAUON
from tests.manifests import MINILM, SENTIMENT

pytestmark = [pytest.mark.e2e]

RATES = [3e-3, 1e-4]
TINY = {"maxSteps": 6, "batchSizePerDevice": 16, "maxSeqLength": 32, "seed": 42}


def sweep_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "model": {"source": MINILM, "task": "sequence-classification", "numLabels": 2},
                    "dataset": {
                        "source": f"file://{SENTIMENT}",
                        "labelField": "label",
                        "validationSplit": 0.15,
                    },
                    "method": {"type": "lora"},
                    "hyperparameters": TINY,
                    "output": {"storage": "file://./not-used"},
                    "numNodes": 1,
                }
            },
            "parameters": [{"name": "learningRate", "type": "float", "values": RATES}],
            "algorithm": {"type": "grid"},
            "objective": {"metric": "evalLoss", "goal": "minimize"},
            "maxTrials": 2,
            "parallelTrials": 2,
        },
    }


def test_tauon_run_local_sweep(tmp_path: Path) -> None:
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(sweep_manifest("lr")))
    out = tmp_path / "runs" / "lr"
    r = subprocess.run(
        [TAUON, "run", str(manifest), "--local", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    st = FineTuneSweepStatus.model_validate(json.loads((out / "status.json").read_text()))
    assert st.phase == "Succeeded" and st.finished_trials == 2
    assert [t.parameters["learningRate"] for t in st.trials] == RATES
    assert all(t.phase == "Succeeded" and t.objective is not None for t in st.trials)
    best = min(st.trials, key=lambda t: t.objective or 0.0)
    assert st.best is not None and st.best.trial == best.name and st.best.objective == best.objective
    assert st.best.model == f"file://{out / best.name / 'model'}"
    for t in st.trials:  # each trial's own run: its model, its FineTuneJob status
        assert (out / t.name / "model" / "config.json").is_file()
        job = json.loads((out / t.name / "status.json").read_text())
        assert job["phase"] == "Succeeded" and job["output"]["metrics"]["evalLoss"] == t.objective
    assert "best trial" in r.stderr and st.best.trial in r.stderr

    # the same command again: the finished sweep is read back, nothing runs again
    again = subprocess.run(
        [TAUON, "run", str(manifest), "--local", "--quiet", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert FineTuneSweepStatus.model_validate(json.loads((out / "status.json").read_text())) == st


def test_sdk_local_sweep(tmp_path: Path) -> None:
    with Client(local=True, workdir=tmp_path) as client:
        sweep = client.sweep(
            "lr",
            model=MINILM,
            dataset=str(SENTIMENT),
            num_labels=2,
            label_field="label",
            validation_split=0.15,
            method="lora",
            num_nodes=1,
            max_steps=TINY["maxSteps"],
            batch_size_per_device=TINY["batchSizePerDevice"],
            max_seq_length=TINY["maxSeqLength"],
            parameters=[{"name": "learning_rate", "type": "float", "values": RATES}],
            algorithm="grid",
            objective="evalLoss",
            goal="minimize",
            max_trials=2,
            parallel_trials=2,
        )
        status = sweep.wait(timeout=300, progress=False)
        assert status.phase == "Succeeded"
        best = sweep.best()
        assert best is not None and best.trial in {t.name for t in sweep.trials()}
        assert best.model == f"file://{tmp_path / 'lr' / best.trial / 'model'}"
        assert (tmp_path / "lr" / best.trial / "model" / "config.json").is_file()
        assert [t.phase for t in sweep.trials()] == ["Succeeded", "Succeeded"]
        assert json.loads((tmp_path / "lr" / "status.json").read_text()) == status.dump()
