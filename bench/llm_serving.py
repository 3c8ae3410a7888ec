"""LLM serving benchmark: continuous batching vs one request at a time, same model, same run.

    .venv/bin/python bench/llm_serving.py [--duration 10] [--concurrency 1,4,16] [--threads 2]
                                          [--max-tokens 64] [--no-transformers-serve]

Builds a small random Llama (the repo's tiny BPE tokenizer, examples/tokenizers/tiny-llama; its
special-token rows of ``lm_head`` are zeroed so every answer has exactly ``--max-tokens`` tokens),
saves it with ``save_pretrained`` and serves it with the real server process:

* tauon (continuous):   ``--max-concurrent-sequences 16`` (sequences join and leave every decode step)
* tauon (one at a time): ``--max-concurrent-sequences 1`` (the same server, one sequence decoding at a time)
* transformers serve (``transformers serve DIR --continuous-batching``), when it starts offline here

For each concurrency level, that many closed-loop clients stream chat completions
(``stream: true``, ``stream_options.include_usage``) for ``--duration`` seconds. Reported per run:
aggregate generated tokens/s (completion tokens of finished requests / wall time), TTFT p50/p99 (time
to the first content chunk), requests, errors. Writes bench/results/llm_serving.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, machine, stop_server

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
NAME = "bench-llm"
PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "What is the capital of a country that does not exist?",
    "Write a haiku about compilers.",
    "Explain continuous batching to a five year old.",
    "List three colours and one animal.",
    "Why is the sky blue on a clear day?",
]


def build_model(out: Path, hidden: int, layers: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024,
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
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"hidden": hidden, "layers": layers, "parameters": params, "vocab": len(tok)}


def _env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def start(
    cmd: list[str], env: dict[str, str], health: str, log_path: Path, timeout: float
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"exited with {proc.returncode}: {log_path.read_text(errors='replace')[-1500:]}"
            )
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"not healthy after {timeout:.0f} s: {log_path.read_text(errors='replace')[-1500:]}")


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[float, int]:
    """(time to first content chunk, completion tokens) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = float("nan")
    chunks, usage = 0, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft != ttft:
                        ttft = time.perf_counter() - t0
    return ttft, usage if usage is not None else chunks


async def closed_loop(
    url: str, model: str, concurrency: int, duration: float, max_tokens: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens = 0
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        end = start + duration

        async def worker(i: int) -> None:
            nonlocal tokens
            k = i
            while time.perf_counter() < end:
                try:
                    ttft, n = await one_request(client, url, model, PROMPTS[k % len(PROMPTS)], max_tokens)
                    ttfts.append(ttft)
                    tokens += n
                except Exception as exc:  # recorded, not fatal
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                k += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) >= 2 else [float("nan")] * 99
    return {
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests": len(ttfts),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": round(q[49] * 1000, 1),
        "ttft_p99_ms": round(q[98] * 1000, 1),
    }


