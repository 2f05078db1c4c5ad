"""S4 through the real ServerApp logic and ClientApp handlers, over an in-process grid.

The request file is on disk before the first unlearning message; downlinks in unlearning
rounds are unicast (projected update to the opting-out device, global module to the others);
recovery leaves the opting-out device out; an unfinished request is honoured after a restart,
and one whose status is set to "cancelled" no longer stops training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from inprocess_grid import InProcessGrid
from inprocess_grid import federate, prepare_run
from strategies.unlearn.steps import unlearning_step
from strategies.unlearn.strategy import GRADIENT_MESSAGE, UnlearningTargetsMissing
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.lora import truncate_lora
from edge_lam.records import from_record

FORGET = 1  # partition id of the device that opts out (an rpi5: rank 4)


def _run_config(tiny_bert, agnews, results, **extra):
    return {"model": str(tiny_bert), "data.path": str(agnews), "results-dir": str(results),
            "strategy": "unlearn", "unlearn.clients": str(FORGET), "num-server-rounds": 1,
            "unlearn.rounds": 2, "unlearn.recovery-rounds": 1, "unlearn.grad-batches": 1,
            "train.local-steps": 1, "train.batch-size": 8, "eval.max-examples": 16,
            "eval.batch-size": 16, "data.partitioner": "iid", **extra}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_request_first_then_unicast_projected_update(tiny_bert, agnews, tmp_path):
    raw = _run_config(tiny_bert, agnews, tmp_path / "results")
    grid = InProcessGrid(raw, num_nodes=4)
    forget_node = next(n for n, c in grid.contexts.items()
                       if c.node_config["partition-id"] == FORGET)
    plan = prepare_run(RunConfig.from_run_config(raw), run_id=7)
    request_file = plan.run_dir / "unlearning.json"
    seen_at_first_gradient = {}

    def check_request(msg):  # runs before each message is delivered
        if msg.metadata.message_type == GRADIENT_MESSAGE and not seen_at_first_gradient:
            seen_at_first_gradient.update(json.loads(request_file.read_text()))
            assert (plan.run_dir / "adapter-before-unlearning" / "edge_lam.json").is_file()

    grid.before_send = check_request
    run_dir = federate(grid, plan)

    # 1. the request was on disk, naming the device, before any unlearning message left
    assert seen_at_first_gradient["status"] == "unlearning"
    assert seen_at_first_gradient["clients"] == [FORGET]
    assert [f["partition_id"] for f in seen_at_first_gradient["forgotten"]] == [FORGET]
    assert seen_at_first_gradient["first_unlearning_round"] == 2

    # 2. unicast downlinks of the unlearning rounds (2 and 3)
    sent = {(rnd, m.metadata.dst_node_id): m for rnd, m in grid.sent
            if m.metadata.message_type == GRADIENT_MESSAGE}
    assert {rnd for rnd, _ in sent} == {2, 3} and len(sent) == 8
    for (rnd, node), msg in sent.items():
        objective = msg.content["config"]["objective"]
        assert objective == ("unlearn" if node == forget_node else "task")
        if rnd == 3 and node == forget_node:
            assert "update" in msg.content and "arrays" not in msg.content
        else:
            assert "arrays" in msg.content and "update" not in msg.content
    # recompute round 2's S4 step from the devices' replies: round 3's payloads must be it
    laptop = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 3)
    global_2 = from_record(sent[(2, laptop)].content["arrays"])  # laptop: rank 16 = r_max
    grads = {r.metadata.src_node_id: from_record(r.content["gradient"]) for r in grid.replies
             if r.metadata.message_type == GRADIENT_MESSAGE and "gradient" in r.content}
    # the replies of round 2 are the first four gradient replies
    round_2 = [r for r in grid.replies if r.metadata.message_type == GRADIENT_MESSAGE][:4]
    retained = [from_record(r.content["gradient"]) for r in round_2
                if r.metadata.src_node_id != forget_node]
    forget = [from_record(r.content["gradient"]) for r in round_2
              if r.metadata.src_node_id == forget_node]
    assert len(grads) == 4 and len(forget) == 1
    global_3, projected, _ = unlearning_step(global_2, retained, forget, 16,
                                             plan.cfg.unlearn.lr)
    got_update = from_record(sent[(3, forget_node)].content["update"])
    for key, value in truncate_lora(projected, 4).items():  # the rpi5 is at rank 4
        np.testing.assert_allclose(got_update[key], value, rtol=1e-5, atol=1e-7)
    for node in grid.contexts:
        if node != forget_node:
            rank = int(sent[(3, node)].content["config"]["rank"])
            got = from_record(sent[(3, node)].content["arrays"])
            for key, value in truncate_lora(global_3, rank).items():
                np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7)
    # the projected update is not the global module (it is a small step, not the weights)
    assert not np.allclose(got_update["base_model.model.classifier.weight"],
                           truncate_lora(global_3, 4)["base_model.model.classifier.weight"])

    # 3. recovery (round 4) trains the remaining devices only; results record it all
    recovery = [m.metadata.dst_node_id for rnd, m in grid.sent if rnd == 4]
    assert sorted(recovery) == sorted(n for n in grid.contexts if n != forget_node)
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["initial", "train", "unlearn", "unlearn", "recover"]
    assert rows[2]["unlearning"]["max_abs_cos_projected_vs_retained"] < 1e-6
    assert {c["role"] for c in rows[2]["clients"]} == {"retain", "forget"}
    done = json.loads(request_file.read_text())
    assert done["status"] == "done" and done["cost"]["rounds"] == 3
    assert done["cost"]["bytes_up"] > 0 and done["cost"]["wall_s"] > 0
    assert [h["status"] for h in done["history"]] == ["unlearning", "recovering", "done"]
    assert done["training_in_this_run"]["rounds"] == 1


def _pending_request(tiny_bert, agnews, results, timeout: float) -> dict:
    """Run 1 asks to forget partition 5, which never connects: the request stays pending
    under `results`. Returns that run's raw config."""
    raw = _run_config(tiny_bert, agnews, results, **{"unlearn.clients": "5",
                                                      "unlearn.aggregation": "fedavg",
                                                      "lora.fedavg-rank": 4,
                                                      "unlearn.rounds": 1,
                                                      "round-timeout": timeout})
    plan = prepare_run(RunConfig.from_run_config(raw), run_id=1)
    with pytest.raises(UnlearningTargetsMissing, match=r"\[5\]"):
        federate(InProcessGrid(raw, num_nodes=3), plan)
    return raw


