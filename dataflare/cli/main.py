"""The `dataflare` command.

Exit codes: 0 success; 1 the run failed; 2 the pipeline file or the command
line is invalid; 130 a bounded run was interrupted before its input ended.

Each command imports what it needs when it runs (the engine, Arrow, Polars,
rich), so `dataflare --help` and the commands that do not run a pipeline
start without loading them.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from dataflare.cli.logs import HeldEngineErrors, configure_logging
from dataflare.connectors.files import head_start
from dataflare.streaming.errors import PipelineRunError, PipelineValidationError

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130

_HEAD_START_SECONDS = 5.0
"""Seconds after which head starts that no source took are dropped."""

RUNTIME_DEFAULTS = {
    "MIMALLOC_ARENA_EAGER_COMMIT": "0",
    "OPENBLAS_NUM_THREADS": "1",
    **({"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"} if sys.platform == "linux" else {}),
}
"""Environment defaults the command sets before Arrow and NumPy load; a
value set by the user wins. Measured with pyarrow 26.0.1 and NumPy 2.4 on
2 cores:

- On Linux, Arrow allocates with jemalloc instead of its default,
  mimalloc. Over the 2,000,000 records of
  `bench/pipelines/w2-windowed.yaml` the peak resident memory was about
  155 MB with jemalloc, 160 MB with the system allocator and 200 MB with
  mimalloc, at the same wall time within the noise of the machine.
  Arrow's Linux wheels include jemalloc; other builds may not.
- Where mimalloc is used, it commits each of its arenas as a whole where
  the OS overcommits memory (mimalloc's documentation of
  MIMALLOC_ARENA_EAGER_COMMIT). Committing on demand lowered the peak
  resident memory of `bench/pipelines/w2-windowed.yaml` over 200,000
  records by about 9 MiB, and of a 1,000-record run by about 5 MiB, at
  the same CPU time.
- NumPy's OpenBLAS starts a worker thread per further core when NumPy is
  imported. No step of DataFlare calls BLAS, and going without them saved
  about 0.05 s of CPU time per process. A plugin that does heavy linear
  algebra can set OPENBLAS_NUM_THREADS itself.
