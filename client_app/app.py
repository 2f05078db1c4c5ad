"""The Flower ClientApp each device runs (simulation worker or `flower-supernode`).

- QUERY: tell the server who this device is (profile, partition, explicit rank).
- TRAIN: receive the global adapter truncated to this device's rank (unicast), train, reply.
"""

from __future__ import annotations


from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.device import DeviceInfo, train_round
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
                            "num-partitions": info.num_partitions, "lora-rank": info.lora_rank})
    return Message(RecordDict({"profile": profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
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
