"""The `dataflare` command: exit codes, reports, signals and log formats."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import dataflare.cli.main as cli_main
from dataflare.cli.logs import ENGINE_LOGGER, HeldEngineErrors
from dataflare.cli.main import cli

GOOD = """
id: small
sources:
  people:
    type: csv
    config: {{path: {data}, schema: {{name: string, age: int}}}}
transformations:
  adults:
    type: filter
    inputs: [people]
    config: {{condition: "age >= 18"}}
destinations:
  out:
    type: parquet
    inputs: [adults]
    config: {{path: {out}}}
errors:
  dead_letter: {{path: {dead}}}
"""

BAD = """
id: small
sources:
  people:
    type: csv
    config: {path: people.csv, delimiterr: ";"}
transformations:
  adults:
    type: filtre
    inputs: [people]
    config: {condition: "age >= 18"}
  unused:
    type: filter
    inputs: [nowhere]
    config: {condition: "true"}
destinations:
  out:
    type: parquet
    inputs: [adults]
    config: {path: out.parquet}
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    data = tmp_path / "people.csv"
    data.write_text("name,age\nana,34\nbo,12\ncy,18\ndee,notanumber\neve,70\n")
    path = tmp_path / "small.yaml"
    path.write_text(
        GOOD.format(
            data=data, out=tmp_path / "out.parquet", dead=tmp_path / "dead.jsonl"
        )
    )
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_validate_valid_file(pipeline: Path) -> None:
    code, out, _ = invoke("validate", str(pipeline))

    assert code == 0
    assert "valid" in out


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)

    code, _, err = invoke("validate", str(path))

    assert code == 2
    assert "sources.people.config.delimiterr: unknown key" in err
    assert "transformations.adults.type: unknown transformation type" in err
    assert "known types:" in err
    assert f"{path}:6:" in err  # the line of the misspelt key


def test_validate_json_format(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)

    code, out, _ = invoke("validate", "--format", "json", str(path))

    report = json.loads(out)
    assert code == 2
    assert report["valid"] is False
    paths = {problem["path"] for problem in report["problems"]}
    assert "transformations.adults.type" in paths


