"""Run a WebAssembly plugin with Extism, one call per batch.

`PluginRuntime` compiles the module once and keeps one Extism instance. It
sets the memory cap, the per-call time limit, the plugin's config and, only
where the operator granted them, directories and HTTP hosts. Every failure
of a call (a trap, a timeout, memory exhaustion, a non-zero status) becomes
a `PluginCallError` that names the plugin, the function and the reason, so
a plugin cannot bring the host process down. After a trap, a timeout or
memory exhaustion the instance is discarded and a fresh one is made for the
next call, so state kept in plugin memory starts over. After a status
returned by the plugin itself, the instance and its state are kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import extism
import numpy as np
from extism.extism import CompiledPlugin
from extism_sys import ffi as _ffi

from dataflare.plugin.wasm.manifest import DEFAULT_MEMORY_MAX_PAGES, DEFAULT_TIMEOUT_MS

logger = logging.getLogger(__name__)

ABORT_PREFIX = "abort:"
"""Start of the error message an SDK sets before it traps on purpose."""


class FailureKind(StrEnum):
    TRAP = "trap"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    STATUS = "status"
    LOAD = "load"


class PluginCallError(RuntimeError):
    """A plugin call failed; the message names the plugin and the reason."""

    def __init__(
        self, plugin: str, function: str, kind: FailureKind, reason: str
    ) -> None:
        self.plugin = plugin
        self.function = function
        self.kind = kind
        self.reason = reason
        super().__init__(f"wasm plugin {plugin!r} ({function}): {reason}")


class PluginLoadError(RuntimeError):
    """Extism could not create the plugin (link error, bad module, ...)."""


@dataclass(frozen=True)
class RuntimeSettings:
    """Everything needed to make an instance; plain data, easy to rebuild."""

    name: str
    wasm: bytes
    wasi: bool = False
    memory_max_pages: int = DEFAULT_MEMORY_MAX_PAGES
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    config: Mapping[str, str] = field(default_factory=dict)
    allowed_paths: Mapping[str, str] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = ()

    def extism_manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "wasm": [{"data": self.wasm, "name": "main"}],
            "memory": {"max_pages": self.memory_max_pages},
            "timeout_ms": self.timeout_ms,
            "allowed_hosts": list(self.allowed_hosts),
        }
        if self.allowed_paths:
            manifest["allowed_paths"] = dict(self.allowed_paths)
        return manifest


def classify_error(message: str) -> tuple[FailureKind, str]:
    """Turn an Extism error message into a failure kind and a clear reason.

    NOTE: Extism reports an HTTP request to a host that was not granted as a
    plain trap: its message carries a backtrace but not the cause.
    """
    text = message.strip()
    lowered = text.lower()
    if lowered == "timeout" or ("timeout" in lowered and "epoch" in lowered):
        return FailureKind.TIMEOUT, ""
    if lowered == "oom" or "failed to allocate extism memory" in lowered:
        return FailureKind.MEMORY, ""
    if (
        "wasm backtrace" in lowered
        or "wasm trap" in lowered
        or lowered.startswith("error while executing")
    ):
        return FailureKind.TRAP, " ".join(text.split())
    if lowered.startswith(ABORT_PREFIX):
        # The SDKs' abort handlers set this message, then trap.
        return FailureKind.TRAP, text
    if lowered.startswith("error code:"):
        return FailureKind.STATUS, text.split(":", 1)[1].strip()
    return FailureKind.STATUS, text


class PluginRuntime:
    """One Extism instance of a plugin, recreated after a fatal failure."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        try:
            self._compiled = CompiledPlugin(
                settings.extism_manifest(), wasi=settings.wasi, functions=[]
            )
        except extism.Error as exc:
            raise PluginLoadError(
                f"Extism could not load wasm plugin {settings.name!r}: {exc}"
            ) from None
        self._plugin: Any = None
        self.instances_created = 0
        self._instantiate()

    def _instantiate(self) -> None:
        try:
            self._plugin = extism.Plugin(
                self._compiled, config=dict(self.settings.config), functions=[]
            )
        except extism.Error as exc:
            self._plugin = None
            kind, reason = classify_error(str(exc))
            if kind is FailureKind.MEMORY:
                reason = (
                    "its memory does not fit under the limit of "
                    f"{self.settings.memory_max_pages} pages"
                )
            raise PluginLoadError(
                f"Extism could not start wasm plugin {self.settings.name!r}: "
                f"{reason or exc}"
            ) from None
        self.instances_created += 1

    def call(self, function: str, data: np.ndarray | bytes) -> memoryview:
        """Call `function` with `data` as input; return its output.

        The returned view is valid until the next call on this runtime.

        Raises:
            PluginCallError: the call trapped, timed out, ran out of memory
                or returned a non-zero status.
        """
        with self._lock:
            if self._plugin is None:
                try:
                    self._instantiate()
                except PluginLoadError as exc:
                    raise PluginCallError(
                        self.settings.name, function, FailureKind.LOAD, str(exc)
                    ) from None
            plugin = self._plugin
            assert plugin is not None
            payload: Any = (
                _ffi.from_buffer("unsigned char[]", data)
                if isinstance(data, np.ndarray)
                else data
            )
            try:
                output = plugin.call(function, payload, parse=None)
            except extism.Error as exc:
                raise self._failure(function, str(exc)) from None
            return memoryview(output)

    def _failure(self, function: str, message: str) -> PluginCallError:
        kind, detail = classify_error(message)
        settings = self.settings
        if kind is FailureKind.TIMEOUT:
            reason = (
                f"timed out: one call ran longer than the {settings.timeout_ms} ms "
                "limit (the plugin may loop forever; raise timeout_ms if it "
                "really needs longer)"
            )
        elif kind is FailureKind.MEMORY:
            reason = (
                "ran out of memory: it tried to grow its memory past the limit "
                f"of {settings.memory_max_pages} pages "
                f"({settings.memory_max_pages * 64 // 1024} MiB); use smaller "
                "batches or raise memory_max_pages"
            )
        elif kind is FailureKind.TRAP:
            reason = f"trapped (a WebAssembly runtime error): {detail}"
        else:
            reason = f"returned an error: {detail}"
        if kind is not FailureKind.STATUS:
            # A trap or an interrupted call can leave the plugin's memory in
            # any state: start a fresh instance for the next call.
            self._discard()
            logger.warning(
                "wasm plugin %r %s; a new instance will handle the next batch "
                "(state kept in plugin memory starts over)",
                settings.name,
                kind.value,
            )
        return PluginCallError(settings.name, function, kind, reason)

    def _discard(self) -> None:
        plugin, self._plugin = self._plugin, None
        if plugin is not None:
            plugin.__exit__(None, None, None)

    def restart(self) -> None:
        """Drop the current instance; the next call makes a fresh one."""
        with self._lock:
            self._discard()

    def close(self) -> None:
        """Free the instance and the compiled module."""
        with self._lock:
            self._discard()
            compiled, self._compiled = self._compiled, None
            if compiled is not None:
                compiled.__del__()

    def __enter__(self) -> PluginRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
