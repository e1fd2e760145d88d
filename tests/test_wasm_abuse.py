"""Plugins that misbehave: each failure is named, contained and survived.

A plugin may trap, loop forever, allocate without bound, overflow its
stack, return malformed output or report an error. The records of that
batch are then rejected with a reason naming the plugin, and the batches
before and after it are processed. A plugin that imports a capability it
did not declare, or whose module is corrupt, is rejected before the run.
The abusive modules are built here from WAT text (and from C, when the Zig
toolchain is installed).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import api
from dataflare.plugin.interface import ConfigError
from dataflare.plugin.registry import PluginRegistry
from dataflare.plugin.wasm.encoding import encode_arrays
from dataflare.plugin.wasm.testing import require_toolchain, wat_module, write_plugin
from dataflare.plugin.wasm.tooling import build_plugin
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform
from dataflare.streaming.errors import PipelineRunError, PipelineValidationError

REFUSAL = b"refusing this batch"

# The first value of the `mode` column picks the misbehaviour.
ABUSER = wat_module(
    f"""
    (local $mode i64)
    (local.set $mode (call $first_value))
    (if (i64.eq (local.get $mode) (i64.const 1)) (then unreachable))
    (if (i64.eq (local.get $mode) (i64.const 2)) (then (loop $spin (br $spin))))
    (if (i64.eq (local.get $mode) (i64.const 3))
      (then (loop $grow (drop (memory.grow (i32.const 16))) (br $grow))))
    (if (i64.eq (local.get $mode) (i64.const 4))
      (then (call $output_set (call $emit (i32.const 1024) (i32.const 8)) (i64.const 8))
            (return (i32.const 0))))
    (if (i64.eq (local.get $mode) (i64.const 5))
      (then (call $error_set (call $emit (i32.const 1040) (i32.const {len(REFUSAL)})))
            (return (i32.const 1))))
    (if (i64.eq (local.get $mode) (i64.const 6))
      (then (call $output_set (call $emit (i32.const 1032) (i32.const 8)) (i64.const 8))
            (return (i32.const 0))))
    (if (i64.eq (local.get $mode) (i64.const 7))
      (then (drop (call $recurse (i32.const 0)))))
    (if (i64.eq (local.get $mode) (i64.const 8))
      (then (call $output_set (i64.const 0xFFFFFFF0) (i64.const 0x7FFFFFFF))
            (return (i32.const 0))))
    (call $keep_all)""",
    data=b"XXXXXXXX" + b"DFS1" + struct.pack("<I", 999_999) + REFUSAL,
    functions="""(func $recurse (param i32) (result i32)
        (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1)))
                 (i32.const 1)))""",
)

REASONS = {
    1: "trapped (a WebAssembly runtime error)",
    2: "timed out: one call ran longer than the 300 ms limit",
    3: "ran out of memory: it tried to grow its memory past the limit of 64 pages",
    4: "returned malformed output: the filter's output does not start with 'DFS1'",
    5: "returned an error: refusing this batch",
    6: "returned malformed output: the selection vector is for 999999 rows",
    7: "trapped (a WebAssembly runtime error)",
    8: "returned malformed output: the filter's output is 0 bytes long",
}


@pytest.fixture
def abuser(tmp_path: Path) -> Path:
    return write_plugin(
        tmp_path / "abuser",
        ABUSER,
        {
            "kind": "filter",
            "exports": {"process": "process"},
            "fields": ["mode"],
            "permissions": {"timeout_ms": 300, "memory_max_pages": 64},
        },
    )


def batches(modes: list[int], rows: int = 3) -> list[pa.RecordBatch]:
    out = []
    for index, mode in enumerate(modes):
        ids = list(range(index * rows, (index + 1) * rows))
        out.append(pa.record_batch({"mode": [mode] * rows, "id": ids}))
    return out


def test_abuse_each_failure_rejects_batch(
    abuser: Path,
) -> None:
    modes = [0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0]
    context = RecordingContext("abuse")
    transform = WasmTransform(WasmConfig(plugin=str(abuser)), context)
    transform.output_schema([batches([0])[0].schema])
    transform.open()
    kept: list[int] = []
    for batch in batches(modes):
        for out in transform.process(batch):
            kept.extend(out.column("id").to_pylist())
    transform.close()

    good = [i for i, mode in enumerate(modes) if mode == 0]
    assert kept == [3 * i + r for i in good for r in range(3)]
    bad = [mode for mode in modes if mode != 0]
    assert len(context.rejected) == 3 * len(bad)
    for n, mode in enumerate(bad):
        for row, reason, _ in context.rejected[3 * n : 3 * n + 3]:
            assert row["mode"] == mode
            assert reason.startswith("wasm plugin 'abuser'")
            assert REASONS[mode] in reason, (mode, reason)
    assert context.counters["wasm_errors"] == len(bad)
    assert context.counters["wasm_calls"] == len(modes)


def registry() -> PluginRegistry:
    registry = PluginRegistry.from_entry_points()
    registry.register("wasm", WasmTransform)
    return registry


def pipeline(
    tmp_path: Path, plugin: Path, modes: list[int], **errors: Any
) -> api.Pipeline:
    p = api.Pipeline("abuse").use_registry(registry())
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")}, **errors)
    p.execution(max_batch_rows=3)
    rows = pa.Table.from_batches(batches(modes))
    source = p.source("rows", "memory", records=rows, batch_rows=3)
    step = p.transform("guarded", "wasm", [source], plugin=str(plugin))
    p.destination("out", "memory", [step])
    return p


def test_failing_batches_reach_the_dead_letter_output(
    abuser: Path, tmp_path: Path
) -> None:
    modes = [0, 1, 0, 3, 5, 0]
    summary = pipeline(tmp_path, abuser, modes).run()

    assert summary.status == "completed"
    assert sorted(summary.output("out").column("id").to_pylist()) == [
        0,
        1,
        2,
        6,
        7,
        8,
        15,
        16,
        17,
    ]
    lines = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    assert sorted(line["record"]["id"] for line in lines) == list(range(3, 6)) + list(
        range(9, 15)
    )
    for line in lines:
        assert line["step"] == "guarded"
        assert line["reason"].startswith("wasm plugin 'abuser'")
        assert REASONS[line["record"]["mode"]] in line["reason"]
    assert summary.rejected == 9


def test_abuse_fail_policy_stops_run(abuser: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineRunError) as info:
        pipeline(tmp_path, abuser, [0, 0, 2, 0], policy="fail").run()
    message = str(info.value)
    assert "wasm plugin 'abuser'" in message
    assert "timed out" in message


def map_plugin(tmp_path: Path, output: bytes, **manifest: Any) -> Path:
    return write_plugin(
        tmp_path / "mapper",
        wat_module(
            f"(call $output_set (call $emit (i32.const 1024) (i32.const {len(output)}))"
            f" (i64.const {len(output)})) (i32.const 0)",
            data=output,
        ),
        {
            "kind": "map",
            "exports": {"process": "process"},
            "fields": ["x"],
            "outputs": [{"name": "label", "type": "utf8"}],
            **manifest,
        },
    )


def bad_utf8() -> bytes:
    good = bytearray(encode_arrays({"label": pa.array(["ok", "ok"])}))
    start = struct.unpack_from("<I", good, 16 + 4)[0]
    good[start + 16] = 0xFF
    return bytes(good)


def flagged() -> bytes:
    data = bytearray(encode_arrays({"label": pa.array(["a", "b"])}))
    data[6] = 1
    return bytes(data)


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (
            encode_arrays({"label": pa.array(["a", "b", "c"])}),
            "a map must return as many rows as it got: 2 in, 3 out",
        ),
        (
            encode_arrays({"label": pa.array(["a", "b"]), "extra": pa.array([1, 2])}),
            "has undeclared column(s) extra",
        ),
        (
            encode_arrays({"other": pa.array(["a", "b"])}),
            "lacks declared column(s) label",
        ),
        (
            encode_arrays({"label": pa.array([1, 2])}),
            "output column 'label' has type int64; the manifest declares utf8",
        ),
        (bad_utf8(), "output column 'label' is not a valid utf8 column"),
        (flagged(), "the output's flags are 1"),
        (b"DFB2" + bytes(12), "encoding version '2'"),
    ],
)
def test_malformed_map_output_is_rejected(
    tmp_path: Path, output: bytes, reason: str
) -> None:
    plugin = map_plugin(tmp_path, output)
    context = RecordingContext("map")
    transform = WasmTransform(WasmConfig(plugin=str(plugin)), context)
    transform.output_schema([pa.schema([("x", pa.int64())])])
    transform.open()
    assert transform.process(pa.record_batch({"x": [1, 2]})) == []
    transform.close()
    assert len(context.rejected) == 2
    assert reason in context.rejected[0][1]
    assert context.rejected[0][1].startswith(
        "wasm plugin 'mapper' returned malformed output"
    )


@pytest.mark.parametrize(
    ("module", "name", "signature"),
    [
        (
            "wasi_snapshot_preview1",
            "path_open",
            "(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)",
        ),
        ("extism:host/env", "http_request", "(param i64 i64) (result i64)"),
        ("env", "system", "(param i32) (result i32)"),
    ],
)
def test_undeclared_capability_rejected(
    tmp_path: Path, module: str, name: str, signature: str
) -> None:
    imports = f'(import "{module}" "{name}" (func $capability {signature}))'
    plugin = write_plugin(
        tmp_path / "sneaky",
        wat_module("(call $keep_all)", imports=imports),
        {"kind": "filter", "exports": {"process": "process"}},
    )
    with pytest.raises(PipelineValidationError) as info:
        pipeline(tmp_path, plugin, [0]).build()
    message = str(info.value)
    assert "plugin 'sneaky' cannot be used" in message
    assert f"imports {module}.{name}" in message
    assert not (tmp_path / "dead.jsonl").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda wasm: wasm[: len(wasm) // 2], "is not a valid WebAssembly module"),
        (lambda wasm: b"\0asm" + b"\xff" * 40, "is not a valid WebAssembly module"),
        (lambda wasm: b"#!/bin/sh\nrm -rf /\n", "is not a WebAssembly module"),
    ],
)
def test_corrupt_module_rejected(tmp_path: Path, damage: Any, message: str) -> None:
    plugin = write_plugin(
        tmp_path / "broken",
        wat_module("(call $keep_all)"),
        {"kind": "filter", "exports": {"process": "process"}},
    )
    module = plugin / "plugin.wasm"
    module.write_bytes(damage(module.read_bytes()))
    transform = WasmTransform(WasmConfig(plugin=str(plugin)), RecordingContext())
    with pytest.raises(ConfigError) as info:
        transform.output_schema([pa.schema([("mode", pa.int64())])])
    assert "plugin 'broken'" in str(info.value)
    assert message in str(info.value)
    assert info.value.where == "plugin"


ABUSIVE_C = r"""
#include <string.h>
#include "dataflare_plugin.h"

