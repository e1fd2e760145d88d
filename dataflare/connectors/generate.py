"""Synthetic records: `GenerateSource`.

Example::

    sources:
      clicks:
        type: generate
        config:
          rate: 500            # records per second; as fast as possible if unset
          count: 10000         # stop after this many; run until stopped if unset
          seed: 7              # the same seed gives the same values
          fields:
            id: sequence
            user: {type: int, min: 1, max: 1000}
            price: {type: float, min: 0.5, max: 99.5, decimals: 2}
            page: {type: choice, values: [home, cart, checkout], weights: [6, 3, 1]}
            mobile: {type: bool, probability: 0.4}
            source: {type: constant, value: web}
            at:
              {type: timestamp, start: "2024-01-01T00:00:00Z", step: 100ms, jitter: 2s}
        event_time: {field: at}

Field types: `sequence` (start, step), `int` (min and max, both included),
`float` (min, max, decimals), `bool` (probability of true), `choice`
(values, optional weights), `constant` (value) and `timestamp`. A
`timestamp` field without `start` or `step` holds the wall-clock time at
which its batch is made. With `start` (default: the time the run starts)
and `step` (default 1s), values advance by `step` per record, and `jitter`
moves each one back by a random duration up to `jitter`, which imitates
events that arrive out of order. Timestamps are `timestamp[us, UTC]`, ready
for `event_time`. Every field also takes `nulls`, the share of null values.

With `rate` the source makes small batches (about 10 ms of records each) so
records flow on at once; without it, batches of 65,536 records.

Checkpoints save the number of records made, the state of every random
generator and the run's start time, so a run resumed from a checkpoint makes
the same records as a run that never stopped. Wall-clock timestamps (a
`timestamp` field without `start` and `step`) are the exception: they hold
the time their batch is made.
"""

from __future__ import annotations

import datetime as dt
import time
import zlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field, field_validator, model_validator

from dataflare.plugin.interface import (
    Idle,
    OperatorContext,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Progress,
    SequentialOrigin,
    Source,
    SourceBatch,
)
from dataflare.streaming.spec import Duration

UNLIMITED_BATCH_ROWS = 65536
_BATCH_SECONDS = 0.01
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- field generators -----------------------------------------------------------


class FieldSpec(PluginConfig):
    """Base of field generator specs."""

    nulls: float = Field(0.0, ge=0.0, le=1.0, description="Share of null values")

    @abstractmethod
    def arrow_type(self) -> pa.DataType:
        """Return the type of the generated values."""

    @abstractmethod
    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        """Return the values of records `first` to `first + count - 1`.

        Args:
            rng: Random generator of this field.
            first: Index of the first record, 0 for the run's first record.
            count: Number of values.
            now_us: Wall-clock time, in microseconds since the epoch.
        """


class SequenceSpec(FieldSpec):
    type: Literal["sequence"]
    start: int = Field(1, description="First value")
    step: int = Field(1, description="Added per record")

    def arrow_type(self) -> pa.DataType:
        return pa.int64()

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        index = np.arange(first, first + count, dtype=np.int64)
        return pa.array(self.start + self.step * index, pa.int64())


class IntSpec(FieldSpec):
    type: Literal["int"]
    min: int = Field(0, description="Smallest value")
    max: int = Field(100, description="Largest value (included)")

    @model_validator(mode="after")
    def _ordered(self) -> IntSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def arrow_type(self) -> pa.DataType:
        return pa.int64()

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        values = rng.integers(self.min, self.max, size=count, endpoint=True)
        return pa.array(values, pa.int64())


class FloatSpec(FieldSpec):
    type: Literal["float"]
    min: float = Field(0.0, description="Smallest value")
    max: float = Field(
        1.0, description="Largest value (excluded, unless `decimals` rounds up to it)"
    )
    decimals: int | None = Field(
        None, ge=0, le=15, description="Round to this many decimal places"
    )

    @model_validator(mode="after")
    def _ordered(self) -> FloatSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def arrow_type(self) -> pa.DataType:
        return pa.float64()

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        values = rng.uniform(self.min, self.max, size=count)
        if self.decimals is not None:
            values = np.round(values, self.decimals)
        return pa.array(values, pa.float64())


class BoolSpec(FieldSpec):
    type: Literal["bool"]
    probability: float = Field(0.5, ge=0.0, le=1.0, description="Share of true")

    def arrow_type(self) -> pa.DataType:
        return pa.bool_()

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        return pa.array(rng.random(count) < self.probability, pa.bool_())


