"""Read pipeline files: YAML with line numbers, and parameterised templates.

A template file has two top-level keys::

    parameters:
      input: {type: string, default: data/flights.csv, description: CSV to read}
      threshold: {type: integer, default: 15}
    template:
      id: delays
      sources:
        flights: {type: csv, config: {path: "{{ input }}"}}
      ...

Every string in `template` is rendered with Jinja2. A string that is exactly
one `{{ expression }}` keeps the expression's type, so `"{{ threshold }}"`
becomes the integer 15, not the text "15".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.nativetypes import NativeEnvironment

from dataflare.streaming.errors import PipelineValidationError, ValidationIssue

Path_ = tuple[str | int, ...]

_PARAMETER_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "list": list,
    "object": dict,
}


class PipelineYamlLoader(yaml.SafeLoader):
    """YAML loader with YAML 1.2 booleans: only true and false.

    YAML 1.1 also reads yes, no, on and off as booleans, which would turn a
    key such as `on: carrier` into `True: carrier`.
    """


PipelineYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
PipelineYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass
class LoadedFile:
    """A parsed pipeline file: the data, where it came from and line numbers."""

    data: dict[str, Any]
    source: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        # Walk up to the nearest node that has a line: a missing key's parent.
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def load_text(text: str, source: str = "<string>") -> LoadedFile:
    try:
        node = yaml.compose(text, Loader=PipelineYamlLoader)
        data = yaml.load(text, Loader=PipelineYamlLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PipelineValidationError(
            [ValidationIssue((), f"invalid YAML: {problem}", line=line)], source
        ) from exc
    if not isinstance(data, dict):
        raise PipelineValidationError(
            [ValidationIssue((), "a pipeline file must be a mapping with id, "
                             "sources and destinations", value=data)],
            source,
        )
    lines: dict[Path_, int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return LoadedFile(data, source, lines)


def load_file(path: str | Path) -> LoadedFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PipelineValidationError(
            [ValidationIssue((), f"pipeline file not found: {path}")], str(path)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineValidationError(
            [ValidationIssue((), f"cannot read pipeline file: {exc}")], str(path)
        ) from exc
    return load_text(text, str(path))


def _collect_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*path, key)] = key_node.start_mark.line + 1
            _collect_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*path, index), lines)


# --- templates -------------------------------------------------------------


def is_template(data: Mapping[str, Any]) -> bool:
    return "template" in data


def render_template(loaded: LoadedFile, params: Mapping[str, str | Any]) -> LoadedFile:
    """Render a template file with `params`; return the plain pipeline file.

    String values in `params` (as given on the command line) are converted
    to each parameter's declared type.

    Raises:
        PipelineValidationError: unknown, missing or mistyped parameters, or a
            template expression that fails; every problem is listed.
    """
    data = loaded.data
    issues: list[ValidationIssue] = []
    declared = data.get("parameters") or {}
    body = data.get("template")
    extra = set(data) - {"parameters", "template"}
    for key in sorted(extra):
        issues.append(ValidationIssue((key,), "unexpected key next to 'template'",
                                      hint="move it inside 'template'"))
    if not isinstance(declared, dict):
        issues.append(ValidationIssue(("parameters",), "must be a mapping of name to "
                                      "{type, default, description}", value=declared))
        declared = {}
    if not isinstance(body, dict):
        issues.append(ValidationIssue(("template",), "must be a mapping (the pipeline)",
                                      value=body))

    values = _resolve_parameters(declared, params, issues)
    if issues:
        raise PipelineValidationError(_with_lines(issues, loaded), loaded.source)

    env = NativeEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    assert isinstance(body, dict)
    rendered = _render(body, ("template",), env, values, issues)
    if issues:
        raise PipelineValidationError(_with_lines(issues, loaded), loaded.source)
    lines = {
        path[1:]: line for path, line in loaded.lines.items()
        if path[:1] == ("template",)
    }
    return LoadedFile(rendered, loaded.source, lines)


def _resolve_parameters(
    declared: Mapping[str, Any],
    given: Mapping[str, Any],
    issues: list[ValidationIssue],
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in given:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "(none)"
            issues.append(ValidationIssue(("parameters", name), "unknown parameter",
                                          hint=f"declared parameters: {known}"))
    for name, decl in declared.items():
        decl = decl if isinstance(decl, dict) else {"default": decl}
        kind = decl.get("type", "string")
        if kind not in _PARAMETER_TYPES:
            issues.append(ValidationIssue(
                ("parameters", name, "type"), "unknown parameter type", value=kind,
                hint="use one of: " + ", ".join(_PARAMETER_TYPES)))
            continue
        if name in given:
            value = _coerce(given[name], kind)
        elif "default" in decl:
            value = decl["default"]
        else:
            issues.append(ValidationIssue(
                ("parameters", name), "required parameter has no value",
                hint=f"pass it with --param {name}=VALUE"))
            continue
        expected = _PARAMETER_TYPES[kind]
        if not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool)):
            issues.append(ValidationIssue(("parameters", name), f"expected a {kind}",
                                          value=value))
            continue
        choices = decl.get("choices")
        if choices is not None and value not in choices:
            issues.append(ValidationIssue(("parameters", name), "value not allowed",
                                          value=value, hint=f"choose one of {choices}"))
        values[name] = value
    return values


def _coerce(raw: Any, kind: str) -> Any:
    if not isinstance(raw, str) or kind == "string":
        return raw
    try:
        parsed = yaml.load(raw, Loader=PipelineYamlLoader)  # noqa: S506
    except yaml.YAMLError:
        return raw
    return parsed


def _render(
    node: Any,
    path: Path_,
    env: NativeEnvironment,
    values: Mapping[str, Any],
    issues: list[ValidationIssue],
) -> Any:
    if isinstance(node, dict):
        return {k: _render(v, (*path, k), env, values, issues) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, (*path, i), env, values, issues) for i, v in enumerate(node)]
    if isinstance(node, str) and ("{{" in node or "{%" in node):
        try:
            return env.from_string(node).render(**values)
        except jinja2.TemplateError as exc:
            issues.append(ValidationIssue(path, f"template error: {exc}", value=node,
                                          hint="check the parameter names in {{ }}"))
    return node


def _with_lines(issues: list[ValidationIssue], loaded: LoadedFile) -> list[ValidationIssue]:
    for issue in issues:
        if issue.line is None:
            issue.line = loaded.line_of(issue.path)
    return issues
