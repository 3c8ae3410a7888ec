#!/usr/bin/env python3
"""The tauon Python SDK, locally: fine-tune the MiniLM on the shipped sentiment data with a 2-node CPU
FineTuneJob, serve the result and predict. No cluster needed (Client(local=True) runs the operator's own
pods as local processes, like `tauon run --local`). On a cluster: Client() and a pvc:// output.

    python examples/sdk_quickstart.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tauon.client import Client

HERE = Path(__file__).resolve().parent
SENTENCES = [
    "The battery lasts all day and the screen is gorgeous.",
    "Support never answered my emails and the refund took two months.",
]


def main() -> None:
    workdir = HERE.parent / "runs" / "sdk"
    shutil.rmtree(workdir / "sentiment", ignore_errors=True)  # train from scratch, not resume
    with Client(local=True, workdir=workdir) as client:
        job = client.fine_tune(
            "sentiment",
            model="hf://sentence-transformers/all-MiniLM-L6-v2",
            dataset=HERE / "data" / "sentiment.jsonl",
            label_field="label",
            num_labels=2,
            num_nodes=2,  # two ranks (gloo on CPUs)
            nproc_per_node=1,
            epochs=2,
            batch_size_per_device=16,
            learning_rate=1e-4,
            max_seq_length=64,
        )
        status = job.wait()  # progress bar: step, loss, ETA
        print(f"eval accuracy {status.output.metrics['evalAccuracy']:.3f}; model at {status.output.model}")
        for line in list(job.logs())[-4:]:  # both ranks, [rank N]-prefixed
            print(line)

        svc = client.serve("sentiment", fine_tune_job=job)
        svc.wait_ready()
        for text, pred in zip(SENTENCES, svc.predict(SENTENCES), strict=True):
            print(f"{['negative', 'positive'][pred['label']]:>8}  {text}")
        svc.delete()


if __name__ == "__main__":
    main()
