"""Object storage in rendered children: s3:// models of an InferenceService (a size-limited download
volume, the store's settings as env, credentials only as secret references) and what is refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tauon.api.finetunejob import FineTuneJob
from tauon.api.inferenceservice import InferenceService
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import MODEL_CACHE_DIR, ModelLocation, render_deployment

CFG = OperatorConfig()
STORE = {"s3": {"endpoint": "http://weed.storage.svc:8333", "secretRef": {"name": "s3c"}}}


def _isvc(source: str, **spec: Any) -> InferenceService:
    return InferenceService.model_validate(
        {
            "apiVersion": "tauon.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "llm", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"model": {"source": source, "task": "causal-lm"}, **spec},
        }
    )


def _pod(svc: InferenceService) -> Any:
    src = svc.spec.model.source or ""
    return render_deployment(svc, "predictor", ModelLocation(src), 1, CFG)["spec"]["template"]["spec"]


def test_s3_model_is_downloaded_into_a_sized_cache_volume() -> None:
    pod = _pod(_isvc("s3://models/tiny/model/", storage={**STORE, "modelCacheSize": "20Gi"}))
    c = pod["containers"][0]
    assert c["args"][c["args"].index("--model") + 1] == "s3://models/tiny/model/"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["TAUON_MODEL_CACHE_DIR"] == MODEL_CACHE_DIR
    assert env["TAUON_S3_ENDPOINT"] == "http://weed.storage.svc:8333"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3c", "key": "AWS_SECRET_ACCESS_KEY"}}
    vol = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert vol == {"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}}
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_DIR} in c["volumeMounts"]
    # the root filesystem stays read-only: the download goes to the volume
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_pvc_model_gets_no_download_volume() -> None:
    pod = _pod(_isvc("pvc://models/tiny"))
    assert not any(v["name"] == "model-cache" for v in pod["volumes"])
    assert not any(e["name"] == "TAUON_MODEL_CACHE_DIR" for e in pod["containers"][0]["env"])


def test_vllm_with_an_s3_model_is_refused_with_the_field() -> None:
    with pytest.raises(InvalidSpec, match=r"spec.model.source: s3:// models are served by the tauon runtime"):
        _pod(_isvc("s3://models/tiny/model", runtime="vllm"))


@pytest.mark.parametrize("size", ["20 Gi", "lots", "-1Gi"])
def test_model_cache_size_must_be_a_quantity(size: str) -> None:
    with pytest.raises(ValidationError):
        _isvc("s3://models/tiny", storage={"modelCacheSize": size})


def test_finetunejob_models_are_not_read_from_s3_yet() -> None:
    body = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "ft"},
        "spec": {
            "model": {"source": "s3://models/base", "task": "causal-lm"},
            "dataset": {"source": "s3://corpora/x/"},
            "output": {"storage": "pvc://out/ft"},
        },
    }
    with pytest.raises(ValidationError, match="spec.model.source|source"):
        FineTuneJob.model_validate(body)


def test_finetunejob_output_and_cache_in_s3_pass_through_without_volumes() -> None:
    from tauon.render.finetunejob import job_config, render_attempt

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "tauon.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u2"},
            "spec": {
                "model": {"source": "hf://org/m", "task": "causal-lm"},
                "dataset": {"source": "s3://corpora/x/", "cache": {"storage": "s3://tok/cache/"}},
                "output": {"storage": "s3://runs/ft"},
                "storage": STORE,
                "numNodes": 2,
            },
        }
    )
    conf = job_config(job, CFG)
    assert conf["output"]["path"] == "s3://runs/ft"
    assert conf["dataset"]["cache"]["path"] == "s3://tok/cache/"
    pods = [c for c in render_attempt(job, CFG, 0) if c["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        vols = pod["spec"].get("volumes", [])
        assert not any("persistentVolumeClaim" in v or "hostPath" in v for v in vols)
        env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TAUON_S3_ENDPOINT"} <= env
