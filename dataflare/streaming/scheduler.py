"""A fixed set of worker threads that run many pipelines' chains in turns.

Each chain of a run normally has a thread of its own. A process that hosts
thousands of small pipelines cannot afford that: ten thousand threads cost
memory, and the interpreter spends its time handing the GIL between
threads that wake only to find nothing due. A `TaskPool` runs them on a
few threads instead. A task runs for one slice, which returns the time at
which it wants to run again, and the pool keeps the tasks in a heap ordered
by that time.

Only chains whose head is a cooperative source (`Source.cooperative`) go on
a pool, because their `read()` never blocks: when no record is due it
yields `Idle(until=...)` and the slice ends there. Other chains keep their
own threads; both kinds can be part of the same pipeline.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import sys
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)

TIMER_SLACK_NS = 1_000
"""Timer slack of the threads that run chains, in nanoseconds."""

_PR_SET_TIMERSLACK = 29  # from <linux/prctl.h>


def reduce_timer_slack(slack_ns: int = TIMER_SLACK_NS) -> None:
    """Set the calling thread's timer slack to `slack_ns` nanoseconds (Linux).

    Linux may end a normal thread's timed sleeps and waits up to 50 µs
    after their deadline (the default timer slack), so that it can merge
    wake-ups. A source that waits for its next record then wakes that much
    later, and the records offered meanwhile wait too. On a 2-core VM
    (Linux, Python 3.11), `time.sleep(0)` took 76 µs at the default slack
    and 23 µs at a slack of 1 µs (medians of 20,000 calls). Threads that
    this thread starts inherit the setting. On other systems, or if the
    call fails, nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_TIMERSLACK, slack_ns, 0, 0, 0) != 0
    except (OSError, AttributeError) as exc:
        logger.debug("timer slack left unchanged: %s", exc)
        return
    if failed:
        logger.debug(
            "timer slack left unchanged: prctl failed: %s",
            os.strerror(ctypes.get_errno()),
        )


class PoolTask(Protocol):
    """A unit of work on a pool, run one slice at a time, never two at once."""

    def run_slice(self) -> float | None:
        """Do some work; return the `time.monotonic()` value at which to run
        again (now or earlier: at once), or None when the task is done."""


class _Entry:
    """The pool's bookkeeping for one task."""

    __slots__ = ("due", "finished", "running", "task", "woken")

    def __init__(self, task: PoolTask) -> None:
        self.task = task
        self.due: float | None = None  # when queued, the time it is due
        self.running = False
        self.woken = False  # woken while running: run again at once
        self.finished = False


def default_workers() -> int:
    """Return twice the usable cores, at least 2 and at most 16.

    Python runs one thread at a time, so more workers do not compute more.
    They keep the other tasks going while some wait on I/O in a sink.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(16, 2 * cores))


class TaskPool:
    """Worker threads that run `PoolTask`s in order of the time they are due.

    Tasks that are due at the same time run in the order they became due.
    Workers start with the first task and are daemon threads; `close()`
    lets them leave once the tasks in progress finish their slices.
    """

    def __init__(self, workers: int | None = None, *, name: str = "pool") -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"a task pool needs at least one worker, not {workers}")
        self.workers = workers or default_workers()
        self.name = name
        self._heap: list[tuple[float, int, _Entry]] = []
        self._entries: dict[int, _Entry] = {}
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, task: PoolTask) -> None:
        """Run `task` as soon as a worker is free."""
        with self._condition:
            if self._closed:
                raise RuntimeError(f"task pool {self.name!r} is closed")
            if id(task) in self._entries:
                raise ValueError(f"task {task!r} is already on the pool")
            entry = _Entry(task)
            self._entries[id(task)] = entry
            self._push(entry, time.monotonic())
            if not self._threads:
                self._start_workers()

    def wake(self, task: PoolTask) -> None:
        """Run `task` at once instead of at its due time; safe from any thread.

        A task woken during its slice runs again right after it. Waking a
        task that is not on the pool, or is done, does nothing.
        """
        with self._condition:
            entry = self._entries.get(id(task))
            if entry is None or entry.finished:
                return
            if entry.running:
                entry.woken = True
                return
            now = time.monotonic()
            if entry.due is not None and entry.due <= now:
                return
            self._push(entry, now)

    def pending(self) -> int:
        """Return the number of tasks that are not done."""
        with self._condition:
            return len(self._entries)

    def close(self) -> None:
        """Let the workers leave; tasks not yet done are left where they are."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _push(self, entry: _Entry, due: float) -> None:
        entry.due = due
        heapq.heappush(self._heap, (due, next(self._order), entry))
        self._condition.notify()

    def _start_workers(self) -> None:
        for number in range(self.workers):
            thread = threading.Thread(
                target=self._work, name=f"{self.name}-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _take(self) -> _Entry | None:
        """Wait for the next due task and mark it running; None once closed."""
        heap = self._heap
        with self._condition:
            while not self._closed:
                if not heap:
                    self._condition.wait()
                    continue
                due, _, entry = heap[0]
                if entry.due != due or entry.running or entry.finished:
                    heapq.heappop(heap)  # outdated by a wake or a later push
                    continue
                delay = due - time.monotonic()
                if delay > 0:
                    self._condition.wait(delay)
                    continue
                heapq.heappop(heap)
                entry.due = None
                entry.running = True
                return entry
            return None

    def _work(self) -> None:
        reduce_timer_slack()
        while (entry := self._take()) is not None:
            try:
                due = entry.task.run_slice()
            except BaseException:
                # A task handles its own errors; this one escaped, so it is done.
                logger.exception("task %r failed on pool %r", entry.task, self.name)
                due = None
            with self._condition:
                entry.running = False
                if due is None:
                    entry.finished = True
                    del self._entries[id(entry.task)]
                    continue
                if entry.woken:
                    entry.woken = False
                    due = time.monotonic()
                self._push(entry, due)
