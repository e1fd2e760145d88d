"""The checkpoint coordinator: triggers checkpoints and completes them.

A checkpoint `n` runs in four steps (aligned barriers, as in Flink):

1. `trigger()` marks `n` pending. Each source instance notices it between
   two batches, records its position and sends a barrier `n` on every
   output channel.
2. A downstream instance that has the barrier on one input channel holds
   that channel's later messages until the barrier has arrived on all its
   channels; it then saves its state, acknowledges and forwards the barrier.
3. A sink instance, on the aligned barrier, stages its output
   (`prepare_commit`) and acknowledges with the staging state.
4. When every instance has acknowledged `n` (or has finished), the
   coordinator writes the checkpoint, prunes old ones, and asks each sink to
   `commit(n)`: only now does the output of `n` become visible.

At the end of a bounded run the coordinator writes a final checkpoint marked
finished once every instance has ended, so a restart after a crash at the
very end neither loses nor repeats output.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import orjson

from dataflare.state.checkpoint import (
    FINAL_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    CheckpointStorage,
    InstanceState,
    now_iso,
)
from dataflare.streaming.plan import PipelinePlan

logger = logging.getLogger(__name__)

InstanceKey = tuple[str, int]


def fingerprint(plan: PipelinePlan, step_id: str) -> str:
    """Hash what a step's saved state depends on: type, config, parallelism."""
    step = plan.steps[step_id]
    config = step.config.model_dump(mode="json", exclude_none=True)
    data = orjson.dumps(
        {
            "type": step.type,
            "config": config,
            "parallelism": step.parallelism,
            "inputs": [str(i) for i in step.inputs],
        },
        option=orjson.OPT_SORT_KEYS,
        default=str,
    )
    return hashlib.sha256(data).hexdigest()[:16]


def check_compatible(plan: PipelinePlan, checkpoint: Checkpoint) -> None:
    """Raise CheckpointError if the pipeline changed in a way the saved state
    cannot serve: steps added, removed, or with another type, config,
    parallelism or inputs."""
    problems = []
    saved = set(checkpoint.steps)
    current = set(plan.steps)
    for step in sorted(saved - current):
        problems.append(f"step {step!r} is in the checkpoint but not in the pipeline")
    for step in sorted(current - saved):
        problems.append(f"step {step!r} is new since the checkpoint")
    for step in sorted(saved & current):
        if checkpoint.steps[step]["fingerprint"] != fingerprint(plan, step):
            problems.append(
                f"step {step!r} changed its type, config, parallelism or "
                "inputs since the checkpoint"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint.location} does not fit this pipeline: "
            + "; ".join(problems)
            + ". Restore the pipeline file it was taken with, or run with "
            "--from-scratch to start over"
        )


