"""A real deployment on one host, as on an edge server and its devices: a SuperLink with TLS,
SuperNode authentication and state on disk (deploy/superlink.sh), device keys registered by
deploy/connect.sh, SuperNodes started by deploy/supernode.sh, the app submitted by `flwr run`.

A device runs natively (x86-64) or emulated as aarch64: deploy/emulate-arm64.sh makes a Debian
arm64 sysroot with the project's aarch64 wheels and launchers that run `flower-supernode` and
`edge-lam-device` under QEMU user mode; the device's PATH starts with them, so every process
of that device (SuperNode, SuperExec, ClientApps) executes aarch64 code.

Everything listens on 127.0.0.1 at free ports; every process is stopped by its process group's
PID on exit. Used by tests/test_arm64_supernode.py and benchmarks/device_overhead.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TOKENIZERS_PARALLELISM": "false"}


class FederationError(RuntimeError):
    """A part of the deployment did not come up or finish in time; the message has the logs."""


@dataclass(frozen=True)
class Device:
    name: str
    profile: str  # devices.rank.<profile>: rpi4, rpi5, jetson-orin-nano, laptop
    node_config: str = ""  # more --node-config keys (data-dir, partition-id, ...)
    emulated: bool = False  # aarch64 under QEMU (needs arm64_env)
    runtime: str = "warm"  # deploy/supernode.sh --runtime: warm | flower
    env: tuple[tuple[str, str], ...] = ()  # extra environment of this device's processes


SLOW_START = """import os, sys, time
# Every Python process of this device starts slowly, as on a loaded board, a cold SD card or
# an emulated CPU (made by benchmarks/federation.py's slow_python_start).
seconds = float(os.environ.get("EDGE_LAM_SLOW_START_S", "0"))
if seconds > 0:
    sys.stderr.write(f"[slow start] {os.path.basename(sys.argv[0] or 'python')}: {seconds:.0f} s\\n")
    time.sleep(seconds)
