"""`mode='infer'` end to end with tiny Llamas through the real ClientApp: every device
answers every batch, the server combines, a failing / malformed / adversarial device is left
out or loses trust, and the results land in results/<run-id>/."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from inprocess_grid import InProcessGrid
from server_app import modes
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.serving.generation import final_number
from edge_lam.records import to_record


@pytest.fixture()
def small_agnews(agnews, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").symlink_to(agnews / "train.tsv")
    lines = (agnews / "test.tsv").read_text().splitlines()
    (data / "test.tsv").write_text("\n".join(lines[:41]) + "\n")
    return data


def _raw(model, data, tmp_path, **extra):
    return {"mode": "infer", "task": "lm-cls", "model": str(model), "data.path": str(data),
            "data.label-words": "Business,Sci/Tech,Sports,World", "eval.max-examples": 0,
            "infer.batch-size": 8, "infer.calibration": 8, "results-dir": str(tmp_path / "r"),
            **extra}


def _run(grid, raw, run_id=7):
    ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                  run_config=raw)
    return modes.get("infer")(grid, ctx, RunConfig.from_run_config(raw))


def test_infer_combines_the_members_and_distrusts_the_adversary(tiny_llama, learnable_llama,
                                                                 small_agnews, tmp_path):
    raw = _raw(tiny_llama, small_agnews, tmp_path, **{
        "infer.members": f"{tiny_llama},{learnable_llama},{tiny_llama}",
        "infer.attack": "wrong", "infer.attackers": "3"})
    grid = InProcessGrid(raw, num_nodes=4)
    run_dir = _run(grid, raw)
    report = json.loads((run_dir / "infer.json").read_text())
    assert report["queries"] == 40 and report["calibration"] == 8
    names = [m["member"] for m in report["members"]]
    assert len(names) == 4 and names[1].endswith(str(learnable_llama))
    assert all(m["answered"] == 40 and m["seconds_per_query"] > 0 for m in report["members"])
    # members 0 and 3 run the same model: the attacker always answers something else
    rows = [json.loads(x) for x in (run_dir / "infer_queries.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    assert all(r["members"][names[3]] != r["members"][names[0]] for r in rows)
    trust = np.array(report["trust"])
    assert trust.shape == (6, 4) and trust[-1, 3] < 0.2 < trust[-1, :3].min()
    methods = {m["method"]: m for m in report["methods"]}
    assert set(methods) == {"majority vote", "weighted vote (q_i)", "log-odds weighted vote",
                            "mean probabilities", "geometric mean probabilities",
                            "trust-weighted consensus"}
    assert all(0 <= m["accuracy"] <= 1 for m in methods.values())
    cascade = report["cascade"]
    assert cascade["chosen"]["calibration_accuracy"] >= cascade["curve"][-1][
        "calibration_accuracy"] - 0.01 - 1e-9 or cascade["chosen"] == cascade["curve"][-1]
    assert (run_dir / "plots" / "infer_cascade.png").is_file()
    assert (run_dir / "plots" / "infer_trust.png").is_file()
    # every batch went to every device as a QUERY of type query.infer
    sent = [m for _, m in grid.sent if m.metadata.message_type == "query.infer"]
    assert len(sent) == 5 * 4


class FlakyGrid(InProcessGrid):
    """Node 1002 never answers batch 1; node 1003 sends a malformed answer in batch 2."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        batch = messages[0].content["config"].get("batch", -1) if messages else -1
        keep = [m for m in messages if not (batch == 1 and m.metadata.dst_node_id == 1002)]
        replies = super().send_and_receive(keep, timeout=timeout)
        for reply in replies:
            if batch == 2 and reply.metadata.src_node_id == 1003:
                reply.content["answers"] = to_record({"probs": np.ones((3, 4), np.float32)})
        return replies


def test_a_failing_device_is_left_out_and_the_job_completes(tiny_llama, small_agnews,
                                                             tmp_path):
    raw = _raw(tiny_llama, small_agnews, tmp_path)
    run_dir = _run(FlakyGrid(raw, num_nodes=3), raw)
    report = json.loads((run_dir / "infer.json").read_text())
    reasons = {(f["member"].split(":")[0], f["batch"]): f["reason"] for f in report["failures"]}
    assert reasons[("node 1002", 1)] == "no answer in time"
    assert "malformed answer" in reasons[("node 1003", 2)]
    answered = {m["member"].split(":")[0]: m["answered"] for m in report["members"]}
    assert answered == {"node 1001": 40, "node 1002": 32, "node 1003": 32}
    assert len(report["methods"]) == 6


