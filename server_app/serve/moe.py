"""`serve.kind='moe'`: MoE layers as micro-services (S8): the server runs attention and
gating, the devices compute the experts.

The run's dense model becomes a mixture of experts without training (`edge_lam.serving.moe`: each FFN's
neurons clustered on `serve.moe-calibration` training texts into `serve.moe-experts` equal
experts, a router of representative neurons choosing `serve.moe-top-k` per token). The server
then drops the experts' weights: it keeps embeddings, attention, norms, the router and the
head. Each device loads the same pretrained checkpoint once and slices its experts by the
plan (neuron -> expert per layer) that the first call to it carries: a few hundred KB
instead of the experts' megabytes.

The `eval.max-examples` test queries (`task='lm-cls'`, label-word likelihood as in
`edge_lam.serving.answer`) go through in batches of `eval.batch-size`. At every MoE layer of a batch (one
slot), the server counts the tokens routed to each expert (demand (E,)), asks the scheduler
for an expert -> device assignment (`assign(slot, demand, alive) -> (E,)`), and sends each
device one QUERY (`query.serve`, config kind='moe') holding the hidden states of the tokens
that chose any of its experts and which of its experts each chose; the device returns the sum
of those experts' outputs and the server adds the parts. A device that errs, does not answer
or answers malformed is marked dead, its experts reassigned among the living and resent at
once; with no device left the run stops with an error. Results: `results/<run-id>/
serve_moe.json` (accuracy, NLL, FLOPs, bytes per slot and per token, tokens per device,
predicted seconds on `serve.fleet`, failures), `serve_moe_logits.npy` (Q, K) and
`moe_plan.npz`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from server_app.serve.fleet import ServeDevice, fleet
from server_app.serve.mode import MESSAGE_TYPE
from server_app.serve.moe_scheduling import Assign, make_scheduler, predicted_seconds
from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import batches, encode_batch
from edge_lam.data.text import (Examples, load_split_frames, resolve_columns, resolve_data_path,
                                to_examples)
from edge_lam.training.evaluation import ServerModel
from edge_lam.models.families import family
from edge_lam.messaging import connected_by_partition, origin
from edge_lam.logs import get_logger
from edge_lam.models.lora_model import load_tokenizer, resolve_model_source
from edge_lam.serving.moe import (MoEMLP, MoEPlan, build_plan, calibration_inputs, expert_output,
                                  ffn_flops_ratio, gated_mlps, moefy, set_active_tokens)
from edge_lam.records import from_record, record_nbytes, to_record
from edge_lam.results import atomic_write_text

log = get_logger()
CALIBRATION_TOKENS = 2048  # FFN inputs kept per layer for the clustering


class RemoteExperts:
    """The MoE layers' `runner`: one QUERY per device holding any chosen expert, the parts
    added; failures reassigned. Counts bytes, tokens and pairs per device."""

    def __init__(self, grid: Grid, nodes: list[int], plan: MoEPlan, assign: Assign,
                 devices: list[ServeDevice], cfg: RunConfig, pair_seconds: float,
                 token_bytes: int):
        self.grid, self.nodes, self.assign, self.devices = grid, nodes, assign, devices
        self.token_bytes = token_bytes  # one hidden state as sent (float32)
        self.plan_record = to_record({"assignment": plan.arrays()["assignment"]})
        self.timeout, self.pair_seconds = cfg.serve.timeout, pair_seconds
        self.alive = np.ones(len(nodes), bool)
        self.has_plan = np.zeros(len(nodes), bool)
        self.slot = 0
        self.stats = {"bytes_down": 0, "bytes_up": 0, "plan_bytes": 0, "messages": 0,
                      "tokens": np.zeros(len(nodes), np.int64),
                      "pairs": np.zeros(len(nodes), np.int64), "predicted_s": 0.0,
                      "layer_tokens": 0, "failures": [], "slot_bytes": []}

    def _owner(self, demand: np.ndarray) -> np.ndarray:
        owner = np.asarray(self.assign(self.slot, demand, self.alive.copy()), dtype=np.int64)
        used = owner[demand > 0]
        if owner.shape != demand.shape or (used < 0).any() or (used >= len(self.nodes)).any() \
                or not self.alive[used].all():
            raise RuntimeError(f"the MoE scheduler gave {owner.tolist()} for living devices "
                               f"{np.flatnonzero(self.alive).tolist()}: it must return one "
                               "living device index per expert")
        return owner

    def _message(self, d: int, layer: int, experts: list[int], x: torch.Tensor,
                 mask: torch.Tensor) -> Message:
        rows = mask[:, experts].any(1)
        content = RecordDict({
            "config": ConfigRecord({"kind": "moe", "layer": layer, "experts": experts,
                                    "slot": self.slot}),
            "tokens": to_record({"x": x[rows].numpy(),
                                 "mask": mask[rows][:, experts].numpy().astype(np.uint8)})})
        if not self.has_plan[d]:
            content["plan"] = self.plan_record
        return Message(content, dst_node_id=self.nodes[d], message_type=MESSAGE_TYPE)

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, H) the sum of each token's chosen experts (mask (N, E)), computed remotely."""
        dtype = x.dtype  # the model's; the wire carries float32
        x, y = x.detach().float().contiguous(), torch.zeros(x.shape, dtype=torch.float32)
        demand = mask.sum(0).numpy()
        pending = np.flatnonzero(demand > 0)
        owner = self._owner(demand)
        slot_bytes, n_tokens, n_pairs = 0, np.zeros(len(self.nodes)), np.zeros(len(self.nodes))
        while len(pending):
            jobs = {d: [int(e) for e in pending if owner[e] == d] for d in set(owner[pending])}
            sent = {d: self._message(d, layer, experts, x, mask) for d, experts in jobs.items()}
            replies = self.grid.send_and_receive(list(sent.values()), timeout=self.timeout)
            done, answered = set(), set()
            for reply in replies:
                d = self.nodes.index(origin(reply, sent.values()))
                answered.add(d)
                part = self._part(reply, d, sent[d], layer)
                if part is None:
                    continue
                rows = mask[:, jobs[d]].any(1)
                y[rows] += part
                done.add(d)
                up, down = record_nbytes(reply.content["partial"]), record_nbytes(
                    sent[d].content["tokens"])
                slot_bytes += up + down
                self.stats["bytes_up"] += up
                self.stats["bytes_down"] += down
                self.stats["messages"] += 1
                if "plan" in sent[d].content:
                    self.stats["plan_bytes"] += record_nbytes(self.plan_record)
                    self.has_plan[d] = True
                n_tokens[d] += int(rows.sum())
                n_pairs[d] += int(mask[:, jobs[d]].sum())
            for d in set(jobs) - answered:
                self._fail(d, layer, "no answer in time")
            pending = np.asarray([e for d in set(jobs) - done for e in jobs[d]], np.int64)
            if len(pending):
                if not self.alive.any():
                    raise RuntimeError(f"MoE layer {layer}: every device failed (see the log): "
                                       "no device is left to compute the experts")
                still = np.zeros_like(demand)
                still[pending] = demand[pending]
                owner = self._owner(still)
        self._account(slot_bytes, n_tokens, n_pairs, int(mask.any(1).sum()))
        return y.to(dtype)

    def _part(self, reply: Message, d: int, sent: Message, layer: int) -> torch.Tensor | None:
        """The device's partial sum (N_d, H), or None (error or malformed: device marked dead)."""
        if reply.has_error():
            self._fail(d, layer, f"error: {reply.error.reason}")
            return None
        want = sent.content["tokens"]["x"].numpy().shape
        try:
            part = from_record(reply.content["partial"])["y"]
        except (KeyError, TypeError) as err:
            self._fail(d, layer, f"malformed answer ({err})")
            return None
        if part.shape != want:
            self._fail(d, layer, f"malformed answer: shape {part.shape}, expected {want}")
            return None
        return torch.from_numpy(np.asarray(part, dtype=np.float32))

    def _fail(self, d: int, layer: int, reason: str) -> None:
        if not self.alive[d]:
            return
        self.alive[d] = False
        log.error("serve moe: node %d (device %d) at layer %d, slot %d: %s; its experts go to "
                  "the other devices", self.nodes[d], d, layer, self.slot, reason)
        self.stats["failures"].append({"node": int(self.nodes[d]), "device": int(d),
                                       "layer": int(layer), "slot": int(self.slot),
                                       "reason": reason})

    def _account(self, slot_bytes: int, tokens: np.ndarray, pairs: np.ndarray,
                 layer_tokens: int) -> None:
        self.stats["tokens"] += tokens.astype(np.int64)
        self.stats["pairs"] += pairs.astype(np.int64)
        self.stats["slot_bytes"].append(slot_bytes)
        self.stats["layer_tokens"] += layer_tokens
        self.stats["predicted_s"] += predicted_seconds(self.devices, tokens, pairs,
                                                       self.pair_seconds, self.token_bytes)
        self.slot += 1


