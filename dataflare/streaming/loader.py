"""Read pipeline files: YAML with line numbers, and parameterised templates.

A template file has two top-level keys::

    parameters:
      input: {type: string, default: data/flights.csv, description: CSV to read}
      threshold: {type: integer, default: 15}
      mode: {type: string, default: fast, choices: [fast, exact]}
    template:
      id: delays
      sources:
        flights: {type: csv, config: {path: "{{ input }}"}}
      ...

Every string in `template` is rendered with Jinja2 before the pipeline is
validated. A string that is exactly one `{{ expression }}` keeps the
expression's type, so `"{{ threshold }}"` becomes the integer 15, not the
text "15". Any other string renders to text. Parameter types are `string`,
`integer`, `number`, `boolean`, `list` and `object`. Values given as text
(on the command line) are converted to the declared type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dataflare.streaming.errors import PipelineValidationError, ValidationIssue

if TYPE_CHECKING:
    import jinja2

Path_ = tuple[str | int, ...]

PARAMETER_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "list": list,
    "object": dict,
}
PARAMETER_KEYS = ("type", "default", "description", "choices")
_TRUE_TEXTS = {"true", "yes", "on", "1"}
_FALSE_TEXTS = {"false", "no", "off", "0"}
_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}|\{\{).)*)\}\}\s*$", re.S)


class PipelineYamlLoader(yaml.SafeLoader):
    """YAML loader with YAML 1.2 booleans: only true and false.

    YAML 1.1 also reads yes, no, on and off as booleans, which would turn a
    key such as `on: carrier` into `True: carrier`.
    """


class _FastPipelineYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """`PipelineYamlLoader` on libyaml's parser, where PyYAML was built with it.

    It parsed the benchmark's W1 file in about 1 ms against 10 ms, with the
    same nodes and lines. Its error messages leave out the character,
    alias or anchor at fault, and give a byte position instead of a line
    for control characters, so a file it rejects is parsed again with
    `PipelineYamlLoader` for the message.
    """


for _loader in (PipelineYamlLoader, _FastPipelineYamlLoader):
    _loader.yaml_implicit_resolvers = {
        first: [
            (tag, regexp)
            for tag, regexp in resolvers
            if tag != "tag:yaml.org,2002:bool"
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )

MAX_YAML_VALUES = 1_000_000
"""Values a pipeline file may hold once its aliases are expanded. Aliases of
aliases grow exponentially (nine aliases to a list of nine aliases, eight
levels deep, is 43 million values), and every later walk of the data would
pay for each."""


@dataclass
class LoadedFile:
    """A parsed pipeline file: the data, where it came from and line numbers.

    `issues` has the problems found while reading that do not stop the
    validation (duplicate keys); the validation reports them with the rest.
    """

    data: dict[str, Any]
    source: str
    lines: dict[Path_, int] = field(default_factory=dict)
    issues: list[ValidationIssue] = field(default_factory=list)

    def line_of(self, path: Path_) -> int | None:
        """Return the line of `path`, or of its nearest ancestor in the file."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def load_text(text: str, source: str = "<string>") -> LoadedFile:
    """Parse pipeline YAML, keeping the line of every key and list item.

    Raises:
        PipelineValidationError: invalid YAML, a document that is not a
            mapping, or aliases that contain themselves or expand to more
            than `MAX_YAML_VALUES` values.
    """
    loaded = LoadedFile({}, source)
    try:
        data = _parse_yaml(text, _FastPipelineYamlLoader, loaded)
    except yaml.YAMLError as fast_error:
        loaded = LoadedFile({}, source)
        try:  # for the pure-Python parser's message, which names more
            data = _parse_yaml(text, PipelineYamlLoader, loaded)
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, text, source) from exc
        raise _yaml_error(fast_error, text, source) from fast_error
    if not isinstance(data, dict):
        issue = ValidationIssue(
            (),
            "a pipeline file must be a mapping with id, sources and destinations",
            value=data,
            line=1,
        )
        raise PipelineValidationError([issue], source)
    loaded.data = data
    return loaded


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> PipelineValidationError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        # A character the YAML reader does not accept, at a character index.
        line = text.count("\n", 0, exc.position) + 1
        problem = (
            f"character #x{exc.character:04x} is not allowed; remove it, or "
            "write it as an escape such as \\x01 in a double-quoted string"
        )
    hint = None
    lines = text.splitlines()
    if line is not None and line <= len(lines) and "{{" in lines[line - 1]:
        # Unquoted, `{{ name }}` is a YAML mapping inside a mapping.
        hint = 'put a template expression in quotes: "{{ name }}"'
    return PipelineValidationError(
        [ValidationIssue((), f"invalid YAML: {problem}", hint=hint, line=line)],
        source,
    )


