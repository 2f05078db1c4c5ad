"""The Flower ServerApp on the edge server: parse the run config, run its mode.

The mode (`server_app.modes`, today `train`) looks the algorithm up in the registry
(`strategies.registry`); neither this file nor the modes know any algorithm by name. A bad
configuration stops the run with one message that names the key, and the run ends as
failed: `flwr ls` shows it `finished:failed` with that message. (Flower catches
`Exception` there; a `SystemExit` escaped it and the run was reported completed.) Flower
logs the exception it catches with its traceback; for `RunFailed` that traceback says
nothing the message does not, so `QuietRunFailed` drops it (one line stays: ours).

Where results go: a relative `results-dir` resolves against this process's working
directory, which is the SuperLink's: for `flwr run .` (local simulation) the folder of the
checkout whose `flwr run` started the SuperLink, which may not be the one that submitted this
run. The absolute path is logged when the run starts and when it ends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app import modes
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.options import RunAborted
from edge_lam.logs import get_logger

log = get_logger()

app = ServerApp()


class RunFailed(RuntimeError):
    """The run could not go on (bad configuration, aborted); Flower records it as failed."""


class QuietRunFailed(logging.Filter):
    """On Flower's logger: keep its "ServerApp/Simulation raised an exception" line but not
    the traceback, when the exception is ours (`RunFailed`: its message was logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunFailed):
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (RunFailed: see the error above)"
        return True


def quiet_run_failed() -> None:
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, QuietRunFailed) for f in flower.filters):
        flower.addFilter(QuietRunFailed())


def results_note(cfg: RunConfig, run_id: int) -> str:
    """Where this run's results go, and why there."""
    where = (Path(cfg.results_dir).expanduser() / str(run_id)).resolve()
    if Path(cfg.results_dir).expanduser().is_absolute():
        return f"results of run {run_id}: {where}"
    return (f"results of run {run_id}: {where} (results-dir='{cfg.results_dir}' is relative "
            f"to the SuperLink's working directory {os.getcwd()}; set "
            "results-dir='/abs/path' to choose)")


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_run_failed()
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        log.info("%s", results_note(cfg, context.run_id))
        run_dir = modes.get(cfg.mode)(grid, context, cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise RunFailed(f"edge-lam: configuration error: {err}") from err
    except RunAborted as err:
        log.error("%s", err)
        raise RunFailed(f"edge-lam: {err}") from err
    log.info("run %s finished: results in %s", context.run_id, run_dir)