def calibration_batches(cfg: RunConfig, tokenizer, label_names: tuple[str, ...]):
    """`serve.moe-calibration` training texts (a seeded sample), posed as the test queries
    are (data.template), encoded in batches of eval.batch-size."""
    path = resolve_data_path(cfg)
    frames = load_split_frames(str(path) if path else None, cfg.data.hub_dataset,
                               cfg.data.encoding)
    train = to_examples(frames["train"], resolve_columns(frames["train"], cfg), label_names)
    rng = np.random.default_rng([cfg.seed, 1])
    pick = sorted(rng.choice(len(train), min(cfg.serve.moe_calibration, len(train)),
                             replace=False))
    for chunk in batches(train.subset(pick), cfg.eval.batch_size):
        batch = encode_batch(tokenizer, chunk, cfg)
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def label_logits(model, layers: list[MoEMLP], tokenizer, cfg: RunConfig, examples: Examples,
                 on_batch: Callable[[int], None] = lambda b: None) -> np.ndarray:
    """(Q, K) label-word logits after each query, as evaluation scores them (`task='lm-cls'`);
    the experts computed at the real tokens only."""
    out = []
    for b, chunk in enumerate(batches(examples, cfg.eval.batch_size)):
        on_batch(b)
        batch = encode_batch(tokenizer, chunk, cfg)
        set_active_tokens(layers, batch["attention_mask"])
        logits, _ = family(cfg).outputs(model, batch)  # (B, K)
        out.append(logits.float().numpy())
    set_active_tokens(layers, None)
    return np.concatenate(out)


