"""The device side of `serve.kind='cot'` (S8): one reasoning step of a chain, or its costs.

The QUERY's `config` record (kind 'cot') says `op`:
- `step`: `questions` and `chains` (the chain so far of each, text) and `max-tokens`; the
  device continues every chain by at most that many greedy tokens with its model
  (`edge_lam.serving.steps.continue_chains`) and replies `steps` (texts, new and context tokens, whether
  each ended) and `metrics` (seconds, peak memory bytes);
- `profile`: the device times one step's parts on a `question` (`edge_lam.serving.steps.measure_costs`)
  and replies `costs`: the server's latency model before it places anything.
The model is the device's member (`--node-config model/adapter`, `infer.members` or the run's
`model`), loaded once per process. `member` names it in every reply.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge_lam.serving.answer import _member_model, member_of  # the member's model, as mode='infer'
from edge_lam.config.run_config import RunConfig
from edge_lam.training.device import DeviceInfo
from edge_lam.serving.steps import continue_chains, measure_costs, peak_memory_bytes


def handle(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    info = DeviceInfo.from_node_config(context.node_config)
    member = member_of(cfg, context.node_config, info.partition_id)
    model, tokenizer, mcfg = _member_model(cfg, member, ())
    op = str(config["op"])
    if op == "profile":
        costs = measure_costs(model, tokenizer, mcfg, str(config["question"]))
        content = {"costs": MetricRecord(costs)}
    elif op == "step":
        questions, chains = list(config["questions"]), list(config["chains"])
        if len(questions) != len(chains):
            raise ValueError(f"CoT step query: {len(questions)} questions but {len(chains)} "
                             "chains; the server must send one chain per question")
        start = time.perf_counter()
        steps = continue_chains(model, tokenizer, mcfg, questions, chains,
                                int(config["max-tokens"]), cfg.serve.cot_batch_size)
        seconds = time.perf_counter() - start
        content = {"steps": ConfigRecord({
            "texts": [s.text for s in steps], "new-tokens": [s.new_tokens for s in steps],
            "context-tokens": [s.context_tokens for s in steps],
            "ended": [s.ended for s in steps]}),
            "metrics": MetricRecord({"seconds": seconds,
                                     "peak-memory-bytes": peak_memory_bytes()})}
    else:
        raise ValueError(f"CoT query op '{op}' is not known: 'step' or 'profile'")
    return Message(RecordDict({**content, "member": ConfigRecord({"name": member.name})}),
                   reply_to=msg)
