"""Run a validated plan: progress snapshots, signals and the run summary."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from dataflare.plugin.interface import Progress, Sink, Source
from dataflare.state.checkpoint import Checkpoint
from dataflare.streaming.errors import PipelineRunError
from dataflare.streaming.executor import Executor
from dataflare.streaming.metrics import RunSummary, StepSummary
from dataflare.streaming.plan import PipelinePlan
from dataflare.streaming.scheduler import TaskPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressSnapshot:
    """Progress of a run so far, passed to progress callbacks."""

    elapsed_seconds: float
    records_read: int
    records_written: int
    rejected: int
    done: int | None  # bytes or records read, when the sources are bounded
    total: int | None
    unit: str
    bounded: bool

    @property
    def rate(self) -> float:
        return self.records_read / self.elapsed_seconds if self.elapsed_seconds else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if not self.bounded or not self.total or not self.done:
            return None
        speed = self.done / self.elapsed_seconds if self.elapsed_seconds else 0
        return (self.total - self.done) / speed if speed else None


ProgressCallback = Callable[[ProgressSnapshot], None]

SAVEPOINT_PREFIX = "sp-"
"""Start of the name of a savepoint's folder, followed by its UTC time."""


class PipelineRun:
    """One execution of a plan. `run()` blocks; `stop()` may be called from
    another thread or a signal handler to end it cleanly."""

    def __init__(
        self,
        plan: PipelinePlan,
        *,
        resume_from: str | None = None,
        from_scratch: bool = False,
        chaining: bool | None = None,
        pool: TaskPool | None = None,
    ) -> None:
        self.plan = plan
        self.executor = Executor(
            plan,
            resume_from=resume_from,
            from_scratch=from_scratch,
            chaining=chaining,
            pool=pool,
        )
        self._started = 0.0

    def stop(self) -> None:
        spec = self.plan.spec.checkpointing
        if spec is not None and spec.on_stop == "checkpoint":
            logger.info("stop requested: taking a checkpoint, then stopping")
        elif not self.executor.state.stop.is_set():
            logger.info("stop requested: ending sources, draining the pipeline")
        self.executor.request_stop()

    def savepoint(self) -> str:
        """Take a savepoint as soon as possible; return where it will be."""
        coordinator = self.executor.state.coordinator
        if coordinator is None:
            raise PipelineRunError("savepoints need a `checkpointing` section")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        location = f"{coordinator.storage.path}/savepoints/{SAVEPOINT_PREFIX}{stamp}"
        logger.info("savepoint requested: writing %s", location)
        self.executor.request_savepoint(location)
        return location

    def snapshot(self) -> ProgressSnapshot:
        metrics = self.executor.state.metrics
        read = sum(m.records_in for m in metrics if m.section == "sources")
        written = sum(m.records_out for m in metrics if m.section == "destinations")
        rejected = self.executor.state.dead_letter.count
        sources = [
            i.plugin
            for i in self.executor.all_instances()
            if isinstance(i.plugin, Source)
        ]
        bounded = all(s.bounded for s in sources)
        progresses = [p for p in (_progress_of(s) for s in sources) if p is not None]
        done = total = None
        unit = "records"
        if bounded and progresses and all(p.total for p in progresses):
            done = sum(p.done for p in progresses)
            total = sum(p.total or 0 for p in progresses)
            unit = progresses[0].unit
        return ProgressSnapshot(
            time.monotonic() - self._started,
            read,
            written,
            rejected,
            done,
            total,
            unit,
            bounded,
        )

    def start(self) -> None:
        """Start the run and return at once; `wait` gives its summary."""
        self._started = time.monotonic()
        self.executor.launch()

    def wait(self, timeout: float | None = None) -> RunSummary | None:
        """Wait up to `timeout` seconds for a started run to end.

        Returns:
            The summary once the run has ended, None while it goes on. A
            failed run returns a summary with status "failed" and the
            error, instead of raising.
        """
        if not self._started:
            raise PipelineRunError("the run has not started: call start() first")
        if not self.executor.wait(timeout):
            return None
        self.executor.finish()
        try:
            self.executor.raise_error()
        except PipelineRunError as exc:
            return self.summary(exc)
        return self.summary()

    def run(
        self,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 0.25,
    ) -> RunSummary:
        self._started = time.monotonic()
        error: PipelineRunError | None = None
        tick = (lambda: on_progress(self.snapshot())) if on_progress else None
        try:
            self.executor.run(on_tick=tick, tick_seconds=progress_interval)
        except PipelineRunError as exc:
            error = exc
        if on_progress is not None:
            on_progress(self.snapshot())
        summary = self.summary(error)
        logger.info(
            "pipeline %r %s in %.2f s: %d records read, %d written, %d rejected",
            summary.pipeline_id,
            summary.status,
            summary.wall_seconds,
            summary.records_read,
            summary.records_written,
            summary.rejected,
        )
        if error is not None:
            error.summary = summary  # type: ignore[attr-defined]
            raise error
        return summary

    def summary(self, error: BaseException | None = None) -> RunSummary:
        state = self.executor.state
        wall = time.monotonic() - self._started
        steps = []
        for step in self.plan.steps.values():
            metrics = [m for m in state.metrics if m.step == step.id]
            counters: dict[str, int] = {}
            for m in metrics:
                for name, value in m.counters.items():
                    counters[name] = counters.get(name, 0) + value
            steps.append(
                StepSummary(
                    step=step.id,
                    section=step.section,
                    type=step.type,
                    parallelism=step.parallelism,
                    records_in=sum(m.records_in for m in metrics),
                    records_out=sum(m.records_out for m in metrics),
                    counters=counters,
                    busy_seconds=sum(m.busy_ns for m in metrics) / 1e9,
                )
            )
        outputs: dict[str, list[str]] = {}
        delivery: dict[str, str] = {}
        tables = {}
        for instance in self.executor.all_instances():
            if isinstance(instance.plugin, Sink):
                info = instance.plugin.info()
                outputs.setdefault(instance.plan.id, []).extend(info.paths)
                delivery[instance.plan.id] = info.delivery
                if self.executor.replaying_sources:
                    delivery[instance.plan.id] = "at-least-once"
                if info.table is not None:
                    tables[instance.plan.id] = info.table
        p50, p99 = state.latency.percentiles(0.5, 0.99)
        restored = state.restored
        resumed_from = None if restored is None else _resumed_from(restored)
        if error is not None:
            status = "failed"
        elif state.stop.is_set() or state.suspending:
            status = "stopped"
        else:
            status = "completed"
        return RunSummary(
            pipeline_id=self.plan.spec.id,
            status=status,
            wall_seconds=wall,
            steps=steps,
            records_read=sum(s.records_in for s in steps if s.section == "sources"),
            records_written=sum(
                s.records_out for s in steps if s.section == "destinations"
            ),
            rejected=state.dead_letter.count,
            late=sum(s.counters.get("late", 0) for s in steps),
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            dead_letter_path=str(state.dead_letter.path)
            if state.dead_letter.count
            else None,
            outputs=outputs,
            delivery=delivery,
            error=str(error) if error else None,
            resumed_from=resumed_from,
            tables=tables,
        )


