"""A source plugin: counts down from a number."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import (
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Source,
    SourceBatch,
)


class CountdownConfig(PluginConfig):
    start: int = Field(3, ge=1, description="First number")


class Countdown(Source[CountdownConfig]):
    """Emit one record per number from `start` down to 1."""

    metadata = PluginMetadata(
        "countdown", PluginKind.SOURCE, "Count down to 1", version="0.3.0"
    )
    Config = CountdownConfig

    def schema(self) -> pa.Schema:
        return pa.schema([("n", pa.int64())])

    def read(self) -> Iterator[SourceBatch]:
        numbers = list(range(self.config.start, 0, -1))
        yield SourceBatch(pa.record_batch({"n": numbers}, schema=self.schema()))
