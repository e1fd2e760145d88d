"""Start-up: the built-in plugin table, lazy entry-point scans, lazy imports."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import yaml

import dataflare
from dataflare.cli.main import RUNTIME_DEFAULTS
from dataflare.plugin import registry as registry_module
from dataflare.plugin.registry import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginNotFoundError,
    PluginOrigin,
    PluginRegistry,
    builtin_section,
    section_for,
)
from dataflare.streaming import loader
from dataflare.streaming.errors import PipelineValidationError
from dataflare.streaming.loader import LoadedFile, PipelineYamlLoader

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = """
id: startup
sources:
  rows:
    type: jsonl
    config: {{path: {data}, schema: {{n: int, name: string}}}}
transformations:
  big:
    type: filter
    inputs: [rows]
    config: {{condition: "n > 1"}}
destinations:
  out:
    type: jsonl
    inputs: [big]
    config: {{path: {out}}}
"""


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


# --- the built-in table ------------------------------------------------------------


def test_builtin_table_matches_pyproject() -> None:
    declared = pyproject()["project"]["entry-points"][ENTRY_POINT_GROUP]

    assert declared == BUILTIN_PLUGINS


def test_version_matches_pyproject() -> None:
    # Built-in plugins are listed as "dataflare <__version__> (module:Class)".
    assert dataflare.__version__ == pyproject()["project"]["version"]


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_resolves_to_declared_class(name: str) -> None:
    value = BUILTIN_PLUGINS[name]
    module, _, attribute = value.partition(":")
    declared = getattr(importlib.import_module(module), attribute)
    section, type_name = builtin_section(name, value)

    cls = PluginRegistry.from_entry_points().get(section, type_name)

    assert cls is declared
    assert section_for(cls) == section


def test_builtin_source_names_distribution() -> None:
    entry = PluginRegistry.from_entry_points().entry("transformations", "filter")

    assert entry is not None
    assert entry.origin is PluginOrigin.BUILTIN
    assert entry.source == (
        f"dataflare {dataflare.__version__} "
        "(dataflare.transforms.filter:FilterTransform)"
    )


# --- entry points of installed distributions, scanned on demand ---------------------


class FakeMetadata:
    """Stands in for `importlib.metadata.entry_points`, counting the scans."""

    def __init__(self, found: list[EntryPoint]) -> None:
        self.found = found
        self.scans = 0

    def __call__(self, *, group: str) -> list[EntryPoint]:
        assert group == ENTRY_POINT_GROUP
        self.scans += 1
        return list(self.found)


PLUGIN_MODULE = """
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.plugin.interface import PluginConfig, PluginKind, PluginMetadata
from dataflare.plugin.kinds import MapPlugin


class Double(MapPlugin[PluginConfig]):
    metadata = PluginMetadata("double", PluginKind.MAP, "Double field n")

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        index = batch.schema.get_field_index("n")
        return batch.set_column(index, "n", pc.multiply(batch.column("n"), 2))
