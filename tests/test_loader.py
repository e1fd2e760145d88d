"""Reading pipeline files: YAML errors, line numbers, duplicate keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataflare.streaming.errors import PipelineValidationError, ValidationIssue
from dataflare.streaming.loader import load_file, load_text

PIPELINE = """\
id: demo
sources:
  rows:
    type: memory
    config:
      records: [{a: 1}]
destinations:
  out:
    type: memory
    inputs:
      - rows
"""


def test_lines_of_keys_and_items() -> None:
    loaded = load_text(PIPELINE)
    assert loaded.line_of(("id",)) == 1
    assert loaded.line_of(("sources", "rows", "type")) == 4
    assert loaded.line_of(("sources", "rows", "config", "records")) == 6
    assert loaded.line_of(("destinations", "out", "inputs", 0)) == 11


def test_missing_key_points_at_parent() -> None:
    loaded = load_text(PIPELINE)
    assert loaded.line_of(("destinations", "out", "config", "path")) == 8


def test_invalid_yaml_has_line() -> None:
    with pytest.raises(PipelineValidationError) as caught:
        load_text("id: x\nsources:\n  a: [1, 2\nb: 3\n", "bad.yaml")
    [issue] = caught.value.issues
    assert issue.message.startswith("invalid YAML")
    assert issue.line == 4
    assert str(caught.value).startswith("bad.yaml: 1 problem found")


def test_document_must_be_mapping() -> None:
    with pytest.raises(PipelineValidationError, match="must be a mapping"):
        load_text("- a\n- b\n")


def test_duplicate_keys_reported() -> None:
    text = PIPELINE + "destinations:\n  other: {type: memory, inputs: [rows]}\n"
    loaded = load_text(text)
    [issue] = loaded.issues
    assert issue.path == ("destinations",)
    assert issue.line == 12
    assert "also on line 7" in issue.message


def test_yes_and_on_stay_text() -> None:
    loaded = load_text("id: x\nmetadata: {on: yes, off: no, flag: true}\n")
    assert loaded.data["metadata"] == {"on": "yes", "off": "no", "flag": True}


def test_load_file_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + PIPELINE.encode())
    loaded = load_file(path)
    assert loaded.data["id"] == "demo"
    assert loaded.source == str(path)


def test_missing_file() -> None:
    with pytest.raises(PipelineValidationError, match="pipeline file not found"):
        load_file("/nonexistent/pipeline.yaml")


def test_merge_keys_are_not_duplicates() -> None:
    text = (
        "id: t\n"
        "base: &base {type: csv, config: {path: a.csv}}\n"
        "copy:\n"
        "  <<: *base\n"
        "  config: {path: b.csv}\n"
    )

    loaded = load_text(text)

    assert loaded.issues == []
    assert loaded.data["copy"] == {"type": "csv", "config": {"path": "b.csv"}}
    assert loaded.line_of(("copy", "config")) == 5


def test_alias_lines_point_at_the_alias() -> None:
    loaded = load_text("id: t\nbase: &b {a: 1}\nuse: *b\n")

    assert loaded.data["use"] == {"a": 1}
    assert loaded.line_of(("use", "a")) == 3
    assert loaded.line_of(("base", "a")) == 2


def only_issue(text: str) -> ValidationIssue:
    """Return the one problem that loading `text` reports."""
    with pytest.raises(PipelineValidationError) as raised:
        load_text(text)
    [issue] = raised.value.issues
    return issue


def test_recursive_alias_rejected_with_line() -> None:
    issue = only_issue("id: t\nmetadata: &m {self: *m}\n")

    assert issue.line == 2
    assert "alias refers to a node that contains it" in issue.message


def test_alias_bomb_rejected_quickly() -> None:
    lines = ["id: t", "l0: &l0 [" + ", ".join(["x"] * 9) + "]"]
    for level in range(1, 9):
        aliases = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"l{level}: &l{level} [{aliases}]")

    issue = only_issue("\n".join(lines) + "\n")

    assert "expand to more than 1,000,000 values" in issue.message
    assert issue.line == 8  # l6, the first list of more than a million values


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("id: t\nsources:\n\ts: {}\n", 3, "'\\t'"),
        ("id: t\nsources: *nope\n", 2, "'nope'"),
        ('id: t\nx: "a\\qb"\n', 2, "'q'"),
        ('id: t\n# \u00e9\u00e9\nx: "a\x01b"\n', 3, "#x0001"),
    ],
)
def test_invalid_yaml_names_character_and_line(
    text: str, line: int, words: str
) -> None:
    issue = only_issue(text)

    assert issue.line == line
    assert words in issue.message


def test_unquoted_template_expression_gets_hint() -> None:
    text = "id: t\nexecution:\n  max_batch_rows: {{ rows }}\n"

    issue = only_issue(text)

    assert issue.line == 3
    assert "unhashable key" in issue.message
    assert issue.hint is not None
    assert '"{{ name }}"' in issue.hint


def test_list_as_key_rejected() -> None:
    issue = only_issue("id: t\n? [a, b]\n: 1\n")

    assert issue.line == 2
    assert "unhashable key" in issue.message
