"""A real 2-round simulation through Flower (`flwr run`) with a tiny model, checked by its files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from flower_e2e import ROOT, flwr_run_app


@pytest.mark.e2e
def test_two_round_hetlora_simulation(flower_env, tiny_bert, agnews, tmp_path):
    run, out = flwr_run_app(tmp_path, flower_env, [
        f"model='{tiny_bert}'", f"data.path='{agnews}'", "num-server-rounds=2",
        "train.local-steps=2", "train.batch-size=8", "eval.max-examples=64",
        "strategy='hetlora'"])

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