"""


@pytest.fixture
def third_party(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeMetadata]:
    """A third-party entry point `double`, found by a fake metadata scan."""
    (tmp_path / "startup_test_plugins.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint("double", "startup_test_plugins:Double", ENTRY_POINT_GROUP)
    fake = FakeMetadata([ep])
    monkeypatch.setattr(registry_module, "entry_points", fake)
    yield fake
    sys.modules.pop("startup_test_plugins", None)


def test_builtin_lookup_scans_no_metadata(third_party: FakeMetadata) -> None:
    registry = PluginRegistry.from_entry_points()

    registry.get("transformations", "filter")
    registry.get("sources", "jsonl")
    registry.get("destinations", "jsonl")

    assert third_party.scans == 0


def test_unknown_name_scans_metadata_once(third_party: FakeMetadata) -> None:
    registry = PluginRegistry.from_entry_points()

    cls = registry.get("transformations", "double")
    with pytest.raises(PluginNotFoundError, match="unknown transformation type"):
        registry.get("transformations", "triple")

    assert cls.__name__ == "Double"
    assert third_party.scans == 1


def test_listing_includes_third_party(third_party: FakeMetadata) -> None:
    registry = PluginRegistry.from_entry_points()

    names = registry.names("transformations")
    entry = registry.entry("transformations", "double")

    assert "double" in names
    assert "filter" in names
    assert entry is not None
    assert entry.origin is PluginOrigin.ENTRY_POINT
    assert third_party.scans == 1


def test_scanned_name_clash_keeps_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint("filter", "other_package.plugins:Filter", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry_module, "entry_points", FakeMetadata([ep]))
    registry = PluginRegistry.from_entry_points()

    clashes = registry.clashes

    assert len(clashes) == 1
    assert clashes[0].entry.source == "other_package.plugins:Filter"
    assert registry.get("transformations", "filter").__name__ == "FilterTransform"


def test_registered_class_replaces_scanned_entry(third_party: FakeMetadata) -> None:
    # As before the scan was deferred: a class registered in code replaces an
    # entry point of the same name, with no clash.
    registry = PluginRegistry.from_entry_points()
    replacement = registry.get("transformations", "filter")

    registry.register("double", replacement)

    assert registry.get("transformations", "double") is replacement
    assert registry.clashes == []
    assert third_party.scans == 1


def test_empty_registry_never_scans(third_party: FakeMetadata) -> None:
    registry = PluginRegistry()

    assert registry.names("transformations") == []
    assert registry.entry("transformations", "double") is None
    assert third_party.scans == 0


# --- the package and the command import the engine only when they need it -----------

ENGINE = (
    "dataflare.streaming.executor",
    "dataflare.streaming.runner",
    "polars",
    "pandas",
)


def loaded_after(code: str) -> set[str]:
    """Run `code` in a fresh interpreter; return the modules it imported."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def invoke(*args: str) -> str:
    return textwrap.dedent(
        f"""
        from click.testing import CliRunner
        from dataflare.cli.main import cli
        result = CliRunner().invoke(cli, {list(args)!r})
        assert result.exit_code == 0, result.output
        """
    )


def test_import_dataflare_is_light() -> None:
    loaded = loaded_after("import dataflare")

    for module in ("pyarrow", "pydantic", "dataflare.api", *ENGINE):
        assert module not in loaded


def test_help_loads_no_engine() -> None:
    loaded = loaded_after(invoke("--help"))

    for module in ("pyarrow", "pydantic", "rich", "fsspec", *ENGINE):
        assert module not in loaded


def test_plugin_list_loads_no_engine() -> None:
    loaded = loaded_after(invoke("plugin", "list"))

    assert "dataflare.transforms.filter" in loaded  # every plugin is imported
    for module in ENGINE[:2]:
        assert module not in loaded


def test_schema_loads_no_engine() -> None:
    loaded = loaded_after(invoke("schema"))

    for module in ENGINE[:2]:
        assert module not in loaded


def test_validate_loads_no_engine(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"n": 1, "name": "a"}\n{"n": 2, "name": "b"}\n')
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(data=data, out=tmp_path / "out.jsonl"))

    loaded = loaded_after(invoke("validate", str(pipeline)))

    for module in ENGINE[:2]:
        assert module not in loaded


WINDOWED = """
id: windowed
sources:
  rows:
    type: jsonl
    config: {{path: {data}, schema: {{n: int, name: string, ts: timestamp}}}}
    event_time: {{field: ts}}
transformations:
  hourly:
    type: window
    inputs: [rows]
    config:
      size: 1h
      key_by: [name]
      aggregations: {{count: {{fn: count}}, total: {{fn: sum, field: n}}}}
destinations:
  out:
    type: jsonl
    inputs: [hourly]
    config: {{path: {out}}}
"""


