"""FedOSD drift removal (S4 recovery) in the real flow: ServerApp logic + ClientApp handlers
over the in-process grid, train -> unlearn -> recover.

What the server aggregates in a recovery round must have no component along
d = theta - theta_before (theta: the global module of that round, theta_before: the adapter
saved in adapter-before-unlearning/), although the devices' own updates do; everything is
compared in the zero-padded r_max space the server works in (S1 pad_lora, sorted keys).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from inprocess_grid import InProcessGrid
from inprocess_grid import federate, prepare_run
from strategies.lora.math import AGGREGATORS, example_weights
from strategies.unlearn.math import flatten_state
from strategies.unlearn.strategy import FederatedUnlearning
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import pad_lora
from edge_lam.records import from_record

FORGET = 1  # partition id of the opting-out device (an rpi5: rank 4)
LAPTOP = 3  # a remaining device at rank 16 = r_max: its downlink is the whole global module


def _cos(u: np.ndarray, d: np.ndarray) -> float:
    return abs(float(u @ d)) / (np.linalg.norm(u) * np.linalg.norm(d))


# hetlora: ranks 2/4/8/16 (low-rank replies zero-padded to r_max = 16); fedavg: all at 16;
# flexlora: SVD of the mean product, not linear in the factors (the server strips its aggregate)
@pytest.mark.parametrize("aggregation", ["hetlora", "fedavg", "flexlora"])
def test_recovery_aggregates_have_no_component_along_the_unlearning_direction(
        aggregation, tiny_bert, agnews, tmp_path, monkeypatch):
    raw = {"model": str(tiny_bert), "data.path": str(agnews),
           "results-dir": str(tmp_path / "results"), "strategy": "unlearn",
           "unlearn.clients": str(FORGET), "num-server-rounds": 1, "unlearn.rounds": 1,
           "unlearn.recovery-rounds": 2, "unlearn.grad-batches": 1, "train.local-steps": 2,
           "train.batch-size": 8, "eval.max-examples": 16, "eval.batch-size": 16,
           "data.partitioner": "iid", "unlearn.aggregation": aggregation,
           "lora.fedavg-rank": 16}
    aggregates = {}  # server round -> the global state the strategy returned
    original = FederatedUnlearning.aggregate_train

    def spy(self, server_round, replies):
        arrays, metrics = original(self, server_round, list(replies))
        aggregates[server_round] = from_record(arrays)
        return arrays, metrics

    monkeypatch.setattr(FederatedUnlearning, "aggregate_train", spy)
    grid = InProcessGrid(raw, num_nodes=4)  # grid.sent[i] was answered by grid.replies[i]
    plan = prepare_run(RunConfig.from_run_config(raw), run_id=1)
    r_max = plan.cfg.r_max
    assert r_max == 16
    run_dir = federate(grid, plan)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["initial", "train", "unlearn", "recover", "recover"]

    node_of = {c.node_config["partition-id"]: n for n, c in grid.contexts.items()}
    sent = {(rnd, m.metadata.dst_node_id): m for rnd, m in grid.sent
            if "arrays" in m.content}
    keys = sorted(plan.initial)

    def flat(state):
        return flatten_state(state, keys)[0]

    # theta_before from disk is the global module of the first unlearning round (round 2)
    before = plan.server_model.load_state(run_dir / "adapter-before-unlearning", "before")
    np.testing.assert_array_equal(flat(before), flat(from_record(
        sent[(2, node_of[LAPTOP])].content["arrays"])))

    device_cos = []
    for rnd in (3, 4):  # the recovery rounds
        theta = flat(from_record(sent[(rnd, node_of[LAPTOP])].content["arrays"]))
        d = theta - flat(before)  # (p,)
        assert np.linalg.norm(d) > 1e-3 * np.linalg.norm(theta)  # unlearning moved the model
        replies = [reply for (k, msg), reply in zip(grid.sent, grid.replies)
                   if k == rnd and msg.metadata.message_type == "train"]
        assert sorted(r.metadata.src_node_id for r in replies) == sorted(
            n for p, n in node_of.items() if p != FORGET)  # remaining devices only
        states = [from_record(r.content["arrays"]) for r in replies]
        counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
        # each device's update in the padded r_max space; they DO point along d
        updates = [flat(pad_lora(s, r_max)) - theta for s in states]
        raw_cos = [_cos(u, d) for u in updates]
        device_cos.extend(raw_cos)
        # what aggregating them as they are would give
        plain = flat(AGGREGATORS[aggregation](states, counts, r_max)) - theta
        assert _cos(plain, d) > 1e-3, _cos(plain, d)  # >= 1000x the bound below

        # what the server aggregated: nothing along d ...
        step = flat(aggregates[rnd]) - theta
        assert _cos(step, d) < 1e-6, _cos(step, d)
        if aggregation == "flexlora":
            continue
        # ... and only that was removed: the weighted mean of the corrected updates
        weights = example_weights(counts)
        expected = sum(w * (u - (u @ d) / (d @ d) * d) for w, u in zip(weights, updates))
        np.testing.assert_allclose(step, expected, rtol=0, atol=1e-6 * np.abs(theta).max())
        print(f"round {rnd}: |d| {np.linalg.norm(d):.3g}, |step| {np.linalg.norm(step):.3g}, "
              f"cos(device update, d) {np.round(raw_cos, 4).tolist()}, cos(plain "
              f"aggregate, d) {_cos(plain, d):.3g}, cos(server aggregate, d) "
              f"{_cos(step, d):.2e}")

    assert max(device_cos) > 0.05, device_cos  # the devices' own updates point along d

    # the aggregate of round 3 is the global module of round 4; round 4's is the adapter
    np.testing.assert_array_equal(
        flat(aggregates[3]), flat(from_record(sent[(4, node_of[LAPTOP])].content["arrays"])))
    np.testing.assert_array_equal(
        flat(aggregates[4]), flat(plan.server_model.load_state(run_dir / "adapter", "adapter")))
