"""The `dataflare plugin` commands: list and inspect plugins, and work on
WebAssembly plugins (scaffold, build, test, validate, benchmark).

Exit codes:

- 0: success;
- 1: the command failed (a plugin that cannot be loaded, a failed build,
  run or benchmark);
- 2: invalid input (an unknown plugin, a bad option value, a path that does
  not exist, a plugin that `validate` finds invalid).

The WebAssembly commands call `dataflare.plugin.wasm.tooling`, imported
when a command runs, so `list` and `info` work without the WebAssembly
runtime installed. The plugin manager is also imported when a command
runs, so that the `dataflare` command starts without Arrow and pydantic.
"""

from __future__ import annotations

import difflib
import importlib
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

if TYPE_CHECKING:
    from dataflare.plugin.manager import (
        AmbiguousPluginNameError,
        PluginInfo,
        PluginManager,
    )

EXIT_FAILED = 1
EXIT_INVALID = 2
TOOLING_MODULE = "dataflare.plugin.wasm.tooling"
LANGUAGES = ("c", "zig", "assemblyscript")
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
"""Errors of the tooling that mean the input is invalid (exit code 2)."""

_format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)


def default_manager() -> PluginManager:
    """Return the process-wide plugin manager (imported on first use)."""
    from dataflare.plugin.manager import default_manager

    return default_manager()


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: int = 40
) -> str:
    """Return rows as a plain text table with aligned columns.

    Values longer than `max_width` characters are cut and end with `...`.
    """

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(text.ljust(widths[i]) for i, text in enumerate(row)).rstrip()
        for row in cells
    )
    return "\n".join(lines)


@click.group("plugin")
def plugin() -> None:
    """List and inspect plugins; scaffold, build and test WebAssembly plugins."""


# --- list and info ------------------------------------------------------------


@plugin.command("list")
@_format_option
def list_plugins(output_format: str) -> None:
    """List every plugin: built-in, from packages, from plugin directories.

    Each plugin is imported to show its kind and version, and any import
    error. Plugin directories come from the DATAFLARE_PLUGIN_PATH
    environment variable (separated like PATH).

    \b
    Example:
      DATAFLARE_PLUGIN_PATH=./my-plugins dataflare plugin list
    """
    infos = default_manager().list_plugins(load=True)
    if output_format == "json":
        data = [info.as_dict() for info in infos]
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    headers = ("name", "kind", "section", "version", "origin", "state")
    rows = [
        (i.name, i.kind, i.section, i.version, i.origin.value, i.state.value)
        for i in infos
    ]
    click.echo(format_table(headers, rows))
    failed = [i for i in infos if i.error]
    if failed:
        click.echo("\nerrors:")
        for info in failed:
            where = f"{info.section}/{info.name}" if info.section else info.name
            click.echo(f"  {where}: {info.error}")


@plugin.command("info")
@click.argument("name")
@click.option(
    "--section",
    type=click.Choice(["sources", "transformations", "destinations"]),
    help="Section of the plugin, for a name used in several sections (csv).",
)
@_format_option
def info(name: str, section: str | None, output_format: str) -> None:
    """Show a plugin's metadata and the JSON Schema of its config.

    \b
    Examples:
      dataflare plugin info filter
      dataflare plugin info csv --section destinations --format json
    """
    from dataflare.plugin.manager import AmbiguousPluginNameError
    from dataflare.plugin.registry import PluginNotFoundError
    from dataflare.streaming.schema import config_json_schema

    manager = default_manager()
    try:
        cls = manager.load(name, section)
    except PluginNotFoundError as exc:
        close = difflib.get_close_matches(name, exc.available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _fail(f"no plugin named {name!r}{hint} (see `dataflare plugin list`)", 2)
    except AmbiguousPluginNameError as exc:
        _fail(_ambiguous_name_message(exc, output_format), EXIT_INVALID)
    except Exception as exc:  # the plugin's import or compatibility check failed
        _fail(f"plugin {name!r} cannot be loaded: {exc}")
    details = manager.info(name, section)
    schema = config_json_schema(cls.Config)
    if output_format == "json":
        data = details.as_dict() | {"config_schema": schema}
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(_describe(details))
    click.echo("config schema:")
    click.echo(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())


def _ambiguous_name_message(exc: AmbiguousPluginNameError, output_format: str) -> str:
    """Describe a name used in several sections, with one command per section."""
    options = "" if output_format == "text" else f" --format {output_format}"
    commands = [
        f"  dataflare plugin info {shlex.quote(exc.name)} --section {section}{options}"
        for section in exc.sections
    ]
    return (
        f"{exc.name!r} names plugins in several sections "
        f"({', '.join(exc.sections)}); choose one with --section:\n"
        + "\n".join(commands)
    )


def _describe(info: PluginInfo) -> str:
    stats = info.stats
    lines = [
        f"name:         {info.name}",
        f"kind:         {info.kind}",
        f"section:      {info.section}",
        f"version:      {info.version}",
        f"api version:  {info.api_version}",
        f"description:  {info.description}",
        f"author:       {info.author}",
        f"origin:       {info.origin.value}",
        f"source:       {info.source}",
        f"state:        {info.state.value}",
        f"calls:        {stats.calls} ({stats.records} records, "
        f"{stats.errors} errors, {stats.seconds:.3f} s)",
    ]
    if info.error:
        lines.append(f"error:        {info.error}")
    return "\n".join(lines)


# --- WebAssembly tooling --------------------------------------------------------


def _tool(name: str) -> Callable[..., Any]:
    """Return a function of the WebAssembly tooling module, or exit with code 1."""
    try:
        module = importlib.import_module(TOOLING_MODULE)
    except ImportError as exc:
        _fail(
            f"the WebAssembly plugin tooling ({TOOLING_MODULE}) cannot be "
            f"imported: {exc}; install DataFlare with its WebAssembly dependencies"
        )
    function = getattr(module, name, None)
    if not callable(function):
        _fail(f"{TOOLING_MODULE} has no function {name}(); update DataFlare")
    return function  # type: ignore[no-any-return]


def _run_tool(name: str, *args: Any) -> Any:
    """Call a tooling function; map its errors to exit codes 2 (input) and 1."""
    function = _tool(name)
    try:
        return function(*args)
    except INPUT_ERRORS as exc:
        _fail(str(exc), EXIT_INVALID)
    except Exception as exc:
        _fail(f"{name.replace('_', ' ')} failed: {exc}")


_path_argument = click.argument(
    "path", type=click.Path(exists=True, path_type=Path), metavar="PATH"
)


@plugin.command("new")
@click.option(
    "--lang",
    type=click.Choice(LANGUAGES),
    required=True,
    help="Language of the plugin.",
)
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to create the plugin's directory in.",
)
def new(lang: str, name: str, directory: Path) -> None:
    """Create a WebAssembly plugin project NAME from a template.

    \b
    Example:
      dataflare plugin new --lang zig delay_filter --dir plugins
    """
    created = _run_tool("new_plugin", lang, name, directory)
    click.echo(f"created {created}")


