"""The plugin-side SDKs: the same echo plugin in C, Zig and AssemblyScript.

Each echo plugin reads every column of every type with its language's
batch reader and writes a copy with the batch writer (`<name>_copy`), and
a filter keeps the odd rows with the selection writer. Comparing the
copies with the input checks the readers, the writers and the builders
(nulls, growth past the first capacity, UTF-8) of all three SDKs.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from conftest import RecordingContext

from dataflare.plugin.wasm.testing import require_toolchain, write_plugin
from dataflare.plugin.wasm.tooling import build_plugin
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
COLUMNS = {"i": "int64", "f": "float64", "b": "bool", "s": "utf8", "t": "timestamp"}

C_ECHO = r"""
#include "dataflare_plugin.h"

DF_EXPORT("echo") int32_t echo(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    if (batch.column_count > 8) return df_fail("too many columns");
    df_writer out;
    df_writer_init(&out, batch.rows);
    df_utf8_builder texts[8];
    int text_count = 0;
    char names[8][64];
    for (uint32_t c = 0; c < batch.column_count; c++) {
        const df_column *col = &batch.columns[c];
        memcpy(names[c], col->name, col->name_length);
        memcpy(names[c] + col->name_length, "_copy", 6);
        switch (col->type) {
        case DF_INT64:
            df_writer_add_i64(&out, names[c], col->values, col->validity);
            break;
        case DF_TIMESTAMP:
            df_writer_add_timestamp(&out, names[c], col->values, col->validity);
            break;
        case DF_FLOAT64:
            df_writer_add_f64(&out, names[c], col->values, col->validity);
            break;
        case DF_BOOL:
            df_writer_add_bool(&out, names[c], col->values, col->validity);
            break;
        case DF_UTF8: {
            df_utf8_builder *b = &texts[text_count++];
            df_utf8_init(b, 0); /* start small: exercise the growth */
            for (uint32_t row = 0; row < batch.rows; row++) {
                if (df_is_null(col, row)) {
                    df_utf8_append_null(b);
                } else {
                    uint32_t length;
                    const char *text = df_get_str(col, row, &length);
                    df_utf8_append(b, text, length);
                }
            }
            df_writer_add_utf8(&out, names[c], b);
            break;
        }
        }
    }
    int32_t status = df_writer_output(&out);
    for (int i = 0; i < text_count; i++) df_utf8_release(&texts[i]);
    df_batch_release(&batch);
    return status;
}

DF_EXPORT("keep_odd") int32_t keep_odd(void) {
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    uint8_t *keep = df_bitmap_new(batch.rows);
    for (uint32_t row = 1; row < batch.rows; row += 2) df_bitmap_set(keep, row);
    int32_t status = df_output_selection(keep, batch.rows);
    free(keep);
    df_batch_release(&batch);
    return status;
}
"""

ZIG_ECHO = """
const std = @import("std");
const df = @import("dataflare");

export fn echo() i32 {
    return run() catch |err| df.fail(df.errorText(err));
}

fn run() df.Error!i32 {
    var batch = try df.Batch.input();
    defer batch.deinit();
    if (batch.columns.len > 8) return df.fail("too many columns");
    var out = df.Writer.init(batch.rows);
    var names: [8][]u8 = undefined;
    var named: usize = 0;
    defer for (names[0..named]) |name| df.allocator.free(name);
    var texts: [8]df.Utf8Builder = @splat(.{});
    var ints: [8]df.NumberBuilder(i64) = @splat(.{});
    var floats: [8]df.NumberBuilder(f64) = @splat(.{});
    var bools: [8]df.BoolBuilder = @splat(.{});
    defer for (0..8) |i| {
        texts[i].deinit();
        ints[i].deinit();
        floats[i].deinit();
        bools[i].deinit();
    };
    for (batch.columns, 0..) |*col, i| {
        names[i] = try std.mem.concat(df.allocator, u8, &.{ col.name, "_copy" });
        named += 1;
        var row: u32 = 0;
        switch (col.type) {
            .int64, .timestamp => {
                while (row < batch.rows) : (row += 1) {
                    if (col.isNull(row)) {
                        try ints[i].appendNull();
                    } else {
                        try ints[i].append(col.int64(row));
                    }
                }
                if (col.type == .int64) {
                    try out.addInt64(names[i], &ints[i]);
                } else {
                    try out.addTimestamp(names[i], &ints[i]);
                }
            },
            .float64 => {
                while (row < batch.rows) : (row += 1) {
                    if (col.isNull(row)) {
                        try floats[i].appendNull();
                    } else {
                        try floats[i].append(col.float64(row));
                    }
                }
                try out.addFloat64(names[i], &floats[i]);
            },
            .boolean => {
                while (row < batch.rows) : (row += 1) {
                    if (col.isNull(row)) {
                        try bools[i].appendNull();
                    } else {
                        try bools[i].append(@intFromBool(col.boolean(row)));
                    }
                }
                try out.addBool(names[i], &bools[i]);
            },
            .utf8 => {
                while (row < batch.rows) : (row += 1) {
                    if (col.isNull(row)) {
                        try texts[i].appendNull();
                    } else {
                        try texts[i].append(col.text(row));
                    }
                }
                try out.addUtf8(names[i], &texts[i]);
            },
        }
    }
    try out.output();
    return 0;
}

