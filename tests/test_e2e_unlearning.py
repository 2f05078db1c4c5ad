"""A real `flwr run` simulation with strategy='unlearn' and a tiny model, checked by its files."""

from __future__ import annotations

import json
import subprocess

import pytest

from flower_e2e import copy_app

FORGET = 2  # partition id of the opting-out device (a jetson-orin-nano: rank 8)


@pytest.mark.e2e
def test_unlearn_simulation(flower_env, tiny_bert, agnews, tmp_path):
    app = copy_app(tmp_path / "app")
    results = tmp_path / "results"
    run_config = " ".join([
        f"model='{tiny_bert}'", f"data.path='{agnews}'", f"results-dir='{results}'",
        "strategy='unlearn'", f"unlearn.clients='{FORGET}'", "num-server-rounds=1",
        "unlearn.rounds=2", "unlearn.recovery-rounds=1", "unlearn.grad-batches=1",
        "unlearn.loss='bounded-ce'", "train.local-steps=2", "train.batch-size=8",
        "eval.max-examples=32", "data.partitioner='iid'"])
    proc = subprocess.run(
        ["flwr", "run", str(app), "--stream", "--run-config", run_config,
         "--federation-config", "num-supernodes=4"],
        env=flower_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    runs = list(results.iterdir()) if results.exists() else []
    assert len(runs) == 1, f"expected one results/<run-id>/ folder; flwr output:\n{out[-4000:]}"
    run = runs[0]

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
