"""The task pool, and pipelines whose chains share it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dataflare.api import Pipeline, load_pipeline
from dataflare.streaming.errors import PipelineRunError
from dataflare.streaming.plan import PipelinePlan
from dataflare.streaming.runner import PipelineRun, run_many
from dataflare.streaming.scheduler import TaskPool


class Recorder:
    """A task that notes each slice and then returns the next planned due time."""

    def __init__(self, name: str, log: list[str], dues: list[float | None]) -> None:
        self.name = name
        self.log = log
        self.dues = list(dues)
        self.slices = 0
        self.ran = threading.Event()

    def run_slice(self) -> float | None:
        self.slices += 1
        self.log.append(self.name)
        self.ran.set()
        return self.dues.pop(0)


def wait_for(condition: object, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_pool_runs_tasks_by_due_time() -> None:
    log: list[str] = []
    now = time.monotonic()
    pool = TaskPool(workers=1)
    tasks = [
        Recorder("late", log, [now + 0.3, None]),
        Recorder("early", log, [now + 0.1, None]),
        Recorder("middle", log, [now + 0.2, None]),
    ]
    for task in tasks:
        pool.submit(task)

    wait_for(lambda: pool.pending() == 0)

    # First slices in submission order (all due at once), then by due time.
    assert log == ["late", "early", "middle", "early", "middle", "late"]
    pool.close()


def test_pool_wake_runs_task_at_once() -> None:
    log: list[str] = []
    pool = TaskPool(workers=2)
    task = Recorder("sleeper", log, [time.monotonic() + 60, None])
    pool.submit(task)
    wait_for(lambda: task.slices == 1)

    started = time.monotonic()
    pool.wake(task)
    wait_for(lambda: pool.pending() == 0)

    assert task.slices == 2
    assert time.monotonic() - started < 5
    pool.close()


def test_pool_task_woken_mid_slice_reruns() -> None:
    release = threading.Event()
    slices: list[float] = []

    class Slow:
        def run_slice(self) -> float | None:
            slices.append(time.monotonic())
            if len(slices) == 1:
                release.wait(10)
                return time.monotonic() + 60
            return None

    pool = TaskPool(workers=1)
    task = Slow()
    pool.submit(task)
    wait_for(lambda: len(slices) == 1)
    pool.wake(task)  # while it runs
    release.set()

    wait_for(lambda: pool.pending() == 0)
    assert len(slices) == 2
    assert slices[1] - slices[0] < 5
    pool.close()


def test_pool_failing_task_ends_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def run_slice(self) -> float | None:
            raise RuntimeError("slice broke")

    log: list[str] = []
    pool = TaskPool(workers=1)
    good = Recorder("good", log, [0.0, 0.0, None])
    pool.submit(Broken())
    pool.submit(good)

    wait_for(lambda: pool.pending() == 0)
    assert log == ["good"] * 3
    assert "slice broke" in caplog.text
    pool.close()


def test_pool_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        TaskPool(workers=0)
    pool = TaskPool(workers=1)
    task = Recorder("once", [], [time.monotonic() + 60])
    pool.submit(task)
    with pytest.raises(ValueError, match="already on the pool"):
        pool.submit(task)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(Recorder("late", [], [None]))


def ticking_pipeline(name: str, rate: float, count: int | None) -> PipelinePlan:
    p = Pipeline(name)
    config: dict[str, object] = {"rate": rate, "fields": {"id": "sequence"}}
    if count is not None:
        config["count"] = count
    ticks = p.source("ticks", "generate", batch_rows=1, **config)
    p.destination("out", "memory", [ticks])
    return p.build()


def test_run_many_pooled_pipelines() -> None:
    pipelines = 300
    plans = [
        ticking_pipeline(f"tick-{n}", rate=100, count=10) for n in range(pipelines)
    ]
    threads_before = threading.active_count()
    peak_threads = [threads_before]
    sampling = True

    def sample() -> None:
        while sampling:
            peak_threads.append(threading.active_count())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        summaries = run_many(plans, pool=TaskPool(workers=2))
    finally:
        sampling = False
        sampler.join()

    assert [s.status for s in summaries] == ["completed"] * pipelines
    for summary in summaries:
        ids = summary.output("out").column("id").to_pylist()
        assert ids == list(range(1, 11))
    # Two pool workers and the sampler, not a thread per pipeline.
    assert max(peak_threads) - threads_before <= 3


def test_pooled_run_stops_at_once() -> None:
    plan = ticking_pipeline("slow-ticks", rate=0.05, count=None)  # one every 20 s
    run = PipelineRun(plan, pool=TaskPool(workers=1))
    run.start()
    wait_for(lambda: run.snapshot().records_written == 1)

    requested = time.monotonic()
    run.stop()
    summary = run.wait(timeout=10)

    assert summary is not None
    assert time.monotonic() - requested < 5
    assert summary.status == "stopped"
    assert summary.output("out").column("id").to_pylist() == [1]


def test_pooled_source_with_threaded_steps(tmp_path: Path) -> None:
    """Only the source's chain is pooled; the other steps read their inboxes."""
    path = tmp_path / "pipeline.yaml"
    out = tmp_path / "out"
    path.write_text(
        f"""
id: pooled-windows
sources:
  ticks:
    type: generate
    config:
      count: 600
      rate: 2000
      batch_rows: 50
      fields:
        id: sequence
        at: {{type: timestamp, start: "2026-01-01T00:00:00Z", step: 1s}}
    event_time: {{field: at}}
transformations:
  minutes:
    type: window
    inputs: [ticks]
    config:
      kind: tumbling
      size: 1m
      aggregations:
        n: {{fn: count}}
        top: {{fn: max, field: id}}
destinations:
  out:
    type: jsonl
    inputs: [minutes]
    config: {{path: {out}}}
execution: {{chaining: false}}
checkpointing: {{interval: 50ms, storage: {tmp_path / "checkpoints"}}}
"""
    )
    run = PipelineRun(load_pipeline(path), pool=TaskPool(workers=2))
    run.start()
    summary = run.wait(timeout=60)

    assert summary is not None and summary.status == "completed", summary
    # With checkpoints the sink writes one part file per checkpoint.
    parts = sorted(out.glob("part-*.jsonl"))
    rows = [
        json.loads(line) for part in parts for line in part.read_text().splitlines()
    ]
    # 600 records one second apart: ten full minutes of 60, ids 60, 120, ...
    assert sorted((r["n"], r["top"]) for r in rows) == [
        (60, 60 * m) for m in range(1, 11)
    ]


