"""`edge-lam superlink status|stop`: the local SuperLink that `flwr run .` left running.

Flower 1.39's `flwr run .` (local simulation) starts `flower-superlink` detached, on fixed
ports (127.0.0.1:39091 and :39093, `flwr/cli/local_superlink.py`), and records no PID; it
keeps running after the run, and its working directory is the folder of the checkout that
started it: every later `flwr run` on the machine, from any checkout and any FLWR_HOME, goes
to that SuperLink, and a relative `results-dir` is relative to that folder.

The SuperLink of one FLWR_HOME is the `flower-superlink` process whose `--log-file` is
`$FLWR_HOME/local-superlink/superlink.log` (the argument `flwr run` gives it). `stop` sends
that one process SIGTERM (its `flower-superexec` child follows: it watches its parent's
PID) and never matches processes by name alone. Linux (/proc) only.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SuperLinkProcess:
    pid: int
    cwd: str        # where a relative results-dir of a run it executes resolves
    log_file: str   # "" when started by hand (then it belongs to no FLWR_HOME)
    args: tuple[str, ...]


def flwr_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home())


def log_file_of(home: Path) -> Path:
    """The --log-file `flwr run` gives the local SuperLink of FLWR_HOME `home`."""
    return home / "local-superlink" / "superlink.log"


def _arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args[:-1] else ""


def superlinks(proc: Path = Path("/proc")) -> list[SuperLinkProcess]:
    """Every running `flower-superlink` process (also `python -m server_app.superlink`)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        head = [Path(a).name for a in args[:3]]
        if "flower-superlink" in head or "server_app.superlink" in args[:3]:
            found.append(SuperLinkProcess(int(entry.name), cwd, _arg_after(args, "--log-file"),
                                          tuple(args)))
    return sorted(found, key=lambda p: p.pid)


def of_home(home: Path, running: list[SuperLinkProcess]) -> SuperLinkProcess | None:
    """The local SuperLink that `flwr run` started for FLWR_HOME `home`, if it runs."""
    mine = str(log_file_of(home).resolve())
    return next((p for p in running
                 if p.log_file and str(Path(p.log_file).resolve()) == mine), None)


def status_lines(home: Path) -> list[str]:
    running = superlinks()
    mine = of_home(home, running)
    if not running:
        return [f"no SuperLink runs (FLWR_HOME={home}); `flwr run .` starts one"]
    lines = []
    for p in running:
        owner = ("this FLWR_HOME's" if p == mine else
                 f"FLWR_HOME {Path(p.log_file).parents[1]}" if p.log_file else "started by hand")
        lines.append(f"SuperLink PID {p.pid} ({owner}): runs started on this machine write a "
                     f"relative results-dir under {p.cwd}")
    if mine is None:
        lines.append(f"none of them was started by `flwr run` for FLWR_HOME={home}: "
                     "`edge-lam superlink stop` stops only that one; stop another with "
                     "`kill <PID>`")
    return lines


def stop(home: Path, wait_s: float = 20.0) -> str:
    """SIGTERM the SuperLink of FLWR_HOME `home` (SIGKILL after `wait_s`); what was done."""
    mine = of_home(home, superlinks())
    if mine is None:
        return f"no SuperLink of FLWR_HOME={home} runs: nothing to stop"
    os.kill(mine.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{mine.pid}").exists() or _zombie(mine.pid):
            return f"stopped the SuperLink of FLWR_HOME={home} (PID {mine.pid})"
        time.sleep(0.2)
    os.kill(mine.pid, signal.SIGKILL)
    return f"killed the SuperLink of FLWR_HOME={home} (PID {mine.pid}): SIGTERM left it running"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
