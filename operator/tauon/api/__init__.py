"""tauon.dev/v1alpha1 API: pydantic models are the single source of truth for the CRDs."""

from tauon.api.common import API_VERSION, GROUP, VERSION, Condition
from tauon.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from tauon.api.inferenceservice import InferenceService, InferenceServiceSpec, InferenceServiceStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "InferenceService",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
]
