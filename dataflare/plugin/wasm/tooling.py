"""Create, build, check, run and measure WebAssembly plugins.

The `dataflare plugin` commands call these functions:

- `new_plugin(lang, name, dest)` writes a working plugin to start from;
- `build_plugin(path)` compiles it (C and Zig with the `ziglang` package,
  AssemblyScript with `asc` from npm);
- `validate_plugin(path)` lists what is wrong with it;
- `run_plugin(path, input, config)` runs it over a CSV, JSONL or Parquet file;
- `bench_plugin(path, rows, batch_rows)` measures records per second and
  the fixed cost of one batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dataflare.plugin import sdk
from dataflare.plugin.interface import ConfigError, FieldNotFoundError
from dataflare.plugin.wasm.manifest import (
    MANIFEST_NAMES,
    LoadedManifest,
    ManifestError,
    check_module,
    check_plugin_config,
    extism_config,
    inspect_module,
    load_manifest,
)
from dataflare.plugin.wasm.runtime import (
    PluginCallError,
    PluginLoadError,
    PluginRuntime,
    RuntimeSettings,
)
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform

LANGUAGES = ("c", "zig", "assemblyscript")
C_FLAGS = (
    "--target=wasm32-wasi",
    "-O2",
    "-mexec-model=reactor",
    "-Wl,-z,stack-size=1048576",
    "-Wl,--strip-debug",
)
"""Flags of every C build. The 1 MiB stack keeps the module at 17 pages at
start; `zig cc`'s default 16 MiB stack makes it 257 pages."""
ZIG_FLAGS = (
    "-target",
    "wasm32-freestanding",
    "-fno-entry",
    "-rdynamic",
    "-O",
    "ReleaseSafe",
    "--stack",
    "1048576",
)
ASSEMBLYSCRIPT_FLAGS = ("-O3", "--runtime", "incremental")
BUILD_TIMEOUT_S = 600


class BuildError(RuntimeError):
    """A plugin did not build; the message has the compiler's output."""


class PluginRunError(RuntimeError):
    """A plugin failed on some batches of a `run_plugin` input."""


# --- toolchains ---------------------------------------------------------------


def toolchain_problem(language: str) -> str | None:
    """Return what is missing to build plugins in `language`, or None."""
    if language in ("c", "zig"):
        try:
            import ziglang  # noqa: F401
        except ImportError:
            return (
                "the Zig toolchain is not installed: run `pip install ziglang` "
                "(it builds both C and Zig plugins)"
            )
        return None
    if language == "assemblyscript":
        missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
        if missing:
            return (
                f"{' and '.join(missing)} not found: install Node.js 18 or newer "
                "(with npm) to build AssemblyScript plugins"
            )
        return None
    raise ValueError(f"unknown plugin language {language!r}; use one of {LANGUAGES}")


def _run(command: Sequence[str], cwd: Path, what: str) -> None:
    env = dict(os.environ)
    env.setdefault(
        "ZIG_LOCAL_CACHE_DIR", str(Path(tempfile.gettempdir()) / "dataflare-zig-cache")
    )
    try:
        result = subprocess.run(
            list(command),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{what} failed: {exc.filename} not found") from None
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"{what} did not finish within {BUILD_TIMEOUT_S} s: {' '.join(command)}"
        ) from None
    if result.returncode != 0:
        output = (result.stderr + result.stdout).strip()
        raise BuildError(
            f"{what} failed (exit code {result.returncode}):\n{output}\n"
            f"command: {' '.join(command)}"
        )


