"""Discover, load, unload and reload plugins while the process runs.

A `PluginManager` owns a `PluginRegistry` (the look-up path of pipeline
validation) and fills it from three places:

- entry points in the `dataflare.plugins` group: the built-in plugins of the
  `dataflare` distribution (from the registry's `BUILTIN_PLUGINS` table) and
  those of installed third-party packages (read from the package metadata
  when first needed, see `dataflare.plugin.registry`);
- plugin directories: every `*.py` file of a directory (names starting with
  `_` or `.` are skipped) is imported on its own, and each concrete plugin
  class defined in it is registered under its `metadata.name`. Directories
  come from the `DATAFLARE_PLUGIN_PATH` environment variable (separated like
  `PATH`), from `add_path` and from the `plugins: {paths: [...]}` settings
  passed to `configure`;
- classes registered in code, including WebAssembly plugins
  (`register(..., origin="wasm")`).

Entry points are imported on first use; directory files are imported when
the directory is added, because their plugins are known only then. Every
class goes through the same compatibility check before use: it must be a
plugin class with `metadata` and `Config`, and its `metadata.api_version`
must equal `dataflare.plugin.interface.API_VERSION`.

Unloading a plugin removes it from the registry, so pipelines validated
afterwards cannot use it; runs that already built instances keep them.
Reloading re-imports the plugin's module (`importlib.reload`) and registers
the new classes; pipelines validated afterwards use them.

The manager also keeps per-plugin counters (calls, records, errors, seconds)
that the engine feeds with `record_call`, for `dataflare plugin list`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from hashlib import sha256
from importlib.metadata import entry_points
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dataflare.plugin.interface import Plugin
from dataflare.plugin.registry import (
    ENTRY_POINT_GROUP,
    SECTIONS,
    PluginEntry,
    PluginNotFoundError,
    PluginOrigin,
    PluginRegistry,
    is_builtin_entry_point,
    section_for,
)

PLUGIN_PATH_VARIABLE = "DATAFLARE_PLUGIN_PATH"
MODULE_PREFIX = "dataflare_plugin_file_"
"""Prefix of the module names given to plugin directory files."""

logger = logging.getLogger(__name__)

PluginClass = type[Plugin]  # type: ignore[type-arg]


class PluginState(StrEnum):
    DISCOVERED = "discovered"  # known, not imported yet
    LOADED = "loaded"  # imported and checked; usable in pipelines
    FAILED = "failed"  # import or check failed; `error` contains the reason
    UNLOADED = "unloaded"  # removed by `unload`; `load` brings it back


class PluginLoadError(ImportError):
    """A plugin could not be loaded or reloaded; the message gives the reason."""


class AmbiguousPluginNameError(LookupError):
    """A plugin name used without a section names plugins in several sections."""

    def __init__(self, name: str, sections: list[str]) -> None:
        super().__init__(
            f"{name!r} names plugins in several sections ({', '.join(sections)}); "
            "give the section too"
        )
        self.name = name
        self.sections = sections


@dataclass
class PluginStats:
    """Counters of one plugin in this process, fed by the engine."""

    calls: int = 0
    records: int = 0
    errors: int = 0
    seconds: float = 0.0


@dataclass
class PluginInfo:
    """One plugin as listed by the manager."""

    name: str
    section: str  # "sources", "transformations", "destinations", or "" if unknown
    origin: PluginOrigin
    state: PluginState
    source: str
    """Distribution and object, file path, or module of the plugin."""
    error: str | None = None
    kind: str | None = None
    version: str | None = None
    api_version: int | None = None
    description: str | None = None
    author: str | None = None
    stats: PluginStats = field(default_factory=PluginStats)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["origin"] = self.origin.value
        data["state"] = self.state.value
        return data


class PluginSettings(BaseModel):
    """The `plugins:` settings: directories of plugin files to add."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: list[Path] = []


