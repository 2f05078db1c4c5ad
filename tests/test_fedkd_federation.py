"""S3 server side: per-task heads, backbone over all, compressed updates both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.fedkd.math import (aggregate_fedkd, decode_update, device_view, encode_update,
                              energy_threshold, global_state, is_compressed, payload_nbytes,
                              task_names)
from strategies.fedkd.strategy import FedKDProfile, FedKDStrategy
from strategies.fedkd.config import local_module_config, task_config
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.lora import state_nbytes
from edge_lam.records import from_record, record_nbytes, to_record

L = "m.layer.0.query"
A, B = f"{L}.lora_A.weight", f"{L}.lora_B.weight"
W, BIAS = "m.classifier.weight", "m.classifier.bias"


def device_state(seed: int, classes: int, rank: int = 4, hidden: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    return {A: rng.normal(size=(rank, hidden)).astype(np.float32),
            B: rng.normal(size=(hidden, rank)).astype(np.float32),
            W: rng.normal(size=(classes, hidden)).astype(np.float32),
            BIAS: rng.normal(size=(classes,)).astype(np.float32)}


def rel_error(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(np.sum((x - y) ** 2) / np.sum(x**2))


# ---------------------------------------------------------------------------- aggregation

def test_heads_average_within_a_task_only_backbone_over_all():
    # 'senti' and 'spam' both have 2 labels: same shapes, still never averaged together
    previous = global_state(device_state(0, 4), {"news": device_state(0, 4),
                                                 "senti": device_state(1, 2),
                                                 "spam": device_state(2, 2),
                                                 "idle": device_state(3, 3)})
    assert task_names(previous) == ["idle", "news", "senti", "spam"]
    tasks, counts = ["news", "senti", "news", "spam"], [10, 20, 30, 40]
    s = [device_state(10, 4), device_state(11, 2), device_state(12, 4), device_state(13, 2)]
    out = aggregate_fedkd(s, counts, tasks, previous)

    expected_a = sum(n * x[A].astype(np.float64) for n, x in zip(counts, s)) / 100
    np.testing.assert_allclose(out[A], expected_a, rtol=1e-5, atol=1e-6)  # all four devices
    news = (10 * s[0][W].astype(np.float64) + 30 * s[2][W]) / 40
    np.testing.assert_allclose(out[f"head/news/{W}"], news, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[f"head/senti/{W}"], s[1][W])  # only its own device
    np.testing.assert_array_equal(out[f"head/spam/{BIAS}"], s[3][BIAS])
    np.testing.assert_array_equal(out[f"head/idle/{W}"], previous[f"head/idle/{W}"])
    assert set(out) == set(previous)

    view = device_view(out, "senti")
    assert set(view) == {A, B, W, BIAS} and view[W].shape == (2, 64)
    with pytest.raises(ValueError, match="no head for task 'chess'"):
        device_view(out, "chess")


def test_aggregate_rejects_a_head_the_task_does_not_have():
    previous = global_state(device_state(0, 4), {"news": device_state(0, 4)})
    odd = {**device_state(1, 4), "m.extra.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="lacks"):
        aggregate_fedkd([odd], [5], ["news"], previous)


# ---------------------------------------------------------------------------- compression

def lora_update(reference: dict, seed: int, scale: float = 0.05) -> dict:
    """reference + a near-low-rank update (a rank-1 change plus a little noise)."""
    rng = np.random.default_rng(seed)
    new = {}
    for key, value in reference.items():
        if value.ndim == 2:
            u, v = rng.normal(size=(value.shape[0], 1)), rng.normal(size=(1, value.shape[1]))
            step = scale * (u @ v + 0.05 * rng.normal(size=value.shape))
        else:
            step = scale * rng.normal(size=value.shape)
        new[key] = (value + step).astype(value.dtype)
    return new


@pytest.mark.parametrize("energy", [0.95, 0.98])
def test_compressed_update_is_smaller_and_within_the_threshold(energy):
    reference = device_state(0, 4, rank=8, hidden=128)
    target = lora_update(reference, seed=1)
    payload = encode_update(target, reference, energy)
    assert is_compressed(payload)
    assert payload_nbytes(payload) < 0.5 * state_nbytes(target)
    assert record_nbytes(to_record(payload)) < record_nbytes(to_record(target))  # on the wire
    got = decode_update(payload, reference)
    assert set(got) == set(target)
    for key in target:  # S3: ||delta - delta_hat||^2 <= (1 - energy) ||delta||^2
        delta, delta_hat = target[key] - reference[key], got[key] - reference[key]
        assert rel_error(delta, delta_hat) <= 1 - energy + 1e-5
        assert got[key].dtype == np.float32 and got[key].shape == target[key].shape


def test_uncompressed_and_first_payloads_are_the_state_itself():
    target = device_state(3, 2)
    for payload in (encode_update(target, None, 0.95), encode_update(target, target, None)):
        assert not is_compressed(payload) and set(payload) == set(target)
        got = decode_update(payload, None)
        assert all(np.array_equal(got[k], target[k]) for k in target)
    with pytest.raises(ValueError, match="hold no state"):
        decode_update(encode_update(target, device_state(4, 2), 0.95), None)
    with pytest.raises(ValueError, match="do not match"):
        decode_update(encode_update(target, device_state(4, 2), 0.95), device_state(4, 3) | {
            "m.other.weight": np.ones((2, 2), np.float32)})


# ---------------------------------------------------------------------------- strategy

LABELS = {"news": ("a", "b", "c", "d"), "senti": ("neg", "pos")}


@pytest.fixture
def strategy():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = RunConfig.from_run_config({"strategy": "fedkd", "fedkd.compress": True,
                                     "num-server-rounds": 3, "fedkd.shared-rank": 8})
    s = FedKDStrategy(cfg, LABELS)
    for node, task in ((1, "news"), (2, "senti"), (3, "news")):
        s.profiles[node] = FedKDProfile(node, "rpi4", node - 1, 8, task)
    g = global_state(device_state(0, 4, rank=8, hidden=128),
                     {"news": device_state(1, 4, hidden=128),
                      "senti": device_state(2, 2, hidden=128)})
    return s, g


def _round(s: FedKDStrategy, g: dict, server_round: int) -> dict:
    """configure_train's per-node part: what each node is sent (and how big it is)."""
    s._global = g
    sent = {}
    for node in s.profiles:
        payload, expected, extra = s._downlink(node, g, server_round)
        s._sent[node] = (expected, record_nbytes(to_record(payload)))
        sent[node] = (payload, expected, extra)
    return sent


