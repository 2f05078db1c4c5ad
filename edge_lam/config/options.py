"""Declaring run-config keys: one `option(...)` per key, in the section dataclass that owns it.

A section is a frozen dataclass whose fields are declared with `option`: default, one line of
documentation, and the checks of its value (range, choices). `parse_section` reads a section
from Flower's flattened run config (`<section>.<key>`), `section_rows` lists its keys for the
README table, and a section validates what spans several of its keys in `validate()`. Every
error names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key and how to fix it. Only for
    configuration: what goes wrong while a run goes on raises `RunAborted`."""


class RunAborted(RuntimeError):
    """A run cannot go on (the message says why and what is kept); the ServerApp stops.
    Run-time conditions only (too few replies, no feasible plan for the measured model):
    a bad configuration is a ConfigError, found when the config is parsed."""


def option(default: Any, doc: str, *, key: str = "", lo: float | None = None,
           hi: float | None = None, choices: tuple[str, ...] = (), allow_empty: bool = False,
           kind: str = "", legacy: str = "", registry: str = "") -> Any:
    """A run-config key: `default`, its documentation and its checks.

    `key` is the name users type inside the section (default: the field name with '-' for
    '_'); `kind` is 'names' (comma-separated list, a tuple here) or 'ids' (comma-separated
    whole numbers); `legacy` is the attribute name the flat RunConfig of releases before the
    sections used (read back from older saved adapters); `registry` names the plug-in kind
    whose registered names the value must be (`edge_lam.config.registry`), `choices` then lists the
    values accepted besides them (e.g. 'none').
    """
    meta = {"doc": doc, "key": key, "lo": lo, "hi": hi, "choices": choices,
            "allow_empty": allow_empty, "kind": kind, "legacy": legacy, "registry": registry}
    return dataclasses.field(default=default, metadata=meta)


def key_of(section: str, field: dataclasses.Field) -> str:
    name = field.metadata.get("key") or field.name.replace("_", "-")
    return f"{section}.{name}" if section else name


class Reader:
    """Typed access to the raw mapping; remembers which keys were read."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.seen: set[str] = set()

    def get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.raw.get(key, default)

    def str(self, key: str, default: str, allow_empty: bool = False) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (quote it: {key}='{value}')")
        value = value.strip()
        if not value and not allow_empty:
            raise ConfigError(f"{key} is empty: give a value (default '{default}')")
        return value

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.str(key, default).lower()
        if value not in options:
            raise ConfigError(f"{key}='{value}' is not known: use one of {', '.join(options)}")
        return value

    def member(self, key: str, default: str, kind: str, also: tuple[str, ...] = ()) -> str:
        """The name of a registered plug-in of `kind` (or one of `also`)."""
        from edge_lam.config.registry import registry

        value = self.str(key, default).lower()
        reg = registry(kind)
        if value not in also and value not in reg:
            raise ConfigError(reg.unknown(value, also, key=key))
        return value

    def int(self, key: str, default: int, lo: float | None = None,
            hi: float | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        value = int(value)
        if lo is not None and value < lo:
            raise ConfigError(f"{key}={value} is too small: it must be at least {lo:g}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}={value} is too large: it must be at most {hi:g}")
        return value

    def float(self, key: str, default: float, lo: float | None = None,
              hi: float | None = None) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key}={value} is out of range [{lo}, {hi}]")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (no quotes), got {value!r}")
        return value

    def ids(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """Comma-separated whole numbers ('3,5'), a single number, or '' for none."""
        value = self.get(key, ",".join(map(str, default)))
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must list device ids like '3,5', got {value!r}")
        try:
            ids = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError as err:
            raise ConfigError(f"{key}='{value}' must list whole-number device ids like "
                              "'3,5' (partition ids in simulation, node ids in deployment)"
                              ) from err
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError(f"{key}='{value}' must list distinct non-negative ids")
        return ids

    def names(self, key: str, default: tuple[str, ...], allow_empty: bool = False
              ) -> tuple[str, ...]:
        value = self.str(key, ",".join(default), allow_empty)
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        if not names and not allow_empty:
            raise ConfigError(f"{key} lists no names: give a comma-separated list")
        return names

    def reject_unknown(self, prefixes: tuple[str, ...]) -> None:
        unknown = [k for k in self.raw if k not in self.seen and not k.startswith(prefixes)]
        if unknown:
            named = ", ".join(f"{k}{did_you_mean(k, self.seen)}" for k in sorted(unknown))
            raise ConfigError(
                f"unknown run-config key(s) {named}: check the spelling against "
                "`edge-lam config` (every key, its default and meaning)")


def did_you_mean(key: str, known) -> str:
    """" (did you mean 'x'?)" with the closest known key, or "" when none is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_option(r: Reader, key: str, field: dataclasses.Field) -> Any:
    """One declared key, typed from its default and checked as its option says."""
    m, default = field.metadata, field.default
    if m.get("kind") == "names":
        return r.names(key, default, m.get("allow_empty", False))
    if m.get("kind") == "ids":
        return r.ids(key, default)
    if isinstance(default, bool):
        return r.bool(key, default)
    if isinstance(default, int):
        return r.int(key, default, m.get("lo"), m.get("hi"))
    if isinstance(default, float):
        return r.float(key, default, m.get("lo"), m.get("hi"))
    if m.get("registry"):
        return r.member(key, default, m["registry"], m.get("choices", ()))
    if m.get("choices"):
        return r.choice(key, default, m["choices"])
    return r.str(key, default, m.get("allow_empty", False))


def declared(cls) -> list[dataclasses.Field]:
    """The fields of a section that are run-config keys (declared with `option`)."""
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def parse_section(cls, section: str, r: Reader, **extra: Any):
    """A section from the raw run config; `extra` fills fields that are not plain keys."""
    values = {f.name: read_option(r, key_of(section, f), f) for f in declared(cls)}
    out = cls(**values, **extra)
    out.validate()
    return out


def parse_value(text: str) -> Any:
    """A KEY=VALUE value typed on a command line, as the run config reads it."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else '""'
    if isinstance(value, str):
        return value.replace("\n", "\\n") if value else '""'
    return f"{value:g}" if isinstance(value, float) else str(value)


def section_rows(cls, section: str) -> list[tuple[str, str, str]]:
    """(key, default, documentation) of each key of a section, in declaration order."""
    return [(key_of(section, f), format_default(f.default), f.metadata["doc"])
            for f in declared(cls)]


class Section:
    """Base of the section dataclasses: `validate` checks what spans several keys."""

    def validate(self) -> None:
        """Raise ConfigError (naming the key) when the section's values do not fit together."""

    def check(self, cfg) -> None:
        """Raise ConfigError when the section's values do not fit the rest of the run config
        `cfg` (run once per parse, after every section is read)."""
