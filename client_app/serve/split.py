"""The device side of `serve.kind='split'` (S8 layer partitioning): run one range of units.

The QUERY's `config` record (kind 'split') names the `model` and the unit range
[`start`, `end`) (0 = embedding, 1..L = decoder layers, L + 1 = head); its `arrays` record
holds `x` (token ids (B, T) when start = 0, else hidden states (B, T, H) float32), the
`attention_mask` (B, T) and, optionally, `vocab-ids` (K,) when only those next-token
logits are wanted. The device builds its layers' causal masks and rotary embeddings from
the mask and positions itself (`edge_lam.serving.layers.run_units`), so nothing else travels.

It loads only the weights of its units (`edge_lam.serving.layers.load_units`, cached per process for
the next batches) and replies `arrays` with `x`: hidden states (B, T, H), or logits (B, V)
or (B, K) when its range ends the model; and `metrics`: compute seconds, load seconds (0
once cached) and the parameter bytes it really holds.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from edge_lam.config.run_config import RunConfig
from edge_lam.serving.layers import held_param_bytes, load_units, run_units
from edge_lam.models.lora_model import resolve_model_source
from edge_lam.records import from_record, to_record


def handle(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    start, end = int(config["start"]), int(config["end"])
    arrays = from_record(msg.content["arrays"])
    began = time.perf_counter()
    model = load_units(resolve_model_source(str(config["model"])), start, end)
    loaded = time.perf_counter()
    x = torch.from_numpy(arrays["x"])  # (B, T) ids or (B, T, H) hidden
    mask = torch.from_numpy(arrays["attention_mask"])  # (B, T)
    vocab = torch.from_numpy(arrays["vocab-ids"]) if "vocab-ids" in arrays else None
    out = run_units(model, start, end, x, mask, vocab)
    done = time.perf_counter()
    return Message(RecordDict({
        "arrays": to_record({"x": out.float().numpy()}),
        "metrics": MetricRecord({"seconds": done - loaded, "load-seconds": loaded - began,
                                 "param-bytes": held_param_bytes(model)})}), reply_to=msg)
