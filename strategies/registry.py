"""The algorithm registry: how the ServerApp and the ClientApp find a federated algorithm.

An algorithm plug-in is one package under `strategies/` that declares, in its `__init__.py`,
one `Algorithm` and registers it in ALGORITHMS (a `edge_lam.config.registry.Registry`, kind
"algorithm"). `strategies/__init__.py` imports the built-in packages (one line each); the
config finds them through the `edge_lam.algorithm` entry points (pyproject.toml), a
third-party package through its own (the older group `edge_lam.plugins` is read too).

- `traits` + `section`: its config section (a dataclass of `edge_lam.config.options.option` keys that
  validates itself) and what the config derives from it (each device's rank, r_max, rounds);
- `run(grid, context, cfg)`: its server side, the whole run (a Flower Strategy driven by
  `Strategy.start`) and its result files; returns the run's results folder;
- `handlers`: its device side, one function per Flower message type it sends
  (`"train"`, `"train.gradient"`, ...), each `handler(msg, context, cfg) -> reply`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid

from edge_lam.config.run_config import RunConfig, Traits
from edge_lam.config.options import RunAborted
from edge_lam.config.registry import registry
from edge_lam.config.sections import CORE_SECTIONS

__all__ = ["ALGORITHMS", "Algorithm", "RunAborted", "add_run_guard", "get", "handler",
           "message_types", "register", "run_guards"]

Handler = Callable[[Message, Context, RunConfig], Message]


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str  # one line for README and errors
    traits: Traits
    run: Callable[[Grid, Context, RunConfig], Path]
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    section: tuple[str, type] | None = None  # ("unlearn", UnlearnSection)


ALGORITHMS = registry("algorithm", key="strategy", groups=("edge_lam.plugins",))
# Checks every training run makes first, whatever its algorithm: guard(cfg) -> (cfg to run,
# what it asks the run to resume or None); a ConfigError refuses the run.
_RUN_GUARDS: list[Callable[[RunConfig], tuple[RunConfig, object]]] = []


def register(algorithm: Algorithm) -> Algorithm:
    """Make an algorithm known to the apps and to the run config (`strategy=<name>`)."""
    for kind in algorithm.handlers:
        if kind.split(".")[0] not in ("train", "query"):
            raise ValueError(f"{algorithm.name}: handler '{kind}' is not a TRAIN or QUERY "
                             "message type")
    if algorithm.section is not None:
        sec_name, cls = algorithm.section
        taken = {a.section[0]: a.section[1] for a in ALGORITHMS.registered().values() if a.section}
        if sec_name in CORE_SECTIONS or taken.get(sec_name, cls) is not cls:
            raise ValueError(f"config section '{sec_name}' is already taken")
    return ALGORITHMS.register(algorithm.name, algorithm)


def get(name: str) -> Algorithm:
    return ALGORITHMS.get(name)


def handler(name: str, message_type: str) -> Handler:
    """The device-side function of algorithm `name` for a message type."""
    algorithm = get(name)
    try:
        return algorithm.handlers[message_type]
    except KeyError:
        raise ValueError(f"strategy='{name}' does not handle '{message_type}' messages "
                         f"(it handles {', '.join(algorithm.handlers)})") from None


def message_types() -> list[str]:
    """Every message type some registered algorithm handles (the ClientApp registers each)."""
    return list(dict.fromkeys(k for a in ALGORITHMS.values() for k in a.handlers))


def add_run_guard(guard: Callable[[RunConfig], tuple[RunConfig, object]]) -> None:
    _RUN_GUARDS.append(guard)


def run_guards() -> list[Callable[[RunConfig], tuple[RunConfig, object]]]:
    return list(_RUN_GUARDS)
