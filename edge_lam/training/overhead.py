"""What a round costs a device before and around its training, reported in each reply.

- `startup-s`: from the task's claim to the handler: a fresh `flwr-clientapp` process's start,
  its imports and Flower's pulls (Flower's default), or only the pulls in the long-lived
  runtime (`client_app.runtime`, which sets CLAIMED_AT_ENV when it claims a task).
- `handler-s`: the handler's own time; `handler-s - train-s` is the model load (zero once a
  process holds the model), data preparation and the adapter's hand-over.
"""

from __future__ import annotations

import os
import platform
import time

# The wall-clock time (time.time()) at which the long-lived runtime claimed the running task.
CLAIMED_AT_ENV = "EDGE_LAM_TASK_CLAIMED_AT"
_TASKS_IN_PROCESS = 0


def process_started_at() -> float | None:
    """When this process started (wall clock), from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


def startup_s(now: float | None = None) -> float:
    """Seconds from the task's claim (or this process's start) to `now`; NaN if unknown."""
    now = time.time() if now is None else now
    claimed = os.environ.get(CLAIMED_AT_ENV)
    origin = float(claimed) if claimed else process_started_at()
    return float("nan") if origin is None else max(0.0, now - origin)


def handled(started: float) -> dict[str, float]:
    """Metrics for a reply whose handler began at wall time `started`."""
    global _TASKS_IN_PROCESS
    _TASKS_IN_PROCESS += 1
    return {"startup-s": startup_s(started), "handler-s": time.time() - started,
            "process-task": _TASKS_IN_PROCESS}


def platform_fields() -> dict[str, str]:
    """What a device runs on, for its profile reply."""
    return {"platform": platform.machine(), "python": platform.python_version()}
