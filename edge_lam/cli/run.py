r"""`edge-lam run`: `flwr run --stream` that checks the run config first and exits with the
run's status.

Flower 1.39's `flwr run` refuses a misspelled `--run-config` key inside the SuperLink with
only `[code: 15] Invalid run configuration.`, and `flwr run --stream` exits 0 however the
run ends. `edge-lam run` (1) checks `--run-config` as `edge-lam config --check` does and
exits 2 naming an unknown key and the closest known one, before anything is submitted;
(2) runs this Python's `flwr run APP_DIR ... --stream`, every other argument passed through,
and streams its output; (3) reads the run's status with `flwr ls --run-id <id> --format
json` when the stream ends and prints one line, `run <id> finished:<status>[: <details>]`.
Exit status: 0 for `finished:completed`, 1 otherwise, 2 for a config error, 130 on Ctrl+C
(after asking the SuperLink to stop the run with `flwr stop <id>`).

examples:
  edge-lam run . --run-config recipes/quickstart.toml
  edge-lam run . --run-config "strategy='flexlora' num-server-rounds=10" \
      --federation-config "num-supernodes=10"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# this Python's Flower CLI (the `flwr` console script's entry point)
FLWR = [sys.executable, "-c", "import sys; from flwr.cli.app import app; "
        "sys.exit(app(prog_name='flwr'))"]
STARTED = re.compile(r"Successfully started run (\d+)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-lam run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument goes to `flwr run` as it is (see `flwr run --help`).")
    parser.add_argument("app", nargs="?", default=".",
                        help="the app folder (default: %(default)s), as for `flwr run`")
    parser.add_argument("superlink", nargs="?", default=None,
                        help="the SuperLink connection name, as for `flwr run` (also given "
                             "to `flwr ls` and `flwr stop`)")
    parser.add_argument("--run-config", "-c", action="append", default=[], metavar="CONFIG",
                        help="key=value pairs or a .toml file, checked, then passed to "
                             "`flwr run` (may repeat)")
    parser.add_argument("--federation-config", action="append", default=[], metavar="CONFIG",
                        help="passed to `flwr run` (e.g. \"num-supernodes=10\"; may repeat)")
    parser.add_argument("--federation", default=None, help="passed to `flwr run`")
    parser.add_argument("--status-wait", type=float, default=10.0, metavar="S",
                        help="how long to wait for the run to show as finished in `flwr ls` "
                             "after the stream ends (default: %(default)s)")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our arguments, the rest for `flwr run`); --format is refused (the stream and the
    final line need Flower's default output)."""
    args, rest = build_parser().parse_known_args(argv)
    if any(a == "--format" or a.startswith("--format=") for a in rest):
        build_parser().error("--format is not passed to `flwr run`: edge-lam run prints "
                             "its own final line")
    if "--stream" in rest:
        rest.remove("--stream")
    return args, rest


def flwr_run_command(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `flwr run` command line: the app, the SuperLink, each --run-config, the rest."""
    cmd = [*FLWR, "run", args.app, *([args.superlink] if args.superlink else [])]
    for value in args.run_config:
        cmd += ["--run-config", value]
    for value in args.federation_config:
        cmd += ["--federation-config", value]
    if args.federation:
        cmd += ["--federation", args.federation]
    return [*cmd, *rest, "--stream"]


def check(args: argparse.Namespace) -> None:
    """ConfigError naming what Flower or the app would refuse (`edge-lam config --check`)."""
    from edge_lam.cli.runcheck import ROOT, check_run_config
    from edge_lam.config.options import ConfigError

    app = ROOT if args.app.startswith("@") else Path(args.app).expanduser()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{args.app} is not a Flower app folder: it has no pyproject.toml")
    check_run_config(args.run_config, app)


def parse_status(listing: str, run_id: str) -> tuple[str, str]:
    """(status, details) of run `run_id` in `flwr ls --format json` output."""
    try:
        data = json.loads(listing)
    except json.JSONDecodeError:
        return "unknown", f"`flwr ls` printed no JSON: {listing.strip()[-300:]}"
    runs = [r for r in data.get("runs", []) if str(r.get("run-id")) == str(run_id)]
    if not data.get("success", False) or not runs:
        return "unknown", data.get("error-message") or f"`flwr ls` does not list run {run_id}"
    details = runs[0].get("status-details", "") or ""
    return runs[0].get("status", "unknown"), "" if details == "N/A" else details


def final_line(run_id: str, status: str, details: str) -> str:
    return f"run {run_id} {status}" + (f": {details}" if details else "")


def flwr(args: argparse.Namespace, *command: str, timeout: float = 60.0) -> str:
    """stdout of this Python's `flwr <command>` for this run's SuperLink."""
    cwd = None if args.app.startswith("@") else Path(args.app).expanduser()
    cmd = [*FLWR, *command, *([args.superlink] if args.superlink else [])]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd).stdout
    except subprocess.TimeoutExpired:
        return ""


def run_status(args: argparse.Namespace, run_id: str) -> tuple[str, str]:
    """The run's (status, details), polled for up to --status-wait seconds while the run is
    not yet `finished:*` (the stream can end just before the status changes)."""
    deadline = time.monotonic() + args.status_wait
    while True:
        status, details = parse_status(
            flwr(args, "ls", "--run-id", run_id, "--format", "json"), run_id)
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(1.0)


def stream(cmd: list[str], state: dict) -> int:
    """Run `cmd`, copying its output to stdout; its exit code. `state` gets the process
    ("proc") and the run id it started ("run_id") as they come."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = state["proc"] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if state.get("run_id") is None and (found := STARTED.search(line)):
            state["run_id"] = found.group(1)
    return proc.wait()


def interrupted(args: argparse.Namespace, state: dict) -> int:
    """Ctrl+C: let `flwr run` end (it got the SIGINT too), then ask the SuperLink to stop
    the run it started."""
    proc = state.get("proc")
    if proc is not None:
        try:
            tail = proc.communicate(timeout=2)[0] or ""
        except subprocess.TimeoutExpired:  # the SIGINT was ours alone: pass it on
            proc.send_signal(signal.SIGINT)
            try:
                tail = proc.communicate(timeout=10)[0] or ""
            except subprocess.TimeoutExpired:
                proc.kill()
                tail = proc.communicate()[0] or ""
        sys.stdout.write(tail)
        if state.get("run_id") is None and (found := STARTED.search(tail)):
            state["run_id"] = found.group(1)
    run_id = state.get("run_id")
    if run_id is None:
        print("edge-lam run: interrupted before a run started", file=sys.stderr)
        return 130
    print(f"edge-lam run: interrupted; stopping run {run_id} (flwr stop {run_id})",
          file=sys.stderr)
    print(flwr(args, "stop", run_id).strip(), file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    from edge_lam.config.options import ConfigError

    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check(args)
    except ConfigError as err:
        print(f"edge-lam: error: {err}", file=sys.stderr)
        return 2
    state: dict = {}
    try:
        code = stream(flwr_run_command(args, rest), state)
    except KeyboardInterrupt:
        return interrupted(args, state)
    run_id = state.get("run_id")
    if run_id is None:
        print(f"edge-lam run: `flwr run` exited {code} before a run started", file=sys.stderr)
        return code or 1
    status, details = run_status(args, run_id)
    print(final_line(run_id, status, details))
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
