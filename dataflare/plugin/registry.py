"""Find plugin classes: built-ins and third-party packages alike.

Every plugin, built-in or not, is declared as an entry point in the
`dataflare.plugins` group. The entry point's name is the `type:` used in
pipeline files; a sink whose name clashes with a source of the same system
is declared with a `-sink` suffix (`csv-sink`) and used as `type: csv` under
`destinations`.

The built-in plugins are also listed in `BUILTIN_PLUGINS`, the same table as
the entry points of the `dataflare` distribution in pyproject.toml (a test
keeps the two equal). A registry made by `from_entry_points` starts from
that table, so looking up a built-in type reads no package metadata and
imports only the module of that type. The metadata of the installed
distributions is scanned for third-party entry points once, on the first
look-up of a name that is not a built-in, or on the first call that lists,
adds or removes plugins. Building the registry from that metadata took
0.12 to 0.18 s per process (about 120 installed distributions, 2 cores),
which a pipeline of built-in types no longer pays.

The registry is the one lookup path of pipeline validation: entry points,
classes from plugin directories (added by `dataflare.plugin.manager`) and
classes registered in code all resolve through `PluginRegistry.get`, which
checks that a class is a plugin written for this plugin API version.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field, replace
from enum import StrEnum
from importlib.metadata import Distribution, EntryPoint, entry_points

from dataflare import __version__
from dataflare.plugin.interface import (
    API_VERSION,
    Plugin,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Sink,
    Source,
    Transform,
)

ENTRY_POINT_GROUP = "dataflare.plugins"
SINK_SUFFIX = "-sink"
BUILTIN_DISTRIBUTION = "dataflare"
SECTIONS = ("sources", "transformations", "destinations")

BUILTIN_PLUGINS: dict[str, str] = {
    "csv": "dataflare.connectors.files.csv:CsvSource",
    "jsonl": "dataflare.connectors.files.jsonl:JsonLinesSource",
    "parquet": "dataflare.connectors.files.parquet:ParquetSource",
    "arrow": "dataflare.connectors.files.arrow_ipc:ArrowIpcSource",
    "stdin": "dataflare.connectors.stdio:StdinSource",
    "generate": "dataflare.connectors.generate:GenerateSource",
    "memory": "dataflare.connectors.memory:MemorySource",
    "csv-sink": "dataflare.connectors.files.csv:CsvSink",
    "jsonl-sink": "dataflare.connectors.files.jsonl:JsonLinesSink",
    "parquet-sink": "dataflare.connectors.files.parquet:ParquetSink",
    "arrow-sink": "dataflare.connectors.files.arrow_ipc:ArrowIpcSink",
    "postgres": "dataflare.connectors.postgres:PostgresSource",
    "postgres-sink": "dataflare.connectors.postgres:PostgresSink",
    "mysql": "dataflare.connectors.mysql:MySqlSource",
    "mysql-sink": "dataflare.connectors.mysql:MySqlSink",
    "wasm": "dataflare.plugin.wasm.transform:WasmTransform",
    "kafka": "dataflare.connectors.kafka.source:KafkaSource",
    "kafka-sink": "dataflare.connectors.kafka.sink:KafkaSink",
    "nats": "dataflare.connectors.nats.source:NatsSource",
    "nats-sink": "dataflare.connectors.nats.sink:NatsSink",
    "redis": "dataflare.connectors.redis.source:RedisSource",
    "redis-sink": "dataflare.connectors.redis.sink:RedisSink",
    "rabbitmq": "dataflare.connectors.rabbitmq.source:RabbitMQSource",
    "rabbitmq-sink": "dataflare.connectors.rabbitmq.sink:RabbitMQSink",
    "mqtt": "dataflare.connectors.mqtt.source:MqttSource",
    "mqtt-sink": "dataflare.connectors.mqtt.sink:MqttSink",
    "http": "dataflare.connectors.http.source:HttpSource",
    "http-sink": "dataflare.connectors.http.sink:HttpSink",
    "stdout-sink": "dataflare.connectors.stdio:StdoutSink",
    "console-sink": "dataflare.connectors.console:ConsoleSink",
    "memory-sink": "dataflare.connectors.memory:MemorySink",
    "filter": "dataflare.transforms.filter:FilterTransform",
    "mapping": "dataflare.transforms.mapping:MappingTransform",
    "select": "dataflare.transforms.columns:SelectTransform",
    "rename": "dataflare.transforms.columns:RenameTransform",
    "cast": "dataflare.transforms.cast:CastTransform",
    "sql": "dataflare.transforms.sql:SqlTransform",
    "enrichment": "dataflare.transforms.enrichment:EnrichmentTransform",
    "join": "dataflare.transforms.join:JoinTransform",
    "aggregate": "dataflare.transforms.aggregate:AggregateTransform",
    "window": "dataflare.transforms.window:WindowTransform",
    "dedupe": "dataflare.transforms.dedupe:DedupeTransform",
    "flatten": "dataflare.transforms.flatten:FlattenTransform",
    "explode": "dataflare.transforms.flatten:ExplodeTransform",
}
"""Entry-point name to `module:Class` of every built-in plugin.

