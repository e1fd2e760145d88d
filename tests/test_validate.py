"""Validation of whole pipeline files, and the JSON Schema of the format."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dataflare import Pipeline
from dataflare.streaming.errors import PipelineValidationError, ValidationIssue
from dataflare.streaming.loader import load_text
from dataflare.streaming.schema import pipeline_json_schema
from dataflare.streaming.validate import validate

GOOD = """\
id: delays
sources:
  flights:
    type: csv
    config: {{path: "{data}"}}
transformations:
  delayed:
    type: filter
    inputs: [flights]
    config:
      condition: "dep_delay > 15"
destinations:
  out:
    type: memory
    inputs: [delayed]
"""

# Every kind of mistake, one of each; the line of each is in the comment.
BAD = """\
id: delays
sources:
  flights:
    type: csv
    config:
      path: "{data}"
      folow: true                      # 7: misspelt key
    watermark:
      max_out_of_orderness: 5 mins     # 9: bad duration
transformations:
  delayed:
    type: filter
    inputs: [flights]
    config:
      condition: "dep_delya > 15"      # 15: misspelt field (found once config is fixed)
  typo:
    type: filtr                        # 17: unknown type
    inputs: [flihgts]                  # 18: input naming no step
  loop_a:
    type: filter
    inputs: [loop_b]                   # 21: cycle
    config: {{condition: "a > 1"}}
  loop_b:
    type: filter
    inputs: [loop_a]
    config: {{condition: "a > 1"}}
destinations:
  out:
    type: memory
    inputs: [delayed, delayed.late]    # 30: no such side output
errors:
  policy: stop                         # 32: not a policy
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "flights.csv"
    path.write_text("dep_delay,carrier\n10,UA\n30,AA\n")
    return path


def problems(text: str) -> list[ValidationIssue]:
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text, "p.yaml"))
    return caught.value.issues


def by_path(issues: list[ValidationIssue]) -> dict[str, ValidationIssue]:
    return {issue.dotted_path: issue for issue in issues}


def test_good_file_builds_plan(data: Path) -> None:
    plan = validate(load_text(GOOD.format(data=data)))
    assert list(plan.steps) == ["flights", "delayed", "out"]
    delayed = plan.steps["delayed"]
    assert delayed.output_schema is not None
    assert delayed.output_schema.names == ["dep_delay", "carrier"]


def test_every_problem_reported_at_once(data: Path) -> None:
    issues = problems(BAD.format(data=data))
    found = by_path(issues)
    assert set(found) == {
        "sources.flights.config.folow",
        "sources.flights.watermark.max_out_of_orderness",
        "transformations.typo.type",
        "transformations.typo.inputs.0",
        "transformations.typo",
        "transformations.loop_a.inputs",
        "errors.policy",
    }
    assert [issue.line for issue in issues] == sorted(
        issue.line or 0 for issue in issues
    )

    folow = found["sources.flights.config.folow"]
    assert (folow.line, folow.message, folow.value) == (7, "unknown key", True)
    assert folow.hint is not None
    assert folow.hint.startswith("did you mean 'follow'? known keys: path, follow,")

    duration = found["sources.flights.watermark.max_out_of_orderness"]
    assert duration.line == 9
    assert duration.value == "5 mins"
    assert duration.message.startswith("invalid duration: write a number with a unit")

    kind = found["transformations.typo.type"]
    assert (kind.line, kind.value) == (17, "filtr")
    assert kind.message == "unknown transformation type"
    assert kind.hint is not None
    assert kind.hint.startswith("did you mean 'filter'? known types: ")
    assert "join" in kind.hint

    missing = found["transformations.typo.inputs.0"]
    assert (missing.line, missing.message, missing.value) == (
        18,
        "input names no step",
        "flihgts",
    )
    assert missing.hint is not None
    assert missing.hint.startswith("did you mean 'flights'?")

    assert found["transformations.typo"].message == "no step reads this step's output"

    cycle = found["transformations.loop_a.inputs"]
    assert cycle.message == "inputs form a cycle: loop_a -> loop_b -> loop_a"
    assert cycle.line == 21

    policy = found["errors.policy"]
    assert (policy.line, policy.value) == (32, "stop")
    assert policy.message == "must be 'dead_letter' or 'fail'"