def quality(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and mean NLL of the label (softmax over the label words)."""
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    return {"accuracy": float((logits.argmax(1) == labels).mean()),
            "nll": float(-logp[np.arange(len(labels)), labels].mean())}


def moe_model(cfg: RunConfig, label_names: tuple[str, ...]):
    """(tokenizer, dense model, plan) of the run: the plan clustered on calibration texts."""
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    model = family(cfg).load(source, label_names).eval()
    inputs = calibration_inputs(model, calibration_batches(cfg, tokenizer, label_names),
                                CALIBRATION_TOKENS, cfg.seed)
    plan = build_plan(model, inputs, cfg.serve.moe_experts, cfg.serve.moe_router_neurons,
                      cfg.seed)
    return tokenizer, model, plan


def pair_seconds_of(model, plan: MoEPlan, tokens: int = 256) -> float:
    """Measured seconds of one token through one expert on this machine (layer 0's expert 0,
    `tokens` tokens at once): the unit of the fleet's predicted compute times."""
    from edge_lam.serving.moe import expert_weights

    mlp = gated_mlps(model)[0]
    weights = expert_weights(mlp, plan.neurons(0, 0))
    x = torch.randn(tokens, weights[0].shape[1], dtype=weights[0].dtype)
    with torch.no_grad():
        expert_output(x, weights, mlp.act_fn)
        start = time.perf_counter()
        for _ in range(5):
            expert_output(x, weights, mlp.act_fn)
    return (time.perf_counter() - start) / (5 * tokens)


def members(grid: Grid, cfg: RunConfig) -> list[int]:
    """The connected devices (at least min-devices, waited for up to serve.timeout), by
    partition id: device d of the scheduler is the d-th."""
    return connected_by_partition(grid, cfg.serve.timeout, cfg.min_devices, cfg.min_devices,
                                  "serve.timeout")


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    started = time.perf_counter()
    server_model = ServerModel.prepare(cfg, with_model=False)
    tokenizer, model, plan = moe_model(cfg, server_model.label_names)
    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "moe_plan.npz", **plan.arrays())
    nodes = members(grid, cfg)
    profiles = fleet(cfg.serve.fleet)
    devices = [profiles[d % len(profiles)] for d in range(len(nodes))]
    hidden = model.config.hidden_size
    pair_s = pair_seconds_of(model, plan)
    runner = RemoteExperts(grid, nodes, plan, make_scheduler(cfg, devices, pair_s, 4 * hidden),
                           devices, cfg, pair_s, 4 * hidden)
    layers = moefy(model, plan, cfg.serve.moe_top_k, keep_experts=False, runner=runner)
    log.info("serve moe: %d queries, %d layers of %d experts (top %d) on %d devices; results "
             "in %s", len(server_model.test), len(layers), plan.experts, cfg.serve.moe_top_k,
             len(nodes), run_dir)
    logits = label_logits(model, layers, tokenizer, cfg, server_model.test)
    np.save(run_dir / "serve_moe_logits.npy", logits)
    report = summary(cfg, plan, model, runner, len(layers), hidden)
    test = server_model.test
    report.update(quality(logits, np.asarray(test.labels)), queries=len(test),
                  seconds=time.perf_counter() - started)
    atomic_write_text(run_dir / "serve_moe.json", json.dumps(report, indent=1))
    log.info("serve moe: accuracy %.4f, NLL %.4f, %.0f bytes per layer per token, %d "
             "failure(s)", report["accuracy"], report["nll"],
             report["bytes_per_layer_token"], len(report["failures"]))
    return run_dir