def write_rows(path: Path, count: int) -> None:
    lines = [
        json.dumps(
            {"n": i, "name": "ab"[i % 2], "ts": f"2024-01-01T{i % 24:02d}:00:00Z"}
        )
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_step_modules_load_no_polars() -> None:
    loaded = loaded_after(
        "import dataflare.connectors.files.jsonl, dataflare.transforms.filter, "
        "dataflare.transforms.sql"
    )

    assert "dataflare.transforms.expressions" in loaded
    assert "polars" not in loaded


def test_simple_steps_run_without_pandas(tmp_path: Path) -> None:
    # The steps themselves, without the executor.
    data = tmp_path / "rows.jsonl"
    write_rows(data, 200)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, "tests")
        from conftest import RecordingContext
        from dataflare.connectors.files.jsonl import (
            JsonLinesSink, JsonLinesSinkConfig, JsonLinesSource,
            JsonLinesSourceConfig,
        )
        from dataflare.transforms.filter import FilterConfig, FilterTransform
        from dataflare.transforms.sql import SqlConfig, SqlTransform

        config = {{"path": {str(data)!r}, "schema": {{"n": "int", "name": "string"}}}}
        source = JsonLinesSource(
            JsonLinesSourceConfig.model_validate(config), RecordingContext()
        )
        condition = FilterConfig(condition="n > 1 AND name IS NOT NULL")
        keep = FilterTransform(condition, RecordingContext())
        query = SqlConfig(query="SELECT name, n * 2 AS twice FROM input")
        double = SqlTransform(query, RecordingContext())
        sink_config = JsonLinesSinkConfig(path={str(tmp_path / "out.jsonl")!r})
        sink = JsonLinesSink(sink_config, RecordingContext())
        schema = double.output_schema([keep.output_schema([source.schema()])])
        sink.input_schema = schema
        source.open(); keep.open(); double.open(); sink.open()
        for item in source.read():
            for kept in keep.process(item.batch):
                for out in double.process(kept):
                    sink.write(out)
        sink.flush(); sink.close(); source.close()
        """
    )

    loaded = loaded_after(code)

    written = (tmp_path / "out.jsonl").read_text().splitlines()
    expected = [{"name": "ab"[n % 2], "twice": 2 * n} for n in range(2, 200)]
    assert [json.loads(line) for line in written] == expected
    assert "pandas" not in loaded


def test_window_run_loads_neither_pandas_nor_polars(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write_rows(data, 48)
    pipeline = tmp_path / "pipeline.yaml"
    out = tmp_path / "out.jsonl"
    pipeline.write_text(WINDOWED.format(data=data, out=out))

    loaded = loaded_after(invoke("run", str(pipeline), "--no-progress"))

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Hour h contains records h and h + 24, both with name "ab"[h % 2].
    assert [row["count"] for row in rows] == [2] * 24
    assert [row["total"] for row in rows] == [2 * h + 24 for h in range(24)]
    assert [row["name"] for row in rows] == ["ab"[h % 2] for h in range(24)]
    assert "pandas" not in loaded
    assert "polars" not in loaded


def test_package_exports_resolve() -> None:
    from dataflare import api
    from dataflare.streaming import errors, metrics, runner

    assert dataflare.Pipeline is api.Pipeline
    assert dataflare.load_pipeline is api.load_pipeline
    assert dataflare.run_pipeline is api.run_pipeline
    assert dataflare.PipelineValidationError is errors.PipelineValidationError
    assert dataflare.RunSummary is metrics.RunSummary
    assert dataflare.ProgressSnapshot is runner.ProgressSnapshot
    assert set(dataflare.__all__) <= set(dir(dataflare))


def test_package_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Pipelines'"):
        dataflare.Pipelines  # noqa: B018


# --- pipeline YAML, parsed once for both the data and the line numbers -------------

YAML_SAMPLE = """
id: sample
on: yes
flags: [true, False, no, off]
numbers: {int: 12, float: 1.5, exp: 1e3, hex: 0x1f, date: 2024-05-01}
text: |
  two
  lines
anchor: &base {a: 1}
alias: *base
sources:
  rows: {type: csv}
  rows: {type: jsonl}
