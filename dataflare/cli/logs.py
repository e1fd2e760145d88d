"""Logging set-up for the command line: readable text or JSON lines."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from types import TracebackType

import orjson

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(log_format: str = "text", level: str = "warning") -> None:
    """Send the `dataflare` loggers to standard error in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
            )
        )
    root = logging.getLogger("dataflare")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


ENGINE_LOGGER = "dataflare.streaming.executor"
"""Logger of the engine, which logs the error of each step that fails."""


class HeldEngineErrors(logging.Filter):
    """Hold back the engine's ERROR records while a run goes on.

    The summary of a failed run ends with the run's error, which is also
    the message of the engine's record for the first failing step. So
    `release` logs only the held records that the summary does not show,
    such as the error of a second failing step. With JSON logs nothing is
    held, because log collectors may not read the summary.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held_records: list[logging.LogRecord] = []
        self._engine = logging.getLogger(ENGINE_LOGGER)
        handlers = logging.getLogger("dataflare").handlers
        self._enabled = not any(
            isinstance(handler.formatter, JsonFormatter) for handler in handlers
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self._held_records.append(record)
            return False
        return True

    def __enter__(self) -> HeldEngineErrors:
        if self._enabled:
            self._engine.addFilter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._engine.removeFilter(self)

    def release(self, reported_error: str | None) -> None:
        """Log the held records, except the first that reports `reported_error`.

        The engine logs `pipeline 'P': step 'S' failed: E`, and the run's
        error is `step 'S' failed: E`, or only `E` when the step raised a
        `PipelineRunError`.
        """
        records, self._held_records = self._held_records, []
        for record in records:
            message = record.getMessage()
            if reported_error is not None and (
                message == reported_error or message.endswith(f": {reported_error}")
            ):
                reported_error = None
                continue
            self._engine.handle(record)
