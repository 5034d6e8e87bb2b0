"""Handlers by the names `billingd.toml` uses (DESIGN §5): entry points of the group
`billingd.handlers`, each a `HandlerSpec` — the built-in handlers register the same way
(`pyproject.toml`) as a plugin package does.

`discover()` reads the installed entry points without importing anything; a handler's module is
imported when a source names it (`HandlerRegistry.load`). A plugin that fails to import, or whose
entry is not a `HandlerSpec` of its own name, is a configuration error naming its package — only
for the sources that use it. Two distributions registering one name are refused
(`HandlerRegistry.conflicts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import msgspec

from billingd.config import Settings, check_value, convert
from billingd.handlers.kit.base import Handler, HandlerContext, HandlerSpec

#: The entry-point group of handlers.
GROUP = "billingd.handlers"


class HandlerLoadError(Exception):
    """A registered handler could not be loaded; the message names the package and the fix."""


@dataclass(frozen=True)
class HandlerEntry:
    """One registered handler: its `name`, the entry's `value` (`module:attribute`), and the
    `distribution` and `version` that registered it."""

    name: str
    value: str
    distribution: str
    version: str

    @classmethod
    def of(cls, entry: EntryPoint) -> HandlerEntry:
        """The entry of an installed entry point (distribution `?` when unknown)."""
        dist = entry.dist
        name = dist.metadata["Name"] if dist is not None else "?"
        return cls(entry.name, entry.value, name or "?", dist.version if dist is not None else "?")

    @property
    def origin(self) -> str:
        """`distribution version`, for messages."""
        return f"{self.distribution} {self.version}"


class HandlerRegistry(Mapping[str, HandlerSpec[Any]]):
    """The handlers of installed entry points (see module docstring); a `Mapping` name → spec that
    loads a spec on first access. `specs` adds handlers given directly (tests, the test kit)."""

    def __init__(self, entries: Iterable[HandlerEntry] = (), specs: Mapping[str, HandlerSpec[Any]] | None = None):
        self._entries: dict[str, list[HandlerEntry]] = {}
        for entry in entries:
            same = self._entries.setdefault(entry.name, [])
            if all((e.value, e.distribution) != (entry.value, entry.distribution) for e in same):
                same.append(entry)  # the same distribution seen twice on sys.path counts once
        self._loaded: dict[str, HandlerSpec[Any]] = dict(specs or {})
        for name in self._loaded:
            self._entries.setdefault(name, [HandlerEntry(name, "", "(given)", "")])

    def entries(self) -> list[HandlerEntry]:
        """Every registered handler, by name (a conflicting name once per distribution)."""
        return [entry for name in sorted(self._entries) for entry in self._entries[name]]

    def conflicts(self) -> list[str]:
        """Errors for names registered by more than one distribution."""
        return [
            f'handler "{name}" is registered by {len(found)} packages ('
            + ", ".join(sorted(e.origin for e in found))
            + "): uninstall one, or rename its entry point"
            for name, found in sorted(self._entries.items())
            if len(found) > 1
        ]

    def load(self, name: str) -> HandlerSpec[Any]:
        """The spec of handler `name`, imported on first use.

        Raises:
            KeyError: no handler of that name is installed.
            HandlerLoadError: its module failed to import, its entry is not a `HandlerSpec`, or
                the spec's name differs from the entry's.
        """
        spec = self._loaded.get(name)
        if spec is not None:
            return spec
        found = self._entries[name]
        entry = found[0]
        try:
            target = EntryPoint(entry.name, entry.value, GROUP).load()
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() at import is its failure
            raise HandlerLoadError(
                f'handler "{name}" of {entry.origin} failed to import ({entry.value}): '
                f"{type(exc).__name__}: {str(exc)[:300]} — reinstall or fix that package"
            ) from exc
        if not isinstance(target, HandlerSpec):
            raise HandlerLoadError(
                f'handler "{name}" of {entry.origin}: {entry.value} is a {type(target).__name__}, not a HandlerSpec'
            )
        if not (isinstance(target.options, type) and issubclass(target.options, msgspec.Struct)):
            raise HandlerLoadError(
                f'handler "{name}" of {entry.origin}: its options ({target.options!r:.80}) are not a msgspec.Struct'
            )
        if target.name != name:
            raise HandlerLoadError(
                f'handler "{name}" of {entry.origin}: its HandlerSpec is named "{target.name}"; '
                "the entry point's name and the spec's must be equal"
            )
        self._loaded[name] = target
        return target

    def origin(self, name: str) -> str:
        """`distribution version` of handler `name`."""
        return self._entries[name][0].origin

    def __getitem__(self, name: str) -> HandlerSpec[Any]:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def discover(specs: Mapping[str, HandlerSpec[Any]] | None = None) -> HandlerRegistry:
    """The handlers installed in this environment (entry points of `GROUP`), plus `specs`."""
    return HandlerRegistry((HandlerEntry.of(e) for e in entry_points(group=GROUP)), specs)


def handler_errors(settings: Settings, handlers: Mapping[str, HandlerSpec[Any]]) -> list[str]:
    """Config errors about handlers: two packages registering one name, unknown names, plugins
    that fail to load (only those a source uses), and invalid `handler_options`, with paths."""
    errors: list[str] = list(handlers.conflicts()) if isinstance(handlers, HandlerRegistry) else []
    for i, source in enumerate(settings.sources):
        if source.handler not in handlers:
            known = ", ".join(sorted(handlers))
            errors.append(f'sources[{i}].handler: unknown handler "{source.handler}" (installed: {known})')
            continue
        try:
            spec = handlers[source.handler]
        except HandlerLoadError as exc:
            errors.append(f"sources[{i}].handler: {exc}")
            continue
        errors += check_value(source.handler_options, spec.options, f"sources[{i}].handler_options")
    return errors


def build_handler(context: HandlerContext, handlers: Mapping[str, HandlerSpec[Any]]) -> Handler:
    """Build the handler of `context.source` with its validated options.

    Raises:
        KeyError, HandlerLoadError: unknown or unloadable handler (`handler_errors` reports both
            before the daemon starts).
    """
    spec = handlers[context.source.handler]
    return spec.build(context, convert(context.source.handler_options, spec.options))