def test_run_writes_output_and_summary(pipeline: Path, tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"

    code, _, err = invoke("run", str(pipeline), "--summary-json", str(summary_path))

    assert code == 0
    names = pq.read_table(tmp_path / "out.parquet").column("name").to_pylist()
    assert names == ["ana", "cy", "eve"]
    summary = json.loads(summary_path.read_text())
    # Five records in the file; the one the parser rejected is read too.
    assert summary["records_read"] == 5
    assert summary["rejected"] == 1
    assert summary["status"] == "completed"
    assert summary["resumed_from"] is None
    assert "1 rejected record in" in err
    dead = json.loads((tmp_path / "dead.jsonl").read_text())
    assert dead["record"] == {"name": "dee", "age": "notanumber"}
    assert "people.csv record 4 (line 5)" in dead["position"]


@pytest.mark.parametrize(
    ("count", "words"), [(1, "read 1 record,"), (2, "read 2 records,")]
)
def test_summary_counts_read_records(tmp_path: Path, count: int, words: str) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(
        "id: one\n"
        f"sources: {{s: {{type: generate, config: {{count: {count}, "
        "fields: {id: sequence}}}}\n"
        "destinations: {out: {type: memory, inputs: [s]}}\n"
    )

    code, _, err = invoke("run", str(path), "--no-progress")

    assert code == 0
    assert f"{words} wrote {count:,} in" in err


@pytest.fixture
def collector_off() -> Iterator[None]:
    """Turn the garbage collector off, as `main` does, and restore it after."""
    gc.unfreeze()
    gc.disable()
    yield
    gc.unfreeze()
    gc.enable()


def test_run_loads_without_collector(
    pipeline: Path, collector_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    enabled_while_loading: list[bool] = []
    load = cli_main._load_or_exit

    def watched_load(path: Path, params: dict[str, str]) -> object:
        enabled_while_loading.append(gc.isenabled())
        return load(path, params)

    monkeypatch.setattr(cli_main, "_load_or_exit", watched_load)

    code, _, _ = invoke("run", str(pipeline))

    assert code == 0
    assert enabled_while_loading == [False]
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_other_commands_turn_collector_on(pipeline: Path, collector_off: None) -> None:
    code, _, _ = invoke("validate", str(pipeline))

    assert code == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_run_fail_fast_exits_1(pipeline: Path) -> None:
    code, _, err = invoke("run", str(pipeline), "--fail-fast")

    assert code == 1
    assert "notanumber" in err
    assert "record 4" in err


def failing_pipeline(tmp_path: Path) -> tuple[Path, str]:
    """Write a pipeline whose destination fails, and return it with its error."""
    data = tmp_path / "people.csv"
    data.write_text("name,age\nana,34\n")
    existing_dir = tmp_path / "existing"
    existing_dir.mkdir()
    path = tmp_path / "fails.yaml"
    path.write_text(
        GOOD.format(data=data, out=existing_dir, dead=tmp_path / "dead.jsonl").replace(
            "type: parquet", "type: csv"
        )
    )
    error = (
        f"step 'out' failed: output path {existing_dir} is a directory; name a "
        "file, or set roll_bytes or roll_interval to write part files into it"
    )
    return path, error


def test_failed_run_prints_error_once(tmp_path: Path) -> None:
    path, error = failing_pipeline(tmp_path)

    code, _, err = invoke("run", str(path), "--no-progress")

    assert code == 1
    assert err.count(error) == 1
    assert err.splitlines()[-1] == f"failed: {error}"


def test_failed_run_keeps_error_in_json_log(tmp_path: Path) -> None:
    path, error = failing_pipeline(tmp_path)

    code, _, err = invoke("--log-format", "json", "run", str(path), "--no-progress")

    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert code == 1
    # The log names the pipeline too: a process may run several.
    assert [(r["level"], r["message"]) for r in records] == [
        ("error", f"pipeline 'small': {error}")
    ]
    assert err.splitlines()[-1] == f"failed: {error}"


def test_fail_fast_prints_error_once(pipeline: Path) -> None:
    code, _, err = invoke("run", str(pipeline), "--fail-fast", "--no-progress")

    assert code == 1
    assert err.count("value 'notanumber' is not a valid integer") == 1
    assert err.splitlines()[-1].startswith("failed: step 'people' rejected a record")


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """Add a text handler to the `dataflare` logger, as the command does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dataflare")
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


# The run's error is the engine's message, or only the step's error when the
# step raised a PipelineRunError.
@pytest.mark.parametrize("shown", ["step 'a' failed: disk full", "disk full"])
def test_held_engine_errors_release_only_others(
    text_log: io.StringIO, shown: str
) -> None:
    engine = logging.getLogger(ENGINE_LOGGER)

    with HeldEngineErrors() as held:
        engine.error("step %r failed: %s", "a", "disk full")
        engine.error("step %r failed: %s", "b", "timed out")
        engine.warning("not held")
        during = text_log.getvalue()
    held.release(shown)
    after = text_log.getvalue()[len(during) :]

    assert during == f"WARNING {ENGINE_LOGGER}: not held\n"
    assert after == f"ERROR {ENGINE_LOGGER}: step 'b' failed: timed out\n"


def test_validate_catches_type_mismatch(tmp_path: Path) -> None:
    data = tmp_path / "people.csv"
    data.write_text("name,age\nana,34\ndee,notanumber\n")
    path = tmp_path / "small.yaml"
    text = GOOD.format(data=data, out=tmp_path / "o.parquet", dead=tmp_path / "d.jsonl")
    path.write_text(text.replace(", schema: {name: string, age: int}", ""))

    code, _, err = invoke("validate", str(path))

    assert code == 2
    assert "transformations.adults.config.condition" in err
    assert "age: string" in err


def test_run_invalid_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)

    code, _, _ = invoke("run", str(path))

    assert code == 2


def test_run_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = invoke("run", str(tmp_path / "nope.yaml"))

    assert code == 2
    assert "not found" in err


def test_bad_param_syntax_exits_2(pipeline: Path) -> None:
    code, _, _ = invoke("run", str(pipeline), "-p", "novalue")

    assert code == 2


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["schema"]])
def test_help_on_every_command(command: list[str]) -> None:
    code, out, _ = invoke(*command, "--help")

    assert code == 0
    assert "Usage:" in out


def test_json_logs(pipeline: Path) -> None:
    code, _, err = invoke(
        "--log-format", "json", "--log-level", "info", "run", str(pipeline)
    )

    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert code == 0
    assert any("starting" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the pipeline"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_unbounded_run_cleanly(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "events.csv"
    data.write_text("id,v\n1,10\n2,20\n")
    path = tmp_path / "follow.yaml"
    path.write_text(f"""
id: follow
sources:
  events: {{type: csv, config: {{path: {data}, follow: true, poll_interval: 50ms}}}}
destinations:
  out: {{type: csv, inputs: [events], config: {{path: {tmp_path / "out.csv"}}}}}
""")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataflare.cli.main",
            "--log-level",
            "info",
            "run",
            str(path),
            "--no-progress",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    written = tmp_path / "out.csv.inprogress"
    wait_for(lambda: written.exists() and "2,20" in written.read_text())
    with data.open("a") as f:
        f.write("3,30\n")
    wait_for(lambda: "3,30" in written.read_text())

    process.send_signal(signum)
    _, err = process.communicate(timeout=30)

    assert process.returncode == 0, err
    assert "stopped" in err
    assert (tmp_path / "out.csv").read_text().splitlines() == [
        '"id","v"',
        "1,10",
        "2,20",
        "3,30",
    ]


def test_validate_rejects_non_boolean_condition(pipeline: Path) -> None:
    pipeline.write_text(pipeline.read_text().replace('"age >= 18"', '"age + 1"'))

    code, _, err = invoke("validate", str(pipeline))

    assert code == 2
    assert "transformations.adults.config.condition" in err
    assert "not true or false" in err
