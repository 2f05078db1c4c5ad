"""One registry mechanism for every plug-in kind: algorithms, aggregation rules, robust rules,
model families, app modes, serve kinds, selection policies, attacks.

A kind's registry is declared once, in the module that defines the kind, and its members
register there, one line each:

    ROBUST_RULES = registry("robust rule", key="robust.aggregator")

    @ROBUST_RULES.register("median")
    def coordinate_median(...): ...

`get(name)` returns the member or raises ConfigError naming the config key, the known names
and the closest one; `names()` lists them in registration order. The same kind always maps
to the same `Registry` (`registry(kind)` creates it on first use), so the config reaches a
kind declared outside the shared library without importing it: the members come from the
entry points of the group `edge_lam.<kind>` (spaces as '_': `edge_lam.robust_rule`), loaded
lazily the first time a name is not found or all names are asked for. An entry point names
a module that registers its members when imported, or an object registered under the entry
point's name. The built-in ones are declared in this project's pyproject.toml
(`[project.entry-points."edge_lam.<kind>"]`); a checkout not (re)installed since an entry
point was added is read from its pyproject.toml too.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from edge_lam.config.options import ConfigError

T = TypeVar("T")
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class Registry(Generic[T]):
    """name -> member of one plug-in kind; members register with `register`."""

    def __init__(self, kind: str, key: str = "", groups: tuple[str, ...] = ()):
        self.kind, self.key = kind, key
        self.groups = (f"edge_lam.{kind.replace(' ', '_')}", *groups)
        self._members: dict[str, T] = {}
        self._loaded = False

    # ------------------------------------------------------------------ declaring
    def register(self, name: str, member: T | None = None) -> Any:
        """`REG.register("x", obj)`, or `@REG.register("x")` above a function or class."""
        if member is None:
            return lambda obj: self.register(name, obj)
        if name in self._members and self._members[name] is not member:
            raise ValueError(f"a {self.kind} named '{name}' is already registered")
        self._members[name] = member
        return member

    def registered(self) -> dict[str, T]:
        """The members registered so far (no entry point is loaded)."""
        return dict(self._members)

    def unregister(self, name: str) -> None:
        self._members.pop(name, None)

    # ------------------------------------------------------------------ looking up
    def get(self, name: str) -> T:
        """The member `name`; ConfigError naming the known ones (and the closest) if none."""
        if name not in self._members:
            self.load()
        try:
            return self._members[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: str, also: tuple[str, ...] = (), key: str = "") -> str:
        """The message for a name that is not registered (`also`: values the key accepts
        besides the members, e.g. 'none'; `key`: the config key, default the registry's)."""
        known = (*also, *self.names())
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        key = key or self.key
        what = f"{key}='{name}'" if key else f"{self.kind} '{name}'"
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{what} is not known: use one of {', '.join(known)}{hint}"

    def names(self) -> tuple[str, ...]:
        self.load()
        return tuple(self._members)

    def items(self):
        self.load()
        return self._members.items()

    def values(self):
        self.load()
        return self._members.values()

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        if name not in self._members:
            self.load()
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._members)})"

    def view(self, keep: Callable[[T], bool], value: Callable[[T], Any]) -> RegistryView:
        """A live read-only mapping name -> value(member) over the members `keep` accepts."""
        return RegistryView(self, keep, value)

    # ------------------------------------------------------------------ entry points
    def load(self) -> None:
        """Import the plug-ins of this kind's entry-point groups (once)."""
        if self._loaded:
            return
        self._loaded = True
        for name, target in entry_points(self.groups):
            loaded = _load(target)
            if not isinstance(loaded, ModuleType) and name not in self._members:
                self.register(name, loaded)


class RegistryView:
    """A read-only mapping over part of a registry (dict-like: `.get` returns None)."""

    def __init__(self, source: Registry, keep: Callable, value: Callable):
        self._source, self._keep, self._value = source, keep, value

    def _members(self) -> dict[str, Any]:
        return {n: self._value(m) for n, m in self._source.items() if self._keep(m)}

    def __getitem__(self, name: str) -> Any:
        return self._members()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._members().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._members()

    def __iter__(self) -> Iterator[str]:
        return iter(self._members())

    def __len__(self) -> int:
        return len(self._members())

    def keys(self):
        return self._members().keys()

    def items(self):
        return self._members().items()

    def values(self):
        return self._members().values()


_REGISTRIES: dict[str, Registry] = {}


def registry(kind: str, key: str = "", groups: tuple[str, ...] = ()) -> Registry:
    """The registry of a plug-in kind, created on first use (by its declaring module or by
    a reader such as the config: both get the same one)."""
    reg = _REGISTRIES.setdefault(kind, Registry(kind, key, groups))
    if key and not reg.key:
        reg.key = key
    for group in groups:
        if group not in reg.groups:
            reg.groups += (group,)
            reg._loaded = False
    return reg


def entry_points(groups: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, 'module[:attr]') of the entry points of `groups`: the installed ones, then the
    ones this checkout's pyproject.toml declares (an editable install made before they were
    added does not list them), each target once."""
    found = [(ep.name, ep.value) for group in groups
             for ep in metadata.entry_points(group=group)]
    found += [(n, t) for group in groups for n, t in _checkout_entry_points(group).items()]
    seen: set[str] = set()
    return [(n, t) for n, t in found if not (t in seen or seen.add(t))]


def _checkout_entry_points(group: str) -> dict[str, str]:
    return dict(_checkout_groups().get(group, {}))


@functools.cache
def _checkout_groups() -> dict[str, dict[str, str]]:
    """This checkout's `[project.entry-points]` (read once per process)."""
    if not _PYPROJECT.is_file():
        return {}
    project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
    if project.get("name") != "edge-lam":
        return {}
    return project.get("entry-points", {})


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    loaded: Any = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        loaded = getattr(loaded, part)
    return loaded