def _parse_yaml(text: str, loader_class: type[Any], loaded: LoadedFile) -> Any:
    """Parse one document, note its lines in `loaded` and return its data.

    The data is built from the node tree, so the text is parsed once. The
    lines are noted first, because building the data merges `<<` keys into
    their mappings, where they would look like duplicate keys.

    Raises:
        yaml.YAMLError: the text is not valid YAML.
        PipelineValidationError: aliases that contain themselves or expand
            to too many values.
    """
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, loaded.source)
        _collect_lines(node, (), loaded, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_file(path: str | Path) -> LoadedFile:
    """Read and parse a pipeline file (UTF-8, with or without a byte order mark).

    Raises:
        PipelineValidationError: the file is missing, unreadable or not valid YAML.
    """
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


def _check_aliases(root: yaml.Node, source: str) -> None:
    """Reject aliases that contain themselves or expand to too many values.

    Raises:
        PipelineValidationError: naming the line of the alias at fault.
    """
    sizes: dict[int, int] = {}  # expanded value count by node id
    open_nodes: set[int] = set()  # nodes whose children are being counted
    # Walk without recursion, so that deep nesting cannot exhaust the stack.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise _alias_error(
                    node,
                    source,
                    f"the file's aliases expand to more than {MAX_YAML_VALUES:,} "
                    "values",
                    "use fewer aliases of aliases",
                )
            continue
        if key in sizes:
            continue  # an alias of a node already counted
        if key in open_nodes:
            raise _alias_error(
                node,
                source,
                "an alias refers to a node that contains it",
                "an anchor's value cannot contain an alias to that anchor",
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_children(node)))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _alias_error(
    node: yaml.Node, source: str, message: str, hint: str
) -> PipelineValidationError:
    issue = ValidationIssue(
        (), f"invalid YAML: {message}", hint=hint, line=node.start_mark.line + 1
    )
    return PipelineValidationError([issue], source)


def _collect_lines(
    node: yaml.Node, path: Path_, loaded: LoadedFile, visited: set[int]
) -> None:
    """Note the line of every key and item under `node`, and duplicate keys.

    A node reached again through an alias is not walked again: its lines
    are those of its anchor. Merge keys (`<<`) are skipped, so the keys they
    bring in and the keys beside them are not duplicates.
    """
    loaded.lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # building the data rejects it, in PyYAML's words
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                loaded.issues.append(
                    ValidationIssue(
                        (*path, key),
                        f"duplicate key; it is also on line {seen[key]}, and "
                        "only the last one is used",
                        hint="remove or rename one of them",
                        line=line,
                    )
                )
            seen[key] = line
            # A key's own line is where an error about its value points.
            loaded.lines[(*path, key)] = line
            _collect_lines(value_node, (*path, key), loaded, visited)
            loaded.lines[(*path, key)] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*path, index), loaded, visited)


# --- templates -------------------------------------------------------------


def is_template(data: Mapping[str, Any]) -> bool:
    """Tell whether a parsed file is a template (has a `template` key)."""
    return "template" in data


