"""Run a pipeline plan on threads, one per operator instance.

Instances talk only through bounded queues (`execution.queue_batches` per
instance), so a slow sink blocks its upstream instead of filling memory.
Arrow and Polars kernels release the GIL, so columnar work of different
instances runs in parallel. Everything an instance needs is built from its
`StepPlan`; no state is shared between instances but the queues, the
dead-letter writer and the run's stop flags.
"""

from __future__ import annotations

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
from dataflare.streaming.deadletter import DeadLetterWriter
from dataflare.streaming.errors import PipelineRunError, RejectedRecordError
from dataflare.streaming.messages import Data, End, IdleState, Message, Watermark
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
                "(the error policy is 'fail'; use errors.policy: dead_letter to "
                "write bad records to the dead-letter file and go on)"
            )
        self._state.dead_letter.write(self.step, records, reasons, positions)
        self.metrics.count("rejected", count)

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        outlet = self.side_outlets.get(port)
        if outlet is None or not outlet.targets:
            # Nobody reads this side output: such records are not dropped
            # silently but go to the dead-letter output.
            self.reject(batch, f"{port} record: no step reads {self.step}.{port}")
            return
        outlet.send_batch(batch, time.monotonic_ns())

    def count(self, name: str, value: int = 1) -> None:
        self.metrics.count(name, value)


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

    def send_end(self) -> None:
        for target in self.targets:
            for q in target.queues:
                self._put(q, End(target.channel))

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

    def build_plugin(self) -> None:
        plugin_cls: Any = self.plan.plugin_cls
        self.plugin = plugin_cls(self.plan.config, self.context)

    def run(self) -> None:
        try:
            assert self.plugin is not None
            failed = True
            try:
                self.plugin.open()
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
                logger.error("step %r failed: %s", self.plan.id, exc, exc_info=exc)
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
    def work(self) -> None:
        source = self.plugin
        assert isinstance(source, Source)
        execution = self.state.plan.spec.execution
        extractor = None
        generator = None
        if self.plan.event_time is not None:
            extractor = EventTimeExtractor(self.plan.event_time, source.schema())
            generator = WatermarkGenerator(self.plan.watermark)
        batcher = AdaptiveBatcher(
            max_rows=execution.max_batch_rows,
            linger_seconds=execution.linger.total_seconds(),
        )
        idle_after = self.plan.watermark.idle_timeout
        idle_seconds = idle_after.total_seconds() if idle_after is not None else None
        last_data = time.monotonic()
        idle = False

        items: Iterable[SourceBatch | Idle] = source.read()
        if self.plan.replay.sort_by_event_time:
            assert extractor is not None
            items = self._sorted(items, extractor, execution.max_batch_rows)
            extractor = None
        for item in items:
            if self.state.abort.is_set():
                return
            now = time.monotonic()
            if isinstance(item, Idle):
                self._flush(batcher.drain())
                if (
                    idle_seconds is not None
                    and not idle
                    and now - last_data >= idle_seconds
                ):
                    idle = True
                    self.outlet.send_idle(True)
                if self.state.stop.is_set():
                    break
                continue
            if idle:
                idle = False
                self.outlet.send_idle(False)
            last_data = now
            if extractor is not None or not self.plan.replay.sort_by_event_time:
                self.metrics.records_in += item.batch.num_rows
            batch = self._accept(item, extractor)
            if batch is not None and batch.num_rows:
                watermark = generator.observe(batch) if generator is not None else None
                for ready in batcher.add(
                    batch, downstream_idle=self.outlet.backlog() == 0
                ):
                    self._emit(ready)
                if watermark is not None:
                    # Records and watermark stay in order: flush before the mark.
                    self._flush(batcher.drain())
                    self.outlet.send_watermark(watermark, time.monotonic_ns())
            else:
                self._flush(batcher.due())
            if self.state.stop.is_set():
                break
        self._flush(batcher.drain())
        if not self.state.abort.is_set():
            self.outlet.send_watermark(MAX_TIME, time.monotonic_ns())
            self.outlet.send_end()

    def _sorted(
        self,
        items: Iterable[SourceBatch | Idle],
        extractor: EventTimeExtractor,
        rows: int,
    ) -> Iterable[SourceBatch]:
        """Read everything, then yield it in event-time order (stable)."""
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
        for batch in table.take(order).combine_chunks().to_batches(max_chunksize=rows):
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
    """Common input handling: per-channel watermarks, idleness and end."""

    def work(self) -> None:
        watermarks = [MIN_TIME] * self.channels
        idle = [False] * self.channels
        ended = [False] * self.channels
        current = MIN_TIME
        while True:
            message = self.receive()
            if message is None:
                return
            if isinstance(message, Data):
                start = time.perf_counter_ns()
                self.metrics.records_in += message.batch.num_rows
                self.metrics.batches_in += 1
                self.on_data(message, self.channel_inputs[message.channel])
                self.metrics.busy_ns += time.perf_counter_ns() - start
                continue
            if isinstance(message, Watermark):
                watermarks[message.channel] = max(
                    watermarks[message.channel], message.time
                )
                created = message.created_ns
            elif isinstance(message, IdleState):
                idle[message.channel] = message.idle
                created = time.monotonic_ns()
            else:
                ended[message.channel] = True
                watermarks[message.channel] = MAX_TIME
                created = time.monotonic_ns()
                index = self.channel_inputs[message.channel]
                same_input = [
                    done
                    for done, i in zip(ended, self.channel_inputs, strict=True)
                    if i == index
                ]
                if all(same_input) and not all(ended):
                    self.on_input_end(index)
            active = [
                w for w, i, e in zip(watermarks, idle, ended, strict=True) if not i or e
            ]
            combined = min(active) if active else current
            if combined > current:
                current = combined
                self.on_watermark(current, created)
            if all(ended):
                self.on_end()
                return

    def on_data(self, message: Data, input_index: int) -> None:
        raise NotImplementedError

    def on_input_end(self, input_index: int) -> None:
        pass

    def on_watermark(self, watermark: int, created_ns: int) -> None:
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

    def on_input_end(self, input_index: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        self._emit(transform.on_input_end(input_index), time.monotonic_ns())

    def on_data(self, message: Data, input_index: int) -> None:
        transform = self.plugin
        assert isinstance(transform, Transform)
        self._emit(transform.process(message.batch, input_index), message.created_ns)

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
        sink.flush()


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

    def __init__(self, plan: PipelinePlan) -> None:
        self.plan = plan
        self.state = RunState(plan)
        self.instances: dict[str, list[Instance]] = {}
        for step in plan.steps.values():
            kind = INSTANCE_TYPES[step.section]
            self.instances[step.id] = [
                kind(self.state, step, i) for i in range(step.parallelism)
            ]
        for instance in self.all_instances():
            instance.build_plugin()
        self._wire()

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

    def request_stop(self) -> None:
        self.state.stop.set()