def test_infer_needs_a_task_that_answers(tiny_llama, small_agnews, tmp_path):
    raw = _raw(tiny_llama, small_agnews, tmp_path, task="seq-cls")
    with pytest.raises(ConfigError, match="task='lm-cls'.*task='causal-lm'"):
        _run(InProcessGrid(raw, num_nodes=2), raw)


@pytest.fixture()
def small_gsm8k(tmp_path):
    rows = ["prompt\tresponse"] + [f"What is {i} plus {i + 1}?\t{i} + {i + 1} = {2 * i + 1}"
                                    f"\\n#### {2 * i + 1}" for i in range(12)]
    data = tmp_path / "gsm"
    data.mkdir()
    for name in ("train.tsv", "test.tsv"):
        (data / name).write_text("\n".join(rows) + "\n")
    return data


class TamperingGrid(InProcessGrid):
    """Node 1002's generation reply in batch 1 has a log-probability too few."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        batch = messages[0].content["config"].get("batch", -1) if messages else -1
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if batch == 1 and reply.metadata.src_node_id == 1002:
                got = {k: v.numpy() for k, v in reply.content["answers"].items()}
                reply.content["answers"] = to_record({"logprobs": got["logprobs"][1:],
                                                      "lengths": got["lengths"]})
        return replies


def test_generated_answers_vote_on_their_final_number(tiny_llama, small_gsm8k, tmp_path):
    raw = {"mode": "infer", "task": "causal-lm", "model": str(tiny_llama),
           "data.path": str(small_gsm8k), "eval.max-examples": 0, "eval.max-new-tokens": 6,
           "infer.batch-size": 4, "infer.calibration": 4, "infer.attack": "wrong",
           "infer.attackers": "2,3", "results-dir": str(tmp_path / "r")}
    grid = TamperingGrid(raw, num_nodes=4)
    run_dir = _run(grid, raw)
    report = json.loads((run_dir / "infer.json").read_text())
    assert report["queries"] == 12 and report["calibration"] == 4
    assert [f["batch"] for f in report["failures"]] == [1]
    assert "malformed answer" in report["failures"][0]["reason"]
    names = [m["member"] for m in report["members"]]
    assert [m["answered"] for m in report["members"]] == [12, 8, 12, 12]
    rows = [json.loads(x) for x in (run_dir / "infer_queries.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["reference"].endswith("#### 1")
    for r in rows:
        honest, a, b = r["answers"][names[0]], r["answers"][names[2]], r["answers"][names[3]]
        assert isinstance(honest, str) and len(honest) > 0
        # the two attackers collude: one made-up number, both of them, full confidence
        assert a == b and a.startswith("#### ") and r["members"][names[2]] == \
            r["members"][names[3]]
        # members 0 and 1 run the same model greedily: the same text. Without a number it
        # is no answer and agrees with nothing; with one, 2 against 2 ties and majority
        # goes to the first candidate (member 0's). The confidence-weighted mean always
        # follows the attackers' certainty (a tiny random model is never sure).
        bad = r["members"][names[2]]
        if 4 <= r["query"] < 8 or final_number(honest) is None:
            assert r["combined"]["majority vote"] == bad
        else:
            assert r["combined"]["majority vote"] == r["members"][names[0]] == 0 != bad
        assert r["combined"]["mean probabilities"] == bad
        assert r["label"] == -1  # a random tiny model gives no right answer
    methods = {m["method"]: m["accuracy"] for m in report["methods"]}
    assert len(methods) == 6 and all(v == 0.0 for v in methods.values())


def test_a_live_cascade_of_generated_answers(tiny_llama, small_gsm8k, tmp_path):
    raw = {"mode": "infer", "task": "causal-lm", "model": str(tiny_llama),
           "data.path": str(small_gsm8k), "eval.max-examples": 0, "eval.max-new-tokens": 4,
           "infer.batch-size": 4, "infer.calibration": 4, "infer.method": "cascade",
           "infer.cascade-loss": 1.0, "results-dir": str(tmp_path / "r")}
    grid = InProcessGrid(raw, num_nodes=2)
    run_dir = _run(grid, raw)
    report = json.loads((run_dir / "infer.json").read_text())
    assert report["cascade_live"]["queries"] == 8 and report["cascade_live"]["escalated"] == 0
    queries = [m for _, m in grid.sent if m.metadata.message_type == "query.infer"]
    assert len(queries) == 2 + 2  # calibration to both, then 2 batches to the cheapest
    rows = [json.loads(x) for x in (run_dir / "infer_queries.jsonl").read_text().splitlines()]
    assert all(len(r["answers"]) == 1 and r["reference"].startswith(str(r["query"]))
               for r in rows)


def test_a_live_cascade_asks_the_others_only_about_unsure_queries(tiny_llama, learnable_llama,
                                                                   small_agnews, tmp_path):
    # cascade-loss 1: any accuracy will do, so the cheapest threshold wins: after calibration
    # only the cheapest device is asked (confidence >= the lowest threshold)
    raw = _raw(tiny_llama, small_agnews, tmp_path, **{"infer.method": "cascade",
                                                       "infer.cascade-loss": 1.0})
    grid = InProcessGrid(raw, num_nodes=3)
    run_dir = _run(grid, raw)
    report = json.loads((run_dir / "infer.json").read_text())
    live = report["cascade_live"]
    assert report["calibration"] == 8 and live["queries"] == 32
    # (seconds are measured: on a busy machine the saving is noisy, the messages are not)
    assert live["escalated"] == 0.0 and live["seconds_per_query"] > 0
    queries = [m for _, m in grid.sent if m.metadata.message_type == "query.infer"]
    # calibration: one batch to all 3; then 4 batches to the cheapest device alone
    assert len(queries) == 3 + 4
    cheapest = report["plan"]["order"][0].split(":")[0]
    assert {f"node {m.metadata.dst_node_id}" for m in queries[3:]} == {cheapest}
    rows = [json.loads(x) for x in (run_dir / "infer_queries.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(r["members_asked"] == 1 and r["stage"] == 0 for r in rows)
    # cascade-loss 0, members that disagree (two models), costs set by the reported seconds:
    # the cheapest goes first, and the plan reaches everyone's calibration accuracy
    raw = _raw(tiny_llama, small_agnews, tmp_path / "b", **{
        "infer.method": "cascade", "infer.cascade-loss": 0.0,
        "infer.members": f"{tiny_llama},{learnable_llama},{tiny_llama}"})

    class Timed(InProcessGrid):  # node 1002 (the learnable model) reports the fewest seconds
        def send_and_receive(self, messages, *, timeout=None):
            from flwr.app import MetricRecord
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                for name, record in list(reply.content.metric_records.items()):
                    if "seconds" in record:
                        seconds = {1001: 2.0, 1002: 0.5, 1003: 1.0}[reply.metadata.src_node_id]
                        reply.content[name] = MetricRecord({**dict(record),
                                                            "seconds": seconds})
            return replies

    run_dir = _run(Timed(raw, num_nodes=3), raw, run_id=8)
    plan = json.loads((run_dir / "infer.json").read_text())["plan"]
    assert plan["order"][0].startswith("node 1002")  # the cheapest goes first
    assert plan["calibration_accuracy"] >= plan["everyone_accuracy"]  # cascade-loss 0
    rows = [json.loads(x) for x in (run_dir / "infer_queries.jsonl").read_text().splitlines()]
    assert all(1 <= r["members_asked"] <= 3 for r in rows)
    assert all((r["stage"] == 0) == (r["members_asked"] == 1) for r in rows)
    # (on random tiny models the cheapest may already match everyone: whether any query
    # escalates is not fixed here; test_infer_combine forces escalation with set answers)
    escalated = [r for r in rows if r["members_asked"] > 1]
    live = json.loads((run_dir / "infer.json").read_text())["cascade_live"]
    assert live["escalated"] == pytest.approx(len(escalated) / len(rows))
