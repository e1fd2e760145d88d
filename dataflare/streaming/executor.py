"""Run a pipeline plan on threads, one per operator instance.

Instances talk only through bounded queues (`execution.queue_batches` per
instance), so a slow sink blocks its upstream instead of filling memory.
Arrow and Polars kernels release the GIL, so columnar work of different
instances runs in parallel. Everything an instance needs is built from its
`StepPlan`; no state is shared between instances but the queues, the
dead-letter writer and the run's stop flags.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.batch.batcher import AdaptiveBatcher
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
from dataflare.streaming.time import (
    MAX_TIME,
    MIN_TIME,
    EventTimeExtractor,
    WatermarkGenerator,
)

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.05


class RunState:
    """Flags and shared services of one run."""

    def __init__(self, plan: PipelinePlan) -> None:
        self.plan = plan
        self.stop = threading.Event()  # graceful: sources end, the rest drains
        self.abort = threading.Event()  # failure: every thread leaves at once
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


@dataclass
class Target:
    """One downstream step reached from an outlet."""

    queues: list[queue.Queue[Message]]  # one per downstream instance
    channel: int  # channel id this upstream instance has at each of them
    key: list[str] | None  # partition key, or None for round-robin
    next_instance: int = 0


@dataclass
class Outlet:
    """Sends one port's output of one instance to all its consumers."""

    state: RunState
    targets: list[Target] = field(default_factory=list)

    def send_batch(self, batch: pa.RecordBatch, created_ns: int) -> None:
        if batch.num_rows == 0:
            return
        for target in self.targets:
            width = len(target.queues)
            if width == 1:
                self._put(target.queues[0], Data(target.channel, batch, created_ns))
            elif target.key is None:
                index = target.next_instance
                target.next_instance = (index + 1) % width
                self._put(target.queues[index], Data(target.channel, batch, created_ns))
            else:
                for index, part in _partition(batch, target.key, width):
                    self._put(
                        target.queues[index], Data(target.channel, part, created_ns)
                    )

    def send_watermark(self, watermark: int, created_ns: int) -> None:
        for target in self.targets:
            for q in target.queues:
                self._put(q, Watermark(target.channel, watermark, created_ns))

    def send_idle(self, idle: bool) -> None:
        for target in self.targets:
            for q in target.queues:
                self._put(q, IdleState(target.channel, idle))

    def send_barrier(self, checkpoint_id: int) -> None:
        for target in self.targets:
            for q in target.queues:
                self._put(q, Barrier(target.channel, checkpoint_id))

    def send_end(self, *, suspend: bool = False) -> None:
        for target in self.targets:
            for q in target.queues:
                self._put(q, End(target.channel, suspend))

    def backlog(self) -> int:
        return max((q.qsize() for t in self.targets for q in t.queues), default=0)

    def _put(self, q: queue.Queue[Message], message: Message) -> None:
        while not self.state.abort.is_set():
            try:
                q.put(message, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue


def _partition(
    batch: pa.RecordBatch, key: list[str], width: int
) -> Iterable[tuple[int, pa.RecordBatch]]:
    df = pl.from_arrow(batch.select(key))
    assert isinstance(df, pl.DataFrame)
    hashes = df.hash_rows(seed=0x5EED).to_numpy()
    parts = (hashes % np.uint64(width)).astype(np.int64)
    for index in range(width):
        rows = np.flatnonzero(parts == index)
        if len(rows):
            yield index, batch.take(pa.array(rows))


# --- instances -------------------------------------------------------------


class Instance(threading.Thread):
    """One parallel instance of a step, running on its own thread."""

    def __init__(self, state: RunState, plan: StepPlan, index: int) -> None:
        super().__init__(name=f"{plan.id}[{index}]", daemon=True)
        self.state = state
        self.plan = plan
        self.index = index
        self.metrics = StepMetrics(plan.id, plan.section)
        state.metrics.append(self.metrics)
        self.context = StepContext(state, plan, index, self.metrics)
        self.outlet = Outlet(state)
        self.inbox: queue.Queue[Message] = queue.Queue(
            maxsize=state.plan.spec.execution.queue_batches
        )
        self.channels = 0  # set while wiring
        self.channel_inputs: list[int] = []  # input index of each channel
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

    def restore(self) -> None:
        """Load checkpointed state into the opened plugin (if resuming)."""

    def run(self) -> None:
        try:
            assert self.plugin is not None
            failed = True
            try:
                self.plugin.open()
                self.restore()
                self.work()
                failed = False
            finally:
                try:
                    self.plugin.close()
                except Exception:
                    if not failed:
                        raise
                    logger.exception(
                        "step %r: close failed after an error", self.plan.id
                    )
        except BaseException as exc:
            if not isinstance(exc, RejectedRecordError):
                logger.error("step %r failed: %s", self.plan.id, exc)
                logger.debug("step %r traceback", self.plan.id, exc_info=exc)
            self.state.fail(self.plan.id, exc)

    def work(self) -> None:
        raise NotImplementedError

    def receive(self) -> Message | None:
        while not self.state.abort.is_set():
            try:
                return self.inbox.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        return None


class SourceInstance(Instance):
    def build_plugin(self) -> None:
        super().build_plugin()
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
        source = self.plugin
        assert isinstance(source, Source)
        if getattr(self, "finished_before", False):
            # Finished before the checkpoint: everything it read is downstream.
            self._end()
            return
        execution = self.state.plan.spec.execution
        extractor = None
        self.generator = None
        if self.plan.event_time is not None:
            extractor = EventTimeExtractor(self.plan.event_time, source.schema())
            self.generator = WatermarkGenerator(self.plan.watermark)
            self._restore_watermark()
        self.batcher = AdaptiveBatcher(
            max_rows=execution.max_batch_rows,
            linger_seconds=execution.linger.total_seconds(),
        )
        self.sorted_rows = 0
        self.last_checkpoint = 0
        idle_after = self.plan.watermark.idle_timeout
        idle_seconds = idle_after.total_seconds() if idle_after is not None else None
        last_data = time.monotonic()
        idle = False

        items: Iterable[SourceBatch | Idle] = source.read()
        if self.plan.replay.sort_by_event_time:
            assert extractor is not None
            skip = int(getattr(self, "position", {}).get("sorted_rows", 0))
            items = self._sorted(items, extractor, execution.max_batch_rows, skip)
            extractor = None
        for item in items:
            if self.state.abort.is_set():
                return
            now = time.monotonic()
            if isinstance(item, Idle):
                self._flush(self.batcher.drain())
                if (
                    idle_seconds is not None
                    and not idle
                    and now - last_data >= idle_seconds
                ):
                    idle = True
                    self.outlet.send_idle(True)
            else:
                if idle:
                    idle = False
                    self.outlet.send_idle(False)
                last_data = now
                self._handle(item, extractor)
            if self._checkpoint_if_pending():
                self._suspend()
                return
            if self.state.stop.is_set():
                break
        self._flush(self.batcher.drain())
        if self._checkpoint_if_pending():
            self._suspend()
            return
        if not self.state.abort.is_set():
            self._end()

    def _handle(self, item: SourceBatch, extractor: EventTimeExtractor | None) -> None:
        if extractor is not None or not self.plan.replay.sort_by_event_time:
            self.metrics.records_in += item.batch.num_rows
        else:
            self.sorted_rows += item.batch.num_rows
        batch = self._accept(item, extractor)
        if batch is None or not batch.num_rows:
            self._flush(self.batcher.due())
            return
        generator = self.generator
        watermark = generator.observe(batch) if generator is not None else None
        for ready in self.batcher.add(
            batch, downstream_idle=self.outlet.backlog() == 0
        ):
            self._emit(ready)
        if watermark is not None:
            # Records and watermark stay in order: flush before the mark.
            self._flush(self.batcher.drain())
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
        while True:
            try:
                checkpoint_id = self.completed.get_nowait()
            except queue.Empty:
                return
            source.notify_checkpoint_complete(checkpoint_id)

    def _await_checkpoint(self, *, final: bool) -> None:
        """Wait for the final checkpoint (or the one in flight), then notify."""
        coordinator = self.state.coordinator
        if coordinator is None:
            return
        while not self.state.abort.is_set():
            if coordinator.done.is_set():
                break
            if not final and coordinator.pending() is None:
                break
            time.sleep(_POLL_SECONDS / 5)
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
        self._flush(self.batcher.drain())
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
        self._await_checkpoint(final=False)

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
            self._await_checkpoint(final=True)

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
            self.context.reject(batch.take(rows), extracted.reasons, positions)
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[extracted.bad_rows] = False
            return extracted.batch.filter(pa.array(keep))
        return extracted.batch

    def _flush(self, batches: list[pa.RecordBatch]) -> None:
        for batch in batches:
            self._emit(batch)

    def _emit(self, batch: pa.RecordBatch) -> None:
        self.metrics.records_out += batch.num_rows
        self.outlet.send_batch(batch, time.monotonic_ns())


class _ConsumerInstance(Instance):
    """Common input handling: watermarks, idleness, barriers and end."""

    def work(self) -> None:
        self.watermarks = [MIN_TIME] * self.channels
        self.idle = [False] * self.channels
        self.ended = [False] * self.channels
        self.suspended = False
        self.current = MIN_TIME
        self.blocked: set[int] = set()  # channels whose barrier arrived
        self.aligning: int | None = None
        held: collections.deque[Message] = collections.deque()
        replay: collections.deque[Message] = collections.deque()
        while True:
            message = replay.popleft() if replay else self.receive()
            if message is None:
                return
            if message.channel in self.blocked:
                held.append(message)  # aligning: later messages wait
                continue
            if isinstance(message, Data):
                start = time.perf_counter_ns()
                self.metrics.records_in += message.batch.num_rows
                self.metrics.batches_in += 1
                self.on_data(message, self.channel_inputs[message.channel])
                self.metrics.busy_ns += time.perf_counter_ns() - start
                continue
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
                replay.extendleft(reversed(held))
                held.clear()
            if all(self.ended) and not replay:
                if self.suspended:
                    self.on_suspend()
                else:
                    self.on_end()
                return

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

    def on_data(self, message: Data, input_index: int) -> None:
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


class TransformInstance(_ConsumerInstance):
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

    def on_data(self, message: Data, input_index: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        start = time.perf_counter()
        try:
            output = transform.process(message.batch, input_index)
        except Exception:
            self._record_call(message.batch.num_rows, start, error=True)
            raise
        self._record_call(message.batch.num_rows, start, error=False)
        self._emit(output, message.created_ns)

    def _record_call(self, rows: int, start: float, *, error: bool) -> None:
        # Feeds `dataflare plugin list` and the manager's counters.
        default_manager().record_call(
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


class SinkInstance(_ConsumerInstance):
    def build_plugin(self) -> None:
        super().build_plugin()
        config = self.plan.config
        self.keep_metadata = isinstance(config, SinkConfig) and config.include_metadata
        schema = self.plan.input_schema
        if schema is not None and not self.keep_metadata:
            schema = pa.schema([f for f in schema if f.name not in RESERVED_COLUMNS])
        if isinstance(self.plugin, Sink):
            self.plugin.input_schema = schema
            self.plugin.transactional = self.state.coordinator is not None
        self.commits: queue.SimpleQueue[int] = queue.SimpleQueue()
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

    def receive(self) -> Message | None:
        while not self.state.abort.is_set():
            self._commit_completed()
            try:
                return self.inbox.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        return None

    def _commit_completed(self) -> None:
        sink = self.plugin
        assert isinstance(sink, Sink)
        while True:
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
        self._await_checkpoint(final=False)

    def on_data(self, message: Data, input_index: int) -> None:
        sink = self.plugin
        assert isinstance(sink, Sink)
        batch = message.batch
        if not self.keep_metadata:
            reserved = [n for n in batch.schema.names if n in RESERVED_COLUMNS]
            if reserved:
                batch = batch.drop_columns(reserved)
        sink.write(batch)
        self.metrics.records_out += batch.num_rows
        self.state.latency.record(message.created_ns, batch.num_rows)

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
        self._await_checkpoint()

    def _await_checkpoint(self, *, final: bool = True) -> None:
        """Wait until the final checkpoint (or the one in flight) is written,
        then publish the output it covers."""
        coordinator = self.state.coordinator
        assert coordinator is not None
        while not self.state.abort.is_set():
            if coordinator.done.is_set():
                break
            if not final and coordinator.pending() is None:
                break
            time.sleep(_POLL_SECONDS / 5)
        self._commit_completed()


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
    ) -> None:
        self.plan = plan
        self.state = RunState(plan)
        self.savepoint_requests: queue.SimpleQueue[str] = queue.SimpleQueue()
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

    def _wire(self) -> None:
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
                            ref.port, Outlet(self.state)
                        )
                    outlet.targets.append(
                        Target(
                            queues=[i.inbox for i in downstream],
                            channel=channel,
                            key=_partition_key(downstream[0], step.parallelism),
                        )
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
        instances = self.all_instances()
        logger.info(
            "pipeline %r starting: %d steps, %d instances",
            self.plan.spec.id,
            len(self.plan.steps),
            len(instances),
        )
        for instance in instances:
            instance.start()
        trigger = None
        if self.state.coordinator is not None:
            trigger = threading.Thread(
                target=self._trigger_checkpoints, name="checkpoints", daemon=True
            )
            trigger.start()
        try:
            for instance in instances:
                while instance.is_alive():
                    instance.join(timeout=tick_seconds)
                    if on_tick is not None:
                        on_tick()
        finally:
            self.state.abort.set() if self.state.errors else None
            for instance in instances:
                instance.join(timeout=5)
            self.state.dead_letter.close()
        if self.state.errors:
            step, exc = self.state.errors[0]
            if isinstance(exc, PipelineRunError):
                raise exc
            raise PipelineRunError(f"step {step!r} failed: {exc}") from exc

    def _trigger_checkpoints(self) -> None:
        coordinator = self.state.coordinator
        spec = self.plan.spec.checkpointing
        assert coordinator is not None and spec is not None
        interval = spec.interval.total_seconds()
        next_at = time.monotonic() + interval
        while not (
            self.state.abort.is_set()
            or coordinator.done.is_set()
            or coordinator.stopped
        ):
            time.sleep(min(_POLL_SECONDS, interval))
            try:
                location = self.savepoint_requests.get_nowait()
            except queue.Empty:
                location = None
            if location is not None:
                if coordinator.trigger(savepoint=location) is None:
                    self.savepoint_requests.put(location)  # busy: try again
                continue
            if time.monotonic() >= next_at:
                coordinator.trigger()
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
            return
        self.state.stop.set()

    def request_savepoint(self, location: str) -> None:
        """Take a savepoint into `location` as soon as no checkpoint is in flight."""
        if self.state.coordinator is None:
            raise PipelineRunError("savepoints need a `checkpointing` section")
        self.savepoint_requests.put(location)
