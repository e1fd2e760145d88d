"""Helpers for testing WebAssembly plugins with pytest.

`build_copy` copies a plugin's sources into a scratch directory and builds
them there once per process, so that several test modules can share one
build. `require_toolchain` skips a test when the compiler is missing, and
fails it instead when the `CI` environment variable is set, so that a CI
machine without the toolchain cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from dataflare.plugin.wasm.manifest import load_manifest
from dataflare.plugin.wasm.tooling import build_plugin, toolchain_problem

_built: dict[tuple[Path, Path], Path] = {}
_lock = threading.Lock()


def require_toolchain(language: str) -> None:
    """Skip (locally) or fail (under CI) when `language` cannot be built."""
    import pytest

    problem = toolchain_problem(language)
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must build {language} plugins, but {problem}")
    pytest.skip(problem)


def build_copy(source: Path, scratch: Path) -> Path:
    """Copy the plugin at `source` into `scratch` and build it there.

    Built modules and installed npm packages of the source are not copied,
    so the build starts clean. A second call with the same arguments
    returns the first build.

    Returns:
        The directory of the built copy.
    """
    key = (source.resolve(), scratch.resolve())
    with _lock:
        if key in _built:
            return _built[key]
        loaded = load_manifest(source)
        if loaded.manifest.build is not None:
            require_toolchain(loaded.manifest.build.language)
        target = scratch / source.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(
            source,
            target,
            ignore=shutil.ignore_patterns("node_modules", "*.wasm", ".zig-cache"),
        )
        build_plugin(target)
        _built[key] = target
        return target


def write_plugin(
    directory: Path, module: bytes | str, manifest: dict[str, object]
) -> Path:
    """Write a plugin made in a test: a module (bytes, or WAT text) and a manifest.

    `manifest` needs at least `kind` and `exports`; `name`, `version`,
    `module` and `batch_encoding` get defaults.

    Returns:
        The plugin directory.
    """
    import wasmtime
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    wasm = wasmtime.wat2wasm(module) if isinstance(module, str) else module
    data: dict[str, object] = {
        "name": directory.name,
        "version": "0.0.1",
        "module": "plugin.wasm",
        "batch_encoding": 1,
    }
    data.update(manifest)
    (directory / str(data["module"])).write_bytes(bytes(wasm))
    (directory / "dataflare-plugin.yaml").write_text(
        yaml.safe_dump(data, sort_keys=False)
    )
    return directory


def wat_bytes(data: bytes) -> str:
    """Escape bytes for a WAT string literal."""
    return "".join(f"\\{b:02x}" for b in data)


WAT_KERNEL_IMPORTS = """
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u64"
    (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
"""

WAT_HELPERS = """
  ;; Copy len bytes at plugin address `at` into a new kernel block.
  (func $emit (param $at i32) (param $len i32) (result i64)
    (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (call $store_u8 (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
                      (i32.load8_u (i32.add (local.get $at) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $p))
  ;; The batch's row count (bytes 8..12 of the input).
  (func $rows (result i32)
    (i32.wrap_i64 (call $input_load_u64 (i64.const 8))))
  ;; Output a DFS1 selection vector keeping every row.
  (func $keep_all (result i32)
    (local $n i32) (local $bytes i32) (local $p i64) (local $i i32)
    (local.set $n (call $rows))
    (local.set $bytes
      (i32.shr_u (i32.add (local.get $n) (i32.const 7)) (i32.const 3)))
    (local.set $p
      (call $alloc (i64.extend_i32_u (i32.add (local.get $bytes) (i32.const 8)))))
    (call $store_u64 (local.get $p)
      (i64.or (i64.const 0x31534644)
              (i64.shl (i64.extend_i32_u (local.get $n)) (i64.const 32))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $bytes)))
      (call $store_u8
        (i64.add (local.get $p)
                 (i64.extend_i32_u (i32.add (local.get $i) (i32.const 8))))
        (i32.const 255))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (call $output_set (local.get $p)
      (i64.extend_i32_u (i32.add (local.get $bytes) (i32.const 8))))
    (i32.const 0))
  ;; The first int64 value of the first column (which must have no nulls).
  (func $first_value (result i64)
    (call $input_load_u64
      (i64.shr_u (call $input_load_u64 (i64.const 16)) (i64.const 32))))
"""


def wat_module(
    body: str, *, data: bytes = b"", imports: str = "", functions: str = ""
) -> str:
    """Return the text of a WAT module with the kernel imports, the helpers
    above, `data` at address 1024, and an exported `process` running `body`."""
    return f"""(module
  {WAT_KERNEL_IMPORTS}
  {imports}
  (memory (export "memory") 1)
  (data (i32.const 1024) "{wat_bytes(data)}")
  {WAT_HELPERS}
  {functions}
  (func (export "process") (result i32)
    {body})
)"""
