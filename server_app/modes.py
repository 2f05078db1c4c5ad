"""What the ServerApp can do, by `mode`: each mode is one function run(grid, context, cfg).

Training is one mode; inference modes (collaborative inference, micro-service serving) are
added the same way: a function here (or in their own module) and one line in MODES. Every
mode talks to devices through `task.fleet` (profile QUERY, unicast) and Flower messages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid

from strategies import registry
from task.config import RunConfig
from task.options import ConfigError


def train(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Federated fine-tuning with the algorithm `strategy` names (a registered plug-in)."""
    return registry.get(cfg.strategy).run(grid, context, cfg)


def infer(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Collaborative inference: every device answers the test queries, the server combines."""
    from server_app.infer.mode import run

    return run(grid, context, cfg)


def serve(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Micro-service serving: a model's modules (CoT steps, MoE experts, layer ranges) run on
    the devices (`serve.kind`)."""
    from server_app.serve.mode import run

    return run(grid, context, cfg)


MODES: dict[str, Callable[[Grid, Context, RunConfig], object]] = {"train": train,
                                                                    "infer": infer,
                                                                    "serve": serve}


def get(name: str) -> Callable[[Grid, Context, RunConfig], object]:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"mode='{name}' is not known: use one of {', '.join(MODES)}") \
            from None
