"""`serve.kind='split'`: the model's layers partitioned over the devices (S8), run and
measured.

The server loads the whole model once (the reference), times each unit (embedding, every
decoder layer, head; `edge_lam.serving.layers.unit_seconds`) on a batch of `serve.split-batch` prompts
of `serve.split-tokens` tokens, weighs their parameters and the bytes crossing each
boundary, and plans with `split_plan.choose` over the fleet (`serve.fleet`; fleet item k is
the device of partition k): the memory-aware DP, the best single device as the fallback, or
fixed ranges (`serve.split-plan`). Then `serve.split-batches` batches go down the chain:
the server sends batch b's token ids to the first device's range (QUERY `query.serve`, kind
'split'), its hidden states back out to the next device, and so on; the last range returns
next-token logits at each prompt's last token (`task='lm-cls'`: the label words' only,
scored against the test labels). Each batch also runs through the whole model here, for the
largest logit difference and the local time. Everything lands in
`results/<run-id>/serve_split.json`: the plan, predicted and measured seconds per batch,
wire bytes per hop, the parameter bytes each device holds vs the whole model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from server_app.serve.fleet import ServeDevice, fleet
from server_app.serve.split_plan import Plan, UnitCosts, choose, plan_seconds
from edge_lam.config.options import ConfigError
from edge_lam.config.run_config import RunConfig
from edge_lam.models.families import family
from edge_lam.messaging import connected_by_partition
from edge_lam.serving.layers import (activation_bytes, monolithic_logits, unit_names,
                                     unit_param_bytes, unit_seconds)
from edge_lam.logs import get_logger
from edge_lam.models.lora_model import load_tokenizer, resolve_model_source
from edge_lam.records import record_nbytes, to_record
from edge_lam.results import atomic_write_text

log = get_logger()
MESSAGE_TYPE = "query.serve"


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    from transformers import AutoModelForCausalLM

    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    nodes = _nodes(grid, cfg)
    devices = fleet(cfg.serve.fleet)[:len(nodes)]
    source = resolve_model_source(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    batches, vocab, labels = make_batches(cfg, model.config.vocab_size)
    costs = measure_costs(model, batches[0], vocab, cfg.serve.split_repeats,
                          cfg.serve.split_call_s)
    plan, compared = choose(costs, devices, cfg.serve.split_plan)
    log.info("split: %s plan over %s, predicted %.4f s per batch (best single device: %s)",
             plan.how, [f"{devices[s.device].name}[{s.start},{s.end})" for s in plan.segments],
             plan.seconds, compared["single"])
    runs = [run_batch(grid, cfg, nodes, plan, model, ids, mask, vocab)
            for ids, mask in batches]
    report = build_report(cfg, model, devices, nodes, costs, plan, compared, runs)
    if cfg.serve.split_generate > 0:
        if labels is not None:
            raise ConfigError("serve.split-generate generates from random prompts: use "
                              "task='causal-lm', or serve.split-generate=0")
        report["generation"] = [
            generate_batch(grid, cfg, nodes, plan, model, ids, cfg.serve.split_generate,
                           f"batch-{b}") for b, (ids, _) in enumerate(batches)]
        g = report["generation"][-1]
        log.info("split generation: %d tokens, TTFT %.3f s, %.2f tokens/s with KV caches, "
                 "%.2f without, %.2f on the whole model here; equal to generate: %s",
                 cfg.serve.split_generate, g["ttft_s"], g["tokens_per_s"],
                 g["nocache_tokens_per_s"], g["local_tokens_per_s"],
                 all(r["equal_to_generate"] for r in report["generation"]))
    if labels is not None:
        predicted = np.concatenate([r["logits"].argmax(axis=1) for r in runs])
        report["accuracy"] = float((predicted == labels[:len(predicted)]).mean())
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "serve_split.json", json.dumps(report, indent=1))
    log.info("split: measured %.4f s per batch split vs %.4f s whole model here; largest "
             "logit difference %.2e; results in %s", report["measured"]["split_s"],
             report["measured"]["local_s"], report["max_abs_logit_diff"], run_dir)
    return run_dir


def _nodes(grid: Grid, cfg: RunConfig) -> list[int]:
    """The connected devices, ordered by partition id (waited for up to serve.timeout)."""
    return connected_by_partition(grid, cfg.serve.timeout, cfg.min_devices, 1,
                                  "serve.timeout")


def make_batches(cfg: RunConfig, vocab_size: int):
    """([(ids (B, T), mask (B, T))], label-word token ids (K,) or None, labels or None).
    `task='lm-cls'`: the test split posed by data.template, right-padded, cut to
    serve.split-tokens; otherwise random token ids (seeded) of that length."""
    b, t, count = cfg.serve.split_batch, cfg.serve.split_tokens, cfg.serve.split_batches
    if not family(cfg).label_words:
        rng = np.random.default_rng(cfg.seed)
        ids = rng.integers(0, vocab_size, size=(count, b, t))
        return [(torch.from_numpy(x), torch.ones(b, t, dtype=torch.long)) for x in ids], \
            None, None
    from edge_lam.data.encode import encode_batch
    from edge_lam.training.evaluation import ServerModel

    server_model = ServerModel.prepare(cfg, with_model=False)
    mcfg = cfg.updated("train", max_length=t)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    out, vocab = [], None
    for start in range(0, min(len(server_model.test), b * count), b):
        enc = encode_batch(tokenizer, server_model.test.subset(range(start, min(start + b,
                                                                          len(server_model.test)))),
                           mcfg)
        out.append((enc["input_ids"], enc["attention_mask"]))
        vocab = enc["label_token_ids"]
    return out, vocab, np.asarray(server_model.test.labels)


def measure_costs(model, batch, vocab: torch.Tensor | None, repeats: int,
                  call_s: float = 0.0) -> UnitCosts:
    """The planner's inputs for this batch shape: seconds per unit here, parameter bytes,
    wire bytes at each boundary (as Flower sends them) and the activations a device holds."""
    ids, mask = batch
    b, t = ids.shape
    config = model.config
    out_width = config.vocab_size if vocab is None else len(vocab)
    sizes, tied = unit_param_bytes(model)
    first = _wire({"x": ids.numpy(), "attention_mask": mask.numpy()}, vocab)
    hidden = _wire({"x": np.zeros((b, t, config.hidden_size), np.float32),
                    "attention_mask": mask.numpy()}, None)
    last = record_nbytes(to_record({"x": np.zeros((b, out_width), np.float32)}))
    return UnitCosts(tuple(unit_seconds(model, ids, mask, repeats)), tuple(sizes),
                     (first,) + (hidden,) * config.num_hidden_layers + (hidden, last), tied,
                     activation_bytes(config, b, t, out_width), call_s)


def _wire(arrays: dict, vocab: torch.Tensor | None) -> int:
    if vocab is not None:
        arrays = {**arrays, "vocab-ids": vocab.numpy()}
    return record_nbytes(to_record(arrays))


def run_batch(grid: Grid, cfg: RunConfig, nodes: list[int], plan: Plan, model,
              ids: torch.Tensor, mask: torch.Tensor, vocab: torch.Tensor | None) -> dict:
    """One batch down the chain of devices, and through the whole model here."""
    started = time.perf_counter()
    x, hops = ids.numpy(), []
    for seg in plan.segments:
        hop_start = time.perf_counter()  # serialising the arrays counts as the hop's
        arrays = {"x": x, "attention_mask": mask.numpy()}
        if vocab is not None and seg.end == model.config.num_hidden_layers + 2:
            arrays["vocab-ids"] = vocab.numpy()
        got, bytes_in, bytes_out = _hop(grid, cfg, nodes[seg.device],
                                        {"start": seg.start, "end": seg.end}, arrays)
        x = got["arrays"]["x"].numpy()
        hops.append({"seconds": time.perf_counter() - hop_start,
                     "device_seconds": float(got["metrics"]["seconds"]),
                     "load_seconds": float(got["metrics"]["load-seconds"]),
                     "param_bytes": int(got["metrics"]["param-bytes"]),
                     "bytes_in": bytes_in, "bytes_out": bytes_out})
    split_s = time.perf_counter() - started
    local_start = time.perf_counter()
    local = monolithic_logits(model, ids, mask, vocab).numpy()
    local_s = time.perf_counter() - local_start
    overhead = sum(h["seconds"] - h["device_seconds"] - h["load_seconds"] for h in hops)
    return {"split_s": split_s, "local_s": local_s, "hops": hops, "logits": x,
            "overhead_s": overhead, "diff": float(np.abs(x - local).max())}


def _hop(grid: Grid, cfg: RunConfig, node: int, config: dict, arrays: dict) -> tuple:
    """One QUERY to one device: (its reply's content, bytes sent, bytes back)."""
    sent = to_record(arrays)
    msg = Message(RecordDict({"config": ConfigRecord({"kind": "split", "model": cfg.model,
                                                      **config}), "arrays": sent}),
                  dst_node_id=node, message_type=MESSAGE_TYPE)
    replies = list(grid.send_and_receive([msg], timeout=cfg.serve.timeout))
    if not replies or replies[0].has_error():
        why = replies[0].error.reason if replies else "no reply in time"
        raise RuntimeError(f"split: device {node} failed units [{config['start']}, "
                           f"{config['end']}): {why}")
    got = replies[0].content
    return got, record_nbytes(sent), record_nbytes(got["arrays"])


def generate_batch(grid: Grid, cfg: RunConfig, nodes: list[int], plan: Plan, model,
                   ids: torch.Tensor, new_tokens: int, request: str) -> dict:
    """Greedy generation of `new_tokens` tokens for the prompts `ids` (B, T) down the chain:
    the prompt first (each device fills its layers' KV cache), then one token per step (one
    hidden state per row crosses each hop). Compared token for token with the whole model's
    `generate` here, and timed against the chain without caches (the whole sequence again
    at every step)."""
    step_s, hop_bytes, out = [], [], []
    x_ids, past = ids, 0
    for _ in range(new_tokens):
        started, sent_bytes = time.perf_counter(), 0
        x = x_ids.numpy()
        for seg in plan.segments:
            got, up, down = _hop(grid, cfg, nodes[seg.device], {
                "start": seg.start, "end": seg.end, "request": request, "past": past,
                "pick": "greedy"}, {"x": x})
            x = got["arrays"]["x"].numpy()
            sent_bytes += up + down
        token = torch.from_numpy(x).long().reshape(-1, 1)  # (B, 1): the last device's pick
        past += x_ids.shape[1]
        x_ids = token
        out.append(token)
        step_s.append(time.perf_counter() - started)
        hop_bytes.append(sent_bytes)
    tokens = torch.cat(out, dim=1)
    local_start = time.perf_counter()
    reference = model.generate(ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False)[:, ids.shape[1]:]
    local_s = time.perf_counter() - local_start
    # no caches: every step runs the whole sequence so far through the chain
    nocache_start, seq = time.perf_counter(), ids
    for k in range(min(new_tokens, 4)):
        x = seq.numpy()
        for seg in plan.segments:
            got, _, _ = _hop(grid, cfg, nodes[seg.device], {"start": seg.start, "end": seg.end},
                             {"x": x, "attention_mask": np.ones(seq.shape, np.int64)})
            x = got["arrays"]["x"].numpy()
        seq = torch.cat([seq, tokens[:, k:k + 1]], dim=1)
    nocache_per_token = (time.perf_counter() - nocache_start) / min(new_tokens, 4)
    decode = step_s[1:] or step_s
    return {"request": request, "batch": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1]),
            "new_tokens": new_tokens, "equal_to_generate": bool(torch.equal(tokens, reference)),
            "ttft_s": step_s[0], "decode_s_per_token": float(np.mean(decode)),
            "tokens_per_s": float(ids.shape[0] / np.mean(decode)),
            "nocache_s_per_token": nocache_per_token,
            "nocache_tokens_per_s": float(ids.shape[0] / nocache_per_token),
            "local_tokens_per_s": float(ids.shape[0] * new_tokens / local_s),
            "prefill_bytes": hop_bytes[0], "step_bytes": int(np.mean(hop_bytes[1:] or
                                                                    hop_bytes))}


