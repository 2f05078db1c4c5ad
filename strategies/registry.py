"""The algorithm registry: how the ServerApp and the ClientApp find a federated algorithm.

An algorithm plug-in is one package under `strategies/` that declares, in its `__init__.py`,
one `Algorithm` and registers it. `strategies/__init__.py` imports the built-in packages (one
line each), and the config finds them through the `edge_lam.plugins` entry point.

- `traits` + `section`: its config section (a dataclass of `task.options.option` keys that
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

from task.config import RunConfig, Traits, register_algorithm
from task.options import ConfigError

Handler = Callable[[Message, Context, RunConfig], Message]


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str  # one line for README and errors
    traits: Traits
    run: Callable[[Grid, Context, RunConfig], Path]
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    section: tuple[str, type] | None = None  # ("unlearn", UnlearnSection)


ALGORITHMS: dict[str, Algorithm] = {}
# Checks every training run makes first, whatever its algorithm: guard(cfg) -> (cfg to run,
# what it asks the run to resume or None); a ConfigError refuses the run.
_RUN_GUARDS: list[Callable[[RunConfig], tuple[RunConfig, object]]] = []


class RunAborted(RuntimeError):
    """A run cannot go on (the message says why and what is kept); the ServerApp stops."""


def register(algorithm: Algorithm) -> Algorithm:
    """Make an algorithm known to the apps and to the run config (`strategy=<name>`)."""
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"an algorithm named '{algorithm.name}' is already registered")
    for kind in algorithm.handlers:
        if kind.split(".")[0] not in ("train", "query"):
            raise ValueError(f"{algorithm.name}: handler '{kind}' is not a TRAIN or QUERY "
                             "message type")
    ALGORITHMS[algorithm.name] = algorithm
    register_algorithm(algorithm.name, algorithm.traits, algorithm.section)
    return algorithm


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"strategy='{name}' is not a registered algorithm: use one of "
                          f"{', '.join(ALGORITHMS)}") from None


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
