"""Faults, attackers and S6 through Flower (`flwr run` in simulation, a process per part): a
device's injected crash reaches the server as Flower's error reply, the attackers' replies
are aggregated by a robust statistic on products in the ServerApp's own process, and the
contributions land in metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from flower_e2e import flwr_run_app

from strategies.robust import inject

NODES, ROUNDS, SEED = 5, 2, 3


@pytest.mark.e2e
def test_crashes_attackers_and_contributions_through_flower(flower_env, tiny_bert,
                                                            agnews_short, tmp_path):
    data = agnews_short(32)
    config = [f"model='{tiny_bert}'", f"data.path='{data}'", f"num-server-rounds={ROUNDS}",
              "train.local-steps=1", "train.batch-size=8", "eval.max-examples=32",
              f"seed={SEED}", "min-devices=2", "faults.crash=0.3",
              "attack.kind='sign-flip'", "attack.fraction=0.2",
              "robust.aggregator='median'", "robust.contribution='report'",
              "robust.contribution-examples=8"]
    run, _ = flwr_run_app(tmp_path / "run", flower_env, config, num_supernodes=NODES)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))

    crashes = {(rnd, p) for rnd in range(1, ROUNDS + 1) for p in range(NODES)
               if inject.fault_draw(SEED, rnd, p, crash=0.3, error=0.0, timeout=0.0)
               == "crash"}
    assert crashes, "pick a seed whose draws crash at least one device"
    for row in rows[1:]:
        crashed = {p for rnd, p in crashes if rnd == row["round"]}
        # each crash came back as Flower's error reply, rejected with its node and reason
        assert row["rejected"] == len(crashed)
        assert all(r["reason"].startswith("device error") for r in row["rejections"])
        trained = {c["partition_id"] for c in row["clients"]}
        assert trained == set(range(NODES)) - crashed
        entry = row["robust"]
        assert entry["aggregator"] == "median"
        assert {int(n) for n in entry["weights"]} == {c["node_id"] for c in row["clients"]}
        assert set(row["contribution"]["estimate"]) == set(entry["weights"])
