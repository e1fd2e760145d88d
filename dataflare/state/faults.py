"""Crash points for recovery tests: kill the process at a chosen moment.

Set `DATAFLARE_CRASH_AT=NAME:N` and the process kills itself with SIGKILL
the N-th time it reaches the crash point NAME, exactly as `kill -9` would.
Names: `checkpoint-write` (state files written, metadata not yet) and
`sink-commit` (some part files of a checkpoint published, not all).
Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENVIRONMENT_VARIABLE = "DATAFLARE_CRASH_AT"

_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    setting = os.environ.get(ENVIRONMENT_VARIABLE)
    if not setting:
        return
    target, _, count = setting.partition(":")
    if target != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        reached = _counts[name] >= int(count or 1)
    if reached:
        os.kill(os.getpid(), signal.SIGKILL)
