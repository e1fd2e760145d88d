"""The pipeline file format as pydantic models.

The shape is the DataFlare workflow format (`id`, `name`, `version`,
`description`, `sources`, `transformations`, `destinations`, `schedule`,
`metadata`), extended for streaming with `event_time`, `watermark`,
`parallelism`, `execution` and `errors`. Plugin `config` blocks are checked
against each plugin's own config model in `dataflare.streaming.validate`.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|min|h|d)?\s*$")
_UNIT_SECONDS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(us|ms|s|m|min|h|d)?\s*$"


def parse_duration(value: Any) -> Any:
    """Parse `1h`, `15m`, `30s`, `250ms`, `10us`, `2d` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or '1h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _seconds(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            number, unit = match.groups()
            return _seconds(float(number) * _UNIT_SECONDS[unit or "s"])
    raise ValueError(
        "invalid duration: write a number with a unit (us, ms, s, m, h or d), "
        "for example '30s', '5m' or '1h'"
    )


def _seconds(seconds: float) -> timedelta:
    """Return a duration of `seconds`, or raise ValueError if none can hold it."""
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(
            f"duration too long: at most {timedelta.max.days:,} days"
        ) from None


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
            ],
            "description": "Duration: '250ms', '30s', '5m', '1h', '1d' or seconds",
        }
    ),
]

STEP_ID = r"^[A-Za-z_][A-Za-z0-9_-]*$"
MAX_PARALLELISM = 256
StepId = Annotated[str, Field(pattern=STEP_ID)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventTimeSpec(_Model):
    """How a source finds each record's event time."""

    field: str | None = None
    """Field that contains the event time."""
    expression: str | None = None
    """SQL expression computing the event time, e.g.
    `time_hour + minute * INTERVAL '1 minute'`."""
    format: str | None = None
    """How a string or number field encodes time: a strftime pattern such as
    `%Y-%m-%d %H:%M:%S`, or `iso8601`, `unix_s`, `unix_ms`, `unix_us`.
    Default: timestamps as they are, strings as ISO 8601."""
    timezone: str = "UTC"
    """Zone of timestamps that carry none."""

    @model_validator(mode="after")
    def _one_of_field_or_expression(self) -> EventTimeSpec:
        if (self.field is None) == (self.expression is None):
            raise ValueError("set exactly one of 'field' or 'expression'")
        return self


class WatermarkSpec(_Model):
    max_out_of_orderness: Duration = timedelta(0)
    """How far behind the newest event time a record may arrive and still be
    on time. The watermark is the newest event time seen minus this bound."""
    idle_timeout: Duration | None = None
    """After this long without data, the source stops holding back the
    watermark of downstream steps that also read other inputs."""


class ReplaySpec(_Model):
    sort_by_event_time: bool = False
    """Read the whole bounded input, then emit it in event-time order (ties
    keep input order). Costs memory for the whole input; for history files
    whose rows are not in time order."""


class SourceSpec(_Model):
    type: str
    mode: Literal["full", "incremental", "cdc"] = "full"
    config: dict[str, Any] = Field(default_factory=dict)
    event_time: EventTimeSpec | None = None
    watermark: WatermarkSpec = Field(default_factory=WatermarkSpec)
    replay: ReplaySpec = Field(default_factory=ReplaySpec)
    description: str | None = None


class StepSpec(_Model):
    type: str
    inputs: list[str] = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    parallelism: int | None = Field(default=None, ge=1, le=MAX_PARALLELISM)
    description: str | None = None

    @field_validator("inputs")
    @classmethod
    def _inputs_are_step_refs(cls, inputs: list[str]) -> list[str]:
        for ref in inputs:
            step, _, port = ref.partition(".")
            if not re.match(STEP_ID, step) or (port and not re.match(STEP_ID, port)):
                raise ValueError(
                    f"invalid input {ref!r}; write a step id, or step.port for a "
                    "side output such as 'hourly.late'"
                )
        return inputs


class TransformSpec(StepSpec):
    pass


class DestinationSpec(StepSpec):
    pass


class ExecutionSpec(_Model):
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM)
    """Default number of parallel instances per transformation."""
    max_batch_rows: int = Field(default=65536, ge=1)
    """Largest batch a source emits."""
    linger: Duration = timedelta(milliseconds=5)
    """Accepted for older files and has no effect, because batches never wait
    for more rows."""
    chaining: bool = True
    """Whether a step runs on its upstream's thread. This happens when both
    have parallelism 1, the step has one input and it is the upstream's only
    consumer. With false, every instance has its own thread."""
    queue_batches: int = Field(default=8, ge=1)
    """Batches that may wait between two steps before the upstream one blocks."""


class DeadLetterSpec(_Model):
    path: str = "dead-letter/{pipeline_id}.jsonl"
    """JSON lines file for rejected records; `{pipeline_id}` is replaced."""


class ErrorsSpec(_Model):
    policy: Literal["dead_letter", "fail"] = "dead_letter"
    """`dead_letter`: write bad records to the dead-letter file and go on.
    `fail`: stop the run at the first bad record."""
    dead_letter: DeadLetterSpec = Field(default_factory=DeadLetterSpec)


class CheckpointingSpec(_Model):
    interval: Duration = timedelta(seconds=10)
    """Time between two periodic checkpoints."""
    storage: str = "checkpoints/{pipeline_id}"
    """Directory or fsspec URL (for example `s3://bucket/path`) for
    checkpoints; `{pipeline_id}` is replaced."""
    keep: int = Field(default=3, ge=1)
    """Number of complete checkpoints kept; older ones are deleted."""
    state_backend: Literal["memory", "disk"] = "memory"
    """Where keyed state (dedupe, aggregate, plugins) lives: `memory`, or
    `disk` (RocksDB files in `state_dir`) for state larger than memory."""
    state_dir: str | None = None
    """Folder for the disk backend's working files; the system temp folder if
    unset."""
    on_stop: Literal["drain", "checkpoint"] = "drain"
    """What SIGINT or SIGTERM does: `drain` ends the inputs and emits every
    open window; `checkpoint` takes a final checkpoint and exits, so the next
    run resumes where this one stopped."""


class PluginsSpec(_Model):
    paths: list[str] = Field(default_factory=list)
    """Directories with Python plugin files or WebAssembly plugin manifests,
    relative to the pipeline file."""


class ScheduleSpec(_Model):
    cron: str | None = None
    interval: Duration | None = None
    timezone: str = "UTC"


class PipelineSpec(_Model):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    name: str | None = None
    version: str = "1.0.0"
    description: str | None = None
    sources: dict[StepId, SourceSpec] = Field(min_length=1)
    transformations: dict[StepId, TransformSpec] = Field(default_factory=dict)
    destinations: dict[StepId, DestinationSpec] = Field(min_length=1)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    errors: ErrorsSpec = Field(default_factory=ErrorsSpec)
    checkpointing: CheckpointingSpec | None = None
    plugins: PluginsSpec | None = None
    # NOTE: `schedule` is validated and kept; `dataflare run` runs once and
    # does not wait for it, because acting on it needs a long-lived scheduler.
    schedule: ScheduleSpec | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    def step_section(self, step: str) -> str | None:
        for section in ("sources", "transformations", "destinations"):
            if step in getattr(self, section):
                return section
        return None
