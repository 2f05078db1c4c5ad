"""The device side of `serve.kind='moe'` (S8): compute this device's experts for the tokens
routed to them.

The QUERY's config names the `layer` and the `experts` (ids) this device computes in this
call; `tokens` holds the hidden states x (N, H) of the tokens that chose any of them and
`mask` (N, len(experts)): which of them each token chose. The reply `partial` holds
y (N, H) = sum over those chosen experts of y_e(x) (`edge_lam.serving.moe.experts_output`), and the
seconds it took.

The device loads the run's pretrained checkpoint once per process, keeps only its FFNs, and
slices experts from them by the plan (neuron -> expert, per layer) that the server's first
call carries; the plan stays in the node's `context.state`. A call without a plan to a device
that has none is answered with an error naming the cause (the server then reassigns the
experts).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from edge_lam.config.run_config import RunConfig
from edge_lam.models.lora_model import resolve_model_source
from edge_lam.serving.moe import expert_weights, experts_output, gated_mlps
from edge_lam.records import from_record, to_record

PLAN_KEY = "moe-plan"
_FFNS: dict[str, list] = {}  # model source -> its FFN modules (the rest of the model dropped)
_EXPERTS: dict[tuple, tuple] = {}  # (source, plan digest, layer, expert) -> weights


def ffns(source: str) -> list:
    """The FFNs of the checkpoint at `source`, loaded once per process."""
    if source not in _FFNS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        _FFNS[source] = [m.eval() for m in gated_mlps(model)]
    return _FFNS[source]


def plan_of(msg: Message, context: Context) -> np.ndarray:
    """(L, F) neuron -> expert: from the message (kept in the node's state) or the state."""
    if "plan" in msg.content.array_records:
        context.state[PLAN_KEY] = msg.content["plan"]
    if PLAN_KEY not in context.state.array_records:
        raise RuntimeError("serve moe: this device has no expert plan (restarted since the "
                           "server's first call?): the server must send the plan again")
    return from_record(context.state[PLAN_KEY])["assignment"]


def handle(msg: Message, context: Context, cfg: RunConfig) -> Message:
    config = msg.content["config"]
    layer, experts = int(config["layer"]), [int(e) for e in config["experts"]]
    assignment = plan_of(msg, context)
    source = resolve_model_source(cfg.model)
    mlp = ffns(source)[layer]
    if assignment.shape[1] != mlp.gate_proj.weight.shape[0]:
        raise RuntimeError(f"serve moe: the plan has {assignment.shape[1]} neurons per layer, "
                           f"this device's {cfg.model} {mlp.gate_proj.weight.shape[0]}: the "
                           "server and the devices must load the same model")
    digest = hash(assignment.tobytes())
    weights = []
    for e in experts:
        key = (source, digest, layer, e)
        if key not in _EXPERTS:
            _EXPERTS[key] = expert_weights(mlp, np.flatnonzero(assignment[layer] == e))
        weights.append(_EXPERTS[key])
    got = from_record(msg.content["tokens"])
    x = torch.from_numpy(np.asarray(got["x"], dtype=np.float32))  # (N, H)
    mask = torch.from_numpy(np.asarray(got["mask"]).astype(bool))  # (N, len(experts))
    start = time.perf_counter()
    with torch.no_grad():
        y = experts_output(x, mask, weights, mlp.act_fn)  # (N, H)
    return Message(RecordDict({
        "partial": to_record({"y": y.numpy().astype(np.float32)}),
        "metrics": MetricRecord({"seconds": time.perf_counter() - start,
                                 "pairs": int(mask.sum())})}), reply_to=msg)