class ChoiceSpec(FieldSpec):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1, description="Values to pick from")
    weights: list[float] | None = Field(
        None, description="Relative weight of each value; equal if unset"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChoiceSpec:
        try:
            pa.array(self.values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"values {self.values!r} must all have one type: {exc}"
            ) from None
        if self.weights is None:
            return self
        if len(self.weights) != len(self.values):
            raise ValueError(
                f"weights has {len(self.weights)} entries but values has "
                f"{len(self.values)}; give one weight per value"
            )
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(
                f"weights {self.weights} must be 0 or more, with a positive sum"
            )
        return self

    def arrow_type(self) -> pa.DataType:
        return _as_filled(pa.array(self.values)).type

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        probabilities = None
        if self.weights is not None:
            weights = np.asarray(self.weights, dtype=np.float64)
            probabilities = weights / weights.sum()
        picks = rng.choice(len(self.values), size=count, p=probabilities)
        return _as_filled(pa.array(self.values)).take(pa.array(picks))


class ConstantSpec(FieldSpec):
    type: Literal["constant"]
    value: Any = Field(description="The value of every record")

    def arrow_type(self) -> pa.DataType:
        return _as_filled(pa.array([self.value])).type

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        one = _as_filled(pa.array([self.value]))
        return one.take(pa.array(np.zeros(count, dtype=np.int64)))


class TimestampSpec(FieldSpec):
    type: Literal["timestamp"]
    start: dt.datetime | None = Field(
        None, description="First value; times without a zone are UTC"
    )
    step: Duration | None = Field(None, description="Added per record")
    jitter: Duration = Field(
        dt.timedelta(0), description="Largest random shift back in time per value"
    )

    @property
    def is_wall_clock(self) -> bool:
        return self.start is None and self.step is None

    def arrow_type(self) -> pa.DataType:
        return _TIMESTAMP

    def generate(
        self, rng: np.random.Generator, first: int, count: int, now_us: int
    ) -> pa.Array:
        if self.is_wall_clock:
            values = np.full(count, now_us, dtype=np.int64)
        else:
            start = self.start_us(now_us)
            step = _micros(self.step or dt.timedelta(seconds=1))
            values = start + step * np.arange(first, first + count, dtype=np.int64)
        jitter = _micros(self.jitter)
        if jitter:
            values = values - rng.integers(0, jitter, size=count, endpoint=True)
        return pa.array(values, pa.int64()).cast(_TIMESTAMP)

    def start_us(self, now_us: int) -> int:
        if self.start is None:
            return now_us
        start = self.start
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.UTC)
        return _micros(start - _EPOCH)


