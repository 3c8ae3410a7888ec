"""Cluster backend: the Kubernetes API through kubernetes_asyncio, driven from synchronous code.

The async client runs on a private event loop in a daemon thread, so the SDK works the same in scripts
and in notebooks (whose own loop is already running). Every error that means "no cluster" becomes one
ClusterUnreachable line.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tauon.api.names import (
    ANN_HTTP_ADDRESS,
    ANN_LOG_FILE,
    API_VERSION,
    FINETUNEJOB,
    LABEL_ATTEMPT,
    LABEL_ISVC,
    LABEL_JOB,
    LABEL_RANK,
    PLURALS,
    Manifest,
)
from tauon.client.errors import AlreadyExists, ClusterUnreachable, Forbidden, NotFound, TauonError
from tauon.client.logs import prefix

T = TypeVar("T")
API = f"/apis/{API_VERSION}"
REQUEST_TIMEOUT = 30
_END = object()


class _Loop:
    """One event loop in a daemon thread; run() waits for a coroutine from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tauon-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)


def _service_account_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "").get("message") or e.reason)
    except (ValueError, TypeError, AttributeError):
        return str(e.reason)


class ClusterBackend:
    def __init__(
        self, kubeconfig: str | None = None, namespace: str | None = None, context: str | None = None
    ):
        self.kubeconfig = kubeconfig
        self.context = context
        self._loop = _Loop()
        self._forwards: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        self.cfg = client.Configuration()
        path = Path(kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config")
        in_cluster = (
            kubeconfig is None
            and not os.environ.get("KUBECONFIG")
            and os.environ.get("KUBERNETES_SERVICE_HOST")
        )
        if not in_cluster and not path.expanduser().exists():
            self._loop.stop()
            raise ClusterUnreachable(f"no usable Kubernetes configuration: kubeconfig {path} not found")
        try:
            ctx_ns = self._loop.run(self._load())
        except (config.ConfigException, OSError, ValueError, TypeError) as e:
            self._loop.stop()
            raise ClusterUnreachable(f"no usable Kubernetes configuration: {e}") from None
        self.namespace = namespace or ctx_ns or "default"
        self.api = self._loop.run(self._api())
        self.host = self.cfg.host
        self.where = f"namespace {self.namespace!r}"

    async def _load(self) -> str | None:
        in_cluster = self.kubeconfig is None and not os.environ.get("KUBECONFIG")
        if in_cluster and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=self.cfg)
            return _service_account_namespace()
        await config.load_kube_config(
            config_file=self.kubeconfig, context=self.context, client_configuration=self.cfg
        )
        contexts, active = config.list_kube_config_contexts(config_file=self.kubeconfig)
        chosen = next((c for c in contexts if c["name"] == self.context), active) if self.context else active
        ns = ((chosen or {}).get("context") or {}).get("namespace")
        return str(ns) if ns else None

    async def _api(self) -> client.ApiClient:
        return client.ApiClient(configuration=self.cfg)

    # -- REST ----------------------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        try:
            return await self.api.call_api(
                path,
                method,
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=body,
                query_params=query or [],
                auth_settings=["BearerToken"],
                response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (TimeoutError, aiohttp.ClientConnectionError, OSError) as e:
            raise ClusterUnreachable(
                f"cannot reach the Kubernetes API server at {self.host}: {e or type(e).__name__}"
            ) from None

    def call(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> Any:
        return self._loop.run(self._call(method, path, body, query))

    def _path(self, kind: str, name: str | None = None) -> str:
        p = f"{API}/namespaces/{self.namespace}/{PLURALS[kind]}"
        return f"{p}/{name}" if name else p

    def _refused(self, e: ApiException, kind: str, name: str, verb: str) -> TauonError:
        if e.status == 403:
            return Forbidden(f"not allowed to {verb} {kind} {name!r} in {self.where}: {_message(e)}")
        if e.status == 404 and verb == "create":
            return TauonError(
                f"cannot create {kind} {name!r}: {_message(e)} (are the tauon CRDs installed? `tauon crds`)"
            )
        return TauonError(f"the API server refused to {verb} {kind} {name!r}: {_message(e)}")

    def create(self, obj: Manifest) -> Manifest:
        kind, name = obj["kind"], obj["metadata"]["name"]
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}}
        try:
            return dict(self.call("POST", self._path(kind), obj))
        except ApiException as e:
            if e.status == 409:
                raise AlreadyExists(kind, name, self.where) from None
            raise self._refused(e, kind, name, "create") from None

    def get(self, kind: str, name: str) -> Manifest | None:
        try:
            return dict(self.call("GET", self._path(kind, name)))
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._refused(e, kind, name, "read") from None

    def delete(self, kind: str, name: str) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self.call("DELETE", self._path(kind, name), body)
        except ApiException as e:
            if e.status == 404:
                raise NotFound(kind, name, self.where) from None
            raise self._refused(e, kind, name, "delete") from None
        fwd = self._forwards.pop(name, None)
        if fwd:
            _stop_forward(fwd[0])

    def pods(self, selector: str) -> list[Manifest]:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        try:
            items = self.call("GET", path, query=[("labelSelector", selector)]).get("items") or []
        except ApiException as e:
            raise self._refused(e, "Pods", selector, "list") from None
        return [dict(p) for p in items]

    # -- logs -------------------------------------------------------------------------------------------------
    def logs(self, name: str, follow: bool) -> Iterator[str]:
        """Merged logs of the job's current attempt, `[rank N]` prefixed; with follow, until the job ends
        (a restarted gang's new pods are followed too)."""
        if self.get(FINETUNEJOB, name) is None:
            raise NotFound(FINETUNEJOB, name, self.where)  # now, not when the lines are first read
        return self._lines(name, follow)

    def _lines(self, name: str, follow: bool) -> Iterator[str]:
        out: queue.Queue[object] = queue.Queue()  # unbounded: a reader that stops never blocks the streams
        fut = asyncio.run_coroutine_threadsafe(self._stream_job(name, follow, out), self._loop.loop)
        try:
            while True:
                item = out.get()
                if item is _END:
                    break
                yield str(item)
            fut.result()  # re-raise what went wrong in the streams
        finally:
            fut.cancel()

    async def _stream_job(self, name: str, follow: bool, out: queue.Queue[object]) -> None:
        try:
            seen: set[str] = set()
            while True:
                try:
                    job = dict(await self._call("GET", self._path(FINETUNEJOB, name)))
                except ApiException as e:
                    if e.status == 404:
                        return  # deleted while we followed it
                    raise
                status = job.get("status") or {}
                attempt = str(status.get("attempt", 0))
                done = status.get("phase") in ("Succeeded", "Failed")
                pods = await self._call(
                    "GET",
                    f"/api/v1/namespaces/{self.namespace}/pods",
                    query=[("labelSelector", f"{LABEL_JOB}={name},{LABEL_ATTEMPT}={attempt}")],
                )
                new = [p for p in pods.get("items") or [] if p["metadata"]["name"] not in seen]
                new.sort(key=lambda p: int(p["metadata"].get("labels", {}).get(LABEL_RANK, 0)))
                if not follow:
                    for p in new:
                        await self._stream_pod(p, False, out)
                    return
                if new:
                    seen.update(p["metadata"]["name"] for p in new)
                    await asyncio.gather(*(self._stream_pod(p, True, out) for p in new))
                    continue
                if done:
                    return
                await asyncio.sleep(1)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, out.put, _END)

    async def _stream_pod(self, pod: Manifest, follow: bool, out: queue.Queue[object]) -> None:
        meta = pod["metadata"]
        rank = meta.get("labels", {}).get(LABEL_RANK, "?")
        put = asyncio.get_running_loop().run_in_executor
        path = f"/api/v1/namespaces/{self.namespace}/pods/{meta['name']}/log"
        query = [("follow", "true")] if follow else []
        while True:
            try:
                resp = await self.api.call_api(
                    path, "GET", query_params=query, auth_settings=["BearerToken"], _preload_content=False
                )
            except (aiohttp.ClientConnectionError, OSError) as e:
                raise ClusterUnreachable(
                    f"cannot reach the Kubernetes API server at {self.host}: {e}"
                ) from None
            try:
                if resp.status == 200:
                    async for raw in resp.content:
                        await put(None, out.put, prefix(rank, raw.decode(errors="replace").rstrip("\r\n")))
                    return
                text = await resp.text()
            finally:
                resp.release()
            if any(
                w in text
                for w in ("waiting to start", "ContainerCreating", "PodInitializing", "host assigned")
            ):
                if not follow:
                    return
                await asyncio.sleep(1)  # not started yet
                continue
            try:
                current = await self._call("GET", f"/api/v1/namespaces/{self.namespace}/pods/{meta['name']}")
            except ApiException:
                return  # the pod is gone
            log_file = (current.get("metadata", {}).get("annotations") or {}).get(ANN_LOG_FILE)
            if log_file:  # a process-backed dev node: no kubelet to proxy to, the log is a local file
                await self._tail_file(current, log_file, rank, follow, out)
                return
            phase = (current.get("status") or {}).get("phase")
            if follow and phase in (None, "Pending"):
                await asyncio.sleep(1)  # not started yet (a dev node publishes its log file at start)
                continue
            await put(None, out.put, prefix(rank, f"<no logs: {resp.status} {text.strip()[:300]}>"))
            return

    async def _tail_file(
        self, pod: Manifest, path: str, rank: str, follow: bool, out: queue.Queue[object]
    ) -> None:
        from tauon.client.logs import _Tail

        tail, put = _Tail(Path(path)), asyncio.get_running_loop().run_in_executor
        pod_path = f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}"
        while True:
            try:
                phase = (dict(await self._call("GET", pod_path)).get("status") or {}).get("phase")
            except ApiException:
                phase = "Gone"
            finished = not follow or phase in ("Succeeded", "Failed", "Gone")
            for line in tail.lines(final=finished):
                await put(None, out.put, prefix(rank, line))
            if finished:
                return
            await asyncio.sleep(0.5)

    # -- service endpoints ---------------------------------------------------------------------------------------
    def endpoint(self, name: str) -> str:
        """A base URL of the InferenceService reachable from here: a process-node pod's address, or a
        `kubectl port-forward` to its Service that this backend keeps running."""
        pods = self.pods(f"{LABEL_ISVC}={name}")
        for p in pods:
            addr = (p["metadata"].get("annotations") or {}).get(ANN_HTTP_ADDRESS)
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
            if addr and ready:
                return f"http://{addr}"
        fwd = self._forwards.get(name)
        if fwd and fwd[0].poll() is None:
            return fwd[1]
        proc, url = self._port_forward(name)
        self._forwards[name] = (proc, url)
        return url

    def _port_forward(self, name: str) -> tuple[subprocess.Popen[bytes], str]:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise TauonError(
                f"reaching InferenceService {name!r} from outside the cluster needs kubectl on PATH "
                "(for kubectl port-forward)"
            )
        argv = [kubectl, "port-forward", f"svc/{name}", ":80", "-n", self.namespace, "--address", "127.0.0.1"]
        if self.kubeconfig:
            argv += ["--kubeconfig", self.kubeconfig]
        if self.context:
            argv += ["--context", self.context]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            seen.append(line.strip())
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if m:
                threading.Thread(target=_drain, args=(proc,), daemon=True).start()
                return proc, f"http://127.0.0.1:{m.group(1)}"
        _stop_forward(proc)
        raise TauonError(f"kubectl port-forward to svc/{name} failed: {' | '.join(seen[-3:])}")

    def close(self) -> None:
        for proc, _ in self._forwards.values():
            _stop_forward(proc)
        self._forwards.clear()
        try:
            self._loop.run(self.api.close(), timeout=10)
        except Exception:
            pass
        self._loop.stop()


def _drain(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for _ in proc.stdout:
        pass


def _stop_forward(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
