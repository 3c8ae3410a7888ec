"""A model server at a known URL (e.g. one started by `tauon run --local`), as an InferenceService handle's
backend: `tauon chat NAME --url URL`, or `InferenceServiceHandle(UrlBackend(url), name)` in Python."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

from tauon.api.names import READY, Manifest
from tauon.client.errors import TauonError

READY_PATHS = ("/v2/health/ready", "/health")


class UrlBackend:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.namespace = "default"
        self.where = self.url

    def _ready(self) -> bool:
        """The tauon server's readiness (/v2/health/ready), else vLLM's (/health: 200 once its engine
        is up; it serves no /v2)."""
        for path in READY_PATHS:
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                continue
        return False

    def get(self, kind: str, name: str) -> Manifest | None:
        ready = "True" if self._ready() else "False"
        status: Manifest = {"phase": "Ready" if ready == "True" else "Pending", "url": self.url}
        status["conditions"] = [{"type": READY, "status": ready, "reason": "Probed"}]
        status["openai"] = {"baseURL": f"{self.url}/v1", "model": name}  # both runtimes serve /v1
        return {"kind": kind, "metadata": {"name": name}, "status": status}

    def endpoint(self, name: str) -> str:
        return self.url

    def create(self, obj: Manifest) -> Manifest:
        raise TauonError(f"a model server at {self.url} cannot create objects")

    def delete(self, kind: str, name: str) -> None:
        raise TauonError(f"a model server at {self.url} is not deleted through tauon")

    def logs(self, name: str, follow: bool) -> Iterator[str]:
        raise TauonError(f"a model server at {self.url} has no FineTuneJob logs")

    def close(self) -> None:
        return None
