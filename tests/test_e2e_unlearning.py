"""A real `flwr run` simulation with strategy='unlearn' and a tiny model, checked by its files."""

from __future__ import annotations

import json

import pytest

from flower_e2e import flwr_run_app

FORGET = 2  # partition id of the opting-out device (a jetson-orin-nano: rank 8)


@pytest.mark.e2e
def test_unlearn_simulation(flower_env, tiny_bert, agnews, tmp_path):
    run, out = flwr_run_app(tmp_path, flower_env, [
        f"model='{tiny_bert}'", f"data.path='{agnews}'",
        "strategy='unlearn'", f"unlearn.clients='{FORGET}'", "num-server-rounds=1",
        "unlearn.rounds=2", "unlearn.recovery-rounds=1", "unlearn.grad-batches=1",
        "unlearn.loss='bounded-ce'", "train.local-steps=2", "train.batch-size=8",
        "eval.max-examples=32", "data.partitioner='iid'"])

    request = json.loads((run / "unlearning.json").read_text())
    assert request["status"] == "done" and request["clients"] == [FORGET]
    assert request["loss"] == "bounded-ce"
    [forgotten] = request["forgotten"]
    assert forgotten["partition_id"] == FORGET and forgotten["rank"] == 8
    assert request["cost"]["rounds"] == 3 and request["cost"]["bytes_down"] > 0
    assert (run / "adapter-before-unlearning" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["initial", "train", "unlearn", "unlearn", "recover"]
    for row in rows[2:4]:  # every device sent a gradient; only the forgotten one unlearned
        roles = {c["partition_id"]: c["role"] for c in row["clients"]}
        assert roles == {p: "forget" if p == FORGET else "retain" for p in range(4)}
        assert row["unlearning"]["max_abs_cos_projected_vs_retained"] < 1e-6
        assert row["forget_nodes"] == [forgotten["node_id"]]
    assert sorted(c["partition_id"] for c in rows[4]["clients"]) == [0, 1, 3]
    assert "unlearning request written to" in out and "unlearning device: node" in out