def run_mode(
    name: str, url: str, model: str, levels: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    # warm up at the highest concurrency: on a GPU the first passes of each new batch shape are slow
    asyncio.run(closed_loop(url, model, max(levels), args.warmup, args.max_tokens))
    runs = []
    for c in levels:
        run = asyncio.run(closed_loop(url, model, c, args.duration, args.max_tokens))
        runs.append(run)
        print(
            f"{name:26s} c={c:3d} {run['tokens_per_s']:8.1f} tok/s  TTFT p50 {run['ttft_p50_ms']:8.1f} ms"
            f"  p99 {run['ttft_p99_ms']:8.1f} ms  requests {run['requests']}  errors {run['errors']}",
            flush=True,
        )
    return runs


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, runs in results["runs"].items():
        if not isinstance(runs, list):
            continue
        c = [r["concurrency"] for r in runs]
        ax1.plot(c, [r["tokens_per_s"] for r in runs], "o-", label=mode)
        ax2.plot(c, [r["ttft_p50_ms"] for r in runs], "o-", label=f"{mode} p50")
        ax2.plot(c, [r["ttft_p99_ms"] for r in runs], "s--", label=f"{mode} p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["concurrency"], [str(x) for x in results["concurrency"]])
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("generated tokens / s (aggregate)")
    ax1.set_title("Throughput")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_yscale("log")
    ax2.set_title("TTFT")
    m = results["machine"]
    fig.suptitle(
        f"LLM serving, random Llama {results['model']['parameters'] / 1e6:.1f}M params, "
        f"{results['max_tokens']} tokens/answer; {m['cpus_usable']} CPU(s), torch {m['torch']}, "
        f"load avg {m['load_average_at_start'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated stream counts")
    parser.add_argument("--threads", type=int, default=2, help="server torch threads")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server-args", default="", help="extra tauon server flags, e.g. '--device cuda'")
    parser.add_argument("--no-transformers-serve", action="store_true")
    parser.add_argument("--output-name", default="llm_serving")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "LLM serving: streamed chat completions, closed-loop clients, greedy, fixed answer length",
        "machine": machine(),
        "threads": args.threads,
        "duration_per_run_s": args.duration,
        "concurrency": levels,
        "max_tokens": args.max_tokens,
        "runs": {},
    }
    modes = {
        "tauon continuous": ["--max-concurrent-sequences", str(max(levels))],
        "tauon one-at-a-time": ["--max-concurrent-sequences", "1"],
    }
    with tempfile.TemporaryDirectory(prefix="tauon-llm-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        results["model"] = build_model(model_dir, args.hidden, args.layers)
        for mode, mode_args in modes.items():
            port = free_port()
            cmd = [sys.executable, "-m", "tauon_serve.serve", "--model", str(model_dir), "--name", NAME]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(args.threads)]
            cmd += ["--max-queued-sequences", "1024", *mode_args, *args.server_args.split()]
            url = f"http://127.0.0.1:{port}"
            proc = start(cmd, _env(args.threads), url + "/v2/health/ready", Path(tmp) / f"{port}.log", 180)
            try:
                results["runs"][mode] = run_mode(mode, url + "/v1/chat/completions", NAME, levels, args)
            finally:
                stop_server(proc)
        results["runs"]["transformers serve"] = transformers_serve(model_dir, levels, args, Path(tmp))
    cont, single = results["runs"]["tauon continuous"], results["runs"]["tauon one-at-a-time"]
    results["speedup_vs_one_at_a_time"] = {
        str(a["concurrency"]): round(a["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None
        for a, b in zip(cont, single, strict=True)
    }
    hf = results["runs"]["transformers serve"]
    if isinstance(hf, list):
        results["ratio_vs_transformers_serve"] = {
            str(a["concurrency"]): round(a["tokens_per_s"] / b["tokens_per_s"], 2)
            if b["tokens_per_s"]
            else None
            for a, b in zip(cont, hf, strict=True)
        }
    results["total_bench_seconds"] = round(time.monotonic() - t_start, 1)
    json_path = args.results_dir / f"{args.output_name}.json"
    png_path = args.results_dir / f"{args.output_name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    print("speedup vs one-at-a-time:", results["speedup_vs_one_at_a_time"])
    if "ratio_vs_transformers_serve" in results:
        print("ratio vs transformers serve:", results["ratio_vs_transformers_serve"])
    print(f"wrote {json_path} and {png_path} in {results['total_bench_seconds']} s")
    return 0


def transformers_serve(model_dir: Path, levels: list[int], args: argparse.Namespace, tmp: Path) -> Any:
    """`transformers serve DIR --continuous-batching` on the same model; a reason string if it cannot run."""
    if args.no_transformers_serve:
        return "skipped (--no-transformers-serve)"
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        return "not run: the transformers CLI is not installed"
    port = free_port()
    cmd = [exe, "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu"]
    try:
        proc = start(cmd, _env(args.threads), f"http://127.0.0.1:{port}/health", tmp / "hf-serve.log", 240)
    except Exception as exc:
        return f"not run: transformers serve did not start: {exc}"[:1500]
    try:
        return run_mode(
            "transformers serve (CB)",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            str(model_dir),
            levels,
            args,
        )
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
