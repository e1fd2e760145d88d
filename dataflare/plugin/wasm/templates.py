"""Starting points written by `dataflare plugin new`, one per language.

Each template is a working map plugin. It multiplies the numeric field
`value` by the config's `factor` (2 by default) into a new float64 column
`scaled`, and a null value gives a null. It comes with a manifest and a
sample input, so `build`, `validate`, `run` and `bench` work on it at once.
"""

from __future__ import annotations

SAMPLE_CSV = """id,value
1,1.5
2,-4
3,
4,10
"""

MANIFEST = """\
name: {name}
version: 0.1.0
kind: map
description: Multiply value by factor into scaled.
author: ""
license: ""
module: {name}.wasm
exports: {{process: process, open: open}}
batch_encoding: 1
fields: [value]
outputs:
  - {{name: scaled, type: float64, description: value times factor}}
permissions:
  memory_max_pages: 1024
  timeout_ms: 1000
  allowed_paths: []
  allowed_hosts: []
config_schema:
  type: object
  additionalProperties: false
  properties:
    factor: {{type: number, default: 2, description: What value is multiplied by}}
build:
  language: {language}
  sources: [{source}]
test:
  input: sample.csv
  config: {{factor: 2}}
"""

C_SOURCE = """\
/* {name}: scaled = value * factor. */
#include "dataflare_plugin.h"

static double factor = 2;

/* Called once per instance, before the first batch: read the config. */
DF_EXPORT("open") int32_t plugin_open(void) {{
    if (df_config_number("factor", &factor) < 0)
        return df_fail("config factor must be a number");
    return 0;
}}

/* Called once per batch. */
DF_EXPORT("process") int32_t process(void) {{
    df_batch batch;
    if (df_batch_input(&batch) != 0) return df_fail(df_last_error());
    const df_column *value = df_batch_column(&batch, "value");
    if (value == NULL || (value->type != DF_INT64 && value->type != DF_FLOAT64)) {{
        df_batch_release(&batch);
        return df_fail("the batch has no numeric column value");
    }}
    double *scaled = (double *)malloc(8 * (size_t)batch.rows + 8);
    if (scaled == NULL) {{
        df_batch_release(&batch);
        return df_fail("out of memory");
    }}
    for (uint32_t row = 0; row < batch.rows; row++)
        scaled[row] = df_is_null(value, row) ? 0 : df_get_number(value, row) * factor;
    df_writer out;
    df_writer_init(&out, batch.rows);
    /* Nulls stay null: reuse the input's validity bitmap. */
    df_writer_add_f64(&out, "scaled", scaled, value->validity);
    int32_t status = df_writer_output(&out);
    free(scaled);
    df_batch_release(&batch);
    return status;
}}
"""

ZIG_SOURCE = """\
//! {name}: scaled = value * factor.
const std = @import("std");
const df = @import("dataflare");

var factor: f64 = 2;

/// Called once per instance, before the first batch: read the config.
export fn open() i32 {{
    const found = df.config("factor") catch return df.fail("out of memory");
    const text = found orelse return 0;
    defer df.allocator.free(text);
    factor = std.fmt.parseFloat(f64, text) catch
        return df.fail("config factor must be a number");
    return 0;
}}

/// Called once per batch.
export fn process() i32 {{
    return run() catch |err| df.fail(df.errorText(err));
}}

fn run() df.Error!i32 {{
    var batch = try df.Batch.input();
    defer batch.deinit();
    const value = batch.column("value") orelse
        return df.fail("the batch has no column value");
    if (value.type != .int64 and value.type != .float64)
        return df.fail("column value must be numeric");
    var scaled = df.NumberBuilder(f64){{}};
    defer scaled.deinit();
    var row: u32 = 0;
    while (row < batch.rows) : (row += 1) {{
        if (value.isNull(row)) {{
            try scaled.appendNull();
        }} else {{
            try scaled.append(value.number(row) * factor);
        }}
    }}
    var out = df.Writer.init(batch.rows);
    try out.addFloat64("scaled", &scaled);
    try out.output();
    return 0;
}}
"""

ASSEMBLYSCRIPT_SOURCE = """\
// {name}: scaled = value * factor.
import {{
  Batch, BatchWriter, Float64Builder, FLOAT64, INT64, config, fail,
}} from "dataflare";

let factor: f64 = 2;

/** Called once per instance, before the first batch: read the config. */
export function open(): i32 {{
  const text = config("factor");
  if (text !== null) {{
    factor = parseFloat(text);
    if (isNaN(factor)) return fail("config factor must be a number");
  }}
  return 0;
}}

/** Called once per batch. */
export function process(): i32 {{
  const batch = Batch.input();
  const value = batch.column("value");
  if (value === null || (value.type != INT64 && value.type != FLOAT64)) {{
    return fail("the batch has no numeric column value");
  }}
  const scaled = new Float64Builder(batch.rows);
  for (let row = 0; row < batch.rows; row++) {{
    if (value.isNull(row)) scaled.appendNull();
    else scaled.append(value.getNumber(row) * factor);
  }}
  return new BatchWriter(batch.rows).add("scaled", scaled).output();
}}
"""

PACKAGE_JSON = """\
{{
  "name": "{package}",
  "version": "0.1.0",
  "private": true,
  "devDependencies": {{
    "@extism/as-pdk": "1.0.0",
    "assemblyscript": "0.28.20"
  }}
}}
"""

GITIGNORE = "*.wasm\nnode_modules/\n"


def files(language: str, name: str) -> dict[str, str]:
    """Return the template's files for `language`: file name -> text."""
    source = {
        "c": f"{name}.c",
        "zig": f"{name}.zig",
        "assemblyscript": f"{name}.ts",
    }[language]
    text = {
        "c": C_SOURCE,
        "zig": ZIG_SOURCE,
        "assemblyscript": ASSEMBLYSCRIPT_SOURCE,
    }[language].format(name=name)
    out = {
        "dataflare-plugin.yaml": MANIFEST.format(
            name=name, language=language, source=source
        ),
        source: text,
        "sample.csv": SAMPLE_CSV,
        ".gitignore": GITIGNORE,
    }
    if language == "assemblyscript":
        out["package.json"] = PACKAGE_JSON.format(package=name.replace("_", "-"))
    return out
