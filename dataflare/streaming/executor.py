"""Run a pipeline plan on threads, one per chain of operator instances.

`PipelinePlan.chains` groups the steps: a step with parallelism 1 whose only
input is an upstream with parallelism 1 and no other consumer joins that
upstream's chain. On a chain the upstream calls the downstream instance
directly (`DirectTarget`), so a source, a few transformations and a sink
can run on one thread with no queue between them. Between chains, messages
go through bounded `Channel`s (`execution.queue_batches` entries per
instance), so a slow sink blocks its upstream instead of filling memory.

Arrow and Polars kernels release the GIL, so columnar work of different
threads runs in parallel. Everything an instance needs is built from its
`StepPlan`. Instances share nothing but the channels, the dead-letter
writer and the run's stop flags. A chain is also the unit that a scheduler
on a fixed thread pool would run as one task.
"""

from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.batch.batcher import split_batch
from dataflare.batch.channel import Channel
from dataflare.plugin.interface import (
    EVENT_TIME,
    RESERVED_COLUMNS,
    Idle,
    Plugin,
    Sink,
    SinkConfig,
    Source,
    SourceBatch,
    Transform,
)
from dataflare.plugin.manager import default_manager
from dataflare.state.backends import StateBackendSettings
from dataflare.state.checkpoint import (
    FINAL_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    CheckpointStorage,
    InstanceState,
)
from dataflare.state.coordinator import CheckpointCoordinator, check_compatible
from dataflare.streaming.deadletter import DeadLetterWriter
from dataflare.streaming.errors import PipelineRunError, RejectedRecordError
from dataflare.streaming.messages import (
    Barrier,
    Data,
    End,
    IdleState,
    Message,
    Watermark,
)
from dataflare.streaming.metrics import LatencyRecorder, StepMetrics
from dataflare.streaming.plan import PipelinePlan, StepPlan
from dataflare.streaming.scheduler import TaskPool, reduce_timer_slack
from dataflare.streaming.time import (
    MAX_TIME,
    MIN_TIME,
    EventTimeExtractor,
    WatermarkGenerator,
)

logger = logging.getLogger(__name__)

_SETTLE_POLL_SECONDS = 0.01  # while waiting for the final checkpoint
_SAVEPOINT_RETRY_SECONDS = 0.05  # while a checkpoint is in flight
_IDLE_WAIT_SECONDS = 0.1  # maximum sleep of an idle source's own thread
_POOL_SLICE_SECONDS = 0.01  # a busy pooled chain lets others run after this
_POOL_IDLE_WAIT_SECONDS = 1.0  # maximum wait of an idle pooled chain

T = TypeVar("T")


class AbortFlag(threading.Event):
    """The run's abort flag. Setting it also calls every `on_set` callback, which
    close the channels and wake the checkpoint trigger, so no thread stays
    blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.on_set: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for wake in self.on_set:
            wake()


class RunState:
    """Flags and shared services of one run."""

    def __init__(self, plan: PipelinePlan) -> None:
        self.plan = plan
        self.stop = threading.Event()  # graceful: sources end, the rest drains
        self.abort = AbortFlag()  # failure: every thread leaves at once
        self.errors: list[tuple[str, BaseException]] = []
        self.fail_fast = plan.spec.errors.policy == "fail"
        self.dead_letter = DeadLetterWriter(plan.dead_letter_path(), plan.spec.id)
        self.metrics: list[StepMetrics] = []
        self.latency = LatencyRecorder()
        self.coordinator: CheckpointCoordinator | None = None
        self.suspending = False  # stopping with a checkpoint, to resume later
        self.restored: Checkpoint | None = None
        self._lock = threading.Lock()

    def fail(self, step: str, exc: BaseException) -> None:
        with self._lock:
            self.errors.append((step, exc))
        self.abort.set()
        self.stop.set()


class StepContext:
    """The `OperatorContext` handed to one plugin instance."""

    def __init__(
        self, state: RunState, plan: StepPlan, instance: int, metrics: StepMetrics
    ) -> None:
        self._state = state
        self._plan = plan
        self._instance = instance
        self.metrics = metrics
        self.side_outlets: dict[str, Outlet] = {}
        self._logger = logging.getLogger(f"dataflare.step.{plan.id}")

    @property
    def step(self) -> str:
        return self._plan.id

    @property
    def instance(self) -> int:
        return self._instance

    @property
    def parallelism(self) -> int:
        return self._plan.parallelism

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    @property
    def stopping(self) -> bool:
        return self._state.stop.is_set()

    def reject(self, records: Any, reasons: Any, positions: Any = None) -> None:
        # A source's plugin rejects records it read but never emits, so they
        # count as read here; the engine's own rejections were counted.
        self.reject_records(
            records, reasons, positions, read=self._plan.section == "sources"
        )

    def reject_records(
        self, records: Any, reasons: Any, positions: Any = None, *, read: bool
    ) -> None:
        """Send records to the dead-letter output; `read` adds them to records_in."""
        count = (
            len(records)
            if not isinstance(records, pa.RecordBatch)
            else records.num_rows
        )
        if count == 0:
            return
        if self._state.fail_fast:
            first = reasons if isinstance(reasons, str) else reasons[0]
            where = f" at {positions[0]}" if positions and positions[0] else ""
            raise RejectedRecordError(
                f"step {self.step!r} rejected a record{where}: {first} "
                "(errors.policy is 'fail' or --fail-fast is set; with "
                "errors.policy: dead_letter and without --fail-fast, bad records "
                "go to the dead-letter file and the run goes on)"
            )
        self._state.dead_letter.write(self.step, records, reasons, positions)
        self.metrics.count("rejected", count)
        if read:
            self.metrics.records_in += count

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        outlet = self.side_outlets.get(port)
        if outlet is None or not outlet.targets:
            # No step reads this side output, so its records go to the
            # dead-letter output instead of being dropped silently.
            self.reject(batch, f"{port} record: no step reads {self.step}.{port}")
            return
        outlet.send_batch(batch, time.monotonic_ns())

    def count(self, name: str, value: int = 1) -> None:
        self.metrics.count(name, value)

    @property
    def checkpointing(self) -> bool:
        return self._state.coordinator is not None

    @property
    def pipeline_id(self) -> str:
        return self._state.plan.spec.id

    @property
    def state_backend(self) -> StateBackendSettings:
        spec = self._state.plan.spec.checkpointing
        if spec is None:
            return StateBackendSettings()
        return StateBackendSettings(spec.state_backend, spec.state_dir)


# --- routing ---------------------------------------------------------------


class StepFailure(Exception):
    """An error raised by `step`, on its way up a chain to the chain's thread."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(step, error)
        self.step = step
        self.error = error


