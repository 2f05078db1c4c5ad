"""A real 2-round FedKD simulation through Flower (`flwr run`): AG News + SST-2 devices.

The same run checks `fraction-train` / `min-devices`: 4 devices at fraction 0.25 would be 1 a
round, min-devices=3 lifts it to 3.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from flower_e2e import ROOT, flwr_run_app
from strategies.fedkd.math import NPY_HEADER_BYTES

SHARED_RANK = 16  # 16 x 32 LoRA matrices: a truncated SVD of their updates is smaller
LORA_MATRICES = 8  # query, value x A, B x 2 layers of the tiny BERT
MATRICES = LORA_MATRICES + 1  # and the head's weight (its bias is 1-D: always whole)


def wire_bytes(adapter_file) -> int:
    """What the whole shared module costs on the wire: each array's data + its npy header."""
    return sum(t.nbytes + NPY_HEADER_BYTES for t in load_file(str(adapter_file)).values())


@pytest.mark.e2e
def test_two_round_fedkd_simulation(flower_env, tiny_bert, mixed_tasks, tmp_path):
    state_dir = tmp_path / "device-state"
    run, out = flwr_run_app(tmp_path, flower_env, [
        "strategy='fedkd'", f"model='{tiny_bert}'",
        f"fedkd.task.agnews.path='{mixed_tasks['agnews']}'",
        f"fedkd.task.sst2.path='{mixed_tasks['sst2']}'", f"fedkd.state-dir='{state_dir}'",
        "fedkd.compress=true", f"fedkd.shared-rank={SHARED_RANK}", "fedkd.local-rank=8",
        "fedkd.device-eval-examples=16", "num-server-rounds=2", "train.local-steps=2",
        "train.batch-size=8", "eval.max-examples=120", "fraction-train=0.25",
        "min-devices=3"])

    config = json.loads((run / "config.json").read_text())
    assert config["strategy"] == "fedkd" and set(config["tasks"]) == {"agnews", "sst2"}
    assert config["tasks"]["sst2"]["label_names"] == ["0", "1"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(row["tasks"]) == {"agnews", "sst2"}
        assert row["tasks"]["sst2"]["examples"] == row["tasks"]["agnews"]["examples"] == 120
        assert row["accuracy"] == pytest.approx(
            (row["tasks"]["agnews"]["accuracy"] + row["tasks"]["sst2"]["accuracy"]) / 2)

    # the whole shared module of each task (LoRA backbone + that task's head), as it crosses
    # the network uncompressed; the first task's raw size is also in config.json
    full = {task: wire_bytes(run / "adapter" / task / "adapter_model.safetensors")
            for task in ("agnews", "sst2")}
    assert full["agnews"] == config["shared_module_bytes"] + 10 * NPY_HEADER_BYTES
    assert full["sst2"] < full["agnews"]  # 2 labels instead of 4

    trained: dict[int, int] = {}  # partition -> last round it trained
    for row in rows[1:]:
        # fraction-train=0.25 of 4 devices is 1; min-devices=3 makes it exactly 3
        assert row["rejected"] == 0 and row["missing"] == [] and len(row["clients"]) == 3
        assert len({c["partition_id"] for c in row["clients"]}) == 3
        assert {c["task"] for c in row["clients"]} == {"agnews", "sst2"}
        for c in row["clients"]:
            task = c["task"]
            assert task == ("agnews", "sst2")[c["partition_id"] % 2]
            assert c["accuracy"] == row["tasks"][task]["accuracy"]  # its own task
            assert 0.0 <= c["local_accuracy"] <= 1.0 and c["rank"] == SHARED_RANK
            # uplink: the update since receipt, at least the 4 LoRA A matrices (updates of
            # rank <= 5 in practice; SVD pays up to rank 9) as truncated SVD factors
            assert c["compressed_up"] and LORA_MATRICES // 2 <= c["svd_up"] <= MATRICES
            assert 0 < c["bytes_up"] < full[task]
            if c["partition_id"] in trained:  # it holds the module of its last round
                assert c["compressed_down"] and c["svd_down"] >= LORA_MATRICES // 2
                assert c["bytes_down"] < full[task]
            else:  # first time: the whole module, uncompressed
                assert not c["compressed_down"] and c["svd_down"] == 0
                assert c["bytes_down"] == full[task]
            trained[c["partition_id"]] = row["round"]
    # 3 of 4 devices twice: at least 2 got a compressed downlink in round 2
    assert sum(c["compressed_down"] for c in rows[2]["clients"]) >= 2
    assert "FedKD, 2 local steps" in out

    # private modules stayed on the devices, one per device that trained, saved after its
    # last round
    locals_ = sorted(state_dir.glob("run-*/partition-*/local.safetensors"))
    assert sorted(int(p.parent.name.split("-")[1]) for p in locals_) == sorted(trained)
    for path in locals_:
        with safe_open(str(path), framework="np") as f:
            partition = int(path.parent.name.split("-")[1])
            assert f.metadata()["round"] == str(trained[partition])
            assert f.metadata()["rank"] == "8"

    # one standard PEFT adapter per task; the CLI evaluates it on that task's data and finds
    # exactly what the server logged for the final global module on the same 120 examples
    cli = [sys.executable, "-m", "edge_lam.cli", "evaluate", "--adapter",
           str(run / "adapter" / "sst2"), "--data", str(mixed_tasks["sst2"]), "--json"]
    result = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True,
                                       env=flower_env, cwd=ROOT).stdout.splitlines()[-1])
    assert result["examples"] == 120 and result["rank"] == SHARED_RANK
    assert result["accuracy"] == rows[-1]["tasks"]["sst2"]["accuracy"]
    assert result["loss"] == pytest.approx(rows[-1]["tasks"]["sst2"]["loss"], rel=1e-6)
