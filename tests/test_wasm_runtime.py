"""The Extism runtime: failures, instance recovery, limits, config, grants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import wasmtime
from conftest import RecordingContext

from dataflare.plugin.wasm.encoding import decode_batch, encode_arrays, encode_batch
from dataflare.plugin.wasm.manifest import (
    DEFAULT_MEMORY_MAX_PAGES,
    check_module,
    inspect_module,
    load_manifest,
)
from dataflare.plugin.wasm.runtime import (
    FailureKind,
    PluginCallError,
    PluginLoadError,
    PluginRuntime,
    RuntimeSettings,
    classify_error,
)
from dataflare.plugin.wasm.testing import (
    WAT_HELPERS,
    WAT_KERNEL_IMPORTS,
    build_copy,
    require_toolchain,
    wat_bytes,
    wat_module,
    write_plugin,
)
from dataflare.plugin.wasm.tooling import C_FLAGS
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"

COUNTER = f"""(module
  {WAT_KERNEL_IMPORTS}
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (memory (export "memory") 1)
  (global $count (mut i64) (i64.const 0))
  (data (i32.const 1024) "{wat_bytes(b"bad batch")}")
  (data (i32.const 1100) "greeting")
  {WAT_HELPERS}
  (func (export "count") (result i32) (local $p i64)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (local.set $p (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $p) (global.get $count))
    (call $output_set (local.get $p) (i64.const 8))
    (i32.const 0))
  (func (export "trap") (result i32) unreachable)
  (func (export "spin") (result i32) (loop $l (br $l)) (i32.const 0))
  (func (export "grow") (result i32)
    (loop $l (drop (memory.grow (i32.const 16))) (br $l)) (i32.const 0))
  (func (export "fail") (result i32)
    (call $error_set (call $emit (i32.const 1024) (i32.const 9)))
    (i32.const 3))
  (func (export "status") (result i32) (i32.const 7))
  (func (export "greeting") (result i32) (local $v i64)
    (local.set $v (call $config_get (call $emit (i32.const 1100) (i32.const 8))))
    (call $output_set (local.get $v) (call $length (local.get $v)))
    (i32.const 0))
)"""


def counter(**settings: object) -> PluginRuntime:
    wasm = bytes(wasmtime.wat2wasm(COUNTER))
    return PluginRuntime(RuntimeSettings(name="counter", wasm=wasm, **settings))  # type: ignore[arg-type]


def count(runtime: PluginRuntime) -> int:
    return int.from_bytes(runtime.call("count", b""), "little")


def test_runtime_state_survives_reported_error() -> None:
    with counter() as runtime:
        assert [count(runtime) for _ in range(3)] == [1, 2, 3]
        with pytest.raises(PluginCallError) as info:
            runtime.call("fail", b"")
        assert info.value.kind is FailureKind.STATUS
        assert str(info.value) == (
            "wasm plugin 'counter' (fail): returned an error: bad batch"
        )
        assert count(runtime) == 4  # same instance, same memory
        with pytest.raises(PluginCallError, match="returned an error: 7"):
            runtime.call("status", b"")
        assert runtime.instances_created == 1


@pytest.mark.parametrize(
    ("function", "kind", "reason"),
    [
        ("trap", FailureKind.TRAP, "trapped (a WebAssembly runtime error)"),
        ("spin", FailureKind.TIMEOUT, "timed out: one call ran longer than the 200 ms"),
        ("grow", FailureKind.MEMORY, "ran out of memory: it tried to grow its memory"),
    ],
)
def test_fatal_failures_start_a_fresh_instance(
    function: str, kind: FailureKind, reason: str
) -> None:
    with counter(timeout_ms=200, memory_max_pages=64) as runtime:
        assert count(runtime) == 1
        with pytest.raises(PluginCallError) as info:
            runtime.call(function, b"")
        assert info.value.kind is kind
        assert info.value.plugin == "counter"
        assert reason in str(info.value)
        # The next call works, on a new instance whose state started over.
        assert count(runtime) == 1
        assert runtime.instances_created == 2


def test_memory_limit_names_pages() -> None:
    with (
        counter(memory_max_pages=64) as runtime,
        pytest.raises(PluginCallError, match="limit of 64 pages"),
    ):
        runtime.call("grow", b"")


def test_config_reaches_the_plugin() -> None:
    with counter(config={"greeting": "héllo"}) as runtime:
        assert bytes(runtime.call("greeting", b"")).decode() == "héllo"


def test_runtime_unknown_kernel_import() -> None:
    wat = COUNTER.replace(
        '(import "extism:host/env" "length"',
        '(import "extism:host/env" "no_such_function"',
    )
    with pytest.raises(PluginLoadError) as info:
        PluginRuntime(
            RuntimeSettings(name="counter", wasm=bytes(wasmtime.wat2wasm(wat)))
        )
    assert "wasm plugin 'counter'" in str(info.value)
    assert "no_such_function" in str(info.value)


def test_http_is_refused_unless_granted() -> None:
    """Extism refuses a host that was not granted; it reports the refusal
    as a trap (its message does not carry the cause)."""
    request = b'{"url": "http://127.0.0.1:9/", "method": "GET"}'
    wat = f"""(module
      {WAT_KERNEL_IMPORTS}
      (import "extism:host/env" "http_request"
        (func $http (param i64 i64) (result i64)))
      (memory (export "memory") 1)
      (data (i32.const 1024) "{wat_bytes(request)}")
      {WAT_HELPERS}
      (func (export "fetch") (result i32)
        (drop (call $http (call $emit (i32.const 1024) (i32.const {len(request)}))
                          (i64.const 0)))
        (i32.const 0)))"""
    wasm = bytes(wasmtime.wat2wasm(wat))
    with PluginRuntime(RuntimeSettings(name="fetcher", wasm=wasm)) as runtime:
        with pytest.raises(PluginCallError) as info:
            runtime.call("fetch", b"")
        assert info.value.plugin == "fetcher"
        assert info.value.kind is FailureKind.TRAP


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("timeout", FailureKind.TIMEOUT),
        ("oom", FailureKind.MEMORY),
        ("failed to allocate extism memory", FailureKind.MEMORY),
        ("error while executing at wasm backtrace:\n 0: 0x1", FailureKind.TRAP),
        ("abort: index out of range at x.ts:3:1", FailureKind.TRAP),
        ("Error code: 5", FailureKind.STATUS),
        ("the key column is missing", FailureKind.STATUS),
    ],
)
def test_extism_messages_are_classified(message: str, kind: FailureKind) -> None:
    assert classify_error(message)[0] is kind


def test_runtime_batch_round_trip() -> None:
    # The module echoes its input: the host's own encoding comes back intact.
    wat = f"""(module
      {WAT_KERNEL_IMPORTS}
      (memory (export "memory") 1)
      (func (export "echo") (result i32) (local $n i64) (local $p i64) (local $i i64)
        (local.set $n (call $input_length))
        (local.set $p (call $alloc (local.get $n)))
        (block $done (loop $next
          (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
          (call $store_u64 (i64.add (local.get $p) (local.get $i))
                           (call $input_load_u64 (local.get $i)))
          (local.set $i (i64.add (local.get $i) (i64.const 8)))
          (br $next)))
        (call $output_set (local.get $p) (local.get $n))
        (i32.const 0)))"""
    batch = pa.record_batch({"a": [1, None, 3], "b": ["x", "yy", None]})
    with PluginRuntime(
        RuntimeSettings(name="echo", wasm=bytes(wasmtime.wat2wasm(wat)))
    ) as runtime:
        output = runtime.call("echo", encode_batch(batch))
        decoded = decode_batch(output)
    assert decoded.columns["a"].to_pylist() == [1, None, 3]
    assert decoded.columns["b"].to_pylist() == ["x", "yy", None]


# --- sizing the default memory limit (needs the Zig toolchain) --------------

TINY_C = """
#include "dataflare_plugin.h"
DF_EXPORT("keep") int32_t keep(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    uint8_t *bits = df_bitmap_new(batch.rows);
    for (uint32_t i = 0; i < batch.rows; i++) df_bitmap_set(bits, i);
    int32_t status = df_output_selection(bits, batch.rows);
    free(bits);
    df_batch_release(&batch);
    return status;
}
"""


def build_c(tmp_path: Path, flags: list[str]) -> bytes:
    from dataflare.plugin import sdk

    source = tmp_path / "tiny.c"
    source.write_text(TINY_C)
    output = tmp_path / "tiny.wasm"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ziglang",
            "cc",
            *flags,
            "-I",
            str(sdk.C_INCLUDE_DIR),
            str(source),
            "-o",
            str(output),
        ],
        check=True,
        capture_output=True,
    )
    return output.read_bytes()


def run_keep(wasm: bytes, pages: int, rows: int = 10) -> bool:
    batch = pa.record_batch({"x": np.arange(rows)})
    try:
        with PluginRuntime(
            RuntimeSettings(name="tiny", wasm=wasm, memory_max_pages=pages)
        ) as runtime:
            runtime.call("keep", encode_batch(batch))
    except (PluginLoadError, PluginCallError):
        return False
    return True


def test_default_memory_limit_zig_stack(
    tmp_path: Path,
) -> None:
    """The design note: 256 pages failed every call of a small wasm32-wasi C
    module, 1024 worked. The cause is zig cc's default 16 MiB stack."""
    require_toolchain("c")
    default_flags = ["--target=wasm32-wasi", "-O2", "-mexec-model=reactor"]
    wasm = build_c(tmp_path, default_flags)
    info = inspect_module(wasm)
    assert info.memory_min_pages == 257
    assert not run_keep(wasm, 256)
    assert run_keep(wasm, DEFAULT_MEMORY_MAX_PAGES)
    # The SDK's build flags (1 MiB stack) bring it down to 17 pages.
    slim = build_c(tmp_path, list(C_FLAGS))
    assert inspect_module(slim).memory_min_pages == 17
    assert run_keep(slim, 17)
    assert run_keep(slim, 256)


def smallest_pages(runtime_for: object, low: int, high: int) -> int:
    """Binary search for the smallest page limit under which `runtime_for`
    (pages -> bool) succeeds."""
    assert callable(runtime_for)
    while low < high:
        middle = (low + high) // 2
        if runtime_for(middle):
            high = middle
        else:
            low = middle + 1
    return low


def test_default_memory_limit_largest_batch(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Each example needs well under half the default for a 65,536-row batch
    (the engine's largest by default) of its fields."""
    require_toolchain("c")
    scratch = tmp_path_factory.getbasetemp() / "wasm-examples"
    scratch.mkdir(exist_ok=True)
    rows = 65_536
    rng = np.random.default_rng(0)
    inputs = {
        "delay_classifier": pa.record_batch(
            {
                "dep_delay": pa.array(
                    rng.integers(-30, 300, rows), mask=rng.random(rows) < 0.05
                )
            }
        ),
        "delay_filter": pa.record_batch({"dep_delay": rng.integers(-30, 300, rows)}),
        "pii_masker": pa.record_batch({"value": [f"N{i:05d}XYZ" for i in range(rows)]}),
    }
    needed = {}
    for name, batch in inputs.items():
        plugin = build_copy(EXAMPLES / name, scratch)
        loaded = load_manifest(plugin)
        wasm = loaded.module_path.read_bytes()
        assert check_module(loaded, inspect_module(wasm)) == []
        function = loaded.manifest.exports.process
        data = encode_batch(batch)

        def works(
            pages: int,
            wasm: bytes = wasm,
            function: str = function,
            data: np.ndarray = data,
        ) -> bool:
            try:
                with PluginRuntime(
                    RuntimeSettings(name="m", wasm=wasm, memory_max_pages=pages)
                ) as runtime:
                    runtime.call(function, data)
            except (PluginLoadError, PluginCallError):
                return False
            return True

        needed[name] = smallest_pages(works, 1, DEFAULT_MEMORY_MAX_PAGES)
    assert max(needed.values()) * 2 <= DEFAULT_MEMORY_MAX_PAGES, needed


# --- directories, granted or not (needs the Zig toolchain) -------------------

READ_FILE_C = """
#include <stdio.h>
#include "dataflare_plugin.h"
DF_EXPORT("read") int32_t read_file(void) {
    FILE *f = fopen("/data/greeting.txt", "r");
    if (f == NULL) return df_fail("cannot open /data/greeting.txt");
    char text[64] = {0};
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    return df_output(text, n);
}
"""


def test_allowed_paths_granted_only(tmp_path: Path) -> None:
    require_toolchain("c")
    plugin = tmp_path / "reader"
    plugin.mkdir()
    (plugin / "reader.c").write_text(READ_FILE_C)
    write_plugin(
        plugin,
        "(module)",
        {
            "kind": "filter",
            "module": "reader.wasm",
            "exports": {"process": "read"},
            "permissions": {"allowed_paths": ["/data"]},
            "build": {"language": "c", "sources": ["reader.c"]},
        },
    )
    from dataflare.plugin.wasm.tooling import build_plugin

    wasm = build_plugin(plugin).read_bytes()
    loaded = load_manifest(plugin)
    info = inspect_module(wasm)
    assert "wasi_snapshot_preview1.path_open" in [i.qualified for i in info.imports]
    assert check_module(loaded, info) == []

    data = tmp_path / "shared"
    data.mkdir()
    (data / "greeting.txt").write_text("hello from the host")
    granted = RuntimeSettings(
        name="reader", wasm=wasm, wasi=True, allowed_paths={str(data): "/data"}
    )
    with PluginRuntime(granted) as runtime:
        assert bytes(runtime.call("read", b"")) == b"hello from the host"
    refused = RuntimeSettings(name="reader", wasm=wasm, wasi=True)
    with (
        PluginRuntime(refused) as runtime,
        pytest.raises(PluginCallError, match=r"cannot open /data/greeting\.txt"),
    ):
        runtime.call("read", b"")


# --- output shapes: flat-maps and keep_input ------------------------------


def const_plugin(tmp_path: Path, output: bytes, **manifest: object) -> Path:
    """Write a plugin that returns the same output bytes for every batch."""
    body = (
        f"(call $output_set (call $emit (i32.const 1024) (i32.const {len(output)}))"
        f" (i64.const {len(output)})) (i32.const 0)"
    )
    return write_plugin(
        tmp_path / "const",
        wat_module(body, data=output),
        {"exports": {"process": "process"}, "fields": ["x"], **manifest},
    )


def run_once(plugin: Path, batch: pa.RecordBatch) -> tuple[list, list]:
    context = RecordingContext()
    transform = WasmTransform(WasmConfig(plugin=str(plugin)), context)
    schema = transform.output_schema([batch.schema])
    transform.open()
    out = transform.process(batch)
    transform.close()
    rows = pa.Table.from_batches(out, schema=schema).to_pylist() if out else []
    return rows, [reason for _, reason, _ in context.rejected]


def test_flat_map_row_carries_input(tmp_path: Path) -> None:
    output = encode_arrays(
        {"_row": pa.array([0, 0, 1]), "part": pa.array(["a", "b", "c"])}
    )
    plugin = const_plugin(
        tmp_path,
        output,
        kind="flat_map",
        outputs=[{"name": "part", "type": "utf8"}],
    )
    batch = pa.record_batch({"x": [10, 20], "y": ["p", "q"]})
    rows, rejected = run_once(plugin, batch)
    assert rejected == []
    assert rows == [
        {"x": 10, "y": "p", "part": "a"},
        {"x": 10, "y": "p", "part": "b"},
        {"x": 20, "y": "q", "part": "c"},
    ]


def test_flat_map_without_input(tmp_path: Path) -> None:
    output = encode_arrays({"part": pa.array(["a", "b", "c"])})
    plugin = const_plugin(
        tmp_path,
        output,
        kind="flat_map",
        keep_input=False,
        outputs=[{"name": "part", "type": "utf8"}],
    )
    rows, rejected = run_once(plugin, pa.record_batch({"x": [1]}))
    assert rejected == []
    assert rows == [{"part": "a"}, {"part": "b"}, {"part": "c"}]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ([0, 5], "column '_row' names input row 5, but the batch has rows 0 to 1"),
        ([0, None], "column '_row' must be int64 without nulls"),
    ],
)
def test_flat_map_row_out_of_range(tmp_path: Path, row: list, reason: str) -> None:
    output = encode_arrays(
        {"_row": pa.array(row, pa.int64()), "part": pa.array(["a", "b"])}
    )
    plugin = const_plugin(
        tmp_path,
        output,
        kind="flat_map",
        outputs=[{"name": "part", "type": "utf8"}],
    )
    rows, rejected = run_once(plugin, pa.record_batch({"x": [1, 2]}))
    assert rows == []
    assert reason in rejected[0]


def test_flat_map_missing_row(tmp_path: Path) -> None:
    plugin = const_plugin(
        tmp_path,
        encode_arrays({"part": pa.array(["a"])}),
        kind="flat_map",
        outputs=[{"name": "part", "type": "utf8"}],
    )
    rows, rejected = run_once(plugin, pa.record_batch({"x": [1]}))
    assert rows == []
    assert "has no '_row' column" in rejected[0]


def test_map_without_input_keeps_stream_columns(tmp_path: Path) -> None:
    plugin = const_plugin(
        tmp_path,
        encode_arrays({"x": pa.array([2.5, None]), "label": pa.array(["a", "b"])}),
        kind="map",
        keep_input=False,
        outputs=[{"name": "label", "type": "utf8"}, {"name": "x", "type": "float64"}],
    )
    when = pa.array([1, 2], pa.timestamp("us", tz="UTC"))
    batch = pa.record_batch({"x": [1, 2], "y": ["p", "q"], "_event_time": when})
    rows, rejected = run_once(plugin, batch)
    assert rejected == []
    assert [list(r) for r in rows] == [["_event_time", "label", "x"]] * 2
    assert [(r["label"], r["x"]) for r in rows] == [("a", 2.5), ("b", None)]