@plugin.command("build")
@_path_argument
def build(path: Path) -> None:
    """Build the WebAssembly plugin at PATH (its directory or manifest).

    \b
    Example:
      dataflare plugin build plugins/delay_filter
    """
    module = _run_tool("build_plugin", path)
    click.echo(f"built {module}")


@plugin.command("validate")
@_path_argument
def validate(path: Path) -> None:
    """Check a WebAssembly plugin's manifest and module without running it.

    \b
    Exit code 0 when it is valid, 2 when problems are found.

    \b
    Example:
      dataflare plugin validate plugins/delay_filter
    """
    problems = _run_tool("validate_plugin", path)
    if problems:
        for problem in problems:
            click.echo(f"{path}: {problem}", err=True)
        sys.exit(EXIT_INVALID)
    click.echo(f"{path}: valid")


def _parse_config(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        config = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise click.BadParameter(
            f"must be a JSON object such as '{{\"min_delay\": 15}}', not {value!r}"
        )
    return config


@plugin.command("test")
@_path_argument
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Input records (CSV, JSON Lines, Parquet or Arrow file).",
)
@click.option(
    "--config",
    callback=_parse_config,
    metavar="JSON",
    help="The plugin's config as a JSON object.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Rows of output to print (0 prints all).",
)
def test(path: Path, input_path: Path, config: dict[str, Any], limit: int) -> None:
    """Run the plugin at PATH on an input file and print its output as a table.

    \b
    Example:
      dataflare plugin test examples/plugins/delay_filter \\
          --input examples/plugins/delay_filter/sample.csv \\
          --config '{"min_delay": 15}'
    """
    table = _run_tool("run_plugin", path, input_path, config)
    rows = table.num_rows
    shown = table if limit == 0 or rows <= limit else table.slice(0, limit)
    click.echo(format_table(shown.column_names, _rows(shown)))
    if shown.num_rows < rows:
        click.echo(f"... {rows - shown.num_rows} more rows ({rows} in all)")
    else:
        click.echo(f"({rows} rows)")


def _rows(table: Any) -> list[list[Any]]:
    columns = [column.to_pylist() for column in table.columns]
    return [list(row) for row in zip(*columns, strict=True)]


@plugin.command("bench")
@_path_argument
@click.option(
    "--rows",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Records to process.",
)
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Records per batch.",
)
@_format_option
def bench(path: Path, rows: int, batch_rows: int, output_format: str) -> None:
    """Measure the throughput of the plugin at PATH on generated records.

    \b
    Example:
      dataflare plugin bench plugins/delay_filter --rows 2000000
    """
    results = _run_tool("bench_plugin", path, rows, batch_rows)
    if output_format == "json":
        click.echo(orjson.dumps(results, default=str).decode())
        return
    for key, value in results.items():
        click.echo(f"{key}: {_number(value)}")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
