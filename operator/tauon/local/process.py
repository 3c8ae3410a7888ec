"""Run one rendered pod's container as a local process.

Shared by `tauon run --local` and the process-backed node (`tauon node`). What it does to a pod:
- ConfigMap volumes are written to a directory; emptyDirs become temp dirs; hostPath mounts are used as-is
  (they are host paths already); PVCs are not supported (a clear error says so).
- Any argument or environment value under a mount path is rewritten to where that volume really is.
- network "shared" (the host's network; `tauon run --local`, `tauon node` by default): cluster DNS names
  do not resolve on the host, so the rank-0 address variables become 127.0.0.1 and the ports a pod
  listens on (rendezvous, metrics, HTTP) are remapped to free local ports, so two pods on one machine
  never collide. The mapping is reported so callers can publish it.
- network "netns" (`tauon node --network netns`, see tauon.local.netns): the pod has a network of its
  own, so its env, arguments and ports are exactly what the renderer wrote; the caller sets `enter`,
  the argv prefix that runs the process inside the pod's namespaces.
- The container's termination message path becomes a file in the pod's directory.
It is a development and test tool, not a kubelet: no isolation, no images, no resource limits.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tauon.api.names import Manifest
from tauon.render.inferenceservice import CONTAINER as SERVER_CONTAINER

ADDRESS_VARS = ("PET_MASTER_ADDR", "MASTER_ADDR")
PORT_VARS = {
    "PET_MASTER_PORT": "dist",
    "MASTER_PORT": "dist",
    "TAUON_METRICS_PORT": "metrics",
    "TAUON_PORT": "http",
}


class Unsupported(ValueError):
    """The pod needs something a local process cannot provide."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PortMap:
    """Container port -> local port. `shared` keys let several pods agree (e.g. one gang's rendezvous)."""

    shared: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> int:
        if key not in self.shared:
            self.shared[key] = free_port()
        return self.shared[key]


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    termination_log: Path
    ports: dict[str, int]  # port name -> local port (dist, metrics, http); the container's own in netns
    enter: list[str] = field(default_factory=list)  # argv prefix entering the pod's namespaces (netns)


def _container(pod: Manifest) -> Manifest:
    containers = pod["spec"].get("containers") or []
    if len(containers) != 1:
        raise Unsupported(
            f"pod {pod['metadata']['name']}: exactly one container is supported, got {len(containers)}"
        )
    return dict(containers[0])


def _materialise_volumes(pod: Manifest, configmaps: dict[str, Manifest], root: Path) -> dict[str, str]:
    """Volume name -> local directory."""
    out: dict[str, str] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        if "configMap" in vol:
            cm = configmaps.get(vol["configMap"]["name"])
            if cm is None:
                raise Unsupported(f"ConfigMap {vol['configMap']['name']} (volume {name}) not found")
            d = root / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            for key, value in (cm.get("data") or {}).items():
                (d / key).write_text(value)
            out[name] = str(d)
        elif "emptyDir" in vol:
            d = root / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            out[name] = str(d)
        elif "hostPath" in vol:
            path = vol["hostPath"]["path"]
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                Path(path).mkdir(parents=True, exist_ok=True)
            out[name] = path
        elif "persistentVolumeClaim" in vol:
            raise Unsupported(
                f"volume {name}: PersistentVolumeClaims cannot be mounted by a local process; use file:// sources"
            )
        elif "projected" in vol:
            continue  # service account tokens: tauon's pods set automountServiceAccountToken false
        else:
            raise Unsupported(f"volume {name}: unsupported volume type {sorted(set(vol) - {'name'})}")
    return out


NETWORKS = ("shared", "netns")


