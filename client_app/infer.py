"""The device side of `mode='infer'`: answer a batch of queries with this device's member.

The QUERY (message type `query.infer`) carries the texts and the label names in its config.
The reply holds, for `task='lm-cls'`, `probs` (Q x K label probabilities); for
`task='causal-lm'`, the generated `texts` (a ConfigRecord) with every generated token's
log-probability (`logprobs`, flat, split by `lengths`); then the cost (seconds, prompt
tokens, generated tokens) and the member's name. An error while answering becomes Flower's error reply: the server leaves
this device out of that batch's votes and counts it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge_lam.serving.answer import (attacked, attacked_answers, generated_answers,
                                     label_probabilities, member_of)
from edge_lam.config.run_config import RunConfig
from edge_lam.training.device import DeviceInfo
from edge_lam.models.families import family
from edge_lam.records import to_record


def answer(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    texts, labels = list(config["texts"]), tuple(config["label-names"])
    member = member_of(cfg, context.node_config, info.partition_id)
    attacker = info.partition_id in cfg.infer.attackers
    own = np.random.default_rng([cfg.seed, info.partition_id, int(config["batch"])])
    if family(cfg).generates:
        answers, logprobs, cost = generated_answers(cfg, member, texts)
        if attacker:
            shared = np.random.default_rng([cfg.seed, 7919, int(config["batch"])])
            answers, logprobs = attacked_answers(answers, logprobs, cfg.infer.attack, shared,
                                                 own)
        content = {"answers": to_record({
            "logprobs": np.asarray([x for lp in logprobs for x in lp], dtype=np.float32),
            "lengths": np.asarray([len(lp) for lp in logprobs], dtype=np.int64)}),
            "texts": ConfigRecord({"texts": answers})}
    else:
        probs, cost = label_probabilities(cfg, member, texts, labels)
        if attacker:
            probs = attacked(probs, cfg.infer.attack, own)
        content = {"answers": to_record({"probs": probs.astype(np.float32)})}
    return Message(RecordDict({
        **content,
        "metrics": MetricRecord({k: v for k, v in cost.items()}),
        "member": ConfigRecord({"name": member.name})}), reply_to=msg)