It must equal the `dataflare.plugins` entry points in pyproject.toml.
"""

logger = logging.getLogger(__name__)

# A release version such as 1, 1.2, 1.2.3, 1.2.3rc1, 1.2.3-beta.1 or 2.0.0+local.
_VERSION = re.compile(r"^\d+(\.\d+)*([-.+]?[0-9A-Za-z]+([.-][0-9A-Za-z]+)*)?$")


class PluginOrigin(StrEnum):
    """Origin of a plugin class."""

    BUILTIN = "built-in"
    ENTRY_POINT = "entry point"
    DIRECTORY = "directory"
    WASM = "wasm"
    CODE = "code"  # registered with `PluginRegistry.register`


class PluginNotFoundError(LookupError):
    def __init__(self, section: str, name: str, available: list[str]) -> None:
        self.section = section
        self.name = name
        self.available = available
        known = ", ".join(sorted(available)) or "(none)"
        super().__init__(f"unknown {section} type {name!r}; known types: {known}")


class PluginCompatibilityError(ImportError):
    """A plugin class cannot be used with this version of DataFlare.

    It derives from ImportError so that validation reports it as a plugin
    that cannot be loaded, with this message.
    """


@dataclass(frozen=True)
class PluginEntry:
    """A registered plugin, not yet imported."""

    name: str
    section: str  # "sources", "transformations" or "destinations"
    entry_point: EntryPoint | None
    cls: type[Plugin] | None = None  # type: ignore[type-arg]
    origin: PluginOrigin = PluginOrigin.CODE
    source: str = ""
    """Location of the class: `package 1.2.0 (module:Class)`, a file path, ..."""
    section_known: bool = True
    """False while the section is only guessed from an entry point's name."""

    def load(self) -> type[Plugin]:  # type: ignore[type-arg]
        if self.cls is not None:
            return self.cls
        assert self.entry_point is not None
        return self.entry_point.load()  # type: ignore[no-any-return]


@dataclass
class _Clash:
    """An entry point left out because another plugin has its name."""

    entry: PluginEntry
    kept: PluginEntry
    message: str = field(default="")