def test_field_problems_found_with_structure_problems(data: Path) -> None:
    text = BAD.format(data=data).replace("folow: true", "follow: false")
    found = by_path(problems(text))
    field = found["transformations.delayed.config.condition"]
    assert field.line == 15
    assert field.message == "unknown field 'dep_delya' in condition"
    assert field.value == "dep_delya > 15"
    assert field.hint == (
        "did you mean 'dep_delay'? the fields reaching step 'delayed' are: "
        "dep_delay, carrier"
    )
    # The bad duration does not hide the field check of the source's readers.
    assert "sources.flights.watermark.max_out_of_orderness" in found


def test_missing_side_output(data: Path) -> None:
    text = GOOD.format(data=data).replace("inputs: [delayed]", "inputs: [delayed.late]")
    found = by_path(problems(text))
    port = found["destinations.out.inputs.0"]
    assert port.message == "step 'delayed' has no side output 'late'"
    assert port.hint == "its side outputs: (none)"
    assert port.line == 15
    assert (
        found["transformations.delayed"].message == "no step reads this step's output"
    )


def test_report_text(data: Path) -> None:
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(BAD.format(data=data), "p.yaml"))
    report = str(caught.value)
    assert report.startswith("p.yaml: 7 problems found\n")
    assert (
        "  p.yaml:17: transformations.typo.type: unknown transformation type "
        "(got 'filtr')\n    hint: did you mean 'filter'?"
    ) in report


def test_missing_source_file_reported(tmp_path: Path) -> None:
    found = by_path(problems(GOOD.format(data=tmp_path / "none.csv")))
    issue = found["sources.flights.config"]
    assert issue.message.startswith("no input files match path")
    assert issue.line == 5


def test_structure_problems(data: Path) -> None:
    text = """\
id: "bad id"
sources:
  "1st": {type: csv, config: {path: x.csv}}
destinations:
  out: {type: memory, inputs: [], parallelism: 2}
execution: {parallelism: 0}
"""
    issues = problems(text)
    found = by_path(issues)
    assert found["id"].message.startswith("invalid value; it must match")
    step_id = [i.message for i in issues if i.dotted_path == "sources.1st"]
    assert "invalid step id" in step_id
    assert found["destinations.out.inputs"].message.startswith("List should have")
    assert (
        found["execution.parallelism"].message == "must be greater than or equal to 1"
    )
    assert found["destinations.out.parallelism"].message == (
        "destinations run as one instance"
    )


def test_missing_keys_and_duplicate_ids(data: Path) -> None:
    text = f"""\
id: dup
sources:
  rows: {{type: csv, config: {{path: "{data}"}}}}
transformations:
  rows: {{type: filter, inputs: [rows], config: {{condition: "dep_delay > 1"}}}}
destinations:
  out: {{inputs: [rows]}}
"""
    found = by_path(problems(text))
    assert found["destinations.out.type"].message == "required key is missing"
    assert found["destinations.out.type"].line == 7
    assert found["transformations.rows"].message == "step id is also used in sources"


def test_destination_cannot_be_read(data: Path) -> None:
    text = GOOD.format(data=data) + "  again:\n    type: memory\n    inputs: [out]\n"
    found = by_path(problems(text))
    assert found["destinations.again.inputs.0"].message == (
        "a destination cannot be read by another step"
    )


def test_duplicate_yaml_key_reported(data: Path) -> None:
    text = (
        GOOD.format(data=data)
        + "destinations:\n  x: {type: memory, inputs: [delayed]}\n"
    )
    found = by_path(problems(text))
    assert found["destinations"].message.startswith(
        "duplicate key; it is also on line 12"
    )


