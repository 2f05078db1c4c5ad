"""S3 on a device: the private local module never leaves it and survives a restart."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import edge_lam.models.lora_model
from strategies.fedkd.device import train as train_fedkd
from edge_lam.training.device import DeviceInfo, local_examples
from strategies.fedkd.device import (LOCAL, SHARED, DeviceStore, device_task, load_local_module,
                              receive_shared, train_modules)
from strategies.fedkd.evaluation import FedKDServer
from strategies.fedkd.math import SEP, device_view, encode_update, is_compressed
from strategies.fedkd.config import local_module_config
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import load_split_frames
from edge_lam.training.lora import lora_rank
from edge_lam.models.lora_model import get_trainable_state, initial_lora_state, load_tokenizer
from edge_lam.records import from_record, to_record


@pytest.fixture
def raw_config(tiny_bert, mixed_tasks, tmp_path):
    return {"strategy": "fedkd", "model": str(tiny_bert),
            "fedkd.task.agnews.path": str(mixed_tasks["agnews"]),
            "fedkd.task.sst2.path": str(mixed_tasks["sst2"]),
            "fedkd.shared-rank": 4, "fedkd.local-rank": 8, "fedkd.hidden-mse": True,
            "fedkd.state-dir": str(tmp_path / "state"), "fedkd.device-eval-examples": 16,
            "train.local-steps": 2, "train.batch-size": 8, "eval.max-examples": 32,
            "num-server-rounds": 3}


@pytest.fixture
def fedkd(raw_config):
    cfg = RunConfig.from_run_config(raw_config)
    server = FedKDServer.prepare(cfg)
    return cfg, server, server.initial_state()


def _train_message(global_state, task, labels, server_round, base_round=0, energy=0.0,
                   reference=None):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    view = device_view(global_state, task)
    payload = encode_update(view, reference, energy or None)
    config = ConfigRecord({"server-round": server_round, "task": task, "rank": 4,
                           "label-names": list(labels), "base-round": base_round,
                           "energy": energy, "device": "rpi5"})
    msg = Message(RecordDict({"arrays": to_record(payload), "config": config}), dst_node_id=11,
                  message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 11
    return msg, view


def _context(raw_config, partition_id):
    return Context(run_id=7, node_id=11, state=RecordDict(), run_config=raw_config,
                   node_config={"partition-id": partition_id, "num-partitions": 4})


def _clear_process_caches():
    """What a ClientApp restart loses: models, adapters' initial states, data, tokenizers."""
    edge_lam.models.lora_model._MODELS.clear()
    edge_lam.models.lora_model._INITIAL.clear()
    local_examples.cache_clear()
    load_split_frames.cache_clear()
    load_tokenizer.cache_clear()


def test_reply_holds_only_the_shared_module(fedkd, raw_config):
    cfg, server, g = fedkd
    info = DeviceInfo(partition_id=1, num_partitions=4)
    task, part = device_task(cfg, info)
    assert (task, part.partition_id, part.num_partitions) == ("sst2", 0, 2)
    labels = server.label_names[task]
    msg, view = _train_message(g, task, labels, server_round=1)
    reply = train_fedkd(msg, _context(raw_config, 1), cfg)

    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent_back = from_record(reply.content["arrays"])
    assert set(sent_back) == set(view) and lora_rank(sent_back) == 4  # the shared module
    assert {k: v.shape for k, v in sent_back.items()} == {k: v.shape for k, v in view.items()}
    assert any(sent_back[k].any() for k in sent_back if "lora_B" in k)  # it trained
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "train-loss", "train-s", "rank", "local-loss",
                            "local-accuracy"}
    assert 0.0 <= metrics["local-accuracy"] <= 1.0 and metrics["rank"] == 4

    store = DeviceStore.for_device(cfg, info, run_id=7, node_id=11)
    local, meta = store.load(LOCAL)
    assert lora_rank(local) == 8 and meta["task"] == "sst2" and meta["round"] == "1"
    for key, value in local.items():  # nothing of the private module is in the reply
        for other in sent_back.values():
            assert value.shape != other.shape or not np.array_equal(value, other)

    # a compressed reply still carries shared-module keys only
    msg, _ = _train_message(g, task, labels, server_round=2, base_round=1, energy=0.95,
                            reference=store.load(SHARED)[0])
    reply = train_fedkd(msg, _context(raw_config, 1), cfg)
    payload = from_record(reply.content["arrays"])
    assert is_compressed(payload)
    assert {k.rpartition(SEP)[0] for k in payload} == set(view)


