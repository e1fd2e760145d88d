"""Plugin manifests (`dataflare-plugin.yaml`) and checks of the module itself.

A manifest describes a WebAssembly plugin: its name, version and kind, where
its module is, which function to call, which fields it reads and writes, and
what it requests: file system paths, HTTP hosts, memory and time. Example::

    name: delay_classifier
    version: 1.0.0
    kind: map
    module: delay_classifier.wasm
    exports: {process: classify}
    batch_encoding: 1
    fields: [dep_delay]
    outputs: [{name: delay_class, type: utf8}]
    permissions: {memory_max_pages: 1024, timeout_ms: 1000}
    config_schema: {type: object, properties: {}, additionalProperties: false}

`inspect_module` reads what a module really imports and exports (with the
`wasmtime` parser) and `check_module` compares that with the manifest: a
module that imports a capability it did not request, misses a declared
export or needs more memory than allowed is rejected with the import, the
export or the numbers named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dataflare.plugin.interface import RESERVED_COLUMNS
from dataflare.plugin.wasm import check_cache
from dataflare.plugin.wasm.encoding import VERSION, WIRE_TYPE_NAMES

if TYPE_CHECKING:
    import wasmtime

# jsonschema and wasmtime load when a check is not in the cache (`check_cache`).

MANIFEST_NAMES = (
    "dataflare-plugin.yaml",
    "dataflare-plugin.yml",
    "dataflare-plugin.json",
)

WASM_PAGE = 65536
MAX_PAGES = 65536  # 4 GiB, the maximum size of a 32-bit WebAssembly memory
DEFAULT_MEMORY_MAX_PAGES = 1024
"""Default memory cap: 1024 pages of 64 KiB = 64 MiB.

Sized with `tests/test_wasm_runtime.py::test_default_memory_limit_*`. A C
module built for wasm32-wasi by `zig cc` with its default 16 MiB stack
starts with 257 pages, so a 256-page cap fails every call. The example
plugins built with the SDK flags (1 MiB stack) start with 17 pages or fewer
and need at most 132 pages for a 65,536-row batch.
"""
DEFAULT_TIMEOUT_MS = 5000
ROW_COLUMN = "_row"
"""Column of a flat-map's output giving, for each row, the input row it came from."""

KERNEL_MODULE = "extism:host/env"
WASI_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})
HTTP_FUNCTIONS = frozenset({"http_request", "http_status_code", "http_headers"})
WASI_FILESYSTEM = frozenset(
    {"fd_prestat_get", "fd_prestat_dir_name", "fd_readdir", "fd_renumber"}
)


class ManifestError(ValueError):
    """A manifest or module that cannot be used; the message explains why."""

    def __init__(self, message: str, *, where: str = "") -> None:
        self.where = where
        super().__init__(message)


class OutputField(BaseModel):
    """A column a map or flat-map plugin writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: Literal["int64", "float64", "bool", "utf8", "timestamp"]
    description: str = ""


class Exports(BaseModel):
    """The module functions the host calls, each `() -> i32` (0 = success)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    process: str = Field(min_length=1, description="Called once per batch")
    open: str | None = Field(
        default=None,
        description="Called once after each instance is created, with the "
        "plugin's config available; a non-zero status rejects the config",
    )

    def names(self) -> list[str]:
        return [n for n in (self.process, self.open) if n]


class Permissions(BaseModel):
    """Permissions the plugin requests. The operator grants paths and hosts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_paths: list[str] = Field(
        default_factory=list,
        description="Directories the plugin requests, as paths inside the "
        "sandbox (e.g. /data); mounted only where the step's grants map a "
        "host directory to them",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the plugin requests to reach over HTTP (a "
        "leading *. matches subdomains); reachable only when granted",
    )
    memory_max_pages: int = Field(
        default=DEFAULT_MEMORY_MAX_PAGES,
        ge=1,
        le=MAX_PAGES,
        description="Maximum number of 64 KiB pages the plugin's memory may use",
    )
    timeout_ms: int = Field(
        default=DEFAULT_TIMEOUT_MS,
        ge=1,
        le=3_600_000,
        description="Maximum duration of one call (one batch), in milliseconds",
    )

    @model_validator(mode="after")
    def _check(self) -> Permissions:
        for path in self.allowed_paths:
            if not path.startswith("/"):
                raise ValueError(
                    f"allowed_paths entry {path!r} must be an absolute path inside "
                    "the sandbox, such as /data"
                )
        return self


class BuildSpec(BaseModel):
    """Build settings that `dataflare plugin build` uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: Literal["c", "zig", "assemblyscript"]
    sources: list[str] = Field(min_length=1)
    flags: list[str] = Field(default_factory=list)


