"""`Client`: fine-tune, pre-train and serve from Python, on a cluster or locally."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tauon.api.names import FINETUNEJOB, FINETUNESWEEP
from tauon.client import build
from tauon.client.errors import NotFound, NotReady, SpecError
from tauon.client.handles import Backend, FineTuneJobHandle, InferenceServiceHandle, SweepHandle


class Client:
    """Entry point of the SDK.

    `Client()` talks to the cluster of the current kubeconfig context (or in-cluster config);
    `Client(kubeconfig=..., context=..., namespace=...)` to another. `Client(local=True)` runs the same
    objects as local processes through `tauon run --local` (no cluster), under `workdir` (./runs).
    """

    def __init__(
        self,
        kubeconfig: str | None = None,
        namespace: str | None = None,
        context: str | None = None,
        *,
        local: bool = False,
        workdir: str | Path = "runs",
        poll: float | None = None,
    ):
        self.local = local
        self._backend: Backend
        if local:
            from tauon.client.local import LocalBackend

            self._backend = LocalBackend(workdir, namespace or "default")
        else:
            from tauon.client.cluster import ClusterBackend

            self._backend = ClusterBackend(kubeconfig, namespace, context)
        self.namespace = self._backend.namespace
        self.poll = poll if poll is not None else (0.5 if local else 1.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop what this client runs locally (local mode) and its port-forwards; close connections."""
        self._backend.close()

    # -- training ------------------------------------------------------------------------------------------
    def build_fine_tune(self, name: str, **kwargs: Any) -> Any:
        """The FineTuneJob `fine_tune` would create (validated), without creating it."""
        if kwargs.get("output") is None:
            default = getattr(self._backend, "default_output", None)
            if default is None:
                raise SpecError(
                    FINETUNEJOB,
                    name,
                    {"spec.output.storage": "output= is required on a cluster (pvc://CLAIM/PATH)"},
                )
            kwargs["output"] = default(name)
        return build.finetunejob(name, namespace=self.namespace, **kwargs)

    def fine_tune(
        self,
        name: str,
        *,
        model: str | os.PathLike[str] | None,
        dataset: str | os.PathLike[str] | Mapping[str, Any],
        task: str | None = None,
        num_labels: int | None = None,
        num_nodes: int | None = None,
        method: str | None = None,
        strategy: str | None = None,
        output: str | None = None,
        **kwargs: Any,
    ) -> FineTuneJobHandle:
        """Create a FineTuneJob and return its handle (does not wait: call `.wait()`).

        dataset: a source (pvc://, file://, or a local path) with text_field=/label_field=/dataset_format=
        keywords, or a dict in the CRD's shape. Hyperparameters by snake_case name (max_steps=,
        batch_size_per_device=, learning_rate=, epochs=, ...). Other spec fields as keywords: lora=,
        nproc_per_node=, resources=, image=, env=, node_selector=, pod_template=, run_policy=, labels=.
        Invalid input raises SpecError naming the field (e.g. spec.hyperparameters.learningRate) before
        anything is sent.
        """
        job = self.build_fine_tune(
            name,
            model=model,
            dataset=dataset,
            task=task,
            num_labels=num_labels,
            num_nodes=num_nodes,
            method=method,
            strategy=strategy,
            output=output,
            **kwargs,
        )
        self._backend.create(build.manifest(job))
        return FineTuneJobHandle(self._backend, name, self.poll)

    def pretrain(
        self,
        name: str,
        *,
        model_config: Mapping[str, Any],
        tokenizer: str | os.PathLike[str],
        dataset: str | os.PathLike[str] | Mapping[str, Any],
        **kwargs: Any,
    ) -> FineTuneJobHandle:
        """Pre-train a causal LM with random weights built from a Hugging Face config (model.init: scratch).
        `model_config` is the config as a dict (model_type, hidden_size, ...); `tokenizer` a source.
        Other keywords as for fine_tune (strategy="fsdp", packing=True, max_steps=, ...)."""
        kwargs.setdefault("task", "causal-lm")
        return self.fine_tune(
            name,
            model=None,
            dataset=dataset,
            init="scratch",
            model_config=model_config,
            tokenizer=os.fspath(tokenizer),
            **kwargs,
        )

    # -- hyperparameter sweeps --------------------------------------------------------------------------
    def build_sweep(
        self,
        name: str,
        *,
        parameters: list[Any],
        objective: str | Mapping[str, Any] | None = None,
        goal: str | None = None,
        max_trials: int | None = None,
        parallel_trials: int | None = None,
        max_failed_trials: int | None = None,
        early_stopping: str | Mapping[str, Any] | None = None,
        algorithm: str | Mapping[str, Any] | None = None,
        seed: int | None = None,
        labels: Mapping[str, str] | None = None,
        **template: Any,
    ) -> Any:
        """The FineTuneSweep `sweep` would create (validated), without creating it."""
        try:
            job = self.build_fine_tune(name, **template)
        except SpecError as e:  # the template's fields, by their path in the sweep
            fields = {f"spec.template.{k}" if k.startswith("spec.") else k: v for k, v in e.fields.items()}
            raise SpecError(FINETUNESWEEP, name, fields) from None
        return build.finetunesweep(
            name,
            template=job,
            parameters=parameters,
            objective=objective,
            goal=goal,
            algorithm=algorithm,
            seed=seed,
            early_stopping=early_stopping,
            max_trials=max_trials,
            parallel_trials=parallel_trials,
            max_failed_trials=max_failed_trials,
            namespace=self.namespace,
            labels=labels,
        )

    def sweep(
        self,
        name: str,
        *,
        parameters: list[Any],
        objective: str | Mapping[str, Any] | None = None,
        goal: str | None = None,
        max_trials: int | None = None,
        parallel_trials: int | None = None,
        max_failed_trials: int | None = None,
        early_stopping: str | Mapping[str, Any] | None = None,
        algorithm: str | Mapping[str, Any] | None = None,
        seed: int | None = None,
        labels: Mapping[str, str] | None = None,
        **template: Any,
    ) -> SweepHandle:
        """Create a FineTuneSweep (a hyperparameter search whose trials are FineTuneJobs) and return its
        handle (does not wait: call `.wait()`, then `.best()`).

        parameters: the search space, a list of {name, type, min, max, log} or {name, type, values}
        (name: learningRate or learning_rate, method.lora.rank, ...). objective: a metric (evalLoss,
        evalAccuracy, trainLoss) or {metric, goal}; goal=: minimize or maximize. algorithm: tpe, random or
        grid (or {type, seed}); seed=. early_stopping: none, median or asha (or {type, min_steps}).
        The template takes fine_tune's keywords (model=, dataset=, num_labels=, max_steps=, output=, ...).
        Locally its trials run under <workdir>/<name>/<name>-t<k>/; on a cluster output= is required and
        each trial writes to <output>/<trial>. Invalid input raises SpecError naming the field.
        """
        sweep = self.build_sweep(
            name,
            parameters=parameters,
            objective=objective,
            goal=goal,
            max_trials=max_trials,
            parallel_trials=parallel_trials,
            max_failed_trials=max_failed_trials,
            early_stopping=early_stopping,
            algorithm=algorithm,
            seed=seed,
            labels=labels,
            **template,
        )
        self._backend.create(build.manifest(sweep))
        return SweepHandle(self._backend, name, self.poll)

    def get_sweep(self, name: str) -> SweepHandle:
        """A handle on an existing FineTuneSweep (NotFound if there is none)."""
        handle = SweepHandle(self._backend, name, self.poll)
        handle.get()
        return handle

    def job(self, name: str) -> FineTuneJobHandle:
        """A handle on an existing FineTuneJob (NotFound if there is none)."""
        handle = FineTuneJobHandle(self._backend, name, self.poll)
        handle.get()
        return handle

    # -- serving -------------------------------------------------------------------------------------------
    def serve(
        self,
        name: str,
        *,
        fine_tune_job: str | FineTuneJobHandle | None = None,
        source: str | None = None,
        fine_tune_sweep: str | SweepHandle | None = None,
        replicas: int | None = None,
        autoscaling: Mapping[str, Any] | None = None,
        runtime: str | None = None,
        **kwargs: Any,
    ) -> InferenceServiceHandle:
        """Create an InferenceService for a succeeded FineTuneJob (fine_tune_job=), the best trial of a
        succeeded FineTuneSweep (fine_tune_sweep=) or a model (source=).

        Other keywords: task=, batching=, generation=, canary=, resources=, image=, env=, node_selector=,
        pod_template=, labels=. Serving a job that has not succeeded raises NotReady (wait() for it first).
        """
        job_name = fine_tune_job.name if isinstance(fine_tune_job, FineTuneJobHandle) else fine_tune_job
        sweep_name = fine_tune_sweep.name if isinstance(fine_tune_sweep, SweepHandle) else fine_tune_sweep
        isvc = build.inferenceservice(
            name,
            fine_tune_job=job_name,
            fine_tune_sweep=sweep_name,
            source=source,
            namespace=self.namespace,
            replicas=replicas,
            autoscaling=autoscaling,
            runtime=runtime,
            **kwargs,
        )
        if job_name is not None:
            self._require_succeeded(job_name)
        if sweep_name is not None:
            self._require_succeeded(sweep_name, FINETUNESWEEP)
        self._backend.create(build.manifest(isvc))
        return InferenceServiceHandle(self._backend, name, self.poll)

    def _require_succeeded(self, job_name: str, kind: str = FINETUNEJOB) -> None:
        job = self._backend.get(kind, job_name)
        if job is None:
            raise NotFound(kind, job_name, self._backend.where)
        phase = (job.get("status") or {}).get("phase", "Pending")
        if phase != "Succeeded":
            raise NotReady(
                f"cannot serve {kind} {job_name!r}: it is {phase}, not Succeeded"
                + (" (it failed)" if phase == "Failed" else " (wait() for it first)")
            )

    def service(self, name: str) -> InferenceServiceHandle:
        """A handle on an existing InferenceService (NotFound if there is none)."""
        handle = InferenceServiceHandle(self._backend, name, self.poll)
        handle.get()
        return handle