class PluginRegistry:
    """Plugin classes by pipeline-file section and `type` name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, PluginEntry]] = {s: {} for s in SECTIONS}
        self._loaded: dict[tuple[str, str], type[Plugin]] = {}  # type: ignore[type-arg]
        self._clashes: list[_Clash] = []
        self._scan_pending = False
        self._scan_lock = threading.Lock()

    @property
    def clashes(self) -> list[_Clash]:
        """Entry points left out because their name was taken, for listings."""
        self._scan_installed()
        return self._clashes

    @classmethod
    def from_entry_points(cls) -> PluginRegistry:
        """Return a registry of every plugin declared in the entry-point group.

        The built-ins come from `BUILTIN_PLUGINS` at once. The other entry
        points are read from the installed distributions when first needed
        (see the module docstring), as if they had been added here.
        """
        registry = cls()
        for name, value in BUILTIN_PLUGINS.items():
            ep = EntryPoint(name, value, ENTRY_POINT_GROUP)
            where = f"{BUILTIN_DISTRIBUTION} {__version__} ({value})"
            placed = builtin_section(name, value)
            registry._add(ep, builtin=True, where=where, placed=placed)
        registry._scan_pending = True
        return registry

    def add_entry_point(self, ep: EntryPoint) -> PluginEntry | None:
        """Add an entry point of the plugin group without importing it.

        Returns:
            The entry, or None when another entry point already has the name
            (the clash is logged and kept in `clashes`).
        """
        self._scan_installed()
        return self._add(ep, builtin=is_builtin_entry_point(ep), where=_location(ep))

    def _add(
        self,
        ep: EntryPoint,
        *,
        builtin: bool,
        where: str,
        placed: tuple[str, str] | None = None,
    ) -> PluginEntry | None:
        """Add an entry point; `placed` is its (section, type name) if certain."""
        if placed is not None:
            section, name = placed
            section_known = True
        else:
            # The section is known only after import; guess it from the name
            # and the module path so that listing needs no imports. A wrong
            # guess for a third-party plugin is corrected by `get`.
            section, name, section_known = _guess_section(ep, builtin=builtin)
        origin = PluginOrigin.BUILTIN if builtin else PluginOrigin.ENTRY_POINT
        if ep.value.startswith("dataflare.plugin.wasm."):
            origin = PluginOrigin.WASM  # the host type of WebAssembly plugins
        entry = PluginEntry(
            name,
            section,
            ep,
            origin=origin,
            source=where,
            section_known=section_known,
        )
        kept = self._find(name, section)
        if kept is not None:
            message = (
                f"plugin {name!r} from {where} is ignored: the name is taken by "
                f"{kept.source}; uninstall one of the two packages"
            )
            logger.warning("%s", message)
            self._clashes.append(_Clash(entry, kept, message))
            return None
        self._entries[section][name] = entry
        return entry

    def _scan_installed(self) -> None:
        """Add the entry points of the installed distributions, the first time.

        Entry points of the `dataflare` distribution that `BUILTIN_PLUGINS`
        lists are there already. The others are added built-ins first, so
        that they keep their names, then by name, as if `from_entry_points`
        had added them before anything else.
        """
        if not self._scan_pending:
            return
        with self._scan_lock:
            if not self._scan_pending:
                return  # another thread scanned while this one waited
            names: dict[int, str] = {}  # Distribution.name parses its metadata
            found = []
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                builtin = is_builtin_entry_point(ep, names)
                if not (builtin and BUILTIN_PLUGINS.get(ep.name) == ep.value):
                    found.append((not builtin, ep.name, ep))
            for not_builtin, _, ep in sorted(found, key=lambda item: item[:2]):
                self._add(ep, builtin=not not_builtin, where=_location(ep))
            self._scan_pending = False

    def register(
        self,
        name: str,
        cls: type[Plugin],  # type: ignore[type-arg]
        *,
        origin: PluginOrigin | str = PluginOrigin.CODE,
        source: str = "",
    ) -> PluginEntry:
        """Register a plugin class directly, replacing any plugin of that name.

        Used by the Python API and tests, by plugin directories and by
        WebAssembly plugins (with `origin="wasm"`).

        Raises:
            PluginCompatibilityError: `cls` is not a plugin for this API version.
            TypeError: `cls` is not a Source, Transform or Sink plugin.
        """
        check_plugin_class(cls, name)
        section = section_for(cls)
        self._scan_installed()  # a class registered in code replaces them
        where = source or f"{cls.__module__}:{cls.__qualname__}"
        entry = PluginEntry(
            name, section, None, cls, origin=PluginOrigin(origin), source=where
        )
        self._entries[section][name] = entry
        self._loaded.pop((section, name), None)
        return entry

    def unregister(self, section: str, name: str) -> PluginEntry:
        """Remove a plugin; later look-ups of it fail as for an unknown type.

        Raises:
            PluginNotFoundError: there is no such plugin.
        """
        self._scan_installed()
        entry = self._entries[section].pop(name, None)
        if entry is None:
            raise PluginNotFoundError(section.rstrip("s"), name, self.names(section))
        self._loaded.pop((section, name), None)
        return entry

    def forget_class(self, section: str, name: str) -> None:
        """Drop the imported class of a plugin, so the next `get` imports it again."""
        self._loaded.pop((section, name), None)

    def names(self, section: str) -> list[str]:
        """Return the type names usable under `section`, sorted.

        Third-party entry points whose section was only guessed are imported
        first, so each name is listed under its real section.
        """
        self.resolve_sections()
        return sorted(self._entries[section])

    def locate(self, name: str) -> list[str]:
        """Return the sections that have a plugin `name`, importing it if needed.

        An entry point whose section is only guessed is imported to find its
        real section. If the import fails, it stays under the guess, so that
        `get` reports the import error.
        """
        self._scan_installed()
        for section in SECTIONS:
            entry = self._entries[section].get(name)
            if entry is not None and not entry.section_known:
                try:
                    actual = section_for(entry.load())
                except Exception as exc:
                    logger.debug("cannot import plugin %r: %s", name, exc)
                    continue
                self._move(entry, actual)
        return [s for s in SECTIONS if name in self._entries[s]]

    def entries(self) -> list[PluginEntry]:
        """Return every registered plugin, by section then name, without imports."""
        self._scan_installed()
        return [
            self._entries[section][name]
            for section in SECTIONS
            for name in sorted(self._entries[section])
        ]

    def entry(self, section: str, name: str) -> PluginEntry | None:
        entry = self._entries[section].get(name)
        if entry is None and self._scan_pending:
            self._scan_installed()
            entry = self._entries[section].get(name)
        return entry

    def loaded_class(self, section: str, name: str) -> type[Plugin] | None:  # type: ignore[type-arg]
        """Return the class of a plugin if `get` has imported it already."""
        return self._loaded.get((section, name))

    def get(self, section: str, name: str) -> type[Plugin]:  # type: ignore[type-arg]
        """Return the plugin class for `type: name` under `section`, importing it.

        Raises:
            PluginNotFoundError: no plugin of that name in `section`.
            PluginCompatibilityError: the plugin was written for another
                plugin API version, or lacks `metadata` or `Config`.
            ImportError: importing the plugin's module failed.
            TypeError: the plugin belongs to another section.
        """
        key = (section, name)
        if key in self._loaded:
            return self._loaded[key]
        entry = self.entry(section, name)
        if entry is None:
            entry = self._move_guessed(section, name)
        if entry is None:
            raise PluginNotFoundError(section.rstrip("s"), name, self.names(section))
        cls = entry.load()
        check_plugin_class(cls, name, entry.source)
        actual = section_for(cls)
        if actual != section:
            if not entry.section_known:
                self._move(entry, actual)
                raise PluginNotFoundError(
                    section.rstrip("s"), name, self.names(section)
                )
            raise TypeError(
                f"plugin {name!r} is a {cls.metadata.kind} plugin, "
                f"so it cannot be used under {section!r}"
            )
        if not entry.section_known:
            self._entries[section][name] = replace(entry, section_known=True)
        self._loaded[key] = cls
        return cls

    def _find(self, name: str, section: str) -> PluginEntry | None:
        """Return an entry that a new entry point named `name` would clash with."""
        if section == "destinations":
            return self._entries[section].get(name)
        for other in ("sources", "transformations"):
            entry = self._entries[other].get(name)
            if entry is not None:
                return entry
        return None

    def _move(self, entry: PluginEntry, section: str) -> PluginEntry:
        del self._entries[entry.section][entry.name]
        moved = replace(entry, section=section, section_known=True)
        self._entries[section][entry.name] = moved
        return moved

    def _move_guessed(self, section: str, name: str) -> PluginEntry | None:
        """Find `name` among entries whose section was guessed, and fix it."""
        for other in SECTIONS:
            entry = self._entries[other].get(name)
            if entry is None or entry.section_known or other == section:
                continue
            try:
                actual = section_for(entry.load())
            except Exception:
                return None  # reported when it is looked up under its own section
            moved = self._move(entry, actual)
            return moved if actual == section else None
        return None

    def resolve_sections(self) -> None:
        """Import the entry points whose section is a guess, to file them right."""
        self._scan_installed()
        for section in SECTIONS:
            for entry in list(self._entries[section].values()):
                if entry.section_known:
                    continue
                try:
                    actual = section_for(entry.load())
                except Exception as exc:
                    logger.debug("cannot import plugin %r: %s", entry.name, exc)
                    continue
                self._move(entry, actual)


def is_builtin_entry_point(ep: EntryPoint, names: dict[int, str] | None = None) -> bool:
    """Return True if the entry point belongs to the `dataflare` distribution.

    Args:
        ep: the entry point.
        names: distribution names by `id` of the distribution, filled and
            read so that a scan parses each distribution's metadata once.
    """
    dist = ep.dist
    if dist is None:
        return ep.value.startswith(f"{BUILTIN_DISTRIBUTION}.")
    if names is None:
        return bool(dist.name == BUILTIN_DISTRIBUTION)
    if id(dist) not in names:
        names[id(dist)] = dist.name
    return names[id(dist)] == BUILTIN_DISTRIBUTION


def _location(ep: EntryPoint) -> str:
    """Return `distribution version (module:Class)`, or the value alone."""
    dist: Distribution | None = ep.dist
    if dist is None:
        return ep.value
    return f"{dist.name} {dist.version} ({ep.value})"


def _guess_section(ep: EntryPoint, *, builtin: bool) -> tuple[str, str, bool]:
    """Return the section and type name of an entry point, guessed without import.

    The third value is True when the section is certain: for a sink (a
    `-sink` name), and for a built-in source in dataflare.connectors or
    transformation in dataflare.transforms. Any other entry point is
    imported to be sure.
    """
    if ep.name.endswith(SINK_SUFFIX):
        return "destinations", ep.name.removesuffix(SINK_SUFFIX), True
    if ".transforms." in ep.value or ep.value.startswith("transforms"):
        section = "transformations"
    else:
        section = "sources"
    trusted = builtin and ep.value.startswith(
        ("dataflare.connectors.", "dataflare.transforms.")
    )
    return section, ep.name, trusted


def builtin_section(name: str, value: str) -> tuple[str, str]:
    """Return the section and type name of a `BUILTIN_PLUGINS` entry.

    Sinks have a `-sink` name, transformations live in dataflare.transforms
    (and the `wasm` host type in dataflare.plugin.wasm), and the other
    built-ins are sources.
    """
    if name.endswith(SINK_SUFFIX):
        return "destinations", name.removesuffix(SINK_SUFFIX)
    if value.startswith(("dataflare.transforms.", "dataflare.plugin.wasm.")):
        return "transformations", name
    return "sources", name


def check_plugin_class(cls: object, name: str, source: str = "") -> None:
    """Check that `cls` is a plugin class usable with this plugin API.

    Raises:
        PluginCompatibilityError: `cls` is not a Plugin subclass, lacks a
            `metadata` of type PluginMetadata or a pydantic `Config` model,
            has an invalid `version`, or was written for another API version.
    """
    where = f" ({source})" if source else ""
    what = f"plugin {name!r}{where}"
    if not isinstance(cls, type) or not issubclass(cls, Plugin):
        raise PluginCompatibilityError(
            f"{what} is {cls!r}, not a subclass of "
            "dataflare.plugin.interface.Plugin; point the entry point at the "
            "plugin class"
        )
    metadata = getattr(cls, "metadata", None)
    if not isinstance(metadata, PluginMetadata):
        raise PluginCompatibilityError(
            f"{what}: class {cls.__qualname__} has no `metadata` of type "
            "PluginMetadata; add `metadata = PluginMetadata(name, kind, description)`"
        )
    config = getattr(cls, "Config", None)
    if not isinstance(config, type) or not issubclass(config, PluginConfig):
        raise PluginCompatibilityError(
            f"{what}: class {cls.__qualname__} has no `Config` model derived "
            "from PluginConfig; add `Config = PluginConfig` if it takes no settings"
        )
    if metadata.api_version != API_VERSION:
        raise PluginCompatibilityError(
            f"{what} was written for plugin API version {metadata.api_version}, "
            f"but this DataFlare provides plugin API version {API_VERSION}; "
            f"install a release of the plugin built for API version {API_VERSION}"
        )
    if not isinstance(metadata.version, str) or not _VERSION.match(metadata.version):
        raise PluginCompatibilityError(
            f"{what} has an invalid version {metadata.version!r}; use a release "
            "version such as '1.2.0'"
        )


def section_for(cls: type[Plugin]) -> str:  # type: ignore[type-arg]
    if issubclass(cls, Source) or cls.metadata.kind is PluginKind.SOURCE:
        return "sources"
    if issubclass(cls, Sink) or cls.metadata.kind is PluginKind.SINK:
        return "destinations"
    if issubclass(cls, Transform):
        return "transformations"
    raise TypeError(f"{cls.__name__} is not a Source, Transform or Sink plugin")


def default_registry() -> PluginRegistry:
    """Return the process-wide registry of the default plugin manager.

    It has the installed entry points and the plugins of the directories in
    `DATAFLARE_PLUGIN_PATH` (see `dataflare.plugin.manager`).
    """
    from dataflare.plugin.manager import default_manager

    return default_manager().registry
