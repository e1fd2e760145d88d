"""`wasm`: run a sandboxed WebAssembly plugin on every batch.

Example::

    transformations:
      classified:
        type: wasm
        inputs: [flights]
        config:
          plugin: plugins/delay_classifier      # directory or manifest file
          config: {late_after: 15}               # the plugin's own config
          fields: {dep_delay: arr_delay}         # optional: read arr_delay as dep_delay
          grants: {allowed_paths: {data/ref: /ref}, allowed_hosts: []}
          timeout_ms: 500                        # at most the manifest's limit
          memory_max_pages: 512                  # at most the manifest's limit

Validation loads the manifest, checks the module's imports and exports
against it, checks the fields and the plugin's config, and starts one
instance. The plugin may fail on a batch: a trap, a timeout, memory
exhaustion, an error it reports, or output that breaks the encoding. The
whole batch is then rejected with the reason, and the next batch goes on.

The step counts `wasm_calls`, `wasm_records`, `wasm_errors` and `wasm_us`
(time in the plugin, encoding included); a filter also counts `filtered`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import (
    RESERVED_COLUMNS,
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.plugin.wasm.encoding import (
    BatchEncoder,
    EncodingError,
    MalformedOutputError,
    UnsupportedTypeError,
    WireType,
    decode_batch,
    decode_selection,
    plan_columns,
)
from dataflare.plugin.wasm.manifest import (
    ROW_COLUMN,
    LoadedManifest,
    ManifestError,
    check_module,
    check_plugin_config,
    extism_config,
    inspect_module,
    load_manifest,
    output_types,
    read_module,
    resolve_permissions,
)
from dataflare.plugin.wasm.runtime import (
    PluginCallError,
    PluginLoadError,
    PluginRuntime,
    RuntimeSettings,
)


class Grants(PluginConfig):
    allowed_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Host directory -> path inside the sandbox; each sandbox "
        "path must be one the plugin's manifest requests",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="HTTP hosts the plugin may reach; each must be one its "
        "manifest requests",
    )


class WasmConfig(PluginConfig):
    plugin: str = Field(
        min_length=1,
        description="Plugin directory or manifest file (dataflare-plugin.yaml)",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The plugin's own config, checked against its config_schema",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Manifest field -> input field, to read a field under another name",
    )
    grants: Grants = Field(default_factory=Grants)
    timeout_ms: int | None = Field(
        default=None, ge=1, description="Per-batch time limit, at most the manifest's"
    )
    memory_max_pages: int | None = Field(
        default=None,
        ge=1,
        description="Memory cap in 64 KiB pages, at most the manifest's",
    )


class WasmTransform(Transform[WasmConfig]):
    """Filter, map or flat-map records with a WebAssembly plugin."""

    metadata = PluginMetadata(
        "wasm",
        PluginKind.PROCESSOR,
        "Run a sandboxed WebAssembly plugin (Extism) on each batch",
    )
    Config = WasmConfig
    # NOTE: state that a plugin keeps in its own memory (running_total, for
    # one) is not saved in checkpoints, so a resumed run starts it empty.

    _loaded: LoadedManifest | None = None
    _runtime: PluginRuntime | None = None

    # --- validation ------------------------------------------------------

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        loaded = self._load()
        manifest = loaded.manifest
        self._check_field_map(loaded)

        # The fields the plugin reads, as (wire name, input name) pairs.
        wire_fields: list[tuple[str, str]] | None
        if manifest.fields:
            wire_fields = []
            for name in manifest.fields:
                input_name = self.config.fields.get(name, name)
                if input_name not in schema.names:
                    where = f"fields.{name}" if name in self.config.fields else ""
                    raise FieldNotFoundError(
                        input_name,
                        schema.names,
                        where=where or f"the fields of plugin {manifest.name!r}",
                    )
                wire_fields.append((name, input_name))
        else:
            wire_fields = None
        try:
            self._columns = plan_columns(schema, wire_fields)
        except UnsupportedTypeError as exc:
            raise ConfigError(str(exc), where="plugin") from None
        self._rename = {wire: name for wire, name in (wire_fields or [])}
        self._outputs = output_types(manifest)

        try:
            plugin_config = check_plugin_config(manifest, self.config.config)
            permissions = resolve_permissions(
                manifest,
                allowed_paths=self.config.grants.allowed_paths,
                allowed_hosts=self.config.grants.allowed_hosts,
                memory_max_pages=self.config.memory_max_pages,
                timeout_ms=self.config.timeout_ms,
            )
        except ManifestError as exc:
            raise ConfigError(str(exc), where=exc.where) from None

        wasm = read_module_checked(loaded)
        info = inspect_module_checked(loaded, wasm)
        problems = check_module(loaded, info, permissions.memory_max_pages)
        if problems:
            raise ConfigError(
                f"plugin {manifest.name!r} cannot be used: " + "; ".join(problems),
                where="plugin",
            )
        self._settings = RuntimeSettings(
            name=manifest.name,
            wasm=wasm,
            wasi=info.uses_wasi,
            memory_max_pages=permissions.memory_max_pages,
            timeout_ms=permissions.timeout_ms,
            config=extism_config(plugin_config),
            allowed_paths=permissions.allowed_paths,
            allowed_hosts=tuple(permissions.allowed_hosts),
        )
        # Start an instance now, so that link errors and a config the plugin
        # rejects in its `open` function show up before the run.
        self._start()
        self._schema = self._compute_schema(schema)
        return self._schema

    def _load(self) -> LoadedManifest:
        if self._loaded is None:
            try:
                self._loaded = load_manifest(self.config.plugin)
            except ManifestError as exc:
                raise ConfigError(str(exc), where="plugin") from None
        return self._loaded

    def _check_field_map(self, loaded: LoadedManifest) -> None:
        manifest = loaded.manifest
        for name in self.config.fields:
            if name not in manifest.fields:
                declared = ", ".join(manifest.fields) or "(none: it reads every field)"
                raise ConfigError(
                    f"fields maps {name!r}, which plugin {manifest.name!r} does "
                    f"not read; its manifest's fields are: {declared}",
                    where=f"fields.{name}",
                )

    def _output_name(self, wire_name: str) -> str:
        return self._rename.get(wire_name, wire_name)

    def _compute_schema(self, schema: pa.Schema) -> pa.Schema:
        """Input fields (kept, or replaced in place by an output), then new outputs."""
        manifest = self._loaded_manifest().manifest
        self._from_wire = {self._output_name(w): w for w in self._outputs}
        if manifest.kind == "filter":
            return schema
        outputs = {
            self._output_name(name): wire.arrow_type()
            for name, wire in self._outputs.items()
        }
        if manifest.kind == "flat_map" and not manifest.keep_input:
            # Output rows need not come from one input row each: nothing of
            # the input follows them.
            return pa.schema(list(outputs.items()))
        fields: list[pa.Field] = []
        for item in schema:
            if not manifest.keep_input and item.name not in RESERVED_COLUMNS:
                continue
            if item.name in outputs:
                fields.append(pa.field(item.name, outputs.pop(item.name)))
            else:
                fields.append(item)
        fields.extend(pa.field(name, type_) for name, type_ in outputs.items())
        return pa.schema(fields)

    def partition_key(self) -> list[str] | None:
        manifest = self._load().manifest
        if not manifest.partition_by:
            return None
        return [self.config.fields.get(name, name) for name in manifest.partition_by]

    def _loaded_manifest(self) -> LoadedManifest:
        assert self._loaded is not None
        return self._loaded

    # --- running ----------------------------------------------------------

    def _start(self) -> None:
        if self._runtime is not None:
            return
        manifest = self._loaded_manifest().manifest
        try:
            runtime = PluginRuntime(self._settings)
        except PluginLoadError as exc:
            raise ConfigError(str(exc), where="plugin") from None
        if manifest.exports.open:
            try:
                runtime.call(manifest.exports.open, b"")
            except PluginCallError as exc:
                runtime.close()
                raise ConfigError(
                    f"plugin {manifest.name!r} rejected its config or could not "
                    f"start: {exc.reason}",
                    where="config",
                ) from None
        self._runtime = runtime
        self._instances = runtime.instances_created
        self._encoder = BatchEncoder(self._columns)

    def open(self) -> None:
        if self._runtime is None:
            self._start()

    def close(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        rows = batch.num_rows
        if rows == 0:
            return []
        runtime = self._runtime
        assert runtime is not None, "open() was not called"
        manifest = self._loaded_manifest().manifest
        started = time.perf_counter_ns()
        try:
            self._reopen_if_restarted(runtime)
            data = self._encoder.encode(batch)
            output = runtime.call(manifest.exports.process, data)
            if manifest.kind == "filter":
                result = _select(batch, decode_selection(output, rows))
                self.context.count("filtered", rows - result.num_rows)
            else:
                result = self._assemble(batch, output)
        except (PluginCallError, MalformedOutputError, EncodingError) as exc:
            self._fail(batch, exc)
            return []
        finally:
            self.context.count("wasm_calls")
            self.context.count("wasm_records", rows)
            self.context.count("wasm_us", (time.perf_counter_ns() - started) // 1000)
        return [result] if result.num_rows else []

    def _reopen_if_restarted(self, runtime: PluginRuntime) -> None:
        """Call the plugin's `open` function on a fresh instance."""
        open_function = self._loaded_manifest().manifest.exports.open
        if open_function and runtime.instances_created != self._instances:
            self._instances = runtime.instances_created
            runtime.call(open_function, b"")

    def _fail(self, batch: pa.RecordBatch, exc: Exception) -> None:
        name = self._loaded_manifest().name
        if isinstance(exc, PluginCallError):
            reason = str(exc)
        elif isinstance(exc, MalformedOutputError):
            reason = f"wasm plugin {name!r} returned malformed output: {exc}"
        else:
            reason = f"wasm plugin {name!r} could not be given this batch: {exc}"
        self.context.count("wasm_errors")
        self.context.logger.warning("%s; rejecting %d records", reason, batch.num_rows)
        self.context.reject(batch, reason)

    def _assemble(self, batch: pa.RecordBatch, output: memoryview) -> pa.RecordBatch:
        manifest = self._loaded_manifest().manifest
        decoded = decode_batch(output)
        if decoded.flags != 0:
            raise MalformedOutputError(
                f"the output's flags are {decoded.flags}; v1 outputs set none"
            )
        columns = dict(decoded.columns)
        parent = columns.pop(ROW_COLUMN, None)
        expected = self._outputs
        missing = [n for n in expected if n not in columns]
        extra = [n for n in columns if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks declared column(s) {', '.join(missing)}")
            if extra:
                parts.append(f"has undeclared column(s) {', '.join(extra)}")
            raise MalformedOutputError(
                "the output " + " and ".join(parts) + "; a plugin writes exactly "
                "the columns its manifest's outputs list"
            )
        for name, wire in expected.items():
            got = columns[name].type
            if not got.equals(wire.arrow_type()):
                raise MalformedOutputError(
                    f"output column {name!r} has type {got}; the manifest declares "
                    f"{wire.label}"
                )
        if manifest.kind == "map":
            if decoded.rows != batch.num_rows:
                raise MalformedOutputError(
                    f"a map must return as many rows as it got: {batch.num_rows} "
                    f"in, {decoded.rows} out"
                )
            base = batch
        elif parent is not None:
            base = self._parent_rows(batch, parent, decoded.rows)
        else:
            if manifest.keep_input:
                raise MalformedOutputError(
                    f"the output has no {ROW_COLUMN!r} column, which a flat-map "
                    "with keep_input: true must write (the input row of each "
                    "output row)"
                )
            base = None
        arrays = []
        for item in self._schema:
            wire_name = self._from_wire.get(item.name)
            if wire_name is not None:
                arrays.append(columns[wire_name])
            else:
                assert base is not None
                arrays.append(base.column(item.name))
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema)

    def _parent_rows(
        self, batch: pa.RecordBatch, parent: pa.Array, rows: int
    ) -> pa.RecordBatch:
        if parent.type != WireType.INT64.arrow_type() or parent.null_count:
            raise MalformedOutputError(
                f"column {ROW_COLUMN!r} must be int64 without nulls"
            )
        index = parent.to_numpy(zero_copy_only=False)
        if rows and (index.min() < 0 or index.max() >= batch.num_rows):
            bad = int(index[(index < 0) | (index >= batch.num_rows)][0])
            raise MalformedOutputError(
                f"column {ROW_COLUMN!r} names input row {bad}, but the batch has "
                f"rows 0 to {batch.num_rows - 1}"
            )
        return batch.take(pa.array(index.astype(np.int64)))


def _select(batch: pa.RecordBatch, mask: pa.BooleanArray) -> pa.RecordBatch:
    """Keep the rows of `batch` whose mask bit is set; skip the copy when
    every row or no row is kept."""
    kept = mask.true_count
    if kept == batch.num_rows:
        return batch
    if kept == 0:
        return batch.slice(0, 0)
    return batch.filter(mask)


def read_module_checked(loaded: LoadedManifest) -> bytes:
    try:
        return read_module(loaded)
    except ManifestError as exc:
        raise ConfigError(str(exc), where="plugin") from None


def inspect_module_checked(loaded: LoadedManifest, wasm: bytes) -> Any:
    try:
        return inspect_module(wasm, origin=f"module {loaded.manifest.module}")
    except ManifestError as exc:
        raise ConfigError(f"plugin {loaded.name!r}: {exc}", where="plugin") from None
