"""Exactly-once recovery: SIGKILL at random moments, resume, compare output."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from dataflare import run_pipeline
from dataflare.examples.nycflights13 import prepare
from dataflare.state.checkpoint import Checkpoint, CheckpointError, CheckpointStorage

PIPELINE = """
id: recovery
sources:
  flights:
    type: csv
    config: {{path: {data}/flights.csv, block_size: 1000000}}
    event_time: {{expression: "time_hour + minute * INTERVAL '1 minute'"}}
    replay: {{sort_by_event_time: true}}
transformations:
  delayed:
    type: filter
    inputs: [flights]
    config: {{condition: "dep_delay > 15"}}
  hourly:
    type: window
    inputs: [delayed]
    parallelism: 2
    config:
      size: 1h
      key_by: [carrier, origin]
      aggregations:
        flights: {{fn: count}}
        mean_delay: {{fn: mean, field: dep_delay}}
        worst: {{fn: max, field: dep_delay}}
destinations:
  out:
    type: parquet
    inputs: [hourly]
    config: {{path: {out}}}
execution: {{max_batch_rows: 5000}}
checkpointing: {{interval: 100ms, storage: {checkpoints}, keep: 2}}
"""

KILLS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(tmp_path_factory.mktemp("flights"))


def write_pipeline(folder: Path, data: Path) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(
        PIPELINE.format(
            data=data, out=folder / "out", checkpoints=folder / "checkpoints"
        )
    )
    return path


def rows(folder: Path) -> list[tuple]:
    table = ds.dataset(folder, format="parquet").to_table()
    return sorted(tuple(r.values()) for r in table.to_pylist())


def start(
    path: Path, crash_at: str | None = None, log_level: str = "warning"
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("DATAFLARE_CRASH_AT", None)
    if crash_at is not None:
        env["DATAFLARE_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataflare.cli.main",
            "--log-level",
            log_level,
            "run",
            str(path),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def stop_after_first_checkpoint(process: subprocess.Popen[bytes], folder: Path) -> None:
    """Send SIGTERM once a periodic checkpoint exists, then wait for the exit."""
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if folder.exists() and any(p.name.startswith("chk-") for p in folder.iterdir()):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    process.communicate(timeout=60)


def test_kill_nine_twenty_times_loses_and_repeats_nothing(
    data: Path, tmp_path: Path
) -> None:
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    run_pipeline(write_pipeline(baseline, data))
    expected = rows(baseline / "out")
    crashing = tmp_path / "crashing"
    crashing.mkdir()
    path = write_pipeline(crashing, data)
    rng = random.Random(20261204)
    plan = (
        [f"checkpoint-write:{rng.randint(1, 4)}" for _ in range(6)]
        + [f"sink-commit:{rng.randint(1, 3)}" for _ in range(6)]
        + [None] * 40
    )
    kills = 0

    for crash_at in plan:
        if kills >= KILLS:
            break
        process = start(path, crash_at)
        try:
            process.wait(timeout=rng.uniform(0.2, 2.0) if crash_at is None else 120)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.stderr is not None
        err = process.stderr.read().decode()
        process.stderr.close()
        if process.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert process.returncode == 0, err[-3000:]
    final = start(path)
    _, err = final.communicate(timeout=300)

    assert kills >= KILLS
    assert final.returncode == 0, err.decode()[-3000:]
    assert rows(crashing / "out") == expected
    hidden = [p.name for p in (crashing / "out").iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_sigterm_checkpoint_then_resume(data: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    run_pipeline(write_pipeline(baseline, data))
    folder = tmp_path / "stopping"
    folder.mkdir()
    path = write_pipeline(folder, data)
    path.write_text(
        path.read_text().replace("keep: 2}", "keep: 2, on_stop: checkpoint}")
    )
    process = start(path)

    stop_after_first_checkpoint(process, folder / "checkpoints")
    resumed = start(path, log_level="info")
    _, err = resumed.communicate(timeout=300)

    assert process.returncode in (0, 130)
    assert resumed.returncode == 0, err.decode()[-3000:]
    if process.returncode == 130:  # stopped before the end: must resume
        assert "resuming from checkpoint" in err.decode()
    assert rows(folder / "out") == rows(baseline / "out")


def make_checkpoint(storage: CheckpointStorage, checkpoint_id: int) -> None:
    storage.write(
        Checkpoint(
            id=checkpoint_id,
            pipeline_id="p",
            created_at="now",
            duration_seconds=0.1,
            finished=False,
            steps={
                "s": {
                    "fingerprint": "f",
                    "instances": [
                        {
                            "position": None,
                            "state_file": None,
                            "state_bytes": 0,
                            "sink": None,
                            "finished": False,
                        }
                    ],
                }
            },
            blobs={"s-0.state": b"state %d" % checkpoint_id},
        )
    )


def test_corrupt_checkpoint_falls_back(tmp_path: Path) -> None:
    storage = CheckpointStorage(str(tmp_path / "chk"))
    make_checkpoint(storage, 1)
    make_checkpoint(storage, 2)
    (tmp_path / "chk" / "chk-000002" / "s-0.state").write_bytes(b"tampered")

    latest = storage.latest()

    assert latest is not None
    assert latest.id == 1
    assert latest.blobs["s-0.state"] == b"state 1"


def test_missing_metadata_falls_back(tmp_path: Path) -> None:
    storage = CheckpointStorage(str(tmp_path / "chk"))
    make_checkpoint(storage, 1)
    make_checkpoint(storage, 2)
    (tmp_path / "chk" / "chk-000002" / "metadata.json").unlink()

    latest = storage.latest()

    assert latest is not None
    assert latest.id == 1


def test_no_complete_checkpoint_is_an_error(tmp_path: Path) -> None:
    storage = CheckpointStorage(str(tmp_path / "chk"))
    make_checkpoint(storage, 1)
    (tmp_path / "chk" / "chk-000001" / "s-0.state").unlink()

    with pytest.raises(CheckpointError) as caught:
        storage.latest()

    assert "s-0.state is missing" in str(caught.value)
    assert "--from-scratch" in str(caught.value)


def test_changed_pipeline_is_refused(data: Path, tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, data)
    path.write_text(
        path.read_text().replace("keep: 2}", "keep: 2, on_stop: checkpoint}")
    )
    process = start(path)
    stop_after_first_checkpoint(process, tmp_path / "checkpoints")
    changed = path.read_text().replace("parallelism: 2", "parallelism: 3")
    path.write_text(changed)

    resumed = start(path)
    _, err = resumed.communicate(timeout=120)

    text = err.decode()
    if "starting anew" in text:
        return  # the first run completed before the signal: nothing to resume
    assert resumed.returncode == 1
    assert "step 'hourly' changed" in text


def test_drained_follow_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    data.write_text("id,v\n1,10\n2,20\n")
    path = tmp_path / "follow.yaml"
    path.write_text(f"""
