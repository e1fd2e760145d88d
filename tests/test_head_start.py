"""Head starts: the start of a JSON lines file parsed while the command loads.

A source that takes a head start must give the same records, rejects, line
numbers and blocks as one that reads the file itself. These tests compare
the two, and pandas, over files with bad lines, byte order marks and an
unterminated last line.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import RecordingContext

import dataflare.connectors.files.jsonl as jsonl_module
from dataflare import cache
from dataflare.cli import main as cli_main
from dataflare.connectors.files import head_start
from dataflare.connectors.files.jsonl import (
    JsonLinesSource,
    JsonLinesSourceConfig,
    native_fields,
)
from dataflare.plugin.interface import SourceBatch

reader = jsonl_module._jsonl_reader
pytestmark = pytest.mark.skipif(
    reader is None and not os.environ.get("CI"),
    reason="built without libsimdjson-dev",
)

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("score", pa.float64())])
FIELDS = native_fields(SCHEMA)
BLOCK = 4096


def rows(count: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "name": f"näme {i}" if i % 5 else None, "score": i / 8}
        for i in range(count)
    ]


def write(path: Path, lines: list[str], *, bom: bool = False, end: bool = True) -> None:
    text = "\n".join(lines) + ("\n" if end else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def good_lines(count: int) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) for row in rows(count)]


def blocks_of(path: Path, skipped: int) -> list[bytes]:
    """The blocks the source's own reader cuts from `path`."""
    with path.open("rb") as file:
        file.seek(skipped)
        return [bytes(b) for b in jsonl_module._BlockReader(file, BLOCK).blocks(True)]


def run_head_start(path: Path, limit: int = 1 << 30) -> tuple[dict[str, Any], list]:
    assert reader is not None and FIELDS is not None
    started = reader.HeadStart(str(path), FIELDS, BLOCK, limit)
    done = started.finish(wait=True)
    pieces = [started.take() for _ in done["sizes"]]
    assert started.take() is None
    return done, pieces