# --- JSON Schema ---------------------------------------------------------------------

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    schema = pipeline_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator: Any, text: str) -> dict[str, str]:
    document = yaml.safe_load(text)
    return {
        ".".join(map(str, error.absolute_path)): error.message
        for error in validator.iter_errors(document)
    }


def test_json_schema_accepts_good_file(schema_validator: Any, data: Path) -> None:
    assert schema_errors(schema_validator, GOOD.format(data=data)) == {}


def test_json_schema_accepts_template(schema_validator: Any) -> None:
    text = "parameters:\n  n: {type: integer, default: 1}\ntemplate:\n  id: '{{ n }}'\n"
    assert schema_errors(schema_validator, text) == {}
    bad = "parameters:\n  n: {type: int}\ntemplate:\n  id: x\n"
    assert "parameters.n.type" in schema_errors(schema_validator, bad)


def test_json_schema_finds_file_level_problems(
    schema_validator: Any, data: Path
) -> None:
    errors = schema_errors(schema_validator, BAD.format(data=data))
    assert set(errors) == {
        "sources.flights.config",
        "sources.flights.watermark.max_out_of_orderness",
        "transformations.typo.type",
        "errors.policy",
    }
    assert "'folow' was unexpected" in errors["sources.flights.config"]
    assert "'filtr' is not one of" in errors["transformations.typo.type"]


def test_json_schema_checks_config_per_type(schema_validator: Any) -> None:
    text = """\
id: x
sources:
  rows: {type: csv, config: {path: a.csv, block_size: 10}}
transformations:
  kept: {type: filter, inputs: [rows], config: {condition: 5}}
destinations:
  out: {type: parquet, inputs: [kept], config: {path: o.parquet, compression: fast}}
"""
    errors = schema_errors(schema_validator, text)
    assert set(errors) == {
        "sources.rows.config.block_size",
        "transformations.kept.config.condition",
        "destinations.out.config.compression",
    }


def test_json_schema_accepts_short_forms(schema_validator: Any) -> None:
    text = """
id: short
sources:
  gen: {type: generate, config: {count: 5, fields: {id: sequence, n: {type: int}}}}
transformations:
  once: {type: dedupe, inputs: [gen], config: {key: id, within: 1m}}
destinations:
  out: {type: stdout, inputs: [once]}
"""
    assert schema_errors(schema_validator, text) == {}
    misspelt = text.replace("id: sequence", "id: sequins")
    assert "sources.gen.config.fields.id" in schema_errors(schema_validator, misspelt)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".inf", "a duration must be a finite number of seconds"),
        (".nan", "a duration must be a finite number of seconds"),
        ("99999999999d", "duration too long: at most 999,999,999 days"),
        ("100000000000000", "duration too long: at most 999,999,999 days"),
    ],
)
def test_unrepresentable_duration_reported(
    tmp_path: Path, value: str, message: str
) -> None:
    text = f"""
id: durations
sources:
  s: {{type: generate, config: {{count: 5, fields: {{id: sequence}}}}}}
destinations:
  out:
    type: jsonl
    inputs: [s]
    config: {{path: {tmp_path / "out"}, roll_interval: {value}}}
"""
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text))

    [issue] = caught.value.issues
    assert issue.path == ("destinations", "out", "config", "roll_interval")
    assert issue.message == message


def test_infinite_generate_rate_reported() -> None:
    text = """
id: rates
sources:
  s: {type: generate, config: {count: 5, rate: .inf, fields: {id: sequence}}}
destinations:
  out: {type: memory, inputs: [s]}
"""
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text))

    [issue] = caught.value.issues
    assert issue.path == ("sources", "s", "config", "rate")
    assert "finite" in issue.message


