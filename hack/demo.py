#!/usr/bin/env python3
"""`make demo`: fine-tune the MiniLM on the shipped sentiment data with a 2-node CPU FineTuneJob
(`tauon run --local`, the operator's own rendered pods as processes), serve the result with the model
server (the InferenceService with fineTuneJobRef, also `tauon run --local`), and send predictions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
TAUON = str(Path(sys.executable).parent / "tauon")
console = Console()
HUMAN = {0: "negative", 1: "positive"}  # the dataset's label meaning (examples/data/sentiment.jsonl)
SENTENCES = [
    "The battery lasts all day and the screen is gorgeous.",
    "Support never answered my emails and the refund took two months.",
    "Honestly not bad at all, I would buy it again.",
    "The soup was cold and the waiter was rude.",
    "A warm, funny film with a wonderful cast.",
]


def main() -> int:
    os.chdir(REPO)
    t0 = time.monotonic()
    shutil.rmtree(REPO / "runs" / "sentiment", ignore_errors=True)  # train from scratch, not resume
    console.rule("[bold]1. fine-tune: 2-node CPU FineTuneJob (gloo), tauon run --local")
    rc = subprocess.call(
        [TAUON, "run", "examples/finetune-sentiment.yaml", "--local", "--output", "runs/sentiment"]
    )
    if rc != 0:
        console.print(f"[red]training failed ({rc})[/]")
        return rc
    metrics = json.loads((REPO / "runs/sentiment/metrics.json").read_text())

    console.rule("[bold]2. serve: InferenceService with fineTuneJobRef, tauon run --local")
    port = free_port()
    server = subprocess.Popen(
        [
            TAUON,
            "run",
            "examples/inferenceservice-sentiment.yaml",
            "--local",
            "--output",
            "runs",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None:
                    console.print("[red]the model server exited[/]")
                    return 1
                time.sleep(0.5)
        else:
            console.print("[red]the model server did not become ready[/]")
            return 1

        console.rule("[bold]3. predict: Open Inference Protocol V2")
        body = json.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(SENTENCES)], "data": SENTENCES}]}
        ).encode()
        req = urllib.request.Request(
            f"{url}/v2/models/sentiment/infer", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        outputs = {o["name"]: o for o in out["outputs"]}
        labels = outputs["label"]["data"]
        probs = outputs["probabilities"]["data"]
        names = [HUMAN.get(int(x), str(x)) for x in labels]
        k = len(probs) // len(labels)
        table = Table(title=f"POST {url}/v2/models/sentiment/infer")
        table.add_column("text")
        table.add_column("label")
        table.add_column("p(label)", justify="right")
        for i, text in enumerate(SENTENCES):
            table.add_row(text, names[i], f"{probs[i * k + labels[i]]:.3f}")
        console.print(table)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    console.print(
        f"eval accuracy {metrics.get('initialEvalAccuracy', 0):.3f} (untrained head) -> "
        f"[bold green]{metrics['evalAccuracy']:.3f}[/] after {metrics['steps']} steps on {metrics['worldSize']} "
        f"ranks; demo took {time.monotonic() - t0:.0f}s. Model: runs/sentiment/model"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
