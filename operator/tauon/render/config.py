"""Operator configuration that shapes rendering (from `tauon operator` flags or Helm values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_IMAGE = "ghcr.io/tauon-dev/trainer:0.1.0"
# image of InferenceServices whose runtime resolves to vllm (`--vllm-image`, Helm operator.vllmImage)
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.11.0"
GangScheduler = Literal["volcano", "scheduler-plugins"]


@dataclass(frozen=True)
class OperatorConfig:
    default_image: str = DEFAULT_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    gang_scheduler: GangScheduler | None = None
    # scheduler that serves PodGroups when gang_scheduler is set and the job names none
    gang_scheduler_name: str | None = None
    cluster_domain: str = "cluster.local"
    # dev clusters only: allow file:// sources as hostPath volumes
    allow_host_paths: bool = False
    master_port: int = 29500
    metrics_port: int = 9090
    server_port: int = 8080
    # pod securityContext ids
    run_as_user: int = 1000
    fs_group: int = 1000

    def scheduler_for_gang(self) -> str | None:
        if self.gang_scheduler_name:
            return self.gang_scheduler_name
        return {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}.get(
            self.gang_scheduler or "", None
        )