def test_local_module_persists_across_rounds_and_a_restart(fedkd, raw_config):
    cfg, server, g = fedkd
    task, labels = "agnews", server.label_names["agnews"]
    store = DeviceStore.for_device(cfg, DeviceInfo(partition_id=2, num_partitions=4), 7, 11)
    msg, _ = _train_message(g, task, labels, server_round=1)
    train_fedkd(msg, _context(raw_config, 2), cfg)
    after_one, meta = store.load(LOCAL)
    assert meta["round"] == "1"

    _clear_process_caches()  # the ClientApp process restarts
    local_cfg = local_module_config(cfg, task)
    fresh = initial_lora_state(local_cfg, labels, cfg.fedkd.local_rank, copy=LOCAL)
    reloaded = get_trainable_state(load_local_module(cfg, task, labels, store))
    assert set(reloaded) == set(after_one)
    assert all(np.array_equal(reloaded[k], after_one[k]) for k in after_one)
    assert not all(np.array_equal(fresh[k], after_one[k]) for k in after_one)

    msg, _ = _train_message(g, task, labels, server_round=2)
    train_fedkd(msg, _context(raw_config, 2), cfg)
    after_two, meta = store.load(LOCAL)
    assert meta["round"] == "2"
    assert not all(np.array_equal(after_two[k], after_one[k]) for k in after_one)


def test_state_folder_of_another_task_or_a_lost_shared_copy_fails_clearly(fedkd, tmp_path):
    cfg, server, g = fedkd
    store = DeviceStore(tmp_path / "device")
    sst2 = DeviceInfo(partition_id=1, num_partitions=4)
    _, _, metrics = train_modules(cfg, sst2, store, "sst2", server.label_names["sst2"], None,
                                  server_round=1, mode="local")
    assert "local_accuracy" in metrics and store.path(LOCAL).is_file()
    with pytest.raises(ConfigError, match="own state folder"):
        load_local_module(cfg, "agnews", server.label_names["agnews"], store)
    with pytest.raises(ConfigError, match="assigned task 'agnews'"):
        train_modules(cfg, sst2, store, "agnews", server.label_names["agnews"],
                      device_view(g, "agnews"), server_round=1)
    view = device_view(g, "sst2")
    update = encode_update({k: v + 0.1 for k, v in view.items()}, view, 0.95)
    with pytest.raises(ValueError, match="holds none.*whole module next round"):
        receive_shared(store, update, base_round=1, server_round=2)


def test_fedavg_mode_trains_the_shared_module_and_leaves_no_local_state(fedkd, tmp_path):
    cfg, server, g = fedkd
    store = DeviceStore(tmp_path / "device")
    view = device_view(g, "agnews")
    new, n, metrics = train_modules(cfg, DeviceInfo(partition_id=0, num_partitions=4), store,
                                    "agnews", server.label_names["agnews"], view, 1,
                                    mode="fedavg")
    assert n > 0 and set(new) == set(view) and "local_accuracy" not in metrics
    assert not store.path(LOCAL).exists()


def test_server_names_the_task_keys_in_data_errors(raw_config, tmp_path):
    missing = {**raw_config, "fedkd.task.sst2.path": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"fedkd\.task\.sst2\.path=.*does not exist"):
        FedKDServer.prepare(RunConfig.from_run_config(missing))
    wrong = {**raw_config, "fedkd.task.sst2.label-column": "stars"}
    with pytest.raises(ConfigError, match=r"fedkd\.task\.sst2\.label-column='stars'"):
        FedKDServer.prepare(RunConfig.from_run_config(wrong))
    too_big = {**raw_config, "fedkd.local-rank": 64}  # the tiny BERT's layers are 32 wide
    with pytest.raises(ConfigError, match=r"fedkd\.local-rank.*rank 64 is above"):
        FedKDServer.prepare(RunConfig.from_run_config(too_big))
