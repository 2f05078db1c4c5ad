"""Running the app through a real local Flower SuperLink in tests.

Several checkouts on one machine start a SuperLink on Flower's fixed local port, so its whole
life is spent under a POSIX (fcntl) lock on /tmp/flwr-e2e.lock. flock(1) and fcntl locks do not
block each other on Linux, so a suite run under `flock /tmp/flwr-e2e.lock ...` nests safely.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.common import copy_app

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = "/tmp/flwr-e2e.lock"


@contextlib.contextmanager
def e2e_lock(wait_s: float = 1800.0):
    with open(LOCK_FILE, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another Flower test run held {LOCK_FILE} for {wait_s:.0f}s")
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def local_superlink(home: Path):
    """A private FLWR_HOME and a local SuperLink we start (and stop) by PID, under the lock."""
    from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT

    env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_DISABLE_USAGE_STATS": "1", "EDGE_LAM_START_WINDOW_S": "120"}
    health = f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health"
    with e2e_lock():
        try:
            httpx.get(health, timeout=1)
            pytest.fail(f"a SuperLink already listens on port {LOCAL_SUPERLINK_HTTP_API_PORT}; "
                        "stop it (by its PID) before running this test")
        except httpx.HTTPError:
            pass
        log = open(home / "superlink.out", "w")
        # Flower's local SuperLink as `flwr run` starts it, with the start window a loaded CI
        # machine can meet (server_app/superlink.py)
        link = subprocess.Popen(
            [sys.executable, "-m", "server_app.superlink", "--insecure", "--simulation",
             "--isolation",
             "subprocess", "--control-api-address", LOCAL_CONTROL_API_ADDRESS, "--host",
             "127.0.0.1", "--port", str(LOCAL_SUPERLINK_HTTP_API_PORT), "--database",
             str(home / "state.db")],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(health, timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    pass
                if link.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"SuperLink did not start: {(home / 'superlink.out').read_text()}")
                time.sleep(0.5)
            yield env
        finally:
            link.terminate()
            try:
                link.wait(timeout=20)
            except subprocess.TimeoutExpired:
                link.kill()
            log.close()


def flwr_run_app(tmp_path: Path, env: dict, run_config: list[str],
                 num_supernodes: int = 4) -> tuple[Path, str]:
    """`flwr run --stream` a copy of the app in simulation; (its results/<run-id>/, output).

    `run_config` lists `key=value` overrides; results go to tmp_path/results.
    """
    app = copy_app(tmp_path / "app")
    results = tmp_path / "results"
    proc = subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config",
         " ".join([f"results-dir='{results}'", *run_config]),
         "--federation-config", f"num-supernodes={num_supernodes}"],
        env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    runs = list(results.iterdir()) if results.exists() else []
    assert len(runs) == 1, f"expected one results/<run-id>/ folder; flwr output:\n{out[-4000:]}"
    return runs[0], out