static volatile int sink;
static char *volatile last;

static int deep(int n) {               /* recursion without end */
    volatile char frame[256];
    frame[0] = (char)n;
    return deep(n + 1) + frame[0];
}

DF_EXPORT("process") int32_t process(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    const df_column *mode = df_batch_column(&batch, "mode");
    int64_t m = df_get_i64(mode, 0);
    if (m == 1) {                      /* write far outside linear memory */
        *(volatile int *)(uintptr_t)0xFFFFFFF0u = 1;
    } else if (m == 2) {               /* never return */
        for (;;) sink++;
    } else if (m == 3) {               /* allocate (and touch) without bound */
        for (;;) {
            char *p = malloc(1 << 20);
            if (p == NULL) return df_fail("malloc returned NULL");
            memset(p, 1, 1 << 20);
            last = p;                  /* kept, so the allocation stays */
        }
    } else if (m == 4) {               /* overflow the stack */
        sink = deep(0);
    }
    uint8_t *keep = df_bitmap_new(batch.rows);
    for (uint32_t i = 0; i < batch.rows; i++) df_bitmap_set(keep, i);
    int32_t status = df_output_selection(keep, batch.rows);
    free(keep);
    df_batch_release(&batch);
    return status;
}
"""


def test_abusive_c_plugin_is_contained(tmp_path: Path) -> None:
    require_toolchain("c")
    plugin = tmp_path / "rogue"
    plugin.mkdir()
    (plugin / "rogue.c").write_text(ABUSIVE_C)
    write_plugin(
        plugin,
        "(module)",
        {
            "kind": "filter",
            "module": "rogue.wasm",
            "exports": {"process": "process"},
            "fields": ["mode"],
            "permissions": {"timeout_ms": 300, "memory_max_pages": 128},
            "build": {"language": "c", "sources": ["rogue.c"]},
        },
    )
    build_plugin(plugin)
    modes = [0, 1, 0, 2, 0, 3, 0, 4, 0]
    summary = pipeline(tmp_path, plugin, modes).run()
    assert summary.status == "completed"
    assert len(summary.output("out")) == 3 * modes.count(0)
    lines = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    reasons = {line["record"]["mode"]: line["reason"] for line in lines}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "trapped" in reasons[1]
    assert "timed out" in reasons[2]
    assert "ran out of memory" in reasons[3]
    assert "trapped" in reasons[4]
    assert all(r.startswith("wasm plugin 'rogue'") for r in reasons.values())
