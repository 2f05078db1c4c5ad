"""The device side of `mode='infer'`: answer a batch of queries with this device's member.

The QUERY (message type `query.infer`) carries the texts and the label names in its config;
the reply holds `probs` (Q x K label probabilities), the cost (seconds, prompt tokens) and
the member's name. An error while answering becomes Flower's error reply: the server leaves
this device out of that batch's votes and counts it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from task.answer import attacked, label_probabilities, member_of
from task.config import RunConfig
from task.device import DeviceInfo
from task.records import to_record


def answer(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    texts, labels = list(config["texts"]), tuple(config["label-names"])
    member = member_of(cfg, context.node_config, info.partition_id)
    probs, cost = label_probabilities(cfg, member, texts, labels)
    if info.partition_id in cfg.infer.attackers:
        rng = np.random.default_rng([cfg.seed, info.partition_id, int(config["batch"])])
        probs = attacked(probs, cfg.infer.attack, rng)
    return Message(RecordDict({
        "answers": to_record({"probs": probs.astype(np.float32)}),
        "metrics": MetricRecord({"seconds": cost["seconds"], "tokens": cost["tokens"]}),
        "member": ConfigRecord({"name": member.name})}), reply_to=msg)