def run_many(
    plans: Sequence[PipelinePlan], *, pool: TaskPool | None = None
) -> list[RunSummary]:
    """Run many pipelines at once in this process; return their summaries.

    Chains headed by a cooperative source (`generate`, for example) share
    the threads of `pool` (a new `TaskPool` when unset) instead of having
    a thread each, so thousands of small pipelines fit in one process. A
    failed pipeline does not stop the others: its summary has status
    "failed" and the error. If a run cannot start (a closed pool, for
    example), the runs already started are stopped and the error raised.
    """
    pool = pool if pool is not None else TaskPool(name="pipelines")
    runs = [PipelineRun(plan, pool=pool) for plan in plans]
    started: list[PipelineRun] = []
    try:
        for run in runs:
            run.start()
            started.append(run)
    except BaseException:
        # Leave no run going without a handle: stop those already started.
        for run in started:
            run.stop()
        for run in started:
            run.wait()
        raise
    summaries = []
    for run in runs:
        summary = run.wait()
        assert summary is not None
        summaries.append(summary)
    return summaries


def _progress_of(source: Source) -> Progress | None:  # type: ignore[type-arg]
    try:
        return source.progress()
    except AttributeError:
        return None  # not opened yet: its thread is still starting


@contextmanager
def stop_on_signals(run: PipelineRun) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a clean stop; a second signal aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            logger.warning("second signal: aborting without draining")
            run.executor.state.abort.set()
        logger.info("received %s", signal.Signals(signum).name)
        run.stop()

    def savepoint_handler(signum: int, frame: FrameType | None) -> None:
        try:
            run.savepoint()
        except PipelineRunError as exc:
            logger.warning("%s", exc)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, savepoint_handler)
    pid_file = _write_pid_file(run)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


PID_FILE = "run.pid"


def _write_pid_file(run: PipelineRun) -> Path | None:
    """Record the process id next to local checkpoints, for `dataflare savepoint`."""
    coordinator = run.executor.state.coordinator
    if coordinator is None or not coordinator.storage.local:
        return None
    folder = Path(coordinator.storage.path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def _resumed_from(restored: Checkpoint) -> str:
    """Name the checkpoint or savepoint a run resumed from, for its summary."""
    if Path(restored.location).name.startswith(SAVEPOINT_PREFIX):
        return f"savepoint {restored.location} (checkpoint {restored.id})"
    return f"checkpoint {restored.id} at {restored.location}"