# --- the native head start ----------------------------------------------------


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("end", [True, False])
def test_blocks_are_those_read_block_gives(
    tmp_path: Path, bom: bool, end: bool
) -> None:
    path = tmp_path / "in.jsonl"
    write(path, good_lines(700), bom=bom, end=end)

    done, pieces = run_head_start(path)

    assert done["error"] == 0
    assert done["skipped"] == (3 if bom else 0)
    status = path.stat()
    identity = (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
    assert done["identity"] == identity
    expected = blocks_of(path, done["skipped"])
    assert len(expected) > 5
    assert done["sizes"] == [len(b) for b in expected]
    assert reader is not None
    for (parsed, text), block in zip(pieces, expected, strict=True):
        assert text is None
        assert parsed == reader.read_block(block, FIELDS)
    assert done["skipped"] + sum(done["sizes"]) == status.st_size


def test_unparsed_block_returned_as_text(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = good_lines(400)
    lines[250] = '{"id": 250, "name": "broken'
    write(path, lines)

    _, pieces = run_head_start(path)

    blocks = blocks_of(path, 0)
    left = [i for i, (parsed, _) in enumerate(pieces) if parsed is None]
    assert len(left) == 1
    assert pieces[left[0]][1] == blocks[left[0]]
    assert b'"broken' in blocks[left[0]]


def test_stops_after_the_limit_on_a_line_end(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write(path, good_lines(3000))

    done, _ = run_head_start(path, limit=2 * BLOCK)

    read = sum(done["sizes"])
    assert 0 < read < path.stat().st_size
    assert path.read_bytes()[read - 1 : read] == b"\n"


def test_missing_file_gives_its_error(tmp_path: Path) -> None:
    done, pieces = run_head_start(tmp_path / "absent.jsonl")

    assert done["error"] == errno.ENOENT
    assert done["identity"] is None
    assert pieces == []


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)

    done, pieces = run_head_start(fifo)  # must not wait for a writer

    assert done["error"] == errno.EINVAL
    assert pieces == []


def test_stops_on_a_line_longer_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write(path, [json.dumps({"id": 1, "name": "x" * 50_000, "score": 1.0})])

    done, pieces = run_head_start(path, limit=BLOCK)

    assert done["error"] == 0
    assert pieces == []


def test_take_needs_finish_first(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write(path, good_lines(10))
    assert reader is not None
    started = reader.HeadStart(str(path), FIELDS, BLOCK, 1 << 20)
    with pytest.raises(RuntimeError, match="finish"):
        started.take()
    started.finish()


def test_rejects_unknown_field_kinds(tmp_path: Path) -> None:
    assert reader is not None
    with pytest.raises(ValueError, match="kind"):
        reader.HeadStart(str(tmp_path / "x"), (("a", 9),), BLOCK, 1)


# --- the source taking a head start -------------------------------------------


def make_source(path: Path, step: str) -> tuple[JsonLinesSource, RecordingContext]:
    context = RecordingContext(step)
    config = JsonLinesSourceConfig.model_validate(
        {
            "path": str(path),
            "schema": {"id": "int", "name": "string", "score": "float"},
            "block_size": BLOCK,
            "parse_threads": 2,
        }
    )
    return JsonLinesSource(config, context), context


def read(
    path: Path, step: str
) -> tuple[pa.Table, list[str], RecordingContext, list[int]]:
    """Read `path` with a new source; also return the rows of each batch."""
    source, context = make_source(path, step)
    source.open()
    try:
        batches = [b for b in source.read() if isinstance(b, SourceBatch)]
    finally:
        source.close()
    positions = [
        b.origin.position(i)
        for b in batches
        if b.origin is not None
        for i in range(b.batch.num_rows)
    ]
    table = pa.Table.from_batches([b.batch for b in batches], schema=source.schema())
    return table, positions, context, [b.batch.num_rows for b in batches]


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[head_start.ClaimedBlocks | None]:
    """Record what each claim returned."""
    claims: list[head_start.ClaimedBlocks | None] = []
    claim = head_start.claim

    def spy(
        hint: head_start.Hint, status: os.stat_result
    ) -> head_start.ClaimedBlocks | None:
        claimed = claim(hint, status)
        claims.append(claimed)
        return claimed

    monkeypatch.setattr(head_start, "claim", spy)
    yield claims
    head_start.finish_run(None, save=False)


def start(path: Path) -> None:
    """Start a head start on `path` and let it read up to its limit."""
    assert FIELDS is not None
    hint = head_start.Hint(os.path.abspath(path), FIELDS, BLOCK)
    head_start._REGISTRY.start([hint], begin=True)
    head_start._REGISTRY._running[hint].finish(wait=True)


@pytest.mark.parametrize("limit", [3 * BLOCK, 1 << 30])
def test_source_gives_the_same_records_and_rejects(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recording: list[head_start.ClaimedBlocks | None],
    limit: int,
) -> None:
    path = tmp_path / "in.jsonl"
    lines = good_lines(3000)
    lines[40] = "not json"  # inside the head start's blocks
    lines[2900] = '{"id": "text", "name": "x", "score": 1}'  # after them
    lines[1000] = ""
    write(path, lines, bom=True, end=False)
    monkeypatch.setattr(head_start, "LIMIT", limit)

    expected, expected_positions, plain, expected_cuts = read(path, "plain")
    start(path)
    got, got_positions, context, cuts = read(path, "head")

    assert recording[0] is None  # the plain read had none
    claimed = recording[1]
    assert claimed is not None
    assert claimed.sizes
    assert (claimed.end < path.stat().st_size) == (limit < path.stat().st_size)
    assert got.equals(expected)
    # The same blocks too: event time and --fail-fast depend on them.
    assert cuts == expected_cuts
    assert got_positions == expected_positions
    assert [(r, p) for r, _, p in context.rejected] == [
        (r, p) for r, _, p in plain.rejected
    ]
    assert [p for _, _, p in context.rejected] == [
        f"{path} line 41",
        f"{path} line 2901",
    ]
    good = [
        json.loads(line) for i, line in enumerate(lines) if i not in (40, 1000, 2900)
    ]
    frame = pd.read_json(
        io.StringIO("\n".join(json.dumps(g) for g in good)), lines=True
    )
    assert got.column("id").to_pylist() == frame["id"].tolist()
    assert got.column("score").to_pylist() == pytest.approx(frame["score"].tolist())


def test_replaced_file_read_afresh(
    tmp_path: Path, recording: list[head_start.ClaimedBlocks | None]
) -> None:
    path = tmp_path / "in.jsonl"
    write(path, good_lines(2000))
    start(path)
    replacement = tmp_path / "new.jsonl"
    write(replacement, [json.dumps({"id": 7, "name": "new", "score": 0.5})])
    replacement.replace(path)  # another inode under the same name

    got, _, _, _ = read(path, "head")

    assert recording == [None]
    assert got.to_pylist() == [{"id": 7, "name": "new", "score": 0.5}]


# --- the command ---------------------------------------------------------------

PIPELINE = """
parameters:
  input: {type: string}
  output: {type: string}
template:
  id: head-start-test
  sources:
    rows:
      type: jsonl
      config:
        path: "{{ input }}"
        block_size: 4096
        schema: {id: int, name: string, score: float}
  transformations:
    kept:
      type: filter
      inputs: [rows]
      config: {condition: "id % 3 = 0"}
  destinations:
    out:
      type: jsonl
      inputs: [kept]
      config: {path: "{{ output }}"}
"""


def run_cli(pipeline: Path, data: Path, output: Path) -> None:
    result = CliRunner().invoke(
        cli_main.cli,
        ["run", str(pipeline), "-p", f"input={data}", "-p", f"output={output}"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output


@pytest.fixture
def command_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, Path]:
    monkeypatch.setenv("DATAFLARE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(head_start, "usable_cores", lambda: 2)
    monkeypatch.setattr(head_start, "LIMIT", 2 * BLOCK)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE, encoding="utf-8")
    data = tmp_path / "in.jsonl"
    write(data, good_lines(3000))
    return pipeline, data, tmp_path / "cache"


def test_second_run_takes_what_the_first_noted(
    tmp_path: Path,
    command_files: tuple[Path, Path, Path],
    recording: list[head_start.ClaimedBlocks | None],
) -> None:
    pipeline, data, cache = command_files

    run_cli(pipeline, data, tmp_path / "first.jsonl")
    run_cli(pipeline, data, tmp_path / "first.jsonl")

    entries = list(cache.glob("headstart-*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_bytes()) == [
        {
            "path": str(data),
            "fields": [list(f) for f in FIELDS or ()],
            "block_size": BLOCK,
        }
    ]
    assert recording[0] is None  # nothing was noted before the first run
    assert recording[1] is not None and recording[1].end < data.stat().st_size
    written = [
        json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()
    ]
    assert written == [row for row in rows(3000) if row["id"] % 3 == 0]


def test_turned_off_notes_nothing(
    tmp_path: Path,
    command_files: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline, data, cache = command_files
    monkeypatch.setenv("DATAFLARE_HEAD_START", "0")

    run_cli(pipeline, data, tmp_path / "out.jsonl")

    assert not list(cache.glob("headstart-*.json"))


DAMAGED = [
    '[{"path": 3, "fields": [["id", 99]], "block_size": "x"}]',
    '[{"path": "in.jsonl", "fields": [["id", 0]], "block_size": 1e30}]',
    '[{"path": "in.jsonl", "fields": [["id", 4294967296]], "block_size": 4096}]',
    '[{"path": "in.jsonl", "fields": [["id", 0]], "block_size": Infinity}]',
    "[" * 100_000,
    "{}",
    "not json",
]


@pytest.mark.parametrize("text", DAMAGED)
def test_damaged_entry_is_replaced(
    tmp_path: Path,
    command_files: tuple[Path, Path, Path],
    recording: list[head_start.ClaimedBlocks | None],
    text: str,
) -> None:
    pipeline, data, cache = command_files
    run_cli(pipeline, data, tmp_path / "out.jsonl")
    (entry,) = cache.glob("headstart-*.json")
    entry.write_text(text)

    run_cli(pipeline, data, tmp_path / "out.jsonl")

    assert recording == [None, None]
    assert json.loads(entry.read_bytes())[0]["path"] == str(data)


def test_named_pipe_entry_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "entry.json"
    os.mkfifo(fifo)
    got: list[bytes | None] = []
    thread = threading.Thread(target=lambda: got.append(cache.read_entry(fifo)))
    thread.start()
    thread.join(timeout=10)

    assert not thread.is_alive(), "reading the entry waited for a writer"
    assert got == [None]


def test_directory_entry_not_read(tmp_path: Path) -> None:
    directory = tmp_path / "entry.json"
    directory.mkdir()

    assert cache.read_entry(directory) is None
    assert cache.read_json_entry(directory) is None


def test_head_start_no_source_took_is_dropped(
    tmp_path: Path, recording: list[head_start.ClaimedBlocks | None]
) -> None:
    path = tmp_path / "in.jsonl"
    write(path, good_lines(2000))
    start(path)

    head_start.drop_unclaimed()

    assert head_start._REGISTRY._running == {}
    got, _, _, _ = read(path, "late")
    assert recording == [None]
    assert got.num_rows == 2000


# --- malloc settings ------------------------------------------------------------


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


def test_malloc_is_tuned_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(cli_main.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cli_main.sys, "platform", "linux")
    for parameter in cli_main._MALLOPT:
        monkeypatch.delenv(parameter[1], raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=1024")

    cli_main._tune_malloc()
    assert libc.calls == [(-3, 32 << 20), (-1, 256 << 20)]

    libc.calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    cli_main._tune_malloc()
    assert libc.calls == [(-3, 32 << 20)]

    libc.calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "lots")
    cli_main._tune_malloc()
    assert libc.calls == [(-3, 32 << 20), (-1, 256 << 20)]

    libc.calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    cli_main._tune_malloc()
    assert libc.calls == []
