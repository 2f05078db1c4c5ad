"""`edge-lam config --check`: a `--run-config` argument checked before `flwr run` sends it.

Flower 1.39 rejects an override key that pyproject.toml's [tool.flwr.app.config] does not
declare inside the SuperLink (`flwr/common/config.py` `fuse_dicts`, called by the Control
API's StartRun), before any code of this app runs, and `flwr run` shows only
`[code: 15] Invalid run configuration.`; the key is named in the SuperLink's log alone
(`$FLWR_HOME/local-superlink/superlink.log`: "Key 'lora-rnak' is not present in the main
dictionary"). This module does what the SuperLink does, with Flower's own parser
(`parse_config_args`, the same for a recipe file and for `key=value` pairs), then names the
unknown key and the closest known one, then parses the fused config as the ServerApp would
(`RunConfig.from_run_config`), so a bad value is named before a run starts too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_lam.config.run_config import RunConfig
from edge_lam.config.options import ConfigError, did_you_mean

ROOT = Path(__file__).resolve().parents[2]


def app_defaults(app_dir: Path = ROOT) -> dict[str, Any]:
    """The flattened [tool.flwr.app.config] of `app_dir`'s pyproject.toml, as Flower reads
    it."""
    from flwr.common.config import flatten_dict, get_project_config

    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{pyproject} does not exist: pass --app <the app's folder>")
    return flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"]["config"])


def parse_overrides(run_config: list[str]) -> dict[str, Any]:
    """`--run-config` values as `flwr run` parses them: one .toml file, or key=value pairs."""
    from flwr.common.config import parse_config_args

    if len(run_config) == 1 and run_config[0].endswith(".toml") \
            and not Path(run_config[0]).expanduser().is_file():
        raise ConfigError(f"{run_config[0]} does not exist")
    try:
        return parse_config_args(run_config)
    except Exception as err:  # click's exception for bad TOML, ValueError for .toml + pairs
        raise ConfigError(f"--run-config {' '.join(run_config)!r} cannot be parsed: "
                          f"{getattr(err, 'message', None) or err}") from err


def unknown_keys(overrides: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """One line per key Flower's SuperLink would refuse, with the closest declared key."""
    return [f"{key}{did_you_mean(key, defaults)}" for key in overrides if key not in defaults]


def check_run_config(run_config: list[str], app_dir: Path = ROOT) -> RunConfig:
    """The RunConfig the ServerApp would parse from `flwr run <app_dir> --run-config ...`,
    or ConfigError naming what Flower or the app would refuse."""
    defaults = app_defaults(app_dir)
    overrides = parse_overrides(run_config)
    unknown = unknown_keys(overrides, defaults)
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}: Flower refuses "
                          "the run ('[code: 15] Invalid run configuration.'); `edge-lam "
                          "config` lists every key")
    return RunConfig.from_run_config({**defaults, **overrides})
