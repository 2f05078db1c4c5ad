"""A FedKD device's round (S3), free of Flower: private local module + shared module.

- The private local module (LoRA at fedkd.local-rank with its own head, on its own copy of
  the base model or on fedkd.local-model) exists only in this device's state folder
  (`DeviceStore`): loaded before each round, saved after it, never returned to the server.
- The shared module (LoRA at fedkd.shared-rank + the head of the device's task) arrives from
  the server, as a whole or as an SVD-compressed update against the copy the device holds
  (also kept in the state folder), and goes back the same way (`device_round`).
- Training is the mutual distillation of `strategies.fedkd.distill.train_mutual`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.numpy import save_file

from edge_lam.training.device import DeviceInfo, local_examples
from strategies.fedkd.math import decode_update, encode_update, is_compressed
from strategies.fedkd.config import local_module_config, task_config
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import (Examples, load_split_frames, resolve_columns, resolve_data_path,
                                to_examples)
from strategies.fedkd.distill import train_mutual
from edge_lam.logs import get_logger
from edge_lam.training.lora import State
from edge_lam.records import from_record, to_record
from edge_lam.models.lora_model import (get_lora_model, get_trainable_state, initial_lora_state,
                                        load_tokenizer, resolve_model_source, set_trainable_state)
from edge_lam.training.loop import evaluate, train_local

log = get_logger()

LOCAL, SHARED = "local", "shared"  # file names in the state folder (and the model copy name)
MODES = ("fedkd", "fedavg", "local")  # mutual KD | shared module alone | local module alone


class DeviceStore:
    """A device's own state folder: `local.safetensors` (the private module) and
    `shared.safetensors` (the last shared module received), each with string metadata."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_device(cls, cfg: RunConfig, info: DeviceInfo, run_id: int, node_id: int
                   ) -> DeviceStore:
        """<node-config state-dir>/run-<id>/, else <fedkd.state-dir>/run-<id>/<device key>/
        (partition-<p> in simulation, node-<id> otherwise): the same device finds it again
        after a ClientApp restart."""
        if info.state_dir:
            return cls(Path(info.state_dir).expanduser() / f"run-{run_id}")
        who = f"partition-{info.partition_id}" if info.partition_id >= 0 else f"node-{node_id}"
        return cls(Path(cfg.fedkd.state_dir).expanduser() / f"run-{run_id}" / who)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def load(self, name: str) -> tuple[State, dict[str, str]] | None:
        path = self.path(name)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    def save(self, name: str, state: State, meta: dict[str, object]) -> Path:
        """Write atomically (temp file + rename): a crash never leaves half a module."""
        self.root.mkdir(parents=True, exist_ok=True)
        path, tmp = self.path(name), self.path(name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp),
                  metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------- task and data
def device_task(cfg: RunConfig, info: DeviceInfo) -> tuple[str, DeviceInfo]:
    """The device's task and the DeviceInfo selecting its share of that task's data: a
    simulated device k gets task mix[k % len] and a partition among that task's devices."""
    if info.task or info.partition_id < 0 or info.num_partitions <= 0:
        return cfg.fedkd.task_for(info.partition_id, info.task), info
    task, index, count = cfg.fedkd.task_partition(info.partition_id, info.num_partitions)
    return task, dataclasses.replace(info, partition_id=index, num_partitions=count)


def _data_path(task_cfg: RunConfig, task: str, info: DeviceInfo) -> Path:
    try:
        path = resolve_data_path(task_cfg, info.data_dir)
    except ConfigError:  # named below with the task's own key
        path = None
    if path is None:
        wanted = info.data_dir or task_cfg.data.path
        raise ConfigError(f"data of FedKD task '{task}' not found at '{wanted}': set "
                          f"fedkd.task.{task}.path (or the device's --node-config data-dir)")
    return path


def task_test_examples(task_cfg: RunConfig, task: str, label_names: tuple[str, ...],
                       max_examples: int, info: DeviceInfo = DeviceInfo()) -> Examples:
    """The task's test split, capped like ServerModel.prepare (same seed: same subset)."""
    frames = load_split_frames(str(_data_path(task_cfg, task, info)), "",
                               task_cfg.data.encoding)
    test = to_examples(frames["test"], resolve_columns(frames["test"], task_cfg), label_names)
    if max_examples and len(test) > max_examples:
        rng = np.random.default_rng(task_cfg.seed)
        test = test.subset(sorted(rng.choice(len(test), max_examples, replace=False)))
    return test


# ---------------------------------------------------------------------------- modules
def _local_identity(cfg: RunConfig, task: str, label_names: tuple[str, ...]) -> dict[str, str]:
    local_cfg = local_module_config(cfg, task)
    return {"task": task, "labels": json.dumps(list(label_names)), "model": local_cfg.model,
            "rank": str(cfg.fedkd.local_rank)}


def load_local_module(cfg: RunConfig, task: str, label_names: tuple[str, ...],
                      store: DeviceStore):
    """The private module on its own base-model copy: the stored one, else a fresh one."""
    local_cfg = local_module_config(cfg, task)
    model = get_lora_model(local_cfg, label_names, cfg.fedkd.local_rank, copy=LOCAL)
    stored = store.load(LOCAL)
    if stored is None:
        state = initial_lora_state(local_cfg, label_names, cfg.fedkd.local_rank, copy=LOCAL)
    else:
        state, meta = stored
        want = _local_identity(cfg, task, label_names)
        if {k: meta.get(k) for k in want} != want:
            raise ConfigError(f"{store.path(LOCAL)} holds a local module for {meta}, not "
                              f"{want}: give this device its own state folder (fedkd.state-dir "
                              "or --node-config state-dir)")
    set_trainable_state(model, state)
    return model


