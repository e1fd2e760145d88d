"""Run one benchmark program in a subprocess and measure it from outside.

Wall time is the whole process, start-up included, taken around the
child's life (`os.wait4`). Peak resident memory is the program's maximum
resident set size as GNU time (`/usr/bin/time`) reports it. The program
runs under `time` rather than straight from this process, because Linux
keeps a process's peak across `exec`: a child forked from the benchmark
runner starts with the runner's resident pages counted, so its own
`ru_maxrss` would be at least the runner's size (a test with the runner
grown by 300 MB raised a 200 MB figure to 363 MB). `time` is small, and
the program it forks starts from that. Resident memory over time is
sampled from `/proc/PID/statm` of the program. CPUs are pinned with
`os.sched_setaffinity` before it starts, like `taskset -c`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
GNU_TIME = Path("/usr/bin/time")


@dataclass
class Run:
    """Measurements of one process.

    Attributes:
        wall: Whole-process wall time in seconds.
        peak_mb: Peak resident memory in MB (10^6 bytes).
        cpu: CPU time of the process, user and system, in seconds.
        code: Exit code, or a negative signal number.
        result: The `RESULT` line the program printed, parsed.
        samples: `(seconds since start, resident MB)` pairs.
        error: The end of standard error when the run failed.
    """

    wall: float
    peak_mb: float
    code: int
    cpu: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the process exited with code 0."""
        return self.code == 0


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE / 1e6
    except (OSError, IndexError, ValueError):
        return None


def _program_pid(launcher: int) -> int | None:
    """Return the pid of the program that GNU time `launcher` started."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text()
    except OSError:
        return None
    pids = children.split()
    return int(pids[0]) if pids else None


def run(
    command: list[str],
    *,
    cpus: tuple[int, ...] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    sample_every: float = 0.0,
    cwd: Path | None = None,
) -> Run:
    """Run `command` to its end and measure it.

    Args:
        command: Program and arguments.
        cpus: CPUs the process may use; None for all.
        env: Extra environment variables.
        timeout: Seconds before the process is killed (the run then fails).
        sample_every: Seconds between resident-memory samples; 0 for none.
        cwd: Working folder.

    Returns:
        The measurements.
    """
    if not GNU_TIME.exists():
        raise SystemExit(
            f"{GNU_TIME} is missing: install GNU time (Debian package `time`), "
            "which measures each program's peak memory"
        )
    full_env = {**os.environ, **(env or {})}
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".peak") as peak,
    ):

        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        started = time.perf_counter()
        child = subprocess.Popen(
            [str(GNU_TIME), "-f", "%U %S %M", "-o", peak.name, *command],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            preexec_fn=pin,
            start_new_session=True,  # a timeout kills the program with `time`
        )
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def watch() -> None:
            deadline = started + timeout
            program = None
            while not done.wait(sample_every or 0.2):
                if sample_every:
                    program = program or _program_pid(child.pid)
                    rss = _rss_mb(program) if program is not None else None
                    if rss is not None:
                        samples.append((time.perf_counter() - started, rss))
                if time.perf_counter() > deadline:
                    os.killpg(child.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, _ = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        watcher.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        # GNU time writes user and system seconds and the peak in KiB as its
        # last line, after a line "Command exited with non-zero status N"
        # when the program failed.
        lines = Path(peak.name).read_text().splitlines()
        user, system, peak_kib = _time_line(lines[-1] if lines else "")
    result: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    code = child.returncode
    return Run(
        wall=wall,
        peak_mb=peak_kib * 1024 / 1e6,
        code=code,
        cpu=user + system,
        result=result,
        samples=samples,
        error="" if code == 0 else stderr[-2000:],
    )


def _time_line(line: str) -> tuple[float, float, int]:
    """Return user seconds, system seconds and peak KiB from GNU time's line."""
    try:
        user, system, peak = line.split()
        return float(user), float(system), int(peak)
    except ValueError:
        return 0.0, 0.0, 0


IDLE_FRAMES = (
    "Condition.wait",
    "Event.wait",
    "_wait_for_tstate_lock",
    "Queue.get",
    "select",
    "sleep",
    "<module>",
)


def profile(
    py_spy: Path,
    command: list[str],
    *,
    cpus: tuple[int, ...] | None = None,
    env: dict[str, str] | None = None,
    rate: int = 250,
    top: int = 15,
    gil: bool = False,
) -> list[tuple[str, float, float]] | str:
    """Sample every active thread of `command` with py-spy; summarise.

    Samples of idle threads (waiting on a queue, a lock or a sleep) and of
    imports are left out, so the shares show where the working threads
    spend their time, in Python or in native code called from Python.

    Args:
        py_spy: The py-spy program.
        command: Program and arguments.
        cpus: CPUs the process may use; None for all.
        env: Extra environment variables.
        rate: Samples per second.
        top: Functions to return.
        gil: Keep only samples of the thread holding the GIL (`--gil`).

    Returns:
        `(function, own share %, total share %)` rows, most own time first,
        or the error text when py-spy failed.
    """
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        spy = [
            str(py_spy), "record", "--nonblocking", "-r", str(rate),
            *(["--gil"] if gil else []),
            "-f", "raw", "-o", raw.name, "--", *command,
        ]  # fmt: skip
        measured = run(spy, cpus=cpus, env=env, timeout=900)
        if not measured.ok:
            return f"py-spy failed: {measured.error.strip()[-300:]}"
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        count = 0
        for line in Path(raw.name).read_text().splitlines():
            stack, _, number = line.rpartition(" ")
            if not number.isdigit():
                continue
            if "importlib._bootstrap" in stack:
                continue  # imports: reported separately
            frames = [_short(f) for f in stack.split(";") if f]
            if not frames or frames[-1].startswith(IDLE_FRAMES):
                continue
            samples = int(number)
            count += samples
            own[frames[-1]] += samples
            for name in set(frames):
                total[name] += samples
    if not count:
        return "py-spy collected no samples"
    return [
        (name, 100 * value / count, 100 * total[name] / count)
        for name, value in own.most_common(top)
    ]


def _short(frame: str) -> str:
    """Turn `func (path/to/module.py:12)` into `func (module.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    tail = "/".join(parts[-2:]) if parts else path
    return f"{name} ({tail})" if tail else name
