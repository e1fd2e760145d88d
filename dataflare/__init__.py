"""DataFlare: stream processing on Arrow record batches, with plugins.

The names below are imported on first use (PEP 562 module `__getattr__`),
so that `import dataflare`, or importing one of its modules such as the
CLI, does not load Arrow, Polars and the engine before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dataflare.api import Pipeline, load_pipeline, run_pipeline
    from dataflare.streaming.errors import (
        DataFlareError,
        PipelineRunError,
        PipelineValidationError,
        RejectedRecordError,
    )
    from dataflare.streaming.metrics import RunSummary
    from dataflare.streaming.runner import ProgressSnapshot

_EXPORTS = {
    "DataFlareError": "dataflare.streaming.errors",
    "Pipeline": "dataflare.api",
    "PipelineRunError": "dataflare.streaming.errors",
    "PipelineValidationError": "dataflare.streaming.errors",
    "ProgressSnapshot": "dataflare.streaming.runner",
    "RejectedRecordError": "dataflare.streaming.errors",
    "RunSummary": "dataflare.streaming.metrics",
    "load_pipeline": "dataflare.api",
    "run_pipeline": "dataflare.api",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dataflare' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