@dataclass
class _PluginFile:
    """A plugin directory file and what it registered."""

    path: Path
    module_name: str
    module: ModuleType | None = None
    plugins: list[tuple[str, str]] = field(default_factory=list)  # (section, name)
    error: str | None = None


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Compile a plugin file from its source on every import or reload.

    The bytecode cache is checked by modification time in whole seconds, so
    an edit followed by a reload within the same second could run the old
    code. Plugin files are small, so compiling them each time costs little.
    """

    def get_code(self, fullname: str) -> CodeType:
        source = self.get_data(self.path)
        return compile(source, self.path, "exec", dont_inherit=True)

    def set_data(self, path: str, data: Any, *, _mode: int = 0o666) -> None:
        """Write no bytecode file next to the plugin."""


class _PluginFileFinder(importlib.abc.MetaPathFinder):
    """Find the modules of plugin directory files, for import and reload."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = _SourceOnlyLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


_finder = _PluginFileFinder()
_finder_lock = threading.Lock()


def _install_finder() -> None:
    with _finder_lock:
        if _finder not in sys.meta_path:
            sys.meta_path.append(_finder)


def module_name_for(path: Path) -> str:
    """Return the module name a plugin file is imported as (unique per path)."""
    resolved = path.resolve()
    digest = sha256(str(resolved.parent).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    return f"{MODULE_PREFIX}{digest}_{stem}"


def plugin_classes(module: ModuleType) -> list[PluginClass]:
    """Return the concrete plugin classes defined (not imported) in `module`."""
    found = []
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Plugin)
            and value.__module__ == module.__name__
            and not inspect.isabstract(value)
            and "metadata" in _class_attributes(value)
        ):
            found.append(value)
    return found


