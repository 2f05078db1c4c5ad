"""The Flower ClientApp each device runs (simulation worker or `flower-supernode`).

- QUERY: tell the server who this device is (profile, partition, explicit rank).
- TRAIN: receive the global adapter truncated to this device's rank (unicast), train, reply.
  With strategy='fedkd' (S3): receive the shared module (or its compressed update), train it
  and the private local module by mutual distillation, reply with the shared module only.
"""

from __future__ import annotations


from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.device import DeviceInfo, train_round
from client_app.fedkd import DeviceStore, device_round
from task.config import RunConfig
from task.lora import lora_rank
from task.records import from_record, to_record
from task.logs import get_logger

log = get_logger()

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = DeviceInfo.from_node_config(context.node_config)
    profile = ConfigRecord({"device": info.device, "partition-id": info.partition_id,
                            "num-partitions": info.num_partitions, "lora-rank": info.lora_rank,
                            "task": info.task})
    return Message(RecordDict({"profile": profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    if cfg.strategy == "fedkd":
        return train_fedkd(msg, context, cfg)
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    rank = int(config["rank"])
    label_names = tuple(config.get("label-names", []))
    state = from_record(msg.content["arrays"])
    if lora_rank(state) != rank:
        raise ValueError(f"server sent factors of rank {lora_rank(state)} but assigned {rank}")
    server_round = int(config["server-round"])
    tag = f"[round {server_round}] device {config.get('device', '?')} (node {context.node_id}) rank {rank}:"
    log.info("%s training %d local steps", tag, cfg.local_steps)
    new_state, num_examples, metrics = train_round(cfg, info, label_names, rank, state,
                                                   server_round, tag=tag)
    reply = RecordDict({
        "arrays": to_record(new_state),
        "metrics": MetricRecord({"num-examples": num_examples,
                                 "train-loss": metrics["train_loss"],
                                 "train-s": metrics["train_s"], "rank": rank}),
    })
    return Message(reply, reply_to=msg)


def train_fedkd(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S3 round: the reply holds the shared module (or its update) and metrics; the private
    local module stays in this device's state folder."""
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    task, server_round = str(config["task"]), int(config["server-round"])
    energy = float(config["energy"]) or None  # 0.0: compression off
    store = DeviceStore.for_device(cfg, info, context.run_id, context.node_id)
    tag = f"[round {server_round}] {task} device (node {context.node_id}):"
    log.info("%s FedKD, %d local steps, state in %s", tag, cfg.local_steps, store.root)
    payload, num_examples, metrics = device_round(
        cfg, info, store, task, tuple(config["label-names"]), from_record(msg.content["arrays"]),
        int(config["base-round"]), server_round, energy, tag=tag)
    reply_metrics = {"num-examples": num_examples, "train-loss": metrics["train_loss"],
                     "train-s": metrics["train_s"], "rank": cfg.fedkd_shared_rank,
                     "local-loss": metrics["local_loss"]}
    if "local_accuracy" in metrics:
        reply_metrics["local-accuracy"] = metrics["local_accuracy"]
    reply = RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(reply_metrics)})
    return Message(reply, reply_to=msg)
