"""Find plugin classes: built-ins and third-party packages alike.

Every plugin, built-in or not, is declared as an entry point in the
`dataflare.plugins` group. The entry point's name is the `type:` used in
pipeline files; a sink whose name clashes with a source of the same system
is declared with a `-sink` suffix (`csv-sink`) and used as `type: csv` under
`destinations`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from dataflare.plugin.interface import Plugin, PluginKind, Sink, Source, Transform

ENTRY_POINT_GROUP = "dataflare.plugins"
SINK_SUFFIX = "-sink"

logger = logging.getLogger(__name__)


class PluginNotFoundError(LookupError):
    def __init__(self, section: str, name: str, available: list[str]) -> None:
        self.section = section
        self.name = name
        self.available = available
        known = ", ".join(sorted(available)) or "(none)"
        super().__init__(f"unknown {section} type {name!r}; known types: {known}")


@dataclass(frozen=True)
class PluginEntry:
    """A registered plugin, not yet imported."""

    name: str
    section: str  # "sources", "transformations" or "destinations"
    entry_point: EntryPoint | None
    cls: type[Plugin] | None = None  # type: ignore[type-arg]

    def load(self) -> type[Plugin]:  # type: ignore[type-arg]
        if self.cls is not None:
            return self.cls
        assert self.entry_point is not None
        return self.entry_point.load()  # type: ignore[no-any-return]


class PluginRegistry:
    """Plugin classes by pipeline-file section and `type` name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, PluginEntry]] = {
            "sources": {},
            "transformations": {},
            "destinations": {},
        }
        self._loaded: dict[tuple[str, str], type[Plugin]] = {}  # type: ignore[type-arg]

    @classmethod
    def from_entry_points(cls) -> PluginRegistry:
        registry = cls()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            registry._add_entry_point(ep)
        return registry

    def _add_entry_point(self, ep: EntryPoint) -> None:
        # The section is known only after import; guess it from the name and
        # the module path so that listing needs no imports.
        if ep.name.endswith(SINK_SUFFIX):
            section, name = "destinations", ep.name.removesuffix(SINK_SUFFIX)
        elif ".transforms." in ep.value or ep.value.startswith("transforms"):
            section, name = "transformations", ep.name
        else:
            section, name = "sources", ep.name
        self._entries[section][name] = PluginEntry(name, section, ep)

    def register(self, name: str, cls: type[Plugin]) -> None:  # type: ignore[type-arg]
        """Register a plugin class directly (used by the Python API and tests)."""
        section = section_for(cls)
        self._entries[section][name] = PluginEntry(name, section, None, cls)
        self._loaded.pop((section, name), None)

    def names(self, section: str) -> list[str]:
        return sorted(self._entries[section])

    def get(self, section: str, name: str) -> type[Plugin]:  # type: ignore[type-arg]
        key = (section, name)
        if key in self._loaded:
            return self._loaded[key]
        entry = self._entries[section].get(name)
        if entry is None:
            raise PluginNotFoundError(section.rstrip("s"), name, self.names(section))
        cls = entry.load()
        if section_for(cls) != section:
            raise TypeError(
                f"plugin {name!r} is a {cls.metadata.kind} plugin, "
                f"so it cannot be used under {section!r}"
            )
        self._loaded[key] = cls
        return cls


def section_for(cls: type[Plugin]) -> str:  # type: ignore[type-arg]
    if issubclass(cls, Source) or cls.metadata.kind is PluginKind.SOURCE:
        return "sources"
    if issubclass(cls, Sink) or cls.metadata.kind is PluginKind.SINK:
        return "destinations"
    if issubclass(cls, Transform):
        return "transformations"
    raise TypeError(f"{cls.__name__} is not a Source, Transform or Sink plugin")


_default: PluginRegistry | None = None


def default_registry() -> PluginRegistry:
    """Return the process-wide registry built from installed entry points."""
    global _default
    if _default is None:
        _default = PluginRegistry.from_entry_points()
    return _default