"""


def test_single_parse_equals_compose_and_load() -> None:
    fast = loader.load_text(YAML_SAMPLE)
    slow = LoadedFile(yaml.load(YAML_SAMPLE, Loader=PipelineYamlLoader), "")
    nodes = yaml.compose(YAML_SAMPLE, Loader=PipelineYamlLoader)
    assert nodes is not None
    loader._collect_lines(nodes, (), slow, set())

    assert fast.data == slow.data
    assert fast.data["on"] == "yes"
    assert fast.data["alias"] == {"a": 1}
    assert fast.lines == slow.lines
    assert [i.message for i in fast.issues] == [i.message for i in slow.issues]
    assert len(fast.issues) == 1  # the duplicate key `rows`


def test_invalid_yaml_reported_in_pyyaml_words() -> None:
    text = "id: x\nsources: {a: [1, 2}\n"
    with pytest.raises(yaml.YAMLError) as expected:
        yaml.load(text, Loader=PipelineYamlLoader)

    with pytest.raises(PipelineValidationError) as raised:
        loader.load_text(text)

    problem = getattr(expected.value, "problem", None)
    assert problem is not None
    assert raised.value.issues[0].message == f"invalid YAML: {problem}"
    assert raised.value.issues[0].line == expected.value.problem_mark.line + 1  # type: ignore[attr-defined]


# --- templates: `{{ name }}` of a parameter needs no Jinja2 --------------------------


def jinja_value(expression: str, values: dict[str, Any]) -> Any:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    return env.compile_expression(expression, undefined_to_none=False)(**values)


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("{{ input }}", "input"),
        ("{{n}}", "n"),
        ("  {{ flag }} ", "flag"),
        ("{{ items }}", "items"),
        ("{{ true }}", "true"),
        ("{{ n + 1 }}", "n + 1"),
        ("{{ input | upper }}", "input | upper"),
    ],
)
def test_template_value_equals_jinja(text: str, expression: str) -> None:
    values = {
        "input": "a.jsonl",
        "n": 3,
        "flag": False,
        "items": [1, 2],
        "true": "text",
    }
    declared = {name: {"type": "string"} for name in values}
    declared.update(
        n={"type": "integer"}, flag={"type": "boolean"}, items={"type": "list"}
    )
    loaded = LoadedFile({"parameters": declared, "template": {"value": text}}, "")

    rendered = loader.render_template(loaded, values).data["value"]

    assert rendered == jinja_value(expression, values)
    assert type(rendered) is type(jinja_value(expression, values))


def test_simple_template_loads_no_jinja(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"n": 1, "name": "a"}\n')
    template = tmp_path / "template.yaml"
    body = textwrap.indent(PIPELINE.format(data='"{{ input }}"', out="out.jsonl"), "  ")
    template.write_text(f"parameters:\n  input: {{type: string}}\ntemplate:{body}")

    loaded = loaded_after(invoke("validate", str(template), "-p", f"input={data}"))

    assert "jinja2" not in loaded


# --- the command's process settings --------------------------------------------------

MAIN_SCRIPT = """
import gc, json, os, sys
from dataflare.cli.main import main
sys.argv = ["dataflare", "--help"]
try:
    main()
except SystemExit:
    pass
print(json.dumps({
    "mimalloc": os.environ.get("MIMALLOC_ARENA_EAGER_COMMIT"),
    "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
    "frozen": gc.get_freeze_count(),
}))
"""


def run_main(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", MAIN_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_main_sets_runtime_defaults() -> None:
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_DEFAULTS}

    settings = run_main(env)

    assert settings["mimalloc"] == "0"
    assert settings["openblas"] == "1"
    assert settings["frozen"] > 0


def test_main_keeps_user_settings() -> None:
    env = {**os.environ, "MIMALLOC_ARENA_EAGER_COMMIT": "2"}
    env["OPENBLAS_NUM_THREADS"] = "4"

    settings = run_main(env)

    assert settings["mimalloc"] == "2"
    assert settings["openblas"] == "4"
