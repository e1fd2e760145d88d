"""The validated, runnable form of a pipeline: steps in topological order.

A `StepPlan` is plain data (ids, type names, validated config, schemas), so
that an operator instance can be rebuilt from it in another thread, process
or machine.
"""

from __future__ import annotations

import builtins
import collections
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

    def chains(self, *, enabled: bool = True) -> list[list[str]]:
        """Group the steps into chains that can each run on one thread.

        A step joins its upstream's chain when both have parallelism 1, it
        has exactly one input, and it is the upstream's only consumer (over
        all ports). The upstream then calls it directly instead of putting
        batches in a queue, as Flink chains operators. Every other edge
        (fan-out, fan-in, parallelism above 1, keyed exchanges) stays a
        queue between threads.

        Args:
            enabled: False gives one chain per step.

        Returns:
            Step ids per chain, head first, chains in topological order.
        """
        readers = collections.Counter(
            ref.step for step in self.steps.values() for ref in step.inputs
        )
        chains: list[list[str]] = []
        chain_of: dict[str, list[str]] = {}
        for step in self.steps.values():
            upstream = self._chained_upstream(step, readers) if enabled else None
            if upstream is None:
                chain = [step.id]
                chains.append(chain)
            else:
                chain = chain_of[upstream]
                chain.append(step.id)
            chain_of[step.id] = chain
        return chains

    def _chained_upstream(
        self, step: StepPlan, readers: collections.Counter[str]
    ) -> str | None:
        if len(step.inputs) != 1 or step.parallelism != 1:
            return None
        upstream = self.steps[step.inputs[0].step]
        if upstream.parallelism != 1 or readers[upstream.id] != 1:
            return None
        return upstream.id
