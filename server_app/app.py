"""The Flower ServerApp on the edge server: parse the run config, run its mode.

The mode (`server_app.modes`, today `train`) looks the algorithm up in the registry
(`strategies.registry`); neither this file nor the modes know any algorithm by name. A bad
configuration stops the run with one message that names the key.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app import modes
from strategies.registry import RunAborted
from task.config import ConfigError, RunConfig
from task.logs import get_logger

log = get_logger()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        modes.get(cfg.mode)(grid, context, cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(f"edge-lam: configuration error: {err}") from err
    except RunAborted as err:
        log.error("%s", err)
        raise SystemExit(f"edge-lam: {err}") from err