def test_unfinished_request_is_honoured_after_a_restart(tiny_bert, agnews, tmp_path):
    results = tmp_path / "results"
    # first server: the opting-out device (partition 5) is not connected -> request stays
    raw = _pending_request(tiny_bert, agnews, results, timeout=2.0)
    first = json.loads((results / "1" / "unlearning.json").read_text())
    assert first["status"] == "pending" and first["not_connected"] == [5]

    # a restarted server that would just train refuses, naming the request and the fix
    plain = {k: v for k, v in raw.items() if not k.startswith("unlearn.")} | {
        "strategy": "fedavg"}
    with pytest.raises(ConfigError, match=r"unlearning\.json asks to forget devices \[5\]"):
        prepare_run(RunConfig.from_run_config(plain), run_id=2)

    # strategy='unlearn' resumes it from the saved adapter, without training first
    plan = prepare_run(RunConfig.from_run_config(raw), run_id=3)
    assert plan.cfg.training_rounds == 0 and plan.resumes is not None
    run_dir = federate(InProcessGrid(raw, num_nodes=6), plan)
    done = json.loads((run_dir / "unlearning.json").read_text())
    assert done["status"] == "done" and done["source"]["resumes"].endswith(
        "1/unlearning.json")
    assert [f["partition_id"] for f in done["forgotten"]] == [5]
    assert json.loads((results / "1" / "unlearning.json").read_text())["status"] == "resumed"
    assert [r["phase"] for r in _rows(run_dir)] == ["initial", "unlearn", "recover"]
    assert prepare_run(RunConfig.from_run_config(plain), run_id=4).resumes is None


def test_cancelled_request_lets_training_go_ahead(tiny_bert, agnews, tmp_path):
    results = tmp_path / "results"
    # an unfinished request: the opting-out device (partition 5) never connects
    raw = _pending_request(tiny_bert, agnews, results, timeout=1.0)
    request_file = results / "1" / "unlearning.json"
    assert json.loads(request_file.read_text())["status"] == "pending"

    # while it is unfinished, training refuses (other strategy, or other devices to forget)
    plain = {k: v for k, v in raw.items() if not k.startswith("unlearn.")} | {
        "strategy": "fedavg"}
    other = raw | {"unlearn.clients": "2"}
    for config in (plain, other):
        with pytest.raises(ConfigError, match=r"asks to forget devices \[5\].*cancelled"):
            prepare_run(RunConfig.from_run_config(config), run_id=2)

    # the operator cancels it (docs/unlearning-dp.md: set its "status" to "cancelled")
    request = json.loads(request_file.read_text())
    request["status"] = "cancelled"
    request_file.write_text(json.dumps(request))
    plan = prepare_run(RunConfig.from_run_config(plain), run_id=2)
    assert plan.resumes is None
    run_dir = federate(InProcessGrid(plain, num_nodes=3), plan)
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["initial", "train"]
    assert len(rows[1]["clients"]) == 3 and rows[1]["rejected"] == 0
    assert (run_dir / "adapter" / "edge_lam.json").is_file()
    assert not (run_dir / "unlearning.json").exists()
    assert json.loads(request_file.read_text())["status"] == "cancelled"  # left as it was
    # a new unlearning request for other devices starts afresh (trains first, no resume)
    fresh = prepare_run(RunConfig.from_run_config(other), run_id=3)
    assert fresh.resumes is None and fresh.cfg.training_rounds == 1

    # cancelling one request does not cancel another: an older unfinished one still counts
    older = results / "0"
    older.mkdir()
    (older / "unlearning.json").write_text(json.dumps(request | {"status": "recovering",
                                                                 "clients": [4]}))
    with pytest.raises(ConfigError, match=r"asks to forget devices \[4\].*'recovering'"):
        prepare_run(RunConfig.from_run_config(plain), run_id=4)