export fn keep_odd() i32 {
    var batch = df.Batch.input() catch |err| return df.fail(df.errorText(err));
    defer batch.deinit();
    const keep = df.bitmap(batch.rows) catch return df.fail("out of memory");
    defer df.allocator.free(keep);
    var row: u32 = 1;
    while (row < batch.rows) : (row += 2) df.setBit(keep, row);
    df.outputSelection(keep, batch.rows) catch return df.fail("out of memory");
    return 0;
}
"""

AS_ECHO = """
import {
  Batch, BatchWriter, Bitmap, BoolBuilder, Float64Builder, Int64Builder, Utf8Builder,
  BOOL, FLOAT64, INT64, TIMESTAMP, UTF8, outputSelection,
} from "dataflare";

export function echo(): i32 {
  const batch = Batch.input();
  const out = new BatchWriter(batch.rows);
  for (let c = 0; c < batch.columns.length; c++) {
    const col = batch.columns[c];
    const name = col.name + "_copy";
    if (col.type == INT64 || col.type == TIMESTAMP) {
      const b = new Int64Builder(0, col.type == TIMESTAMP);
      for (let row = 0; row < batch.rows; row++) {
        if (col.isNull(row)) b.appendNull(); else b.append(col.getI64(row));
      }
      out.add(name, b);
    } else if (col.type == FLOAT64) {
      const b = new Float64Builder(0);
      for (let row = 0; row < batch.rows; row++) {
        if (col.isNull(row)) b.appendNull(); else b.append(col.getF64(row));
      }
      out.add(name, b);
    } else if (col.type == BOOL) {
      const b = new BoolBuilder(0);
      for (let row = 0; row < batch.rows; row++) {
        if (col.isNull(row)) b.appendNull(); else b.append(col.getBool(row));
      }
      out.add(name, b);
    } else if (col.type == UTF8) {
      const b = new Utf8Builder(0);
      for (let row = 0; row < batch.rows; row++) {
        if (col.isNull(row)) b.appendNull(); else b.append(col.getString(row));
      }
      out.add(name, b);
    }
  }
  return out.output();
}

export function keep_odd(): i32 {
  const batch = Batch.input();
  const keep = new Bitmap(batch.rows);
  for (let row = 1; row < batch.rows; row += 2) keep.set(row);
  return outputSelection(keep, batch.rows);
}
"""

SOURCES = {
    "c": ("echo.c", C_ECHO),
    "zig": ("echo.zig", ZIG_ECHO),
    "assemblyscript": ("echo.ts", AS_ECHO),
}


@pytest.fixture(scope="module", params=["c", "zig", "assemblyscript"])
def echo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    language = request.param
    require_toolchain(language)
    directory = tmp_path_factory.mktemp(f"echo-{language}")
    source, text = SOURCES[language]
    (directory / source).write_text(text)
    if language == "assemblyscript":
        for name in ("package.json", "package-lock.json"):
            shutil.copy(EXAMPLES / "running_total" / name, directory / name)
    fields = list(COLUMNS)
    build = {"language": language, "sources": [source]}
    write_plugin(
        directory,
        "(module)",
        {
            "kind": "map",
            "module": "echo.wasm",
            "exports": {"process": "echo"},
            "fields": fields,
            "outputs": [{"name": f"{n}_copy", "type": t} for n, t in COLUMNS.items()],
            "build": build,
        },
    )
    build_plugin(directory)
    manifest = yaml.safe_load((directory / "dataflare-plugin.yaml").read_text())
    manifest.update(kind="filter", exports={"process": "keep_odd"})
    del manifest["outputs"]
    (directory / "keep_odd.yaml").write_text(yaml.safe_dump(manifest))
    return directory


def sample(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = ["", "héllo", "日本語", "x" * 300, "plain", "ünïcödé ✓"]

    def nulls() -> np.ndarray:
        return rng.random(rows) < 0.2

    start = dt.datetime(2013, 1, 1, tzinfo=dt.UTC)
    return pa.table(
        {
            "i": pa.array(rng.integers(-(2**62), 2**62, rows), mask=nulls()),
            "f": pa.array(rng.normal(size=rows) * 1e6, mask=nulls()),
            "b": pa.array(rng.random(rows) < 0.5, mask=nulls()),
            "s": pa.array(
                [words[k] for k in rng.integers(0, len(words), rows)], mask=nulls()
            ),
            "t": pa.array(
                [
                    start + dt.timedelta(microseconds=int(k))
                    for k in rng.integers(0, 10**12, rows)
                ],
                pa.timestamp("us", tz="UTC"),
                mask=nulls(),
            ),
        }
    )


def run(plugin: Path, table: pa.Table, batch_rows: int) -> pa.Table:
    context = RecordingContext()
    transform = WasmTransform(WasmConfig(plugin=str(plugin)), context)
    schema = transform.output_schema([table.schema])
    transform.open()
    out = []
    for batch in table.to_batches(max_chunksize=batch_rows):
        out.extend(transform.process(batch))
    transform.close()
    assert context.rejected == []
    return pa.Table.from_batches(out, schema=schema)


@pytest.mark.parametrize(("rows", "batch_rows"), [(11, 4), (5_000, 5_000)])
def test_echo_copies_every_type_exactly(echo: Path, rows: int, batch_rows: int) -> None:
    table = sample(rows, rows)
    out = run(echo, table, batch_rows)
    for name in COLUMNS:
        assert out.column(f"{name}_copy").equals(table.column(name)), name


def test_selection_writer_keeps_the_rows_asked_for(echo: Path) -> None:
    table = sample(21, 1).append_column("id", pa.array(range(21)))
    out = run(echo / "keep_odd.yaml", table, 10)
    # Batches of 10, 10 and 1 rows: odd rows of each batch.
    assert out.column("id").to_pylist() == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
