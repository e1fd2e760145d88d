"""Latency percentiles and the timer slack of chain threads."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time

import numpy as np
import pytest

from dataflare.streaming.metrics import LatencyRecorder
from dataflare.streaming.scheduler import TIMER_SLACK_NS, reduce_timer_slack


def recorded(recorder: LatencyRecorder, samples: list[tuple[int, int]]) -> None:
    """Record (latency in ms, rows) pairs by backdating their creation times."""
    for latency_ms, rows in samples:
        recorder.record(time.monotonic_ns() - latency_ms * 1_000_000, rows)


def weighted_percentile(samples: list[tuple[int, int]], q: float) -> float:
    latencies = np.repeat([s[0] for s in samples], [s[1] for s in samples])
    return float(np.sort(latencies)[int(np.ceil(q * len(latencies))) - 1])


def test_percentiles_are_weighted_by_rows() -> None:
    samples = [(10, 1), (20, 8), (30, 1)]
    recorder = LatencyRecorder()
    recorded(recorder, samples)

    p50, p95 = recorder.percentiles(0.5, 0.95)

    assert p50 == pytest.approx(weighted_percentile(samples, 0.5), abs=1)
    assert p95 == pytest.approx(weighted_percentile(samples, 0.95), abs=1)


def test_only_the_last_samples_count() -> None:
    recorder = LatencyRecorder(keep=3)
    recorded(recorder, [(1000, 1), (1000, 1), (5, 1), (6, 1), (7, 1)])

    (high,) = recorder.percentiles(1.0)

    assert high == pytest.approx(7, abs=1)


def test_recording_creates_no_tracked_objects() -> None:
    recorder = LatencyRecorder(keep=100_000)
    gc.collect()
    before = len(gc.get_objects())

    recorded(recorder, [(1, 1)] * 1000)

    assert len(gc.get_objects()) - before < 10


def test_empty_recorder_has_no_percentiles() -> None:
    assert LatencyRecorder().percentiles(0.5, 0.99) == [None, None]


def test_keep_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 sample"):
        LatencyRecorder(keep=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_timer_slack_set_for_calling_thread_only() -> None:
    libc = ctypes.CDLL(None)
    pr_get_timerslack = 30  # from <linux/prctl.h>
    own_before = libc.prctl(pr_get_timerslack, 0, 0, 0, 0)
    seen: list[int] = []

    def chain_thread() -> None:
        reduce_timer_slack()
        seen.append(libc.prctl(pr_get_timerslack, 0, 0, 0, 0))

    thread = threading.Thread(target=chain_thread)
    thread.start()
    thread.join()

    assert seen == [TIMER_SLACK_NS]
    assert libc.prctl(pr_get_timerslack, 0, 0, 0, 0) == own_before
