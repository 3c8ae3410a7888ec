"""The SDK in local mode: Client(local=True) trains a 2-rank FineTuneJob through `tauon run --local`,
serves the result and predicts, in one test; bad use gets clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tauon.client import Client, JobFailed, NotFound, NotReady
from tests.kube import TAUON
from tests.manifests import CORPUS, TINY_TOKENIZER, fine_tune_kwargs, sentiment_fine_tune

pytestmark = [pytest.mark.e2e]


def test_fine_tune_then_serve_and_predict(tmp_path: Path) -> None:
    with Client(local=True, workdir=tmp_path) as client:
        job = client.fine_tune("sentiment", **sentiment_fine_tune())
        status = job.wait(timeout=900, progress=False)
        assert status.phase == "Succeeded"
        assert status.output.model == f"file://{tmp_path / 'sentiment' / 'model'}"
        assert status.output.metrics["worldSize"] == 2
        assert status.output.metrics["evalAccuracy"] > status.output.metrics["initialEvalAccuracy"]
        assert status.progress.step == status.progress.total_steps > 0
        assert status.pods.succeeded == 2 and status.resolved.backend == "gloo"
        assert json.loads((tmp_path / "sentiment" / "status.json").read_text()) == status.dump()
        lines = list(job.logs())
        assert any(line.startswith("[rank 0] tauon-progress ") for line in lines)
        assert any(line.startswith("[rank 1] ") for line in lines)
        files = [tmp_path / "sentiment" / "logs" / f"node-{r}.log" for r in (0, 1)]
        assert len(lines) == sum(len(f.read_text().splitlines()) for f in files)

        svc = client.serve("sentiment", fine_tune_job=job)
        ready = svc.wait_ready(timeout=300)
        assert ready.ready_replicas == 1 and ready.url == svc.url
        assert ready.model.fine_tune_job == "sentiment"
        preds = svc.predict(["I loved every minute of it", "terrible, broke after a day"])
        assert [p["label"] for p in preds] == [1, 0]
        assert all(len(p["probabilities"]) == 2 for p in preds)
        svc.delete()
        with pytest.raises(NotFound):
            svc.status()


def test_failed_job_raises_with_reason_and_cannot_be_served(tmp_path: Path) -> None:
    with Client(local=True, workdir=tmp_path) as client:
        with pytest.raises(NotFound, match="FineTuneJob 'nope' not found"):
            client.job("nope")
        job = client.fine_tune("broken", **fine_tune_kwargs(tmp_path / "missing.jsonl"))
        with pytest.raises(JobFailed) as e:
            job.wait(timeout=300, progress=False)
        # the status a cluster shows (tests/cluster/test_sdk.py): PermanentError, the trainer's reason inside
        assert e.value.reason == "PermanentError"
        assert "DatasetNotFound" in e.value.message and "missing.jsonl" in e.value.message
        last = job.status().last_failure
        assert last is not None and last.reason == "DatasetNotFound" and last.exit_code == 1
        lines = list(job.logs())
        for rank in (0, 1):  # both ranks report the error, each line under its rank
            assert any(ln.startswith(f"[rank {rank}] ") and "DatasetNotFound" in ln for ln in lines), lines
        with pytest.raises(NotReady, match="it is Failed"):
            client.serve("broken", fine_tune_job="broken")


TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}


def test_pretrain_tiny_causal_lm_then_chat(tmp_path: Path) -> None:
    with Client(local=True, workdir=tmp_path) as client:
        job = client.pretrain(
            "tiny-llama",
            model_config=TINY_LLAMA,
            tokenizer=TINY_TOKENIZER,
            dataset=CORPUS,
            num_nodes=2,
            nproc_per_node=1,
            max_steps=4,
            batch_size_per_device=4,
            max_seq_length=32,
            learning_rate=3e-3,
        )
        status = job.wait(timeout=600, progress=False)
        assert status.output.metrics["worldSize"] == 2 and status.progress.step == 4

        svc = client.serve("tiny-llama", fine_tune_job=job)
        svc.wait_ready(timeout=300)
        assert "tiny-llama" in [m.id for m in svc.openai_client().models.list()]
        messages = [{"role": "user", "content": "hello"}]
        full = svc.chat(messages, max_tokens=6, temperature=0)
        assert isinstance(full, str)
        pieces = list(svc.chat(messages, stream=True, max_tokens=6, temperature=0))
        assert "".join(pieces) == full  # streaming yields the same greedy answer, piece by piece
        assert isinstance(svc.complete("the cat", max_tokens=4, temperature=0), str)
        # `tauon chat` on the same code: an interactive streaming prompt (here fed from stdin)
        r = subprocess.run(
            [TAUON, "chat", "tiny-llama", "--url", svc.url, "--max-tokens", "6"],
            input="hello\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "chatting with tiny-llama" in r.stderr and r.stdout.startswith("> ")
        svc.delete()
