"""The end of a run: the final model, ``metrics.json`` and the termination message.

- ``gather_full_state``: rank 0 receives the whole state dict on CPU in the output dtype, one tensor at a
  time (the other ranks only take part in the gathers).
- ``save_final_model``: rank 0 writes ``<output>/model`` (Hugging Face, safetensors, 5 GB shards) and for
  LoRA ``<output>/adapter`` into temp dirs, fsyncs them and swaps them in atomically; LoRA adapters are
  merged into ``model``. For an ``s3://`` output the temp dirs are local (``$TAUON_STAGING_DIR``, else
  the system's temp dir: room for one copy of the model) and are published under the prefix with a
  marker written last (``output.publish_model``: S3 has no rename), then removed.
- ``final_metrics``: the metrics.json object; ``write_results`` writes it and the termination message
  (the operator reads final metrics from rank 0's termination message: no access to the output volume
  needed; Kubernetes keeps at most 4096 bytes of it, hence ``TERMINATION_METRICS`` and
  ``termination_payload``'s size cap).
- ``RunTimes``: the loop's accounting (wall times, step times, samples and tokens) both report.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from tauon_core import storage
from tauon_core.errors import write_termination_log

from . import data, dist, schedule
from . import output as out_mod
from .checkpoint import TrainState
from .evaluate import EvalResult
from .metrics import atomic_write_json
from .modeling import apply_lora, build_on_meta
from .prepare import Prepared, Setup

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TERMINATION_METRICS = (
    "trainLoss",
    "evalLoss",
    "evalAccuracy",
    "evalPerplexity",
    "initialEvalAccuracy",
    "initialEvalLoss",
    "samplesPerSecond",
    "tokensPerSecond",
    "steps",
    "epochs",
    "worldSize",
    "backend",
    "precision",
    "device",
    "runtimeSeconds",
    "resumedFromStep",
    "strategy",
    "compileSeconds",
    "checkpointStallSeconds",
)
# Kubernetes keeps at most this many bytes of a container's termination message
TERMINATION_MESSAGE_LIMIT = 4096

Metric = float | int | str | dict[str, int | str] | dict[str, float | str] | dict[str, object] | None


@dataclass
class RunTimes:
    process_start: float  # time.monotonic() when the process started
    start: float = 0.0  # when the loop started
    loop_seconds: float = 0.0
    train_seconds: float = 0.0
    ckpt_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0


def gather_full_state(
    model: nn.Module, d: dist.DistEnv, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    """Rank 0 gets the whole state dict on CPU in ``dtype``, one tensor at a time (so host memory holds at
    most one full copy in ``dtype``); the other ranks only take part in the gathers."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] | None = {} if d.is_main else None
    for name, value in model.state_dict().items():
        t = value.full_tensor() if isinstance(value, DTensor) else value
        if out is not None:
            t = t.detach()
            out[name] = t.to("cpu", dtype) if t.is_floating_point() else t.to("cpu")
        del t
    return out


def save_final_model(prep: Prepared, full: dict[str, torch.Tensor], lora: bool) -> None:
    """Rank 0: ``<output>/model`` and for LoRA ``<output>/adapter``, each written to a temp dir, fsynced
    and swapped in atomically (S3: staged locally and published, marker last)."""
    cfg, output = prep.cfg, prep.output
    model = build_on_meta(cfg, prep.hf_config)
    remote = storage.is_remote(output)
    staging = (
        tempfile.mkdtemp(prefix="tauon-final-", dir=os.environ.get("TAUON_STAGING_DIR") or None)
        if remote
        else output
    )
    if not remote:
        os.makedirs(output, exist_ok=True)
    try:
        if lora:
            assert cfg.method.lora is not None
            peft = apply_lora(model, cfg.method.lora, cfg.model.task)
            peft.load_state_dict(full, strict=False, assign=True)
            tmp_adapter = os.path.join(staging, f".tmp-adapter-{secrets.token_hex(4)}")
            peft.save_pretrained(tmp_adapter)
            prep.tokenizer.save_pretrained(tmp_adapter)
            _install(tmp_adapter, output, out_mod.ADAPTER_DIR)
            model = cast("PreTrainedModel", peft.merge_and_unload())  # the base model, adapters merged
        else:
            model.load_state_dict(full, strict=False, assign=True)
        tmp_model = os.path.join(staging, f".tmp-model-{secrets.token_hex(4)}")
        model.save_pretrained(tmp_model, max_shard_size="5GB")
        prep.tokenizer.save_pretrained(tmp_model)
        _install(tmp_model, output, out_mod.MODEL_DIR)
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def _install(tmp: str, output: str, kind: str) -> None:
    """The written ``tmp`` becomes ``<output>/<kind>``: swapped in locally, published on S3."""
    if storage.is_remote(output):
        out_mod.publish_model(tmp, storage.join(output, kind))
    else:
        out_mod.swap_in(tmp, os.path.join(output, kind))


