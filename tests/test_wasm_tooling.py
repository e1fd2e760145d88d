"""The functions behind `dataflare plugin new|build|validate|run|bench`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflare.plugin.wasm.manifest import ManifestError
from dataflare.plugin.wasm.testing import require_toolchain, wat_module, write_plugin
from dataflare.plugin.wasm.tooling import (
    BuildError,
    PluginRunError,
    bench_plugin,
    build_plugin,
    new_plugin,
    read_input,
    run_plugin,
    validate_plugin,
)


@pytest.fixture(scope="module", params=["c", "zig", "assemblyscript"])
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A new plugin from each language's template, built."""
    language = request.param
    require_toolchain(language)
    dest = tmp_path_factory.mktemp(f"new-{language}")
    plugin = new_plugin(language, "scaler", dest)
    assert plugin == dest / "scaler"
    problems = validate_plugin(plugin)
    assert len(problems) == 1
    assert "module scaler.wasm not found" in problems[0]
    assert "dataflare plugin build" in problems[0]
    module = build_plugin(plugin)
    assert module == plugin / "scaler.wasm"
    return plugin


def test_template_validates_when_built(template: Path) -> None:
    assert validate_plugin(template) == []


def test_run_plugin_matches_pandas(template: Path, tmp_path: Path) -> None:
    out = run_plugin(template, template / "sample.csv", {"factor": 3})
    frame = pd.read_csv(template / "sample.csv")
    assert out.column("id").to_pylist() == frame["id"].tolist()
    expected = [None if pd.isna(v) else v * 3 for v in frame["value"]]
    assert out.column("scaled").to_pylist() == expected


def test_run_plugin_reads_jsonl_and_parquet(template: Path, tmp_path: Path) -> None:
    table = pa.table({"value": [1, 2, None], "name": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text(
        '{"value": 1.5, "name": "a"}\n{"value": null, "name": "b"}\n'
    )
    assert run_plugin(template, tmp_path / "in.parquet", {}).column(
        "scaled"
    ).to_pylist() == [2.0, 4.0, None]
    assert run_plugin(template, tmp_path / "in.jsonl", {"factor": -1}).column(
        "scaled"
    ).to_pylist() == [-1.5, None]


def test_run_plugin_names_a_config_the_plugin_refuses(template: Path) -> None:
    with pytest.raises(
        ValueError, match=r"config\.factor: 'x' is not of type 'number'"
    ):
        run_plugin(template, template / "sample.csv", {"factor": "x"})


def test_bench_plugin_reports_rates(template: Path) -> None:
    figures = bench_plugin(template, rows=20_000, batch_rows=5_000)
    assert set(figures) == {
        "records_per_second",
        "batch_overhead_us",
        "batch_us",
        "rows",
        "batch_rows",
    }
    assert figures["rows"] == 20_000
    assert figures["records_per_second"] > 0
    assert figures["batch_overhead_us"] > 0


def test_new_plugin_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown plugin language 'rust'"):
        new_plugin("rust", "x", tmp_path)
    with pytest.raises(ValueError, match="must be lower-case letters"):
        new_plugin("c", "My-Plugin", tmp_path)
    new_plugin("c", "taken", tmp_path)
    with pytest.raises(ValueError, match="exists and is not empty"):
        new_plugin("c", "taken", tmp_path)


def test_build_errors_carry_the_compiler_output(tmp_path: Path) -> None:
    require_toolchain("c")
    plugin = new_plugin("c", "broken", tmp_path)
    (plugin / "broken.c").write_text("int32_t oops(void) { return undefined_name; }\n")
    with pytest.raises(BuildError) as info:
        build_plugin(plugin)
    assert "building plugin 'broken' (c) failed" in str(info.value)
    assert "undefined_name" in str(info.value)


def test_build_needs_a_build_section(tmp_path: Path) -> None:
    plugin = write_plugin(
        tmp_path / "prebuilt",
        wat_module("(call $keep_all)"),
        {"kind": "filter", "exports": {"process": "process"}},
    )
    with pytest.raises(ManifestError, match="has no build section"):
        build_plugin(plugin)
    assert validate_plugin(plugin) == []


def test_validate_lists_module_problems(tmp_path: Path) -> None:
    imports = (
        '(import "wasi_snapshot_preview1" "path_open" '
        "(func $o (param i32) (result i32)))"
    )
    plugin = write_plugin(
        tmp_path / "sneaky",
        wat_module("(call $keep_all)", imports=imports),
        {"kind": "filter", "exports": {"process": "filter_rows"}},
    )
    problems = validate_plugin(plugin)
    assert len(problems) == 2
    assert "imports wasi_snapshot_preview1.path_open" in problems[0]
    assert "does not export the function 'filter_rows'" in problems[1]
    (plugin / "dataflare-plugin.yaml").write_text("name: [unclosed")
    assert "cannot read plugin manifest" in validate_plugin(plugin)[0]


def test_run_plugin_reports_failed_batches(tmp_path: Path) -> None:
    plugin = write_plugin(
        tmp_path / "trapper",
        wat_module("unreachable"),
        {"kind": "filter", "exports": {"process": "process"}},
    )
    (tmp_path / "in.csv").write_text("x\n1\n2\n3\n")
    with pytest.raises(PluginRunError) as info:
        run_plugin(plugin, tmp_path / "in.csv", {}, batch_rows=2)
    message = str(info.value)
    assert "plugin 'trapper' failed on 2 of 2 batches" in message
    assert "2 records: wasm plugin 'trapper' (process): trapped" in message


def test_read_input_refuses_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"use a \.csv, \.jsonl or \.parquet file"):
        read_input(tmp_path / "data.xlsx")
    with pytest.raises(ValueError, match="cannot read"):
        read_input(tmp_path / "missing.csv")
