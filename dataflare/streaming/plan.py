"""The validated, runnable form of a pipeline: steps in topological order.

A `StepPlan` is plain data (ids, type names, validated config, schemas), so
that an operator instance can be rebuilt from it in another thread, process
or machine.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from dataflare.plugin.interface import Plugin, PluginConfig
from dataflare.streaming.spec import (
    EventTimeSpec,
    PipelineSpec,
    ReplaySpec,
    WatermarkSpec,
)

Section = Literal["sources", "transformations", "destinations"]


@dataclass(frozen=True)
class InputRef:
    step: str
    port: str | None = None  # None is the main output

    def __str__(self) -> str:
        return self.step if self.port is None else f"{self.step}.{self.port}"

    @classmethod
    def parse(cls, text: str) -> InputRef:
        step, _, port = text.partition(".")
        return cls(step, port or None)


@dataclass
class StepPlan:
    id: str
    section: Section
    type: str
    plugin_cls: builtins.type[Plugin]  # type: ignore[type-arg]
    config: PluginConfig
    inputs: list[InputRef] = field(default_factory=list)
    parallelism: int = 1
    event_time: EventTimeSpec | None = None
    watermark: WatermarkSpec = field(default_factory=WatermarkSpec)
    replay: ReplaySpec = field(default_factory=ReplaySpec)
    output_schema: pa.Schema | None = None
    side_schemas: dict[str, pa.Schema] = field(default_factory=dict)
    partition_key: list[str] | None = None
    input_schema: pa.Schema | None = None  # first input's schema


@dataclass
class PipelinePlan:
    spec: PipelineSpec
    steps: dict[str, StepPlan]  # topological order
    source: str = "<pipeline>"

    def consumers(self, step: str, port: str | None = None) -> list[StepPlan]:
        return [s for s in self.steps.values() if InputRef(step, port) in s.inputs]

    def dead_letter_path(self) -> str:
        return self.spec.errors.dead_letter.path.replace("{pipeline_id}", self.spec.id)
