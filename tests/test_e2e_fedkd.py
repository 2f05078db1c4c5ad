"""A real 2-round FedKD simulation through Flower (`flwr run`): AG News + SST-2 devices.

Two test suites on this machine start a SuperLink on the same port, so the SuperLink's whole
life is spent under a POSIX (fcntl) lock on /tmp/flwr-e2e.lock. Run the module itself under
`flock /tmp/flwr-e2e.lock python -m pytest ...` too: flock(1) and fcntl locks do not block
each other on Linux, so the two nest without deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
APP_FILES = ("pyproject.toml", "README.md", "task", "strategies", "client_app", "server_app")
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


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """A private FLWR_HOME and a local SuperLink we start (and stop) by PID, under the lock."""
    from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT

    home = tmp_path_factory.mktemp("flwr-home-fedkd")
    env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_DISABLE_USAGE_STATS": "1"}
    health = f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health"
    with e2e_lock():
        try:
            httpx.get(health, timeout=1)
            pytest.fail(f"a SuperLink already listens on port {LOCAL_SUPERLINK_HTTP_API_PORT}; "
                        "stop it (by its PID) before running this test")
        except httpx.HTTPError:
            pass
        log = open(home / "superlink.out", "w")
        link = subprocess.Popen(
            [shutil.which("flower-superlink"), "--insecure", "--simulation", "--isolation",
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


def _copy_app(dst: Path) -> Path:
    """flwr run rewrites pyproject.toml (moves federations out): run a copy."""
    dst.mkdir(parents=True)
    for name in APP_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst / name)
    return dst


@pytest.mark.e2e
def test_two_round_fedkd_simulation(flower_env, tiny_bert, mixed_tasks, tmp_path):
    app = _copy_app(tmp_path / "app")
    results, state_dir = tmp_path / "results", tmp_path / "device-state"
    run_config = " ".join([
        "strategy='fedkd'", f"model='{tiny_bert}'", f"results-dir='{results}'",
        f"fedkd.task.agnews.path='{mixed_tasks['agnews']}'",
        f"fedkd.task.sst2.path='{mixed_tasks['sst2']}'", f"fedkd.state-dir='{state_dir}'",
        "fedkd.compress=true", "fedkd.shared-rank=4", "fedkd.local-rank=8",
        "fedkd.device-eval-examples=16", "num-server-rounds=2", "train.local-steps=2",
        "train.batch-size=8", "eval.max-examples=32"])
    proc = subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config", run_config,
         "--federation-config", "num-supernodes=4"],
        env=flower_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    runs = list(results.iterdir()) if results.exists() else []
    assert len(runs) == 1, f"expected one results/<run-id>/ folder; flwr output:\n{out[-4000:]}"
    run = runs[0]

    config = json.loads((run / "config.json").read_text())
    assert config["strategy"] == "fedkd" and set(config["tasks"]) == {"agnews", "sst2"}
    assert config["tasks"]["sst2"]["label_names"] == ["0", "1"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    down = {}
    for row in rows:
        assert set(row["tasks"]) == {"agnews", "sst2"}
        assert row["accuracy"] == pytest.approx(
            (row["tasks"]["agnews"]["accuracy"] + row["tasks"]["sst2"]["accuracy"]) / 2)
    for row in rows[1:]:
        assert row["rejected"] == 0 and len(row["clients"]) == 4
        assert sorted(c["task"] for c in row["clients"]) == ["agnews", "agnews", "sst2", "sst2"]
        for c in row["clients"]:
            assert c["task"] == ("agnews", "sst2")[c["partition_id"] % 2]
            assert c["accuracy"] == row["tasks"][c["task"]]["accuracy"]  # its own task
            assert 0.0 <= c["local_accuracy"] <= 1.0 and c["rank"] == 4
            assert c["compressed_up"] and 0 < c["bytes_up"]
            assert c["compressed_down"] == (row["round"] > 1)
            down.setdefault(c["partition_id"], []).append(c["bytes_down"])
    # round 1 sends the whole shared module, round 2 its update, SVD-compressed where that is
    # smaller on the wire (the tiny model's 32-wide matrices gain little; test_fedkd_federation
    # checks the savings on larger ones)
    assert all(second <= first for first, second in down.values())
    assert "FedKD, 2 local steps" in out

    # private modules stayed on the devices, one per simulated device, saved after round 2
    locals_ = sorted(state_dir.glob("run-*/partition-*/local.safetensors"))
    assert len(locals_) == 4
    with safe_open(str(locals_[0]), framework="np") as f:
        assert f.metadata()["round"] == "2" and f.metadata()["rank"] == "8"

    # one standard PEFT adapter per task; the CLI evaluates it on that task's data
    cli = [sys.executable, "-m", "task.cli", "evaluate", "--adapter",
           str(run / "adapter" / "sst2"), "--data", str(mixed_tasks["sst2"]), "--json"]
    result = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True,
                                       env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    assert result["examples"] == 120 and result["rank"] == 4 and 0 <= result["accuracy"] <= 1
