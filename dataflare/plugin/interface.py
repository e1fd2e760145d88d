"""The one plugin interface behind every source, transformation and sink.

A plugin is a class with a `metadata` description, a pydantic `Config` model
(its config schema, validated with the rest of the pipeline file) and the
lifecycle `__init__(config, context)` -> `open()` -> work -> `close()`.

Work happens per Arrow record batch, never per record:

- `Source.read()` yields `SourceBatch` items (a batch plus where it came from).
- `Transform.process()` takes one batch and returns zero or more batches;
  `on_watermark()` lets stateful transformations emit what the event-time
  clock has made final; `finish()` emits what is left at the end of input.
- `Sink.write()` takes one batch; `flush()` makes written data durable.

Records a plugin cannot handle are handed to `OperatorContext.reject()`; the
engine sends them to the dead-letter output (or stops the run under the
fail-fast policy). A plugin never drops a record without saying so.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

API_VERSION = 1

EVENT_TIME = "_event_time"
"""Reserved column with each record's event time (timestamp[us, UTC])."""

KEY = "_key"
PARTITION = "_partition"
OFFSET = "_offset"
HEADERS = "_headers"
RESERVED_COLUMNS = frozenset({EVENT_TIME, KEY, PARTITION, OFFSET, HEADERS})
"""Stream metadata columns. Sinks leave them out unless asked to keep them."""


class PluginKind(StrEnum):
    SOURCE = "source"
    SINK = "sink"
    FILTER = "filter"
    MAP = "map"
    FLAT_MAP = "flat_map"
    AGGREGATE = "aggregate"
    WINDOW = "window"
    PROCESSOR = "processor"


@dataclass(frozen=True)
class PluginMetadata:
    name: str
    kind: PluginKind
    description: str
    version: str = "1.0.0"
    author: str = "DataFlare"
    api_version: int = API_VERSION


class PluginConfig(BaseModel):
    """Base of every plugin's config model: unknown keys are validation errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config value that is invalid for the data, found before the run.

    `where` is the config key at fault (for example `condition` or
    `aggregations.mean.field`), so validation reports the exact path.
    """

    def __init__(self, message: str, *, where: str = "") -> None:
        self.where = where
        super().__init__(message)


