"""tauon.dev/v1alpha1 API: pydantic models are the single source of truth for the CRDs; tauon.api.names
holds the names on the wire (group, version, kinds, labels, annotations, conditions, reasons)."""

from tauon.api.common import Condition, find_condition, is_true
from tauon.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from tauon.api.finetunesweep import FineTuneSweep, FineTuneSweepSpec, FineTuneSweepStatus
from tauon.api.inferenceservice import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from tauon.api.names import API_VERSION, GROUP, VERSION, Manifest

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "FineTuneSweepStatus",
    "InferenceService",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "Manifest",
    "find_condition",
    "is_true",
]
