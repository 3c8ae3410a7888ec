"""Reading rank 0's `/progress` (the trainer serves it beside /metrics) for every running FineTuneJob.

A rank 0 is user code: its answer is read with a size cap, parsed defensively, and a job whose rank 0
misbehaves is backed off. Where to read it is the pod IP and the operator's metrics port; the
`tauon.dev/metrics-address` annotation (published by the process-backed dev node, where ports are
remapped) is honoured only when the operator runs with the dev flag, and only as a literal IP:port.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tauon.api.names import ANN_METRICS_ADDRESS

MAX_BYTES = 64 * 1024
METRICS_ADDRESS_ANNOTATION = ANN_METRICS_ADDRESS
DEV_FLAG_ENV = "TAUON_DEV_PROCESS_NODE"  # "1": the operator serves a process-backed dev node
BACKOFF_MAX_SECONDS = 300.0


def dev_flag(env: Mapping[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(DEV_FLAG_ENV, "") in ("1", "true")


def parse_address(value: str) -> str | None:
    """'IP:port' (IPv4, or [IPv6]:port) -> the same, normalised; anything else (names, paths) -> None."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    if ip.version == 6 and not bracketed:
        return None
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def address(pod: Mapping[str, Any], metrics_port: int, trust_annotation: bool) -> str | None:
    if trust_annotation:
        ann = ((pod.get("metadata") or {}).get("annotations") or {}).get(METRICS_ADDRESS_ANNOTATION)
        if isinstance(ann, str):
            return parse_address(ann)
    ip = (pod.get("status") or {}).get("podIP")
    if not isinstance(ip, str) or not ip:
        return None
    bracket = ":" in ip
    return parse_address(f"[{ip}]:{metrics_port}" if bracket else f"{ip}:{metrics_port}")


class BadReport(ValueError):
    """A /progress answer that cannot be used."""


def decode(raw: bytes) -> dict[str, Any]:
    """The JSON object in a /progress answer (at most MAX_BYTES)."""
    if len(raw) > MAX_BYTES:
        raise BadReport(f"answer larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # deep nesting raises RecursionError
        raise BadReport(f"not JSON: {type(e).__name__}") from e
    if not isinstance(data, dict):
        raise BadReport("not a JSON object")
    return data


READ_TIMEOUT = aiohttp.ClientTimeout(total=2)


async def read(session: aiohttp.ClientSession, addr: str) -> dict[str, Any]:
    async with session.get(f"http://{addr}/progress", timeout=READ_TIMEOUT) as r:
        if r.status != 200:
            raise BadReport(f"HTTP {r.status}")
        if (r.content_length or 0) > MAX_BYTES:
            raise BadReport(f"answer larger than {MAX_BYTES} bytes")
        raw = await r.content.read(MAX_BYTES + 1)
        return decode(raw)


@dataclass
class Backoff:
    """Per-job backoff after bad answers: 1 period, doubling, capped."""

    failures: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)  # key -> (n, until)

    def ready(self, key: tuple[str, str], now: float) -> bool:
        entry = self.failures.get(key)
        return entry is None or now >= entry[1]

    def failed(self, key: tuple[str, str], now: float, base: float) -> None:
        n = self.failures.get(key, (0, 0.0))[0] + 1
        self.failures[key] = (n, now + min(BACKOFF_MAX_SECONDS, base * 2 ** (n - 1)))

    def ok(self, key: tuple[str, str]) -> None:
        self.failures.pop(key, None)