class FieldNotFoundError(ValueError):
    """A configuration names a field that the input does not have."""

    def __init__(self, name: str, available: Sequence[str], *, where: str = "") -> None:
        self.name = name
        self.available = list(available)
        self.where = where
        super().__init__(name)

    def __str__(self) -> str:
        import difflib

        close = difflib.get_close_matches(self.name, self.available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        fields = ", ".join(self.available) or "(none)"
        where = f" in {self.where}" if self.where else ""
        return f"field {self.name!r}{where} not found; fields are: {fields}.{hint}"


class OperatorContext(Protocol):
    """Services the engine gives each running plugin instance."""

    @property
    def step(self) -> str:
        """Step id from the pipeline file, for example `delayed`."""

    @property
    def instance(self) -> int:
        """Index of this parallel instance, 0 to `parallelism - 1`."""

    @property
    def parallelism(self) -> int: ...

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def stopping(self) -> bool:
        """True once the run was asked to stop (SIGINT, SIGTERM or an error)."""

    def reject(
        self,
        records: pa.RecordBatch | Sequence[Any],
        reasons: str | Sequence[str],
        positions: Sequence[str | None] | None = None,
    ) -> None:
        """Send records to the dead-letter output with the reason for each."""

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        """Send a batch to a named side output, such as `late`."""

    def count(self, name: str, value: int = 1) -> None:
        """Add to a named counter of this step (shown in the run summary)."""

    @property
    def checkpointing(self) -> bool:
        """True when the run takes checkpoints."""

    @property
    def pipeline_id(self) -> str:
        """Id of the pipeline the step belongs to."""


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(ABC, Generic[ConfigT]):
    """Base of all plugins. Subclasses set `metadata` and `Config`."""

    metadata: ClassVar[PluginMetadata]
    Config: ClassVar[type[PluginConfig]]

    def __init__(self, config: ConfigT, context: OperatorContext) -> None:
        self.config = config
        self.context = context

    def open(self) -> None:
        """Acquire resources (files, connections) before the first batch."""

    def close(self) -> None:
        """Release resources. Called once, also after a failure."""


# --- sources ---------------------------------------------------------------


class Origin(ABC):
    """Input location of a batch's rows, used to name bad records precisely."""

    @abstractmethod
    def position(self, row: int) -> str:
        """Describe the input position of batch row `row`, e.g. `f.csv line 7`."""


@dataclass(frozen=True)
class SequentialOrigin(Origin):
    """Rows numbered consecutively from `first` in one input (file, stream)."""

    name: str
    first: int
    unit: str = "row"

    def position(self, row: int) -> str:
        return f"{self.name} {self.unit} {self.first + row}"


@dataclass(frozen=True)
class NumberedOrigin(Origin):
    """Rows whose input numbers (for example line numbers) are listed."""

    name: str
    numbers: Sequence[int]
    unit: str = "line"

    def position(self, row: int) -> str:
        return f"{self.name} {self.unit} {self.numbers[row]}"


@dataclass(frozen=True)
class SourceBatch:
    batch: pa.RecordBatch
    origin: Origin | None = None


@dataclass(frozen=True)
class Idle:
    """Yielded by an unbounded source that has no data right now.

    `until` is the `time.monotonic()` value at which the source expects its
    next data, if known. The engine then waits until that time (or a
    stop or checkpoint request) before it asks `read()` for more. With None
    the source does its own waiting inside `read()`.
    """

    until: float | None = None


IDLE = Idle()


@dataclass
class Progress:
    """How far a bounded source is, in `unit` (bytes or records)."""

    done: int = 0
    total: int | None = None
    unit: str = "bytes"


class Source(Plugin[ConfigT]):
    """Produces record batches. Bounded sources end; unbounded ones run on."""

    #: True when `read()` never blocks: whenever no record is due it yields
    #: `Idle(until=...)` instead of waiting. The engine can then run the
    #: source, with the steps chained to it, on a shared `TaskPool` thread
    #: (`dataflare.streaming.scheduler`), between other pipelines' work.
    #: Its calls then come from one pool thread or another, never two at once.
    cooperative: ClassVar[bool] = False

    @property
    def bounded(self) -> bool:
        return True

    @abstractmethod
    def schema(self) -> pa.Schema:
        """Return the schema of the batches, known before the run starts.

        Raises:
            ValueError: the input cannot be read; the message gives the cause.
        """

    @abstractmethod
    def read(self) -> Iterator[SourceBatch | Idle]:
        """Yield batches until the input ends or `context.stopping` is set."""

    def progress(self) -> Progress | None:
        return None

    def snapshot_position(self) -> Any:
        """Return where the next `read()` batch starts, as JSON-able data.

        Checkpoints store it right after a batch was emitted. None means the
        source cannot resume from a position (it then replays from the start).
        """
        return None

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Learn that checkpoint `checkpoint_id` is complete and durable.

        The final checkpoint of a run whose inputs ended arrives as
        `dataflare.state.checkpoint.FINAL_CHECKPOINT`: everything the source
        emitted is then durable.

        Called on the source's own thread, between two batches. Sources that
        acknowledge messages to a broker do it here, so that unacknowledged
        messages are delivered again after a crash. Not called when the
        pipeline takes no checkpoints (see `OperatorContext.checkpointing`).
        """

    def restore_position(self, position: Any) -> None:
        """Make the next `read()` start at a position from `snapshot_position`.

        Called after `open()` and before `read()` when a run resumes.
        """


# --- transformations -------------------------------------------------------


class Transform(Plugin[ConfigT]):
    """Turns input batches into output batches; may keep state."""

    #: True when the transformation keeps state between batches; such a
    #: transformation must implement `snapshot_state` and `restore_state`
    #: for checkpoints.
    stateful: ClassVar[bool] = False

    #: Number of inputs the transformation takes (2 for a join, for example).
    #: None means any number of inputs, all with the same schema.
    input_count: ClassVar[int | None] = 1

    @abstractmethod
    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        """Return the output schema for these input schemas.

        Validation calls it before the run, and the engine calls it again on
        each running instance before `open()`, so it may keep what it
        computes.

        Raises:
            FieldNotFoundError: the config names a field the input lacks.
            ValueError: another config problem, described in the message.
        """

    def side_outputs(self, inputs: Sequence[pa.Schema]) -> dict[str, pa.Schema]:
        """Return the named side outputs and their schemas, e.g. `late`."""
        return {}

    def partition_key(self) -> list[str] | None:
        """Return the fields that partition records across parallel instances.

        None means the transformation keeps no per-key state, so records may
        go to any instance.
        """
        return None

    @abstractmethod
    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        """Transform one batch from input `input_index`."""

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        """React to the event-time clock (microseconds since the epoch, UTC)."""
        return []

    def on_input_end(self, input_index: int) -> list[pa.RecordBatch]:
        """React to the end of input `input_index` while other inputs go on."""
        return []

    def finish(self) -> list[pa.RecordBatch]:
        """Emit what remains once every input has ended or the run stops."""
        return []

    def snapshot_state(self) -> bytes | None:
        """Return this instance's state for a checkpoint (None: no state)."""
        if self.stateful:
            raise NotImplementedError(
                f"{type(self).__name__} keeps state but cannot save it in a checkpoint"
            )
        return None

    def restore_state(self, state: bytes) -> None:
        """Load state saved by `snapshot_state`; called after `open()`."""
        if self.stateful:
            raise NotImplementedError(
                f"{type(self).__name__} keeps state but cannot restore it"
            )


# --- sinks -----------------------------------------------------------------


@dataclass
class SinkInfo:
    """Output report of a sink, for the run summary."""

    paths: list[str] = field(default_factory=list)
    delivery: str = "at-least-once"
    table: pa.Table | None = None  # records kept in memory (memory sink)


class SinkConfig(PluginConfig):
    """Base of sink configs."""

    include_metadata: bool = False
    """Keep the reserved stream columns (`_event_time`, `_key`, ...) in the output."""


class Sink(Plugin[ConfigT]):
    """Writes record batches to an external system."""

    #: Schema of the records that will arrive, set by the engine before
    #: `open()`; lets a sink write a valid empty output when no record comes.
    input_schema: pa.Schema | None = None

    #: Whether every record must have the same fields, as in one file. The
    #: validation then rejects inputs whose fields differ.
    same_fields: ClassVar[bool] = False

    @abstractmethod
    def write(self, batch: pa.RecordBatch) -> None:
        """Write one batch. Reserved metadata columns are already removed
        unless the sink's config asks to keep them."""

    #: Set by the engine before `open()` when the run takes checkpoints: the
    #: sink then stages its output and makes it visible in `commit()`.
    transactional: bool = False

    def flush(self) -> None:
        """Make everything written so far durable."""

    def prepare_commit(self, checkpoint_id: int) -> Any:
        """Stage what was written since the last checkpoint.

        Returns JSON-able state that `restore` needs to finish or undo the
        commit after a crash.
        """
        self.flush()
        return None

    def commit(self, checkpoint_id: int) -> None:
        """Make the output staged up to `checkpoint_id` visible to readers."""

    def restore(self, state: Any, checkpoint_id: int) -> None:
        """Resume after a crash: commit what checkpoint `checkpoint_id` staged
        and discard output written after it. Called after `open()`."""

    def info(self) -> SinkInfo:
        return SinkInfo()