def _reply(node: int, payload: dict, n: int) -> Message:
    TaskIdentity.node_id = 0
    req = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    metrics = MetricRecord({"num-examples": n, "train-loss": 0.5, "local-loss": 0.4,
                            "local-accuracy": 0.75})
    return Message(RecordDict({"arrays": to_record(payload), "metrics": metrics}), reply_to=req)


def test_strategy_compresses_after_round_one_and_keeps_heads_apart(strategy):
    s, g = strategy
    infos = []
    s.on_train_round = lambda rnd, info: infos.append(info)
    sent = _round(s, g, 1)
    for node, (payload, expected, extra) in sent.items():  # round 1: whole shared module
        assert not is_compressed(payload) and extra["base-round"] == 0
        assert extra["energy"] == pytest.approx(0.95)
        assert extra["label-names"] == list(LABELS[s.profiles[node].task])
    trained = {node: lora_update(sent[node][1], seed=node) for node in sent}
    replies = [_reply(node, encode_update(trained[node], sent[node][1], 0.95), 10 * node)
               for node in sent]
    arrays, _ = s.aggregate_train(1, replies)
    new = from_record(arrays)
    info = infos[-1]
    assert info["rejected"] == 0 and {c["task"] for c in info["clients"]} == {"news", "senti"}
    assert all(c["compressed_up"] and not c["compressed_down"] and c["local_accuracy"] == 0.75
               for c in info["clients"])
    assert all(c["bytes_up"] < c["bytes_down"] for c in info["clients"])
    # the senti head is node 2's reconstructed head alone; news = nodes 1 and 3 (n = 10, 30)
    rec = {n: decode_update(from_record(m.content["arrays"]), sent[n][1])
           for n, m in zip(sent, replies)}
    np.testing.assert_allclose(new[f"head/senti/{W}"], rec[2][W], rtol=1e-6)
    np.testing.assert_allclose(new[f"head/news/{W}"], (rec[1][W] + 3 * rec[3][W]) / 4,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[A], (rec[1][A] + 2 * rec[2][A] + 3 * rec[3][A]) / 6,
                               rtol=1e-5, atol=1e-6)

    sent2 = _round(s, new, 2)  # round 2: updates against what each node holds
    for node, (payload, expected, extra) in sent2.items():
        assert is_compressed(payload) and extra["base-round"] == 1
        assert extra["energy"] == pytest.approx(energy_threshold(2, 3))
        assert s._sent[node][1] < record_nbytes(to_record(device_view(new, s.profiles[node].task)))
        np.testing.assert_array_equal(expected[W], decode_update(payload, sent[node][1])[W])

    # a node whose round failed may hold anything: it gets the whole module again
    TaskIdentity.node_id = 0
    req = Message(RecordDict({}), dst_node_id=2, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 2
    s.aggregate_train(2, [Message(Error(code=1, reason="disk full"), reply_to=req)])
    sent3 = _round(s, new, 3)
    assert not is_compressed(sent3[2][0]) and sent3[2][2]["base-round"] == 0
    assert is_compressed(sent3[1][0]) and sent3[1][2]["base-round"] == 2


def test_strategy_rejects_a_reply_with_the_wrong_head(strategy):
    s, g = strategy
    infos = []
    s.on_train_round = lambda rnd, info: infos.append(info)
    s.cfg = RunConfig.from_run_config({"strategy": "fedkd", "fedkd.compress": False,
                                       "num-server-rounds": 3})
    sent = _round(s, g, 1)
    wrong = dict(sent[2][1])
    wrong[W] = np.zeros((4, 128), np.float32)  # a 4-label head from a 2-label device
    arrays, _ = s.aggregate_train(1, [_reply(2, wrong, 5), _reply(1, sent[1][1], 5)])
    assert infos[-1]["rejected"] == 1 and "wrong shape" in infos[-1]["rejections"][0]["reason"]
    out = from_record(arrays)
    np.testing.assert_array_equal(out[f"head/senti/{W}"], g[f"head/senti/{W}"])  # kept


# ---------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("raw, message", [
    ({"fedkd.task-mix": "agnews,chess"}, r"fedkd\.task\.chess\.path"),
    ({"fedkd.adaptive": "yes"}, r"fedkd\.adaptive must be true or false"),
    ({"fedkd.task.agnews.pth": "/x"}, r"unknown run-config key\(s\) fedkd\.task\.agnews\.pth"),
    ({"fedkd.task.news.text-column": "body"}, r"fedkd\.task\.news\.path is missing"),
    ({"fedkd.task.bad name.path": "/x"}, r"fedkd\.task\.bad name: task names"),
    ({"fedkd.energy-start": 1.5}, r"fedkd\.energy-start"),
    ({"fedkd.local-rank": 0}, r"fedkd\.local-rank"),
    ({"strategy": "fedkd", "task": "lm-cls", "fedkd.hidden-mse": True},
     r"fedkd\.hidden-mse=true pairs encoder layers: it needs task='seq-cls', not 'lm-cls'"),
])
def test_bad_fedkd_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(raw)


def test_task_mix_assigns_tasks_and_partitions_within_each_task():
    cfg = RunConfig.from_run_config({"strategy": "fedkd", "fedkd.task.news.path": "/data/news",
                                     "fedkd.task-mix": "news,sst2,sst2"})
    assert cfg.fedkd.task_names == ("news", "sst2") and cfg.r_max == cfg.fedkd.shared_rank == 8
    assert [cfg.fedkd.task_partition(k, 6) for k in range(6)] == [
        ("news", 0, 2), ("sst2", 0, 4), ("sst2", 1, 4), ("news", 1, 2), ("sst2", 2, 4),
        ("sst2", 3, 4)]
    assert task_config(cfg, "news").data.path == "/data/news"
    assert task_config(cfg, "news").data.text_column == "auto"
    local = local_module_config(cfg, "sst2")
    assert local.r_max == 16 and local.model == cfg.model and local.data.text_column == "sentence"
    assert cfg.fedkd.task_for(0, reported="sst2") == "sst2"
    with pytest.raises(ConfigError, match="not in fedkd.task-mix"):
        cfg.fedkd.task_for(0, reported="agnews")
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
