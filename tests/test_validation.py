"""Replies are validated before aggregation: bad ones are rejected, counted and left out."""

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.lora.diagnostics import check_reply
from strategies.lora.strategy import HeterogeneousLoRA, NodeProfile
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import truncate_lora
from edge_lam.records import from_record, to_record

L = "m.layer.0.query"


def global_state(r_max=16):
    rng = np.random.default_rng(0)
    return {f"{L}.lora_A.weight": rng.normal(size=(r_max, 8)).astype(np.float32),
            f"{L}.lora_B.weight": rng.normal(size=(8, r_max)).astype(np.float32),
            "m.classifier.weight": rng.normal(size=(4, 8)).astype(np.float32)}


def test_check_reply_accepts_sound_state():
    sent = truncate_lora(global_state(), 4)
    assert check_reply(sent, sent, 4, 10) is None


@pytest.mark.parametrize("mutate, n, reason", [
    (lambda s: s.pop("m.classifier.weight"), 10, "wrong keys"),
    (lambda s: s.update(extra=np.zeros(2, np.float32)), 10, "wrong keys"),
    (lambda s: s.update({f"{L}.lora_A.weight": np.zeros((8, 8), np.float32)}), 10, "wrong rank"),
    (lambda s: s.update({"m.classifier.weight": np.zeros((3, 8), np.float32)}), 10, "wrong shape"),
    (lambda s: s[f"{L}.lora_B.weight"].__setitem__((0, 0), np.nan), 10, "non-finite"),
    (lambda s: s[f"{L}.lora_B.weight"].__setitem__((0, 0), np.inf), 10, "non-finite"),
    (lambda s: None, None, "num-examples"),
    (lambda s: None, 0, "num-examples"),
    (lambda s: None, 2.5, "num-examples"),
])
def test_check_reply_rejects(mutate, n, reason):
    sent = truncate_lora(global_state(), 4)
    reply = {k: v.copy() for k, v in sent.items()}
    mutate(reply)
    assert reason in check_reply(reply, sent, 4, n)


@pytest.fixture
def strategy():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = RunConfig(strategy="hetlora")
    s = HeterogeneousLoRA(cfg, ("a", "b", "c", "d"))
    state = global_state(cfg.r_max)
    for node, device in ((1, "rpi4"), (2, "laptop"), (3, "rpi5")):
        s.profiles[node] = NodeProfile(node, device, node - 1, cfg.rank_for(device))
    sent = {}
    for node, p in s.profiles.items():
        sub = truncate_lora(state, p.rank)
        s._sent[node] = (sub, 123)
        sent[node] = sub
    return s, sent


