"""What the ServerApp can do, by `mode`: each mode is one `Mode` in MODES (a
`edge_lam.config.registry.Registry`, kind "mode", declared here; the config finds it through the
`edge_lam.mode` entry point), with its `run(grid, context, cfg)` and its `check(cfg)`: what
the mode needs of the rest of the config, run when the config is parsed, so that a bad
combination never reaches the ServerApp.

Training is one mode; inference modes (collaborative inference, micro-service serving) are
added the same way: a function here (or in their own module) and one registration. Every
mode talks to devices through `edge_lam.messaging` (profile QUERY, unicast) and Flower messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.registry import registry

MODES = registry("mode", key="mode")


def _no_check(cfg: RunConfig) -> None:
    """Nothing beyond the keys' and the algorithm's own checks."""


@dataclass(frozen=True)
class Mode:
    name: str
    run: Callable[[Grid, Context, RunConfig], object]
    check: Callable[[RunConfig], None] = _no_check
    resumable: bool = False  # `resume` may continue a run of this mode (its checkpoint)


def train(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Federated fine-tuning with the algorithm `strategy` names (a registered plug-in)."""
    from strategies import registry as algorithms

    return algorithms.get(cfg.strategy).run(grid, context, cfg)


def infer(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Collaborative inference: every device answers the test queries, the server combines."""
    from server_app.infer.mode import run

    return run(grid, context, cfg)


def check_infer(cfg: RunConfig) -> None:
    from edge_lam.models.families import family

    fam = family(cfg)
    if not (fam.label_words or fam.generates):
        raise ConfigError(f"mode='infer' needs task='lm-cls' (labels posed as instructions: "
                          f"data.template, data.label-words) or task='causal-lm' (generated "
                          f"answers), not '{cfg.task}'")


def serve(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Micro-service serving: a model's modules (CoT steps, MoE experts, layer ranges) run on
    the devices (`serve.kind`)."""
    from server_app.serve.mode import run

    return run(grid, context, cfg)


def check_serve(cfg: RunConfig) -> None:
    """serve.fleet's profile names (a JSON fleet file is read when the run starts), then
    what the serve kind needs."""
    from server_app.serve.mode import SERVE_KINDS
    from edge_lam.config.hardware import check_fleet_names

    check_fleet_names("serve.fleet", cfg.serve.fleet)
    SERVE_KINDS.get(cfg.serve.kind).check(cfg)


for _mode in (Mode("train", train, resumable=True), Mode("infer", infer, check_infer),
              Mode("serve", serve, check_serve)):
    MODES.register(_mode.name, _mode)


def get(name: str) -> Callable[[Grid, Context, RunConfig], object]:
    """The run function of mode `name` (ConfigError naming the modes if none)."""
    return MODES.get(name).run
