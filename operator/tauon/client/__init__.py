"""tauon Python SDK: fine-tune, pre-train and serve models from a notebook or a script.

    from tauon.client import Client

    client = Client(local=True)            # or Client() for the current kubeconfig's cluster
    job = client.fine_tune("sentiment", model="hf://sentence-transformers/all-MiniLM-L6-v2",
                           dataset="examples/data/sentiment.jsonl", num_labels=2, num_nodes=2,
                           max_steps=20, learning_rate=1e-4)
    job.wait()
    svc = client.serve("sentiment", fine_tune_job=job)
    svc.wait_ready()
    svc.predict(["I loved it", "it broke after a day"])

    sweep = client.sweep("lr", model=..., dataset=..., num_labels=2, max_steps=30,
                         parameters=[{"name": "learning_rate", "type": "float", "min": 1e-4, "max": 3e-3,
                                      "log": True}],
                         objective="evalAccuracy", goal="maximize", max_trials=4, parallel_trials=2)
    sweep.wait()
    sweep.best()                           # trial, parameters, objective, model

Objects are built through the API's pydantic models (the CRDs' source), so they cannot drift from them.
This package imports no torch or transformers.
"""

from tauon.client.client import Client
from tauon.client.errors import (
    AlreadyExists,
    ClusterUnreachable,
    Forbidden,
    JobFailed,
    MissingDependency,
    NotFound,
    NotReady,
    ServiceFailed,
    SpecError,
    SweepFailed,
    TauonError,
)
from tauon.client.handles import FineTuneJobHandle, InferenceServiceHandle, SweepHandle

__all__ = [
    "AlreadyExists",
    "Client",
    "ClusterUnreachable",
    "FineTuneJobHandle",
    "Forbidden",
    "InferenceServiceHandle",
    "JobFailed",
    "MissingDependency",
    "NotFound",
    "NotReady",
    "ServiceFailed",
    "SpecError",
    "SweepFailed",
    "SweepHandle",
    "TauonError",
]