class TestSpec(BaseModel):
    """Sample input (CSV, JSONL or Parquet) and config to try the plugin on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    config: dict[str, Any] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict)


class PluginManifest(BaseModel):
    """The contents of `dataflare-plugin.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(min_length=1)
    kind: Literal["filter", "map", "flat_map"]
    module: str = Field(min_length=1, description="Path to the .wasm file")
    exports: Exports
    batch_encoding: int = Field(description="Batch encoding version; 1")
    fields: list[str] = Field(
        default_factory=list,
        description="Fields the plugin reads; empty means every field of a "
        "supported type",
    )
    outputs: list[OutputField] = Field(default_factory=list)
    keep_input: bool = Field(
        default=True,
        description="Keep the input fields in the output (maps, and flat-maps "
        "that write the _row column)",
    )
    partition_by: list[str] = Field(
        default_factory=list,
        description="Fields the plugin keeps state per; parallel instances "
        "then get all records of a key",
    )
    permissions: Permissions = Field(default_factory=lambda: Permissions())
    config_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        description="JSON Schema of the plugin's own config",
    )
    description: str = ""
    author: str = ""
    license: str = ""
    build: BuildSpec | None = None
    test: TestSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> PluginManifest:
        if self.batch_encoding != VERSION:
            raise ValueError(
                f"batch_encoding {self.batch_encoding} is not supported; this "
                f"host reads version {VERSION}: rebuild the plugin with the "
                "current SDK and set batch_encoding: 1"
            )
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("fields lists a field twice")
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError("outputs lists a column twice")
        if self.kind == "filter" and self.outputs:
            raise ValueError(
                "a filter returns a selection vector, not columns: remove "
                "`outputs` or use kind: map"
            )
        if self.kind != "filter" and not self.outputs:
            raise ValueError(
                f"a {self.kind} plugin must list the columns it writes in "
                "`outputs`, each with a name and a type "
                "(int64, float64, bool, utf8, timestamp)"
            )
        for name in names:
            if name == ROW_COLUMN:
                raise ValueError(
                    f"{ROW_COLUMN!r} is the flat-map's parent-row column; it is "
                    "not declared in outputs"
                )
            if name in RESERVED_COLUMNS:
                raise ValueError(
                    f"output {name!r} is a reserved stream column; pick another name"
                )
        for key in self.partition_by:
            if self.fields and key not in self.fields:
                raise ValueError(f"partition_by names {key!r}, which is not in fields")
        _check_config_schema(self.config_schema)
        return self


def _check_config_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError if `schema` is not a valid JSON Schema."""
    key = check_cache.json_parts(schema)
    if key is not None and check_cache.passed("json-schema", "jsonschema", *key):
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(
            f"config_schema is not a valid JSON Schema: {exc.message}"
        ) from None
    if key is not None:
        check_cache.record_pass("json-schema", "jsonschema", *key)


@dataclass(frozen=True)
class LoadedManifest:
    """A manifest with the location it was read from."""

    manifest: PluginManifest
    path: Path
    """The manifest file."""

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.manifest.name

    def resolve(self, relative: str) -> Path:
        """Resolve a path written in the manifest against its directory."""
        return (self.directory / relative).resolve()

    @property
    def module_path(self) -> Path:
        return self.resolve(self.manifest.module)


def find_manifest(path: str | Path) -> Path:
    """Return the manifest file for a plugin directory or manifest path.

    Raises:
        ManifestError: nothing is there, or the directory has no manifest.
    """
    path = Path(path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise ManifestError(
            f"{path} has no plugin manifest; create {MANIFEST_NAMES[0]} there "
            "(`dataflare plugin new` writes one)"
        )
    if path.is_file():
        return path
    raise ManifestError(f"plugin {str(path)!r} not found: no such file or directory")


def load_manifest(path: str | Path) -> LoadedManifest:
    """Read and check a manifest (YAML or JSON).

    Raises:
        ManifestError: the file is missing, unreadable or invalid; the message
            lists each problem with its key.
    """
    file = find_manifest(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ManifestError(f"cannot read plugin manifest {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(
            f"plugin manifest {file} must be a mapping of keys such as name, "
            f"kind and module; got {type(data).__name__}"
        )
    try:
        manifest = PluginManifest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"  {where}: {message}")
        raise ManifestError(
            f"plugin manifest {file} is invalid:\n" + "\n".join(problems)
        ) from None
    return LoadedManifest(manifest, file.resolve())


# --- the module -------------------------------------------------------------


@dataclass(frozen=True)
class ImportInfo:
    module: str
    name: str
    kind: str  # "func", "memory", "global" or "table"

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class ModuleInfo:
    """Imports, exported functions and memory size of a WebAssembly module."""

    imports: list[ImportInfo]
    functions: dict[str, tuple[list[str], list[str]]]
    """Exported functions: name -> (parameter types, result types)."""
    memory_min_pages: int
    size: int

    @property
    def uses_wasi(self) -> bool:
        return any(i.module in WASI_MODULES for i in self.imports)


def inspect_module(wasm: bytes, *, origin: str = "the module") -> ModuleInfo:
    """Parse a module and list its imports, exported functions and memory.

    The result for the same bytes is read from the cache when an earlier
    call stored it (`check_cache`).

    Raises:
        ManifestError: the bytes are not a valid WebAssembly module.
    """
    if wasm[:4] != b"\0asm":
        raise ManifestError(
            f"{origin} is not a WebAssembly module: it does not start with the "
            f"bytes \\0asm (it starts with {wasm[:8]!r}); build it again"
        )
    stored = _info_from_facts(check_cache.load_module_facts(wasm), len(wasm))
    if stored is not None:
        return stored
    info = _inspect_with_wasmtime(wasm, origin)
    check_cache.store_module_facts(wasm, asdict(info))
    return info


def _info_from_facts(facts: dict[str, Any] | None, size: int) -> ModuleInfo | None:
    """Rebuild a `ModuleInfo` from stored fields, or return None if they do not fit."""
    if facts is None or facts.get("size") != size:
        return None
    try:
        imports = [
            ImportInfo(str(i["module"]), str(i["name"]), str(i["kind"]))
            for i in facts["imports"]
        ]
        functions = {
            str(name): ([str(p) for p in params], [str(r) for r in results])
            for name, (params, results) in facts["functions"].items()
        }
        memory_min = int(facts["memory_min_pages"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return ModuleInfo(imports, functions, memory_min, size)


def _inspect_with_wasmtime(wasm: bytes, origin: str) -> ModuleInfo:
    import wasmtime

    # Closed here, because an engine left to the collector at exit failed to
    # delete itself once wasmtime's modules were cleared.
    with wasmtime.Engine() as engine:
        try:
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            detail = " ".join(str(exc).split())
            raise ManifestError(
                f"{origin} is not a valid WebAssembly module ({detail}); it may "
                "be truncated or corrupt: build it again"
            ) from None
        with module:
            return _module_info(module, len(wasm))


def _module_info(module: wasmtime.Module, size: int) -> ModuleInfo:
    import wasmtime

    imports = []
    memory_min = 0
    for item in module.imports:
        kind = _kind(item.type)
        imports.append(ImportInfo(item.module, item.name or "", kind))
        if isinstance(item.type, wasmtime.MemoryType):
            memory_min = max(memory_min, item.type.limits.min)
    functions = {}
    for export in module.exports:
        if isinstance(export.type, wasmtime.FuncType):
            functions[export.name] = (
                [str(p) for p in export.type.params],
                [str(r) for r in export.type.results],
            )
        elif isinstance(export.type, wasmtime.MemoryType):
            memory_min = max(memory_min, export.type.limits.min)
    return ModuleInfo(imports, functions, memory_min, size)


def _kind(type_: object) -> str:
    import wasmtime

    if isinstance(type_, wasmtime.FuncType):
        return "func"
    if isinstance(type_, wasmtime.MemoryType):
        return "memory"
    if isinstance(type_, wasmtime.GlobalType):
        return "global"
    return "table"


def capability_problem(item: ImportInfo, permissions: Permissions) -> str | None:
    """Say why an import is not allowed under `permissions`, or return None."""
    if item.module == KERNEL_MODULE:
        if item.name in HTTP_FUNCTIONS and not permissions.allowed_hosts:
            return (
                f"imports {item.qualified} (HTTP requests) but the manifest "
                "requests no network access; add the hosts it needs to "
                "permissions.allowed_hosts, or remove the HTTP calls"
            )
        return None
    if item.module in WASI_MODULES:
        if item.name.startswith("sock_"):
            return (
                f"imports {item.qualified} (sockets); plugins get no sockets: "
                "use the Extism HTTP functions with permissions.allowed_hosts"
            )
        if (
            item.name.startswith("path_") or item.name in WASI_FILESYSTEM
        ) and not permissions.allowed_paths:
            return (
                f"imports {item.qualified} (file system access) but the manifest "
                "requests no directories; add them to permissions.allowed_paths, "
                "or remove the file calls (fopen and the like)"
            )
        return None
    if item.module == "env" and item.name == "abort":
        return (
            "imports env.abort, which the host does not provide; an "
            "AssemblyScript plugin must be built with "
            "--use abort=~lib/dataflare/index/dataflareAbort (the SDK's abort handler)"
        )
    return (
        f"imports {item.qualified} ({item.kind}), which the host does not "
        "provide: plugins may import only the Extism kernel (extism:host/env) "
        "and WASI (wasi_snapshot_preview1)"
    )


def check_module(
    loaded: LoadedManifest, info: ModuleInfo, memory_max_pages: int | None = None
) -> list[str]:
    """Compare a module with its manifest; return the problems found."""
    manifest = loaded.manifest
    problems = []
    for item in info.imports:
        problem = capability_problem(item, manifest.permissions)
        if problem:
            problems.append(f"module {manifest.module} {problem}")
    for role, name in (
        ("process", manifest.exports.process),
        ("open", manifest.exports.open),
    ):
        if name is None:
            continue
        signature = info.functions.get(name)
        if signature is None:
            available = ", ".join(sorted(info.functions)) or "(none)"
            problems.append(
                f"module {manifest.module} does not export the function "
                f"{name!r} named in exports.{role}; it exports: {available}"
            )
        elif signature != ([], ["i32"]):
            params, results = signature
            problems.append(
                f"exported function {name!r} has type ({', '.join(params)}) -> "
                f"({', '.join(results)}); plugin functions take no parameters "
                "and return an i32 status (0 = success)"
            )
    limit = memory_max_pages or manifest.permissions.memory_max_pages
    if info.memory_min_pages > limit:
        problems.append(
            f"module {manifest.module} needs {info.memory_min_pages} pages of "
            f"memory ({info.memory_min_pages * WASM_PAGE // 2**20} MiB) at start, "
            f"more than its limit of {limit} pages; link it with a smaller stack "
            "(the SDK builds use -Wl,-z,stack-size=1048576) or raise "
            "permissions.memory_max_pages"
        )
    return problems


def read_module(loaded: LoadedManifest) -> bytes:
    """Read the module file named by the manifest.

    Raises:
        ManifestError: the file is missing or unreadable.
    """
    path = loaded.module_path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        hint = (
            " (build it with `dataflare plugin build`)" if loaded.manifest.build else ""
        )
        raise ManifestError(
            f"module {loaded.manifest.module} of plugin {loaded.name!r} not found "
            f"at {path}{hint}"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read module {path}: {exc}") from None


# --- operator grants and limits ---------------------------------------------


@dataclass(frozen=True)
class EffectivePermissions:
    """Permissions a plugin instance gets: requested and granted."""

    allowed_paths: dict[str, str] = field(default_factory=dict)
    """Host directory -> path inside the sandbox."""
    allowed_hosts: list[str] = field(default_factory=list)
    memory_max_pages: int = DEFAULT_MEMORY_MAX_PAGES
    timeout_ms: int = DEFAULT_TIMEOUT_MS


def resolve_permissions(
    manifest: PluginManifest,
    *,
    allowed_paths: Mapping[str, str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    memory_max_pages: int | None = None,
    timeout_ms: int | None = None,
) -> EffectivePermissions:
    """Combine the manifest's requests with the operator's grants.

    A grant must match a request: a directory granted for a sandbox path the
    manifest did not request, or a host it did not list, is an error, as is
    a limit above the manifest's.

    Raises:
        ManifestError: with `where` set to the step config key at fault.
    """
    requested = manifest.permissions
    paths: dict[str, str] = {}
    for host_path, guest_path in (allowed_paths or {}).items():
        if guest_path not in requested.allowed_paths:
            wanted = ", ".join(requested.allowed_paths) or "none"
            raise ManifestError(
                f"grants.allowed_paths maps {host_path!r} to {guest_path!r}, but "
                f"plugin {manifest.name!r} did not request that path "
                f"(it requests: {wanted})",
                where="grants.allowed_paths",
            )
        if not Path(host_path).is_dir():
            raise ManifestError(
                f"grants.allowed_paths: {host_path!r} is not a directory",
                where="grants.allowed_paths",
            )
        paths[str(Path(host_path).resolve())] = guest_path
    hosts = list(allowed_hosts or [])
    for host in hosts:
        if host not in requested.allowed_hosts:
            wanted = ", ".join(requested.allowed_hosts) or "none"
            raise ManifestError(
                f"grants.allowed_hosts lists {host!r}, but plugin "
                f"{manifest.name!r} did not request it (it requests: {wanted})",
                where="grants.allowed_hosts",
            )
    pages = requested.memory_max_pages
    if memory_max_pages is not None:
        if memory_max_pages > pages:
            raise ManifestError(
                f"memory_max_pages {memory_max_pages} is above the {pages} pages "
                f"plugin {manifest.name!r} allows in its manifest",
                where="memory_max_pages",
            )
        pages = memory_max_pages
    timeout = requested.timeout_ms
    if timeout_ms is not None:
        if timeout_ms > timeout:
            raise ManifestError(
                f"timeout_ms {timeout_ms} is above the {timeout} ms plugin "
                f"{manifest.name!r} allows in its manifest",
                where="timeout_ms",
            )
        timeout = timeout_ms
    return EffectivePermissions(paths, hosts, pages, timeout)


# --- the plugin's own config -------------------------------------------------


def check_plugin_config(
    manifest: PluginManifest, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate a plugin's config against its schema; fill in defaults.

    Raises:
        ManifestError: naming the config key and the rule it breaks.
    """
    schema = manifest.config_schema
    key = check_cache.json_parts(schema, dict(config))
    if key is None or not check_cache.passed("plugin-config", "jsonschema", *key):
        _validate_plugin_config(manifest, config)
        if key is not None:
            check_cache.record_pass("plugin-config", "jsonschema", *key)
    filled = dict(config)
    for key, prop in (schema.get("properties") or {}).items():
        if key not in filled and isinstance(prop, dict) and "default" in prop:
            filled[key] = prop["default"]
    return filled


def _validate_plugin_config(
    manifest: PluginManifest, config: Mapping[str, Any]
) -> None:
    import jsonschema

    schema = manifest.config_schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        key = ".".join(str(p) for p in first.absolute_path)
        where = f"config.{key}" if key else "config"
        raise ManifestError(
            f"{where}: {first.message} (checked against the config_schema of "
            f"plugin {manifest.name!r})",
            where=where,
        )


def extism_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Turn a plugin config into Extism config strings.

    Strings are passed as they are; every other value as its JSON text, so a
    plugin reads `keep: 4` as "4" and `labels: [a, b]` as '["a", "b"]'.
    """
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in config.items()
    }


def output_types(manifest: PluginManifest) -> dict[str, Any]:
    """Map each declared output column to its wire type."""
    return {o.name: WIRE_TYPE_NAMES[o.type] for o in manifest.outputs}