def _request(node):
    TaskIdentity.node_id = 0
    return Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(node, state, n):
    req = _request(node)
    TaskIdentity.node_id = node
    content = RecordDict({"arrays": to_record(state),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=req)


def test_aggregate_leaves_out_bad_replies(strategy):
    s, sent = strategy
    rounds = []
    s.on_train_round = lambda rnd, info: rounds.append(info)
    bad = dict(sent[3])
    bad[f"{L}.lora_A.weight"] = np.full_like(bad[f"{L}.lora_A.weight"], np.nan)
    req = _request(2)
    TaskIdentity.node_id = 2
    err = Message(Error(code=1, reason="out of memory"), reply_to=req)
    arrays, metrics = s.aggregate_train(1, [_reply(1, sent[1], 10), err, _reply(3, bad, 5)])
    info = rounds[-1]
    assert info["rejected"] == 2
    assert {r["node_id"] for r in info["rejections"]} == {2, 3}
    assert [c["node_id"] for c in info["clients"]] == [1]
    assert info["clients"][0]["rank"] == 2 and info["clients"][0]["bytes_down"] == 123
    out = from_record(arrays)
    # only node 1 (rank 2) was accepted: the aggregate is its state zero-padded to r_max
    np.testing.assert_allclose(out[f"{L}.lora_A.weight"][:2], sent[1][f"{L}.lora_A.weight"])
    assert not out[f"{L}.lora_A.weight"][2:].any()
    assert metrics["accepted"] == 1


class ScriptedGrid:
    """A Grid whose devices answer each TRAIN message with `answer(round, node, state sent)`
    (a RecordDict), so Flower's own round loop (Strategy.start) runs against the strategy."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer = list(nodes), answer
        self.sent: dict[int, dict[int, dict[str, bytes]]] = {}  # round -> node -> wire bytes

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            rnd = int(msg.content["config"]["server-round"])
            record = msg.content["arrays"]
            self.sent.setdefault(rnd, {})[node] = wire(record)
            TaskIdentity.node_id = node
            try:
                replies.append(Message(self.answer(rnd, node, from_record(record)),
                                       reply_to=msg))
            finally:
                TaskIdentity.node_id = 0
        return replies


def wire(record) -> dict[str, bytes]:
    """An ArrayRecord as the bytes Flower serialises for each array."""
    return {k: bytes(a.data) for k, a in record.items()}


def test_round_with_only_rejected_replies_keeps_previous_model(strategy):
    """Flower's FedAvg.start loop, 3 rounds: round 1 trains, every reply of round 2 is
    rejected, round 3 trains again. After round 2 the global model is round 1's, byte for
    byte, and round 3 sends every device exactly what round 2 sent it."""
    s, _ = strategy
    rounds = {}
    s.on_train_round = rounds.__setitem__
    rng = np.random.default_rng(1)

    def answer(rnd, node, sent):
        good = {k: v + rng.normal(scale=0.1, size=v.shape).astype(np.float32)
                for k, v in sent.items()}
        if rnd != 2:
            state, n = good, 10
        elif node == 1:  # assigned rank 2, answers at rank 8
            state, n = truncate_lora(global_state(), 8), 10
        elif node == 2:  # no examples
            state, n = good, 0
        else:  # a NaN
            state, n = good, 5
            state[f"{L}.lora_B.weight"][0, 0] = np.nan
        return RecordDict({"arrays": to_record(state),
                           "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})

    grid = ScriptedGrid(s.profiles, answer)
    evaluated = {}

    def evaluate_fn(rnd, arrays):
        evaluated[rnd] = wire(arrays)

    initial = to_record(global_state(s.cfg.r_max))
    result = s.start(grid=grid, initial_arrays=initial, num_rounds=3, evaluate_fn=evaluate_fn)

    assert [rounds[r]["rejected"] for r in (1, 2, 3)] == [0, 3, 0]
    assert rounds[2]["clients"] == [] and rounds[2]["aggregation_error"] is None
    reasons = {r["node_id"]: r["reason"] for r in rounds[2]["rejections"]}
    assert sorted(reasons) == [1, 2, 3] and "wrong rank" in reasons[1]
    assert "num-examples" in reasons[2] and "non-finite" in reasons[3]
    assert evaluated[1] != evaluated[0]  # round 1 changed the model
    assert evaluated[2] == evaluated[1]  # round 2 kept it, byte for byte
    assert set(grid.sent[2]) == set(grid.sent[3]) == {1, 2, 3}
    for node in (1, 2, 3):  # and round 3 trained from it
        assert grid.sent[3][node] == grid.sent[2][node]
    assert evaluated[3] != evaluated[2]  # round 3 trained again
    assert wire(result.arrays) == evaluated[3]


def test_superlink_error_for_a_vanished_device_is_attributed_to_that_device(strategy):
    """A device that stops heart-beating gets an error reply written by the SuperLink (node 1)."""
    s, sent = strategy
    rounds = []
    s.on_train_round = lambda rnd, info: rounds.append(info)
    req = _request(2)
    req.metadata.__dict__["_message_id"] = "train-msg-to-node-2"  # what pushing sets
    s._outbox = [req]
    err = Message(Error(code=3, reason="Node Unavailable"), reply_to=req)
    err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for the dead node
    assert err.metadata.src_node_id == 1
    s.aggregate_train(2, [_reply(1, sent[1], 10), _reply(3, sent[3], 5), err])
    info = rounds[-1]
    assert info["rejections"] == [{"node_id": 2, "reason": "device error: Node Unavailable"}]
    assert info["missing"] == [] and len(info["clients"]) == 2
