"""A real 2-round simulation through Flower (`flwr run`) with a tiny model, checked by its files."""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]
APP_FILES = ("pyproject.toml", "README.md", "task", "strategies", "client_app", "server_app")


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """A private FLWR_HOME and a local SuperLink we start (and stop) by PID."""
    from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT

    home = tmp_path_factory.mktemp("flwr-home")
    # one local SuperLink per machine (fixed port): serialise with other suites using it
    lock = open("/tmp/flwr-e2e.lock", "w")
    fcntl.lockf(lock, fcntl.LOCK_EX)  # POSIX lock: no deadlock under flock(1)
    env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_DISABLE_USAGE_STATS": "1"}
    health = f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health"
    try:
        httpx.get(health, timeout=1)
        pytest.fail(f"a SuperLink already listens on port {LOCAL_SUPERLINK_HTTP_API_PORT}; "
                    "stop it (by its PID) before running this test")
    except httpx.HTTPError:
        pass
    log = open(home / "superlink.out", "w")
    link = subprocess.Popen(
        [shutil.which("flower-superlink"), "--insecure", "--simulation", "--isolation",
         "subprocess", "--control-api-address", LOCAL_CONTROL_API_ADDRESS, "--host", "127.0.0.1",
         "--port", str(LOCAL_SUPERLINK_HTTP_API_PORT), "--database", str(home / "state.db")],
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
        fcntl.lockf(lock, fcntl.LOCK_UN)
        lock.close()


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
def test_two_round_hetlora_simulation(flower_env, tiny_bert, agnews, tmp_path):
    app = _copy_app(tmp_path / "app")
    results = tmp_path / "results"
    run_config = " ".join([
        f"model='{tiny_bert}'", f"data.path='{agnews}'", f"results-dir='{results}'",
        "num-server-rounds=2", "train.local-steps=2", "train.batch-size=8",
        "eval.max-examples=64", "strategy='hetlora'"])
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
    assert config["strategy"] == "hetlora" and config["r_max"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["clients"] == [] and rows[0]["aggregation_error"] is None
    mix = config["device_mix"]
    for row in rows[1:]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0 and row["wall_s"] > 0
        assert row["rejected"] == 0 and row["aggregation_error"] > 0
        assert len(row["clients"]) == 4
        for c in row["clients"]:
            # each device trained at the rank of its own profile
            assert c["device"] == mix[c["partition_id"] % len(mix)]
            assert c["rank"] == config["profile_ranks"][c["device"]]
            assert c["num_examples"] > 0 and c["train_loss"] > 0
            assert c["bytes_up"] == c["bytes_down"]
        by_rank = {c["rank"]: c["bytes_up"] for c in row["clients"]}
        assert by_rank[2] < by_rank[4] < by_rank[8] < by_rank[16]
    assert (run / "plots" / "accuracy.png").stat().st_size > 1000
    assert (run / "plots" / "communication.png").stat().st_size > 1000
    assert "training 2 local steps" in out and "LoRA rank 16" in out

    # the adapter is standard PEFT at r_max, with the trained head
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=4)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert model.peft_config["default"].r == 16

    # and the CLI evaluates it, whole and truncated to a Raspberry Pi 4's rank
    cli = [sys.executable, "-m", "task.cli", "evaluate", "--adapter", str(run / "adapter"),
           "--data", str(agnews / "test.tsv"), "--json"]
    full = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True,
                                     env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    low = json.loads(subprocess.run(cli + ["--rank", "2"], capture_output=True, text=True,
                                    check=True, env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    assert full["examples"] == 3800 and full["rank"] == 16 and low["rank"] == 2
    assert 0 <= low["accuracy"] <= 1
