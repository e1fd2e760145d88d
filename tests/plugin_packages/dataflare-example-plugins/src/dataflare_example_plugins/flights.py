"""Per-record plugins over flight records."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import PluginConfig, PluginKind, PluginMetadata
from dataflare.plugin.kinds import RecordFilterPlugin, RecordMapPlugin
from dataflare.plugin.record import PluginRecord


class LongHaulConfig(PluginConfig):
    min_distance: int = Field(1000, ge=0, description="Shortest distance kept, miles")


class LongHaul(RecordFilterPlugin[LongHaulConfig]):
    """Keep flights of at least `min_distance` miles."""

    metadata = PluginMetadata(
        "long-haul",
        PluginKind.FILTER,
        "Keep flights of at least min_distance miles",
        version="0.3.0",
        author="Example Plugins",
    )
    Config = LongHaulConfig
    input_fields = ("distance",)

    def keep(self, record: PluginRecord) -> bool:
        return bool(record["distance"] >= self.config.min_distance)


class RouteTag(RecordMapPlugin[LongHaulConfig]):
    """Add a `route` field such as `JFK-LAX`."""

    metadata = PluginMetadata(
        "route-tag", PluginKind.MAP, "Add the route as origin-dest", version="0.3.0"
    )
    Config = LongHaulConfig
    fields = pa.schema([("route", pa.string())])
    keep_input_fields = True

    def map(self, record: PluginRecord) -> dict[str, Any]:
        return {"route": f"{record['origin']}-{record['dest']}"}
