#!/usr/bin/env python3
"""`make bench` part: training-state memory of fsdp vs ddp with a ~100M-parameter random Llama on 2 CPU ranks.

Runs the real trainer (torchrun, gloo, fp32, init: scratch) once per strategy with
``$TAUON_MEMORY_REPORT`` and reads what each rank measured:

- per-rank training-state bytes after the first optimizer step (local parameter shards + gradients +
  AdamW state; ``strategy.local_state_bytes``);
- the peak RSS increment of each rank while the model is loaded (peak RSS after loading minus RSS before):
  rank 0 loads the full weights, the others only materialize their part and receive it by broadcast;
- samples/s of the training steps: from the median optimizer-step time (steady state; metrics.json's
  ``stepSecondsMedian``), and over all steps including the first (``samplesPerSecond``); the strategies
  run alternately ``--repeats`` times and the ratio uses each one's median (single runs on this shared
  machine ranged 0.66-0.98).

Targets (issue 11): fsdp state <= 0.55 x ddp; non-zero ranks' load increment <= 0.6 x rank 0's;
fsdp samples/s >= 0.8 x ddp. Writes bench/results/memory.json and memory.png.

    python bench/memory.py [--layers 14] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
BATCH = 4  # per rank


def llama_config(layers: int) -> dict[str, Any]:
    # ~7.1M parameters per block at hidden 768 / intermediate 2048: 14 blocks + embeddings ~ 100M
    return {
        "model_type": "llama",
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def job(out: Path, strategy: str, layers: int, steps: int, seq: int = 0) -> dict[str, Any]:
    return {
        "name": "bench-memory",
        "uid": "bench-memory",
        "model": {
            "task": "causal-lm",
            "init": "scratch",
            "config": llama_config(layers),
            "tokenizer": f"file://{TOKENIZER}",
            "tokenizerPath": str(TOKENIZER),
        },
        "dataset": {
            "path": str(CORPUS),
            "format": "jsonl",
            "textField": "text",
            "validationSplit": 0.0,
            # --seq: full blocks of packed corpus lines (the lines alone are 20-40 tokens)
            "packing": bool(seq),
        },
        "hyperparameters": {
            "maxSteps": steps,
            "batchSizePerDevice": BATCH,
            "learningRate": 1e-4,
            "maxSeqLength": seq or 64,
            "precision": "fp32",
            "seed": 1,
        },
        "parallelism": {"strategy": strategy},
        "output": {"path": str(out), "checkpointEverySteps": 100_000},
    }


def run_one(tmp: Path, strategy: str, layers: int, steps: int, seq: int = 0) -> dict[str, Any]:
    out = tmp / strategy
    cfg = tmp / f"{strategy}.json"
    cfg.write_text(json.dumps(job(out, strategy, layers, steps, seq)))
    report = tmp / f"{strategy}-mem"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TAUON_METRICS_PORT": "0",
        "TAUON_PROGRESS_INTERVAL": "30",
        "TAUON_MEMORY_REPORT": str(report),
        "PYTHONPATH": str(REPO / "trainer_image"),
    }
    env.pop("TAUON_TERMINATION_LOG", None)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "tauon_train.train", "--config", str(cfg)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    ranks = [json.loads((tmp / f"{strategy}-mem.rank{r}.json").read_text()) for r in (0, 1)]
    m = json.loads((out / "metrics.json").read_text())
    return {
        "strategy": m["strategy"],
        "wallSeconds": round(time.monotonic() - t0, 1),
        "samplesPerSecond": m["samplesPerSecond"],  # over all steps (the first includes warm-up)
        "steadySamplesPerSecond": round(2 * BATCH / m["stepSecondsMedian"], 3),  # from the median step
        "estimateBytes": m["estimateBytes"],
        "stateBytes": [r["stateBytes"]["total"] for r in ranks],
        "stateDetail": [r["stateBytes"] for r in ranks],
        "loadRssIncrementBytes": [r["loadPeakRss"] - r["loadRssBefore"] for r in ranks],
    }


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = ["ddp", "fsdp"]
    mib = 2**20
    axes[0].bar(names, [max(res[n]["stateBytes"]) / mib for n in names], color=["#888", "#2a7"])
    axes[0].set_title("training state per rank (MiB)")
    for i, n in enumerate(names):
        inc = res[n]["loadRssIncrementBytes"]
        axes[1].bar([i - 0.2, i + 0.2], [inc[0] / mib, inc[1] / mib], width=0.4, color=["#c63", "#36c"])
    axes[1].set_xticks([0, 1], names)
    axes[1].set_title("load RSS increment: rank 0 / rank 1 (MiB)")
    axes[2].bar(names, [res[n]["steadySamplesPerSecond"] for n in names], color=["#888", "#2a7"])
    axes[2].set_title("samples/s, median step (2 CPU ranks)")
    fig.suptitle(f"{res['params'] / 1e6:.0f}M-parameter random Llama, fp32, gloo")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--seq",
        type=int,
        default=0,
        help="pack the corpus into blocks of this many tokens (default: unpacked lines, cut at 64)",
    )
    ap.add_argument("--output-name", default="memory", help="bench/results/NAME.json and NAME.png")
    ap.add_argument("--repeats", type=int, default=3, help="runs per strategy (samples/s: the median)")
    a = ap.parse_args()
    res: dict[str, Any] = {"layers": a.layers, "steps": a.steps, "seq": a.seq or "lines cut at 64"}
    speeds: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    for rep in range(a.repeats):  # alternating, so that a noisy moment hits both strategies alike
        for strategy in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory(prefix="tauon-bench-memory-") as tmp:
                r = run_one(Path(tmp), strategy, a.layers, a.steps, a.seq)
            speeds[strategy].append(r["steadySamplesPerSecond"])
            if rep == 0:
                res[strategy] = r
            print(strategy, json.dumps(r), flush=True)
    for strategy, xs in speeds.items():
        res[strategy]["steadySamplesPerSecondRuns"] = xs
        res[strategy]["steadySamplesPerSecond"] = statistics.median(xs)
    res["repeats"] = a.repeats
    res["loadAverage"] = os.getloadavg()
    ddp, fsdp = res["ddp"], res["fsdp"]
    res["params"] = ddp["stateDetail"][0]["params"] // 4
    res["fsdpStateRatio"] = round(max(fsdp["stateBytes"]) / max(ddp["stateBytes"]), 3)
    res["fsdpLoadRatioRank1ToRank0"] = round(
        fsdp["loadRssIncrementBytes"][1] / fsdp["loadRssIncrementBytes"][0], 3
    )
    res["ddpLoadRatioRank1ToRank0"] = round(
        ddp["loadRssIncrementBytes"][1] / ddp["loadRssIncrementBytes"][0], 3
    )
    res["fsdpSpeedRatio"] = round(fsdp["steadySamplesPerSecond"] / ddp["steadySamplesPerSecond"], 3)
    res["targets"] = {
        "fsdpStateRatio<=0.55": res["fsdpStateRatio"] <= 0.55,
        "fsdpLoadRatio<=0.6": res["fsdpLoadRatioRank1ToRank0"] <= 0.6,
        "fsdpSpeedRatio>=0.8": res["fsdpSpeedRatio"] >= 0.8,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.output_name}.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / f"{a.output_name}.png")
    print(
        json.dumps(
            {
                k: res[k]
                for k in (
                    "params",
                    "fsdpStateRatio",
                    "fsdpLoadRatioRank1ToRank0",
                    "fsdpSpeedRatio",
                    "targets",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
