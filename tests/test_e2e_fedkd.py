"""A real 2-round FedKD simulation through Flower (`flwr run`): AG News + SST-2 devices."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from flower_e2e import ROOT, flwr_run_app


@pytest.mark.e2e
def test_two_round_fedkd_simulation(flower_env, tiny_bert, mixed_tasks, tmp_path):
    state_dir = tmp_path / "device-state"
    run, out = flwr_run_app(tmp_path, flower_env, [
        "strategy='fedkd'", f"model='{tiny_bert}'",
        f"fedkd.task.agnews.path='{mixed_tasks['agnews']}'",
        f"fedkd.task.sst2.path='{mixed_tasks['sst2']}'", f"fedkd.state-dir='{state_dir}'",
        "fedkd.compress=true", "fedkd.shared-rank=4", "fedkd.local-rank=8",
        "fedkd.device-eval-examples=16", "num-server-rounds=2", "train.local-steps=2",
        "train.batch-size=8", "eval.max-examples=32"])

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