def _class_attributes(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("dataflare.plugin."):
            break  # attributes of the base classes do not count
        names.update(vars(klass))
    return names


def _reload_clean(module: ModuleType) -> ModuleType:
    """Reload `module` into an emptied namespace; restore it if the reload fails.

    `importlib.reload` runs the new code over the old namespace, so a class
    deleted from the file would stay. Emptying the namespace first makes
    deleted classes disappear; restoring it after a failure keeps the
    functions of the classes loaded before working.
    """
    saved = dict(vars(module))
    for key in list(saved):
        if not (key.startswith("__") and key.endswith("__")):
            del vars(module)[key]
    try:
        return importlib.reload(module)
    except BaseException:
        vars(module).clear()
        vars(module).update(saved)
        sys.modules[module.__name__] = module
        raise


class PluginManager:
    """Plugins of this process: discovery, loading, state and counters.

    Args:
        registry: the registry to fill and to serve look-ups from; a new one
            with the installed entry points if None.
        paths: plugin directories to add at once.
    """

    def __init__(
        self, registry: PluginRegistry | None = None, *, paths: Sequence[Path] = ()
    ) -> None:
        self.registry = (
            registry if registry is not None else PluginRegistry.from_entry_points()
        )
        self._lock = threading.RLock()
        self._files: dict[Path, _PluginFile] = {}
        self._dirs: list[Path] = []
        self._dir_errors: dict[Path, str] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._unloaded: dict[tuple[str, str], PluginEntry] = {}
        self._stats: dict[tuple[str, str], PluginStats] = {}
        self._wasm: dict[Path, PluginInfo] = {}
        for path in paths:
            self.add_path(path)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> PluginManager:
        """Return a manager with the entry points and `DATAFLARE_PLUGIN_PATH` dirs.

        A directory of the variable that does not exist is logged and listed
        as a failed entry rather than raised, so a bad setting does not stop
        every command.
        """
        env = os.environ if env is None else env
        manager = cls()
        for part in env.get(PLUGIN_PATH_VARIABLE, "").split(os.pathsep):
            if not part.strip():
                continue
            try:
                manager.add_path(Path(part.strip()))
            except FileNotFoundError as exc:
                logger.warning("%s: %s", PLUGIN_PATH_VARIABLE, exc)
                manager._dir_errors[Path(part.strip())] = str(exc)
        return manager

    # --- discovery ---------------------------------------------------------

    def discover_entry_points(self) -> list[PluginEntry]:
        """Add entry points installed since the last call; return the new ones."""
        entries = [
            *self.registry.entries(),
            *self._unloaded.values(),
            *(clash.entry for clash in self.registry.clashes),
        ]
        known = {e.entry_point.value for e in entries if e.entry_point is not None}
        new = []
        found = sorted(
            entry_points(group=ENTRY_POINT_GROUP),
            key=lambda ep: (not is_builtin_entry_point(ep), ep.name),
        )
        for ep in found:
            if ep.value in known:
                continue
            entry = self.registry.add_entry_point(ep)
            if entry is not None:
                new.append(entry)
        return new

    def configure(
        self, settings: Mapping[str, Any], base_dir: Path | None = None
    ) -> None:
        """Apply the `plugins:` settings of a pipeline or config file.

        Args:
            settings: `{"paths": [...]}`; relative paths are taken from `base_dir`.
            base_dir: the directory of the file the settings come from.

        Raises:
            ValueError: the settings are invalid; the message names the key.
            FileNotFoundError: a listed directory does not exist.
        """
        try:
            parsed = PluginSettings.model_validate(settings)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'plugins'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"invalid plugins settings: {problems}") from exc
        for path in parsed.paths:
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            self.add_path(path)

    def add_path(self, directory: Path) -> list[PluginInfo]:
        """Import the plugin files of `directory` and register their plugins.

        A file that fails to import, or a class that fails the compatibility
        check, is listed as failed with the error. The other plugins are
        registered. Adding a directory again imports the files that are new
        or failed before; `reload` picks up changes to the others.

        Returns:
            The plugins (and failed files) found in the directory.

        Raises:
            FileNotFoundError: `directory` does not exist or is not a directory.
        """
        directory = Path(directory).expanduser().resolve()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"plugin directory {str(directory)!r} does not exist or is not a "
                "directory; create it or fix the path"
            )
        _install_finder()
        with self._lock:
            if directory not in self._dirs:
                self._dirs.append(directory)
            names: list[tuple[str, str]] = []
            files = sorted(directory.glob("*.py"))
            for path in files:
                if path.name.startswith(("_", ".")):
                    continue
                plugin_file = self._files.get(path)
                if plugin_file is not None and plugin_file.module is not None:
                    continue  # imported already; `reload` picks up its changes
                if plugin_file is None:
                    plugin_file = _PluginFile(path, module_name_for(path))
                    self._files[path] = plugin_file
                    _finder.files[plugin_file.module_name] = path
                with contextlib.suppress(PluginLoadError):  # listed as failed
                    self._import_file(plugin_file, reload=False)
            for path in files:
                plugin_file = self._files.get(path)
                if plugin_file is not None:
                    names.extend(plugin_file.plugins)
            self._scan_wasm(directory)
        infos = [self.info(name, section) for section, name in names]
        infos.extend(
            i for i in self._file_failures() if Path(i.source).parent == directory
        )
        infos.extend(i for p, i in self._wasm.items() if p.parent == directory)
        return infos

    def _scan_wasm(self, directory: Path) -> None:
        """List the WebAssembly plugins in subdirectories of `directory`.

        A subdirectory with a plugin manifest is listed with origin `wasm`.
        Such a plugin runs through the `wasm` transformation type, whose
        `path` setting names the directory. Nothing is compiled here.
        """
        try:
            from dataflare.plugin.wasm.manifest import MANIFEST_NAMES, load_manifest
        except ImportError as exc:  # the WebAssembly runtime is not installed
            logger.debug("WebAssembly plugins not listed: %s", exc)
            return
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not any((sub / name).is_file() for name in MANIFEST_NAMES):
                continue
            info = PluginInfo(
                sub.name,
                "transformations",
                PluginOrigin.WASM,
                PluginState.DISCOVERED,
                str(sub),
            )
            try:
                manifest = load_manifest(sub).manifest
            except (ValueError, OSError) as exc:
                info.state = PluginState.FAILED
                info.error = str(exc)
            else:
                info.name = manifest.name
                info.kind = manifest.kind
                info.version = manifest.version
                info.description = manifest.description or None
                info.author = manifest.author or None
            self._wasm[sub] = info

    def _import_file(self, plugin_file: _PluginFile, *, reload: bool) -> None:
        """Import (or reload) a plugin file and register its classes."""
        name = plugin_file.module_name
        try:
            if reload and plugin_file.module is not None:
                module = _reload_clean(plugin_file.module)
            else:
                sys.modules.pop(name, None)
                module = importlib.import_module(name)
        except Exception as exc:
            # A failed reload leaves the classes loaded before registered.
            plugin_file.error = f"importing {plugin_file.path} failed: {exc!r}"
            logger.warning("%s", plugin_file.error)
            raise PluginLoadError(plugin_file.error) from exc
        plugin_file.module = module
        plugin_file.error = None
        before = set(plugin_file.plugins)
        plugin_file.plugins = []
        for cls in plugin_classes(module):
            plugin_name = getattr(cls.metadata, "name", cls.__name__)
            try:
                section = section_for(cls)
            except (TypeError, AttributeError) as exc:
                self._errors[("", plugin_name)] = f"{plugin_file.path}: {exc}"
                continue
            key = (section, plugin_name)
            plugin_file.plugins.append(key)
            try:
                self.registry.register(
                    plugin_name,
                    cls,
                    origin=PluginOrigin.DIRECTORY,
                    source=f"{plugin_file.path} ({cls.__qualname__})",
                )
            except (ImportError, TypeError) as exc:
                self._errors[key] = str(exc)
                self._drop(key)
                continue
            self._errors.pop(key, None)
            self._unloaded.pop(key, None)
        for key in before - set(plugin_file.plugins):
            self._drop(key)  # the class is gone from the file
            self._errors.pop(key, None)

    def _drop(self, key: tuple[str, str]) -> None:
        section, name = key
        if section and self.registry.entry(section, name) is not None:
            self.registry.unregister(section, name)

    # --- load, unload, reload ------------------------------------------------

    def _resolve(self, name: str, section: str | None) -> tuple[str, str]:
        """Return the (section, name) of a plugin given by name and maybe section."""
        if section is not None:
            if section not in SECTIONS:
                raise ValueError(
                    f"unknown section {section!r}; use one of {', '.join(SECTIONS)}"
                )
            return section, name
        self.registry.locate(name)  # import entry points whose section is a guess
        matches = [
            s
            for s in SECTIONS
            if self.registry.entry(s, name) is not None
            or (s, name) in self._unloaded
            or (s, name) in self._errors
        ]
        if not matches:
            known = sorted({i.name for i in self.list_plugins()})
            raise PluginNotFoundError("plugin", name, known)
        if len(matches) > 1:
            raise AmbiguousPluginNameError(name, matches)
        return matches[0], name

    def load(self, name: str, section: str | None = None) -> PluginClass:
        """Import a plugin (or bring back an unloaded one) and check it.

        Raises:
            PluginNotFoundError: there is no plugin of that name.
            AmbiguousPluginNameError: it names plugins in several sections.
            PluginLoadError: it is a directory plugin that failed to load.
            ImportError: importing it failed, or it is not compatible with
                this plugin API (`PluginCompatibilityError`).
        """
        with self._lock:
            section, name = self._resolve(name, section)
            key = (section, name)
            if self.registry.entry(section, name) is None and key in self._errors:
                raise PluginLoadError(self._errors[key])
            entry = self._unloaded.pop(key, None)
            if entry is not None:
                if entry.cls is not None:
                    self.registry.register(
                        name, entry.cls, origin=entry.origin, source=entry.source
                    )
                else:
                    self.registry.add_entry_point(entry.entry_point)  # type: ignore[arg-type]
            try:
                cls = self.registry.get(section, name)
            except Exception as exc:
                self._errors[key] = str(exc) or type(exc).__name__
                raise
            self._errors.pop(key, None)
            return cls

    def unload(self, name: str, section: str | None = None) -> None:
        """Remove a plugin from the registry until `load` brings it back.

        Raises:
            PluginNotFoundError: there is no registered plugin of that name.
        """
        with self._lock:
            section, name = self._resolve(name, section)
            key = (section, name)
            if key in self._unloaded:
                return
            entry = self.registry.unregister(section, name)
            self._unloaded[key] = entry
            self._errors.pop(key, None)

    def reload(self, name: str, section: str | None = None) -> PluginClass:
        """Re-import a plugin's module and register the new class.

        For a directory plugin the whole file is reloaded, so the other
        plugins of the file are updated too. If the reload fails, the
        plugin is listed as failed with the error and the class loaded
        before stays registered.

        Raises:
            PluginNotFoundError: there is no plugin of that name.
            PluginLoadError: the reload failed, or the plugin was registered
                in code and has no module to reload.
        """
        with self._lock:
            section, name = self._resolve(name, section)
            key = (section, name)
            plugin_file = next(
                (f for f in self._files.values() if key in f.plugins), None
            )
            if plugin_file is not None:
                self._unloaded.pop(key, None)
                try:
                    self._import_file(plugin_file, reload=True)
                except PluginLoadError as exc:
                    self._errors[key] = (
                        f"reload failed: {exc}; the version loaded before stays in use"
                    )
                    raise
                if key not in plugin_file.plugins:
                    raise PluginLoadError(
                        f"plugin {name!r} is no longer defined in "
                        f"{plugin_file.path} after the reload; it was removed"
                    )
                return self.load(name, section)
            return self._reload_module(section, name)

    def _reload_module(self, section: str, name: str) -> PluginClass:
        key = (section, name)
        entry = self.registry.entry(section, name) or self._unloaded.get(key)
        if entry is None:
            raise PluginNotFoundError(
                section.rstrip("s"), name, self.registry.names(section)
            )
        if entry.entry_point is None:
            raise PluginLoadError(
                f"plugin {name!r} ({entry.origin.value}, {entry.source}) was "
                "registered in code, so it has no module to reload; register the "
                "new class instead"
            )
        module_name = entry.entry_point.module
        try:
            module = sys.modules.get(module_name)
            if module is not None:
                importlib.reload(module)
        except Exception as exc:
            self._errors[key] = (
                f"reload of module {module_name} failed: {exc!r}; the version "
                "loaded before stays in use"
            )
            raise PluginLoadError(self._errors[key]) from exc
        self.registry.forget_class(section, name)
        return self.load(name, section)

    # --- registration and counters ---------------------------------------------

    def register(
        self,
        name: str,
        cls: PluginClass,
        *,
        origin: PluginOrigin | str = PluginOrigin.CODE,
        source: str = "",
    ) -> PluginInfo:
        """Register a plugin class (e.g. a WebAssembly plugin, with origin "wasm").

        Raises:
            PluginCompatibilityError: the class fails the compatibility check.
        """
        with self._lock:
            entry = self.registry.register(name, cls, origin=origin, source=source)
            self._unloaded.pop((entry.section, name), None)
            self._errors.pop((entry.section, name), None)
        return self.info(name, entry.section)

    def record_call(
        self,
        section: str,
        name: str,
        *,
        records: int = 0,
        seconds: float = 0.0,
        error: bool = False,
    ) -> None:
        """Add one call of a plugin to its counters (safe from any thread)."""
        with self._lock:
            stats = self._stats.get((section, name))
            if stats is None:
                stats = self._stats[(section, name)] = PluginStats()
            stats.calls += 1
            stats.records += records
            stats.seconds += seconds
            stats.errors += int(error)

    def stats(self, name: str, section: str | None = None) -> PluginStats:
        """Return a copy of a plugin's counters (zeros if never called)."""
        section, name = self._resolve(name, section)
        with self._lock:
            stats = self._stats.get((section, name), PluginStats())
            return PluginStats(**asdict(stats))

    # --- listing -------------------------------------------------------------

    def list_plugins(self, *, load: bool = False) -> list[PluginInfo]:
        """Return every known plugin with its state, sorted by section and name.

        Args:
            load: import every plugin not imported yet, to report its kind,
                version and any import error (imports third-party code).
        """
        with self._lock:
            if load:
                self.registry.resolve_sections()
                for entry in self.registry.entries():
                    if self.registry.loaded_class(entry.section, entry.name) is None:
                        try:
                            self.load(entry.name, entry.section)
                        except Exception as exc:
                            logger.debug("plugin %r failed: %s", entry.name, exc)
            infos = [self._entry_info(e) for e in self.registry.entries()]
            infos.extend(
                self._entry_info(entry, PluginState.UNLOADED)
                for entry in self._unloaded.values()
            )
            listed = {(i.section, i.name) for i in infos}
            for (section, name), error in self._errors.items():
                if (section, name) not in listed:
                    infos.append(
                        PluginInfo(
                            name,
                            section,
                            PluginOrigin.DIRECTORY,
                            PluginState.FAILED,
                            self._source_of(section, name),
                            error=error,
                        )
                    )
            for clash in self.registry.clashes:
                entry = clash.entry
                infos.append(
                    PluginInfo(
                        entry.name,
                        entry.section,
                        entry.origin,
                        PluginState.FAILED,
                        entry.source,
                        error=clash.message,
                    )
                )
            infos.extend(self._file_failures())
            infos.extend(self._wasm.values())
        order = {s: i for i, s in enumerate(("", *SECTIONS))}
        return sorted(infos, key=lambda i: (order.get(i.section, 0), i.name))

    def info(self, name: str, section: str | None = None) -> PluginInfo:
        """Return one plugin's listing entry, without importing it.

        Raises:
            PluginNotFoundError: there is no plugin of that name.
            AmbiguousPluginNameError: it names plugins in several sections.
        """
        with self._lock:
            section, name = self._resolve(name, section)
            entry = self.registry.entry(section, name)
            if entry is not None:
                return self._entry_info(entry)
            unloaded = self._unloaded.get((section, name))
            if unloaded is not None:
                return self._entry_info(unloaded, PluginState.UNLOADED)
            for info in self.list_plugins():
                if (info.section, info.name) == (section, name):
                    return info
            raise PluginNotFoundError(
                section.rstrip("s"), name, self.registry.names(section)
            )

    def _entry_info(
        self, entry: PluginEntry, state: PluginState | None = None
    ) -> PluginInfo:
        key = (entry.section, entry.name)
        cls = self.registry.loaded_class(*key)
        if cls is None and entry.origin is not PluginOrigin.BUILTIN:
            cls = entry.cls  # registered classes are imported already
        error = self._errors.get(key)
        if state is None:
            if error is not None:
                state = PluginState.FAILED
            elif self.registry.loaded_class(*key) is not None or entry.cls is not None:
                state = PluginState.LOADED
            else:
                state = PluginState.DISCOVERED
        info = PluginInfo(
            entry.name,
            entry.section,
            entry.origin,
            state,
            entry.source,
            error=error,
            stats=PluginStats(**asdict(self._stats.get(key, PluginStats()))),
        )
        metadata = getattr(cls, "metadata", None) if cls is not None else None
        if metadata is not None:
            info.kind = str(metadata.kind.value)
            info.version = metadata.version
            info.api_version = metadata.api_version
            info.description = metadata.description
            info.author = metadata.author
        return info

    def _source_of(self, section: str, name: str) -> str:
        for plugin_file in self._files.values():
            if (section, name) in plugin_file.plugins:
                return str(plugin_file.path)
        return ""

    def _file_failures(self) -> list[PluginInfo]:
        """Return files that failed to import and directories that are missing."""
        failed = [
            PluginInfo(
                f.path.stem,
                "",
                PluginOrigin.DIRECTORY,
                PluginState.FAILED,
                str(f.path),
                error=f.error,
            )
            for f in self._files.values()
            if f.error is not None and not f.plugins
        ]
        failed.extend(
            PluginInfo(
                path.name,
                "",
                PluginOrigin.DIRECTORY,
                PluginState.FAILED,
                str(path),
                error=error,
            )
            for path, error in self._dir_errors.items()
        )
        return failed

    @property
    def paths(self) -> list[Path]:
        """The plugin directories added, in order."""
        return list(self._dirs)


_default: PluginManager | None = None
_default_lock = threading.Lock()


def default_manager() -> PluginManager:
    """Return the process-wide manager (entry points and `DATAFLARE_PLUGIN_PATH`)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginManager.from_environment()
        return _default
