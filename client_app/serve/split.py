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

Generation (`config` has `request` and `past`): `x` holds only the new tokens (the prompt
at `past` = 0, then one token per step) and the device keeps the keys and values of its
own layers for the request in its Flower context (`context.state`, which the SuperNode keeps
between messages, across ClientApp processes): a step sends one hidden state per row
through each hop, not the whole sequence, and with `pick='greedy'` the last device sends
back the next token id instead of V logits. A step whose request or `past` does not match
the kept cache is refused (a lost or reordered message must not mix two sequences).
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from edge_lam.config.run_config import RunConfig
from edge_lam.serving.layers import (cache_arrays, cache_from_arrays, held_param_bytes,
                                     load_units, new_cache, run_units, run_units_cached)
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
    if "request" in config:
        out = _generate_step(model, start, end, x, config, context)
    else:
        mask = torch.from_numpy(arrays["attention_mask"])  # (B, T)
        vocab = torch.from_numpy(arrays["vocab-ids"]) if "vocab-ids" in arrays else None
        out = run_units(model, start, end, x, mask, vocab)
    done = time.perf_counter()
    out = out if out.dtype == torch.int64 else out.float()
    return Message(RecordDict({
        "arrays": to_record({"x": out.numpy()}),
        "metrics": MetricRecord({"seconds": done - loaded, "load-seconds": loaded - began,
                                 "param-bytes": held_param_bytes(model)})}), reply_to=msg)


KV_ARRAYS, KV_META = "split-kv", "split-kv-meta"  # context.state records


def _generate_step(model, start: int, end: int, x: torch.Tensor, config,
                   context: Context) -> torch.Tensor:
    """One generation step on this device's units with its KV cache for the request."""
    from flwr.app import ConfigRecord

    request, past = str(config["request"]), int(config["past"])
    meta = context.state.config_records.get(KV_META)
    if past == 0:
        cache = new_cache(model)
    else:
        if meta is None or meta["request"] != request or int(meta["past"]) != past:
            have = "nothing" if meta is None else f"{meta['request']} at {meta['past']}"
            raise ValueError(f"split generation: step of request {request} at position "
                             f"{past}, but this device's cache holds {have}: refused")
        cache = cache_from_arrays(model, from_record(context.state[KV_ARRAYS]))
    out = run_units_cached(model, start, end, x, cache, past)
    layers = model.config.num_hidden_layers
    if end == layers + 2 and config.get("pick") == "greedy":  # the next token, not V logits
        out = out.argmax(dim=-1, keepdim=True)
    context.state.array_records[KV_ARRAYS] = to_record(cache_arrays(cache, start, end, layers))
    context.state.config_records[KV_META] = ConfigRecord({
        "request": request, "past": past + int(x.shape[1])})
    return out
