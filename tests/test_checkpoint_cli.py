"""Tests of `dataflare checkpoints`, `dataflare savepoint` and resuming runs.

A JSON-lines pipeline that follows its input (so it runs until stopped)
checkpoints into a temporary folder; the commands run against it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from dataflare.cli.main import cli

PIPELINE = """
id: follow
sources:
  events:
    type: jsonl
    config:
      path: {folder}/in
      follow: true
      poll_interval: 20ms
      schema: {{id: int, name: string}}
destinations:
  out:
    type: jsonl
    inputs: [events]
    config: {{path: {folder}/out}}
checkpointing:
  interval: 100ms
  storage: {folder}/checkpoints
  keep: 2
  on_stop: checkpoint
"""

NO_CHECKPOINTS = """
id: plain
sources:
  events:
    type: memory
    config: {records: [{id: 1}]}
destinations:
  out:
    type: memory
    inputs: [events]
"""


def write_lines(path: Path, first: int, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for i in range(first, first + count):
            out.write(json.dumps({"id": i, "name": f"n{i}"}) + "\n")


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    write_lines(tmp_path / "in" / "a.jsonl", 0, 1000)
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(folder=tmp_path))
    return path


def start(path: Path, *options: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "DATAFLARE_CRASH_AT"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataflare.cli.main",
            "--log-level",
            "info",
            "run",
            str(path),
            "--no-progress",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(process.stderr.read().decode()[-3000:])
        assert time.monotonic() < deadline, "timed out waiting for the pipeline"
        time.sleep(0.05)


def committed_ids(folder: Path) -> list[int]:
    if not folder.exists():
        return []
    files = [p for p in folder.iterdir() if p.name.startswith("part-")]
    if not files:
        return []
    try:
        table = ds.dataset(files, format="json").to_table()
    except FileNotFoundError:  # a `--from-scratch` run removed a part file
        return []
    return sorted(table.column("id").to_pylist())


def stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    return process.returncode, err.decode()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_inspect_savepoint_and_resume(pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    running = start(pipeline)
    wait_for(lambda: committed_ids(out) == list(range(1000)), running)

    listed = invoke("checkpoints", "list", str(pipeline))
    saved = subprocess.run(
        [sys.executable, "-m", "dataflare.cli.main", "savepoint", str(pipeline)],
        capture_output=True,
        timeout=60,
    )
    code, err = stop(running)

    listed_ids = re.findall(r"^│ *(\d+) *│", listed.output, flags=re.MULTILINE)
    assert listed.exit_code == 0
    assert f"checkpoints in {tmp_path / 'checkpoints'}" in listed.output
    assert "complete" in listed.output
    assert listed_ids
    assert saved.returncode == 0, saved.stderr.decode()
    savepoint = Path(saved.stdout.decode().strip())
    assert savepoint.parent == tmp_path / "checkpoints" / "savepoints"
    assert (savepoint / "metadata.json").exists()
    assert code == 0, err[-3000:]
    assert "taking a checkpoint, then stopping" in err

    inspected = invoke("checkpoints", "inspect", str(savepoint), "--json")
    report = orjson.loads(inspected.output)
    source = next(r for r in report["instances"] if r["step"] == "events")
    position = source["position"]["source"]["files"][str(tmp_path / "in" / "a.jsonl")]
    assert inspected.exit_code == 0
    assert report["pipeline_id"] == "follow"
    assert position["offset"] == (tmp_path / "in" / "a.jsonl").stat().st_size
    assert position["lines"] == 1000
    text = invoke("checkpoints", "inspect", str(savepoint))
    assert f"checkpoint {report['id']} of pipeline follow" in text.output

    # Resume from the savepoint: only the lines appended since are read.
    write_lines(tmp_path / "in" / "a.jsonl", 1000, 500)
    resumed = start(pipeline, "--from", str(savepoint))
    wait_for(lambda: len(committed_ids(out)) >= 1500, resumed)
    code, err = stop(resumed)

    assert code == 0, err[-3000:]
    assert f"resuming from checkpoint {report['id']} at {savepoint}" in err
    assert f"resumed from savepoint {savepoint} (checkpoint {report['id']})" in err
    assert committed_ids(out) == list(range(1500))


def test_from_scratch_reads_everything_again(pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start(pipeline)
    wait_for(lambda: committed_ids(out) == list(range(1000)), first)
    stop(first)
    before = sorted(p.name for p in (tmp_path / "checkpoints").glob("chk-*"))
    write_lines(tmp_path / "in" / "b.jsonl", 1000, 10)

    again = start(pipeline, "--from-scratch")
    wait_for(lambda: committed_ids(out) == list(range(1010)), again)
    code, err = stop(again)

    assert before
    assert code == 0, err[-3000:]
    assert "resuming" not in err
    assert "resumed from" not in err
    assert committed_ids(out) == list(range(1010))


def test_run_resumes_after_stop_without_from(pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start(pipeline)
    wait_for(lambda: committed_ids(out) == list(range(1000)), first)
    stop(first)
    write_lines(tmp_path / "in" / "a.jsonl", 1000, 20)

    second = start(pipeline)
    wait_for(lambda: len(committed_ids(out)) >= 1020, second)
    code, err = stop(second)

    assert code == 0, err[-3000:]
    assert "resuming from checkpoint" in err
    assert re.search(r"resumed from checkpoint \d+ at \S+chk-\d+", err), err[-3000:]
    assert "read 20 records" in err
    assert committed_ids(out) == list(range(1020))


# --- errors ---------------------------------------------------------------------


def test_no_checkpointing_section(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(NO_CHECKPOINTS)

    listed = CliRunner().invoke(cli, ["checkpoints", "list", str(path)])
    saved = CliRunner().invoke(cli, ["savepoint", str(path)])
    resumed = CliRunner().invoke(cli, ["run", str(path), "--from", str(tmp_path)])

    assert listed.exit_code == 2
    assert f"{path} has no `checkpointing` section" in listed.output
    assert saved.exit_code == 2
    assert "has no `checkpointing` section" in saved.output
    assert resumed.exit_code == 1
    assert "cannot resume: the pipeline has no `checkpointing` section" in (
        resumed.output
    )


def test_savepoint_without_running_pipeline(pipeline: Path, tmp_path: Path) -> None:
    missing = CliRunner().invoke(cli, ["savepoint", str(pipeline)])
    # A process id left by a pipeline that died: the process has ended.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "run.pid").write_text(f"{dead.pid}\n")
    stale = CliRunner().invoke(cli, ["savepoint", str(pipeline)])

    assert missing.exit_code == 1
    assert "no running pipeline found" in missing.output
    assert "start it with `dataflare run` first" in missing.output
    assert stale.exit_code == 1
    assert f"the pipeline process {dead.pid} is not running" in stale.output


def test_list_of_empty_storage_and_inspect_of_missing(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(folder=tmp_path))

    listed = CliRunner().invoke(cli, ["checkpoints", "list", str(path)])
    inspected = CliRunner().invoke(
        cli, ["checkpoints", "inspect", str(tmp_path / "chk-000001")]
    )
    resumed = CliRunner().invoke(
        cli, ["run", str(path), "--from", str(tmp_path / "chk-000001")]
    )

    assert listed.exit_code == 0
    assert "chk-" not in listed.output
    assert inspected.exit_code == 1
    assert f"checkpoint {tmp_path / 'chk-000001'} not found" in inspected.output
    assert resumed.exit_code == 2
    assert f"checkpoint {tmp_path / 'chk-000001'} not found" in resumed.output


def test_inspect_of_incomplete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "chk-000001").mkdir()

    inspected = CliRunner().invoke(
        cli, ["checkpoints", "inspect", str(tmp_path / "chk-000001")]
    )

    assert inspected.exit_code == 1
    assert "metadata.json is missing" in inspected.output
