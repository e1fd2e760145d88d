"""The `dataflare plugin` commands: list, info, and the WebAssembly tooling calls."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner, Result

from dataflare.cli import plugin as plugin_cli
from dataflare.cli.plugin import format_table, plugin
from dataflare.plugin.interface import API_VERSION
from dataflare.plugin.manager import PluginManager

PLUGIN_FILE = """
import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import PluginConfig, PluginKind, PluginMetadata
from dataflare.plugin.kinds import FilterPlugin


class LimitConfig(PluginConfig):
    limit: int = Field(10, ge=0, description="Largest value kept")


class AtMost(FilterPlugin[LimitConfig]):
    metadata = PluginMetadata("at-most", PluginKind.FILTER, "Values up to a limit",
                              version="2.1.0", author="CLI tests",
                              api_version={api})
    Config = LimitConfig

    def select(self, batch):
        return [v <= self.config.limit for v in batch.column("v").to_pylist()]
"""


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    """A manager with one good directory plugin and one broken file."""
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "limits.py").write_text(PLUGIN_FILE.format(api=API_VERSION))
    (directory / "broken.py").write_text("import not_a_module_anywhere\n")
    manager = PluginManager(paths=[directory])
    monkeypatch.setattr(plugin_cli, "default_manager", lambda: manager)
    return manager


def invoke(*args: str) -> Result:
    return CliRunner().invoke(plugin, list(args), catch_exceptions=False)


# --- list ----------------------------------------------------------------------


def test_list_shows_every_origin(manager: PluginManager) -> None:
    result = invoke("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "kind", "section", "version", "origin", "state"]
    rows = {tuple(line.split()) for line in lines[2:] if line and line[0] != " "}
    assert ("filter", "filter", "transformations", "1.0.0", "built-in", "loaded") in (
        rows
    )
    assert ("at-most", "filter", "transformations", "2.1.0", "directory", "loaded") in (
        rows
    )
    assert ("csv", "sink", "destinations", "1.0.0", "built-in", "loaded") in rows
    assert "errors:" in lines
    assert any(
        "broken: importing" in line and "not_a_module_anywhere" in line
        for line in lines
    )


def test_list_json(manager: PluginManager) -> None:
    result = invoke("list", "--format", "json")
    assert result.exit_code == 0
    data = {(d["section"], d["name"]): d for d in json.loads(result.output)}
    at_most = data[("transformations", "at-most")]
    assert at_most["origin"] == "directory"
    assert at_most["state"] == "loaded"
    assert at_most["author"] == "CLI tests"
    assert data[("", "broken")]["state"] == "failed"


# --- info ----------------------------------------------------------------------


def test_info_text(manager: PluginManager) -> None:
    manager.record_call("transformations", "at-most", records=100, seconds=0.5)
    result = invoke("info", "at-most")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "name:         at-most" in text
    assert "version:      2.1.0" in text
    assert f"api version:  {API_VERSION}" in text
    assert "origin:       directory" in text
    assert "calls:        1 (100 records, 0 errors, 0.500 s)" in text
    schema = json.loads(text[text.index("config schema:") + len("config schema:") :])
    assert schema["properties"]["limit"]["default"] == 10
    assert schema["properties"]["limit"]["minimum"] == 0


def test_info_json_builtin(manager: PluginManager) -> None:
    result = invoke("info", "filter", "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["kind"] == "filter"
    assert data["origin"] == "built-in"
    assert data["config_schema"]["required"] == ["condition"]


def test_info_config_without_json_schema(manager: PluginManager) -> None:
    # The memory source takes Arrow tables, which JSON Schema cannot describe.
    result = invoke("info", "memory", "--section", "sources", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.output)["config_schema"]["type"] == "object"


def test_info_unknown_name_exit_2(manager: PluginManager) -> None:
    result = CliRunner().invoke(plugin, ["info", "filtr"])
    assert result.exit_code == 2
    assert "no plugin named 'filtr'; did you mean 'filter'?" in result.output


@pytest.mark.parametrize("options", [[], ["--format", "json"]])
def test_info_ambiguous_name_exit_2(manager: PluginManager, options: list[str]) -> None:
    result = CliRunner().invoke(plugin, ["info", "csv", *options])

    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0] == (
        "error: 'csv' names plugins in several sections (sources, destinations); "
        "choose one with --section:"
    )
    suggested = [shlex.split(line) for line in lines[1:]]
    assert suggested == [
        ["dataflare", "plugin", "info", "csv", "--section", section, *options]
        for section in ("sources", "destinations")
    ]
    # Each suggested command works as printed.
    for command, section in zip(suggested, ("sources", "destinations"), strict=True):
        rerun = invoke(*command[2:])
        assert rerun.exit_code == 0, rerun.output
        if options:
            assert json.loads(rerun.output)["section"] == section
        else:
            assert f"section:      {section}\n" in rerun.output


def test_info_incompatible_plugin_exit_1(
    manager: PluginManager, tmp_path: Path
) -> None:
    future = tmp_path / "future"
    future.mkdir()
    (future / "limits_v2.py").write_text(PLUGIN_FILE.format(api=API_VERSION + 1))
    (future / "limits_v2.py").write_text(
        (future / "limits_v2.py").read_text().replace('"at-most"', '"at-most-v2"')
    )
    manager.add_path(future)
    result = CliRunner().invoke(plugin, ["info", "at-most-v2"])
    assert result.exit_code == 1
    assert f"written for plugin API version {API_VERSION + 1}" in result.output


# --- WebAssembly tooling -------------------------------------------------------------


class FakeTooling(types.ModuleType):
    """Stands in for dataflare.plugin.wasm.tooling and records its calls."""

    def __init__(self) -> None:
        super().__init__("dataflare.plugin.wasm.tooling")
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.problems: list[str] = []
        self.error: Exception | None = None

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.error is not None:
            raise self.error

    def new_plugin(self, lang: str, name: str, dest: Path) -> Path:
        self._call("new_plugin", lang, name, dest)
        return dest / name

    def build_plugin(self, path: Path) -> Path:
        self._call("build_plugin", path)
        return path / "plugin.wasm"

    def validate_plugin(self, path: Path) -> list[str]:
        self._call("validate_plugin", path)
        return self.problems

    def run_plugin(self, path: Path, input_path: Path, config: dict[str, Any]) -> Any:
        self._call("run_plugin", path, input_path, config)
        return pa.table({"id": list(range(60)), "ok": [i % 2 == 0 for i in range(60)]})

    def bench_plugin(self, path: Path, rows: int, batch_rows: int) -> dict[str, Any]:
        self._call("bench_plugin", path, rows, batch_rows)
        return {"rows": rows, "records_per_second": 1234567.891}


@pytest.fixture
def tooling(monkeypatch: pytest.MonkeyPatch) -> FakeTooling:
    fake = FakeTooling()
    monkeypatch.setitem(sys.modules, "dataflare.plugin.wasm.tooling", fake)
    return fake


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "delay-filter"
    path.mkdir()
    (path / "input.csv").write_text("id\n1\n")
    return path


def test_new_passes_arguments(tooling: FakeTooling, tmp_path: Path) -> None:
    result = invoke("new", "--lang", "zig", "delay-filter", "--dir", str(tmp_path))
    assert result.exit_code == 0
    assert tooling.calls == [("new_plugin", ("zig", "delay-filter", tmp_path))]
    assert result.output == f"created {tmp_path / 'delay-filter'}\n"


def test_new_rejects_bad_input(tooling: FakeTooling) -> None:
    runner = CliRunner()
    bad_lang = runner.invoke(plugin, ["new", "--lang", "rust", "x"])
    assert bad_lang.exit_code == 2
    assert "'rust' is not one of 'c', 'zig', 'assemblyscript'" in bad_lang.output
    missing_lang = runner.invoke(plugin, ["new", "x"])
    assert missing_lang.exit_code == 2
    assert tooling.calls == []


def test_build_and_validate(tooling: FakeTooling, project: Path) -> None:
    built = invoke("build", str(project))
    assert built.exit_code == 0
    assert built.output == f"built {project / 'plugin.wasm'}\n"
    valid = invoke("validate", str(project))
    assert valid.exit_code == 0
    assert valid.output == f"{project}: valid\n"

    tooling.problems = ["manifest: kind is missing", "module: no export 'process'"]
    invalid = CliRunner().invoke(plugin, ["validate", str(project)])
    assert invalid.exit_code == 2
    assert f"{project}: manifest: kind is missing" in invalid.output
    assert tooling.calls[0] == ("build_plugin", (project,))


def test_missing_path_exit_2(tooling: FakeTooling, tmp_path: Path) -> None:
    for command in ("build", "validate", "bench"):
        result = CliRunner().invoke(plugin, [command, str(tmp_path / "nowhere")])
        assert result.exit_code == 2, command
        assert "does not exist" in result.output
    assert tooling.calls == []


def test_test_prints_table(tooling: FakeTooling, project: Path) -> None:
    data = project / "input.csv"
    result = invoke(
        "test", str(project), "--input", str(data), "--config", '{"threshold": 15}'
    )
    assert result.exit_code == 0, result.output
    assert tooling.calls == [("run_plugin", (project, data, {"threshold": 15}))]
    lines = result.output.splitlines()
    assert lines[0].split() == ["id", "ok"]
    assert lines[2].split() == ["0", "True"]
    assert lines[-1] == "... 10 more rows (60 in all)"
    everything = invoke("test", str(project), "--input", str(data), "--limit", "0")
    assert everything.output.splitlines()[-1] == "(60 rows)"
    assert tooling.calls[-1] == ("run_plugin", (project, data, {}))


@pytest.mark.parametrize(
    ("config", "message"),
    [("{threshold: 15}", "not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_test_bad_config_exit_2(
    tooling: FakeTooling, project: Path, config: str, message: str
) -> None:
    args = ["test", str(project), "--input", str(project / "input.csv")]
    result = CliRunner().invoke(plugin, [*args, "--config", config])
    assert result.exit_code == 2
    assert message in result.output
    assert tooling.calls == []


def test_test_needs_input(tooling: FakeTooling, project: Path) -> None:
    result = CliRunner().invoke(plugin, ["test", str(project)])
    assert result.exit_code == 2
    assert "Missing option '--input'" in result.output


def test_bench_options(tooling: FakeTooling, project: Path) -> None:
    result = invoke("bench", str(project), "--rows", "5000", "--batch-rows", "100")
    assert result.exit_code == 0
    assert tooling.calls == [("bench_plugin", (project, 5000, 100))]
    assert result.output.splitlines() == [
        "rows: 5,000",
        "records_per_second: 1,234,567.89",
    ]
    defaults = invoke("bench", str(project), "--format", "json")
    assert tooling.calls[-1] == ("bench_plugin", (project, 1_000_000, 10_000))
    assert json.loads(defaults.output)["rows"] == 1_000_000
    zero = CliRunner().invoke(plugin, ["bench", str(project), "--rows", "0"])
    assert zero.exit_code == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValueError("manifest.toml: 'kind' is missing"), 2),
        (FileExistsError("delay-filter exists already"), 2),
        (RuntimeError("zig build exited with status 1"), 1),
    ],
)
def test_tooling_errors_map_to_exit_codes(
    tooling: FakeTooling, project: Path, error: Exception, code: int
) -> None:
    tooling.error = error
    result = CliRunner().invoke(plugin, ["build", str(project)])
    assert result.exit_code == code
    assert str(error) in result.output


def test_missing_tooling_exit_1(monkeypatch: pytest.MonkeyPatch, project: Path) -> None:
    monkeypatch.setitem(sys.modules, "dataflare.plugin.wasm.tooling", None)
    result = CliRunner().invoke(plugin, ["build", str(project)])
    assert result.exit_code == 1
    assert "tooling (dataflare.plugin.wasm.tooling) cannot be imported" in (
        result.output
    )


def test_real_tooling_reports_missing_module(tmp_path: Path) -> None:
    # The real tooling module, on an example plugin that was not built.
    pytest.importorskip("dataflare.plugin.wasm.tooling")
    examples = Path(__file__).parent.parent / "examples" / "plugins" / "delay_filter"
    project = tmp_path / "delay_filter"
    shutil.copytree(examples, project)
    (project / "delay_filter.wasm").unlink(missing_ok=True)
    result = CliRunner().invoke(plugin, ["validate", str(project)])
    assert result.exit_code == 2
    assert "delay_filter.wasm not found" in result.output


def test_format_table_cuts_long_values() -> None:
    text = format_table(["a", "b"], [["x" * 50, None], ["y", 2]], max_width=10)
    assert text.splitlines() == [
        "a           b",
        "----------  -",
        "xxxxxxx...",
        "y           2",
    ]
