"""The Flower ServerApp on the edge server: parse the run config, run its mode.

The mode (`server_app.modes`, today `train`) looks the algorithm up in the registry
(`strategies.registry`); neither this file nor the modes know any algorithm by name. A bad
configuration stops the run with one message that names the key, and the run ends as
failed: `flwr ls` shows it `finished:failed` with that message. (Flower catches
`Exception` there; a `SystemExit` escaped it and the run was reported completed.)
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


class RunFailed(RuntimeError):
    """The run could not go on (bad configuration, aborted); Flower records it as failed."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        modes.get(cfg.mode)(grid, context, cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise RunFailed(f"edge-lam: configuration error: {err}") from err
    except RunAborted as err:
        log.error("%s", err)
        raise RunFailed(f"edge-lam: {err}") from err