def train_modules(cfg: RunConfig, info: DeviceInfo, store: DeviceStore, task: str,
                  label_names: tuple[str, ...], shared_state: State | None, server_round: int,
                  mode: str = "fedkd", tag: str = "") -> tuple[State | None, int, dict]:
    """One round of local work. mode 'fedkd': S3 mutual distillation of both modules;
    'fedavg': the shared module alone on the task loss; 'local': the private module alone.
    The private module is saved to `store`; returns (new shared state or None, n_k, metrics)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    own_task, part = device_task(cfg, info)
    if own_task != task:
        raise ConfigError(f"the server assigned task '{task}' but this device's "
                          f"fedkd.task-mix / --node-config task says '{own_task}'")
    task_cfg = task_config(cfg, task)
    _data_path(task_cfg, task, part)
    examples = local_examples(task_cfg, part, label_names)
    seed = cfg.seed * 100_003 + server_round * 1_009 + max(info.partition_id, 0)
    shared_tok = load_tokenizer(resolve_model_source(cfg.model))
    local_tok = load_tokenizer(resolve_model_source(local_module_config(cfg, task).model))
    local = shared = None
    if mode != "local":
        if shared_state is None:
            raise ValueError(f"mode '{mode}' trains the shared module: give its state")
        shared = get_lora_model(task_cfg, label_names, cfg.fedkd.shared_rank)
        set_trainable_state(shared, shared_state)
    if mode != "fedavg":
        local = load_local_module(cfg, task, label_names, store)
    if mode == "fedkd":
        metrics = train_mutual(local, shared, local_tok, shared_tok, examples, task_cfg,
                               seed=seed, tag=tag)
    else:
        model, tok = (shared, shared_tok) if mode == "fedavg" else (local, local_tok)
        metrics = train_local(model, tok, examples, task_cfg, seed=seed, tag=tag)
    if local is not None:
        metrics["local_loss"] = metrics["train_loss"] if mode == "local" else metrics["local_loss"]
        store.save(LOCAL, get_trainable_state(local), {**_local_identity(cfg, task, label_names),
                                                       "round": server_round})
        if cfg.fedkd.device_eval_examples:
            test = task_test_examples(task_cfg, task, label_names,
                                      cfg.fedkd.device_eval_examples, part)
            result = evaluate(local, local_tok, test, task_cfg)
            metrics.update(local_accuracy=result["accuracy"], local_eval_loss=result["loss"])
    return (get_trainable_state(shared) if shared is not None else None), len(examples), metrics


# ---------------------------------------------------------------------------- transport
def receive_shared(store: DeviceStore, payload: State, base_round: int, server_round: int
                   ) -> State:
    """The shared module the server sent: the payload itself, or (compressed, S3) the update
    applied to the copy this device kept from round `base_round`. The result is kept."""
    held = None
    if is_compressed(payload):
        stored = store.load(SHARED)
        have = int(stored[1].get("round", -1)) if stored else None
        if stored is None or have != base_round:
            raise ValueError(f"the server sent an update against the shared module of round "
                             f"{base_round} but this device holds "
                             f"{'none' if stored is None else f'round {have}'} in {store.root}; "
                             "the server will send the whole module next round")
        held = stored[0]
    state = decode_update(payload, held)
    store.save(SHARED, state, {"round": server_round})
    return state


def device_round(cfg: RunConfig, info: DeviceInfo, store: DeviceStore, task: str,
                 label_names: tuple[str, ...], payload: State, base_round: int,
                 server_round: int, energy: float | None, mode: str = "fedkd", tag: str = ""
                 ) -> tuple[State, int, dict]:
    """Receive the shared module, train (S3), and return the reply payload: the new shared
    module, or its update since receipt SVD-compressed at `energy` (None = uncompressed)."""
    if mode == "local":
        raise ValueError("device_round exchanges the shared module; mode 'local' has none "
                         "(call train_modules)")
    start = receive_shared(store, payload, base_round, server_round)
    new, num_examples, metrics = train_modules(cfg, info, store, task, label_names, start,
                                               server_round, mode, tag)
    return encode_update(new, start, energy), num_examples, metrics


def train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S3 round: the reply holds the shared module (or its update) and metrics; the private
    local module stays in this device's state folder."""
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    task, server_round = str(config["task"]), int(config["server-round"])
    energy = float(config["energy"]) or None  # 0.0: compression off
    store = DeviceStore.for_device(cfg, info, context.run_id, context.node_id)
    tag = f"[round {server_round}] {task} device (node {context.node_id}):"
    log.info("%s FedKD, %d local steps, state in %s", tag, cfg.train.local_steps, store.root)
    payload, num_examples, metrics = device_round(
        cfg, info, store, task, tuple(config["label-names"]), from_record(msg.content["arrays"]),
        int(config["base-round"]), server_round, energy, tag=tag)
    reply_metrics = {"num-examples": num_examples, "train-loss": metrics["train_loss"],
                     "train-s": metrics["train_s"], "rank": cfg.fedkd.shared_rank,
                     "local-loss": metrics["local_loss"]}
    if "local_accuracy" in metrics:
        reply_metrics["local-accuracy"] = metrics["local_accuracy"]
    reply = RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(reply_metrics)})
    return Message(reply, reply_to=msg)