class CheckpointCoordinator:
    """Tracks acknowledgements and writes complete checkpoints."""

    def __init__(
        self,
        plan: PipelinePlan,
        storage: CheckpointStorage,
        instances: list[InstanceKey],
        *,
        keep: int,
        restored: Checkpoint | None,
    ) -> None:
        self.plan = plan
        self.storage = storage
        self.keep = keep
        self.instances = list(instances)
        self.restored = restored
        self.next_id = restored.id + 1 if restored is not None else 1
        self.completed: list[int] = []
        self.durations: list[float] = []
        self._lock = threading.Lock()
        self._pending: int | None = None
        self._stop_after = False
        self._savepoint: str | None = None
        self._started = 0.0
        self._acks: dict[InstanceKey, tuple[InstanceState, bytes | None]] = {}
        self._finished: dict[InstanceKey, InstanceState] = {}
        self.commit_queues: dict[InstanceKey, queue.SimpleQueue[int]] = {}  # sinks
        self.notify_queues: dict[InstanceKey, queue.SimpleQueue[int]] = {}  # sources
        self.on_complete: Callable[[int], None] | None = None
        # Called before a checkpoint is written, with every instance's
        # acknowledgement in: outputs that are not sinks save what they hold.
        self.before_write: Callable[[], None] | None = None
        self.done = threading.Event()  # the final checkpoint is written
        self.stopped = False  # a stop checkpoint completed: no more triggers

    # --- triggering ---

    def trigger(
        self, *, stop_after: bool = False, savepoint: str | None = None
    ) -> int | None:
        """Start a checkpoint unless one is in flight; return its id."""
        with self._lock:
            if self.stopped:
                return None
            if self._pending is not None:
                if stop_after:
                    self._stop_after = True
                return None
            if len(self._finished) == len(self.instances):
                return None
            self._pending = self.next_id
            self.next_id += 1
            self._stop_after = stop_after
            self._savepoint = savepoint
            self._started = time.monotonic()
            self._acks = {}
            logger.debug("checkpoint %d triggered", self._pending)
            return self._pending

    def pending(self) -> int | None:
        return self._pending

    @property
    def stop_after(self) -> bool:
        return self._stop_after

    # --- acknowledgements ---

    def ack(
        self,
        key: InstanceKey,
        checkpoint_id: int,
        state: InstanceState,
        blob: bytes | None = None,
    ) -> None:
        with self._lock:
            if checkpoint_id != self._pending:
                return
            self._acks[key] = (state, blob)
            self._complete_if_ready()

    def finish(self, key: InstanceKey, state: InstanceState | None = None) -> None:
        """Record that an instance has ended; its last state is `state`."""
        with self._lock:
            self._finished[key] = state or InstanceState(finished=True)
            self._complete_if_ready()
            if len(self._finished) == len(self.instances) and self._pending is None:
                self._write_final()

    def _complete_if_ready(self) -> None:
        checkpoint_id = self._pending
        if checkpoint_id is None:
            return
        missing = [
            k for k in self.instances if k not in self._acks and k not in self._finished
        ]
        if missing:
            return
        states: dict[InstanceKey, tuple[InstanceState | None, bytes | None]] = {
            k: self._acks.get(k, (self._finished.get(k), None)) for k in self.instances
        }
        self._write(checkpoint_id, states, finished=False, location=self._savepoint)
        self._pending = None
        if self._stop_after:
            self.stopped = True
        if len(self._finished) == len(self.instances):
            self._write_final()

    def _write_final(self) -> None:
        if self.done.is_set():
            return
        checkpoint_id = self.next_id
        self.next_id += 1
        self._started = time.monotonic()
        states: dict[InstanceKey, tuple[InstanceState | None, bytes | None]] = {
            k: (self._finished[k], None) for k in self.instances
        }
        # Finished only if every input ended; a source stopped by a signal
        # keeps a position that the next run resumes from.
        finished = all(state.finished for state in self._finished.values())
        # Sinks staged their last output under FINAL_CHECKPOINT when their
        # input ended, also when a stop ended it, and this checkpoint covers it.
        self._write(
            checkpoint_id,
            states,
            finished=finished,
            location=None,
            commit_id=FINAL_CHECKPOINT,
        )
        self.done.set()

    def _write(
        self,
        checkpoint_id: int,
        states: dict[InstanceKey, tuple[InstanceState | None, bytes | None]],
        *,
        finished: bool,
        location: str | None,
        commit_id: int | None = None,
    ) -> None:
        """Write a checkpoint, then tell sinks and sources it is complete.

        Sinks and sources learn the id `commit_id`, by default the
        checkpoint's own id, or FINAL_CHECKPOINT for a finished run.
        """
        if commit_id is None:
            commit_id = FINAL_CHECKPOINT if finished else checkpoint_id
        if self.before_write is not None:
            self.before_write()
        steps: dict[str, dict[str, Any]] = {}
        blobs: dict[str, bytes] = {}
        for (step, index), (state, blob) in sorted(states.items()):
            state = state or InstanceState(finished=True)
            if blob is not None:
                name = f"{step}-{index}.state"
                blobs[name] = blob
                state.state_file = name
                state.state_bytes = len(blob)
            entry = steps.setdefault(
                step, {"fingerprint": fingerprint(self.plan, step), "instances": []}
            )
            entry["instances"].append(asdict(state))
        duration = time.monotonic() - self._started
        checkpoint = Checkpoint(
            id=checkpoint_id,
            pipeline_id=self.plan.spec.id,
            created_at=now_iso(),
            duration_seconds=round(duration, 6),
            finished=finished,
            steps=steps,
            blobs=blobs,
        )
        try:
            where = self.storage.write(checkpoint, directory=location)
        except OSError as exc:
            logger.error("checkpoint %d could not be written: %s", checkpoint_id, exc)
            raise CheckpointError(
                f"checkpoint {checkpoint_id} could not be written: {exc}"
            ) from exc
        if location is None:
            self.storage.prune(self.keep)
        self.completed.append(checkpoint_id)
        self.durations.append(duration)
        logger.info(
            "checkpoint %d complete in %.3f s (%d state bytes) at %s",
            checkpoint_id,
            duration,
            sum(len(b) for b in blobs.values()),
            where,
        )
        for commit_queue in self.commit_queues.values():
            commit_queue.put(commit_id)
        for notify_queue in self.notify_queues.values():
            notify_queue.put(commit_id)
        if self.on_complete is not None:
            self.on_complete(checkpoint_id)
