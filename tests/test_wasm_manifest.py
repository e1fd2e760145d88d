"""Manifests, and the checks of a module's real imports and exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import wasmtime
import yaml

import dataflare.plugin.wasm.manifest as manifest_module
from dataflare.plugin.wasm.manifest import (
    DEFAULT_MEMORY_MAX_PAGES,
    ManifestError,
    check_module,
    check_plugin_config,
    extism_config,
    inspect_module,
    load_manifest,
    resolve_permissions,
)
from dataflare.plugin.wasm.testing import wat_module, write_plugin

FILTER = {"kind": "filter", "exports": {"process": "process"}}


def manifest_file(tmp_path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "demo",
        "version": "1.0.0",
        "kind": "map",
        "module": "demo.wasm",
        "exports": {"process": "run"},
        "batch_encoding": 1,
        "fields": ["x"],
        "outputs": [{"name": "y", "type": "int64"}],
    }
    data.update(changes)
    path = tmp_path / "dataflare-plugin.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_manifest_directory_and_defaults(
    tmp_path: Path,
) -> None:
    manifest_file(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded.name == "demo"
    assert loaded.module_path == (tmp_path / "demo.wasm").resolve()
    assert loaded.manifest.permissions.memory_max_pages == DEFAULT_MEMORY_MAX_PAGES
    assert loaded.manifest.keep_input is True


def test_json_manifests_are_read(tmp_path: Path) -> None:
    path = tmp_path / "dataflare-plugin.json"
    path.write_text(
        json.dumps(
            {
                "name": "j",
                "version": "1",
                "module": "j.wasm",
                "batch_encoding": 1,
                **FILTER,
            }
        )
    )
    assert load_manifest(tmp_path).manifest.kind == "filter"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_encoding": 2}, "batch_encoding 2 is not supported"),
        ({"kind": "filter"}, "a filter returns a selection vector"),
        ({"outputs": []}, "must list the columns it writes"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"outputs": [{"name": "_event_time", "type": "int64"}]}, "reserved"),
        ({"outputs": [{"name": "y", "type": "decimal"}]}, "outputs.0.type"),
        ({"config_schema": {"type": "nonsense"}}, "not a valid JSON Schema"),
        ({"permissions": {"allowed_paths": ["data"]}}, "must be an absolute path"),
        ({"name": "has space"}, "name: String should match pattern"),
    ],
)
def test_invalid_manifests_say_which_key_is_wrong(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    manifest_file(tmp_path, **changes)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)


def test_manifest_missing_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="has no plugin manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing")


def check(tmp_path: Path, wat: str, **manifest: Any) -> list[str]:
    plugin = write_plugin(tmp_path / "p", wat, {**FILTER, **manifest})
    loaded = load_manifest(plugin)
    return check_module(loaded, inspect_module(loaded.module_path.read_bytes()))


def test_module_clean_passes(tmp_path: Path) -> None:
    assert check(tmp_path, wat_module("(call $keep_all)")) == []


@pytest.mark.parametrize(
    ("module", "name", "permission"),
    [
        ("wasi_snapshot_preview1", "path_open", "allowed_paths"),
        ("wasi_snapshot_preview1", "fd_prestat_get", "allowed_paths"),
        ("extism:host/env", "http_request", "allowed_hosts"),
    ],
)
def test_capabilities_need_a_request_in_the_manifest(
    tmp_path: Path, module: str, name: str, permission: str
) -> None:
    imports = f'(import "{module}" "{name}" (func $cap (param i32) (result i32)))'
    wat = wat_module("(call $keep_all)", imports=imports)
    problems = check(tmp_path, wat)
    assert len(problems) == 1
    assert f"imports {module}.{name}" in problems[0]
    assert f"permissions.{permission}" in problems[0]
    requested = {"allowed_paths": ["/data"], "allowed_hosts": ["example.org"]}
    assert check(tmp_path, wat, permissions={permission: requested[permission]}) == []


@pytest.mark.parametrize(
    ("module", "name", "message"),
    [
        ("wasi_snapshot_preview1", "sock_accept", "plugins get no sockets"),
        ("env", "system", "which the host does not provide"),
        ("extism:host/user", "lookup", "which the host does not provide"),
        ("env", "abort", "--use abort=~lib/dataflare/index/dataflareAbort"),
    ],
)
def test_imports_the_host_never_provides_are_rejected(
    tmp_path: Path, module: str, name: str, message: str
) -> None:
    imports = f'(import "{module}" "{name}" (func $x (param i32) (result i32)))'
    problems = check(tmp_path, wat_module("(call $keep_all)", imports=imports))
    assert len(problems) == 1
    assert f"{module}.{name}" in problems[0]
    assert message in problems[0]


def test_harmless_wasi_imports_are_allowed(tmp_path: Path) -> None:
    imports = (
        '(import "wasi_snapshot_preview1" "fd_write" '
        "(func $w (param i32 i32 i32 i32) (result i32)))"
        '(import "wasi_snapshot_preview1" "clock_time_get" '
        "(func $c (param i32 i64 i32) (result i32)))"
    )
    assert check(tmp_path, wat_module("(call $keep_all)", imports=imports)) == []


def test_export_missing_or_mistyped(tmp_path: Path) -> None:
    wat = wat_module("(call $keep_all)")
    problems = check(tmp_path, wat, exports={"process": "filter_rows"})
    assert problems == [
        "module plugin.wasm does not export the function 'filter_rows' named in "
        "exports.process; it exports: process"
    ]
    typed = wat.replace(
        '(func (export "process") (result i32)',
        '(func (export "process") (param i32) (result i32)',
    )
    problems = check(tmp_path, typed)
    assert "has type (i32) -> (i32)" in problems[0]


def test_module_memory_above_limit(
    tmp_path: Path,
) -> None:
    wat = wat_module("(call $keep_all)").replace(
        '(memory (export "memory") 1)', '(memory (export "memory") 300)'
    )
    problems = check(tmp_path, wat, permissions={"memory_max_pages": 256})
    assert "needs 300 pages of memory (18 MiB) at start" in problems[0]
    assert "stack-size" in problems[0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello", "does not start with the bytes"),
        (b"\0asm\x01\0\0\0\x01\x05", "not a valid WebAssembly module"),
        (b"", "does not start with the bytes"),
    ],
)
def test_corrupt_modules_give_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        inspect_module(data, origin="module broken.wasm")


def test_module_truncated_reported() -> None:
    wasm = bytes(wasmtime.wat2wasm(wat_module("(call $keep_all)")))
    with pytest.raises(ManifestError, match=r"module cut\.wasm is not a valid"):
        inspect_module(wasm[: len(wasm) // 2], origin="module cut.wasm")


def test_grants_must_match_requests(tmp_path: Path) -> None:
    manifest_file(
        tmp_path,
        permissions={
            "allowed_paths": ["/data"],
            "allowed_hosts": ["api.example.org"],
            "timeout_ms": 1000,
            "memory_max_pages": 100,
        },
    )
    manifest = load_manifest(tmp_path).manifest
    granted = resolve_permissions(
        manifest,
        allowed_paths={str(tmp_path): "/data"},
        allowed_hosts=["api.example.org"],
        timeout_ms=500,
    )
    assert granted.allowed_paths == {str(tmp_path.resolve()): "/data"}
    assert granted.allowed_hosts == ["api.example.org"]
    assert (granted.timeout_ms, granted.memory_max_pages) == (500, 100)
    # Nothing granted: nothing given, even though the manifest requests it.
    assert resolve_permissions(manifest).allowed_paths == {}
    assert resolve_permissions(manifest).allowed_hosts == []

    with pytest.raises(ManifestError, match="did not request that path") as info:
        resolve_permissions(manifest, allowed_paths={str(tmp_path): "/etc"})
    assert info.value.where == "grants.allowed_paths"
    with pytest.raises(ManifestError, match="is not a directory"):
        resolve_permissions(manifest, allowed_paths={str(tmp_path / "no"): "/data"})
    with pytest.raises(ManifestError, match="did not request it"):
        resolve_permissions(manifest, allowed_hosts=["evil.example.com"])
    with pytest.raises(ManifestError, match="above the 1000 ms"):
        resolve_permissions(manifest, timeout_ms=2000)
    with pytest.raises(ManifestError, match="above the 100 pages"):
        resolve_permissions(manifest, memory_max_pages=101)


def test_plugin_config_is_checked_and_defaults_filled(tmp_path: Path) -> None:
    manifest_file(
        tmp_path,
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "keep": {"type": "integer", "minimum": 0, "default": 4},
                "label": {"type": "string"},
            },
        },
    )
    manifest = load_manifest(tmp_path).manifest
    assert check_plugin_config(manifest, {"label": "x"}) == {"label": "x", "keep": 4}
    with pytest.raises(ManifestError, match=r"config\.keep: -1 is less than"):
        check_plugin_config(manifest, {"keep": -1})
    with pytest.raises(ManifestError, match="'colour' was unexpected"):
        check_plugin_config(manifest, {"colour": 1})


def test_config_values_reach_extism_as_text() -> None:
    assert extism_config({"s": "x", "n": 4, "b": True, "l": [1, "a"], "z": None}) == {
        "s": "x",
        "n": "4",
        "b": "true",
        "l": '[1, "a"]',
        "z": "null",
    }


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("DATAFLARE_CACHE_DIR", str(directory))
    return directory


def _no_library(*args: Any) -> Any:
    raise AssertionError("the check ran again instead of reading the cache")


def test_module_facts_read_from_cache(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imports = (
        '(import "wasi_snapshot_preview1" "fd_write"'
        " (func (param i32 i32 i32 i32) (result i32)))"
    )
    wasm = wasmtime.wat2wasm(wat_module("(call $keep_all)", imports=imports))
    first = inspect_module(wasm)
    monkeypatch.setattr(manifest_module, "_inspect_with_wasmtime", _no_library)

    second = inspect_module(wasm)

    assert second == first
    assert second.uses_wasi
    assert len(list(cache_dir.glob("wasm-module-*.json"))) == 1


def test_module_changed_is_inspected_again(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inspect_module(wasmtime.wat2wasm(wat_module("(call $keep_all)")))
    other = wasmtime.wat2wasm(wat_module("(call $keep_all)", data=b"other"))
    monkeypatch.setattr(manifest_module, "_inspect_with_wasmtime", _no_library)

    with pytest.raises(AssertionError, match="ran again"):
        inspect_module(other)


def test_damaged_module_entry_ignored(cache_dir: Path) -> None:
    wasm = wasmtime.wat2wasm(wat_module("(call $keep_all)"))
    first = inspect_module(wasm)
    (entry,) = cache_dir.glob("wasm-module-*.json")
    for damaged in ('{"size": 1}', "[1, 2]", "not json", '{"imports": 3}'):
        entry.write_text(damaged)

        assert inspect_module(wasm) == first


def test_module_entry_of_other_size_ignored(cache_dir: Path) -> None:
    wasm = wasmtime.wat2wasm(wat_module("(call $keep_all)"))
    first = inspect_module(wasm)
    (entry,) = cache_dir.glob("wasm-module-*.json")
    facts = json.loads(entry.read_text())
    facts["size"] += 1
    facts["imports"] = []
    entry.write_text(json.dumps(facts))

    assert inspect_module(wasm) == first


def test_plugin_config_pass_read_from_cache(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = {
        "type": "object",
        "properties": {"keep": {"type": "integer", "default": 4}},
    }
    manifest_file(tmp_path, config_schema=schema)
    manifest = load_manifest(tmp_path).manifest
    assert check_plugin_config(manifest, {}) == {"keep": 4}
    monkeypatch.setattr(manifest_module, "_validate_plugin_config", _no_library)

    assert check_plugin_config(manifest, {}) == {"keep": 4}
    with pytest.raises(AssertionError, match="ran again"):
        check_plugin_config(manifest, {"keep": 5})


def test_failed_plugin_config_never_cached(tmp_path: Path, cache_dir: Path) -> None:
    schema = {"type": "object", "properties": {"keep": {"type": "integer"}}}
    manifest_file(tmp_path, config_schema=schema)
    manifest = load_manifest(tmp_path).manifest
    for _ in range(2):
        with pytest.raises(ManifestError, match=r"config\.keep: 'x' is not of type"):
            check_plugin_config(manifest, {"keep": "x"})

    assert list(cache_dir.glob("plugin-config-*.json")) == []


def test_config_schema_check_read_from_cache(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest_file(tmp_path, config_schema={"type": "object"})
    load_manifest(tmp_path)
    import jsonschema

    monkeypatch.setattr(jsonschema.validators, "validator_for", _no_library)

    assert load_manifest(tmp_path).manifest.config_schema == {"type": "object"}
    manifest_file(tmp_path, config_schema={"type": "array"})
    with pytest.raises(ManifestError, match="ran again"):
        load_manifest(tmp_path)


def test_invalid_config_schema_never_cached(tmp_path: Path, cache_dir: Path) -> None:
    manifest_file(tmp_path, config_schema={"type": "no-such-type"})
    for _ in range(2):
        with pytest.raises(
            ManifestError, match="config_schema is not a valid JSON Schema"
        ):
            load_manifest(tmp_path)

    assert list(cache_dir.glob("json-schema-*.json")) == []


def test_directory_entries_ignored(tmp_path: Path, cache_dir: Path) -> None:
    schema = {"type": "object", "properties": {"keep": {"type": "integer"}}}
    manifest_file(tmp_path, config_schema=schema)
    manifest = load_manifest(tmp_path).manifest
    check_plugin_config(manifest, {"keep": 1})
    wasm = wasmtime.wat2wasm(wat_module("(call $keep_all)"))
    first = inspect_module(wasm)
    for entry in cache_dir.iterdir():
        entry.unlink()
        entry.mkdir()

    assert load_manifest(tmp_path).manifest == manifest
    assert check_plugin_config(manifest, {"keep": 1}) == {"keep": 1}
    with pytest.raises(ManifestError, match=r"config\.keep: 'x' is not of type"):
        check_plugin_config(manifest, {"keep": "x"})
    assert inspect_module(wasm) == first
