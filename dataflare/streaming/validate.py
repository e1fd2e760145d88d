"""Check a whole pipeline file before anything runs and build its plan.

Checks run in stages, and every problem of a stage is reported together:

1. structure: the pydantic model of the file format;
2. plugins: each step's `type` exists and its `config` fits the plugin's model;
3. graph: inputs name existing steps and ports, no cycles, nothing unread;
4. fields: schemas flow from sources through every step, so a misspelt
   field in an expression or mapping is found before the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from graphlib import CycleError, TopologicalSorter
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ValidationError

from dataflare.plugin.interface import (
    EVENT_TIME,
    ConfigError,
    FieldNotFoundError,
    Plugin,
    PluginConfig,
    Sink,
    Source,
    Transform,
)
from dataflare.plugin.registry import PluginNotFoundError, PluginRegistry, default_registry
from dataflare.streaming.errors import PipelineValidationError, ValidationIssue
from dataflare.streaming.loader import LoadedFile, is_template, render_template
from dataflare.streaming.plan import InputRef, PipelinePlan, Section, StepPlan
from dataflare.streaming.spec import PipelineSpec, SourceSpec, StepSpec
from dataflare.streaming.time import EventTimeExtractor

SECTIONS: tuple[Section, ...] = ("sources", "transformations", "destinations")


class _ValidationContext:
    """An `OperatorContext` for plugins built only to compute schemas."""

    def __init__(self, step: str) -> None:
        import logging

        self.step = step
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger(f"dataflare.step.{step}")
        self.stopping = False

    def reject(self, records: Any, reasons: Any, positions: Any = None) -> None:
        raise RuntimeError("no records flow during validation")

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        raise RuntimeError("no records flow during validation")

    def count(self, name: str, value: int = 1) -> None:
        pass


def validate(
    loaded: LoadedFile,
    *,
    params: Mapping[str, Any] | None = None,
    registry: PluginRegistry | None = None,
    check_fields: bool = True,
) -> PipelinePlan:
    """Validate a loaded pipeline file and return its plan.

    Raises:
        PipelineValidationError: with every problem found, each with its path.
    """
    registry = registry or default_registry()
    if is_template(loaded.data):
        loaded = render_template(loaded, params or {})
    elif params:
        raise PipelineValidationError(
            [ValidationIssue(("parameters",), "this file declares no parameters",
                             hint="parameters need a file with 'parameters' and "
                             "'template' keys")],
            loaded.source,
        )

    issues: list[ValidationIssue] = []
    spec = _check_structure(loaded.data, issues)
    configs = _check_plugins(loaded.data, registry, issues)
    if spec is None or issues:
        _raise(issues, loaded)
    assert spec is not None

    order = _check_graph(spec, configs, issues)
    if issues:
        _raise(issues, loaded)

    steps = _build_steps(spec, configs, order)
    if check_fields:
        _check_fields(steps, issues)
        if issues:
            _raise(issues, loaded)
    return PipelinePlan(spec, steps, loaded.source)


def _raise(issues: list[ValidationIssue], loaded: LoadedFile) -> None:
    for issue in issues:
        if issue.line is None:
            issue.line = loaded.line_of(issue.path)
    raise PipelineValidationError(issues, loaded.source)


# --- stage 1: structure ----------------------------------------------------


def _check_structure(data: dict[str, Any], issues: list[ValidationIssue]
                     ) -> PipelineSpec | None:
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, ()))
        return None


def _pydantic_issues(exc: ValidationError, prefix: tuple[str | int, ...]
                     ) -> list[ValidationIssue]:
    issues = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
        message = error["msg"]
        hint = None
        if error["type"] == "extra_forbidden":
            message = "unknown key"
            hint = "remove it, or check its spelling against the docs"
        elif error["type"] == "missing":
            message = "required key is missing"
        value = error.get("input") if error["type"] != "missing" else None
        if isinstance(value, dict):
            value = None
        issues.append(ValidationIssue((*prefix, *loc), message, value=value, hint=hint))
    return issues


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after"})


# --- stage 2: plugins ------------------------------------------------------


def _check_plugins(
    data: dict[str, Any], registry: PluginRegistry, issues: list[ValidationIssue]
) -> dict[str, tuple[type[Plugin], PluginConfig]]:  # type: ignore[type-arg]
    configs: dict[str, tuple[type[Plugin], PluginConfig]] = {}  # type: ignore[type-arg]
    seen: dict[str, str] = {}
    for section in SECTIONS:
        steps = data.get(section)
        if not isinstance(steps, dict):
            continue
        for step_id, step in steps.items():
            if step_id in seen:
                issues.append(ValidationIssue(
                    (section, step_id), f"step id is also used in {seen[step_id]}",
                    hint="step ids must be unique across the whole file"))
            seen[str(step_id)] = section
            if not isinstance(step, dict) or not isinstance(step.get("type"), str):
                continue
            type_name = step["type"]
            try:
                cls = registry.get(section, type_name)
            except PluginNotFoundError as exc:
                issues.append(ValidationIssue(
                    (section, step_id, "type"), f"unknown {exc.section} type",
                    value=type_name, hint="known types: " + ", ".join(exc.available)))
                continue
            except (ImportError, TypeError) as exc:
                issues.append(ValidationIssue(
                    (section, step_id, "type"), f"plugin cannot be loaded: {exc}",
                    value=type_name))
                continue
            raw = step.get("config") or {}
            if not isinstance(raw, dict):
                continue  # reported by stage 1
            try:
                config = cls.Config.model_validate(raw)
            except ValidationError as exc:
                issues.extend(_pydantic_issues(exc, (section, step_id, "config")))
                continue
            configs[str(step_id)] = (cls, config)
    return configs


# --- stage 3: graph --------------------------------------------------------


def _check_graph(
    spec: PipelineSpec,
    configs: dict[str, tuple[type[Plugin], PluginConfig]],  # type: ignore[type-arg]
    issues: list[ValidationIssue],
) -> list[str]:
    sorter: TopologicalSorter[str] = TopologicalSorter()
    read: set[InputRef] = set()
    for section in ("transformations", "destinations"):
        steps: dict[str, StepSpec] = getattr(spec, section)
        for step_id, step in steps.items():
            sorter.add(step_id)
            for index, text in enumerate(step.inputs):
                ref = InputRef.parse(text)
                read.add(ref)
                path = (section, step_id, "inputs", index)
                target = spec.step_section(ref.step)
                if target is None:
                    known = [*spec.sources, *spec.transformations]
                    issues.append(ValidationIssue(
                        path, "input names no step", value=text,
                        hint="steps that can be read: " + ", ".join(known)))
                elif target == "destinations":
                    issues.append(ValidationIssue(
                        path, "a destination cannot be read by another step", value=text))
                else:
                    sorter.add(step_id, ref.step)
            cls = configs.get(step_id, (None, None))[0]
            if section == "transformations" and cls is not None:
                expected = cls.input_count  # type: ignore[attr-defined]
                if expected is not None and len(step.inputs) != expected:
                    issues.append(ValidationIssue(
                        (section, step_id, "inputs"),
                        f"type {step.type!r} takes exactly {expected} input(s)",
                        value=step.inputs))
            if section == "destinations" and (step.parallelism or 1) > 1:
                issues.append(ValidationIssue(
                    (section, step_id, "parallelism"),
                    "destinations run as one instance", value=step.parallelism,
                    hint="set parallelism on the transformations before it"))
    for source_id in spec.sources:
        sorter.add(source_id)
    for step_id in [*spec.sources, *spec.transformations]:
        if InputRef(step_id) not in read:
            section = "sources" if step_id in spec.sources else "transformations"
            issues.append(ValidationIssue(
                (section, step_id), "no step reads this step's output",
                hint="add it to the inputs of a transformation or destination, "
                "or remove it"))
    try:
        return list(sorter.static_order())
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        issues.append(ValidationIssue(("transformations",), f"inputs form a cycle: {cycle}",
                                      hint="a pipeline must be a directed acyclic graph"))
        return []


# --- building and stage 4: fields --------------------------------------------


def _build_steps(
    spec: PipelineSpec,
    configs: dict[str, tuple[type[Plugin], PluginConfig]],  # type: ignore[type-arg]
    order: list[str],
) -> dict[str, StepPlan]:
    steps: dict[str, StepPlan] = {}
    for step_id in order:
        section = spec.step_section(step_id)
        assert section is not None
        step: SourceSpec | StepSpec = getattr(spec, section)[step_id]
        cls, config = configs[step_id]
        plan = StepPlan(id=step_id, section=section,  # type: ignore[arg-type]
                        type=step.type, plugin_cls=cls, config=config)
        if isinstance(step, SourceSpec):
            plan.event_time = step.event_time
            plan.watermark = step.watermark
            plan.replay = step.replay
        else:
            plan.inputs = [InputRef.parse(text) for text in step.inputs]
            default = spec.execution.parallelism if section == "transformations" else 1
            plan.parallelism = step.parallelism or default
        steps[step_id] = plan
    return steps


def _check_fields(steps: dict[str, StepPlan], issues: list[ValidationIssue]) -> None:
    schemas: dict[InputRef, pa.Schema | None] = {}
    for step in steps.values():
        path: tuple[str | int, ...] = (step.section, step.id, "config")
        for index, ref in enumerate(step.inputs):
            upstream = steps[ref.step]
            if ref.port is not None and schemas.get(InputRef(ref.step)) is not None and (
                ref.port not in upstream.side_schemas
            ):
                ports = ", ".join(upstream.side_schemas) or "(none)"
                issues.append(ValidationIssue(
                    (step.section, step.id, "inputs", index),
                    f"step {ref.step!r} has no side output {ref.port!r}",
                    value=str(ref), hint=f"its side outputs: {ports}"))
        inputs = [schemas.get(ref) for ref in step.inputs]
        if any(schema is None for schema in inputs):
            schemas[InputRef(step.id)] = None  # upstream already reported
            continue
        plugin_cls: Any = step.plugin_cls
        plugin = plugin_cls(step.config, _ValidationContext(step.id))
        try:
            _step_schema(step, plugin, [s for s in inputs if s is not None], schemas)
        except (FieldNotFoundError, ConfigError) as exc:
            where = exc.where.split(".")[0] if exc.where else None
            at = (step.section, step.id, where) if where in {"event_time"} else path
            if where and where != "event_time":
                at = (*path, *exc.where.split("."))
            issues.append(ValidationIssue(at, str(exc)))
            schemas[InputRef(step.id)] = None
        except (ValueError, TypeError, OSError) as exc:
            issues.append(ValidationIssue(path, str(exc)))
            schemas[InputRef(step.id)] = None


def _step_schema(
    step: StepPlan,
    plugin: Plugin,  # type: ignore[type-arg]
    inputs: list[pa.Schema],
    schemas: dict[InputRef, pa.Schema | None],
) -> None:
    if isinstance(plugin, Source):
        if step.replay.sort_by_event_time:
            if step.event_time is None:
                raise ValueError("replay.sort_by_event_time needs `event_time` on the "
                                 "source")
            if not plugin.bounded:
                raise ValueError("replay.sort_by_event_time works on bounded inputs "
                                 "only; turn off follow")
        schema = plugin.schema()
        if step.event_time is not None:
            schema = EventTimeExtractor(step.event_time, schema).output_schema(schema)
        step.output_schema = schema
    elif isinstance(plugin, Transform):
        step.output_schema = plugin.output_schema(inputs)
        step.side_schemas = plugin.side_outputs(inputs)
        step.partition_key = plugin.partition_key()
        for port, schema in step.side_schemas.items():
            schemas[InputRef(step.id, port)] = schema
        if step.partition_key:
            for name in step.partition_key:
                if name not in inputs[0].names:
                    raise FieldNotFoundError(name, inputs[0].names)
    elif isinstance(plugin, Sink):
        step.input_schema = inputs[0]
        return
    schemas[InputRef(step.id)] = step.output_schema


def requires_event_time(schema: pa.Schema, step: str, what: str) -> None:
    """Raise a clear error if `schema` lacks event time (used by time-based steps)."""
    if EVENT_TIME not in schema.names:
        raise ValueError(
            f"{what} needs event time, but the records reaching step {step!r} have "
            "none; set `event_time` on the source"
        )


def schema_model() -> type[BaseModel]:
    return PipelineSpec