def build_report(cfg: RunConfig, model, devices: list[ServeDevice], nodes: list[int],
                 costs: UnitCosts, plan: Plan, compared: dict, runs: list[dict]) -> dict:
    """The JSON of a run; steady figures average the batches after the first (whose hops
    include the devices loading their units), or the first when there is only one."""
    steady = runs[1:] or runs
    names = unit_names(model.config)
    segments = []
    for k, seg in enumerate(plan.segments):
        hops = [r["hops"][k] for r in steady]
        dev = devices[seg.device]
        segments.append({
            "device": dev.name, "node": nodes[seg.device], "start": seg.start, "end": seg.end,
            "units": f"{names[seg.start]}..{names[seg.end - 1]}",
            "param_bytes_planned": costs.segment_bytes(seg.start, seg.end) - costs.work_bytes,
            "param_bytes_held": runs[0]["hops"][k]["param_bytes"],
            "predicted_s": plan_seconds(costs, devices, (seg,)),
            "measured_s": float(np.mean([h["seconds"] for h in hops])),
            "device_compute_s": float(np.mean([h["device_seconds"] for h in hops])),
            "load_s": runs[0]["hops"][k]["load_seconds"],
            "bytes_in": hops[0]["bytes_in"], "bytes_out": hops[0]["bytes_out"]})
    split_s = float(np.mean([r["split_s"] for r in steady]))
    local_s = float(np.mean([r["local_s"] for r in steady]))
    return {
        "model": cfg.model, "task": cfg.task, "batch": cfg.serve.split_batch,
        "tokens": cfg.serve.split_tokens,
        "batches": len(runs), "units": names, "unit_seconds": list(costs.seconds),
        "unit_param_bytes": list(costs.param_bytes), "tied_bytes": costs.tied_bytes,
        "boundary_bytes": list(costs.boundary_bytes), "work_bytes": costs.work_bytes,
        "call_s": costs.call_s,
        "fleet": [vars(d) | {"node": n} for d, n in zip(devices, nodes)],
        "plan": {"how": plan.how, "predicted_s": plan.seconds, "segments": segments},
        "compared": compared, "whole_model_param_bytes": costs.segment_bytes(0, costs.n)
        - costs.work_bytes,
        "measured": {"split_s": split_s, "local_s": local_s,
                     "compute_here_s": float(sum(costs.seconds)),
                     "split_minus_local_s": split_s - local_s,
                     "hop_overhead_s": float(np.mean([r["overhead_s"] for r in steady])),
                     "first_batch_s": runs[0]["split_s"]},
        "max_abs_logit_diff": max(r["diff"] for r in runs)}
