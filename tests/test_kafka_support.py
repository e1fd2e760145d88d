"""Helpers for the broker connector tests (Kafka, NATS, Redis); no tests here.

- `need(...)`: a test that needs a service fails when the environment
  variable CI is set and the service is unreachable, and is skipped with
  the reason otherwise.
- `Server`: a broker process started on a free loopback port, stopped and
  started again on the same port to test reconnection.
- `PacedSource`: a test source that emits numbered records at a steady pace
  until a total, so that a broker can be restarted while a run writes.
- `Running`: a pipeline run on a thread, stopped once a condition holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pydantic import Field

from dataflare.plugin.interface import (
    IDLE,
    Idle,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    SequentialOrigin,
    Source,
    SourceBatch,
)
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.plan import PipelinePlan
from dataflare.streaming.runner import PipelineRun

HOST = "127.0.0.1"


def need(service: str, ok: bool, how: str) -> None:
    """Fail (with CI set) or skip the test when a service is missing."""
    if ok:
        return
    message = f"{service} is not available: {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def port_open(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool], timeout: float = 30.0, what: str = ""
) -> None:
    """Poll `condition` every 20 ms; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class Server:
    """A server process on a fixed loopback port that can be restarted.

    Args:
        name: For messages.
        command: The command line; it must listen on `port`.
        port: The port, to wait for.
        log: File that receives the process's output.
        env: Extra environment variables.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.port = port
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-2000:]
                pytest.fail(f"{self.name} did not start: {text}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process = self.process
        self.process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, down_for: float = 1.0) -> None:
        """Stop the server, wait `down_for` seconds, and start it again."""
        self.stop()
        time.sleep(down_for)
        self.start()


# --- a paced test source ---------------------------------------------------

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def record(i: int) -> dict[str, Any]:
    """Return record `i` of the typed test records."""
    return {
        "id": i,
        "name": f"name-{i}",
        "price": i * 0.25,
        "ok": i % 3 == 0,
        "at": EPOCH + dt.timedelta(seconds=i),
    }


RECORD_SCHEMA = {
    "id": "int",
    "name": "string",
    "price": "float",
    "ok": "bool",
    "at": "timestamp",
}
ARROW_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("price", pa.float64()),
        ("ok", pa.bool_()),
        ("at", pa.timestamp("us", tz="UTC")),
    ]
)


class PacedSourceConfig(PluginConfig):
    total: int = Field(ge=1)
    per_batch: int = Field(10, ge=1)
    pause: float = Field(0.01, ge=0)


EMITTED: dict[str, int] = {}
"""Records emitted so far, per step id (read by tests while a run goes on)."""


class PacedSource(Source[PacedSourceConfig]):
    """Emit records 0 .. total-1 of `record()`, `per_batch` at a time."""

    metadata = PluginMetadata("paced", PluginKind.SOURCE, "Paced test records")
    Config = PacedSourceConfig

    def schema(self) -> pa.Schema:
        return ARROW_SCHEMA

    def open(self) -> None:
        self._next = 0
        EMITTED[self.context.step] = 0

    def snapshot_position(self) -> Any:
        return {"next": self._next}

    def restore_position(self, position: Any) -> None:
        self._next = int(position["next"])

    def read(self) -> Iterator[SourceBatch | Idle]:
        total = self.config.total
        while self._next < total and not self.context.stopping:
            end = min(total, self._next + self.config.per_batch)
            rows = [record(i) for i in range(self._next, end)]
            batch = pa.RecordBatch.from_pylist(rows, schema=ARROW_SCHEMA)
            first = self._next
            self._next = end
            EMITTED[self.context.step] = end
            yield SourceBatch(batch, SequentialOrigin("paced", first))
            yield IDLE
            time.sleep(self.config.pause)


def registry(*plugins: tuple[str, type]) -> PluginRegistry:
    """Return the installed plugins plus `plugins` and the paced source."""
    result = PluginRegistry.from_entry_points()
    result.register("paced", PacedSource)
    for name, cls in plugins:
        result.register(name, cls)
    return result


RUNS: list[Running] = []


@pytest.fixture(autouse=True)
def stop_runs() -> Iterator[None]:
    """Stop the runs a test left behind (import this fixture in test modules)."""
    yield
    while RUNS:
        RUNS.pop().__exit__()


class Running:
    """A pipeline run on a thread of its own.

    Args:
        plan: The validated pipeline.
    """

    def __init__(self, plan: PipelinePlan) -> None:
        RUNS.append(self)
        EMITTED.clear()  # counts of an earlier run must not satisfy a wait
        self.run = PipelineRun(plan)
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self.summary = self.run.run()
        except BaseException as exc:
            self.error = exc

    def read(self) -> int:
        """Records read by the sources so far."""
        return self.run.snapshot().records_read

    def written(self) -> int:
        """Records written by the destinations so far."""
        return self.run.snapshot().records_written

    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop a run a failed test left behind, so no client lingers."""
        if self._thread.is_alive():
            self.run.executor.state.stop.set()
            self.run.executor.state.abort.set()
            self._thread.join(30)

    def finish(self, timeout: float = 60.0) -> RunSummary:
        """Wait for the run's end and return its summary."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.run.stop()
            self._thread.join(30)
            pytest.fail(f"the pipeline did not end within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary

    def stop(self, timeout: float = 60.0) -> RunSummary:
        """Stop the run (draining it) and return its summary."""
        self.run.stop()
        return self.finish(timeout)