def test_dead_letter_path_of_a_destination_reported(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    text = f"""
id: shared-path
sources:
  s: {{type: generate, config: {{count: 5, fields: {{id: sequence}}}}}}
destinations:
  out: {{type: jsonl, inputs: [s], config: {{path: {out}}}}}
errors: {{dead_letter: {{path: {out}}}}}
"""
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text))

    [issue] = caught.value.issues
    assert issue.path == ("errors", "dead_letter", "path")
    assert issue.message.startswith("destination 'out' writes the same file")


def test_dead_letter_path_that_is_a_folder_reported(tmp_path: Path) -> None:
    text = f"""
id: folder-path
sources:
  s: {{type: generate, config: {{count: 5, fields: {{id: sequence}}}}}}
destinations:
  out: {{type: memory, inputs: [s]}}
errors: {{dead_letter: {{path: {tmp_path}}}}}
"""
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text))

    [issue] = caught.value.issues
    assert issue.path == ("errors", "dead_letter", "path")
    assert issue.message == "is a folder, not a file"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("{tmp}/afile/dead.jsonl", "cannot be created, because {tmp}/afile is a file"),
        ("{tmp}/afile/sub/dead.jsonl", "cannot be created, because {tmp}/afile is a"),
        ("''", "is empty"),
    ],
)
def test_dead_letter_path_not_creatable_reported(
    tmp_path: Path, path: str, message: str
) -> None:
    (tmp_path / "afile").write_text("x")
    text = f"""
id: blocked-path
sources:
  s: {{type: generate, config: {{count: 5, fields: {{id: sequence}}}}}}
destinations:
  out: {{type: memory, inputs: [s]}}
errors: {{dead_letter: {{path: {path.format(tmp=tmp_path)}}}}}
"""
    with pytest.raises(PipelineValidationError) as caught:
        validate(load_text(text))

    [issue] = caught.value.issues
    assert issue.path == ("errors", "dead_letter", "path")
    assert issue.message.startswith(message.format(tmp=tmp_path))


def test_file_destination_inputs_need_same_fields(tmp_path: Path) -> None:
    p = Pipeline("mixed")
    rows = p.source("rows", "memory", records=[{"a": 1, "b": 2}])
    both = p.transform("both", "sql", [rows], query="SELECT a, b FROM input")
    one = p.transform("one", "sql", [rows], query="SELECT a FROM input")
    p.destination("out", "jsonl", [both, one], path=str(tmp_path / "out.jsonl"))

    with pytest.raises(PipelineValidationError) as raised:
        p.build()

    [issue] = raised.value.issues
    assert issue.path[:2] == ("destinations", "out")
    assert "input 'one' has fields ['a'], but input 'both' has ['a', 'b']" in (
        issue.message
    )


def test_file_destination_inputs_may_differ_in_metadata(tmp_path: Path) -> None:
    p = Pipeline("metadata")
    rows = p.source(
        "rows",
        "memory",
        records=[{"a": 1, "t": "2024-01-01T00:00:00Z"}],
        event_time={"field": "t"},
    )
    kept = p.transform("kept", "filter", [rows], condition="a > 0")
    plain = p.transform("plain", "sql", [rows], query="SELECT a, t FROM input")
    out = tmp_path / "out.jsonl"
    p.destination("out", "jsonl", [kept, plain], path=str(out))

    p.run()  # `kept` has _event_time, `plain` not; the sink drops it

    assert out.read_text().splitlines() == ['{"a":1,"t":"2024-01-01T00:00:00Z"}'] * 2


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_missing_input_with_schema_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    p = Pipeline("missing")
    schema = {} if kind == "parquet" else {"schema": {"a": "int"}}
    path = str(tmp_path / f"none.{kind}")
    rows = p.source("rows", kind, path=path, **schema)
    p.destination("out", "memory", [rows])

    if kind == "parquet":  # no schema to declare: a missing file is invalid
        with pytest.raises(PipelineValidationError):
            p.build()
        return
    with caplog.at_level("WARNING"):
        summary = p.run()

    assert summary.output("out").num_rows == 0
    assert f"no input files match path {path!r}" in caplog.text