def resolved(prep: Prepared, s: Setup) -> dict[str, object]:
    """What the operator maps to status.resolved (reconcile/finetunejob.py take_resolved): the strategy,
    the replicated state per rank the ``auto`` estimate computed (``estimateBytes`` ->
    estimate.stateBytesPerRank), the device memory it compared against (``deviceMemoryBytes``; absent
    when unknown) and the dataset (``dataset``: shards, documents, tokens, cacheKey, cacheHit)."""
    r: dict[str, object] = {"strategy": s.strategy, "estimateBytes": s.estimate.replicated_bytes}
    if s.estimate.device_bytes > 0:
        r["deviceMemoryBytes"] = s.estimate.device_bytes
    report = getattr(prep.train_ds, "report", None)
    if report is not None:
        r["dataset"] = {k: v for k, v in report.metrics().items() if k != "tokenizeSeconds"}
    return r


def final_metrics(
    prep: Prepared,
    s: Setup,
    state: TrainState,
    ev: EvalResult,
    times: RunTimes,
    resumed_from: int,
    total: int,
    d: dist.DistEnv,
) -> dict[str, Metric]:
    cfg = prep.cfg
    train_s = times.train_seconds
    n = len(prep.train_ds)
    B, A = cfg.hyperparameters.batch_size_per_device, cfg.hyperparameters.gradient_accumulation_steps
    spe = schedule.ceil_div(data.num_batches(n, d.world_size, B), A)
    device = s.device
    m: dict[str, Metric] = {
        "trainLoss": _r(state.train_loss_sum / state.train_loss_count if state.train_loss_count else None),
        "evalLoss": _r(ev.loss),
        "initialEvalLoss": _r(state.extra.get("initialEvalLoss")),
        "samplesPerSecond": _r(times.samples / train_s if train_s > 0 else None, 3),
        "tokensPerSecond": _r(times.tokens / train_s if train_s > 0 else None, 1),
        "steps": state.step,
        "totalSteps": total,
        "epochs": round(state.step / spe, 4) if spe else 0,
        "trainSamples": n,
        "evalSamples": len(prep.val_ds) if prep.val_ds is not None else 0,
        "worldSize": d.world_size,
        "backend": s.backend if d.distributed else "none",
        "device": device.type if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})",
        "precision": s.precision.name,
        "strategy": s.strategy,
        "estimateBytes": s.estimate.replicated_bytes,
        "resolved": resolved(prep, s),
        "method": cfg.method.type,
        "task": cfg.model.task,
        "init": cfg.model.init,
        "runtimeSeconds": round(time.monotonic() - times.process_start, 2),
        "trainSeconds": round(train_s, 3),
        "loopSeconds": round(times.loop_seconds, 3),
        "stepSecondsMedian": _r(_quantile(times.step_seconds, 0.5), 4),
        "stepSecondsP90": _r(_quantile(times.step_seconds, 0.9), 4),
        "checkpointSeconds": round(times.ckpt_seconds, 3),
        "resumedFromStep": resumed_from,
    }
    if cfg.model.task == "causal-lm":
        m["evalPerplexity"] = _r(ev.perplexity)
        m["initialEvalPerplexity"] = _r(state.extra.get("initialEvalPerplexity"))
    else:
        m["evalAccuracy"] = _r(ev.accuracy)
        m["initialEvalAccuracy"] = _r(state.extra.get("initialEvalAccuracy"))
    if prep.train_ds.report is not None:  # shards, documents, tokens, cacheKey, cacheHit, tokenizeSeconds
        m["dataset"] = prep.train_ds.report.metrics()
    return m


def write_results(output: str, m: dict[str, Metric], resolved: dict[str, object]) -> None:
    """Rank 0: ``<output>/metrics.json`` and the termination message (the metrics the operator keeps)."""
    if storage.is_remote(output):  # one PUT: readers see the whole object or none
        body = json.dumps(m, indent=2, sort_keys=True) + "\n"
        storage.write_bytes(storage.join(output, "metrics.json"), body.encode())
    else:
        atomic_write_json(os.path.join(output, "metrics.json"), m)
    write_termination_log(termination_payload(m, resolved))


def termination_payload(
    m: dict[str, Metric], resolved: dict[str, object], limit: int = TERMINATION_MESSAGE_LIMIT
) -> dict[str, object]:
    """The termination message: the metrics of ``TERMINATION_METRICS`` that ``m`` has (not None) and
    ``resolved``, within ``limit`` bytes of JSON (what Kubernetes keeps; a longer message is cut and no
    longer parses). Over it, metrics go last-listed first, then ``resolved.dataset``, then ``resolved``."""
    metrics = {k: m[k] for k in TERMINATION_METRICS if m.get(k) is not None}
    payload: dict[str, object] = {"metrics": metrics, "resolved": dict(resolved)}

    def size() -> int:
        return len(json.dumps(payload, ensure_ascii=False).encode())

    for key in reversed(TERMINATION_METRICS):
        if size() <= limit:
            return payload
        metrics.pop(key, None)
    if size() > limit:
        payload["resolved"] = {k: v for k, v in resolved.items() if k != "dataset"}
    if size() > limit:
        payload["resolved"] = {}
    return payload


def _r(x: float | None, nd: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]