def render_template(loaded: LoadedFile, params: Mapping[str, Any]) -> LoadedFile:
    """Render a template file with `params`; return the plain pipeline file.

    Text values in `params` (as given on the command line) are converted to
    each parameter's declared type; other values must have that type.

    Raises:
        PipelineValidationError: unknown, missing or mistyped parameters, a
            bad declaration, or a template expression that fails; every
            problem is listed.
    """
    data = loaded.data
    issues: list[ValidationIssue] = list(loaded.issues)
    declared = data.get("parameters")
    if declared is None:
        declared = {}
    body = data.get("template")
    for key in sorted(set(data) - {"parameters", "template"}):
        issues.append(
            ValidationIssue(
                (key,),
                "unexpected key next to 'template'",
                hint="a template file has only 'parameters' and 'template'; move it "
                "inside 'template'",
            )
        )
    if not isinstance(declared, dict):
        issues.append(
            ValidationIssue(
                ("parameters",),
                "must be a mapping of parameter name to {type, default, "
                "description, choices}",
                value=declared,
            )
        )
        declared = {}
    if not isinstance(body, dict):
        issues.append(
            ValidationIssue(
                ("template",), "must be a mapping (the pipeline)", value=body
            )
        )

    values = resolve_parameters(declared, params, issues)
    if issues:
        raise PipelineValidationError(_with_lines(issues, loaded), loaded.source)

    assert isinstance(body, dict)
    rendered = _render(body, ("template",), _Jinja(), values, issues)
    if issues:
        raise PipelineValidationError(_with_lines(issues, loaded), loaded.source)
    lines = {
        path[1:]: line
        for path, line in loaded.lines.items()
        if path[:1] == ("template",)
    }
    return LoadedFile(rendered, loaded.source, lines)


def resolve_parameters(
    declared: Mapping[str, Any],
    given: Mapping[str, Any],
    issues: list[ValidationIssue],
) -> dict[str, Any]:
    """Return the value of every declared parameter; add problems to `issues`."""
    values: dict[str, Any] = {}
    for name in given:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "(none)"
            issues.append(
                ValidationIssue(
                    ("parameters",),
                    f"unknown parameter {name!r}",
                    value=given[name],
                    hint=f"declared parameters: {known}",
                )
            )
    for name, declaration in declared.items():
        path: Path_ = ("parameters", name)
        if not isinstance(declaration, dict):
            issues.append(
                ValidationIssue(
                    path,
                    "a parameter is declared as a mapping",
                    value=declaration,
                    hint="write {type: string, default: ..., description: ...}",
                )
            )
            continue
        if not _check_declaration(path, declaration, issues):
            continue
        kind = declaration.get("type", "string")
        if name in given:
            value, problem = coerce_parameter(given[name], kind)
            where = "given value"
        elif "default" in declaration:
            value = _check_type(declaration["default"], kind)
            problem = _EXPECTED[kind] if value is _INVALID else None
            where = "default"
            path = (*path, "default")
        else:
            issues.append(
                ValidationIssue(
                    path,
                    f"parameter {name!r} is required and has no value",
                    hint=f"give it a value, e.g. --param {name}=VALUE, or declare "
                    "a default",
                )
            )
            continue
        if problem is not None or value is _INVALID:
            issues.append(
                ValidationIssue(
                    path,
                    f"parameter {name!r}: the {where} is not a valid {kind}",
                    value=given.get(name, declaration.get("default")),
                    hint=problem,
                )
            )
            continue
        choices = declaration.get("choices")
        if choices is not None and value not in choices:
            issues.append(
                ValidationIssue(
                    path,
                    f"parameter {name!r}: value not allowed",
                    value=value,
                    hint=f"choose one of: {', '.join(map(str, choices))}",
                )
            )
            continue
        values[name] = value
    return values


def _check_declaration(
    path: Path_, declaration: dict[str, Any], issues: list[ValidationIssue]
) -> bool:
    ok = True
    for key in declaration:
        if key not in PARAMETER_KEYS:
            issues.append(
                ValidationIssue(
                    (*path, key),
                    "unknown key in a parameter declaration",
                    hint=f"known keys: {', '.join(PARAMETER_KEYS)}",
                )
            )
            ok = False
    kind = declaration.get("type", "string")
    if kind not in PARAMETER_TYPES:
        issues.append(
            ValidationIssue(
                (*path, "type"),
                "unknown parameter type",
                value=kind,
                hint=f"use one of: {', '.join(PARAMETER_TYPES)}",
            )
        )
        ok = False
    choices = declaration.get("choices")
    if choices is not None and not isinstance(choices, list):
        issues.append(
            ValidationIssue(
                (*path, "choices"),
                "must be a list of allowed values",
                value=choices,
            )
        )
        ok = False
    description = declaration.get("description")
    if description is not None and not isinstance(description, str):
        issues.append(
            ValidationIssue((*path, "description"), "must be text", value=description)
        )
        ok = False
    return ok


_INVALID = object()