def prepare(
    pod: Manifest, configmaps: dict[str, Manifest], root: Path, ports: PortMap, network: str = "shared"
) -> Prepared:
    """Everything needed to start the pod's container as a process (pure apart from writing files under root).

    network "shared" rewrites addresses and ports for the host's network; "netns" keeps them as rendered."""
    if network not in NETWORKS:
        raise ValueError(f"network: {network!r} is not one of {', '.join(NETWORKS)}")
    c = _container(pod)
    meta = pod["metadata"]
    root.mkdir(parents=True, exist_ok=True)
    volumes = _materialise_volumes(pod, configmaps, root)
    rewrites: list[tuple[str, str]] = []
    for m in c.get("volumeMounts") or []:
        local = volumes.get(m["name"])
        if local is None or m["mountPath"] == "/dev/shm":
            continue
        # identity mounts (hostPath at its own path) are kept as rules too, so a more specific mount
        # wins over an enclosing one (a model under /tmp/... beside an emptyDir at /tmp)
        rewrites.append((m["mountPath"].rstrip("/") or "/", local.rstrip("/") or "/"))
    rewrites.sort(key=lambda r: -len(r[0]))

    def rewrite(value: str) -> str:
        for src, dst in rewrites:
            if value == src or value.startswith(src + "/"):
                return dst + value[len(src) :]
        return value

    env: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = rewrite(str(e["value"]))
        elif "valueFrom" in e:
            continue  # secrets are not available to local processes
    if network == "netns":
        own = {
            str(p.get("name") or p["containerPort"]): int(p["containerPort"]) for p in c.get("ports") or []
        }
        return _finish(pod, c, env, root, rewrite, own, {})
    # Ports: one local port per (gang, name) for the rendezvous, per pod for the rest.
    gang = f"{meta.get('namespace', 'default')}/{env.get('PET_MASTER_ADDR', meta['name'])}"
    local_ports: dict[str, int] = {}
    for p in c.get("ports") or []:
        pname = p.get("name") or str(p["containerPort"])
        key = (
            f"{gang}:{pname}"
            if pname == "dist"
            else f"{meta.get('namespace', 'default')}/{meta['name']}:{pname}"
        )
        local_ports[pname] = ports.get(key)
    for var, pname in PORT_VARS.items():
        if var in env and pname in local_ports:
            env[var] = str(local_ports[pname])
    for var in ADDRESS_VARS:
        if var in env:
            env[var] = "127.0.0.1"
    flags = {
        f: str(local_ports[p])
        for f, p in (("--port", "http"), ("--health-port", "health"))
        if p in local_ports
    }
    return _finish(pod, c, env, root, rewrite, local_ports, flags)


def _finish(
    pod: Manifest,
    c: Manifest,
    env: dict[str, str],
    root: Path,
    rewrite: Callable[[str], str],
    local_ports: dict[str, int],
    flags: dict[str, str],
) -> Prepared:
    meta = pod["metadata"]
    env.setdefault("OMP_NUM_THREADS", str(local_threads(pod, env)))
    term = root / "termination-log"
    env["TAUON_TERMINATION_LOG"] = str(term)
    args = [rewrite(str(a)) for a in (c.get("command") or []) + (c.get("args") or [])]
    for flag, value in flags.items():
        args = _replace_flag(args, flag, value)
    if not args:
        raise Unsupported(f"pod {meta['name']}: the container has no command (images are not run locally)")
    return Prepared(args, env, root, term, local_ports)


def _cpu_quantity(value: object) -> float | None:
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def local_threads(pod: Manifest, env: dict[str, str]) -> int:
    """Threads for the pod's process(es), as a container would see them: its CPU limit split over its
    processes when it has one; otherwise every core for a model server (alone, like a pod with no limit)
    and one per training rank (the ranks of a local gang share this machine's cores)."""
    c = _container(pod)
    limit = _cpu_quantity(((c.get("resources") or {}).get("limits") or {}).get("cpu", ""))
    nproc = env.get("NPROC_PER_NODE", "")
    procs = max(1, int(nproc)) if nproc.isdigit() else 1
    if limit is not None and limit > 0:
        return max(1, math.ceil(limit / procs))
    if c.get("name") == SERVER_CONTAINER:
        return os.cpu_count() or 1
    return 1


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == flag and i + 1 < len(out):
            out[i + 1] = value
        elif a.startswith(flag + "="):
            out[i] = f"{flag}={value}"
    return out


def base_env() -> dict[str, str]:
    """The host environment plus this Python's bin dir first, so `torchrun`/`python` are the venv's."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start(prep: Prepared, log_path: Path) -> subprocess.Popen[bytes]:
    argv = list(prep.argv)
    exe = shutil.which(argv[0], path=base_env()["PATH"])
    if argv[0] in ("python", "python3"):
        exe = sys.executable
    if exe is None:
        raise Unsupported(f"command {argv[0]!r} not found on PATH")
    argv[0] = exe
    argv = [*prep.enter, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prep.termination_log.unlink(missing_ok=True)
    env = {**base_env(), **prep.env}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=prep.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM the process group, then SIGKILL after grace seconds. Returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    return proc.returncode


def exit_code(returncode: int) -> int:
    """Container-style exit code: a signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(prep: Prepared, limit: int = 4096) -> str:
    try:
        return prep.termination_log.read_text(errors="replace")[:limit]
    except OSError:
        return ""


def temp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