id: follow
sources:
  events: {{type: csv, config: {{path: {data}, follow: true, poll_interval: 20ms}}}}
destinations:
  out: {{type: csv, inputs: [events], config: {{path: {tmp_path / "out"}}}}}
checkpointing: {{interval: 50ms, storage: {tmp_path / "checkpoints"}}}
""")
    out = tmp_path / "out"

    def visible_rows() -> list[str]:
        if not out.exists():
            return []
        return sorted(
            line
            for part in out.glob("part-*.csv")
            for line in part.read_text().splitlines()[1:]
        )

    first = start(path)
    deadline = time.monotonic() + 60
    while len(visible_rows()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    with data.open("a") as f:
        f.write("3,30\n")
    second = start(path, log_level="info")
    while len(visible_rows()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=60)

    assert first.returncode == 0
    assert second.returncode == 0, err.decode()[-2000:]
    assert "resuming from checkpoint" in err.decode()
    assert visible_rows() == ["1,10", "2,20", "3,30"]


def test_checkpoints_on_an_fsspec_file_system() -> None:
    # fsspec's in-memory file system stands in for remote storage (s3, gcs):
    # no rename is used there, metadata.json written last marks completion.
    storage = CheckpointStorage("memory://dataflare-test/checkpoints")
    storage.clear()
    make_checkpoint(storage, 1)
    make_checkpoint(storage, 2)
    make_checkpoint(storage, 3)
    storage.prune(keep=2)

    latest = storage.latest()

    assert not storage.local
    assert storage.ids() == [3, 2]
    assert latest is not None
    assert latest.id == 3
    assert latest.blobs["s-0.state"] == b"state 3"


def test_rejected_records_survive_kill_nine(tmp_path: Path) -> None:
    data = tmp_path / "events.jsonl"
    lines = [
        "garbage" if i % 100 == 7 else f'{{"id": {i}, "v": {i * 2}}}'
        for i in range(1000)
    ]
    data.write_text("\n".join(lines) + "\n")
    dead = tmp_path / "dead.jsonl"
    out = tmp_path / "out"
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""
id: rejects
sources:
  events:
    type: jsonl
    config: {{path: {data}, follow: true, poll_interval: 20ms,
              schema: {{id: int, v: int}}}}
destinations:
  out: {{type: jsonl, inputs: [events], config: {{path: {out}}}}}
errors: {{policy: dead_letter, dead_letter: {{path: {dead}}}}}
checkpointing: {{interval: 50ms, storage: {tmp_path / "checkpoints"}}}
""")

    def published() -> int:
        return sum(len(p.read_text().splitlines()) for p in out.glob("part-*.jsonl"))

    process = start(path)
    deadline = time.monotonic() + 60
    # Output is published by a checkpoint that covers every line read.
    while published() < 990 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    assert published() == 990
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(r["position"] for r in rejected) == sorted(
        f"{data} line {i + 1}" for i in range(1000) if i % 100 == 7
    )
