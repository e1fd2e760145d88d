"""Exceptions of the streaming engine.

::

    DataFlareError
     ├── PipelineValidationError   the file is invalid (CLI exit code 2)
     └── PipelineRunError          the run failed (CLI exit code 1)
          └── RejectedRecordError  a bad record under the fail-fast policy
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class DataFlareError(Exception):
    """Base of DataFlare's own errors."""


@dataclass
class ValidationIssue:
    """One problem in a pipeline file, located by its path in the file."""

    path: tuple[str | int, ...]
    message: str
    value: Any = None
    hint: str | None = None
    line: int | None = None

    @property
    def dotted_path(self) -> str:
        return ".".join(str(part) for part in self.path) or "(top level)"

    def format(self, source: str | None = None) -> str:
        where = self.dotted_path
        if source is not None and self.line is not None:
            where = f"{source}:{self.line}: {where}"
        elif self.line is not None:
            where = f"line {self.line}: {where}"
        text = f"{where}: {self.message}"
        if self.value is not None:
            shown = repr(self.value)
            text += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.dotted_path,
            "line": self.line,
            "message": self.message,
            "value": None if self.value is None else repr(self.value),
            "hint": self.hint,
        }


class PipelineValidationError(DataFlareError):
    """The pipeline file has one or more problems; all of them are listed."""

    def __init__(self, issues: Sequence[ValidationIssue], source: str = "<pipeline>"):
        self.issues = list(issues)
        self.source = source
        super().__init__(self.report())

    def report(self) -> str:
        count = len(self.issues)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''} found"
        return "\n".join([head, *(f"  {i.format(self.source)}" for i in self.issues)])


class PipelineRunError(DataFlareError):
    """The run failed; the message names the step and the cause."""


class RejectedRecordError(PipelineRunError):
    """A bad record stopped the run because the error policy is `fail`."""