"""


def slow_python_start(folder: Path, seconds: float) -> tuple[tuple[str, str], ...]:
    """A device environment in which every Python process sleeps `seconds` before it runs
    (a sitecustomize.py on PYTHONPATH): Device(env=slow_python_start(tmp, 45))."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SLOW_START)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")]))
    return (("PYTHONPATH", path), ("EDGE_LAM_SLOW_START_S", str(seconds)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    """deploy/emulate-arm64.sh's env.sh (KEY="value" lines) as a dict."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


class Federation:
    """Start with `with Federation(tmp, devices, ...) as fed:`; `fed.run(...)` submits a run."""

    def __init__(self, tmp: Path, devices: list[Device], arm64_env: dict | None = None,
                 qemu_cpu: str = "cortex-a72", server_env: tuple[tuple[str, str], ...] = (),
                 server_flags: tuple[str, ...] = ()):
        self.tmp, self.devices = Path(tmp), devices
        self.server_env, self.server_flags = dict(server_env), list(server_flags)
        self.arm64_env, self.qemu_cpu = arm64_env, qemu_cpu
        self.procs: dict[str, subprocess.Popen] = {}
        self.fleet, self.control = free_port(), free_port()
        self.certs, self.laptop = self.tmp / "certs", self.tmp / "laptop"
        self.node_ids: dict[str, int] = {}
        self.started_at: dict[str, float] = {}
        if any(d.emulated for d in devices) and not arm64_env:
            raise FederationError("an emulated device needs arm64_env (deploy/emulate-arm64.sh)")

    # ------------------------------------------------------------------ processes
    def _start(self, key: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{key}.log", "w")
        self.started_at[key] = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                start_new_session=True, env={**os.environ, **BASE_ENV, **env})
        self.procs[key] = proc
        return proc

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the process group we started, by its PID
                proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log(self, key: str) -> str:
        path = self.tmp / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, keys: list[str] | None = None, chars: int = 2500) -> str:
        keys = keys or ["superlink", *[d.name for d in self.devices]]
        return "\n".join(f"--- {k}.log:\n{self.log(k)[-chars:]}" for k in keys)

    def wait_for(self, what: str, predicate, timeout: float, keys: list[str] | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1.0)
        raise FederationError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                              f"{self.tails(keys)}")

    # ------------------------------------------------------------------ bring-up
    def __enter__(self) -> Federation:
        try:
            self.start_server()
            for device in self.devices:
                self.start_device(device)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for key in list(self.procs):
            self.stop(key)

    def laptop_env(self) -> dict:
        return {**os.environ, **BASE_ENV, "FLWR_HOME": str(self.laptop)}

    def start_server(self) -> None:
        names = [d.name for d in self.devices]
        subprocess.run([str(DEPLOY / "gen-certs.sh"), "--out", str(self.certs),
                        "--server-address", "127.0.0.1",
                        *[a for n in names for a in ("--device", n)]],
                       check=True, capture_output=True, text=True)
        self._start("superlink", [str(DEPLOY / "superlink.sh"), "--certs", str(self.certs),
                                  "--state", str(self.tmp / "state"),
                                  "--fleet", f"127.0.0.1:{self.fleet}",
                                  "--control", f"127.0.0.1:{self.control}",
                                  *self.server_flags],
                    {"FLWR_HOME": str(self.tmp / "server-home"), **self.server_env})

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.fleet)) == 0

        self.wait_for("the SuperLink's Fleet API", listening, 90, ["superlink"])
        self.laptop.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [str(DEPLOY / "connect.sh"), "--name", "edge", "--control",
             f"127.0.0.1:{self.control}", "--ca", str(self.certs / "ca.crt"),
             *[a for n in names for a in ("--register", str(self.certs / "devices" / f"{n}.pub"))]],
            env=self.laptop_env(), capture_output=True, text=True, cwd=self.laptop)
        ids = re.findall(r"SuperNode (\d+) registered successfully", done.stdout)
        if done.returncode != 0 or len(ids) != len(names):
            raise FederationError(f"registering the device keys failed:\n{done.stdout}\n"
                                  f"{done.stderr}")
        self.node_ids = dict(zip(names, map(int, ids)))

    def start_device(self, device: Device) -> None:
        env = {"FLWR_HOME": str(self.tmp / f"home-{device.name}"), **dict(device.env)}
        if device.emulated:
            env |= {"PATH": f"{self.arm64_env['BIN']}:{os.environ['PATH']}",
                    "QEMU_CPU": self.qemu_cpu}
        config = f"device='{device.profile}' {device.node_config}".strip()
        self._start(device.name, [str(DEPLOY / "supernode.sh"),
                                  "--superlink", f"127.0.0.1:{self.fleet}",
                                  "--ca", str(self.certs / "ca.crt"),
                                  "--key", str(self.certs / "devices" / device.name),
                                  "--node-config", config, "--runtime", device.runtime,
                                  "--port", str(free_port())], env)

    def online(self) -> set[int]:
        out = subprocess.run(["flwr", "supernode", "list", "edge", "--format", "json"],
                             env=self.laptop_env(), capture_output=True, text=True,
                             cwd=self.laptop).stdout
        try:
            return {int(n["node-id"]) for n in json.loads(out)["nodes"]
                    if n["status"] == "online"}
        except (ValueError, KeyError):
            return set()

    def wait_ready(self, timeout: float) -> dict[str, float]:
        """Every device online, its warm runtime done with its imports; returns the seconds
        each device took from its start until it was seen so."""
        ready: dict[str, float] = {}

        def all_ready() -> bool:
            online = self.online()
            for d in self.devices:
                imported = d.runtime != "warm" or "claiming tasks at" in self.log(d.name)
                if d.name not in ready and imported and self.node_ids[d.name] in online:
                    ready[d.name] = time.monotonic() - self.started_at[d.name]
            return len(ready) == len(self.devices)

        self.wait_for("every device online and done with its imports", all_ready, timeout)
        return ready

    # ------------------------------------------------------------------ a run
    def run(self, app: Path, run_config: str, timeout: float) -> tuple[list[dict], str, int]:
        """`flwr run APP edge --stream` (results in <tmp>/results unless `run_config` sets
        results-dir); (metrics.jsonl rows, its output, run id)."""
        results = self.tmp / "results"
        if "results-dir=" not in run_config:
            run_config = f"results-dir='{results}' {run_config}"
        else:
            results = Path(re.search(r"results-dir='([^']*)'", run_config).group(1))
        proc = self._start("flwr-run", ["flwr", "run", str(app), "edge", "--stream",
                                        "--run-config", run_config],
                           {"FLWR_HOME": str(self.laptop)})
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise FederationError(f"flwr run did not finish in {timeout:.0f} s\n"
                                  f"{self.tails(['flwr-run', 'superlink', *[d.name for d in self.devices]])}") from err
        out = self.log("flwr-run")
        if proc.returncode != 0:
            raise FederationError(f"flwr run exited {proc.returncode}\n{self.tails(['flwr-run', 'superlink', *[d.name for d in self.devices]])}")
        found = re.search(r"Successfully started run (\d+)", out)
        run_id = int(found.group(1)) if found else -1
        files = sorted(results.glob("*/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
        rows = [json.loads(x) for x in files[-1].read_text().splitlines()] if files else []
        return rows, out, run_id

    def run_status(self, run_id: int) -> str:
        """The run's status as `flwr ls` shows it (e.g. 'finished:completed')."""
        done = subprocess.run(["flwr", "ls", "edge", "--format", "json"],
                              env=self.laptop_env(), capture_output=True, text=True,
                              cwd=self.laptop)
        try:
            runs = json.loads(done.stdout)["runs"]
        except (ValueError, KeyError):
            return f"unknown ({done.stdout[-300:]} {done.stderr[-300:]})"
        for run in runs:
            if int(run.get("run-id", -2)) == run_id or run_id == -1:
                return str(run.get("status", "?"))
        return "not listed"
