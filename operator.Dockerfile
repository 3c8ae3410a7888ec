# syntax=docker/dockerfile:1
# tauon operator image: `tauon operator` (Kopf). Not the trainer: no torch, no [trainer] extra.
#
#   docker build -f operator.Dockerfile -t ghcr.io/tauon-dev/operator:0.1.0 .
#
# Build context: the repository root (operator.Dockerfile.dockerignore keeps it to what the build needs).
# Dependencies: the pinned runtime dependencies of pyproject.toml ([project].dependencies, all `==`); the
# build backend is pinned by [build-system].requires. The Helm chart (helm/tauon) runs this image as uid
# 65532 with a read-only root filesystem and an emptyDir at /tmp.

ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the operator package needs: setuptools finds tauon* under operator/ (trainer_image/ is not
# copied, so no workload package (tauon_core, tauon_train, tauon_serve) is installed).
COPY pyproject.toml README.md ./
COPY operator ./operator
# Byte-compiled at install time (the root filesystem is read-only at run time). Smoke checks: the
# handlers import (all runtime deps present), the CLI parses, no trainer code and no torch.
RUN pip install . \
 && python3 -c "import tauon.handlers" \
 && tauon operator --help >/dev/null \
 && ! python3 -c "import tauon_train" 2>/dev/null \
 && ! python3 -c "import tauon_serve" 2>/dev/null \
 && ! python3 -c "import torch" 2>/dev/null

FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tauon operator" \
      org.opencontainers.image.description="Kubernetes operator for FineTuneJob and InferenceService (Kopf)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 65532 tauon \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tauon
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
WORKDIR /tmp
# metrics (--metrics-port) and liveness /healthz (--health-port)
EXPOSE 8080 8081
ENTRYPOINT ["tauon", "operator"]