def call_step(step: str, function: Callable[..., T], *args: Any) -> T:
    """Call `function`, marking any error it raises as an error of `step`."""
    try:
        return function(*args)
    except StepFailure:
        raise
    except Exception as exc:
        raise StepFailure(step, exc) from exc


@dataclass
class QueueTarget:
    """A downstream step on other threads, reached through its instances' inboxes."""

    inboxes: list[Channel]  # one per downstream instance
    channel: int  # channel id this upstream instance has at each of them
    key: list[str] | None  # partition key, or None for round-robin
    next_instance: int = 0

    def send_batch(self, batch: pa.RecordBatch, created_ns: int) -> None:
        width = len(self.inboxes)
        if width == 1:
            self.inboxes[0].put(Data(self.channel, batch, created_ns))
        elif self.key is None:
            index = self.next_instance
            self.next_instance = (index + 1) % width
            self.inboxes[index].put(Data(self.channel, batch, created_ns))
        else:
            for index, part in _partition(batch, self.key, width):
                self.inboxes[index].put(Data(self.channel, part, created_ns))

    def broadcast(self, message: Message) -> None:
        for inbox in self.inboxes:
            inbox.put(message)


class DirectTarget:
    """A chained downstream instance, called on the upstream's thread."""

    def __init__(self, consumer: ConsumerInstance, upstream: Instance) -> None:
        self.consumer = consumer
        self.upstream = upstream
        self.channel = 0  # a chained instance has exactly one input channel
        self.step = consumer.plan.id

    def send_batch(self, batch: pa.RecordBatch, created_ns: int) -> None:
        start = time.perf_counter_ns()
        try:
            self.consumer.take_batch(self.channel, batch, created_ns)
        except StepFailure:
            raise
        except Exception as exc:
            raise StepFailure(self.step, exc) from exc
        finally:
            # Time spent downstream is not the upstream's own busy time.
            self.upstream.nested_ns += time.perf_counter_ns() - start

    def broadcast(self, message: Message) -> None:
        call_step(self.step, self.consumer.accept, message)


Target = QueueTarget | DirectTarget


@dataclass
class Outlet:
    """Sends one port's output of one instance to all its consumers."""

    targets: list[Target] = field(default_factory=list)

    def send_batch(self, batch: pa.RecordBatch, created_ns: int) -> None:
        if batch.num_rows == 0:
            return
        for target in self.targets:
            target.send_batch(batch, created_ns)

    def send_watermark(self, watermark: int, created_ns: int) -> None:
        for target in self.targets:
            target.broadcast(Watermark(target.channel, watermark, created_ns))

    def send_idle(self, idle: bool) -> None:
        for target in self.targets:
            target.broadcast(IdleState(target.channel, idle))

    def send_barrier(self, checkpoint_id: int) -> None:
        for target in self.targets:
            target.broadcast(Barrier(target.channel, checkpoint_id))

    def send_end(self, *, suspend: bool = False) -> None:
        for target in self.targets:
            target.broadcast(End(target.channel, suspend))


def _partition(
    batch: pa.RecordBatch, key: list[str], width: int
) -> Iterable[tuple[int, pa.RecordBatch]]:
    import polars as pl  # only for keyed exchanges; most runs never load it

    df = pl.from_arrow(batch.select(key))
    assert isinstance(df, pl.DataFrame)
    hashes = df.hash_rows(seed=0x5EED).to_numpy()
    parts = (hashes % np.uint64(width)).astype(np.int64)
    for index in range(width):
        rows = np.flatnonzero(parts == index)
        if len(rows):
            yield index, batch.take(pa.array(rows))


# --- instances -------------------------------------------------------------


class Instance:
    """One parallel instance of a step.

    It runs on the thread of its `Chain`: as the chain's head it drives the
    work (a source reads, a consumer reads its inbox), and further down the
    chain its upstream calls it directly.
    """

    def __init__(self, state: RunState, plan: StepPlan, index: int) -> None:
        self.state = state
        self.plan = plan
        self.index = index
        self.name = f"{plan.id}[{index}]"
        self.metrics = StepMetrics(plan.id, plan.section)
        state.metrics.append(self.metrics)
        self.context = StepContext(state, plan, index, self.metrics)
        self.outlet = Outlet()
        self.inbox: Channel | None = None  # only when the chain's head reads it
        self.chain: Chain | None = None  # set while wiring
        self.channels = 0  # set while wiring
        self.channel_inputs: list[int] = []  # input index of each channel
        self.nested_ns = 0  # time spent in chained downstream instances
        self.plugin: Plugin | None = None  # type: ignore[type-arg]

    @property
    def key(self) -> tuple[str, int]:
        return (self.plan.id, self.index)

    def outlets(self) -> list[Outlet]:
        return [self.outlet, *self.context.side_outlets.values()]

    def build_plugin(self) -> None:
        plugin_cls: Any = self.plan.plugin_cls
        self.plugin = plugin_cls(self.plan.config, self.context)

    def saved(self) -> InstanceState | None:
        """Return this instance's state in the checkpoint the run resumes from."""
        restored = self.state.restored
        if restored is None:
            return None
        return restored.instance(self.plan.id, self.index)

    def open(self) -> None:
        """Open the plugin and load checkpointed state into it (if resuming)."""
        assert self.plugin is not None
        self.plugin.open()
        self.restore()

    def restore(self) -> None:
        """Load checkpointed state into the opened plugin (if resuming)."""

    def close(self) -> None:
        assert self.plugin is not None
        self.plugin.close()

    def work(self) -> None:
        """Run as the head of a chain until the input ends or the run aborts."""
        raise NotImplementedError

    def poll(self) -> None:
        """Do work that arrives outside the data flow (committing checkpoints)."""

    def settle(self) -> None:
        """Wait, after the input ended, for the checkpoint that covers it."""

    def start(self) -> None:
        """Start the thread that runs this instance's chain (once per chain)."""
        assert self.chain is not None
        self.chain.start()


