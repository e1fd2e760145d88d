"""Terminal output of the CLI: progress, the run summary, validation reports.

Everything goes to standard error, so that standard output carries only
the records of a `stdout` destination. The progress display imports
rich's live and progress modules only when it first draws.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from dataflare.streaming.errors import PipelineValidationError

if TYPE_CHECKING:
    from rich.live import Live
    from rich.progress import Progress, TaskID

    from dataflare.streaming.metrics import RunSummary
    from dataflare.streaming.runner import ProgressSnapshot

console = Console(stderr=True, soft_wrap=True)


class ProgressDisplay:
    """A bar with rate and ETA for bounded inputs; live counters otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._live: Live | None = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._live is not None:
            self._live.stop()

    def update(self, snapshot: ProgressSnapshot) -> None:
        if not self.enabled:
            return
        if snapshot.bounded and snapshot.total:
            self._update_bar(snapshot)
        else:
            self._update_counters(snapshot)

    def _update_bar(self, snapshot: ProgressSnapshot) -> None:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]reading"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[records]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task(
                "read", total=snapshot.total, records=""
            )
            self._progress.start()
        assert self._task is not None
        self._progress.update(
            self._task,
            completed=snapshot.done or 0,
            records=f"{snapshot.records_read:,} records ({snapshot.rate:,.0f}/s)",
        )

    def _update_counters(self, snapshot: ProgressSnapshot) -> None:
        text = (
            f"{snapshot.elapsed_seconds:7.1f} s  read {snapshot.records_read:,}  "
            f"written {snapshot.records_written:,}  rejected {snapshot.rejected:,}  "
            f"{snapshot.rate:,.0f} records/s"
        )
        if self._live is None:
            from rich.live import Live

            self._live = Live(
                text, console=console, transient=True, refresh_per_second=4
            )
            self._live.start()
        else:
            self._live.update(text)


def print_summary(summary: RunSummary) -> None:
    """Print what the run did: per step counts, outputs, latency, wall time."""
    table = Table(
        title=f"pipeline {summary.pipeline_id}: {summary.status}", title_justify="left"
    )
    for column in ("step", "type", "in", "out", "filtered", "late", "rejected"):
        table.add_column(
            column, justify="left" if column in ("step", "type") else "right"
        )
    for step in summary.steps:
        shown_in = "" if step.section == "sources" else f"{step.records_in:,}"
        counters = step.counters
        table.add_row(
            step.step
            if step.parallelism == 1
            else f"{step.step} (x{step.parallelism})",
            step.type,
            shown_in,
            f"{step.records_out:,}",
            _count(counters.get("filtered")),
            _count(counters.get("late")),
            _count(counters.get("rejected")),
        )
    console.print(table)
    lines = []
    if summary.resumed_from is not None:
        lines.append(
            f"resumed from {summary.resumed_from}; the counts are this run's own"
        )
    lines.append(
        f"read {_records(summary.records_read)}, wrote "
        f"{summary.records_written:,} in "
        f"{summary.wall_seconds:.2f} s ({summary.throughput:,.0f} records/s)"
    )
    if summary.latency_p50_ms is not None:
        lines.append(
            f"end-to-end latency p50 {summary.latency_p50_ms:.2f} ms, "
            f"p99 {summary.latency_p99_ms:.2f} ms"
        )
    for step_id, paths in summary.outputs.items():
        shown = ", ".join(paths) if paths else "(no file)"
        delivery = summary.delivery.get(step_id, "?")
        lines.append(f"output {step_id} ({delivery}): {shown}")
    if summary.rejected:
        lines.append(
            f"[yellow]{summary.rejected:,} rejected "
            f"{'record' if summary.rejected == 1 else 'records'} in "
            f"{summary.dead_letter_path}[/yellow]"
        )
    if summary.error:
        lines.append(f"[red]failed: {summary.error}[/red]")
    for line in lines:
        console.print(line, highlight=False)


def _records(count: int) -> str:
    return f"{count:,} record" if count == 1 else f"{count:,} records"


def _count(value: int | None) -> str:
    return f"{value:,}" if value else ""


def print_validation_error(error: PipelineValidationError) -> None:
    console.print(
        f"[red]{error.source}: {len(error.issues)} problem"
        f"{'s' if len(error.issues) != 1 else ''} found[/red]",
        highlight=False,
    )
    for issue in error.issues:
        console.print("  " + issue.format(error.source), highlight=False, markup=False)