def build_plugin(path: Path) -> Path:
    """Compile a plugin from the sources its manifest's `build` names.

    Returns:
        The path of the module written (the manifest's `module`).

    Raises:
        ManifestError: the manifest is invalid or has no `build` section.
        BuildError: the toolchain is missing or the compiler failed.
    """
    loaded = load_manifest(path)
    manifest = loaded.manifest
    if manifest.build is None:
        raise ManifestError(
            f"plugin {manifest.name!r} has no build section in {loaded.path}; add "
            "build: {language: c, sources: [plugin.c]} (or zig, assemblyscript)"
        )
    build = manifest.build
    problem = toolchain_problem(build.language)
    if problem:
        raise BuildError(f"cannot build plugin {manifest.name!r}: {problem}")
    directory = loaded.directory
    for source in build.sources:
        if not (directory / source).is_file():
            raise BuildError(
                f"source {source} of plugin {manifest.name!r} not found in {directory}"
            )
    output = loaded.module_path
    output.parent.mkdir(parents=True, exist_ok=True)
    what = f"building plugin {manifest.name!r} ({build.language})"
    if build.language == "c":
        command = [
            sys.executable,
            "-m",
            "ziglang",
            "cc",
            *C_FLAGS,
            "-I",
            str(sdk.C_INCLUDE_DIR),
            *build.flags,
            *build.sources,
            "-o",
            str(output),
        ]
        _run(command, directory, what)
    elif build.language == "zig":
        root, *others = build.sources
        if others:
            raise BuildError(
                f"plugin {manifest.name!r}: list one Zig source (the root file); "
                "it imports the others"
            )
        command = [
            sys.executable,
            "-m",
            "ziglang",
            "build-exe",
            *ZIG_FLAGS,
            *build.flags,
            "--dep",
            "dataflare",
            f"-Mroot={root}",
            f"-Mdataflare={sdk.ZIG_MODULE}",
            f"-femit-bin={output}",
        ]
        _run(command, directory, what)
    else:
        _install_node_modules(directory, what)
        asc = directory / "node_modules" / ".bin" / "asc"
        command = [
            str(asc),
            *build.sources,
            "--outFile",
            str(output),
            *ASSEMBLYSCRIPT_FLAGS,
            "--path",
            str(sdk.ASSEMBLYSCRIPT_PATH),
            "--use",
            f"abort={sdk.ASSEMBLYSCRIPT_ABORT}",
            *build.flags,
        ]
        _run(command, directory, what)
    if not output.is_file():
        raise BuildError(f"{what} reported success but wrote no {output}")
    return output


def _install_node_modules(directory: Path, what: str) -> None:
    if (directory / "node_modules" / ".bin" / "asc").exists():
        return
    if not (directory / "package.json").is_file():
        raise BuildError(
            f"{what}: {directory} has no package.json; it needs assemblyscript "
            "as a dev dependency (`dataflare plugin new assemblyscript NAME` "
            "writes one)"
        )
    lock = (directory / "package-lock.json").is_file()
    command = ["npm", "ci" if lock else "install", "--no-audit", "--no-fund"]
    _run(command, directory, f"{what}: installing npm packages")


# --- checking -----------------------------------------------------------------


def validate_plugin(path: Path) -> list[str]:
    """Check a plugin: manifest, module, imports and exports, and a start.

    Returns:
        The problems found, each a sentence; empty when the plugin is valid.
    """
    try:
        loaded = load_manifest(path)
    except ManifestError as exc:
        return [str(exc)]
    manifest = loaded.manifest
    problems: list[str] = []
    if manifest.test is not None and not loaded.resolve(manifest.test.input).is_file():
        problems.append(
            f"test input {manifest.test.input} not found in {loaded.directory}"
        )
    try:
        wasm = loaded.module_path.read_bytes()
    except OSError:
        hint = " (build it with `dataflare plugin build`)" if manifest.build else ""
        return [*problems, f"module {manifest.module} not found{hint}"]
    try:
        info = inspect_module(wasm, origin=f"module {manifest.module}")
    except ManifestError as exc:
        return [*problems, str(exc)]
    module_problems = check_module(loaded, info)
    problems.extend(module_problems)
    if module_problems:
        return problems
    config = manifest.test.config if manifest.test else {}
    try:
        filled = check_plugin_config(manifest, config)
    except ManifestError as exc:
        return [*problems, f"test config: {exc}"]
    settings = RuntimeSettings(
        name=manifest.name,
        wasm=wasm,
        wasi=info.uses_wasi,
        memory_max_pages=manifest.permissions.memory_max_pages,
        timeout_ms=manifest.permissions.timeout_ms,
        config=extism_config(filled),
    )
    try:
        runtime = PluginRuntime(settings)
    except PluginLoadError as exc:
        return [*problems, str(exc)]
    with runtime:
        if manifest.exports.open:
            try:
                runtime.call(manifest.exports.open, b"")
            except PluginCallError as exc:
                problems.append(f"the open function failed: {exc.reason}")
    return problems


