"""Settings of the Redis connectors, importable without redis-py.

The `enrichment` transformation reads `RedisTable` when it validates its
config, so this module imports nothing but pydantic. redis-py is imported
only by the modules that talk to Redis.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from dataflare.connectors.common import SecretRef
from dataflare.connectors.files.base import parse_type
from dataflare.plugin.interface import PluginConfig
from dataflare.streaming.spec import Duration


class RedisConnectionConfig(PluginConfig):
    """Server address and login settings of Redis."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// URL with host, port and database; "
        "no password in it",
    )
    username: str | None = Field(None, description="ACL user name")
    password: SecretRef | None = Field(
        None, description="Password, by reference: {env: VAR} or {file: PATH}"
    )
    timeout: Duration = Field(
        timedelta(seconds=10), description="Connect and read timeout of a command"
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep trying while Redis is unreachable before "
        "the run fails",
    )

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, not "
                f"{parts.scheme + '://' if parts.scheme else 'nothing'}"
            )
        if parts.password is not None:
            raise ValueError(
                "url contains a password; remove it and set password: {env: "
                "VARIABLE} or password: {file: PATH}"
            )
        return value

    def address(self) -> str:
        """Return the URL for messages (it never contains a password)."""
        return self.url


class RedisLookupConfig(RedisConnectionConfig):
    """Location of a lookup table's rows in Redis, and their field types."""

    key_prefix: str | None = Field(
        None, description="Prefix of the keys that contain the rows, e.g. 'airline:'"
    )
    hash: str | None = Field(
        None, description="Key of one hash whose fields are the rows' keys"
    )
    value: Literal["json", "hash"] = Field(
        "json",
        description="With key_prefix: each key contains a JSON object string, or "
        "is a hash of the row's fields",
    )
    separator: str = Field(":", description="Joins the values of several `on` fields")
    schema_: dict[str, str] = Field(
        alias="schema",
        min_length=1,
        description="Field types of the table's rows, e.g. {name: string}",
    )
    cache_size: int = Field(
        100_000, ge=0, description="Keys whose rows are kept; 0 turns caching off"
    )
    cache_ttl: Duration = Field(
        timedelta(seconds=60), description="How long a cached row (or miss) is used"
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        for type_name in value.values():
            parse_type(type_name)
        return value

    @model_validator(mode="after")
    def _one_layout(self) -> RedisLookupConfig:
        if (self.key_prefix is None) == (self.hash is None):
            raise ValueError(
                "set exactly one of key_prefix (a key per row) and hash (one "
                "hash for the table)"
            )
        if self.hash is not None and self.value == "hash":
            raise ValueError(
                "value: hash needs key_prefix; with `hash`, every row is a JSON "
                "object string in a field of that hash"
            )
        return self

    def table_schema(self) -> pa.Schema:
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


class RedisTable(PluginConfig):
    """The `table: {redis: {...}}` option of `enrichment`."""

    redis: RedisLookupConfig
