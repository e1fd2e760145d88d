"""Console tables: `ConsoleSink`.

Example::

    destinations:
      peek:
        type: console
        inputs: [clicks]
        config: {rows_per_batch: 10, max_rows: 200, max_column_width: 24}

The sink prints the first `rows_per_batch` rows of each batch to standard
output as a table. The title names the step and the batch number, and the
caption gives the batch's row count. Once `max_rows` rows have been printed
in all, the sink prints one line to note the limit and then only counts
records. At the end it prints the totals. Values wider than
`max_column_width` are cut and end in an ellipsis. Null values show as a
dim `null`.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import orjson
import pyarrow as pa
from pydantic import Field
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dataflare.plugin.interface import (
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)


class ConsoleSinkConfig(SinkConfig):
    rows_per_batch: int = Field(20, ge=1, description="Rows printed of each batch")
    max_rows: int | None = Field(
        1000,
        ge=1,
        description="Rows printed in all; later records are only counted. "
        "Unset: no limit",
    )
    max_column_width: int = Field(
        30, ge=4, description="Characters per column; longer values are cut"
    )
    width: int | None = Field(
        None,
        ge=20,
        description="Table width in characters; the terminal's width if unset "
        "(80 when the output is not a terminal)",
    )


class ConsoleSink(Sink[ConsoleSinkConfig]):
    """Print batches as tables to standard output."""

    metadata = PluginMetadata("console", PluginKind.SINK, "Tables on the console")
    Config = ConsoleSinkConfig

    def open(self) -> None:
        self._console = Console(
            file=sys.stdout, width=self.config.width, highlight=False, soft_wrap=False
        )
        self._batches = 0
        self._records = 0
        self._printed = 0
        self._limit_noted = False

    def write(self, batch: pa.RecordBatch) -> None:
        self._batches += 1
        self._records += batch.num_rows
        shown = min(batch.num_rows, self.config.rows_per_batch, self._room())
        if shown == 0:
            self._note_limit()
            return
        self._console.print(self._table(batch, shown))
        self._printed += shown
        sys.stdout.flush()

    def _room(self) -> int:
        if self.config.max_rows is None:
            return self.config.rows_per_batch
        return max(0, self.config.max_rows - self._printed)

    def _note_limit(self) -> None:
        if self._limit_noted:
            return
        self._limit_noted = True
        self._console.print(
            f"{self.context.step}: printed {self._printed} rows, the max_rows limit; "
            "later records are counted but not printed",
            style="dim",
            markup=False,
        )

    def _table(self, batch: pa.RecordBatch, shown: int) -> Table:
        caption = f"{shown} of {batch.num_rows} rows"
        if shown == batch.num_rows:
            caption = f"{batch.num_rows} rows"
        table = Table(
            title=f"{self.context.step}: batch {self._batches}",
            caption=caption,
            title_justify="left",
            caption_justify="left",
        )
        for field in batch.schema:
            numeric = pa.types.is_integer(field.type) or pa.types.is_floating(
                field.type
            )
            table.add_column(
                Text(field.name),
                justify="right" if numeric else "left",
                max_width=self.config.max_column_width,
                overflow="ellipsis",
                no_wrap=True,
            )
        # Column by column, because a batch may have two fields of one name.
        columns = [column.to_pylist() for column in batch.slice(0, shown).columns]
        for row in zip(*columns, strict=True):
            table.add_row(*(_cell(value) for value in row))
        return table

    def flush(self) -> None:
        self._console.print(
            f"{self.context.step}: {self._records} records in {self._batches} "
            f"batches, {self._printed} printed",
            style="dim",
            markup=False,
        )
        sys.stdout.flush()

    def info(self) -> SinkInfo:
        return SinkInfo(paths=["<stdout>"], delivery="at-least-once")


def _cell(value: Any) -> Text:
    """Format one value as plain text, so rich markup in values is not applied."""
    if value is None:
        return Text("null", style="dim")
    if isinstance(value, dt.datetime):
        return Text(value.isoformat().replace("+00:00", "Z"))
    if isinstance(value, dt.date | dt.time):
        return Text(value.isoformat())
    if isinstance(value, dict | list):
        return Text(orjson.dumps(value, default=str).decode())
    if isinstance(value, bytes):
        return Text(value.hex())
    return Text(str(value))
