"""Check a whole pipeline file before anything runs and build its plan.

Four kinds of check run over the file, and every problem found is reported
together, in file order, each with its path in the file, its line, the bad
value and a hint:

1. structure: the pydantic model of the file format;
2. plugins: each step's `type` exists and its `config` fits the plugin's model;
3. graph: inputs name existing steps, no cycles, every step is read;
4. fields: schemas flow from sources through every step, so a misspelt
   field in an expression or mapping, or a side output that a step does
   not have, is found before the run.

A problem in one step does not hide the problems of others: the graph is
checked on every step whose `inputs` can be read, and fields are checked
on every step whose own config and upstream steps are valid.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ValidationError

from dataflare.connectors.files.base import file_in_the_way
from dataflare.plugin.interface import (
    EVENT_TIME,
    RESERVED_COLUMNS,
    ConfigError,
    FieldNotFoundError,
    Plugin,
    PluginConfig,
    Sink,
    SinkConfig,
    Source,
    Transform,
)
from dataflare.plugin.registry import (
    PluginNotFoundError,
    PluginRegistry,
    default_registry,
)
from dataflare.streaming.errors import PipelineValidationError, ValidationIssue
from dataflare.streaming.loader import LoadedFile, is_template, render_template
from dataflare.streaming.plan import InputRef, PipelinePlan, Section, StepPlan
from dataflare.streaming.spec import (
    MAX_PARALLELISM,
    STEP_ID,
    EventTimeSpec,
    ExecutionSpec,
    PipelineSpec,
    ReplaySpec,
    WatermarkSpec,
)

SECTIONS: tuple[Section, ...] = ("sources", "transformations", "destinations")

Configs = dict[str, tuple[type[Plugin], PluginConfig]]  # type: ignore[type-arg]
Path_ = tuple[str | int, ...]


class _ValidationContext:
    """An `OperatorContext` for plugins built only to compute schemas."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger(f"dataflare.step.{step}")
        self.stopping = False
        self.checkpointing = False
        self.pipeline_id = "validation"

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

    Args:
        loaded: the parsed file; a template is rendered with `params` first.
        params: template parameters, as given on the command line or in code.
        registry: where step types are looked up; the installed plugins if None.
        check_fields: also build each plugin and compute the schemas flowing
            between steps (reads the sources' schemas, e.g. CSV headers).

    Raises:
        PipelineValidationError: with every problem found, each with its path.
    """
    registry = registry or default_registry()
    if is_template(loaded.data):
        loaded = render_template(loaded, params or {})
    elif params:
        raise PipelineValidationError(
            [
                ValidationIssue(
                    ("parameters",),
                    "this file declares no parameters",
                    value=sorted(params),
                    hint="parameters need a file with 'parameters' and 'template' keys",
                )
            ],
            loaded.source,
        )

    issues: list[ValidationIssue] = list(loaded.issues)
    data = loaded.data
    spec = _check_structure(data, issues)
    _configure_plugin_paths(data, loaded.source, issues)
    configs = _check_plugins(data, registry, issues)
    if spec is not None:
        _check_dead_letter_path(spec, data, configs, issues)
    steps_specs = _step_specs(data)
    order = _check_graph(steps_specs, configs, issues)
    steps = _build_steps(data, steps_specs, configs, order)
    # Schemas flow along the graph, so field checks need a sound graph:
    # duplicate ids or a wrong number of inputs would give false findings.
    if check_fields and _graph_sound(data, steps):
        _check_fields(steps, issues)
    if spec is None or issues:
        _raise(issues, loaded)
    assert spec is not None
    return PipelinePlan(spec, steps, loaded.source)


def _configure_plugin_paths(
    data: dict[str, Any], source: str, issues: list[ValidationIssue]
) -> None:
    """Register the plugin directories a file names under `plugins.paths`."""
    settings = data.get("plugins")
    if not isinstance(settings, dict) or not settings.get("paths"):
        return
    from dataflare.plugin.manager import default_manager

    base = Path(source).parent if not source.startswith("<") else Path.cwd()
    try:
        default_manager().configure(settings, base_dir=base)
    except (ValueError, OSError) as exc:
        issues.append(ValidationIssue(("plugins", "paths"), str(exc)))


def _check_dead_letter_path(
    spec: PipelineSpec,
    data: dict[str, Any],
    configs: Configs,
    issues: list[ValidationIssue],
) -> None:
    """Report a dead-letter path that is a folder or a destination's output."""
    text = spec.errors.dead_letter.path.replace("{pipeline_id}", spec.id)
    where: Path_ = ("errors", "dead_letter", "path")
    hint = (
        "give the dead-letter output a file of its own, "
        "such as dead-letter/{pipeline_id}.jsonl"
    )
    if not text.strip():
        issues.append(ValidationIssue(where, "is empty", text, hint))
        return
    dead = Path(text).resolve()
    if dead.is_dir():
        issues.append(ValidationIssue(where, "is a folder, not a file", text, hint))
        return
    blocker = file_in_the_way(dead)
    if blocker is not None:
        message = f"cannot be created, because {blocker} is a file, not a folder"
        issues.append(ValidationIssue(where, message, text, hint))
        return
    destinations = data.get("destinations")
    for step_id in destinations if isinstance(destinations, dict) else {}:
        checked = configs.get(str(step_id))
        path = getattr(checked[1], "path", None) if checked is not None else None
        if isinstance(path, str) and Path(path).resolve() == dead:
            issues.append(
                ValidationIssue(
                    where,
                    f"destination {step_id!r} writes the same file, which would "
                    "replace the rejected records",
                    text,
                    hint,
                )
            )


def _graph_sound(data: dict[str, Any], steps: dict[str, StepPlan]) -> bool:
    seen: set[str] = set()
    for section in SECTIONS:
        ids = data.get(section)
        if isinstance(ids, dict):
            if seen & set(ids):
                return False
            seen |= set(ids)
    for step in steps.values():
        expected = getattr(step.plugin_cls, "input_count", None)
        transformation = step.section == "transformations"
        if transformation and expected is not None and len(step.inputs) != expected:
            return False
    return True


def _raise(issues: list[ValidationIssue], loaded: LoadedFile) -> None:
    for issue in issues:
        if issue.line is None:
            issue.line = loaded.line_of(issue.path)
    unique: dict[tuple[Path_, str], ValidationIssue] = {}
    for issue in issues:
        unique.setdefault((issue.path, issue.message), issue)
    ordered = sorted(unique.values(), key=lambda i: i.line or 0)
    raise PipelineValidationError(ordered, loaded.source)


# --- stage 1: structure ----------------------------------------------------


def _check_structure(
    data: dict[str, Any], issues: list[ValidationIssue]
) -> PipelineSpec | None:
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        issues.extend(pydantic_issues(exc, (), PipelineSpec))
        return None


def pydantic_issues(
    exc: ValidationError, prefix: Path_, model: type[BaseModel] | None = None
) -> list[ValidationIssue]:
    """Turn pydantic's errors into issues with file paths and hints.

    Args:
        exc: the error of validating part of the file.
        prefix: the path of that part in the file.
        model: the model that was validated, to list the known keys when a
            key is unknown.
    """
    issues = []
    for error in exc.errors():
        raw_loc = tuple(error["loc"])
        is_key = bool(raw_loc) and raw_loc[-1] == "[key]"
        loc = tuple(part for part in raw_loc if not _is_union_tag(part))
        kind = error["type"]
        message = _plain_message(error["msg"])
        hint = None
        value = error.get("input")
        if kind == "extra_forbidden":
            message = "unknown key"
            known = _known_keys(model, loc[:-1]) if model is not None else None
            hint = _key_hint(str(loc[-1]), known)
        elif kind == "missing":
            message = "required key is missing"
            value = None
        elif is_key and kind == "string_pattern_mismatch" and loc[:1] != ("id",):
            message = "invalid step id"
            hint = "use letters, digits, '_' and '-', starting with a letter or '_'"
        elif kind == "string_pattern_mismatch":
            message = f"invalid value; it must match {error['ctx']['pattern']}"
        if isinstance(value, dict):
            value = None  # a whole mapping: its line number locates it better
        issues.append(ValidationIssue((*prefix, *loc), message, value=value, hint=hint))
    return issues


def _plain_message(text: str) -> str:
    """Reword pydantic's messages as short statements about the value."""
    text = re.sub(r"^(Value|Assertion) error, ", "", text)
    return re.sub(r"^Input should be ", "must be ", text)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after"})


def _key_hint(key: str, known: list[str] | None) -> str:
    if not known:
        return "remove it, or check its spelling"
    close = difflib.get_close_matches(key, known, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}known keys: {', '.join(known)}"


def _known_keys(model: type[BaseModel], loc: Path_) -> list[str] | None:
    """Return the keys allowed at `loc` inside `model`, following field types."""
    target: Any = model
    for part in loc:
        target = _unwrap(target)
        if isinstance(target, type) and issubclass(target, BaseModel):
            field = _field_by_key(target, str(part))
            if field is None:
                return None
            target = field.annotation
        elif typing.get_origin(target) in (dict, list):
            target = typing.get_args(target)[-1]
        else:
            return None
    target = _unwrap(target)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return [info.alias or name for name, info in target.model_fields.items()]
    return None


def _field_by_key(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip `Annotated` and `X | None` down to the model or container type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [
                a for a in members if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            annotation = (models or members)[0]
        else:
            return annotation


# --- stage 2: plugins ------------------------------------------------------


def _check_plugins(
    data: dict[str, Any], registry: PluginRegistry, issues: list[ValidationIssue]
) -> Configs:
    configs: Configs = {}
    seen: dict[str, str] = {}
    for section in SECTIONS:
        steps = data.get(section)
        if not isinstance(steps, dict):
            continue
        for step_id, step in steps.items():
            if step_id in seen:
                issues.append(
                    ValidationIssue(
                        (section, step_id),
                        f"step id is also used in {seen[step_id]}",
                        hint="step ids must be unique across the whole file",
                    )
                )
            seen[str(step_id)] = section
            if not isinstance(step, dict) or not isinstance(step.get("type"), str):
                continue  # reported by the structure check
            checked = _check_plugin(section, str(step_id), step, registry, issues)
            if checked is not None:
                configs[str(step_id)] = checked
    return configs


def _check_plugin(
    section: str,
    step_id: str,
    step: dict[str, Any],
    registry: PluginRegistry,
    issues: list[ValidationIssue],
) -> tuple[type[Plugin], PluginConfig] | None:  # type: ignore[type-arg]
    type_name = step["type"]
    path: Path_ = (section, step_id, "type")
    try:
        cls = registry.get(section, type_name)
    except PluginNotFoundError as exc:
        close = difflib.get_close_matches(type_name, exc.available, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        issues.append(
            ValidationIssue(
                path,
                f"unknown {exc.section} type",
                value=type_name,
                hint=f"{guess}known types: {', '.join(exc.available) or '(none)'}",
            )
        )
        return None
    except (ImportError, TypeError, AttributeError) as exc:
        issues.append(
            ValidationIssue(
                path,
                f"plugin cannot be loaded: {exc}",
                value=type_name,
                hint="check that the package that provides it is installed",
            )
        )
        return None
    raw = step.get("config")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None  # reported by the structure check
    mode = step.get("mode")
    if section == "sources" and isinstance(mode, str):
        # A source's `mode` (full, incremental, cdc) sits beside `config` in the
        # file; plugins that support several modes read it as `config.mode`.
        if "mode" in cls.Config.model_fields:
            raw = {**raw, "mode": mode}
        elif mode != "full":
            issues.append(
                ValidationIssue(
                    (section, step_id, "mode"),
                    f"source type {type_name!r} reads only in mode 'full'",
                    value=mode,
                    hint="remove `mode`, or use a connector that supports it",
                )
            )
            return None
    try:
        return cls, cls.Config.model_validate(raw)
    except ValidationError as exc:
        issues.extend(pydantic_issues(exc, (section, step_id, "config"), cls.Config))
        return None


# --- stage 3: graph --------------------------------------------------------


def _step_specs(data: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Return each step that is a mapping, by id, with its section."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for section in SECTIONS:
        steps = data.get(section)
        if isinstance(steps, dict):
            for step_id, step in steps.items():
                if isinstance(step, dict) and str(step_id) not in found:
                    found[str(step_id)] = (section, step)
    return found


def _inputs_of(step: dict[str, Any]) -> list[tuple[int, InputRef]]:
    """Return the well-formed input references of a step, with their index."""
    inputs = step.get("inputs")
    if not isinstance(inputs, list):
        return []
    refs = []
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            continue
        ref = InputRef.parse(text)
        if re.match(STEP_ID, ref.step) and (
            ref.port is None or re.match(STEP_ID, ref.port)
        ):
            refs.append((index, ref))
    return refs


def _check_graph(
    steps: dict[str, tuple[str, dict[str, Any]]],
    configs: Configs,
    issues: list[ValidationIssue],
) -> list[str]:
    """Check the edges between steps; return the steps in topological order.

    Steps on a cycle, or downstream of one, are left out of the order.
    """
    readable = [s for s, (section, _) in steps.items() if section != "destinations"]
    upstream: dict[str, set[str]] = {step_id: set() for step_id in steps}
    read: set[InputRef] = set()
    for step_id, (section, step) in steps.items():
        if section == "sources":
            continue
        for index, ref in _inputs_of(step):
            read.add(ref)
            path: Path_ = (section, step_id, "inputs", index)
            target = steps.get(ref.step)
            if target is None:
                others = [s for s in readable if s != step_id]
                close = difflib.get_close_matches(ref.step, others, n=1)
                guess = f"did you mean {close[0]!r}? " if close else ""
                # The step meant is read, once the name is corrected.
                read.update(InputRef(name) for name in close)
                issues.append(
                    ValidationIssue(
                        path,
                        "input names no step",
                        value=str(ref),
                        hint=f"{guess}steps that can be read: {', '.join(others)}",
                    )
                )
            elif target[0] == "destinations":
                issues.append(
                    ValidationIssue(
                        path,
                        "a destination cannot be read by another step",
                        value=str(ref),
                        hint="read the step that feeds the destination instead",
                    )
                )
            else:
                upstream[step_id].add(ref.step)
        _check_input_count(step_id, section, step, configs, issues)
    for step_id, (section, _) in steps.items():
        if section != "destinations" and InputRef(step_id) not in read:
            issues.append(
                ValidationIssue(
                    (section, step_id),
                    "no step reads this step's output",
                    hint="add it to the inputs of a transformation or destination, "
                    "or remove it",
                )
            )
    return _topological_order(steps, upstream, issues)


def _check_input_count(
    step_id: str,
    section: str,
    step: dict[str, Any],
    configs: Configs,
    issues: list[ValidationIssue],
) -> None:
    cls = configs.get(step_id, (None, None))[0]
    inputs = step.get("inputs")
    if section == "transformations" and cls is not None and isinstance(inputs, list):
        expected = getattr(cls, "input_count", 1)
        if expected is not None and len(inputs) != expected:
            issues.append(
                ValidationIssue(
                    (section, step_id, "inputs"),
                    f"type {step.get('type')!r} takes exactly {expected} input(s)",
                    value=inputs,
                )
            )
    parallelism = step.get("parallelism")
    if section == "destinations" and isinstance(parallelism, int) and parallelism > 1:
        issues.append(
            ValidationIssue(
                (section, step_id, "parallelism"),
                "destinations run as one instance",
                value=parallelism,
                hint="set parallelism on the transformations before it",
            )
        )


def _topological_order(
    steps: dict[str, tuple[str, dict[str, Any]]],
    upstream: dict[str, set[str]],
    issues: list[ValidationIssue],
) -> list[str]:
    order: list[str] = []
    placed: set[str] = set()
    remaining = dict(upstream)
    while True:
        ready = [s for s, ups in remaining.items() if ups <= placed]
        if not ready:
            break
        for step_id in ready:
            order.append(step_id)
            placed.add(step_id)
            del remaining[step_id]
    for cycle in _cycles(remaining, list(steps)):
        first = cycle[0]
        section = steps[first][0]
        issues.append(
            ValidationIssue(
                (section, first, "inputs"),
                f"inputs form a cycle: {' -> '.join([*cycle, first])}",
                hint="a pipeline must be a directed acyclic graph; remove one of "
                "these inputs",
            )
        )
    return order


def _cycles(remaining: dict[str, set[str]], file_order: list[str]) -> list[list[str]]:
    """Return one cycle through each group of steps that cannot be ordered."""
    cycles: list[list[str]] = []
    on_cycle: set[str] = set()
    for start in sorted(remaining):
        if start in on_cycle:
            continue
        path: list[str] = []
        step: str | None = start
        while step is not None and step not in path:
            path.append(step)
            step = next((u for u in sorted(remaining[step]) if u in remaining), None)
        if step is None or step in on_cycle:
            continue  # downstream of a cycle, not on one
        cycle = path[path.index(step) :]
        cycle.reverse()  # upstream first, the order in which records flow
        on_cycle.update(cycle)
        # Start at the step that comes first in the file.
        first = min(range(len(cycle)), key=lambda i: file_order.index(cycle[i]))
        cycles.append(cycle[first:] + cycle[:first])
    return cycles


# --- building and stage 4: fields --------------------------------------------


def _build_steps(
    data: dict[str, Any],
    steps: dict[str, tuple[str, dict[str, Any]]],
    configs: Configs,
    order: list[str],
) -> dict[str, StepPlan]:
    """Build the plan of each step whose config and inputs are valid.

    Parts that the schemas do not depend on (`watermark`, `parallelism`)
    fall back to their defaults when invalid, so that the fields of the
    step and its downstream steps are still checked.
    """
    try:
        execution = ExecutionSpec.model_validate(data.get("execution") or {})
        default_parallelism = execution.parallelism
    except ValidationError:
        default_parallelism = 1  # reported by the structure check
    plans: dict[str, StepPlan] = {}
    for step_id in order:
        section, raw = steps[step_id]
        if step_id not in configs:
            continue
        cls, config = configs[step_id]
        plan = StepPlan(
            id=step_id,
            section=section,  # type: ignore[arg-type]
            type=raw["type"],
            plugin_cls=cls,
            config=config,
        )
        if section == "sources":
            built = _add_time(plan, raw)
        else:
            built = _add_inputs(plan, raw, default_parallelism)
        if built:
            plans[step_id] = plan
    return plans


def _add_time(plan: StepPlan, raw: dict[str, Any]) -> bool:
    """Set a source's time settings; False if its event_time is invalid."""
    try:
        if raw.get("event_time") is not None:
            plan.event_time = EventTimeSpec.model_validate(raw["event_time"])
    except ValidationError:
        return False  # reported by the structure check
    # Invalid parts are reported by the structure check; the schema does not
    # depend on them, so their defaults stand in.
    with contextlib.suppress(ValidationError):
        plan.watermark = WatermarkSpec.model_validate(raw.get("watermark") or {})
    with contextlib.suppress(ValidationError):
        plan.replay = ReplaySpec.model_validate(raw.get("replay") or {})
    return True


def _add_inputs(plan: StepPlan, raw: dict[str, Any], default_parallelism: int) -> bool:
    """Set a step's inputs and parallelism; False if an input is malformed."""
    refs = _inputs_of(raw)
    inputs = raw.get("inputs")
    if not refs or not isinstance(inputs, list) or len(refs) != len(inputs):
        return False  # reported by the structure check
    plan.inputs = [ref for _, ref in refs]
    parallelism = raw.get("parallelism")
    valid = isinstance(parallelism, int) and 1 <= parallelism <= MAX_PARALLELISM
    if plan.section == "transformations":
        plan.parallelism = parallelism if valid else default_parallelism  # type: ignore[assignment]
    return True


def _check_fields(steps: dict[str, StepPlan], issues: list[ValidationIssue]) -> None:
    """Compute the schema of every step in order; report what does not fit."""
    schemas: dict[InputRef, pa.Schema | None] = {}
    for step in steps.values():
        if any(ref.step not in steps for ref in step.inputs):
            schemas[InputRef(step.id)] = None  # an upstream step is invalid
            continue
        _check_ports(step, steps, schemas, issues)
        inputs = [schemas.get(ref) for ref in step.inputs]
        if any(schema is None for schema in inputs):
            schemas[InputRef(step.id)] = None  # already reported upstream
            continue
        try:
            plugin_cls: Any = step.plugin_cls
            plugin = plugin_cls(step.config, _ValidationContext(step.id))
            _step_schema(step, plugin, [s for s in inputs if s is not None], schemas)
        except FieldNotFoundError as exc:
            issues.append(_field_issue(step, exc))
            schemas[InputRef(step.id)] = None
        except ConfigError as exc:
            where = exc.where.split(".") if exc.where else []
            # The path is shown before the message, so a message that starts
            # with the key (a plugin's config error) would name it twice.
            message = str(exc).removeprefix(f"{exc.where}: ") if exc.where else str(exc)
            issues.append(
                ValidationIssue(
                    _config_path(step, where),
                    message,
                    value=_config_value(step, where) if where else None,
                )
            )
            schemas[InputRef(step.id)] = None
        except Exception as exc:  # any failure of plugin code is a finding
            message = str(exc) or type(exc).__name__
            issues.append(ValidationIssue((step.section, step.id, "config"), message))
            schemas[InputRef(step.id)] = None


def _check_ports(
    step: StepPlan,
    steps: dict[str, StepPlan],
    schemas: dict[InputRef, pa.Schema | None],
    issues: list[ValidationIssue],
) -> None:
    for index, ref in enumerate(step.inputs):
        if ref.port is None or schemas.get(InputRef(ref.step)) is None:
            continue
        upstream = steps[ref.step]
        if ref.port not in upstream.side_schemas:
            ports = ", ".join(upstream.side_schemas) or "(none)"
            issues.append(
                ValidationIssue(
                    (step.section, step.id, "inputs", index),
                    f"step {ref.step!r} has no side output {ref.port!r}",
                    value=str(ref),
                    hint=f"its side outputs: {ports}",
                )
            )
            schemas[ref] = None


def _field_issue(step: StepPlan, exc: FieldNotFoundError) -> ValidationIssue:
    where = exc.where.split(".") if exc.where else []
    path = _config_path(step, where)
    close = difflib.get_close_matches(exc.name, exc.available, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    fields = ", ".join(exc.available) or "(none)"
    place = f" in {exc.where}" if exc.where else ""
    return ValidationIssue(
        path,
        f"unknown field {exc.name!r}{place}",
        value=_config_value(step, where) if where else exc.name,
        hint=f"{guess}the fields reaching step {step.id!r} are: {fields}",
    )


def _config_path(step: StepPlan, where: list[str]) -> Path_:
    """Return the file path of a config key (or an `event_time` key) of a step."""
    if where[:1] == ["event_time"]:
        return (step.section, step.id, *where)
    return (step.section, step.id, "config", *where)


def _config_value(step: StepPlan, where: list[str]) -> Any:
    """Return the config (or event_time) value at `where`, for the report."""
    node: Any = step.event_time if where[:1] == ["event_time"] else step.config
    for part in where[1:] if where[:1] == ["event_time"] else where:
        if isinstance(node, BaseModel):
            node = getattr(node, part, None)
        elif isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, str | int | float) else None


def _step_schema(
    step: StepPlan,
    plugin: Plugin,  # type: ignore[type-arg]
    inputs: list[pa.Schema],
    schemas: dict[InputRef, pa.Schema | None],
) -> None:
    if isinstance(plugin, Source):
        if step.replay.sort_by_event_time:
            if step.event_time is None:
                raise ValueError(
                    "replay.sort_by_event_time needs `event_time` on the source"
                )
            if not plugin.bounded:
                raise ValueError(
                    "replay.sort_by_event_time works on bounded inputs only; "
                    "turn off follow"
                )
        schema = plugin.schema()
        if step.event_time is not None:
            # Imported here because it imports Polars, which a pipeline
            # without event time or expressions does not need.
            from dataflare.streaming.time import EventTimeExtractor

            schema = EventTimeExtractor(step.event_time, schema).output_schema(schema)
        step.output_schema = schema
    elif isinstance(plugin, Transform):
        step.output_schema = plugin.output_schema(inputs)
        step.side_schemas = plugin.side_outputs(inputs)
        step.partition_key = plugin.partition_key()
        for port, schema in step.side_schemas.items():
            schemas[InputRef(step.id, port)] = schema
        for name in step.partition_key or []:
            if name not in inputs[0].names:
                raise FieldNotFoundError(name, inputs[0].names)
        if step.partition_key == [] and step.parallelism > 1:
            # An empty key means state over all records: one instance only.
            raise ConfigError(
                f"this step keeps state over all records (no key), so it runs as "
                f"one instance; remove `parallelism: {step.parallelism}` or set a "
                "key to partition by"
            )
    elif isinstance(plugin, Sink):
        if plugin.same_fields:
            _check_same_fields(step, plugin, inputs)
        step.input_schema = inputs[0]
        return
    schemas[InputRef(step.id)] = step.output_schema


def _check_same_fields(
    step: StepPlan,
    plugin: Sink,  # type: ignore[type-arg]
    inputs: list[pa.Schema],
) -> None:
    """Raise ValueError if the inputs of a one-schema sink have other fields.

    The reserved columns count only when the sink keeps them.
    """
    keep = isinstance(plugin.config, SinkConfig) and plugin.config.include_metadata

    def names(schema: pa.Schema) -> list[str]:
        return [n for n in schema.names if keep or n not in RESERVED_COLUMNS]

    first = names(inputs[0])
    for ref, schema in zip(step.inputs[1:], inputs[1:], strict=True):
        other = names(schema)
        if other != first:
            raise ValueError(
                f"input {ref.step!r} has fields {other}, but input "
                f"{step.inputs[0].step!r} has {first}; every record this "
                "destination writes must have the same fields in the same "
                "order, so select the same fields in each input (an sql step "
                "can), or write each input to its own destination"
            )


def requires_event_time(schema: pa.Schema, step: str, what: str) -> None:
    """Raise a clear error if `schema` lacks event time (used by time-based steps)."""
    if EVENT_TIME not in schema.names:
        raise ValueError(
            f"{what} needs event time, but the records reaching step {step!r} have "
            "none; set `event_time` on the source"
        )


def schema_model() -> type[BaseModel]:
    """Return the pydantic model of the pipeline file format."""
    return PipelineSpec
