"""On-disk cache of expressions that Polars parsed, checked and translated.

Polars parses every SQL expression and query (see `expressions`), and
loading it takes about 0.15 s, a third of the start-up of a small run. So a
`filter` or `sql` step stores what Polars found about its expression on a
given input schema. The entry records that the expression is valid. If Arrow
compute can evaluate it, the entry also holds the expression tree that
Polars serialized and the output schema. A later run with the same
expression, schema and library versions reads the entry and starts without
loading Polars. Polars is still loaded when a batch needs it (a NaN in a
compared float, say).

Entries are JSON files under `$DATAFLARE_CACHE_DIR`, or else
`$XDG_CACHE_HOME/dataflare/plans` or `~/.cache/dataflare/plans`. Setting
`DATAFLARE_CACHE_DIR` to an empty value turns the cache off. An entry that
cannot be read or written is ignored: the step then asks Polars again.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pyarrow as pa

import dataflare
from dataflare.cache import entry_path, read_json_entry, write_entry

_FORMAT = 1
"""Version of the entry layout, part of every key."""


@cache
def _versions() -> list[str]:
    """Return the versions that entries depend on, without importing Polars.

    They are read from the names of the installed distributions' metadata
    folders, because `importlib.metadata` takes about 50 ms to load.
    """
    versions = [dataflare.__version__, pa.__version__]
    spec = find_spec("polars")
    if spec is not None and spec.origin is not None:
        site = Path(spec.origin).parent.parent
        versions += sorted(p.name for p in site.glob("polars*.dist-info"))
    return versions


def _path(kind: str, text: str, schema: pa.Schema) -> Path | None:
    return entry_path(
        kind, str(_FORMAT), text, *_versions(), schema.serialize().to_pybytes()
    )


def load(kind: str, text: str, schema: pa.Schema) -> dict[str, Any] | None:
    """Return the entry of a `kind` step with `text` over `schema`, if any."""
    entry = read_json_entry(_path(kind, text, schema))
    if entry is None or entry.get("text") != text:
        return None
    return entry


def store(kind: str, text: str, schema: pa.Schema, entry: dict[str, Any]) -> None:
    """Save `entry` for a `kind` step with `text` over `schema`."""
    path = _path(kind, text, schema)
    if path is None:
        return
    write_entry(path, json.dumps({**entry, "text": text}).encode())


def schema_text(schema: pa.Schema) -> str:
    """Return `schema` as text for an entry."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> pa.Schema:
    """Return the schema that `schema_text` gave as `text`."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