def _micros(delta: dt.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _as_filled(array: pa.Array) -> pa.Array:
    """Give an all-null array the string type, so sinks can write it."""
    return array.cast(pa.string()) if pa.types.is_null(array.type) else array


AnyFieldSpec = Annotated[
    SequenceSpec
    | IntSpec
    | FloatSpec
    | BoolSpec
    | ChoiceSpec
    | ConstantSpec
    | TimestampSpec,
    Field(discriminator="type"),
]


def _default_fields() -> dict[str, AnyFieldSpec]:
    return {
        "id": SequenceSpec.model_validate({"type": "sequence"}),
        "timestamp": TimestampSpec.model_validate({"type": "timestamp"}),
    }


# --- the source -----------------------------------------------------------------


def _allow_short_field_specs(schema: dict[str, Any]) -> None:
    """Let the JSON Schema accept `name: sequence` as well as `name: {type: ...}`."""
    fields = schema.get("properties", {}).get("fields", {})
    spec = fields.get("additionalProperties")
    if spec is not None:
        names = ["sequence", "int", "float", "bool", "choice", "constant", "timestamp"]
        fields["additionalProperties"] = {"anyOf": [spec, {"enum": names}]}


class GenerateSourceConfig(PluginConfig):
    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra=_allow_short_field_specs
    )

    fields: dict[str, AnyFieldSpec] = Field(
        default_factory=_default_fields,
        min_length=1,
        description="Field name to generator, e.g. {id: sequence, n: {type: int}}",
    )
    count: int | None = Field(
        None, ge=0, description="Records to make; unbounded until stopped if unset"
    )
    rate: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Records per second; as fast as possible if unset",
    )
    seed: int | None = Field(
        None, description="Seed of the random values; different each run if unset"
    )
    batch_rows: int | None = Field(
        None,
        ge=1,
        description="Records per batch; default about 10 ms of records at `rate`, "
        f"or {UNLIMITED_BATCH_ROWS} without `rate`",
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _expand_names(cls, value: Any) -> Any:
        return _expand(value) if isinstance(value, dict) else value

    def rows_per_batch(self) -> int:
        if self.batch_rows is not None:
            return self.batch_rows
        if self.rate is None:
            return UNLIMITED_BATCH_ROWS
        return max(1, min(UNLIMITED_BATCH_ROWS, round(self.rate * _BATCH_SECONDS)))


def _expand(fields: dict[str, Any]) -> dict[str, Any]:
    """Turn the short form `name: sequence` into `name: {type: sequence}`."""
    return {
        name: {"type": spec} if isinstance(spec, str) else spec
        for name, spec in fields.items()
    }


class GenerateSource(Source[GenerateSourceConfig]):
    """Make synthetic records at a given rate, for a count or until stopped."""

    metadata = PluginMetadata(
        "generate", PluginKind.SOURCE, "Synthetic records at a given rate"
    )
    Config = GenerateSourceConfig
    cooperative = True

    def __init__(self, config: GenerateSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        # progress() may be called from another thread before open().
        self._produced = 0

    @property
    def bounded(self) -> bool:
        return self.config.count is not None

    def schema(self) -> pa.Schema:
        return pa.schema(
            [(name, spec.arrow_type()) for name, spec in self.config.fields.items()]
        )

    def open(self) -> None:
        self._schema = self.schema()
        self._value_rngs = {name: self._rng(name, 0) for name in self.config.fields}
        self._null_rngs = {name: self._rng(name, 1) for name in self.config.fields}
        self._start_us = _now_us()

    def _rng(self, name: str, stream: int) -> np.random.Generator:
        """Return a generator per field, so a field's values ignore the others."""
        if self.config.seed is None:
            return np.random.default_rng()
        return np.random.default_rng(
            [self.config.seed, zlib.crc32(name.encode()), stream]
        )

    def progress(self) -> Progress | None:
        if self.config.count is None:
            return None
        return Progress(done=self._produced, total=self.config.count, unit="records")

    # --- checkpoints ---

    def snapshot_position(self) -> Any:
        """Return the records made so far and the state of each random generator."""
        return {
            "produced": self._produced,
            "start_us": self._start_us,
            "values": {n: _rng_state(r) for n, r in self._value_rngs.items()},
            "nulls": {n: _rng_state(r) for n, r in self._null_rngs.items()},
        }

    def restore_position(self, position: Any) -> None:
        if not position:
            return
        missing = set(self.config.fields) - set(position["values"])
        if missing:
            raise ValueError(
                f"cannot resume the generate source: the checkpoint has no random "
                f"state for fields {sorted(missing)}; run with --from-scratch"
            )
        self._produced = int(position["produced"])
        self._start_us = int(position["start_us"])
        for name in self.config.fields:
            _set_rng_state(self._value_rngs[name], position["values"][name])
            _set_rng_state(self._null_rngs[name], position["nulls"][name])

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        started = time.monotonic()
        # A resumed run paces its records from where it resumed.
        resumed_at = self._produced
        size = self.config.rows_per_batch()
        while not self.context.stopping:
            count = size
            if self.config.count is not None:
                count = min(size, self.config.count - self._produced)
                if count <= 0:
                    return
            if self.config.rate is not None:
                due = started + (self._produced - resumed_at) / self.config.rate
                yield from self._wait_until(due)
                if self.context.stopping:
                    return
            first = self._produced
            batch = self._make_batch(first, count)
            self._produced += count
            yield SourceBatch(batch, SequentialOrigin("generate", first + 1, "record"))

    def _wait_until(self, due: float) -> Iterator[Idle]:
        """Yield `Idle(until=due)` until `due`, a time.monotonic() value.

        The source never sleeps: the engine waits between two of these, and
        meanwhile takes part in checkpoints and handles a stop request. So the
        source can share a pool thread with other pipelines (`cooperative`).
        """
        while not self.context.stopping and time.monotonic() < due:
            yield Idle(until=due)

    def _make_batch(self, first: int, count: int) -> pa.RecordBatch:
        now_us = _now_us()
        arrays = []
        for name, spec in self.config.fields.items():
            if isinstance(spec, TimestampSpec) and spec.start is None:
                # Times of `step` fields start when the run starts.
                clock = self._start_us if spec.step is not None else now_us
            else:
                clock = now_us
            values = spec.generate(self._value_rngs[name], first, count, clock)
            if spec.nulls:
                null = self._null_rngs[name].random(count) < spec.nulls
                values = pc.if_else(
                    pa.array(null), pa.scalar(None, values.type), values
                )
            arrays.append(values)
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema)


def _rng_state(rng: np.random.Generator) -> Any:
    """Return a generator's state as JSON, with integers as text.

    PCG64's state has 128-bit integers, which JSON encoders limited to 64
    bits reject.
    """
    return _ints_as_text(rng.bit_generator.state)


def _set_rng_state(rng: np.random.Generator, state: Any) -> None:
    rng.bit_generator.state = _ints_from_text(state)


def _ints_as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _ints_as_text(item) for key, item in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return f"int:{value}"
    return value


def _ints_from_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _ints_from_text(item) for key, item in value.items()}
    if isinstance(value, str) and value.startswith("int:"):
        return int(value[4:])
    return value


def _now_us() -> int:
    return time.time_ns() // 1000