# --- running ------------------------------------------------------------------


class _ToolContext:
    """An operator context that keeps rejections for `run_plugin`."""

    def __init__(self, name: str) -> None:
        self.pipeline_id = f"plugin-{name}"
        self.step = name
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger(f"dataflare.plugin.{name}")
        self.stopping = False
        self.checkpointing = False
        self.rejected: list[tuple[int, str]] = []
        self.counters: dict[str, int] = {}

    def reject(self, records: Any, reasons: Any, positions: Any = None) -> None:
        count = (
            records.num_rows if isinstance(records, pa.RecordBatch) else len(records)
        )
        reason = reasons if isinstance(reasons, str) else reasons[0]
        self.rejected.append((count, reason))

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        """Side outputs are not used by WebAssembly plugins."""

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value


def read_input(path: Path) -> pa.Table:
    """Read a CSV, JSON Lines or Parquet file into a table.

    Raises:
        ValueError: an unknown extension or an unreadable file.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(null_values=["", "NA"])
            )
        if suffix in (".jsonl", ".ndjson", ".json"):
            return pajson.read_json(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    raise ValueError(
        f"cannot read {path}: use a .csv, .jsonl or .parquet file (got {suffix!r})"
    )


def _make_transform(
    loaded: LoadedManifest,
    schema: pa.Schema,
    config: Mapping[str, Any] | None,
    fields: Mapping[str, str] | None,
    context: _ToolContext,
) -> tuple[WasmTransform, pa.Schema]:
    test = loaded.manifest.test
    if config is None:
        config = test.config if test else {}
    if fields is None:
        fields = test.fields if test else {}
    transform = WasmTransform(
        WasmConfig(plugin=str(loaded.path), config=dict(config), fields=dict(fields)),
        context,
    )
    try:
        output_schema = transform.output_schema([schema])
    except FieldNotFoundError as exc:
        raise ValueError(
            f"{exc}; map the plugin's fields to the input's with `fields`"
        ) from None
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    transform.open()
    return transform, output_schema


def run_plugin(
    path: Path,
    input_path: Path,
    config: dict[str, Any],
    *,
    fields: Mapping[str, str] | None = None,
    batch_rows: int = 10_000,
) -> pa.Table:
    """Run a plugin over a CSV, JSONL or Parquet file.

    Args:
        path: the plugin directory or manifest.
        input_path: the records to run it on.
        config: the plugin's own config.
        fields: manifest field -> input field; defaults to the manifest's
            `test.fields`.
        batch_rows: records per call.

    Returns:
        The output records.

    Raises:
        ManifestError, ValueError: the plugin or the input cannot be used.
        PluginRunError: the plugin failed on some batches; the message gives
            each reason.
    """
    loaded = load_manifest(path)
    table = read_input(Path(input_path))
    context = _ToolContext(loaded.name)
    transform, schema = _make_transform(loaded, table.schema, config, fields, context)
    outputs: list[pa.RecordBatch] = []
    try:
        for batch in table.to_batches(max_chunksize=batch_rows):
            outputs.extend(transform.process(batch))
        outputs.extend(transform.finish())
    finally:
        transform.close()
    if context.rejected:
        lines = [f"  {count} records: {reason}" for count, reason in context.rejected]
        raise PluginRunError(
            f"plugin {loaded.name!r} failed on {len(context.rejected)} of "
            f"{max(1, -(-table.num_rows // batch_rows))} batches:\n" + "\n".join(lines)
        )
    return pa.Table.from_batches(outputs, schema=schema)


def bench_plugin(path: Path, rows: int, batch_rows: int) -> dict[str, float]:
    """Measure a plugin on its test input, repeated to `rows` records.

    Returns:
        `records_per_second` over the whole input (encoding, the call and
        decoding included), `batch_overhead_us` (median time of a one-record
        batch), `batch_us` (median time of a full batch), `rows` and
        `batch_rows`.

    Raises:
        ManifestError: the manifest has no `test.input` to build records from.
        PluginRunError: the plugin failed on a batch.
    """
    if rows < 1 or batch_rows < 1:
        raise ValueError("rows and batch_rows must be at least 1")
    loaded = load_manifest(path)
    test = loaded.manifest.test
    if test is None:
        raise ManifestError(
            f"plugin {loaded.name!r} has no test input to benchmark with; add "
            f"test: {{input: sample.csv}} to {loaded.path.name}"
        )
    sample = read_input(loaded.resolve(test.input)).combine_chunks()
    if sample.num_rows == 0:
        raise ValueError(f"test input {test.input} has no records")
    repeats = -(-rows // sample.num_rows)
    table = pa.concat_tables([sample] * repeats).slice(0, rows).combine_chunks()
    batches = table.to_batches(max_chunksize=batch_rows)
    context = _ToolContext(loaded.name)
    transform, _ = _make_transform(loaded, table.schema, None, None, context)
    try:
        transform.process(batches[0])  # warm up
        started = time.perf_counter()
        for batch in batches:
            transform.process(batch)
        elapsed = time.perf_counter() - started
        batch_times = []
        for batch in batches[: min(len(batches), 50)]:
            t0 = time.perf_counter()
            transform.process(batch)
            batch_times.append(time.perf_counter() - t0)
        one = table.slice(0, 1).to_batches()[0]
        overhead = []
        for _ in range(500):
            t0 = time.perf_counter()
            transform.process(one)
            overhead.append(time.perf_counter() - t0)
    finally:
        transform.close()
    if context.rejected:
        raise PluginRunError(
            f"plugin {loaded.name!r} failed while being measured: "
            f"{context.rejected[0][1]}"
        )
    return {
        "records_per_second": rows / elapsed,
        "batch_overhead_us": statistics.median(overhead) * 1e6,
        "batch_us": statistics.median(batch_times) * 1e6,
        "rows": float(rows),
        "batch_rows": float(batch_rows),
    }


# --- templates ----------------------------------------------------------------


def new_plugin(lang: str, name: str, dest: Path) -> Path:
    """Write a working plugin template in `dest/name`.

    The template is a map that multiplies the numeric field `value` by the
    config's `factor` into `scaled`, with a manifest, the source, a sample
    input and (for AssemblyScript) a package.json.

    Returns:
        The new plugin's directory.

    Raises:
        ValueError: an unknown language, a bad name, or a directory that
            exists and is not empty.
    """
    from dataflare.plugin.wasm import templates

    if lang not in LANGUAGES:
        raise ValueError(
            f"unknown plugin language {lang!r}; use one of: c, zig, assemblyscript"
        )
    if not name.isidentifier() or name != name.lower():
        raise ValueError(
            f"plugin name {name!r} must be lower-case letters, digits and "
            "underscores, not starting with a digit (it names files and functions)"
        )
    directory = Path(dest) / name
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not empty; pick another name")
    directory.mkdir(parents=True, exist_ok=True)
    for filename, text in templates.files(lang, name).items():
        (directory / filename).write_text(text, encoding="utf-8")
    return directory


__all__ = [
    "LANGUAGES",
    "MANIFEST_NAMES",
    "BuildError",
    "PluginRunError",
    "bench_plugin",
    "build_plugin",
    "new_plugin",
    "read_input",
    "run_plugin",
    "toolchain_problem",
    "validate_plugin",
]