def test_misspelt_input_hint_and_unread_steps() -> None:
    p = Pipeline("typos")
    rows = p.source("rows", "memory", records=[{"a": 1}])
    p.transform("delays", "filter", ["delay"], condition="a > 0")
    p.transform("big", "filter", [rows], condition="a > 0")
    p.destination("out", "memory", ["bigg", "delays"])

    with pytest.raises(PipelineValidationError) as raised:
        p.build()

    found = {".".join(map(str, i.path)): i for i in raised.value.issues}
    own = found["transformations.delays.inputs.0"]
    assert own.hint == "steps that can be read: rows, big"  # not itself
    meant = found["destinations.out.inputs.0"]
    assert meant.hint == "did you mean 'big'? steps that can be read: rows, delays, big"
    # `big` is what `bigg` meant, so it is not reported as read by no step.
    assert "transformations.big" not in found
    assert sorted(found) == [
        "destinations.out.inputs.0",
        "transformations.delays.inputs.0",
    ]


ZONED = """\
id: zoned
sources:
  events:
    type: jsonl
    config:
      path: "{data}"
      schema: {{at: {kind}}}
    event_time: {event_time}
destinations:
  out:
    type: memory
    inputs: [events]
"""


@pytest.mark.parametrize(
    "event_time",
    [
        "{field: at, timezone: Europe/Paris}",
        "{expression: \"at + INTERVAL '1 minute'\", timezone: Europe/Paris}",
    ],
)
def test_timezone_on_zoned_timestamp_rejected(tmp_path: Path, event_time: str) -> None:
    data = tmp_path / "events.jsonl"
    data.write_text('{"at": "2024-03-01 10:00:00"}\n')

    found = by_path(
        problems(ZONED.format(data=data, kind="timestamp", event_time=event_time))
    )

    issue = found["sources.events.event_time.timezone"]
    assert "'Europe/Paris' has no effect" in issue.message
    assert "make it a `string` in the source's schema" in issue.message
    assert issue.value == "Europe/Paris"


@pytest.mark.parametrize(
    ("kind", "timezone"),
    [("string", "Europe/Paris"), ("timestamp", "UTC"), ("timestamp", "Etc/UTC")],
)
def test_timezone_allowed_where_it_applies(
    tmp_path: Path, kind: str, timezone: str
) -> None:
    data = tmp_path / "events.jsonl"
    data.write_text('{"at": "2024-03-01 10:00:00"}\n')
    event_time = f"{{field: at, timezone: {timezone}}}"

    plan = validate(
        load_text(ZONED.format(data=data, kind=kind, event_time=event_time))
    )

    assert "_event_time" in plan.steps["events"].output_schema.names


@pytest.mark.parametrize(
    ("timezone", "valid"),
    [("America/New_York", True), ("UTC", True), ("Europe/Paris", False)],
)
def test_timezone_on_zoned_parquet_column(
    tmp_path: Path, timezone: str, valid: bool
) -> None:
    data = tmp_path / "events.parquet"
    zone = pa.timestamp("ms", tz="America/New_York")
    at = dt.datetime(2024, 3, 1, 15, 0, tzinfo=dt.UTC)
    pq.write_table(pa.table({"at": pa.array([at], zone)}), data)
    text = f"""
id: zoned-parquet
sources:
  events:
    type: parquet
    config: {{path: "{data}"}}
    event_time: {{field: at, timezone: {timezone}}}
destinations:
  out: {{type: memory, inputs: [events]}}
"""
    if valid:
        plan = validate(load_text(text))
        assert "_event_time" in plan.steps["events"].output_schema.names
        return
    found = by_path(problems(text))
    issue = found["sources.events.event_time.timezone"]
    assert "carry the zone 'America/New_York' already" in issue.message