def coerce_parameter(raw: Any, kind: str) -> tuple[Any, str | None]:
    """Convert a parameter value to `kind`; text is parsed as that type.

    Returns:
        The value and None, or `_INVALID` and a hint saying what is expected.
    """
    if not isinstance(raw, str) or kind == "string":
        value = _check_type(raw, kind)
        return value, None if value is not _INVALID else _EXPECTED[kind]
    text = raw.strip()
    try:
        if kind == "integer":
            return int(text), None
        if kind == "number":
            try:
                return int(text), None
            except ValueError:
                return float(text), None
        if kind == "boolean":
            lowered = text.lower()
            if lowered in _TRUE_TEXTS | _FALSE_TEXTS:
                return lowered in _TRUE_TEXTS, None
            return _INVALID, _EXPECTED[kind]
        value = yaml.load(text, Loader=_FastPipelineYamlLoader)  # a safe loader
    except (ValueError, yaml.YAMLError):
        return _INVALID, _EXPECTED[kind]
    checked = _check_type(value, kind)
    return checked, None if checked is not _INVALID else _EXPECTED[kind]


_EXPECTED = {
    "string": "give text",
    "integer": "give a whole number such as 15",
    "number": "give a number such as 2.5",
    "boolean": "give true or false (or yes/no, on/off, 1/0)",
    "list": "give a list such as [a, b] (YAML or JSON)",
    "object": "give a mapping such as {a: 1} (YAML or JSON)",
}


def _check_type(value: Any, kind: str) -> Any:
    expected = PARAMETER_TYPES[kind]
    if isinstance(value, bool) and kind != "boolean":
        return _INVALID
    return value if isinstance(value, expected) else _INVALID


class _Jinja:
    """The Jinja2 environment of one rendering, made (and imported) on first use."""

    def __init__(self) -> None:
        self._env: jinja2.Environment | None = None

    @property
    def env(self) -> jinja2.Environment:
        if self._env is None:
            import jinja2

            self._env = jinja2.Environment(
                undefined=jinja2.StrictUndefined, autoescape=False
            )
        return self._env


# Names that Jinja2 reads as constants, operators or its own objects rather
# than as the parameter of that name; they are left to Jinja2.
_JINJA_RESERVED = frozenset(
    {"true", "false", "none", "True", "False", "None"}
    | {"and", "or", "not", "in", "is", "if", "else"}
    | {"self", "loop", "super", "caller", "varargs", "kwargs"}
)


def _render(
    node: Any,
    path: Path_,
    jinja: _Jinja,
    values: Mapping[str, Any],
    issues: list[ValidationIssue],
) -> Any:
    if isinstance(node, dict):
        return {
            k: _render(v, (*path, k), jinja, values, issues) for k, v in node.items()
        }
    if isinstance(node, list):
        return [
            _render(v, (*path, i), jinja, values, issues) for i, v in enumerate(node)
        ]
    if not isinstance(node, str) or ("{{" not in node and "{%" not in node):
        return node
    single = _SINGLE_EXPRESSION.match(node)
    if single is not None:
        # `{{ name }}` of a parameter evaluates to the parameter's value, so
        # it is looked up without Jinja2, which then often is not imported.
        name = single.group("expr").strip()
        if name in values and name.isidentifier() and name not in _JINJA_RESERVED:
            return values[name]
    import jinja2  # imported already by `_Jinja.env`, or imported now

    try:
        if single is not None:
            # Evaluated, not rendered, so that the value keeps its type.
            expression = jinja.env.compile_expression(
                single.group("expr"), undefined_to_none=False
            )
            result = expression(**values)
            if isinstance(result, jinja2.Undefined):
                str(result)  # raises UndefinedError naming the variable
            return result
        return jinja.env.from_string(node).render(**values)
    except jinja2.TemplateError as exc:
        known = ", ".join(sorted(values)) or "(none)"
        issues.append(
            ValidationIssue(
                path,
                f"template error: {exc}",
                value=node,
                hint=f"the parameters are: {known}",
            )
        )
        return node


def _with_lines(
    issues: list[ValidationIssue], loaded: LoadedFile
) -> list[ValidationIssue]:
    for issue in issues:
        if issue.line is None:
            issue.line = loaded.line_of(issue.path)
    return sorted(issues, key=lambda issue: issue.line or 0)
