"""Base classes for writing transformation plugins of each kind.

Each class below is a `Transform` with the plumbing of one kind of work done
already, so a plugin implements one method:

| class | implement | result |
|---|---|---|
| `FilterPlugin` | `select(batch)` | boolean mask or row numbers to keep |
| `MapPlugin` | `map_batch(batch)` | a batch with the same rows |
| `FlatMapPlugin` | `flat_map(batch)` | batches with any number of rows |
| `AggregatePlugin` | `create_state`, `update`, `result` | one result row per key |
| `ProcessorPlugin` | `process_batch(batch, input_index)` | any batches |
| `RecordFilterPlugin` | `keep(record)` | True to keep the record |
| `RecordMapPlugin` | `map(record)` | a dict, the output record |

The per-record classes read each row through a `PluginRecord` view
(`dataflare.plugin.record`) and are much slower than the batch classes, so
use them when the per-record logic cannot be written with Arrow, Polars or
NumPy over whole columns.

Lifecycle, in the order the engine calls it:

1. `__init__(config, context)`: `config` is the validated pydantic `Config`;
   the base classes then call `configure()`, where a plugin derives settings
   from its config. Validation builds plugins too, so `configure()` must not
   open files or connections.
2. `output_schema(inputs)`: computed before the run, to check the pipeline.
3. `open()`: acquire resources.
4. `process(batch)` for every batch (which calls the method of the kind),
   `on_watermark(t)` as event time advances and `finish()` at the end.
5. `snapshot_state()` / `restore_state(data)` for checkpoints, on plugins
   with `stateful = True`: `AggregatePlugin` implements them, and a
   stateful `ProcessorPlugin` implements its own.
6. `close()`: release resources, also after a failure.

Reserved stream columns (`_event_time`, `_key`, ...) stay attached to the
records: a map's output gets the input's reserved columns back if it
dropped them, and `FlatMapPlugin.with_metadata` attaches them to the rows of
a flat-map's output.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.plugin.interface import (
    RESERVED_COLUMNS,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    Transform,
)
from dataflare.plugin.record import PluginRecord, RecordBatchView

ConfigT = TypeVar("ConfigT", bound=PluginConfig)
StateT = TypeVar("StateT")

BatchOutput: TypeAlias = "pa.RecordBatch | pa.Table | Iterable[pa.RecordBatch] | None"
"""Return type of the batch methods of the kinds; None means no output."""

SNAPSHOT_FORMAT = 1
"""Version of the byte layout written by `AggregatePlugin.snapshot_state`."""


class PluginOutputError(ValueError):
    """A plugin returned output that does not fit its kind or its schema."""


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """Return a batch with `schema` and no rows."""
    return pa.RecordBatch.from_arrays(
        [pa.array([], type=field.type) for field in schema], schema=schema
    )


def to_batches(output: BatchOutput, who: str) -> list[pa.RecordBatch]:
    """Return `output` as a list of non-empty batches.

    Args:
        output: a batch, a table, an iterable of batches, or None.
        who: the plugin and method that produced it, for error messages.

    Raises:
        PluginOutputError: `output` is of another type.
    """
    if output is None:
        return []
    if isinstance(output, pa.RecordBatch):
        return [output] if output.num_rows else []
    if isinstance(output, pa.Table):
        return [b for b in output.to_batches() if b.num_rows]
    batches: list[pa.RecordBatch] = []
    for item in output:
        if isinstance(item, pa.Table):
            batches.extend(b for b in item.to_batches() if b.num_rows)
        elif isinstance(item, pa.RecordBatch):
            if item.num_rows:
                batches.append(item)
        else:
            raise PluginOutputError(
                f"{who} returned an iterable containing a {type(item).__name__}; "
                "return pyarrow RecordBatch or Table objects"
            )
    return batches


def _reserved(schema: pa.Schema) -> list[str]:
    return [name for name in schema.names if name in RESERVED_COLUMNS]


def _described(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema) or "(no fields)"


class _KindPlugin(Transform[ConfigT]):
    """Base of the kinds: the config hook, the kind check and the field checks."""

    kind: ClassVar[PluginKind]
    """The kind this base class implements; `metadata.kind` must equal it."""

    Config: ClassVar[type[PluginConfig]] = PluginConfig

    input_fields: ClassVar[Sequence[str]] = ()
    """Input fields the plugin reads; validation reports any that are missing."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        metadata = cls.__dict__.get("metadata")
        if metadata is not None and metadata.kind != cls.kind:
            raise TypeError(
                f"{cls.__qualname__} derives from a {cls.kind.value} base class, "
                f"but its metadata.kind is {metadata.kind.value!r}; set "
                f"kind=PluginKind.{cls.kind.name} or derive from the base class "
                f"of the {metadata.kind.value} kind"
            )

    def __init__(self, config: ConfigT, context: Any) -> None:
        super().__init__(config, context)
        self._output: pa.Schema | None = None
        self._rejected_rows = 0  # rows a per-record plugin sent to dead letters
        self.configure()

    @property
    def plugin_name(self) -> str:
        """The plugin's name from its metadata, or its class name."""
        metadata = getattr(self, "metadata", None)
        return metadata.name if metadata is not None else type(self).__name__

    def configure(self) -> None:
        """Derive settings from `self.config`. Called once, by `__init__`.

        Validation builds plugins to compute schemas, so this must not open
        files or connections; do that in `open()`.
        """

    def required_fields(self) -> Sequence[str]:
        """Return the input fields the plugin reads (default: `input_fields`).

        Override it when the fields depend on the config.
        """
        return self.input_fields

    def _check_fields(self, schema: pa.Schema) -> None:
        for name in self.required_fields():
            if schema.get_field_index(name) < 0:
                raise FieldNotFoundError(name, schema.names)

    def _check_output(self, batch: pa.RecordBatch, method: str) -> None:
        """Raise if a batch does not have the fields `output_schema` returned."""
        expected = self._output
        if expected is None:
            return  # output_schema was not computed (a plugin used on its own)
        got = [(f.name, f.type) for f in batch.schema]
        if got != [(f.name, f.type) for f in expected]:
            raise PluginOutputError(
                f"plugin {self.plugin_name!r}: {method} returned a batch with "
                f"fields ({_described(batch.schema)}) but its output schema is "
                f"({_described(expected)}); return the same fields and types on "
                "every call, or override output_schema to declare them"
            )

    def _probe_schema(self, schema: pa.Schema, method: str) -> pa.Schema:
        """Compute an output schema by calling `method` on an empty batch."""
        try:
            batches = self._call_on_empty(empty_batch(schema))
        except Exception as exc:
            raise ValueError(
                f"plugin {self.plugin_name!r}: computing the output schema by "
                f"calling {method} on an empty batch failed ({exc}); make "
                f"{method} accept a batch with no rows, or override "
                "output_schema(inputs) to return the schema"
            ) from exc
        if not batches:
            raise ValueError(
                f"plugin {self.plugin_name!r}: {method} returned no batch for an "
                "empty input, so its output schema is unknown; return an empty "
                "batch with the output fields, or override output_schema(inputs)"
            )
        return batches[0].schema

    def _call_on_empty(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        raise NotImplementedError

    def _reject_failures(
        self, batch: pa.RecordBatch, failures: list[tuple[int, str]]
    ) -> None:
        rows = pa.array([row for row, _ in failures], type=pa.int64())
        self.context.reject(batch.take(rows), [reason for _, reason in failures])


def _same_inputs(inputs: Sequence[pa.Schema], who: str) -> pa.Schema:
    for other in inputs[1:]:
        if not other.equals(inputs[0]):
            raise ValueError(
                f"all inputs of {who} must have the same fields and types; "
                f"got ({_described(inputs[0])}) and ({_described(other)})"
            )
    return inputs[0]


# --- filter ----------------------------------------------------------------


class FilterPlugin(_KindPlugin[ConfigT]):
    """Keep the records that `select(batch)` selects; the fields are unchanged.

    Records that are not selected are counted as `filtered` in the run
    summary. Example::

        class Delayed(FilterPlugin[PluginConfig]):
            metadata = PluginMetadata("delayed", PluginKind.FILTER, "Late flights")
            input_fields = ("dep_delay",)

            def select(self, batch):
                return pc.greater(batch.column("dep_delay"), 15)
    """

    kind = PluginKind.FILTER

    @abstractmethod
    def select(self, batch: pa.RecordBatch) -> Any:
        """Return which rows of `batch` to keep.

        Returns:
            A boolean mask with one value per row (pyarrow BooleanArray or
            ChunkedArray, NumPy bool array, Polars Series or list of bools;
            null counts as False), or the row numbers to keep (pyarrow or
            NumPy integer array). Kept rows stay in input order.
        """

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = _same_inputs(inputs, f"filter plugin {self.plugin_name!r}")
        self._check_fields(schema)
        self._output = schema
        return schema

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        mask = self._mask(self.select(batch), batch.num_rows)
        kept = batch.filter(mask)
        # Rejected records went to the dead-letter output, not to `filtered`.
        dropped = batch.num_rows - kept.num_rows - self._rejected_rows
        self._rejected_rows = 0
        self.context.count("filtered", dropped)
        return [kept] if kept.num_rows else []

    def _mask(self, selection: Any, rows: int) -> pa.BooleanArray:
        """Turn what `select` returned into a boolean mask without nulls."""
        who = f"plugin {self.plugin_name!r}: select"
        if hasattr(selection, "to_arrow") and not isinstance(
            selection, pa.Array | pa.ChunkedArray
        ):
            selection = selection.to_arrow()  # a Polars Series
        if isinstance(selection, pa.ChunkedArray):
            selection = selection.combine_chunks()
        if isinstance(selection, np.ndarray):
            if selection.dtype == np.bool_ or np.issubdtype(
                selection.dtype, np.integer
            ):
                selection = pa.array(selection)
        elif isinstance(selection, Sequence) and not isinstance(selection, str | bytes):
            if len(selection) == 0:
                return pa.array(np.zeros(rows, dtype=np.bool_))  # no row numbers
            # A list of bools is a mask; a list of ints lists row numbers.
            selection = pa.array(selection)
        if not isinstance(selection, pa.Array):
            raise PluginOutputError(
                f"{who} returned a {type(selection).__name__}; return a boolean "
                "mask (pyarrow, NumPy, Polars or a list of bools) or an array "
                "of row numbers"
            )
        if pa.types.is_boolean(selection.type):
            if len(selection) != rows:
                raise PluginOutputError(
                    f"{who} returned a mask of {len(selection)} values for a "
                    f"batch of {rows} rows; return one value per row"
                )
            if selection.null_count:
                selection = pc.fill_null(selection, False)
            return selection
        if pa.types.is_integer(selection.type):
            numbers = selection.to_numpy(zero_copy_only=False)
            bad = numbers[(numbers < 0) | (numbers >= rows)]
            if len(bad):
                raise PluginOutputError(
                    f"{who} returned row number {int(bad[0])}, out of range for "
                    f"a batch of {rows} rows; row numbers go from 0 to {rows - 1}"
                )
            keep = np.zeros(rows, dtype=np.bool_)
            keep[numbers] = True
            return pa.array(keep)
        raise PluginOutputError(
            f"{who} returned an array of type {selection.type}; return a "
            "boolean mask or integer row numbers"
        )


class RecordFilterPlugin(FilterPlugin[ConfigT]):
    """Keep the records for which `keep(record)` returns true.

    A record for which `keep` raises an exception goes to the dead-letter
    output with the exception as its reason (or stops the run under the
    fail-fast error policy); the other records go on. Example::

        class LongHaul(RecordFilterPlugin[PluginConfig]):
            metadata = PluginMetadata("long-haul", PluginKind.FILTER, "Long flights")

            def keep(self, record):
                return record["distance"] > 2000
    """

    @abstractmethod
    def keep(self, record: PluginRecord) -> bool:
        """Return True to keep `record`; the record view is valid after the call."""

    def select(self, batch: pa.RecordBatch) -> Any:
        keep = self.keep
        mask: list[bool] = []
        append = mask.append
        failures: list[tuple[int, str]] = []
        for record in RecordBatchView(batch):
            try:
                append(bool(keep(record)))
            except Exception as exc:
                append(False)
                failures.append((record.row, f"keep() raised {exc!r}"))
        if failures:
            self._reject_failures(batch, failures)
            self._rejected_rows = len(failures)
        return pa.array(mask, type=pa.bool_())


# --- map -------------------------------------------------------------------


class MapPlugin(_KindPlugin[ConfigT]):
    """Turn each batch into a batch with the same rows, in the same order.

    The output schema is found by calling `map_batch` on an empty batch of
    the input schema; override `output_schema` if that does not work.
    Reserved columns of the input that the output lacks are added back.
    Example::

        class Speed(MapPlugin[PluginConfig]):
            metadata = PluginMetadata("speed", PluginKind.MAP, "Add mph")
            input_fields = ("distance", "air_time")

            def map_batch(self, batch):
                mph = pc.divide(batch["distance"], pc.divide(batch["air_time"], 60.0))
                return batch.append_column("mph", mph)
    """

    kind = PluginKind.MAP

    @abstractmethod
    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Return the output batch, with exactly `batch.num_rows` rows."""

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = _same_inputs(inputs, f"map plugin {self.plugin_name!r}")
        self._check_fields(schema)
        self._output = self._probe_schema(schema, "map_batch")
        return self._output

    def _call_on_empty(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        return [self._mapped(batch)]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        output = self._mapped(batch)
        self._check_output(output, "map_batch")
        return [output] if output.num_rows else []

    def _mapped(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        output = self.map_batch(batch)
        who = f"plugin {self.plugin_name!r}: map_batch"
        if isinstance(output, pa.Table):
            output = output.combine_chunks()
            batches = output.to_batches()
            output = batches[0] if batches else empty_batch(output.schema)
        if not isinstance(output, pa.RecordBatch):
            raise PluginOutputError(
                f"{who} returned a {type(output).__name__}; return a "
                "pyarrow RecordBatch"
            )
        if output.num_rows != batch.num_rows:
            raise PluginOutputError(
                f"{who} returned {output.num_rows} rows for a batch of "
                f"{batch.num_rows}; a map keeps every row, so derive from "
                "FlatMapPlugin to change the number of rows, or hand bad records "
                "to self.context.reject"
            )
        for name in _reserved(batch.schema):
            if output.schema.get_field_index(name) < 0:
                output = output.append_column(
                    batch.schema.field(name), batch.column(name)
                )
        return output


class RecordMapPlugin(_KindPlugin[ConfigT]):
    """Build each output record from one input record with `map(record)`.

    `map` returns a dict with the fields declared in `fields` (or by
    `output_fields`); a missing field is null. With `keep_input_fields`,
    input fields that the dict does not set are kept too. Reserved columns
    are kept. A record for which `map` raises, or returns a value that does
    not fit, goes to the dead-letter output with the reason (or stops the
    run under the fail-fast error policy). Example::

        class Route(RecordMapPlugin[PluginConfig]):
            metadata = PluginMetadata("route", PluginKind.MAP, "Name the route")
            fields = pa.schema([("route", pa.string())])
            keep_input_fields = True

            def map(self, record):
                return {"route": f"{record['origin']}-{record['dest']}"}
    """

    kind = PluginKind.MAP

    fields: ClassVar[pa.Schema | None] = None
    """Fields of the dicts that `map` returns, unless `output_fields` is overridden."""

    keep_input_fields: ClassVar[bool] = False
    """Also output the input fields that `map` does not set."""

    _declared: pa.Schema

    @abstractmethod
    def map(self, record: PluginRecord) -> Mapping[str, Any]:
        """Return the output record for `record` as a dict of field values."""

    def output_fields(self, input_schema: pa.Schema) -> pa.Schema:
        """Return the fields of the dicts that `map` returns (default: `fields`)."""
        if self.fields is None:
            raise ValueError(
                f"plugin {self.plugin_name!r} declares no output fields; set the "
                "class attribute `fields = pa.schema([...])` or override "
                "output_fields(input_schema)"
            )
        return self.fields

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = _same_inputs(inputs, f"map plugin {self.plugin_name!r}")
        self._check_fields(schema)
        declared = self.output_fields(schema)
        fields = list(declared)
        for field in schema:
            is_value = field.name not in RESERVED_COLUMNS
            if is_value and self.keep_input_fields and field.name not in declared.names:
                fields.append(field)
        fields.extend(schema.field(name) for name in _reserved(schema))
        self._declared = declared
        self._output = pa.schema(fields)
        return self._output

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._output is None:
            self.output_schema([batch.schema])
        declared: pa.Schema = self._declared
        names = frozenset(declared.names)
        map_record = self.map
        rows: list[Mapping[str, Any]] = []
        kept: list[int] = []
        failures: list[tuple[int, str]] = []
        for record in RecordBatchView(batch):
            try:
                row = map_record(record)
            except Exception as exc:
                failures.append((record.row, f"map() raised {exc!r}"))
                continue
            if type(row) is dict and names.issuperset(row):  # the common case
                rows.append(row)
                kept.append(record.row)
            elif not isinstance(row, Mapping):
                failures.append(
                    (record.row, f"map() returned a {type(row).__name__}, not a dict")
                )
            elif not names.issuperset(row):
                unknown = ", ".join(sorted(set(row) - names))
                failures.append(
                    (
                        record.row,
                        f"map() returned fields that are not declared: {unknown} "
                        f"(declared: {', '.join(declared.names)})",
                    )
                )
            else:
                rows.append(row)
                kept.append(record.row)
        columns = self._columns(rows, kept, declared, failures)
        if failures:
            self._reject_failures(batch, failures)
        if not kept:
            return []
        return [self._assemble(batch, declared, columns, kept)]

    def _columns(
        self,
        rows: list[Mapping[str, Any]],
        kept: list[int],
        declared: pa.Schema,
        failures: list[tuple[int, str]],
    ) -> list[pa.Array]:
        """Convert the dicts to one array per declared field.

        Rows whose values do not convert are moved from `kept` to
        `failures`, and the conversion is done again without them.
        """
        while True:
            columns: list[pa.Array] = []
            for field in declared:
                values = [row.get(field.name) for row in rows]
                try:
                    columns.append(pa.array(values, type=field.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                    bad = _bad_values(values, field.type)
                    for index in reversed(bad):
                        failures.append(
                            (
                                kept[index],
                                f"map() returned {values[index]!r} for field "
                                f"{field.name!r}, which does not convert to "
                                f"{field.type}",
                            )
                        )
                        del rows[index]
                        del kept[index]
                    break
            else:
                return columns

    def _assemble(
        self,
        batch: pa.RecordBatch,
        declared: pa.Schema,
        columns: list[pa.Array],
        kept: list[int],
    ) -> pa.RecordBatch:
        assert self._output is not None
        source = batch
        if len(kept) != batch.num_rows:
            source = batch.take(pa.array(kept, type=pa.int64()))
        arrays = list(columns)
        for field in self._output:
            if field.name not in declared.names:
                arrays.append(source.column(field.name))
        return pa.RecordBatch.from_arrays(arrays, schema=self._output)


def _bad_values(values: list[Any], kind: pa.DataType) -> list[int]:
    """Return the positions of the values that do not convert to `kind`."""
    bad = []
    for index, value in enumerate(values):
        try:
            pa.array([value], type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            bad.append(index)
    return bad


# --- flat map --------------------------------------------------------------


class FlatMapPlugin(_KindPlugin[ConfigT]):
    """Turn each batch into any number of output rows.

    `flat_map` returns a batch, a table, an iterable of batches or None. The
    output schema is found by calling `flat_map` on an empty batch, as for
    `MapPlugin`. Reserved columns are not added automatically, because
    output rows need not match input rows: use `with_metadata` to attach
    those of the input rows each output row comes from. Example::

        class Legs(FlatMapPlugin[PluginConfig]):
            metadata = PluginMetadata("legs", PluginKind.FLAT_MAP, "One row per leg")

            def flat_map(self, batch):
                parents = pc.list_parent_indices(batch["legs"])
                legs = pa.record_batch({"leg": pc.list_flatten(batch["legs"])})
                return self.with_metadata(legs, batch, parents)
    """

    kind = PluginKind.FLAT_MAP

    @abstractmethod
    def flat_map(self, batch: pa.RecordBatch) -> BatchOutput:
        """Return the output rows for `batch`."""

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = _same_inputs(inputs, f"flat-map plugin {self.plugin_name!r}")
        self._check_fields(schema)
        self._output = self._probe_schema(schema, "flat_map")
        return self._output

    def _call_on_empty(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        output = self.flat_map(batch)
        if isinstance(output, pa.RecordBatch):
            return [output]
        if isinstance(output, pa.Table):
            return [empty_batch(output.schema)]
        return [b for b in (output or []) if isinstance(b, pa.RecordBatch)]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        who = f"plugin {self.plugin_name!r}: flat_map"
        outputs = to_batches(self.flat_map(batch), who)
        for output in outputs:
            self._check_output(output, "flat_map")
        return outputs

    @staticmethod
    def with_metadata(
        output: pa.RecordBatch, source: pa.RecordBatch, parents: Any
    ) -> pa.RecordBatch:
        """Attach to `output` the reserved columns of its parent input rows.

        Args:
            output: the rows produced, without reserved columns.
            source: the input batch.
            parents: for each output row, the number of the input row it comes
                from (any integer array or list, e.g. `pc.list_parent_indices`).

        Raises:
            ValueError: `parents` does not have one entry per output row.
        """
        if not isinstance(parents, pa.Array | pa.ChunkedArray):
            parents = pa.array(parents, type=pa.int64())
        if len(parents) != output.num_rows:
            raise ValueError(
                f"with_metadata got {len(parents)} parent row numbers for "
                f"{output.num_rows} output rows; give one per output row"
            )
        for name in _reserved(source.schema):
            if output.schema.get_field_index(name) < 0:
                column = source.column(name).take(parents)
                output = output.append_column(source.schema.field(name), column)
        return output


# --- stateful kinds ---------------------------------------------------------


class ProcessorPlugin(_KindPlugin[ConfigT]):
    """General transformation: batches in, any batches out, optional state.

    Implement `process_batch`; override `on_watermark`, `on_input_end` and
    `finish` to emit on event time and at the end. A plugin that keeps state
    between batches sets `stateful = True` and implements `snapshot_state`
    and `restore_state` for checkpoints. Set `input_count` for a
    plugin with several inputs. The output schema is found by calling
    `process_batch` on an empty batch of the first input; override
    `output_schema` when the output depends on more than that.
    """

    kind = PluginKind.PROCESSOR

    @abstractmethod
    def process_batch(self, batch: pa.RecordBatch, input_index: int) -> BatchOutput:
        """Return the output for one batch from input `input_index`."""

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        for schema in inputs:
            self._check_fields(schema)
        self._output = self._probe_schema(inputs[0], "process_batch")
        return self._output

    def _call_on_empty(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        output = self.process_batch(batch, 0)
        if isinstance(output, pa.RecordBatch):
            return [output]
        if isinstance(output, pa.Table):
            return [empty_batch(output.schema)]
        return [b for b in (output or []) if isinstance(b, pa.RecordBatch)]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        who = f"plugin {self.plugin_name!r}: process_batch"
        outputs = to_batches(self.process_batch(batch, input_index), who)
        for output in outputs:
            self._check_output(output, "process_batch")
        return outputs


class AggregatePlugin(_KindPlugin[ConfigT], Generic[ConfigT, StateT]):
    """Keyed aggregation: one state per key, one result row per key.

    For each batch, the rows of each key are passed together to
    `update(state, rows)`. Results are emitted at the end of input (and, with
    `emit = "batch"`, for the keys a batch changed, after each batch). The
    output has the key fields, then the fields declared in `result_fields`.
    With `parallelism`, records are partitioned by key, so each instance
    owns its keys. Example::

        class DelayStats(AggregatePlugin[PluginConfig, dict]):
            metadata = PluginMetadata("delay-stats", PluginKind.AGGREGATE, "...")
            keys = ("carrier",)
            result_fields = pa.schema([("flights", pa.int64()), ("mean", pa.float64())])

            def create_state(self):
                return {"n": 0, "sum": 0.0}

            def update(self, state, rows):
                state["n"] += rows.num_rows
                state["sum"] += pc.sum(rows["dep_delay"]).as_py() or 0.0
                return state

            def result(self, key, state):
                return {"flights": state["n"], "mean": state["sum"] / state["n"]}

    State is saved by `snapshot_state()` as an Arrow IPC stream of the key
    columns and each state encoded as JSON by `encode_state` (override
    `encode_state` / `decode_state` for states JSON cannot hold).
    """

    kind = PluginKind.AGGREGATE
    stateful = True

    keys: ClassVar[Sequence[str]] = ()
    """Key fields, unless `key_fields` is overridden."""

    result_fields: ClassVar[pa.Schema | None] = None
    """Fields of the dicts `result` returns, unless `output_fields` is overridden."""

    emit: ClassVar[Literal["end", "batch"]] = "end"
    """When results are emitted: at the end of input, or also after each batch."""

    def __init__(self, config: ConfigT, context: Any) -> None:
        self.states: dict[tuple[Any, ...], StateT] = {}
        """State of each key, by the tuple of its key values."""
        self._key_schema: pa.Schema | None = None
        super().__init__(config, context)

    def key_fields(self) -> Sequence[str]:
        """Return the key fields (default: the class attribute `keys`)."""
        return self.keys

    def output_fields(self, input_schema: pa.Schema) -> pa.Schema:
        """Return the fields of `result`'s dicts (default: `result_fields`)."""
        if self.result_fields is None:
            raise ValueError(
                f"plugin {self.plugin_name!r} declares no result fields; set the "
                "class attribute `result_fields = pa.schema([...])` or override "
                "output_fields(input_schema)"
            )
        return self.result_fields

    @abstractmethod
    def create_state(self) -> StateT:
        """Return the state of a key seen for the first time."""

    @abstractmethod
    def update(self, state: StateT, rows: pa.RecordBatch) -> StateT:
        """Fold the rows of one key (all from one batch) into its state."""

    @abstractmethod
    def result(self, key: tuple[Any, ...], state: StateT) -> Mapping[str, Any]:
        """Return the result fields for `key` (a tuple of key values)."""

    def encode_state(self, state: StateT) -> Any:
        """Return `state` as a value JSON can hold (default: unchanged)."""
        return state

    def decode_state(self, value: Any) -> StateT:
        """Return the state that `encode_state` turned into `value`."""
        return value  # type: ignore[no-any-return]

    def partition_key(self) -> list[str] | None:
        return list(self.key_fields())

    def required_fields(self) -> Sequence[str]:
        return [*self.key_fields(), *self.input_fields]

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = _same_inputs(inputs, f"aggregate plugin {self.plugin_name!r}")
        keys = list(self.key_fields())
        if not keys:
            raise ValueError(
                f"plugin {self.plugin_name!r} has no key fields; set the class "
                "attribute `keys` or override key_fields()"
            )
        self._check_fields(schema)
        self._key_schema = pa.schema([schema.field(name) for name in keys])
        results = self.output_fields(schema)
        clash = [name for name in results.names if name in keys]
        if clash:
            raise ValueError(
                f"plugin {self.plugin_name!r}: result field {clash[0]!r} is also a "
                "key field; rename the result field"
            )
        self._output = pa.schema([*self._key_schema, *results])
        return self._output

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._output is None:
            self.output_schema([batch.schema])
        if batch.num_rows == 0:
            return []
        changed = []
        for key, rows in self._groups(batch):
            state = self.states.get(key)
            if state is None:
                state = self.create_state()
            self.states[key] = self.update(state, rows)
            changed.append(key)
        if self.emit == "batch":
            return self._results(changed)
        return []

    def finish(self) -> list[pa.RecordBatch]:
        return self._results(list(self.states))

    def _groups(
        self, batch: pa.RecordBatch
    ) -> Iterable[tuple[tuple[Any, ...], pa.RecordBatch]]:
        """Yield each key of `batch` (in first-seen order) with its rows."""
        keys = list(self.key_fields())
        table = pa.table(
            [*(batch.column(k) for k in keys), pa.array(np.arange(batch.num_rows))],
            names=[*keys, "__row"],
        )
        grouped = table.group_by(keys, use_threads=False).aggregate([("__row", "list")])
        key_columns = [grouped.column(k).to_pylist() for k in keys]
        row_lists = grouped.column("__row_list").combine_chunks()
        for i, key in enumerate(zip(*key_columns, strict=True)):
            yield key, batch.take(row_lists[i].values)

    def _results(self, keys: list[tuple[Any, ...]]) -> list[pa.RecordBatch]:
        if not keys:
            return []
        assert self._output is not None and self._key_schema is not None
        names = self._key_schema.names
        rows = []
        for key in keys:
            row = dict(zip(names, key, strict=True))
            row.update(self.result(key, self.states[key]))
            rows.append(row)
        try:
            return [pa.RecordBatch.from_pylist(rows, schema=self._output)]
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise PluginOutputError(
                f"plugin {self.plugin_name!r}: result() returned values that do "
                f"not fit the output fields ({_described(self._output)}): {exc}"
            ) from exc

    def snapshot_state(self) -> bytes:
        """Return every key's state as an Arrow IPC stream.

        Raises:
            PluginOutputError: a state cannot be encoded as JSON.
        """
        key_schema = self._key_schema or pa.schema(
            [pa.field(name, pa.null()) for name in self.key_fields()]
        )
        names = key_schema.names
        states = []
        for key, state in self.states.items():
            try:
                states.append(
                    orjson.dumps(
                        self.encode_state(state), option=orjson.OPT_SERIALIZE_NUMPY
                    )
                )
            except TypeError as exc:
                raise PluginOutputError(
                    f"plugin {self.plugin_name!r}: the state of key {key!r} cannot "
                    f"be encoded as JSON ({exc}); override encode_state and "
                    "decode_state"
                ) from exc
        columns = [
            pa.array([key[i] for key in self.states], type=key_schema.field(i).type)
            for i in range(len(names))
        ]
        schema = pa.schema(
            [*key_schema, pa.field("__state", pa.binary())],
            metadata={
                "dataflare.plugin": self.plugin_name,
                "dataflare.snapshot_format": str(SNAPSHOT_FORMAT),
            },
        )
        table = pa.Table.from_arrays(
            [*columns, pa.array(states, pa.binary())], schema=schema
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue())

    def restore_state(self, data: bytes) -> None:
        """Replace every key's state with the states in `data`.

        Raises:
            ValueError: `data` was written by another plugin or another
                snapshot format, or its key fields differ from this plugin's.
        """
        self.states = {}
        if not data:
            return
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        metadata = {
            k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()
        }
        writer = metadata.get("dataflare.plugin")
        if writer != self.plugin_name:
            raise ValueError(
                f"plugin {self.plugin_name!r} cannot restore a state snapshot "
                f"written by plugin {writer!r}; give it a snapshot of its own"
            )
        version = metadata.get("dataflare.snapshot_format")
        if version != str(SNAPSHOT_FORMAT):
            raise ValueError(
                f"plugin {self.plugin_name!r}: state snapshot format {version} is "
                f"not supported; this version reads format {SNAPSHOT_FORMAT}"
            )
        keys = list(self.key_fields())
        stored = table.schema.names[:-1]
        if stored != keys:
            raise ValueError(
                f"plugin {self.plugin_name!r}: the state snapshot is keyed by "
                f"{stored} but the plugin is keyed by {keys}; restore it with the "
                "same key fields"
            )
        key_columns = [table.column(k).to_pylist() for k in keys]
        encoded = table.column("__state").to_pylist()
        for i, key in enumerate(zip(*key_columns, strict=True)):
            self.states[key] = self.decode_state(orjson.loads(encoded[i]))
        if self._key_schema is None and keys:
            self._key_schema = pa.schema([table.schema.field(k) for k in keys])