def summary(cfg: RunConfig, plan: MoEPlan, model, runner: RemoteExperts, n_layers: int,
            hidden: int) -> dict:
    """The serving's costs: FLOPs, bytes (per slot, per layer per token), work per device."""
    st = runner.stats
    neurons = plan.assignment.shape[1]
    server_params = sum(p.numel() for p in model.parameters())
    ffn_params = 3 * hidden * neurons * n_layers
    return {
        "model": cfg.model, "experts": plan.experts, "top_k": cfg.serve.moe_top_k,
        "router_neurons": cfg.serve.moe_router_neurons, "scheduler": cfg.serve.moe_scheduler,
        "calibration_texts": cfg.serve.moe_calibration, "devices": len(runner.nodes),
        "fleet": [dev.name for dev in runner.devices],
        "ffn_flops_ratio": ffn_flops_ratio(plan.experts, cfg.serve.moe_top_k,
                                           cfg.serve.moe_router_neurons, neurons),
        "server_params": int(server_params), "expert_params": int(ffn_params),
        "slots": runner.slot, "messages": st["messages"],
        "bytes_down": int(st["bytes_down"]), "bytes_up": int(st["bytes_up"]),
        "plan_bytes": int(st["plan_bytes"]),
        "bytes_per_slot": float(np.mean(st["slot_bytes"])) if st["slot_bytes"] else 0.0,
        "bytes_per_layer_token": (st["bytes_down"] + st["bytes_up"])
        / max(st["layer_tokens"], 1),
        "dense_bytes_per_layer_token": 2 * 4 * hidden,
        "tokens_per_device": st["tokens"].tolist(), "pairs_per_device": st["pairs"].tolist(),
        "pair_seconds": runner.pair_seconds, "predicted_expert_s": st["predicted_s"],
        "alive": runner.alive.tolist(), "failures": st["failures"]}
