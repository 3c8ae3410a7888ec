"""`tauon run FILE --local`: the operator's own rendered pods, run as local processes.

FineTuneJob: every rank of the gang as a process (rank 0's address is 127.0.0.1, free ports), a live
progress bar from rank 0's progress.json, per-rank logs under <output>/logs/, a summary table at the end.
Ctrl-C stops all ranks; a failed rank stops the gang and reports its rank, exit code and last log lines.
InferenceService: the predictor as the operator renders it (render_deployment), prepared like a training
rank (tauon.local.process), on 127.0.0.1 and a free port; prints the URL and serves until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tauon.api import FineTuneJob, InferenceService
from tauon.local import process as lp
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import config_map_name, render_config_map, render_pod
from tauon.render.inferenceservice import PORT_NAME, ModelLocation, render_deployment

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line in logs


@dataclass
class RankRun:
    rank: int
    prep: lp.Prepared
    proc: subprocess.Popen[bytes]
    log: Path


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_finetunejob(job: FineTuneJob, output: Path, quiet: bool = False) -> int:
    """Train locally; returns the process exit status (0 on success)."""
    output = output.resolve()
    job.spec.output.storage = f"file://{output}"
    cfg = OperatorConfig(allow_host_paths=True)
    cm = render_config_map(job, cfg)
    ports = lp.PortMap()
    work = output / ".local"
    ranks: list[RankRun] = []
    for rank in range(job.spec.num_nodes):
        pod = render_pod(job, cfg, 0, rank)
        prep = lp.prepare(pod, {config_map_name(job.metadata.name): cm}, work / f"node-{rank}", ports)
        log = output / "logs" / f"node-{rank}.log"
        log.unlink(missing_ok=True)
        ranks.append(RankRun(rank, prep, lp.start(prep, log), log))
    if not quiet:
        console.print(
            f"[bold]tauon[/] training [cyan]{job.metadata.name}[/]: {job.spec.num_nodes} node(s) x "
            f"{ranks[0].prep.env.get('PET_NPROC_PER_NODE', '1')} process(es), backend "
            f"{ranks[0].prep.env.get('TAUON_DIST_BACKEND')}; logs in {output / 'logs'}"
        )
    interrupted = False
    originals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_int(_sig: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    for sig in originals:  # Ctrl-C or a SIGTERM: stop every rank cleanly, never leave one behind
        signal.signal(sig, on_int)
    failed: RankRun | None = None
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[sps]} samples/s"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )
    try:
        with progress:
            task = progress.add_task("training", total=None, loss="-", sps="-")
            while True:
                p = _read_json(output / "progress.json")
                if p:
                    progress.update(
                        task,
                        completed=p.get("step", 0),
                        total=p.get("totalSteps") or None,
                        loss=f"{p['loss']:.4f}" if isinstance(p.get("loss"), int | float) else "-",
                        sps=f"{p['samplesPerSecond']:.1f}"
                        if isinstance(p.get("samplesPerSecond"), int | float)
                        else "-",
                    )
                codes = [r.proc.poll() for r in ranks]
                failed = next((r for r, c in zip(ranks, codes, strict=True) if c not in (None, 0)), None)
                if failed or interrupted or all(c == 0 for c in codes):
                    break
                time.sleep(0.5)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
        for r in ranks:
            lp.stop(r.proc, grace=10)
    if interrupted:
        console.print("[yellow]interrupted: all ranks stopped[/]")
        return 130
    if failed is not None:
        code = lp.exit_code(failed.proc.returncode)
        msg = lp.termination_message(failed.prep)
        console.print(
            f"[red]rank {failed.rank} failed with exit code {code}[/]" + (f": {msg}" if msg else "")
        )
        console.print(f"[dim]last lines of {failed.log}:[/]\n{_tail(failed.log)}")
        return code or 1
    metrics = _read_json(output / "metrics.json") or {}
    if not quiet:
        table = Table(title=f"{job.metadata.name}: finished", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in (
            "steps",
            "epochs",
            "trainLoss",
            "initialEvalAccuracy",
            "evalAccuracy",
            "evalLoss",
            "evalPerplexity",
            "samplesPerSecond",
            "runtimeSeconds",
            "worldSize",
            "backend",
        ):
            if key in metrics:
                v = metrics[key]
                table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
        table.add_row("model", str(output / "model"))
        console.print(table)
    return 0


def _model_location(isvc: InferenceService, runs: Path) -> ModelLocation:
    """Where the predictor's model is for a local run: its source, or a FineTuneJob's local output."""
    model = isvc.spec.model
    if model.source:
        if model.source.startswith("pvc://"):
            raise lp.Unsupported("pvc:// sources cannot be served locally; use file:// or hf://")
        return ModelLocation(model.source)
    assert model.fine_tune_job_ref is not None  # admission: one of source and fineTuneJobRef
    job = model.fine_tune_job_ref.name
    path = (runs / job / "model").resolve()
    if not path.is_dir():
        raise lp.Unsupported(f"no model at {path}: run the FineTuneJob {job} locally first")
    return ModelLocation(f"file://{path}", job)


def prepare_server(isvc: InferenceService, runs: Path, port: int | None) -> lp.Prepared:
    """The predictor exactly as the operator renders it (command, args, env, mounts), prepared for a local
    process like a training rank: mounts mapped to local paths, its http port to `port` (or a free one),
    listening on 127.0.0.1 only."""
    cfg = OperatorConfig(allow_host_paths=True)
    deployment = render_deployment(isvc, "predictor", _model_location(isvc, runs), 1, cfg)
    pod = {
        "metadata": {"name": deployment["metadata"]["name"], "namespace": isvc.metadata.namespace},
        "spec": deployment["spec"]["template"]["spec"],
    }
    ports = lp.PortMap()
    if port:
        ports.shared[f"{isvc.metadata.namespace}/{pod['metadata']['name']}:{PORT_NAME}"] = port
    prep = lp.prepare(pod, {}, runs / ".local" / f"{isvc.metadata.name}-server", ports)
    prep.argv += ["--host", "127.0.0.1"]
    return prep


def serve_inferenceservice(
    isvc: InferenceService, runs: Path, port: int | None, ready_timeout: float = 300
) -> int:
    try:
        prep = prepare_server(isvc, runs.resolve(), port)
    except lp.Unsupported as e:
        console.print(f"[red]{e}[/]")
        return 1
    port = prep.ports[PORT_NAME]

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # run the finally below: the server must not outlive us

    signal.signal(signal.SIGTERM, on_term)
    log = runs / f"{isvc.metadata.name}-server.log"
    proc = lp.start(prep, log)
    try:  # directly after the start: a signal from here on still stops the server
        url = f"http://127.0.0.1:{port}"
        model = prep.argv[prep.argv.index("--model") + 1]
        console.print(f"serving [cyan]{isvc.metadata.name}[/] from {model}; logs in {log}")
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        if proc.poll() is not None:
            console.print(f"[red]server exited with {proc.returncode}[/]\n{_tail(log)}")
            return 1
        console.print(
            f"ready: {url}/v2/models/{isvc.metadata.name}/infer  (V1: {url}/v1/models/{isvc.metadata.name}:predict)"
        )
        print(url, flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        lp.stop(proc, grace=10)
    return 0