class Chain:
    """Instances that run on one thread, the head calling the others in turn.

    The head is a source or an instance that reads its inbox, and each
    further member is the only consumer of the one before it. Plugins are
    opened from the last member to the head, so every consumer is ready
    before its upstream sends anything, and closed from the head on. Under
    `Executor.run`, the chain then waits at the `StartGate` until every
    chain of the run has opened its plugins.

    A chain headed by a cooperative source can run on a `TaskPool` instead
    of a thread of its own (`pool`): then `run_slice` does the same work in
    turns, and the pool runs other chains while the source is idle.
    """

    def __init__(self, state: RunState, members: list[Instance]) -> None:
        self.state = state
        self.members = members
        self.head = members[0]
        self.gate: StartGate | None = None  # set by `Executor.run`
        self.pool: TaskPool | None = None  # set by the executor, see `poolable`
        self._pollers: list[Instance] = []
        self._lock = threading.Lock()
        self._started = False
        self._done = threading.Event()
        self._phase = "open"  # on a pool: open, gate, work, then done
        self._opened: list[Instance] = []
        self.thread = threading.Thread(
            target=self.run, name=">".join(m.name for m in members), daemon=True
        )
        for member in members:
            member.chain = self

    @property
    def poolable(self) -> bool:
        """Return whether the head is a source that declares `cooperative`."""
        plugin = self.head.plugin
        return isinstance(plugin, Source) and type(plugin).cooperative

    def add_poller(self, instance: Instance) -> None:
        """Call `instance.poll()` between two messages of the head."""
        self._pollers.append(instance)

    def poll(self) -> None:
        for instance in self._pollers:
            instance.poll()

    def wake(self) -> None:
        """Make the head look at `poll()` work and requests now, if it waits."""
        if self.pool is not None:
            self.pool.wake(self)
        elif self.head.inbox is not None:
            self.head.inbox.wake()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        if self.pool is not None:
            self.pool.submit(self)
        else:
            self.thread.start()

    def run(self) -> None:
        """Run the chain to its end on the calling thread."""
        reduce_timer_slack()
        error: BaseException | None = None
        try:
            self._open()
            if self.gate is not None:
                self.gate.wait_open()
            call_step(self.head.plan.id, self.head.work)
            self._settle()
        except BaseException as exc:
            error = exc
        self._end(error)

    def run_slice(self) -> float | None:
        """Run one turn on a pool thread; see `TaskPool` for the return value."""
        error: BaseException | None = None
        try:
            if self._phase == "open":
                self._phase = "gate"
                self._open()
            if self._phase == "gate":
                gate = self.gate
                if gate is not None and not gate.is_open:
                    gate.when_open(self.wake)
                    return time.monotonic() + _POOL_IDLE_WAIT_SECONDS
                head = self.head
                assert isinstance(head, SourceInstance)
                self._phase = "work"
                if not call_step(head.plan.id, head.begin):
                    self._phase = "done"
            if self._phase == "work":
                head = self.head
                assert isinstance(head, SourceInstance)
                deadline = time.monotonic() + _POOL_SLICE_SECONDS
                due = call_step(head.plan.id, head.advance, deadline)
                if due is not None:
                    return min(due, time.monotonic() + _POOL_IDLE_WAIT_SECONDS)
                self._phase = "done"
        except BaseException as exc:
            error = exc
        self._phase = "done"
        if error is None and self.state.coordinator is not None:
            # Settling waits for the final checkpoint, which may need other
            # chains of this pool: wait on a thread of its own.
            threading.Thread(
                target=self._settle_and_end, name=self.thread.name, daemon=True
            ).start()
        else:
            self._end(error)
        return None

    def _open(self) -> None:
        try:
            for member in reversed(self.members):
                call_step(member.plan.id, member.open)
                self._opened.append(member)
        finally:
            if self.gate is not None:
                self.gate.arrive()

    def _settle(self) -> None:
        for member in self.members:
            call_step(member.plan.id, member.settle)

    def _settle_and_end(self) -> None:
        error: BaseException | None = None
        try:
            self._settle()
        except BaseException as exc:
            error = exc
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        """Close the opened plugins, then report the first error, if any."""
        for member in reversed(self._opened):
            try:
                member.close()
            except Exception as exc:
                if error is None:
                    error = StepFailure(member.plan.id, exc)
                else:
                    logger.exception(
                        "step %r: close failed after an error", member.plan.id
                    )
        self._opened.clear()
        if isinstance(error, StepFailure):
            self._fail(error.step, error.error)
        elif error is not None:
            self._fail(self.head.plan.id, error)
        self._done.set()

    def _fail(self, step: str, exc: BaseException) -> None:
        if not isinstance(exc, RejectedRecordError):
            # Named by pipeline too: a process may run many (`run_many`).
            pipeline = self.state.plan.spec.id
            logger.error("pipeline %r: step %r failed: %s", pipeline, step, exc)
            logger.debug("pipeline %r: step %r traceback", pipeline, step, exc_info=exc)
        self.state.fail(step, exc)

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        if self._started:
            self._done.wait(timeout)


