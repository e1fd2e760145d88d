"""`dataflare checkpoints` and `dataflare savepoint`.

The checkpoint storage (and fsspec with it), rich and the runner are
imported when a command runs, so that the `dataflare` command starts
without them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from dataflare.streaming.errors import PipelineValidationError

if TYPE_CHECKING:
    from rich.console import Console

    from dataflare.state.checkpoint import Checkpoint, CheckpointStorage


def _console() -> Console:
    from rich.console import Console

    return Console(soft_wrap=True)


def _storage_of(pipeline_file: Path, params: tuple[str, ...]) -> CheckpointStorage:
    from dataflare.api import load_pipeline
    from dataflare.cli.render import print_validation_error
    from dataflare.state.checkpoint import CheckpointStorage

    values = dict(p.partition("=")[::2] for p in params)
    try:
        plan = load_pipeline(pipeline_file, values)
    except PipelineValidationError as exc:
        print_validation_error(exc)
        sys.exit(2)
    spec = plan.spec.checkpointing
    if spec is None:
        click.echo(f"error: {pipeline_file} has no `checkpointing` section", err=True)
        sys.exit(2)
    return CheckpointStorage(spec.storage.replace("{pipeline_id}", plan.spec.id))


_param_option = click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a template parameter.",
)


@click.group()
def checkpoints() -> None:
    """List and inspect a pipeline's checkpoints."""


@checkpoints.command("list")
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@_param_option
def list_checkpoints(pipeline_file: Path, params: tuple[str, ...]) -> None:
    """List the checkpoints of a pipeline file, newest first.

    \b
    Example:
      dataflare checkpoints list pipeline.yaml
    """
    from rich.table import Table

    from dataflare.state.checkpoint import CheckpointError

    storage = _storage_of(pipeline_file, params)
    table = Table(title=f"checkpoints in {storage.root}", title_justify="left")
    for column in ("id", "created (UTC)", "took", "state", "status", "path"):
        table.add_column(column)
    for checkpoint_id in storage.ids():
        location = storage.location(checkpoint_id)
        try:
            found = storage.load(location)
        except CheckpointError as exc:
            table.add_row(str(checkpoint_id), "", "", "", f"broken: {exc}", location)
            continue
        table.add_row(
            str(found.id),
            found.created_at[:19],
            f"{found.duration_seconds * 1000:.1f} ms",
            f"{found.total_state_bytes():,} B",
            "finished" if found.finished else "complete",
            location,
        )
    _console().print(table)


@checkpoints.command()
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(location: str, as_json: bool) -> None:
    """Show one checkpoint or savepoint: source positions and state sizes.

    \b
    Example:
      dataflare checkpoints inspect checkpoints/flights-delays/chk-000012
    """
    from rich.table import Table

    from dataflare.state.checkpoint import CheckpointError, CheckpointStorage

    storage = CheckpointStorage(str(Path(location).parent))
    try:
        found = storage.load(location)
    except CheckpointError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    report = _report(found)
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    console = _console()
    console.print(
        f"checkpoint {found.id} of pipeline {found.pipeline_id}, created "
        f"{found.created_at}, took {found.duration_seconds * 1000:.1f} ms"
        + (", finished" if found.finished else "")
    )
    table = Table()
    for column in ("step", "instance", "position", "state bytes", "sink"):
        table.add_column(column)
    for row in report["instances"]:
        table.add_row(
            row["step"],
            str(row["instance"]),
            _short(row["position"]),
            f"{row['state_bytes']:,}",
            _short(row["sink"]),
        )
    console.print(table)


def _report(found: Checkpoint) -> dict[str, Any]:
    rows = []
    for step, entry in found.steps.items():
        for index, instance in enumerate(entry["instances"]):
            rows.append(
                {
                    "step": step,
                    "instance": index,
                    "position": instance["position"],
                    "state_bytes": instance["state_bytes"],
                    "sink": instance["sink"],
                    "finished": instance["finished"],
                }
            )
    return {
        "id": found.id,
        "pipeline_id": found.pipeline_id,
        "created_at": found.created_at,
        "duration_seconds": found.duration_seconds,
        "finished": found.finished,
        "state_bytes": found.total_state_bytes(),
        "instances": rows,
    }


def _short(value: Any) -> str:
    if value is None:
        return ""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@_param_option
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the savepoint to be written.",
)
def savepoint(pipeline_file: Path, params: tuple[str, ...], timeout: float) -> None:
    """Ask the running pipeline to take a savepoint; print its directory.

    The pipeline must run on this machine with local checkpoint storage. Resume
    from the savepoint later with `dataflare run FILE --from DIRECTORY`.
    """
    from dataflare.streaming.runner import PID_FILE

    storage = _storage_of(pipeline_file, params)
    pid_file = Path(storage.path) / PID_FILE
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        click.echo(
            f"error: no running pipeline found ({pid_file} is missing); start "
            "it with `dataflare run` first",
            err=True,
        )
        sys.exit(1)
    folder = Path(storage.path) / "savepoints"
    before = set(folder.iterdir()) if folder.exists() else set()
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        click.echo(f"error: the pipeline process {pid} is not running", err=True)
        sys.exit(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.exists():
            for candidate in set(folder.iterdir()) - before:
                if (candidate / "metadata.json").exists():
                    click.echo(str(candidate))
                    return
        time.sleep(0.05)
    click.echo(f"error: no savepoint appeared within {timeout:.0f} s", err=True)
    sys.exit(1)
