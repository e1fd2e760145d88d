"""The Python API: load and run pipeline files, or build pipelines in code.

Example::

    from dataflare import Pipeline

    p = Pipeline("delays")
    flights = p.source("flights", "csv", path="flights.csv")
    late = p.transform("late", "filter", [flights], condition="dep_delay > 15")
    p.destination("out", "memory", [late])
    summary = p.run()
    table = summary.output("out")
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflare.streaming.loader import LoadedFile, load_file
from dataflare.streaming.plan import PipelinePlan
from dataflare.streaming.validate import validate

if TYPE_CHECKING:
    from dataflare.plugin.registry import PluginRegistry
    from dataflare.streaming.metrics import RunSummary
    from dataflare.streaming.runner import ProgressCallback

# The runner, and with it the executor and Polars, is imported by the
# functions that run a pipeline, so that loading and validating do not pay
# for it.


def load_pipeline(
    path: str | Path,
    params: Mapping[str, Any] | None = None,
    *,
    registry: PluginRegistry | None = None,
) -> PipelinePlan:
    """Read and validate a pipeline file (rendering it if it is a template).

    Raises:
        PipelineValidationError: listing every problem found.
    """
    return validate(load_file(path), params=params, registry=registry)


def run_pipeline(
    pipeline: str | Path | PipelinePlan,
    params: Mapping[str, Any] | None = None,
    *,
    on_progress: ProgressCallback | None = None,
) -> RunSummary:
    """Validate (if given a path) and run a pipeline to its end.

    Raises:
        PipelineValidationError: the file is invalid.
        PipelineRunError: the run failed; `.summary` has what it did.
    """
    from dataflare.streaming.runner import PipelineRun

    plan = (
        pipeline
        if isinstance(pipeline, PipelinePlan)
        else load_pipeline(pipeline, params)
    )
    return PipelineRun(plan).run(on_progress=on_progress)


class Pipeline:
    """Build a pipeline in code; the result is checked like a pipeline file."""

    def __init__(
        self,
        id: str,
        *,
        name: str | None = None,
        version: str = "1.0.0",
        description: str | None = None,
    ) -> None:
        self._data: dict[str, Any] = {
            "id": id,
            "version": version,
            "sources": {},
            "transformations": {},
            "destinations": {},
        }
        if name is not None:
            self._data["name"] = name
        if description is not None:
            self._data["description"] = description
        self._registry: PluginRegistry | None = None

    def source(
        self,
        step: str,
        type: str,
        *,
        event_time: Mapping[str, Any] | None = None,
        watermark: Mapping[str, Any] | None = None,
        replay: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> str:
        """Add a source step; return its id for use in `inputs`.

        `event_time`, `watermark` and `replay` are the step's own settings.
        Every other keyword goes into its `config`, `mode` included, because
        the `postgres` and `mysql` sources read it there.
        """
        spec: dict[str, Any] = {"type": type, "config": config}
        if event_time is not None:
            spec["event_time"] = dict(event_time)
        if watermark is not None:
            spec["watermark"] = dict(watermark)
        if replay is not None:
            spec["replay"] = dict(replay)
        self._data["sources"][step] = spec
        return step

    def transform(
        self,
        step: str,
        type: str,
        inputs: Sequence[str],
        *,
        parallelism: int | None = None,
        **config: Any,
    ) -> str:
        """Add a transformation step; return its id."""
        spec: dict[str, Any] = {"type": type, "inputs": list(inputs), "config": config}
        if parallelism is not None:
            spec["parallelism"] = parallelism
        self._data["transformations"][step] = spec
        return step

    def destination(
        self, step: str, type: str, inputs: Sequence[str], **config: Any
    ) -> str:
        """Add a destination step; return its id."""
        self._data["destinations"][step] = {
            "type": type,
            "inputs": list(inputs),
            "config": config,
        }
        return step

    def execution(self, **settings: Any) -> Pipeline:
        self._data["execution"] = settings
        return self

    def errors(self, **settings: Any) -> Pipeline:
        self._data["errors"] = settings
        return self

    def use_registry(self, registry: PluginRegistry) -> Pipeline:
        """Resolve step types in `registry` (for plugins not installed as packages)."""
        self._registry = registry
        return self

    def to_dict(self) -> dict[str, Any]:
        return copy.copy(self._data)

    def build(self) -> PipelinePlan:
        """Validate the pipeline. Raises PipelineValidationError."""
        return validate(
            LoadedFile(self._data, f"<pipeline {self._data['id']}>"),
            registry=self._registry,
        )

    def run(self, *, on_progress: ProgressCallback | None = None) -> RunSummary:
        from dataflare.streaming.runner import PipelineRun

        return PipelineRun(self.build()).run(on_progress=on_progress)