"""

logger = logging.getLogger("dataflare.cli")


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(
                f"{item!r} is not NAME=VALUE", param_hint="--param"
            )
        params[name.strip()] = value
    return params


_param_option = click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a template parameter (repeatable).",
)


class _LazyGroup(click.Group):
    """A command group that imports the modules of some subcommands on first use.

    `dataflare run` then starts without compiling and importing the
    checkpoint and plugin commands.
    """

    lazy_commands = {
        "checkpoints": "dataflare.cli.checkpoints:checkpoints",
        "plugin": "dataflare.cli.plugin:plugin",
        "savepoint": "dataflare.cli.checkpoints:savepoint",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None or cmd_name in self.commands:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        self.add_command(command, cmd_name)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        # click suggests close names ("Did you mean") from `self.commands`.
        if args and args[0] not in self.commands and args[0] not in self.lazy_commands:
            for name in self.lazy_commands:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dataflare")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log line format on standard error.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="Lowest level logged.",
)
@click.pass_context
def cli(ctx: click.Context, log_format: str, log_level: str) -> None:
    """DataFlare: stream processing on Arrow batches, from YAML pipeline files."""
    configure_logging(log_format, log_level)
    if ctx.invoked_subcommand != "run":
        gc.enable()  # `run` turns it on once the pipeline is loaded


@cli.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@_param_option
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first bad record instead of writing it to the dead-letter file.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (default: when standard error is a terminal).",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the run summary as JSON to this file.",
)
@click.option(
    "--from",
    "resume_from",
    metavar="CHECKPOINT",
    help="Resume from this checkpoint or savepoint directory instead of the "
    "newest checkpoint.",
)
@click.option(
    "--from-scratch",
    is_flag=True,
    help="Delete the pipeline's checkpoints and start from the beginning.",
)
def run(
    pipeline_file: Path,
    params: tuple[str, ...],
    fail_fast: bool,
    progress: bool | None,
    summary_json: Path | None,
    resume_from: str | None,
    from_scratch: bool,
) -> None:
    """Run a pipeline file until its inputs end, or until SIGINT or SIGTERM.

    \b
    Examples:
      dataflare run examples/flights-delays.yaml
      dataflare run examples/flights-delays.yaml -p out_dir=/tmp/out --fail-fast
    """
    values = _parse_params(params)
    # Parsing the input starts now, on another core, while the engine loads.
    with head_start.started(pipeline_file, values) as hints:
        from dataflare.cli.render import ProgressDisplay, print_summary
        from dataflare.state.checkpoint import CheckpointNotFoundError
        from dataflare.streaming.runner import (
            PipelineRun,
            ProgressSnapshot,
            stop_on_signals,
        )

        plan = _load_or_exit(pipeline_file, values)
        if fail_fast:
            plan.spec.errors.policy = "fail"
        show = sys.stderr.isatty() if progress is None else progress
        try:
            pipeline_run = PipelineRun(
                plan, resume_from=resume_from, from_scratch=from_scratch
            )
        except PipelineRunError as exc:
            click.echo(f"error: {exc}", err=True)
            not_found = isinstance(exc.__cause__, CheckpointNotFoundError)
            sys.exit(EXIT_INVALID if not_found else EXIT_FAILED)
        display = ProgressDisplay(enabled=show)
        error: PipelineRunError | None = None
        # The summary prints the run's error, so the engine's record of it is
        # held back, and any other error is logged after the run.
        held_errors = HeldEngineErrors()

        def on_progress(snapshot: ProgressSnapshot) -> None:
            if snapshot.records_read or snapshot.elapsed_seconds > _HEAD_START_SECONDS:
                head_start.drop_unclaimed()  # every source has opened its first file
            display.update(snapshot)

        _collect_from_now_on()
        with held_errors, stop_on_signals(pipeline_run), display:
            try:
                summary = pipeline_run.run(on_progress=on_progress)
            except PipelineRunError as exc:
                error = exc
                summary = exc.summary  # type: ignore[attr-defined]
        held_errors.release(summary.error)
        head_start.finish_run(hints, save=True)
        print_summary(summary)
        if summary_json is not None:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_bytes(
                orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2)
            )
        if error is not None:
            sys.exit(EXIT_FAILED)  # the summary's last line gives the error
        bounded = all(s.bounded for s in pipeline_run.executor.sources())
        if summary.status == "stopped" and bounded:
            sys.exit(EXIT_INTERRUPTED)


@cli.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@_param_option
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Report format.",
)
def validate(pipeline_file: Path, params: tuple[str, ...], output_format: str) -> None:
    """Check a pipeline file without running it; list every problem found.

    \b
    Exit code 0 when the file is valid, 2 when it is not.

    \b
    Example:
      dataflare validate examples/flights-delays.yaml
    """
    from dataflare.api import load_pipeline
    from dataflare.cli.render import print_validation_error

    try:
        plan = load_pipeline(pipeline_file, _parse_params(params))
    except PipelineValidationError as exc:
        if output_format == "json":
            click.echo(
                orjson.dumps(
                    {
                        "valid": False,
                        "file": exc.source,
                        "problems": [i.as_dict() for i in exc.issues],
                    },
                    option=orjson.OPT_INDENT_2,
                ).decode()
            )
        else:
            print_validation_error(exc)
        sys.exit(EXIT_INVALID)
    steps = ", ".join(plan.steps)
    if output_format == "json":
        click.echo(
            orjson.dumps(
                {"valid": True, "file": str(pipeline_file), "steps": list(plan.steps)}
            ).decode()
        )
    else:
        click.echo(f"{pipeline_file}: valid ({len(plan.steps)} steps: {steps})")


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file instead of standard output.",
)
def schema(output: Path | None) -> None:
    """Print the JSON Schema of pipeline files, for editors and CI checks.

    \b
    Example (VS Code with the YAML extension):
      dataflare schema -o .dataflare.schema.json
      # then in a pipeline file: # yaml-language-server: $schema=.dataflare.schema.json
    """
    from dataflare.streaming.schema import pipeline_json_schema

    text = orjson.dumps(pipeline_json_schema(), option=orjson.OPT_INDENT_2).decode()
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


def _load_or_exit(path: Path, params: dict[str, Any]) -> Any:
    from dataflare.api import load_pipeline
    from dataflare.cli.render import print_validation_error

    try:
        return load_pipeline(path, params)
    except PipelineValidationError as exc:
        print_validation_error(exc)
        sys.exit(EXIT_INVALID)


def main() -> None:
    for name, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(name, value)  # read when the libraries load
    _tune_malloc()
    gc.disable()  # while the modules load; see `_collect_from_now_on`
    try:
        cli(prog_name="dataflare")
    finally:
        _freeze_for_exit()


_MALLOPT = (
    # (mallopt parameter from malloc.h, its environment variable, value)
    (-3, "MALLOC_MMAP_THRESHOLD_", 32 << 20),  # M_MMAP_THRESHOLD
    (-1, "MALLOC_TRIM_THRESHOLD_", 256 << 20),  # M_TRIM_THRESHOLD
)


def _tune_malloc() -> None:
    """Keep the memory of freed source blocks in glibc's malloc, unless the user chose.

    Blocks of up to 32 MiB come from malloc's arenas, not from memory mapped
    for each, and up to 256 MiB freed at the top of an arena stays there.
    glibc's own thresholds follow the largest block freed so far (mallopt(3)),
    and at twice a block's size it gave back memory that the next blocks
    took again, one page fault per page. Over the 2,000,000 records of
    `bench/pipelines/w1-stateless.yaml`, a run had 23,000 to 30,000 page
    faults against 40,000 to 48,000. It took 0.68 s against 0.70 s on 2
    cores and 1.14 s against 1.15 s on one (medians of 10 interleaved
    runs), with 4 MB and 6 MB more peak memory.
    `bench/pipelines/w2-windowed.yaml` took 1.29 s against 1.35 s on 2
    cores and peaked at 170 MB against 173 MB (medians of 5).

    The number of arenas stays glibc's. Under these thresholds, a cap of two
    arenas no longer lowered the peak memory of either pipeline. It made W1
    take 0.69 s against 0.67 s, and W2 1.34 s against 1.29 s (medians of 8
    and 6).

    Each threshold is left alone where its environment variable is set to a
    whole number, and both are where `GLIBC_TUNABLES` names a malloc
    tunable. glibc reads an empty or other value as 0, which maps memory for
    every allocation and made the main job about 60 % slower, so this
    function sets the threshold then. Arrow allocates with jemalloc and
    Python's small objects use their own allocator, so neither is affected.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "glibc.malloc." in tunables:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return
    for parameter, variable, value in _MALLOPT:
        if not os.environ.get(variable, "").strip().isdigit():
            mallopt(parameter, value)


def _collect_from_now_on() -> None:
    """Freeze the objects made while loading, then turn the garbage collector on.

    Loading the modules and the pipeline makes about 80,000 objects that
    the collector tracks and that mostly live as long as the process. With
    the collector on, they triggered about 120 collections, 28 ms in all,
    while `bench/pipelines/w1-stateless.yaml` started (2 cores), and each
    full collection later walks them again. `gc.freeze` moves them out of
    the collector's generations.
    """
    gc.freeze()
    gc.enable()


def _freeze_for_exit() -> None:
    """Collect garbage now, then exempt every object left from collections.

    Interpreter shutdown collects garbage while it clears the modules, and
    with Arrow, Polars and pydantic loaded that walks tens of thousands of
    objects, unless `_collect_from_now_on` froze them. The objects still
    alive at exit need no collection: their memory goes back with the
    process, and Python does not promise to call `__del__` of objects that
    exist when the interpreter exits.
    """
    gc.collect()  # finalizes the garbage there is, as shutdown would
    gc.freeze()


if __name__ == "__main__":
    main()
