"""DataFlare: stream processing on Arrow record batches, with plugins."""

from dataflare.api import Pipeline, load_pipeline, run_pipeline
from dataflare.streaming.errors import (
    DataFlareError,
    PipelineRunError,
    PipelineValidationError,
    RejectedRecordError,
)
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.runner import ProgressSnapshot

__version__ = "0.1.0"

__all__ = [
    "DataFlareError",
    "Pipeline",
    "PipelineRunError",
    "PipelineValidationError",
    "ProgressSnapshot",
    "RejectedRecordError",
    "RunSummary",
    "load_pipeline",
    "run_pipeline",
]
