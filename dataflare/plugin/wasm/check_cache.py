"""Results of plugin checks that passed, kept in DataFlare's cache directory.

Each run of a `wasm` step checks the plugin's `config_schema`, validates the
step's config against it and lists what the module imports and exports.
Loading jsonschema and wasmtime-py for that, and compiling the module to
read its imports, added about 75 ms to the start-up of
`bench/pipelines/w4-wasm.yaml` over 1,000 lines on 2 cores. So a check that
passed is recorded as an entry of the cache (`dataflare.cache`), and a later
run with the same inputs and library versions reads the entry instead. A
check that failed is never recorded, so its error message always comes from
the library. Entries are trusted as the plan cache's are: a user who can
write the cache directory can also change the pipeline's plan.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dataflare.cache import (
    entry_path,
    library_version,
    read_entry,
    read_json_entry,
    write_entry,
)

_FORMAT = 1
"""Version of the entry layout, part of every key."""


def _path(kind: str, library: str, *parts: str | bytes) -> Path | None:
    return entry_path(kind, str(_FORMAT), library_version(library), *parts)


def json_parts(*values: Any) -> list[str] | None:
    """Return each value as JSON with sorted keys, or None if one is not JSON data."""
    try:
        return [json.dumps(v, sort_keys=True, allow_nan=False) for v in values]
    except (TypeError, ValueError):
        return None


def passed(kind: str, library: str, *parts: str | bytes) -> bool:
    """Return True if a check of `kind` by `library` passed on these parts before."""
    path = _path(kind, library, *parts)
    return path is not None and read_entry(path) == b"passed"


def record_pass(kind: str, library: str, *parts: str | bytes) -> None:
    """Record that a check of `kind` by `library` passed on these parts."""
    path = _path(kind, library, *parts)
    if path is not None:
        write_entry(path, b"passed")


def module_digest(wasm: bytes) -> str:
    """Return the SHA-256 of a module, the key of its entries."""
    return hashlib.sha256(wasm).hexdigest()


def load_module_facts(wasm: bytes) -> dict[str, Any] | None:
    """Return the facts stored for a module by `store_module_facts`, if any."""
    return read_json_entry(_path("wasm-module", "wasmtime", module_digest(wasm)))


def store_module_facts(wasm: bytes, facts: dict[str, Any]) -> None:
    """Store what wasmtime found in a module (imports, exports, memory)."""
    path = _path("wasm-module", "wasmtime", module_digest(wasm))
    if path is not None:
        write_entry(path, json.dumps(facts).encode())
