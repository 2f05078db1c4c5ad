"""`flower-superlink` with a start window that a slow or loaded edge server can meet.

Flower 1.39's SuperLink gives each process it launches for a run (the ServerApp, or a
simulation) HEARTBEAT_DEFAULT_INTERVAL = 30 s from the task's claim to its first heartbeat,
then 2 x 30 s between heartbeats. A server that is slow to start Python (a Raspberry Pi as the
edge server, a machine loaded by training) misses the first: the SuperLink refuses that
ServerApp's calls (401), launches another for the same run, and the run never gets going
(reproduced: tests/test_slow_start.py). Flower has no flag for it, so this sets that constant
before Flower's state modules read it, in this process only (the SuperNodes keep 30 s for
their own heartbeats).

    EDGE_LAM_START_WINDOW_S=120 python -m server_app.superlink <flower-superlink flags>

deploy/superlink.sh runs this (its --start-window, 120 s by default).
"""

from __future__ import annotations

import os
import sys

WINDOW_ENV = "EDGE_LAM_START_WINDOW_S"
# Flower's modules that copy the constant when imported: patched before they are
_READERS = ("flwr.supercore.corestate.in_memory_corestate",
            "flwr.supercore.corestate.sql_corestate",
            "flwr.superlink.servicer.control.control_handlers")


def set_start_window(seconds: float) -> float:
    """Make `seconds` (at least Flower's 30) the window; returns the window in force."""
    import flwr.common.constant as constant

    early = [m for m in _READERS if m in sys.modules]
    if early:
        raise RuntimeError(f"{', '.join(early)} already read Flower's start window: set it "
                           "before anything imports the SuperLink")
    constant.HEARTBEAT_DEFAULT_INTERVAL = max(float(seconds), constant.HEARTBEAT_DEFAULT_INTERVAL)
    return constant.HEARTBEAT_DEFAULT_INTERVAL


def main() -> None:
    raw = os.environ.get(WINDOW_ENV, "120")
    try:
        window = float(raw)
    except ValueError:
        sys.exit(f"{WINDOW_ENV}={raw!r} is not a number of seconds (e.g. 120)")
    set_start_window(window)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