def test_wait_before_start_raises() -> None:
    run = PipelineRun(ticking_pipeline("unstarted", rate=10, count=5))

    with pytest.raises(PipelineRunError, match=r"call start\(\) first"):
        run.wait()


def test_run_many_start_failure_stops_others(tmp_path: Path) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": 1}\n')
    followed = Pipeline("followed")
    rows = followed.source(
        "rows", "jsonl", path=str(lines), follow=True, schema={"id": "int"}
    )
    followed.destination("out", "memory", [rows])
    closed = TaskPool(workers=1)
    closed.close()

    with pytest.raises(RuntimeError, match="closed"):
        run_many(
            [followed.build(), ticking_pipeline("late", rate=10, count=5)],
            pool=closed,
        )

    # The followed file never ends, so only a stop ends its thread.
    assert not any(t.name.startswith("rows[0]") for t in threading.enumerate())


@pytest.mark.parametrize("pooled", [True, False])
def test_stopped_run_publishes_last_output(tmp_path: Path, pooled: bool) -> None:
    """A stop ends the input; the final checkpoint publishes every part file."""
    path = tmp_path / "pipeline.yaml"
    out = tmp_path / "out"
    path.write_text(
        f"""
id: stopped-output
sources:
  ticks:
    type: generate
    config: {{rate: 2000, batch_rows: 20, fields: {{id: sequence}}}}
destinations:
  out:
    type: jsonl
    inputs: [ticks]
    config: {{path: {out}}}
checkpointing: {{interval: 100ms, storage: {tmp_path / "checkpoints"}}}
"""
    )
    run = PipelineRun(load_pipeline(path), pool=TaskPool(workers=1) if pooled else None)
    run.start()
    wait_for(lambda: run.snapshot().records_written >= 1000)
    run.stop()
    summary = run.wait(timeout=30)

    assert summary is not None and summary.status == "stopped", summary
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    ids = [
        json.loads(line)["id"]
        for part in sorted(out.glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]
    assert sorted(ids) == list(range(1, summary.records_written + 1))


def test_run_many_logs_failed_pipeline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    plans = []
    for n in range(3):
        p = Pipeline(f"pipeline-{n}")
        ticks = p.source("ticks", "generate", count=5, fields={"id": "sequence"})
        # Pipeline 1 writes below a regular file, which cannot be a folder.
        where = blocker if n == 1 else tmp_path
        p.destination("out", "jsonl", [ticks], path=str(where / f"out-{n}.jsonl"))
        plans.append(p.build())

    summaries = run_many(plans, pool=TaskPool(workers=2))

    assert [s.status for s in summaries] == ["completed", "failed", "completed"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].startswith("pipeline 'pipeline-1': step 'out' failed:")
