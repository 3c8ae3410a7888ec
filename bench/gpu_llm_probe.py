#!/usr/bin/env python3
"""Where does a decode step's time go in tauon's LLM server? (a GPU diagnostic, not a benchmark)

bench/llm_serving.py on an H200 measured ~43 ms per decode step with --max-concurrent-sequences 32
against ~11 ms with 1, for one stream. This times, on the same model:
  1. the engine in-process (GenerationEngine, no HTTP), max_running 32 and 1, three requests each;
  2. the server over HTTP, both modes, three sequential streamed requests each;
and prints ms per generated token for every request (so warm-up shows as the first one).

    python bench/gpu_llm_probe.py [--hidden 1024] [--layers 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))
from llm_serving import NAME, PROMPTS, _env, build_model, one_request, start
from serving import free_port, stop_server


def in_process(model_dir: Path, device: str, max_running: int, n: int, max_tokens: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tauon_serve.generation import GenerationEngine
    from tauon_serve.scheduler import SamplingParams

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    eng = GenerationEngine(
        model, tok, device=device, max_model_length=1024, max_running=max_running, max_waiting=64
    )
    eng.start()
    out: list[float] = []

    async def go() -> None:
        for i in range(n):
            ids = tok(PROMPTS[i % len(PROMPTS)])["input_ids"]
            t0 = time.perf_counter()
            _, ev = await eng.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            out.append(round(1000 * (time.perf_counter() - t0) / max(1, ev.completion_tokens), 2))

    asyncio.run(go())
    eng.close(5)
    return out


def over_http(
    model_dir: Path, device: str, max_running: int, n: int, max_tokens: int, tmp: Path
) -> list[float]:
    port = free_port()
    cmd = [sys.executable, "-m", "tauon_serve.serve", "--model", str(model_dir), "--name", NAME]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", "4", "--device", device]
    cmd += ["--max-concurrent-sequences", str(max_running)]
    url = f"http://127.0.0.1:{port}"
    proc = start(cmd, _env(4), url + "/v2/health/ready", tmp / f"{port}.log", 180)
    out: list[float] = []
    try:

        async def go() -> None:
            async with httpx.AsyncClient(timeout=120) as c:
                for i in range(n):
                    t0 = time.perf_counter()
                    _, k = await one_request(c, url + "/v1/chat/completions", NAME, PROMPTS[i], max_tokens)
                    out.append(round(1000 * (time.perf_counter() - t0) / max(1, k), 2))

        asyncio.run(go())
    finally:
        stop_server(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        build_model(tmp / "m", a.hidden, a.layers)
        for mr in (32, 1):
            res[f"in-process max_running={mr}"] = in_process(tmp / "m", a.device, mr, a.n, a.max_tokens)
            print(json.dumps(res), flush=True)
        for mr in (32, 1):
            res[f"http max_running={mr}"] = over_http(tmp / "m", a.device, mr, a.n, a.max_tokens, tmp)
            print(json.dumps(res), flush=True)
    print("ms per generated token:", json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