class StartGate:
    """Holds every chain, once it has opened its plugins, until all have.

    Set-up ends when every plugin is open, and only then does data flow.
    """

    def __init__(
        self, chains: int, on_all_arrived: Callable[[], None] | None = None
    ) -> None:
        self._waiting = chains
        self._open = False
        self._condition = threading.Condition()
        self._callbacks: list[Callable[[], None]] = []
        self._on_all_arrived = on_all_arrived

    @property
    def is_open(self) -> bool:
        return self._open

    def arrive(self) -> None:
        """Count one chain as opened (or failed to open).

        The last one calls `on_all_arrived`, on its own thread.
        """
        with self._condition:
            self._waiting -= 1
            self._condition.notify_all()
            last = self._waiting == 0
        if last and self._on_all_arrived is not None:
            self._on_all_arrived()

    def wait_open(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._open)

    def when_open(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the gate opens (at once if it is open)."""
        with self._condition:
            if not self._open:
                self._callbacks.append(callback)
                return
        callback()

    def open(self) -> None:
        """Let every chain go on."""
        with self._condition:
            self._open = True
            self._condition.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class SourceInstance(Instance):
    def build_plugin(self) -> None:
        super().build_plugin()
        self.settling: str | None = None  # "final" or "suspend" once ended
        self.max_rows = self.state.plan.spec.execution.max_batch_rows
        # Ids of completed checkpoints, for `Source.notify_checkpoint_complete`.
        self.completed: queue.SimpleQueue[int] = queue.SimpleQueue()
        if self.state.coordinator is not None:
            self.state.coordinator.notify_queues[self.key] = self.completed

    def restore(self) -> None:
        self.position: dict[str, Any] = {}
        saved = self.saved()
        self.finished_before = saved is not None and saved.finished
        if saved is None or saved.position is None:
            return
        self.position = dict(saved.position)
        source = self.plugin
        assert isinstance(source, Source)
        if not self.plan.replay.sort_by_event_time and "source" in self.position:
            source.restore_position(self.position["source"])

    def work(self) -> None:
        if not self.begin():
            return
        while (due := self.advance()) is not None:
            delay = due - time.monotonic()
            if delay > 0:
                # Wake up often enough to see checkpoint and stop requests.
                time.sleep(min(delay, _IDLE_WAIT_SECONDS))

    def begin(self) -> bool:
        """Get ready to read; return False when there is nothing to read."""
        source = self.plugin
        assert isinstance(source, Source)
        if getattr(self, "finished_before", False):
            # Finished before the checkpoint: everything it read is downstream.
            self._end()
            return False
        execution = self.state.plan.spec.execution
        self.extractor = None
        self.generator = None
        if self.plan.event_time is not None:
            self.extractor = EventTimeExtractor(self.plan.event_time, source.schema())
            self.generator = WatermarkGenerator(self.plan.watermark)
            self._restore_watermark()
        self.sorted_rows = 0
        self.last_checkpoint = 0
        idle_after = self.plan.watermark.idle_timeout
        self.idle_seconds = (
            idle_after.total_seconds() if idle_after is not None else None
        )
        self.last_data = time.monotonic()
        self.idle = False
        items: Iterable[SourceBatch | Idle] = source.read()
        if self.plan.replay.sort_by_event_time:
            assert self.extractor is not None
            skip = int(getattr(self, "position", {}).get("sorted_rows", 0))
            items = self._sorted(items, self.extractor, execution.max_batch_rows, skip)
            self.extractor = None
        self.items = iter(items)
        return True

    def advance(self, deadline: float | None = None) -> float | None:
        """Hand on what the source reads, until it is idle or `deadline` passes.

        Returns:
            The `time.monotonic()` value at which to call again: when the
            source reported its next data due (`Idle.until`), or now when
            the deadline passed. None once the source has ended, suspended
            for a checkpoint, or the run aborted.
        """
        assert self.chain is not None
        poll_chain = self.chain.poll
        extractor = self.extractor
        abort = self.state.abort
        stop = self.state.stop
        for item in self.items:
            if abort.is_set():
                return None
            now = time.monotonic()
            due = None
            if isinstance(item, Idle):
                if (
                    self.idle_seconds is not None
                    and not self.idle
                    and now - self.last_data >= self.idle_seconds
                ):
                    self.idle = True
                    self.outlet.send_idle(True)
                due = item.until
            else:
                if self.idle:
                    self.idle = False
                    self.outlet.send_idle(False)
                self.last_data = now
                self._handle(item, extractor)
            poll_chain()
            if self._checkpoint_if_pending():
                self._suspend()
                return None
            if stop.is_set():
                break
            if due is not None and due > now:
                return due
            if deadline is not None and now >= deadline:
                return now
        if self._checkpoint_if_pending():
            self._suspend()
            return None
        if not abort.is_set():
            self._end()
        return None

    def _handle(self, item: SourceBatch, extractor: EventTimeExtractor | None) -> None:
        if extractor is not None or not self.plan.replay.sort_by_event_time:
            self.metrics.records_in += item.batch.num_rows
        else:
            self.sorted_rows += item.batch.num_rows
        batch = self._accept(item, extractor)
        if batch is None or not batch.num_rows:
            return
        generator = self.generator
        watermark = generator.observe(batch) if generator is not None else None
        # No batch waits here for more rows. In a chain the next step is free
        # whenever this thread runs, and a channel merges the batches that
        # wait while its consumer is busy.
        self._emit(batch)
        if watermark is not None:
            self.outlet.send_watermark(watermark, time.monotonic_ns())

    def _restore_watermark(self) -> None:
        position = getattr(self, "position", {})
        generator = self.generator
        if generator is None or "max_seen" not in position:
            return
        generator.max_seen = int(position["max_seen"])
        generator.current = int(position["watermark"])
        self.outlet.send_watermark(generator.current, time.monotonic_ns())

    def _notify_completed(self) -> None:
        source = self.plugin
        assert isinstance(source, Source)
        while not self.completed.empty():
            try:
                checkpoint_id = self.completed.get_nowait()
            except queue.Empty:
                return
            source.notify_checkpoint_complete(checkpoint_id)

    def settle(self) -> None:
        if self.settling is None:
            return
        await_checkpoint(self.state, final=self.settling == "final")
        self._notify_completed()

    def _checkpoint_if_pending(self) -> bool:
        """Take part in a pending checkpoint; return True to stop after it."""
        coordinator = self.state.coordinator
        if coordinator is None:
            return False
        self._notify_completed()
        checkpoint_id = coordinator.pending()
        if checkpoint_id is None or checkpoint_id <= self.last_checkpoint:
            return False
        coordinator.ack(
            self.key, checkpoint_id, InstanceState(position=self._position())
        )
        self.last_checkpoint = checkpoint_id
        for outlet in self.outlets():
            outlet.send_barrier(checkpoint_id)
        return coordinator.stop_after

    def _position(self) -> dict[str, Any]:
        source = self.plugin
        assert isinstance(source, Source)
        position: dict[str, Any] = {}
        if self.plan.replay.sort_by_event_time:
            position["sorted_rows"] = self.sorted_rows
        else:
            position["source"] = source.snapshot_position()
        if self.generator is not None:
            position["max_seen"] = self.generator.max_seen
            position["watermark"] = self.generator.current
        return position

    def _suspend(self) -> None:
        for outlet in self.outlets():
            outlet.send_end(suspend=True)
        self.settling = "suspend"

    def _end(self) -> None:
        for outlet in self.outlets():
            outlet.send_watermark(MAX_TIME, time.monotonic_ns())
            outlet.send_end()
        if self.state.coordinator is not None:
            if self.state.stop.is_set() and not getattr(self, "finished_before", False):
                # Stopped before its input ended: keep the position, so that
                # the next run goes on from here instead of starting over.
                state = InstanceState(position=self._position(), finished=False)
            else:
                state = InstanceState(finished=True)
            self.state.coordinator.finish(self.key, state)
            self.settling = "final"

    def _sorted(
        self,
        items: Iterable[SourceBatch | Idle],
        extractor: EventTimeExtractor,
        rows: int,
        skip: int,
    ) -> Iterable[SourceBatch]:
        """Read everything, then yield it in event-time order (stable).

        `skip` rows of the sorted input are left out: they were emitted
        before the checkpoint the run resumes from.
        """
        batches = []
        for item in items:
            if isinstance(item, SourceBatch):
                self.metrics.records_in += item.batch.num_rows
                batch = self._accept(item, extractor)
                if batch is not None and batch.num_rows:
                    batches.append(batch)
            if self.state.abort.is_set():
                return
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        order = pc.sort_indices(table, sort_keys=[(EVENT_TIME, "ascending")])
        ordered = table.take(order).slice(skip).combine_chunks()
        self.sorted_rows = skip
        for batch in ordered.to_batches(max_chunksize=rows):
            yield SourceBatch(batch)

    def _accept(
        self, item: SourceBatch, extractor: EventTimeExtractor | None
    ) -> pa.RecordBatch | None:
        batch = item.batch
        if extractor is None:
            return batch
        extracted = extractor.apply(batch)
        if len(extracted.bad_rows):
            rows = pa.array(extracted.bad_rows)
            positions = (
                [item.origin.position(int(i)) for i in extracted.bad_rows]
                if item.origin is not None
                else None
            )
            self.context.reject_records(
                batch.take(rows), extracted.reasons, positions, read=False
            )
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[extracted.bad_rows] = False
            return extracted.batch.filter(pa.array(keep))
        return extracted.batch

    def _emit(self, batch: pa.RecordBatch) -> None:
        for part in split_batch(batch, self.max_rows):
            self.metrics.records_out += part.num_rows
            self.outlet.send_batch(part, time.monotonic_ns())


class ConsumerInstance(Instance):
    """Common input handling: watermarks, idleness, barriers and end.

    Messages come from the inbox when the instance heads its chain
    (`work`), or from the upstream's thread when it is chained (`accept`
    and `take_batch`); both paths handle them the same way.
    """

    def prepare_input(self) -> None:
        """Set up the per-channel state, once the wiring is known."""
        self.watermarks = [MIN_TIME] * self.channels
        self.idle = [False] * self.channels
        self.ended = [False] * self.channels
        self.suspended = False
        self.finished = False
        self.current = MIN_TIME
        self.blocked: set[int] = set()  # channels whose barrier arrived
        self.aligning: int | None = None
        self.held: collections.deque[Message] = collections.deque()
        self.replay: collections.deque[Message] = collections.deque()

    def work(self) -> None:
        inbox = self.inbox
        assert inbox is not None and self.chain is not None
        poll_chain = self.chain.poll
        while not self.finished:
            message = inbox.get()
            if message is not None:
                self.accept(message)
            elif self.state.abort.is_set():
                return
            poll_chain()

    def accept(self, message: Message) -> None:
        """Handle one message, then those it released from barrier alignment."""
        self._dispatch(message)
        while self.replay:
            self._dispatch(self.replay.popleft())

    def take_batch(self, channel: int, batch: pa.RecordBatch, created_ns: int) -> None:
        """Handle records from a chained upstream, without a message object."""
        if self.blocked:
            self.accept(Data(channel, batch, created_ns))
            return
        self._on_batch(batch, created_ns, self.channel_inputs[channel])

    def _on_batch(
        self, batch: pa.RecordBatch, created_ns: int, input_index: int
    ) -> None:
        metrics = self.metrics
        metrics.records_in += batch.num_rows
        metrics.batches_in += 1
        nested = self.nested_ns
        start = time.perf_counter_ns()
        self.on_data(batch, created_ns, input_index)
        elapsed = time.perf_counter_ns() - start
        metrics.busy_ns += elapsed - (self.nested_ns - nested)

    def _dispatch(self, message: Message) -> None:
        if message.channel in self.blocked:
            self.held.append(message)  # aligning: later messages wait
            return
        if isinstance(message, Data):
            input_index = self.channel_inputs[message.channel]
            self._on_batch(message.batch, message.created_ns, input_index)
            return
        if isinstance(message, Barrier):
            self.aligning = message.checkpoint_id
            self.blocked.add(message.channel)
        elif isinstance(message, End):
            self._on_channel_end(message)
        else:
            self._on_time(message)
        if self._aligned():
            assert self.aligning is not None
            self.on_checkpoint(self.aligning)
            self.aligning = None
            self.blocked.clear()
            self.replay.extendleft(reversed(self.held))
            self.held.clear()
        if all(self.ended) and not self.replay:
            self.finished = True
            if self.suspended:
                self.on_suspend()
            else:
                self.on_end()

    def _aligned(self) -> bool:
        if self.aligning is None:
            return False
        return all(c in self.blocked or self.ended[c] for c in range(self.channels))

    def _on_time(self, message: Watermark | IdleState) -> None:
        if isinstance(message, Watermark):
            channel = message.channel
            self.watermarks[channel] = max(self.watermarks[channel], message.time)
            created = message.created_ns
        else:
            self.idle[message.channel] = message.idle
            created = time.monotonic_ns()
        self._advance(created)

    def _on_channel_end(self, message: End) -> None:
        self.ended[message.channel] = True
        if message.suspend:
            # Stopped for a checkpoint: no watermark jump, nothing flushed.
            self.suspended = True
            return
        self.watermarks[message.channel] = MAX_TIME
        index = self.channel_inputs[message.channel]
        same_input = [
            done
            for done, i in zip(self.ended, self.channel_inputs, strict=True)
            if i == index
        ]
        if all(same_input) and not all(self.ended):
            self.on_input_end(index)
        self._advance(time.monotonic_ns())

    def _advance(self, created: int) -> None:
        active = [
            w
            for w, i, e in zip(self.watermarks, self.idle, self.ended, strict=True)
            if not i or e
        ]
        combined = min(active) if active else self.current
        if combined > self.current and not self.suspended:
            self.current = combined
            self.on_watermark(self.current, created)

    def on_data(self, batch: pa.RecordBatch, created_ns: int, input_index: int) -> None:
        raise NotImplementedError

    def on_input_end(self, input_index: int) -> None:
        pass

    def on_watermark(self, watermark: int, created_ns: int) -> None:
        raise NotImplementedError

    def on_checkpoint(self, checkpoint_id: int) -> None:
        raise NotImplementedError

    def on_suspend(self) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        raise NotImplementedError


class TransformInstance(ConsumerInstance):
    def build_plugin(self) -> None:
        super().build_plugin()
        steps = self.state.plan.steps
        inputs = [
            steps[ref.step].output_schema
            if ref.port is None
            else steps[ref.step].side_schemas.get(ref.port)
            for ref in self.plan.inputs
        ]
        transform = self.plugin
        assert isinstance(transform, Transform)
        if all(schema is not None for schema in inputs):
            transform.output_schema(inputs)
        self.transform = transform  # typed, for the per-batch path
        # Loaded now: the first call scans the installed packages' metadata.
        self.manager = default_manager()

    def restore(self) -> None:
        restored = self.state.restored
        if restored is None:
            return
        blob = restored.state_of(self.plan.id, self.index)
        transform = self.plugin
        assert isinstance(transform, Transform)
        if blob is not None:
            transform.restore_state(blob)

    def on_input_end(self, input_index: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        self._emit(transform.on_input_end(input_index), time.monotonic_ns())

    def on_checkpoint(self, checkpoint_id: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        coordinator = self.state.coordinator
        assert coordinator is not None
        blob = transform.snapshot_state()
        coordinator.ack(self.key, checkpoint_id, InstanceState(), blob)
        for outlet in self.outlets():
            outlet.send_barrier(checkpoint_id)

    def on_suspend(self) -> None:
        for outlet in self.outlets():
            outlet.send_end(suspend=True)

    def on_data(self, batch: pa.RecordBatch, created_ns: int, input_index: int) -> None:
        start = time.perf_counter()
        try:
            output = self.transform.process(batch, input_index)
        except Exception:
            self._record_call(batch.num_rows, start, error=True)
            raise
        self._record_call(batch.num_rows, start, error=False)
        self._emit(output, created_ns)

    def _record_call(self, rows: int, start: float, *, error: bool) -> None:
        # Feeds `dataflare plugin list` and the manager's counters.
        self.manager.record_call(
            self.plan.section,
            self.plan.type,
            records=rows,
            seconds=time.perf_counter() - start,
            error=error,
        )

    def on_watermark(self, watermark: int, created_ns: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        self._emit(transform.on_watermark(watermark), created_ns)
        self.outlet.send_watermark(watermark, created_ns)
        for outlet in self.context.side_outlets.values():
            outlet.send_watermark(watermark, created_ns)

    def on_end(self) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        self._emit(transform.finish(), time.monotonic_ns())
        self.outlet.send_end()
        for outlet in self.context.side_outlets.values():
            outlet.send_end()
        if self.state.coordinator is not None:
            self.state.coordinator.finish(self.key, InstanceState(finished=True))

    def _emit(self, batches: list[pa.RecordBatch], created_ns: int) -> None:
        for batch in batches:
            self.metrics.records_out += batch.num_rows
            self.outlet.send_batch(batch, created_ns)


class SinkInstance(ConsumerInstance):
    def build_plugin(self) -> None:
        super().build_plugin()
        config = self.plan.config
        self.keep_metadata = isinstance(config, SinkConfig) and config.include_metadata
        schema = self.plan.input_schema
        if schema is not None and not self.keep_metadata:
            schema = pa.schema([f for f in schema if f.name not in RESERVED_COLUMNS])
        assert isinstance(self.plugin, Sink)
        self.sink = self.plugin  # typed, for the per-batch path
        self.sink.input_schema = schema
        self.sink.transactional = self.state.coordinator is not None
        self._schema_seen: pa.Schema | None = None
        self._reserved_seen: list[str] = []
        self.settling: str | None = None  # "final" or "suspend" once ended
        self.commits = CommitQueue()
        if self.state.coordinator is not None:
            self.state.coordinator.commit_queues[self.key] = self.commits

    def restore(self) -> None:
        saved = self.saved()
        restored = self.state.restored
        if saved is None or restored is None:
            return
        sink = self.plugin
        assert isinstance(sink, Sink)
        sink.restore(saved.sink, restored.id)

    def poll(self) -> None:
        sink = self.plugin
        assert isinstance(sink, Sink)
        while not self.commits.empty():
            try:
                checkpoint_id = self.commits.get_nowait()
            except queue.Empty:
                return
            sink.commit(checkpoint_id)

    def on_checkpoint(self, checkpoint_id: int) -> None:
        sink = self.plugin
        assert isinstance(sink, Sink)
        coordinator = self.state.coordinator
        assert coordinator is not None
        state = sink.prepare_commit(checkpoint_id)
        coordinator.ack(self.key, checkpoint_id, InstanceState(sink=state))

    def on_suspend(self) -> None:
        self.settling = "suspend"

    def on_data(self, batch: pa.RecordBatch, created_ns: int, input_index: int) -> None:
        if not self.keep_metadata:
            reserved = self._reserved_in(batch.schema)
            if reserved:
                batch = batch.drop_columns(reserved)
        self.sink.write(batch)
        self.metrics.records_out += batch.num_rows
        self.state.latency.record(created_ns, batch.num_rows)

    def _reserved_in(self, schema: pa.Schema) -> list[str]:
        """Return the reserved columns in `schema`, cached for the last schema seen."""
        if self._schema_seen is None or not schema.equals(self._schema_seen):
            self._schema_seen = schema
            self._reserved_seen = [n for n in schema.names if n in RESERVED_COLUMNS]
        return self._reserved_seen

    def on_watermark(self, watermark: int, created_ns: int) -> None:
        pass

    def on_end(self) -> None:
        sink = self.plugin
        assert isinstance(sink, Sink)
        coordinator = self.state.coordinator
        if coordinator is None:
            sink.flush()
            return
        state = sink.prepare_commit(FINAL_CHECKPOINT)
        coordinator.finish(self.key, InstanceState(finished=True, sink=state))
        self.settling = "final"

    def settle(self) -> None:
        """Wait until the final checkpoint (or the one in flight) is written,
        then publish the output it covers."""
        if self.settling is None:
            return
        await_checkpoint(self.state, final=self.settling == "final")
        self.poll()


class CommitQueue(queue.SimpleQueue[int]):
    """Ids of completed checkpoints for a sink. A put wakes the sink's chain."""

    def __init__(self) -> None:
        super().__init__()
        self.wake: Callable[[], None] | None = None  # set while wiring

    def put(self, item: int, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.wake is not None:
            self.wake()


def await_checkpoint(state: RunState, *, final: bool) -> None:
    """Wait until the final checkpoint is written (`final`), or until no
    checkpoint is in flight any more. An abort ends the wait too."""
    coordinator = state.coordinator
    if coordinator is None:
        return
    while not state.abort.is_set():
        if coordinator.done.is_set():
            return
        if not final and coordinator.pending() is None:
            return
        coordinator.done.wait(_SETTLE_POLL_SECONDS)


# --- the run ---------------------------------------------------------------


def _partition_key(instance: Instance, parallelism: int) -> list[str] | None:
    if parallelism > 1 and isinstance(instance.plugin, Transform):
        return instance.plugin.partition_key()
    return None


INSTANCE_TYPES: dict[str, type[Instance]] = {
    "sources": SourceInstance,
    "transformations": TransformInstance,
    "destinations": SinkInstance,
}


class Executor:
    """Wires instances of a plan together and runs them to the end."""

    def __init__(
        self,
        plan: PipelinePlan,
        *,
        resume_from: str | None = None,
        from_scratch: bool = False,
        chaining: bool | None = None,
        pool: TaskPool | None = None,
    ) -> None:
        """Build every instance and its plugin, and wire them together.

        Args:
            plan: The validated pipeline.
            resume_from: Checkpoint or savepoint directory to resume from;
                the latest checkpoint if unset.
            from_scratch: Delete the pipeline's checkpoints first.
            chaining: Run chainable steps on their upstream's thread
                (`PipelinePlan.chains`); unset takes `execution.chaining`
                from the pipeline, which is on by default.
            pool: Run the chains headed by a cooperative source on this
                shared pool instead of threads of their own; for processes
                that host many pipelines.
        """
        self.plan = plan
        self.chaining = chaining_setting(plan) if chaining is None else chaining
        self.state = RunState(plan)
        self.savepoint_requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._trigger_wake = threading.Event()  # a savepoint request, or the end
        self.state.abort.on_set.append(self._trigger_wake.set)
        self.replaying_sources: list[str] = []
        self._set_up_checkpoints(resume_from, from_scratch)
        self.instances: dict[str, list[Instance]] = {}
        for step in plan.steps.values():
            kind = INSTANCE_TYPES[step.section]
            self.instances[step.id] = [
                kind(self.state, step, i) for i in range(step.parallelism)
            ]
        for instance in self.all_instances():
            instance.build_plugin()
        if self.state.coordinator is not None:
            self._check_checkpointable()
        self._gate: StartGate | None = None
        self._tuned = False
        self._finished = False
        self.chains = self._group_chains()
        self.pooled = [c for c in self.chains if pool is not None and c.poolable]
        for chain in self.pooled:
            chain.pool = pool
        if self.pooled:
            self.state.abort.on_set.append(self._wake_pooled)
        self._wire()

    def _set_up_checkpoints(self, resume_from: str | None, from_scratch: bool) -> None:
        spec = self.plan.spec.checkpointing
        if spec is None:
            if resume_from is not None:
                raise PipelineRunError(
                    "cannot resume: the pipeline has no `checkpointing` section"
                )
            return
        storage = CheckpointStorage(
            spec.storage.replace("{pipeline_id}", self.plan.spec.id)
        )
        restored: Checkpoint | None
        try:
            if from_scratch:
                storage.clear()
            if resume_from is not None:
                restored = storage.load(resume_from)
            else:
                restored = storage.latest()
            if restored is not None and restored.finished:
                logger.info(
                    "the last run completed (checkpoint %d); starting anew", restored.id
                )
                storage.clear()
                restored = None
            if restored is not None:
                check_compatible(self.plan, restored)
                logger.info(
                    "resuming from checkpoint %d at %s", restored.id, restored.location
                )
        except CheckpointError as exc:
            raise PipelineRunError(str(exc)) from exc
        self.state.restored = restored
        keys = [
            (step.id, index)
            for step in self.plan.steps.values()
            for index in range(step.parallelism)
        ]
        self.state.coordinator = CheckpointCoordinator(
            self.plan, storage, keys, keep=spec.keep, restored=restored
        )
        # Rejected records before a checkpoint's positions must be on disk
        # before the checkpoint, or a crash after it would lose them.
        self.state.coordinator.before_write = self.state.dead_letter.sync

    def _check_checkpointable(self) -> None:
        # A source without positions replays from its start after a crash, so
        # outputs downstream of it can only be at-least-once.
        self.replaying_sources = sorted(
            {
                i.plan.id
                for i in self.all_instances()
                if isinstance(i.plugin, Source)
                and type(i.plugin).snapshot_position is Source.snapshot_position
            }
        )
        if self.replaying_sources:
            logger.warning(
                "sources %s cannot resume from a position: after a crash they "
                "start over, so this run's outputs are at-least-once",
                ", ".join(self.replaying_sources),
            )
        for instance in self.all_instances():
            plugin = instance.plugin
            if (
                isinstance(plugin, Transform)
                and plugin.stateful
                and type(plugin).snapshot_state is Transform.snapshot_state
            ):
                raise PipelineRunError(
                    f"step {instance.plan.id!r} (type {instance.plan.type!r}) keeps "
                    "state that cannot be saved in checkpoints yet; remove the "
                    "`checkpointing` section to run it without checkpoints"
                )

    def _group_chains(self) -> list[Chain]:
        chains = []
        for steps in self.plan.chains(enabled=self.chaining):
            if len(steps) == 1:
                # Alone in its chain: every instance gets a thread.
                for instance in self.instances[steps[0]]:
                    chains.append(Chain(self.state, [instance]))
            else:
                members = [self.instances[step][0] for step in steps]
                chains.append(Chain(self.state, members))
        return chains

    def _wire(self) -> None:
        execution = self.plan.spec.execution
        for chain in self.chains:
            head = chain.head
            if isinstance(head, ConsumerInstance):
                head.inbox = Channel(
                    capacity=execution.queue_batches,
                    max_rows=execution.max_batch_rows,
                )
                self.state.abort.on_set.append(head.inbox.close)
        for step in self.plan.steps.values():
            downstream = self.instances[step.id]
            for input_index, ref in enumerate(step.inputs):
                for upstream in self.instances[ref.step]:
                    channel = downstream[0].channels
                    for instance in downstream:
                        instance.channels += 1
                        instance.channel_inputs.append(input_index)
                    if ref.port is None:
                        outlet = upstream.outlet
                    else:
                        outlet = upstream.context.side_outlets.setdefault(
                            ref.port, Outlet()
                        )
                    outlet.targets.append(
                        self._target(upstream, downstream, channel, step.parallelism)
                    )
        for instance in self.all_instances():
            if isinstance(instance, ConsumerInstance):
                instance.prepare_input()
            if isinstance(instance, SinkInstance) and self.state.coordinator:
                assert instance.chain is not None
                instance.commits.wake = instance.chain.wake
                instance.chain.add_poller(instance)

    def _target(
        self,
        upstream: Instance,
        downstream: list[Instance],
        channel: int,
        parallelism: int,
    ) -> Target:
        [first, *_] = downstream
        if first.chain is upstream.chain:
            assert isinstance(first, ConsumerInstance) and channel == 0
            return DirectTarget(first, upstream)
        inboxes = []
        for instance in downstream:
            assert instance.inbox is not None
            inboxes.append(instance.inbox)
        return QueueTarget(
            inboxes=inboxes, channel=channel, key=_partition_key(first, parallelism)
        )

    def all_instances(self) -> list[Instance]:
        return [i for group in self.instances.values() for i in group]

    def sources(self) -> list[Source]:  # type: ignore[type-arg]
        return [
            i.plugin
            for group in self.instances.values()
            for i in group
            if isinstance(i.plugin, Source)
        ]

    def run(
        self, on_tick: Callable[[], None] | None = None, tick_seconds: float = 0.25
    ) -> None:
        """Run to the end; call `on_tick` every `tick_seconds` meanwhile.

        Raises:
            PipelineRunError: a step failed; the run was aborted.
        """
        try:
            self.launch()
            while not self.wait(tick_seconds):
                if on_tick is not None:
                    on_tick()
        finally:
            self.finish()
        self.raise_error()

    def launch(self) -> None:
        """Start the run and return at once; `wait` and `finish` follow.

        Every chain opens its plugins, and data flows once all have: the
        last chain to arrive at the start gate opens it.
        """
        logger.info(
            "pipeline %r starting: %d steps, %d instances on %d threads "
            "and %d pool tasks (chaining %s)",
            self.plan.spec.id,
            len(self.plan.steps),
            len(self.all_instances()),
            len(self.chains) - len(self.pooled),
            len(self.pooled),
            "on" if self.chaining else "off",
        )
        gate = StartGate(len(self.chains), on_all_arrived=self._all_opened)
        self._gate = gate
        self.state.abort.on_set.append(gate.open)
        for chain in self.chains:
            chain.gate = gate
        self.start()

    def _all_opened(self) -> None:
        """Tune the process, start the checkpoint trigger, let data flow."""
        PROCESS_TUNING.enter(threaded=self._threaded)
        self._tuned = True
        if self.state.coordinator is not None:
            trigger = threading.Thread(
                target=self._trigger_checkpoints, name="checkpoints", daemon=True
            )
            trigger.start()
        assert self._gate is not None
        self._gate.open()

    def started(self) -> bool:
        """Return whether every plugin is open and data flows (see `launch`)."""
        return self._gate is not None and self._gate.is_open

    @property
    def _threaded(self) -> bool:
        return len(self.chains) > 1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for every chain to end; True if all have."""
        for chain in self.chains:
            if chain.is_alive():
                chain.join(timeout)
                if chain.is_alive():
                    return False
        return True

    def finish(self) -> None:
        """Clean up after the run ended or failed; `run` calls it."""
        if self._finished:
            return
        self._finished = True
        if self.state.errors:
            self.state.abort.set()
        for chain in self.chains:
            chain.join(timeout=5)
        self._trigger_wake.set()  # the trigger thread leaves
        if self._gate is not None:
            self._gate.open()  # if the run failed early, chains at the gate leave
        self.state.dead_letter.close()
        if self._tuned:
            self._tuned = False
            PROCESS_TUNING.leave(threaded=self._threaded)

    def raise_error(self) -> None:
        """Raise the first step failure as a `PipelineRunError`, if any."""
        if self.state.errors:
            step, exc = self.state.errors[0]
            if isinstance(exc, PipelineRunError):
                raise exc
            raise PipelineRunError(f"step {step!r} failed: {exc}") from exc

    def start(self) -> None:
        """Start the thread of every chain; `run` calls it."""
        for chain in self.chains:
            chain.start()

    def _trigger_checkpoints(self) -> None:
        coordinator = self.state.coordinator
        spec = self.plan.spec.checkpointing
        assert coordinator is not None and spec is not None
        interval = spec.interval.total_seconds()
        next_at = time.monotonic() + interval
        retry_savepoint = False
        while not (
            self.state.abort.is_set()
            or coordinator.done.is_set()
            or coordinator.stopped
        ):
            timeout = max(0.0, next_at - time.monotonic())
            if retry_savepoint:
                timeout = min(timeout, _SAVEPOINT_RETRY_SECONDS)
            self._trigger_wake.wait(timeout)
            self._trigger_wake.clear()
            try:
                location = self.savepoint_requests.get_nowait()
            except queue.Empty:
                location = None
            retry_savepoint = False
            if location is not None:
                if coordinator.trigger(savepoint=location) is None:
                    self.savepoint_requests.put(location)  # busy: try again
                    retry_savepoint = True
                self._wake_pooled()
                continue
            if time.monotonic() >= next_at:
                coordinator.trigger()
                self._wake_pooled()
                next_at = time.monotonic() + interval

    def request_stop(self) -> None:
        coordinator = self.state.coordinator
        spec = self.plan.spec.checkpointing
        if (
            coordinator is not None
            and spec is not None
            and spec.on_stop == "checkpoint"
        ):
            coordinator.trigger(stop_after=True)
            self.state.suspending = True
        else:
            self.state.stop.set()
        self._wake_pooled()

    def _wake_pooled(self) -> None:
        """Make the pooled chains see a request now instead of when next due."""
        for chain in self.pooled:
            chain.wake()

    def request_savepoint(self, location: str) -> None:
        """Take a savepoint into `location` as soon as no checkpoint is in flight."""
        if self.state.coordinator is None:
            raise PipelineRunError("savepoints need a `checkpointing` section")
        self.savepoint_requests.put(location)
        self._trigger_wake.set()


def chaining_setting(plan: PipelinePlan) -> bool:
    """Return the pipeline's `execution.chaining` (on unless set to false)."""
    return plan.spec.execution.chaining


class ProcessTuning:
    """Process-wide interpreter settings while pipelines run, counted per run.

    - While a run has more than one thread, the GIL switch interval is
      lowered to `SWITCH_SECONDS`. A thread that keeps the GIL (a source
      that always has records due) otherwise makes every other thread wait
      up to 5 ms, Python's default, for each turn. W3 at 150,000 records/s
      with `--chaining off` had p99 105 ms at 5 ms and 22 ms at 0.5 ms, and
      W1 over 2,000,000 records with chaining off took 4.49 s and 4.59 s
      (medians of 3, 2-core machine).

    When the last run ends, the switch interval is restored. The setting is
    process-wide.

    NOTE: the heap is not frozen (`gc.freeze()`) once plugins are open. That
    cut a full collection from 41 ms to 0.03 ms for the W3 pipeline. But it
    also froze garbage cycles left by earlier code, which were then collected
    at a random later point.
    """

    SWITCH_SECONDS = 0.0005

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threaded_runs = 0
        self._saved_interval = sys.getswitchinterval()

    def enter(self, *, threaded: bool) -> None:
        with self._lock:
            if threaded:
                if self._threaded_runs == 0:
                    self._saved_interval = sys.getswitchinterval()
                    sys.setswitchinterval(
                        min(self._saved_interval, self.SWITCH_SECONDS)
                    )
                self._threaded_runs += 1

    def leave(self, *, threaded: bool) -> None:
        with self._lock:
            if threaded:
                self._threaded_runs -= 1
                if self._threaded_runs == 0:
                    sys.setswitchinterval(self._saved_interval)


PROCESS_TUNING = ProcessTuning()
