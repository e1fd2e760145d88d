"""Template files: parameters, type conversion, rendering and its errors."""

from __future__ import annotations

from typing import Any

import pytest

from dataflare.streaming.errors import PipelineValidationError, ValidationIssue
from dataflare.streaming.loader import (
    coerce_parameter,
    load_text,
    render_template,
)
from dataflare.streaming.validate import validate

TEMPLATE = """\
parameters:
  threshold: {type: integer, default: 1, description: Smallest value kept}
  label: {type: string, default: "007"}
  ratio: {type: number, default: 0.5}
  strict: {type: boolean, default: false}
  fields: {type: list, default: [a]}
  mode: {type: string, default: fast, choices: [fast, exact]}
template:
  id: "demo-{{ mode }}"
  description: "{{ label }}"
  metadata:
    threshold: "{{ threshold }}"
    ratio: "{{ ratio }}"
    strict: "{{ strict }}"
    fields: "{{ fields }}"
    text: "t={{ threshold }}, {{ fields | join(',') }}"
  sources:
    rows:
      type: memory
      config: {records: [{a: 1}, {a: 2}, {a: 3}]}
  transformations:
    kept:
      type: filter
      inputs: [rows]
      config: {condition: "a > {{ threshold }}"}
  destinations:
    out: {type: memory, inputs: [kept]}
"""


def render(params: dict[str, Any]) -> dict[str, Any]:
    return render_template(load_text(TEMPLATE, "t.yaml"), params).data


def issues_of(params: dict[str, Any], text: str = TEMPLATE) -> list[ValidationIssue]:
    with pytest.raises(PipelineValidationError) as caught:
        render_template(load_text(text, "t.yaml"), params)
    return caught.value.issues


def test_defaults_keep_their_types() -> None:
    data = render({})
    assert data["id"] == "demo-fast"
    assert data["description"] == "007"
    assert data["metadata"] == {
        "threshold": 1,
        "ratio": 0.5,
        "strict": False,
        "fields": ["a"],
        "text": "t=1, a",
    }


def test_command_line_strings_converted() -> None:
    data = render(
        {
            "threshold": "2",
            "ratio": "3",
            "strict": "yes",
            "fields": "[a, b]",
            "label": "123",
            "mode": "exact",
        }
    )
    assert data["metadata"]["threshold"] == 2
    assert data["metadata"]["ratio"] == 3
    assert data["metadata"]["strict"] is True
    assert data["metadata"]["fields"] == ["a", "b"]
    assert data["description"] == "123"
    assert data["transformations"]["kept"]["config"]["condition"] == "a > 2"


@pytest.mark.parametrize(
    ("raw", "kind", "expected"),
    [
        ("15", "integer", 15),
        (" 15 ", "integer", 15),
        ("2.5", "number", 2.5),
        ("Off", "boolean", False),
        ("1", "boolean", True),
        ("{a: 1}", "object", {"a": 1}),
        ('["x", 2]', "list", ["x", 2]),
        ("15", "string", "15"),
        (7, "number", 7),
    ],
)
def test_coerce_parameter(raw: Any, kind: str, expected: Any) -> None:
    value, problem = coerce_parameter(raw, kind)
    assert problem is None
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("1.5", "integer"),
        ("x", "number"),
        ("maybe", "boolean"),
        ("[1", "list"),
        ("a", "object"),
        (True, "integer"),
        (3, "string"),
    ],
)
def test_coerce_parameter_rejects(raw: Any, kind: str) -> None:
    _, problem = coerce_parameter(raw, kind)
    assert problem is not None


def test_all_parameter_problems_at_once() -> None:
    issues = issues_of({"threshold": "high", "mode": "slow", "colour": "red"})
    by_message = {issue.message: issue for issue in issues}
    assert set(by_message) == {
        "unknown parameter 'colour'",
        "parameter 'threshold': the given value is not a valid integer",
        "parameter 'mode': value not allowed",
    }
    threshold = by_message[
        "parameter 'threshold': the given value is not a valid integer"
    ]
    assert threshold.path == ("parameters", "threshold")
    assert threshold.line == 2
    assert threshold.value == "high"
    assert by_message["parameter 'mode': value not allowed"].hint == (
        "choose one of: fast, exact"
    )
    assert by_message["unknown parameter 'colour'"].hint == (
        "declared parameters: fields, label, mode, ratio, strict, threshold"
    )


def test_missing_required_parameter() -> None:
    text = "parameters:\n  input: {type: string}\ntemplate:\n  id: x\n"
    [issue] = issues_of({}, text)
    assert issue.message == "parameter 'input' is required and has no value"
    assert issue.line == 2


def test_bad_declarations() -> None:
    text = (
        "parameters:\n"
        "  a: {type: text}\n"
        "  b: {type: integer, default: nope}\n"
        "  c: {type: string, defualt: x}\n"
        "  d: 5\n"
        "template:\n  id: x\n"
    )
    issues = issues_of({}, text)
    assert [(i.dotted_path, i.line) for i in issues] == [
        ("parameters.a.type", 2),
        ("parameters.b.default", 3),
        ("parameters.c.defualt", 4),
        ("parameters.d", 5),
    ]
    assert (
        issues[0].hint == "use one of: string, integer, number, boolean, list, object"
    )


def test_undefined_name_in_template() -> None:
    text = "parameters: {}\ntemplate:\n  id: x\n  name: '{{ nme }}'\n"
    [issue] = issues_of({}, text)
    assert issue.path == ("template", "name")
    assert issue.line == 4
    assert "'nme' is undefined" in issue.message


def test_key_next_to_template() -> None:
    [issue] = issues_of({}, "id: x\ntemplate:\n  id: y\n")
    assert issue.path == ("id",)
    assert issue.message == "unexpected key next to 'template'"


def test_validation_errors_point_into_template() -> None:
    text = TEMPLATE.replace("a > {{ threshold }}", "b > {{ threshold }}")
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text, "t.yaml"))
    [issue] = caught.value.issues
    assert issue.path == ("transformations", "kept", "config", "condition")
    assert issue.line == 25
    assert issue.value == "b > 1"


def test_plain_file_takes_no_parameters() -> None:
    plain = "id: x\nsources: {}\ndestinations: {}\n"
    with pytest.raises(PipelineValidationError, match="declares no parameters"):
        validate(load_text(plain), params={"a": "1"})


def test_template_runs() -> None:
    plan = validate(load_text(TEMPLATE), params={"threshold": "1"})
    assert plan.spec.id == "demo-fast"
